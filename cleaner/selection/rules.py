"""The selection's rules and inputs (docs/method.md, "Selection"): validation, constants,
consistency, and the result types; the mixtures are fitted by `engine.py`.

Per probability source (zero-shot, probe):

- loss score s_i = log P(y=y_i | x_i), min-max normalised within each class;
- a 2-component 1-D Gaussian mixture (per class, or one global mixture) on the normalised
  scores; p_clean_i = posterior of the component with the larger mean; select
  p_clean_i >= theta_gmm;
- consistency c_i = P(y_i | x_i) / max_k P(k | x_i); select c_i >= theta_cons.

The clean set is the intersection of every criterion of every source. A present class
left with no clean sample is backfilled with its m best samples by loss score.

The maths runs on two compact columns per source (p(label) and max p, see `SourceScores`),
so a job never needs the full [N, K] probability matrices in one place.

Degenerate cases (decisions):

- A class whose loss scores are all equal (a single sample, or every sample with the
  same log p(label) up to `DEGENERATE_RANGE`) cannot be split into two components: its
  normalised scores are set to 1.0 and its p_clean to 1.0, in both GMM modes; in
  "global" mode such classes are also left out of the mixture fit so they do not pull
  it. Consistency still applies to them.
- A class absent from `labels` is skipped everywhere (no fit, no backfill, zero counts).
- Exact ties for the argmax count as "label is the argmax" (consistency 1.0), and the
  consistency comparison has an absolute tolerance of `CONSISTENCY_TOLERANCE`.
- If no class has any clean sample, the backfill size is max(1, floor(N / K^2)).
- Probability rows are renormalised to sum to 1 before the loss score is taken; the
  consistency ratio does not depend on that scale.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

GmmMode = Literal["per_class", "global"]


GMM_MODES: tuple[str, ...] = ("per_class", "global")


LOG_EPSILON = 1e-12  # probabilities are clipped here before the log


DEGENERATE_RANGE = 1e-12  # a class whose loss-score range is at most this cannot be split


CONSISTENCY_TOLERANCE = 1e-9  # so that c_i == 1.0 (label is the argmax) passes theta 1.0


# The mixtures' variance floor: scikit-learn's default reg_covar, which the official
# CLIPCleaner code uses (GaussianMixture(2) with every default). DivideMix's 5e-4 selects
# a larger, less pure set; see docs/selection.md for the measured trade.
DEFAULT_REG_COVAR = 1e-6


DIVIDEMIX_REG_COVAR = 5e-4


@dataclass(frozen=True)
class SourceScores:
    """The two compact columns that selection needs from one probability source."""

    p_label: np.ndarray  # float[N]: P(y = y_i | x_i)
    max_p: np.ndarray  # float[N]: max_k P(y = k | x_i)

    def __post_init__(self) -> None:
        p_label = np.asarray(self.p_label, dtype=np.float64)
        max_p = np.asarray(self.max_p, dtype=np.float64)
        if p_label.ndim != 1 or max_p.ndim != 1:
            raise ValueError("SourceScores: p_label and max_p must be 1-D arrays")
        if p_label.shape != max_p.shape:
            raise ValueError(
                f"SourceScores: p_label has {p_label.shape[0]} values but max_p has "
                f"{max_p.shape[0]}"
            )
        object.__setattr__(self, "p_label", p_label)
        object.__setattr__(self, "max_p", max_p)

    def __len__(self) -> int:
        return int(self.p_label.shape[0])

    @classmethod
    def from_probs(cls, labels: np.ndarray, probs: np.ndarray) -> SourceScores:
        """Compact columns from a full probability matrix (rows renormalised to sum to 1).

        Inputs are assumed valid (see `validate_probs`); `select_clean` validates first.
        """
        probs = np.asarray(probs, dtype=np.float64)
        labels = np.asarray(labels).astype(np.int64, copy=False)
        row_sums = probs.sum(axis=1)
        p_label = probs[np.arange(probs.shape[0]), labels] / row_sums
        max_p = probs.max(axis=1) / row_sums
        return cls(p_label=p_label, max_p=max_p)


@dataclass
class SourceSelection:
    """Per-source intermediate values and selections, all of length N."""

    loss_score: np.ndarray  # float[N], per-class min-max normalised log p(label), in [0, 1]
    gmm_p_clean: np.ndarray  # float[N]
    gmm_selected: np.ndarray  # bool[N]
    consistency: np.ndarray  # float[N], in [0, 1]
    consistency_selected: np.ndarray  # bool[N]


@dataclass
class SelectionResult:
    """Outcome of `select_from_scores`: the clean mask plus everything that led to it."""

    is_clean: np.ndarray  # bool[N], final selection (backfill included)
    backfilled: np.ndarray  # bool[N], samples added by the empty-class backfill
    clean_score: np.ndarray  # float[N], mean over sources of p(label), for AUROC
    sources: dict[str, SourceSelection]
    labels: np.ndarray  # int64[N]
    num_classes: int
    theta_gmm: float
    theta_cons: float
    gmm: str
    backfill_size: int = 0  # m used by the backfill (0 when no class needed it)
    settings: dict[str, float | int | str] = field(default_factory=dict)

    def counts(self) -> dict:
        """Per-class and per-criterion counts as plain (JSON-serialisable) dicts and ints.

        per_class maps a count name to a list of K ints ("clean" includes backfilled
        samples); per_criterion maps "<source>_gmm" / "<source>_consistency" to an int.
        """
        k = self.num_classes

        def per_class(mask: np.ndarray) -> list[int]:
            return np.bincount(self.labels[mask], minlength=k).astype(int).tolist()

        per_criterion: dict[str, int] = {}
        per_class_counts: dict[str, list[int]] = {
            "total": np.bincount(self.labels, minlength=k).astype(int).tolist(),
            "clean": per_class(self.is_clean),
            "backfilled": per_class(self.backfilled),
        }
        for name, source in self.sources.items():
            for criterion, mask in (
                ("gmm", source.gmm_selected),
                ("consistency", source.consistency_selected),
            ):
                key = f"{name}_{criterion}"
                per_criterion[key] = int(mask.sum())
                per_class_counts[key] = per_class(mask)
        total = per_class_counts["total"]
        return {
            "num_samples": int(self.labels.shape[0]),
            "num_classes": int(k),
            "num_present_classes": int(sum(1 for n in total if n > 0)),
            "num_clean": int(self.is_clean.sum()),
            "num_backfilled": int(self.backfilled.sum()),
            "num_backfilled_classes": int(sum(1 for n in per_class_counts["backfilled"] if n > 0)),
            "backfill_size": int(self.backfill_size),
            "per_criterion": per_criterion,
            "per_class": per_class_counts,
        }


def validate_thresholds(theta_gmm: float, theta_cons: float, gmm: str) -> None:
    """Raise ValueError for thresholds outside [0, 1] or an unknown GMM mode."""
    for name, value in (("theta_gmm", theta_gmm), ("theta_cons", theta_cons)):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
            raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
        if not np.isfinite(value) or not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    if gmm not in GMM_MODES:
        raise ValueError(f"unknown gmm mode {gmm!r}; expected one of {GMM_MODES}")


def validate_labels(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Return labels as int64[N]; raise ValueError unless 1-D, non-empty, integer, in [0, K)."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
        raise ValueError(f"num_classes must be an integer, got {num_classes!r}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be a 1-D array, got shape {labels.shape}")
    if labels.shape[0] == 0:
        raise ValueError("labels is empty")
    if labels.dtype == bool or not (
        np.issubdtype(labels.dtype, np.integer) or np.issubdtype(labels.dtype, np.floating)
    ):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if np.issubdtype(labels.dtype, np.floating) and not (
        np.all(np.isfinite(labels)) and np.all(labels == np.round(labels))
    ):
        raise ValueError("labels must be integers, got non-integer values")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"labels must be in [0, {num_classes}), got values in [{labels.min()}, {labels.max()}]"
        )
    return labels.astype(np.int64, copy=False)


def validate_matrix(name: str, values: np.ndarray, shape: str = "[N, K]") -> np.ndarray:
    """values as an array; ValueError naming `name` unless numeric, 2-D and non-empty."""
    values = np.asarray(values)
    if values.dtype == bool or not (
        np.issubdtype(values.dtype, np.floating) or np.issubdtype(values.dtype, np.integer)
    ):
        raise ValueError(f"{name} must be a numeric array, got dtype {values.dtype}")
    if values.ndim != 2:
        raise ValueError(f"{name} must be a 2-D {shape} array, got shape {values.shape}")
    if values.shape[0] == 0 or values.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {values.shape})")
    return values


def validate_probs(name: str, probs: np.ndarray, num_samples: int) -> np.ndarray:
    """Return probs as float64[N, K]; raise ValueError naming `name` for bad input."""
    probs = validate_matrix(name, probs)
    if probs.shape[0] != num_samples:
        raise ValueError(
            f"shape mismatch: {name} has {probs.shape[0]} rows but labels has {num_samples}"
        )
    probs = probs.astype(np.float64, copy=False)
    if np.isnan(probs).any():
        raise ValueError(f"{name} contains NaN")
    if not np.isfinite(probs).all():
        raise ValueError(f"{name} contains inf")
    if (probs < 0).any():
        raise ValueError(f"{name} contains negative probabilities")
    zero_rows = np.flatnonzero(probs.sum(axis=1) <= 0)
    if zero_rows.size:
        raise ValueError(f"{name} has {zero_rows.size} row(s) of all zeros (first: {zero_rows[0]})")
    return probs


def _validate_source(name: str, scores: SourceScores, num_samples: int) -> None:
    if len(scores) != num_samples:
        raise ValueError(
            f"shape mismatch: source {name!r} has {len(scores)} samples but labels has "
            f"{num_samples}"
        )
    for column in ("p_label", "max_p"):
        values = getattr(scores, column)
        if np.isnan(values).any():
            raise ValueError(f"source {name!r}: {column} contains NaN")
        if not np.isfinite(values).all():
            raise ValueError(f"source {name!r}: {column} contains inf")
        if (values < 0).any():
            raise ValueError(f"source {name!r}: {column} contains negative probabilities")
    if (scores.max_p <= 0).any():
        raise ValueError(f"source {name!r}: max_p must be positive (a row of all zeros?)")
    if (scores.p_label > scores.max_p * (1 + 1e-6) + 1e-12).any():
        raise ValueError(f"source {name!r}: p_label exceeds max_p")


def validate_selection_input(
    labels: np.ndarray,
    num_classes: int,
    sources: dict[str, SourceScores],
    theta_gmm: float,
    theta_cons: float,
    gmm: str,
) -> np.ndarray:
    """Check thresholds, labels and every source; returns the labels as int64."""
    validate_thresholds(theta_gmm, theta_cons, gmm)
    labels = validate_labels(labels, num_classes)
    if not sources:
        raise ValueError("sources is empty: at least one probability source is needed")
    for name, scores in sources.items():
        if not isinstance(scores, SourceScores):
            raise ValueError(f"source {name!r} must be a SourceScores, got {type(scores)!r}")
        _validate_source(name, scores, labels.shape[0])
    return labels


def consistency_scores(p_label: np.ndarray, max_p: np.ndarray) -> np.ndarray:
    """c_i = p(label) / max p, clipped to [0, 1] (1.0 when the label ties for the argmax)."""
    return np.clip(p_label / max_p, 0.0, 1.0)
