"""The Ray Train loop of MixFix: DDP training on the streamed epoch, then the prediction
pass over every training sample, split across workers and combined deterministically.

Each worker: trains on its split of the epoch stream (`get_dataset_shard("train")`),
predicts the samples of its own subset of shards (each shard read by one worker), and
all-gathers (sample id, max prob, argmax); every worker then applies the same
`update_selection` to the same full arrays, so 1 or N workers decide identically.
Rank 0 publishes the next epoch's state and writes the checkpoint (model, optimiser,
scheduler, epoch, selection, labels, metrics history) to the run's storage.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch

from cleaner.progress import ProgressLog
from training.checkpoint import CHECKPOINT_FILES, load_checkpoint, save_checkpoint
from training.config import UPDATING_MODES, TrainJobConfig
from training.data import (
    SampleIndex,
    decoded_with_ids,
    repetition_factors,
    shuffle_buffer_rows,
    split_shards_by_samples,
)
from training.devices import (
    amp_dtype_for,
    broadcast_buffers,
    configure_backends,
    make_scaler,
    maybe_sync_batchnorm,
    normalise,
    to_device,
)
from training.mixfix import (
    MixFixState,
    make_optimizer,
    make_scheduler,
    train_one_epoch,
    update_selection,
)
from training.networks import build_network

__all__ = ["CHECKPOINT_FILES", "amp_dtype_for", "load_checkpoint", "save_checkpoint"]


def initial_state(index: SampleIndex, mode: str) -> MixFixState:
    """The first epoch's set: the clean set (every trainable sample in mode noisy)."""
    clean = index.is_clean & index.trainable if mode != "noisy" else index.trainable.copy()
    return MixFixState.initial(clean, np.where(index.labels >= 0, index.labels, 0))


def gather_objects(obj, world_size: int) -> list:
    if world_size == 1:
        return [obj]
    out: list = [None] * world_size
    torch.distributed.all_gather_object(out, obj)
    return out


def combine_predictions(parts, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Full (max prob, argmax) arrays from workers' (ids, probs, preds) parts, by sample id.

    The result depends only on which sample got which prediction, not on how samples were
    split over workers or in which order parts arrive: 1 or N workers decide alike.
    Samples no worker predicted (failed ones) keep their label with probability 0.
    """
    max_prob = np.zeros(labels.shape[0], dtype=np.float32)
    pred = np.where(labels >= 0, labels, 0).astype(np.int64)
    for ids, probs, preds in parts:
        max_prob[ids], pred[ids] = probs, preds
    return max_prob, pred


@torch.no_grad()
def predict_subset(model, dataset, device, mean, std, amp_dtype, batch_size: int):
    """(sample ids, max prob, argmax, given labels) for a dataset of decoded samples.

    Only images go to the device; ids and labels stay on the host. Predictions stay on
    the device until the end: one transfer back, no sync per batch.
    """
    model.eval()
    ids, labels, probs, preds = [], [], [], []
    batches = () if dataset is None else dataset.iter_batches(batch_size=batch_size)
    for batch in batches:
        inputs = normalise(to_device(batch["image"], device), mean, std)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(inputs)
        top_p, top_i = torch.softmax(logits.float(), dim=1).max(dim=1)
        probs.append(top_p)
        preds.append(top_i)
        ids.append(np.asarray(batch["sample_id"], dtype=np.int64))
        labels.append(np.asarray(batch["label"], dtype=np.int64))
    model.train()
    if not ids:
        empty = np.zeros(0)
        return empty.astype(np.int64), empty.astype(np.float32), empty.astype(np.int64), empty
    both = torch.stack([torch.cat(probs), torch.cat(preds).to(torch.float32)]).cpu().numpy()
    return (
        np.concatenate(ids),
        both[0].astype(np.float32),
        both[1].astype(np.int64),
        np.concatenate(labels),
    )


def epoch_batch_to_device(batch: dict[str, np.ndarray], epoch: int, device, mean, std):
    """(normalised inputs, targets) on the device from a host batch of the epoch stream.

    The epoch check reads the host copy (no device sync); image and targets are copied
    from pinned memory without blocking.
    """
    epochs = np.asarray(batch["epoch"])
    if epochs.size and int(epochs[0]) != epoch:
        raise RuntimeError(f"epoch {epoch} received rows expanded for epoch {epochs[0]}")
    images = to_device(batch["image"], device)
    targets = to_device(np.asarray(batch["target"], dtype=np.int64), device)
    if "weight" in batch:  # mixfix.sample_weights
        weights = to_device(np.asarray(batch["weight"], dtype=np.float32), device)
        return normalise(images, mean, std), targets, weights
    return normalise(images, mean, std), targets


@dataclass
class BatchClasses:
    """Distinct labels per training batch: how well the stream mixes the classes (a
    class-sorted stream gives 1-3; uniform labels over K classes about K (1 - e^(-B/K)))."""

    batches: int = 0
    distinct: int = 0

    def add(self, targets: np.ndarray) -> None:
        self.batches += 1
        self.distinct += int(np.unique(targets).size)

    @property
    def mean(self) -> float | None:
        return self.distinct / self.batches if self.batches else None


def epoch_batches(
    shard,
    epoch: int,
    batch_size: int,
    device,
    mean,
    std,
    *,
    shuffle_buffer: int,
    shuffle_seed: int,
    classes: BatchClasses | None = None,
):
    """(normalised inputs, current labels) of this worker's split of the epoch stream;
    `classes` counts the distinct labels of each batch."""
    for batch in shard.iter_batches(
        batch_size=batch_size,
        batch_format="numpy",
        prefetch_batches=2,
        drop_last=True,
        local_shuffle_buffer_size=shuffle_buffer or None,
        local_shuffle_seed=shuffle_seed,
    ):
        if classes is not None:
            classes.add(np.asarray(batch["target"]))
        yield epoch_batch_to_device(batch, epoch, device, mean, std)


def with_progress(batches, progress: ProgressLog):
    """Pass (inputs, targets[, weights]) batches through, counting them in a progress line."""
    for batch in batches:
        yield batch
        progress.update(units=1, items=int(batch[1].shape[0]))


def train_loop_per_worker(loop_config: dict) -> None:
    """One Ray Train worker of a MixFix run (see the module docstring)."""
    import ray
    import ray.train
    import ray.train.torch

    cfg = TrainJobConfig.model_validate(loop_config["config"])
    index: SampleIndex = ray.get(loop_config["index"][0])
    store = loop_config["store"]
    class_names: list[str] = loop_config["class_names"]
    test_shards: list[str] = loop_config["test_shards"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    if not cfg.scaling.use_gpu:
        torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    torch.manual_seed(cfg.seed)
    device = ray.train.torch.get_device()  # the GPU Ray granted this worker, or CPU
    configure_backends(device)
    amp_dtype = amp_dtype_for(device, cfg.optim.amp)
    mean = torch.tensor(cfg.data.mean, device=device).reshape(1, 3, 1, 1)
    std = torch.tensor(cfg.data.std, device=device).reshape(1, 3, 1, 1)

    model = build_network(
        cfg.network.name,
        len(class_names),
        pretrained_path=cfg.network.pretrained,
        clip=cfg.network.clip,
        data=cfg.data,
    )
    model = maybe_sync_batchnorm(model, world, device, cfg.scaling.sync_batchnorm)
    model = ray.train.torch.prepare_model(model)
    optimizer = make_optimizer(model, cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay)
    scheduler = make_scheduler(optimizer, cfg.optim.milestones, cfg.optim.gamma)
    scaler = make_scaler(amp_dtype, device)

    state, history, start_epoch = initial_state(index, cfg.mixfix.mode), [], 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state, history = load_checkpoint(directory, model, optimizer, scheduler, device, scaler)
        start_epoch = len(history)
        print(f"[train] rank {rank}: resumed after epoch {start_epoch}", flush=True)
    resumed_from = start_epoch if checkpoint is not None else None

    # Prediction work split by sample count (whole shards, each read by one worker).
    my_shards = split_shards_by_samples(index.shards, index.offsets, index.num_samples, world)[rank]
    my_test = test_shards[rank::world]
    # A worker with more ranks than shards to go round has nothing to predict (None).
    predict_source = (
        decoded_with_ids(my_shards, index.offsets, cfg, class_names) if my_shards else None
    )
    test_source = (
        decoded_with_ids(my_test, dict.fromkeys(my_test, 0), cfg, class_names) if my_test else None
    )
    if cfg.data.cache_decoded:  # this worker's share, decoded once for every epoch
        predict_source = predict_source.materialize() if predict_source is not None else None
        test_source = test_source.materialize() if test_source is not None else None
    per_worker_batch = cfg.optim.batch_size // world
    balanced = cfg.mixfix.class_balanced
    for epoch in range(start_epoch, cfg.optim.epochs):
        started = time.perf_counter()
        selected = state.selected & index.trainable
        if rank == 0:
            arrays = {
                "repeat": repetition_factors(selected, state.current_labels, balanced),
                "labels": state.current_labels,
                **({"weights": index.weights} if index.weights is not None else {}),
            }
            ray.get(store.publish.remote(epoch, arrays))  # the store owns them, not rank 0
        if world > 1:
            torch.distributed.barrier()

        classes = BatchClasses()
        buffer_rows = shuffle_buffer_rows(
            cfg.data.shuffle_buffer,
            repetition=len(index.labels) / max(1, int(selected.sum())),
            row_bytes=3 * cfg.data.image_size**2,
            max_mb=cfg.data.shuffle_buffer_mb,
        )
        batches = epoch_batches(
            ray.train.get_dataset_shard("train"),
            epoch,
            per_worker_batch,
            device,
            mean,
            std,
            shuffle_buffer=buffer_rows,
            shuffle_seed=cfg.seed * 1000 + epoch * 10 + rank,
            classes=classes,
        )
        if rank == 0:  # one-line progress in the log; every rank runs at the same pace
            expected = max(1, len(index.labels) // world // per_worker_batch)
            progress = ProgressLog(
                f"train epoch {epoch + 1}/{cfg.optim.epochs}, rank 0",
                total_units=expected,
                unit="batches",
                item="samples",
            )
            batches = with_progress(batches, progress)
        stats = train_one_epoch(
            model,
            optimizer,
            batches,
            beta=cfg.mixfix.mixup_beta,
            device=device,
            generator=np.random.default_rng([cfg.seed, epoch, rank]),
            scaler=scaler,
            amp_dtype=amp_dtype,
        )
        loss_sum, seen = stats["loss"] * stats["samples"], stats["samples"]
        scheduler.step()
        train_seconds = time.perf_counter() - started

        module = model.module if hasattr(model, "module") else model
        metrics: dict = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"]}
        if resumed_from is not None and epoch == resumed_from:
            metrics["resumed_from_epoch"] = resumed_from
        gathered = gather_objects(
            (loss_sum, seen, train_seconds, classes.distinct, classes.batches), world
        )
        metrics["loss"] = sum(g[0] for g in gathered) / max(1, sum(g[1] for g in gathered))
        metrics["train_samples"] = int(sum(g[1] for g in gathered))
        metrics["train_images_per_s"] = metrics["train_samples"] / max(g[2] for g in gathered)
        batches_seen = sum(g[4] for g in gathered)
        metrics["batch_distinct_classes_mean"] = (
            sum(g[3] for g in gathered) / batches_seen if batches_seen else None
        )
        metrics["shuffle_buffer_rows"] = buffer_rows
        metrics["worker_batch_size"] = per_worker_batch

        # every rank predicts with rank 0's BatchNorm statistics: 1 or N workers alike
        broadcast_buffers(module, world)
        if cfg.mixfix.mode in UPDATING_MODES:
            mine = predict_subset(
                module,
                predict_source,
                device,
                mean,
                std,
                amp_dtype,
                per_worker_batch * 2,
            )
            max_prob, pred = combine_predictions(gather_objects(mine[:3], world), index.labels)
            max_prob = np.where(index.trainable, max_prob, 0.0)  # never absorbed nor relabelled
            update = update_selection(
                state,
                max_prob,
                pred,
                cfg.mixfix.theta_r,
                cfg.mixfix.theta_r2,
                true_labels=None
                if index.true_labels is None
                else np.where(index.true_labels >= 0, index.true_labels, pred),
                clip_topk=index.zeroshot_topk if cfg.mixfix.mode == "mixfix_clip" else None,
                clip_k=cfg.mixfix.clip_k,
                warmup_epochs=cfg.mixfix.warmup_epochs,
            )
            state = update.state
            metrics.update(
                absorbed=int(update.absorbed),
                relabelled=int(update.relabelled),
                selected_precision=update.precision,
                relabel_accuracy=update.relabel_accuracy,
            )
        metrics["selected"] = int((state.selected & index.trainable).sum())
        if index.true_labels is not None:
            chosen = state.selected & index.trainable & (index.true_labels >= 0)
            metrics["selected_precision"] = (
                float((state.current_labels[chosen] == index.true_labels[chosen]).mean())
                if chosen.any()
                else None
            )

        if test_shards:
            _, _, preds, labels = predict_subset(
                module,
                test_source,
                device,
                mean,
                std,
                amp_dtype,
                per_worker_batch * 2,
            )
            counts = gather_objects((int((preds == labels).sum()), len(labels)), world)
            metrics["test_accuracy"] = sum(c[0] for c in counts) / max(1, sum(c[1] for c in counts))
        metrics["epoch_seconds"] = time.perf_counter() - started
        history.append(metrics)
        if rank == 0:
            print(f"[train] {json.dumps(metrics)}", flush=True)
        with tempfile.TemporaryDirectory() as directory:
            if rank == 0:
                save_checkpoint(directory, model, optimizer, scheduler, state, history, scaler)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
            else:
                ray.train.report(metrics)
