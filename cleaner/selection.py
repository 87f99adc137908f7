"""Clean-sample selection (METHOD.md section 3): loss-score GMMs, consistency, intersection.

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

import warnings
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

GmmMode = Literal["per_class", "global"]
GMM_MODES: tuple[str, ...] = ("per_class", "global")

LOG_EPSILON = 1e-12  # probabilities are clipped here before the log
DEGENERATE_RANGE = 1e-12  # a class whose loss-score range is at most this cannot be split
CONSISTENCY_TOLERANCE = 1e-9  # so that c_i == 1.0 (label is the argmax) passes theta 1.0
# k-means++ initialisation: same fits as the default full k-means init on these 1-D
# scores, about 15x faster (matters with one mixture per class and K ~ 1000).
GMM_SETTINGS: dict[str, float | int | str] = {
    "max_iter": 100,
    "tol": 1e-3,
    "reg_covar": 5e-4,
    "init_params": "k-means++",
    "random_state": 0,
}


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


# --------------------------------------------------------------------------- validation


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


def validate_probs(name: str, probs: np.ndarray, num_samples: int) -> np.ndarray:
    """Return probs as float64[N, K]; raise ValueError naming `name` for bad input."""
    probs = np.asarray(probs)
    if probs.dtype == bool or not (
        np.issubdtype(probs.dtype, np.floating) or np.issubdtype(probs.dtype, np.integer)
    ):
        raise ValueError(f"{name} must be a numeric array, got dtype {probs.dtype}")
    if probs.ndim != 2:
        raise ValueError(f"{name} must be a 2-D [N, K] array, got shape {probs.shape}")
    if probs.shape[0] == 0 or probs.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {probs.shape})")
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


# --------------------------------------------------------------------------- class groups


@dataclass(frozen=True)
class _ClassGroups:
    """Samples grouped by class: a stable sort by label and each class's segment in it."""

    order: np.ndarray  # int64[N], sample indices sorted by label (stable)
    counts: np.ndarray  # int64[K]
    starts: np.ndarray  # int64[K], start of each class's segment in `order`
    present: np.ndarray  # int64[P], classes with at least one sample

    @classmethod
    def build(cls, labels: np.ndarray, num_classes: int) -> _ClassGroups:
        order = np.argsort(labels, kind="stable")
        counts = np.bincount(labels, minlength=num_classes).astype(np.int64)
        starts = np.concatenate(([0], np.cumsum(counts)[:-1])).astype(np.int64)
        return cls(order=order, counts=counts, starts=starts, present=np.flatnonzero(counts))

    def members(self, k: int) -> np.ndarray:
        """Sample indices of class k (ascending)."""
        return self.order[self.starts[k] : self.starts[k] + self.counts[k]]

    def per_class_min_max(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-class min and max of values[N] (vectorised; NaN for absent classes)."""
        k = self.counts.shape[0]
        mins = np.full(k, np.nan)
        maxs = np.full(k, np.nan)
        sorted_values = values[self.order]
        seg_starts = self.starts[self.present]  # present segments are non-empty and contiguous
        mins[self.present] = np.minimum.reduceat(sorted_values, seg_starts)
        maxs[self.present] = np.maximum.reduceat(sorted_values, seg_starts)
        return mins, maxs


# --------------------------------------------------------------------------- building blocks


def loss_scores(
    p_label: np.ndarray, labels: np.ndarray, groups: _ClassGroups
) -> tuple[np.ndarray, np.ndarray]:
    """Per-class min-max normalised log p(label), and a bool[K] mask of degenerate classes.

    A degenerate class (range <= DEGENERATE_RANGE: one sample, or all scores equal) gets
    normalised score 1.0 for all its samples.
    """
    log_p = np.log(np.clip(p_label, LOG_EPSILON, None))
    mins, maxs = groups.per_class_min_max(log_p)
    ranges = maxs - mins
    degenerate = np.zeros(ranges.shape[0], dtype=bool)
    degenerate[groups.present] = ranges[groups.present] <= DEGENERATE_RANGE
    safe_ranges = np.where(degenerate | np.isnan(ranges), 1.0, ranges)
    normalised = (log_p - mins[labels]) / safe_ranges[labels]
    normalised = np.where(degenerate[labels], 1.0, np.clip(normalised, 0.0, 1.0))
    return normalised, degenerate


def _gmm_clean_posterior(values: np.ndarray) -> np.ndarray:
    """Fit a 2-component 1-D mixture; posterior of the larger-mean component per value."""
    # sklearn is imported here, not at module level: the distributed fit's Ray workers
    # import this module for its validation and never need sklearn (about 80 MB each)
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture

    mixture = GaussianMixture(n_components=2, **GMM_SETTINGS)
    column = values.reshape(-1, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=ConvergenceWarning)
        mixture.fit(column)
    clean_component = int(np.argmax(mixture.means_.ravel()))
    return mixture.predict_proba(column)[:, clean_component]


def gmm_p_clean(
    normalised: np.ndarray,
    labels: np.ndarray,
    degenerate: np.ndarray,
    groups: _ClassGroups,
    mode: GmmMode,
) -> np.ndarray:
    """p_clean per sample from per-class or global mixtures (1.0 in degenerate classes)."""
    p_clean = np.ones(normalised.shape[0], dtype=np.float64)
    if mode == "per_class":
        for k in groups.present:
            if degenerate[k]:
                continue
            members = groups.members(int(k))
            p_clean[members] = _gmm_clean_posterior(normalised[members])
    else:
        fit_mask = ~degenerate[labels]
        if fit_mask.any():
            p_clean[fit_mask] = _gmm_clean_posterior(normalised[fit_mask])
    return p_clean


def consistency_scores(p_label: np.ndarray, max_p: np.ndarray) -> np.ndarray:
    """c_i = p(label) / max p, clipped to [0, 1] (1.0 when the label ties for the argmax)."""
    return np.clip(p_label / max_p, 0.0, 1.0)


def _backfill(
    labels: np.ndarray,
    is_clean: np.ndarray,
    rank_score: np.ndarray,
    groups: _ClassGroups,
    num_samples: int,
    num_classes: int,
) -> tuple[np.ndarray, int]:
    """Samples to add to present classes with no clean sample, and the m used."""
    backfilled = np.zeros(num_samples, dtype=bool)
    clean_per_class = np.bincount(labels[is_clean], minlength=num_classes)
    empty = np.flatnonzero((groups.counts > 0) & (clean_per_class == 0))
    if empty.size == 0:
        return backfilled, 0
    floor_term = num_samples // (num_classes * num_classes)
    nonzero = clean_per_class[clean_per_class > 0]
    m = max(int(nonzero.min()), floor_term) if nonzero.size else floor_term
    m = max(m, 1)
    for k in empty:
        members = groups.members(int(k))
        take = min(m, members.shape[0])
        # best = highest score; stable sort on the negated score keeps index order on ties
        best = members[np.argsort(-rank_score[members], kind="stable")[:take]]
        backfilled[best] = True
    return backfilled, m


# --------------------------------------------------------------------------- public API


def select_from_scores(
    labels: np.ndarray,
    num_classes: int,
    sources: dict[str, SourceScores],
    *,
    theta_gmm: float = 0.5,
    theta_cons: float = 0.8,
    gmm: GmmMode = "per_class",
) -> SelectionResult:
    """Select clean samples from compact per-source columns (p(label), max p).

    Intersects the GMM and consistency selections of every source, then backfills
    present classes left empty. Raises ValueError for invalid input.
    """
    labels = validate_selection_input(labels, num_classes, sources, theta_gmm, theta_cons, gmm)
    num_samples = labels.shape[0]

    groups = _ClassGroups.build(labels, num_classes)
    is_clean = np.ones(num_samples, dtype=bool)
    selections: dict[str, SourceSelection] = {}
    for name, scores in sources.items():
        normalised, degenerate = loss_scores(scores.p_label, labels, groups)
        p_clean = gmm_p_clean(normalised, labels, degenerate, groups, gmm)
        consistency = consistency_scores(scores.p_label, scores.max_p)
        selection = SourceSelection(
            loss_score=normalised,
            gmm_p_clean=p_clean,
            gmm_selected=p_clean >= theta_gmm,
            consistency=consistency,
            consistency_selected=consistency >= theta_cons - CONSISTENCY_TOLERANCE,
        )
        selections[name] = selection
        is_clean &= selection.gmm_selected & selection.consistency_selected

    rank_score = np.mean([s.loss_score for s in selections.values()], axis=0)
    backfilled, backfill_size = _backfill(
        labels, is_clean, rank_score, groups, num_samples, num_classes
    )
    clean_score = np.mean([s.p_label for s in sources.values()], axis=0)
    return SelectionResult(
        is_clean=is_clean | backfilled,
        backfilled=backfilled,
        clean_score=clean_score,
        sources=selections,
        labels=labels,
        num_classes=int(num_classes),
        theta_gmm=float(theta_gmm),
        theta_cons=float(theta_cons),
        gmm=gmm,
        backfill_size=backfill_size,
        settings=dict(GMM_SETTINGS),
    )


def select_clean_result(
    labels: np.ndarray,
    zeroshot_probs: np.ndarray,
    probe_probs: np.ndarray | None = None,
    *,
    theta_gmm: float = 0.5,
    theta_cons: float = 0.8,
    gmm: GmmMode = "per_class",
) -> SelectionResult:
    """Like `select_clean`, but return the full `SelectionResult`."""
    validate_thresholds(theta_gmm, theta_cons, gmm)
    labels_array = np.asarray(labels)
    if labels_array.ndim != 1:
        raise ValueError(f"labels must be a 1-D array, got shape {labels_array.shape}")
    zeroshot = validate_probs("zeroshot_probs", zeroshot_probs, labels_array.shape[0])
    num_classes = zeroshot.shape[1]
    labels_array = validate_labels(labels_array, num_classes)
    sources = {"zeroshot": SourceScores.from_probs(labels_array, zeroshot)}
    if probe_probs is not None:
        probe = validate_probs("probe_probs", probe_probs, labels_array.shape[0])
        if probe.shape[1] != num_classes:
            raise ValueError(
                f"shape mismatch: probe_probs has {probe.shape[1]} classes but "
                f"zeroshot_probs has {num_classes}"
            )
        sources["probe"] = SourceScores.from_probs(labels_array, probe)
    return select_from_scores(
        labels_array, num_classes, sources, theta_gmm=theta_gmm, theta_cons=theta_cons, gmm=gmm
    )


def select_clean(
    labels: np.ndarray,
    zeroshot_probs: np.ndarray,
    probe_probs: np.ndarray | None = None,
    *,
    theta_gmm: float = 0.5,
    theta_cons: float = 0.8,
    gmm: GmmMode = "per_class",
) -> np.ndarray:
    """CLIPCleaner selection on in-memory arrays: a bool[N] mask of clean samples.

    labels int[N]; zeroshot_probs / probe_probs float[N, K]. With probe_probs=None only
    the zero-shot GMM and consistency selections are intersected. Raises ValueError
    naming the problem for invalid input.
    """
    return select_clean_result(
        labels, zeroshot_probs, probe_probs, theta_gmm=theta_gmm, theta_cons=theta_cons, gmm=gmm
    ).is_clean
