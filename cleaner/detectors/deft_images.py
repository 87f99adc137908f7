"""DeFT with the image tower adapted as well (`selection.deft.image_tuning: vpt | lora`):
the positive / negative prompts and a parameter-efficient tuner of CLIP's image tower are
trained together on the images, as DeFT's first phase, with Ray Train (DDP over the
workers; GPUs when asked or available). The objective is `deft.deft_objective`, per batch.

When training ends each worker embeds its share of the shards with the tuned tower and
writes `<output>/detectors/deft/<score file name>` (shard, shard_pos, embedding): the
manifest then scores DeFT on those embeddings instead of the frozen tower's. Rank 0 writes
the prompts' text features beside them; the driver reads only those.
"""

from __future__ import annotations

import io
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cleaner.config import CleanJobConfig, DeftConfig, ModelConfig
from cleaner.reading import uri as uri_lib

TUNED_DIR = "detectors/deft"
FEATURES_FILE = "deft_text_features.npz"


def build_image_model(clip, class_names: list[str], cfg: DeftConfig, seed: int):
    """An nn.Module: the tuned image tower and the prompts -> (pos, neg) logits."""
    import torch
    from torch import nn

    from cleaner.detectors.deft import PromptLearner
    from cleaner.detectors.peft import add_peft

    class DeftImageModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.clip = clip.model
            self.clip.requires_grad_(False)
            self.tuner = add_peft(
                clip.model.visual, cfg.image_tuning, rank=cfg.lora_rank, length=cfg.vpt_len
            )
            self.prompts = PromptLearner(clip, class_names, cfg, seed)
            self.positive = self.prompts.positive
            self.negative = self.prompts.negative

        def embed(self, images):
            return torch.nn.functional.normalize(self.clip.visual(images).float(), dim=-1)

        def forward(self, images):
            features = self.embed(images)
            positive = self.prompts.encode(self.positive)
            negative = self.prompts.encode(self.negative)
            scale = self.prompts.scale
            return scale * features @ positive.T, scale * features.detach() @ negative.T

    return DeftImageModel()


def prepare_images(images: np.ndarray, mean, std, device):
    """uint8 [B, S, S, 3] -> CLIP-normalised float [B, 3, S, S] on the device."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float()
    return (x / 255.0 - mean) / std


def train_epoch(model, optimizer, batches, *, warmup: bool, require_argmax: bool, device):
    """One epoch of DeFT's loss over (images, labels, complementary labels) batches."""
    import torch

    from cleaner.detectors.deft import deft_objective

    totals = {"loss": 0.0, "samples": 0, "selected": 0}
    for images, labels, other in batches:
        labels = torch.as_tensor(labels, device=device)
        pos, neg = model(images)
        cls_sum, count, neg_sum, selected = deft_objective(
            pos,
            neg,
            labels,
            torch.as_tensor(other, device=device),
            warmup=warmup,
            require_argmax=require_argmax,
        )
        loss = cls_sum / max(count, 1) + neg_sum / labels.shape[0]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        totals["loss"] += float(loss.detach()) * labels.shape[0]
        totals["samples"] += int(labels.shape[0])
        totals["selected"] += int(selected.sum())
    return totals


def tuned_file_rows(shard: str, positions, embeddings) -> pa.Table:
    from cleaner.scoring.writing import fixed_size_list_array

    return pa.table(
        {
            "shard": pa.array([shard] * len(positions), pa.string()),
            "shard_pos": pa.array(np.asarray(positions, dtype=np.int64)),
            "embedding": fixed_size_list_array(np.asarray(embeddings, dtype=np.float16)),
        }
    )


def write_tuned_embeddings(embed, shards, names, target_uri, read_options, mean, std, device):
    """Embed every sample of `shards` with the tuned tower; one file per shard."""
    import torch

    from cleaner.reading.shards import read_shard

    for shard in shards:
        positions, rows = [], []
        for batch in read_shard(shard, **read_options):
            with torch.no_grad():
                feats = embed(prepare_images(batch["image"], mean, std, device))
            positions.append(np.asarray(batch["shard_pos"]))
            rows.append(feats.cpu().numpy())
        table = tuned_file_rows(
            shard,
            np.concatenate(positions) if positions else [],
            np.concatenate(rows) if rows else np.zeros((0, 1)),
        )
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        uri_lib.write_bytes(uri_lib.join(target_uri, names[shard]), sink.getvalue().to_pybytes())


def image_loop_per_worker(loop_config: dict) -> None:
    """One Ray Train worker of DeFT's image-tuning phase."""
    import ray.train
    import ray.train.torch
    import torch

    from cleaner.detectors.deft import complementary_labels, step_uniforms
    from cleaner.scoring.models import load_clip
    from cleaner.selection.probe_streaming import stable_hash

    cfg = CleanJobConfig.model_validate(loop_config["config"])
    settings = cfg.selection.deft
    class_names, shards = loop_config["class_names"], loop_config["shards"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(cfg.seed)
    device = ray.train.torch.get_device()
    clip = load_clip(ModelConfig(**cfg.model.model_dump()), device=device)
    model = build_image_model(clip, class_names, settings, cfg.seed).to(device)
    module = model
    model = ray.train.torch.prepare_model(model, move_to_device=False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=settings.image_lr, momentum=0.9, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, settings.image_epochs)
    mean = torch.from_numpy(clip.mean).reshape(1, 3, 1, 1).to(device)
    std = torch.from_numpy(clip.std).reshape(1, 3, 1, 1).to(device)
    per_worker = max(1, settings.image_batch_size // world)
    num_classes = len(class_names)

    def batches(epoch: int):
        for batch in ray.train.get_dataset_shard("train").iter_batches(
            batch_size=per_worker, batch_format="numpy", local_shuffle_buffer_size=1024,
            local_shuffle_seed=cfg.seed * 1000 + epoch * 10 + rank,
        ):  # fmt: skip
            labels = np.asarray(batch["label"], dtype=np.int64)
            hashes = stable_hash(np.asarray(batch["key"]).astype(str))
            other = complementary_labels(
                labels, num_classes, step_uniforms(hashes, cfg.seed, epoch, 1)
            )
            yield prepare_images(batch["image"], mean, std, device), labels, other

    for epoch in range(settings.image_epochs):
        model.train()
        totals = train_epoch(
            model,
            optimizer,
            batches(epoch),
            warmup=epoch < settings.image_warmup_epochs,
            require_argmax=settings.require_argmax,
            device=device,
        )
        schedule.step()
        if rank == 0:
            print(
                f"[deft] image epoch {epoch + 1}/{settings.image_epochs}: loss "
                f"{totals['loss'] / max(totals['samples'], 1):.4f}, taken as clean "
                f"{totals['selected'] / max(totals['samples'], 1):.3f}",
                flush=True,
            )
    model.eval()
    read_options = {
        "class_names": class_names,
        "image_size": clip.image_size,
        "extensions": cfg.data.image_extensions,
        **clip.resize,
    }
    write_tuned_embeddings(
        module.embed, shards[rank::world], loop_config["names"], loop_config["target"],
        read_options, mean, std, device,
    )  # fmt: skip
    if rank == 0:
        with torch.no_grad():
            positive = module.prompts.encode(module.positive).cpu().numpy()
            negative = module.prompts.encode(module.negative).cpu().numpy()
        sink = io.BytesIO()
        np.savez(
            sink,
            positive=positive,
            negative=negative,
            scale=np.float64(module.prompts.scale),
            n_ctx=np.int64(module.prompts.n_ctx),
        )
        uri_lib.write_bytes(uri_lib.join(loop_config["target"], FEATURES_FILE), sink.getvalue())
    ray.train.report({"done": 1})


def fit_deft_images(cfg: CleanJobConfig, class_names: list[str], shards: list[str], log=print):
    """Train DeFT's prompts and image tuner on the shards' images; a FittedDeft that
    scores the tuned embeddings written under <output>/detectors/deft/."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from cleaner.detectors.deft import FittedDeft
    from cleaner.scoring.models import load_clip
    from cleaner.scoring.pipeline import decoded_samples, shard_output_names

    settings = cfg.selection.deft
    clip = load_clip(cfg.model, device="cpu")  # its input size and resizing
    data = decoded_samples(
        shards,
        class_names=class_names,
        image_size=clip.image_size,
        extensions=cfg.data.image_extensions,
        read_batch_size=cfg.scoring.read_batch_size,
        resize=clip.resize,
    ).map_batches(usable_rows)
    use_gpu = settings.image_use_gpu
    if use_gpu == "auto":
        use_gpu = ray.cluster_resources().get("GPU", 0) >= 1
    target = uri_lib.join(cfg.output, TUNED_DIR)
    names = shard_output_names(shards)
    log(f"[deft] image tuning ({settings.image_tuning}) on {settings.image_workers} workers")
    with tempfile.TemporaryDirectory() as storage:  # nothing kept: rank 0 writes the prompts
        trainer = TorchTrainer(
            image_loop_per_worker,
            train_loop_config={
                "config": cfg.model_dump(mode="json"),
                "class_names": class_names,
                "shards": shards,
                "names": names,
                "target": target,
            },
            scaling_config=ScalingConfig(num_workers=settings.image_workers, use_gpu=bool(use_gpu)),
            run_config=RunConfig(name="deft-images", storage_path=storage),
            datasets={"train": data},
        )
        result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"DeFT's image tuning failed: {result.error}")
    saved = np.load(io.BytesIO(uri_lib.read_bytes(uri_lib.join(target, FEATURES_FILE))))
    return FittedDeft(
        positive=saved["positive"],
        negative=saved["negative"],
        scale=float(saved["scale"]),
        require_argmax=settings.require_argmax,
        n_ctx=int(saved["n_ctx"]),
        tuned={shard: uri_lib.join(target, names[shard]) for shard in shards},
    )


def usable_rows(batch: dict) -> dict:
    """The rows DeFT trains on: status ok, with a label."""
    keep = (np.asarray(batch["status"]) == "ok") & (np.asarray(batch["label"]) >= 0)
    return {name: np.asarray(values)[keep] for name, values in batch.items()}
