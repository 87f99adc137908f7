"""Label-noise injection for benchmarks (docs/method.md, "Noise models").

All functions take the true labels and a ``numpy.random.Generator`` and return a new int64
array of noisy labels; inputs are never modified. Keep the true labels beside the noisy ones
so that every run can report clean-selection precision, recall, F1 and AUROC.

- symmetric r: with probability r a label is replaced by a class drawn uniformly from all K
  classes (it may land on the true class, so about r * (K - 1) / K of the labels change).
- asymmetric r: with probability r a label y that has a mapping entry becomes mapping[y]
  (CIFAR-10: truck->automobile, bird->airplane, deer->horse, cat<->dog).
- hard r: with probability r a label flips to the most similar class, given per class ([K]:
  class-conditional) or per sample ([N]: instance-dependent).
- instance r (instance-dependent, Xia et al., NeurIPS 2020, the generator behind the CIFAR-10
  "instance-dependent" benchmarks): each sample gets its own flip rate around r, and flips
  towards a class chosen by a random projection of its own features, so two samples of the
  same class can flip at different rates and to different classes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Literal

import numpy as np

NoiseKind = Literal["none", "symmetric", "asymmetric", "hard", "instance"]
NOISE_KINDS: tuple[str, ...] = ("none", "symmetric", "asymmetric", "hard", "instance")
INSTANCE_RATE_SPREAD = 0.1
"""Standard deviation of the per-sample flip rates of instance-dependent noise (Xia et al.)."""

CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
# The standard CIFAR-10 asymmetric flips: truck->automobile, bird->airplane, deer->horse, cat<->dog.
CIFAR10_ASYMMETRIC: Mapping[int, int] = MappingProxyType({9: 1, 2: 0, 4: 7, 3: 5, 5: 3})


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def _check_labels(true_labels: np.ndarray | Sequence[int], num_classes: int | None) -> np.ndarray:
    """The labels as a new 1-D int64 array; ValueError if they are invalid."""
    labels = np.asarray(true_labels)
    if labels.ndim != 1:
        raise ValueError(f"true_labels must be a 1-D array, got shape {labels.shape}")
    if labels.size == 0:
        return labels.astype(np.int64)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"true_labels must be integers, got dtype {labels.dtype}")
    low, high = int(labels.min()), int(labels.max())
    if low < 0:
        raise ValueError(f"true_labels must be non-negative, got a label {low}")
    if num_classes is not None and high >= num_classes:
        raise ValueError(f"true_labels must lie in [0, {num_classes}), got a label {high}")
    return labels.astype(np.int64)


def _check_rate(rate: float) -> float:
    rate = float(rate)
    if math.isnan(rate) or not 0.0 <= rate <= 1.0:
        raise ValueError(f"noise rate must lie in [0, 1], got {rate}")
    return rate


def _check_num_classes(num_classes: int) -> int:
    if int(num_classes) != num_classes or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes}")
    return int(num_classes)


def _flip_mask(count: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Which of `count` samples are hit by noise (each independently with probability rate)."""
    return rng.random(count) < rate


def _mapping_table(
    mapping: Mapping[int, int] | Sequence[int] | np.ndarray, size: int
) -> np.ndarray:
    """A lookup table target[y] covering labels 0..size-1 (identity where there is no entry).

    A mapping gives entries {source: target}; a sequence gives target[y] for each class y,
    where a negative entry or y itself means "no flip".
    """
    if isinstance(mapping, Mapping):
        entries = {int(k): int(v) for k, v in mapping.items()}
    else:
        targets = np.asarray(mapping)
        if targets.ndim != 1 or (targets.size and not np.issubdtype(targets.dtype, np.integer)):
            raise ValueError("mapping must be a dict {class: class} or a 1-D integer sequence")
        entries = {y: int(t) for y, t in enumerate(targets.tolist()) if t >= 0}
    for source, target in entries.items():
        if source < 0 or target < 0:
            raise ValueError(
                f"mapping entries must be non-negative classes, got {source}->{target}"
            )
    width = max([size, *(k + 1 for k in entries)]) if entries else size
    table = np.arange(width, dtype=np.int64)
    for source, target in entries.items():
        table[source] = target
    return table


# ---------------------------------------------------------------------------------------------
# Noise models
# ---------------------------------------------------------------------------------------------


def symmetric_noise(
    true_labels: np.ndarray | Sequence[int],
    rate: float,
    num_classes: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Symmetric noise: with probability `rate`, replace a label by a uniform draw over all K.

    The draw may hit the true class, so the expected fraction of changed labels is
    ``rate * (K - 1) / K`` (e.g. 0.36 for rate 0.4 and K = 10).
    """
    num_classes = _check_num_classes(num_classes)
    labels = _check_labels(true_labels, num_classes)
    rate = _check_rate(rate)
    hit = _flip_mask(labels.size, rate, rng)
    replacement = rng.integers(0, num_classes, size=labels.size, dtype=np.int64)
    return np.where(hit, replacement, labels)


def asymmetric_noise(
    true_labels: np.ndarray | Sequence[int],
    rate: float,
    mapping: Mapping[int, int] | Sequence[int] | np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """Class-conditional noise: with probability `rate`, a label y with an entry becomes mapping[y].

    `mapping` is a dict {source: target} (e.g. CIFAR10_ASYMMETRIC) or a per-class sequence of
    targets (e.g. ClassSpec.most_similar(); an entry equal to its class or negative means no
    flip). Labels without an entry never change, so the expected fraction of changed labels is
    ``rate`` times the fraction of samples whose class has a (non-identity) entry.
    """
    labels = _check_labels(true_labels, None)
    rate = _check_rate(rate)
    table = _mapping_table(mapping, int(labels.max()) + 1 if labels.size else 0)
    hit = _flip_mask(labels.size, rate, rng)
    return np.where(hit, table[labels], labels)


def hard_noise(
    true_labels: np.ndarray | Sequence[int],
    rate: float,
    most_similar: np.ndarray | Sequence[int],
    rng: np.random.Generator,
    *,
    per_sample: bool | None = None,
) -> np.ndarray:
    """Instance-dependent ("hard") noise: with probability `rate`, flip to the most similar class.

    `most_similar` is per class (length K: target of class y) or per sample (length N: target
    of sample i, e.g. its nearest wrong class by CLIP similarity). With ``per_sample=None`` it
    is per-sample exactly when its length equals the number of labels; pass `per_sample`
    explicitly when N happens to equal K. A target equal to the true label means no flip.
    """
    labels = _check_labels(true_labels, None)
    rate = _check_rate(rate)
    targets = np.asarray(most_similar)
    if targets.ndim != 1 or (targets.size and not np.issubdtype(targets.dtype, np.integer)):
        raise ValueError("most_similar must be a 1-D integer array (per class or per sample)")
    if targets.size and targets.min() < 0:
        raise ValueError(f"most_similar must hold non-negative classes, got {targets.min()}")
    if per_sample is None:
        per_sample = targets.size == labels.size
    if per_sample:
        if targets.size != labels.size:
            raise ValueError(
                f"per-sample most_similar has {targets.size} entries for {labels.size} labels"
            )
        flipped = targets.astype(np.int64)
    else:
        if labels.size and targets.size <= labels.max():
            raise ValueError(
                f"per-class most_similar has {targets.size} entries but a label is {labels.max()}"
            )
        flipped = targets.astype(np.int64)[labels]
    hit = _flip_mask(labels.size, rate, rng)
    return np.where(hit, flipped, labels)


def _truncated_normal(
    mean: float, spread: float, count: int, rng: np.random.Generator
) -> np.ndarray:
    """`count` draws from N(mean, spread^2) truncated to [0, 1], by rejection."""
    values = rng.normal(mean, spread, count)
    outside = (values < 0.0) | (values > 1.0)
    while outside.any():
        values[outside] = rng.normal(mean, spread, int(outside.sum()))
        outside = (values < 0.0) | (values > 1.0)
    return values


def instance_dependent_noise(
    true_labels: np.ndarray | Sequence[int],
    rate: float,
    features: np.ndarray,
    num_classes: int,
    rng: np.random.Generator,
    *,
    rate_spread: float = INSTANCE_RATE_SPREAD,
) -> np.ndarray:
    """Instance-dependent noise as Xia et al. (NeurIPS 2020, Algorithm 2) generate it.

    Each sample i gets a flip rate q_i drawn from N(rate, rate_spread^2) truncated to [0, 1],
    so the mean flip rate is about `rate`. Each class y gets a random projection W_y
    ([D, K], standard normal). Sample i keeps its label with probability 1 - q_i and
    otherwise moves to class k != y with probability softmax(features_i @ W_y)_k: the
    target depends on the sample's own features (``[N, D]``, e.g. its standardised pixels),
    not only on its class. With unscaled features of a few hundred dimensions the softmax is
    nearly one-hot: each sample has "its" wrong class. Rate 0 changes nothing.
    """
    num_classes = _check_num_classes(num_classes)
    labels = _check_labels(true_labels, num_classes)
    rate = _check_rate(rate)
    values = np.asarray(features, dtype=np.float64)
    if values.ndim != 2 or values.shape[0] != labels.size:
        raise ValueError(
            f"features must have shape [N, D] with N = {labels.size} labels, got {values.shape}"
        )
    if not np.isfinite(values).all():
        raise ValueError("features must be finite")
    if rate == 0.0 or num_classes == 1 or labels.size == 0:
        return labels.copy()
    flip_rates = _truncated_normal(rate, rate_spread, labels.size, rng)
    projections = rng.standard_normal((num_classes, values.shape[1], num_classes))
    logits = np.empty((labels.size, num_classes))
    for label in range(num_classes):
        rows = labels == label
        logits[rows] = values[rows] @ projections[label]
    rows = np.arange(labels.size)
    logits[rows, labels] = -np.inf
    logits -= logits.max(axis=1, keepdims=True)
    weights = np.exp(logits)
    probs = flip_rates[:, None] * weights / weights.sum(axis=1, keepdims=True)
    probs[rows, labels] = 1.0 - flip_rates
    cumulative = np.cumsum(probs, axis=1)
    draws = rng.random(labels.size)[:, None] * cumulative[:, -1:]
    return np.minimum((draws >= cumulative).sum(axis=1), num_classes - 1).astype(np.int64)


def inject_noise(
    true_labels: np.ndarray | Sequence[int],
    kind: NoiseKind,
    rate: float,
    num_classes: int,
    rng: np.random.Generator,
    *,
    pairs: Mapping[int, int] | Sequence[int] | np.ndarray | None = None,
    most_similar: np.ndarray | Sequence[int] | None = None,
    features: np.ndarray | None = None,
) -> np.ndarray:
    """Noisy labels of the given `kind`; a new int64 array, the input is left untouched.

    ``"none"`` copies the labels; ``"symmetric"`` needs nothing more; ``"asymmetric"`` needs
    `pairs` (see asymmetric_noise); ``"hard"`` needs `most_similar`, read as per class when
    it has `num_classes` entries and as per sample otherwise; ``"instance"`` needs
    `features` ([N, D], see instance_dependent_noise). ValueError on a bad kind, a
    rate outside [0, 1], labels outside [0, num_classes) or targets outside the classes.
    """
    num_classes = _check_num_classes(num_classes)
    labels = _check_labels(true_labels, num_classes)
    rate = _check_rate(rate)
    if kind == "none":
        return labels.copy()
    if kind == "symmetric":
        return symmetric_noise(labels, rate, num_classes, rng)
    if kind == "asymmetric":
        if pairs is None:
            raise ValueError("asymmetric noise needs `pairs` (a class mapping)")
        table = _mapping_table(pairs, num_classes)
        if table.size > num_classes or table.max(initial=0) >= num_classes:
            raise ValueError(f"asymmetric noise: `pairs` maps outside [0, {num_classes})")
        return asymmetric_noise(labels, rate, table, rng)
    if kind == "hard":
        if most_similar is None:
            raise ValueError("hard noise needs `most_similar` (per class or per sample)")
        targets = np.asarray(most_similar)
        if targets.size and (targets.min() < 0 or targets.max() >= num_classes):
            raise ValueError(f"hard noise: `most_similar` holds classes outside [0, {num_classes})")
        per_sample = targets.size != num_classes
        return hard_noise(labels, rate, targets, rng, per_sample=per_sample)
    if kind == "instance":
        if features is None:
            raise ValueError("instance-dependent noise needs `features` (one row per sample)")
        return instance_dependent_noise(labels, rate, features, num_classes, rng)
    raise ValueError(f"unknown noise kind {kind!r}; expected one of {NOISE_KINDS}")


def changed_fraction(true_labels: np.ndarray, noisy_labels: np.ndarray) -> float:
    """Fraction of labels that differ between the true and the noisy labels (0 when empty)."""
    true_array, noisy_array = np.asarray(true_labels), np.asarray(noisy_labels)
    if true_array.shape != noisy_array.shape:
        raise ValueError(f"label shapes differ: {true_array.shape} vs {noisy_array.shape}")
    return float(np.mean(true_array != noisy_array)) if true_array.size else 0.0
