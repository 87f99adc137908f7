"""One MixFix run in this process, without Ray: the same config and the same MixFix core
(training.mixfix) as the Ray Train job, for small datasets that fit in memory.

Differences from `jobs.train`: one process instead of DDP workers (BatchNorm sees the whole
batch), the class-balanced epoch is drawn exactly (balanced_epoch_indices) instead of by
stochastic repetition, and nothing is checkpointed. benchmarks.train_modes uses it with
`--engine local` where starting a Ray node is not possible or too slow (a loaded host).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from cleaner.reading.shards import STATUS_OK, read_shard
from training.config import UPDATING_MODES, TrainJobConfig
from training.data import SampleIndex
from training.loop import initial_state
from training.mixfix import (
    make_optimizer,
    make_scheduler,
    predict,
    train_one_epoch,
    update_selection,
)
from training.networks import build_network
from training.sampling import balanced_epoch_indices, iterations_per_epoch
from training.transforms import augment_batch, to_tensor_batch


def load_images(
    shards: list[str], cfg: TrainJobConfig, class_names: list[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(uint8 images [N, S, S, 3], labels int64[N], usable bool[N]) in shard order.

    Every row read_shard yields (failed ones too, as the clean job's manifest has them), so
    row i is manifest row i when `shards` is the manifest's shard list.
    """
    images, labels, usable = [], [], []
    for shard in shards:
        for batch in read_shard(
            shard,
            class_names=class_names,
            image_size=cfg.data.image_size,
            extensions=cfg.data.image_extensions,
            batch_size=cfg.data.read_batch_size,
        ):
            images.append(batch["image"])
            labels.append(batch["label"])
            usable.append(np.asarray(batch["status"]) == STATUS_OK)
    return np.concatenate(images), np.concatenate(labels), np.concatenate(usable)


def run_local(
    cfg: TrainJobConfig,
    index: SampleIndex,
    class_names: list[str],
    test_shards: list[str],
    log: Callable[[dict], None] = print,
    threads: int = 1,
    on_finished: Callable[[torch.nn.Module, list[dict]], None] | None = None,
) -> list[dict]:
    """Train one run in-process; returns its per-epoch metrics (the job's keys).

    threads: torch intra-op threads (1 by default: on small shared CPUs OpenMP spinning
    makes more threads slower). on_finished(model, history) is called after the last
    epoch (jobs.train writes the model folder there).
    """
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    num_classes = len(class_names)
    images, _, usable = load_images(index.shards, cfg, class_names)
    if images.shape[0] != index.num_samples:
        raise ValueError(
            f"the shards hold {images.shape[0]} samples, the manifest {index.num_samples}"
        )
    trainable = index.trainable & usable
    test_images, test_labels, test_ok = (
        load_images(test_shards, cfg, class_names) if test_shards else (None, None, None)
    )
    mean, std = cfg.data.mean, cfg.data.std
    model = build_network(
        cfg.network.name,
        num_classes,
        pretrained_path=cfg.network.pretrained,
        clip=cfg.network.clip,
        data=cfg.data,
    )
    optimizer = make_optimizer(model, cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay)
    scheduler = make_scheduler(optimizer, cfg.optim.milestones, cfg.optim.gamma)
    state = initial_state(index, cfg.mixfix.mode)
    batch = cfg.optim.batch_size
    iterations = iterations_per_epoch(int(trainable.sum()), batch)
    truth = index.true_labels
    history: list[dict] = []

    def predictions(source: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        chunks = (
            to_tensor_batch(source[i : i + 512], mean, std) for i in range(0, len(source), 512)
        )
        return predict(model, chunks, "cpu")

    for epoch in range(cfg.optim.epochs):
        started = time.perf_counter()
        rng = np.random.default_rng([cfg.seed, epoch])
        chosen = np.flatnonzero(state.selected & trainable)
        if not cfg.mixfix.class_balanced:  # every sample about equally often, no balance
            reps = -(-iterations * batch // chosen.size)
            order = np.concatenate([rng.permutation(chosen) for _ in range(reps)])
            order = order[: iterations * batch]
        else:
            order = balanced_epoch_indices(
                chosen, state.current_labels, num_classes, iterations, batch, rng
            )
        batches = (
            (
                augment_batch(images[ids], rng, cfg.data.crop_padding, cfg.data.flip, mean, std),
                torch.from_numpy(state.current_labels[ids]),
                *([torch.from_numpy(index.weights[ids])] if index.weights is not None else []),
            )
            for ids in order.reshape(iterations, batch)
        )
        stats = train_one_epoch(
            model, optimizer, batches, beta=cfg.mixfix.mixup_beta, device="cpu", generator=rng
        )
        scheduler.step()
        metrics: dict = {
            "epoch": epoch + 1,
            "lr": optimizer.param_groups[0]["lr"],
            "loss": stats["loss"],
            "train_samples": stats["samples"],
        }
        if cfg.mixfix.mode in UPDATING_MODES:
            prob, pred = predictions(images)
            prob = np.where(trainable, prob, 0.0)
            update = update_selection(
                state,
                prob,
                pred,
                cfg.mixfix.theta_r,
                cfg.mixfix.theta_r2,
                clip_topk=index.zeroshot_topk if cfg.mixfix.mode == "mixfix_clip" else None,
                clip_k=cfg.mixfix.clip_k,
                warmup_epochs=cfg.mixfix.warmup_epochs,
            )
            state = update.state
            metrics.update(absorbed=update.absorbed, relabelled=update.relabelled)
        chosen_mask = state.selected & trainable
        metrics["selected"] = int(chosen_mask.sum())
        if truth is not None:
            known = chosen_mask & (truth >= 0)
            metrics["selected_precision"] = (
                float((state.current_labels[known] == truth[known]).mean()) if known.any() else None
            )
        if test_images is not None:
            _, test_pred = predictions(test_images[test_ok])
            metrics["test_accuracy"] = float((test_pred == test_labels[test_ok]).mean())
        metrics["epoch_seconds"] = time.perf_counter() - started
        history.append(metrics)
        log(metrics)
    if on_finished is not None:
        on_finished(model, history)
    return history
