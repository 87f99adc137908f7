"""Class-balanced sampling over the selected set (docs/method.md, "MixFix"): which sample indices
one MixFix epoch trains on. Pure numpy/torch: no Ray here."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch


def iterations_per_epoch(num_total: int, batch_size: int) -> int:
    """Iterations of one epoch: N_total // batch_size (floor), at least 1.

    N_total counts every training sample, selected or not (docs/method.md, "MixFix": N_total / batch size);
    the floor keeps all batches full, which DDP and BatchNorm prefer.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return max(1, num_total // batch_size)


def balanced_epoch_indices(
    selected_indices: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    iterations_per_epoch: int,
    batch_size: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Dataset indices for one epoch, class-balanced over the selected samples.

    selected_indices: int[S], indices into the dataset of the selected samples.
    labels: int[N_total], the current label of EVERY dataset sample (indexed by
        selected_indices; entries of unselected samples are ignored).
    Returns int64[iterations_per_epoch * batch_size], shuffled. Each class present in the
    selection is drawn equally often (counts differ by at most 1; which classes get the
    extra draw is random), as if every class were repeated up to the largest class's size;
    within a class, samples are drawn by cycling a fresh permutation, so their counts also
    differ by at most 1. Only selected samples appear. Classes absent from the selection
    are not drawn.
    """
    selected_indices = np.asarray(selected_indices)
    labels = np.asarray(labels)
    total = iterations_per_epoch * batch_size
    if total < 1:
        raise ValueError("iterations_per_epoch and batch_size must be >= 1")
    if selected_indices.ndim != 1 or selected_indices.size == 0:
        raise ValueError("selected_indices must be a non-empty 1-D array")
    if labels.ndim != 1:
        raise ValueError("labels must be a 1-D array over the whole dataset")
    if selected_indices.min() < 0 or selected_indices.max() >= labels.shape[0]:
        raise ValueError("selected_indices out of range for labels")
    selected_indices = np.unique(selected_indices).astype(np.int64)
    selected_labels = labels[selected_indices]
    if selected_labels.min() < 0 or selected_labels.max() >= num_classes:
        raise ValueError(f"labels of selected samples must lie in [0, {num_classes})")

    # Group the selected indices by class (stable sort keeps them contiguous per class).
    order = np.argsort(selected_labels, kind="stable")
    grouped = selected_indices[order]
    counts = np.bincount(selected_labels, minlength=num_classes)
    present = np.flatnonzero(counts)
    starts = np.concatenate(([0], np.cumsum(counts)))[present]
    sizes = counts[present]

    # Equal quota per present class; the remainder goes to randomly chosen classes.
    quotas = np.full(present.size, total // present.size, dtype=np.int64)
    quotas[rng.choice(present.size, total % present.size, replace=False)] += 1

    # Position j of a class's quota takes its (j mod size)-th sample in a fresh permutation.
    # Vectorised: a random key per selected sample, sorted within its class.
    permuted = grouped[
        np.lexsort((rng.random(grouped.size), np.repeat(np.arange(present.size), sizes)))
    ]
    class_of_draw = np.repeat(np.arange(present.size), quotas)
    position = np.arange(total) - np.repeat(np.cumsum(quotas) - quotas, quotas)
    draws = permuted[starts[class_of_draw] + position % sizes[class_of_draw]]
    return draws[rng.permutation(total)]


class ClassBalancedSampler(torch.utils.data.Sampler[int]):
    """A map-style Sampler over `balanced_epoch_indices`; call set_epoch() each epoch.

    The draw of epoch e depends only on (seed, e), so every DDP rank can compute the
    same epoch order and take its own slice.
    """

    def __init__(
        self,
        selected_indices: np.ndarray,
        labels: np.ndarray,
        num_classes: int,
        num_total: int,
        batch_size: int,
        seed: int = 0,
    ) -> None:
        self.selected_indices = np.asarray(selected_indices)
        self.labels = np.asarray(labels)
        self.num_classes = num_classes
        self.iterations = iterations_per_epoch(num_total, batch_size)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose draw __iter__ yields."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.iterations * self.batch_size

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng((self.seed, self.epoch))
        indices = balanced_epoch_indices(
            self.selected_indices,
            self.labels,
            self.num_classes,
            self.iterations,
            self.batch_size,
            rng,
        )
        return iter(indices.tolist())


__all__ = ["ClassBalancedSampler", "balanced_epoch_indices", "iterations_per_epoch"]
