"""The global fit without gathering: selection and linear probe over Ray Data blocks.

At LAION / full-WebVision scale the score table does not fit on one node. This module
fits the same selection as `cleaner.selection.rules` (METHOD.md section 3) and a linear probe
(section 2) with passes over a `ray.data.Dataset`; the driver only ever holds per-class
arrays (K values, K x INIT_BINS for the initialisation) and, for the backfill, at most
m candidates per empty class. Only the label, p_label / max_p and key columns are read.

Selection (`fit_selection`, `distributed_select`), one map_batches pass each:

1. range: per-class counts and min / max of log p(label) per source (np.minimum.at /
   np.maximum.at), plus the input checks;
2. initialisation: per-mixture histograms of the normalised loss score give each
   mixture's Otsu split; exact Lloyd passes (hard split's sums, threshold to the
   midpoint of the two means) refine it until no sample changes side, and the M-step
   of that split starts the EM (`_split_init`: scikit-learn's k-means init, made
   deterministic);
3. EM: one E-step per pass for all the 2-component 1-D mixtures (K per source in
   "per_class" mode, one per source in "global" mode): per mixture, the sums of r, r*x,
   r*x^2 per component and of the log-likelihood; the driver does the M-step. Mixtures
   that converged (scikit-learn's rule: mean log-likelihood change below tol) are frozen
   and skipped;
4. count: per-class counts of every criterion and of the intersection, which give the
   empty classes and the backfill size m;
5. top-m (only if a class is empty): each block's best m samples per empty class by
   loss score, folded into the global best m.

The result is a `FittedSelection` (ranges, mixture parameters, backfill cut-offs: a few
KB) whose `apply` maps a batch to its per-sample columns in a `map_batches`.

Exact equality with the in-memory path (`select_from_scores_em`): both run the same
block functions and driver code; only the partition of the rows into blocks and chunks
differs. Per-sample values are elementwise; counts, histograms, min / max and the top-m
(a total order: score descending, then key) are exact; the EM sums are made
order-independent by fixed-point accumulation: each per-sample term is rounded to a
multiple of 2^-40 (2^-28 for log-likelihoods), held as int64 and summed exactly
(`exact_group_sums`). Integer addition is associative, so any partition gives
bit-identical sums, parameters, iteration counts and selections.

The EM is our own deterministic numpy EM, not scikit-learn's `GaussianMixture`, but
it follows the same path as the official code's `GaussianMixture(2)` with every
default: the same initialisation (the M-step of a 2-means split; ours is found from the
histogram and exact Lloyd passes instead of k-means++ random picks, which cannot be
reproduced without gathering), M-step, variance floor (reg_covar, default 1e-6), 10*eps
component mass and stopping rule (change of the mean log-likelihood below tol = 1e-3,
at most 100 iterations). It agrees with the official per-class selection on >= 99.8% of
the union (tests/test_selection_parity.py); docs/selection.md lists what still differs.

Backfill ties: with `key_column` the m picks are exact, ties on the loss score broken by
ascending key (the in-memory path uses the row index as key, as selection.py does).
Without a key column, every sample tied with the m-th best score is picked.

Linear probe (`fit_probe_streaming`): class-balanced multinomial logistic regression in
torch, trained with Adam over `iter_torch_batches`; crossfit folds come from a hash of a
stable key column, and one pass trains all the fold probes at once.

At scale, with the score table as a Dataset (columns key, label, p_label, max_p,
embedding; failed rows filtered out):

    probe = fit_probe_streaming(ds, "embedding", "label", K, mode="crossfit")
    scored = probe.transform(ds)  # adds probe_p_label, probe_max_p, probe_argmax
    fitted = fit_selection(scored, K, key_column="key", source_columns={
        "zeroshot": ("p_label", "max_p"), "probe": ("probe_p_label", "probe_max_p")})
    manifest = fitted.transform(scored)  # is_clean, backfilled, clean_score, ...

`choose_fit_mode` says when this is needed instead of `cleaner.selection.fit_in_memory`'s in-memory fit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa

from cleaner.selection.probe import PROBE_MODES, l2_normalise
from cleaner.selection.rules import (
    CONSISTENCY_TOLERANCE,
    DEFAULT_REG_COVAR,
    DEGENERATE_RANGE,
    LOG_EPSILON,
    GmmMode,
    SelectionResult,
    SourceScores,
    SourceSelection,
    consistency_scores,
    validate_selection_input,
    validate_thresholds,
)

if TYPE_CHECKING:
    import ray.data
    import torch

Batch = dict[str, np.ndarray]
Runner = Callable[["_BlockPass"], Batch]
FitMode = Literal["in_memory", "distributed"]

# Fixed-point accumulation (see the module docstring).
STAT_BITS = 40  # r, r*x, r*x^2 in [0, 1]: multiples of 2^-40
LOGLIK_BITS = 28  # log-likelihood terms, |ll| <= LOGLIK_LIMIT: multiples of 2^-28
# log-likelihoods are clipped here: never reached for x in [0, 1] with reg_covar >= 1e-6
# (|log N| <= 0.5 / reg_covar + 40); 2^20 * 2^28 < 2^52 keeps the terms exact
LOGLIK_LIMIT = 2.0**20
SPLIT_BITS = 24  # terms are split into hi / lo parts so float64 bincounts stay exact
MAX_EXACT_ROWS = 1 << 28  # rows per bincount for exact float64 sums of < 2^24 values
TERM_BITS = np.array([STAT_BITS] * 6 + [LOGLIK_BITS], dtype=np.int64)
MIN_COMPONENT_MASS = 10 * np.finfo(np.float64).eps  # as sklearn's mixtures
LOG_2PI = math.log(2.0 * math.pi)
DEFAULT_BATCH_ROWS = 1 << 18  # rows per chunk inside a block function, and per apply batch
INIT_BINS = 256  # histogram bins of the normalised loss score for the initialisation
LLOYD_MAX_ITER = 100  # exact 2-means (Lloyd) passes that refine the histogram's split
IN_MEMORY_PREFIX = "__"


# --------------------------------------------------------------------------- exact sums


def exact_group_sums(groups: np.ndarray, terms: np.ndarray, num_groups: int) -> np.ndarray:
    """int64[2, G, C]: exact per-group sums of fixed-point terms, as hi and lo parts.

    terms int64[n, C] (|value| < 2^52); value = hi * 2^SPLIT_BITS + lo with lo in
    [0, 2^SPLIT_BITS). Both parts are summed with float64 bincounts whose partial sums
    stay below 2^53, so they are exact, and so is any sum of these outputs.
    """
    hi = terms >> SPLIT_BITS
    lo = terms & ((1 << SPLIT_BITS) - 1)
    out = np.zeros((2, num_groups, terms.shape[1]), dtype=np.int64)
    for start in range(0, terms.shape[0], MAX_EXACT_ROWS):
        rows = slice(start, start + MAX_EXACT_ROWS)
        for column in range(terms.shape[1]):
            for part, values in enumerate((hi, lo)):
                out[part, :, column] += np.bincount(
                    groups[rows], weights=values[rows, column], minlength=num_groups
                ).astype(np.int64)
    return out


def combine_exact_sums(parts: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """float64[G, C] from stacked `exact_group_sums` outputs int64[B, 2, G, C]."""
    hi = parts[:, 0].sum(axis=0)
    lo = parts[:, 1].sum(axis=0)
    total = np.ldexp(hi.astype(np.float64), SPLIT_BITS) + lo.astype(np.float64)
    return np.ldexp(total, -bits)


def to_fixed_point(values: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """int64 multiples of 2^-bits nearest to values (bits broadcast over the last axis)."""
    return np.rint(np.ldexp(values, bits)).astype(np.int64)


# --------------------------------------------------------------------------- specs and fits


@dataclass(frozen=True)
class SelectionSpec:
    """What to fit: columns, thresholds and EM settings (no data)."""

    num_classes: int
    sources: tuple[tuple[str, str, str], ...]  # (name, p_label column, max_p column)
    label_column: str = "label"
    key_column: str | None = None
    theta_gmm: float = 0.5
    theta_cons: float = 0.8
    gmm: GmmMode = "per_class"
    max_iter: int = 100
    tol: float = 1e-3
    reg_covar: float = DEFAULT_REG_COVAR

    @property
    def num_groups(self) -> int:
        """Mixtures per source: K per class, or a single global one."""
        return self.num_classes if self.gmm == "per_class" else 1

    def columns(self) -> list[str]:
        """The only columns the fit reads."""
        names = [self.label_column]
        for _, p_column, max_column in self.sources:
            names += [p_column, max_column]
        if self.key_column is not None:
            names.append(self.key_column)
        return list(dict.fromkeys(names))

    def settings(self) -> dict[str, float | int | str]:
        return {
            "max_iter": self.max_iter,
            "tol": self.tol,
            "reg_covar": self.reg_covar,
            "init_params": "2-means split (histogram Otsu split, exact Lloyd passes)",
            "em": "numpy fixed-point",
        }


@dataclass(frozen=True, eq=False)
class SourceFit:
    """One source's per-class score ranges and mixture parameters (G mixtures)."""

    log_min: np.ndarray  # float64[K], NaN for absent classes
    log_max: np.ndarray  # float64[K]
    degenerate: np.ndarray  # bool[K]
    means: np.ndarray  # float64[G, 2]
    variances: np.ndarray  # float64[G, 2]
    weights: np.ndarray  # float64[G, 2]
    n_iter: np.ndarray  # int64[G]
    converged: np.ndarray  # bool[G]

    def loss_score(self, p_label: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Per-class min-max normalised log p(label) in [0, 1] (1.0 in degenerate classes)."""
        ranges = self.log_max - self.log_min
        safe = np.where(self.degenerate | np.isnan(ranges), 1.0, ranges)
        log_p = np.log(np.clip(p_label, LOG_EPSILON, None))
        normalised = (log_p - self.log_min[labels]) / safe[labels]
        return np.where(self.degenerate[labels], 1.0, np.clip(normalised, 0.0, 1.0))

    def group_ids(self, labels: np.ndarray, gmm: str) -> np.ndarray:
        """Mixture index per sample, -1 for samples left out of the fit (degenerate)."""
        fitted = ~self.degenerate[labels]
        if gmm == "per_class":
            return np.where(fitted, labels, -1)
        return np.where(fitted, 0, -1)

    def p_clean(self, loss: np.ndarray, labels: np.ndarray, gmm: str) -> np.ndarray:
        """Posterior of the larger-mean component (1.0 for samples outside every fit)."""
        groups = self.group_ids(labels, gmm)
        rows = np.flatnonzero(groups >= 0)
        p_clean = np.ones(loss.shape[0], dtype=np.float64)
        if rows.size:
            g = groups[rows]
            resp, _ = _responsibilities(loss[rows], g, self.means, self.variances, self.weights)
            clean = np.argmax(self.means, axis=1)
            p_clean[rows] = np.take_along_axis(resp, clean[g][:, None], axis=1)[:, 0]
        return p_clean


@dataclass(frozen=True, eq=False)
class BackfillPlan:
    """Cut-offs that pick the m best samples (by loss score) of each empty class."""

    size: int  # m
    classes: np.ndarray  # int64[E], the empty present classes
    score: np.ndarray  # float64[E], rank score of the last pick
    key: np.ndarray | None  # [E], key of the last pick; None: every tie at the cut is picked
    counts: np.ndarray  # int64[K], picks per class

    def picks(self, labels: np.ndarray, rank: np.ndarray, keys: np.ndarray | None) -> np.ndarray:
        """bool[n]: the samples of this batch that the backfill adds."""
        position = np.full(self.counts.shape[0], -1, dtype=np.int64)
        position[self.classes] = np.arange(self.classes.shape[0])
        rows = np.flatnonzero(position[labels] >= 0)
        picked = np.zeros(labels.shape[0], dtype=bool)
        if rows.size:
            e = position[labels[rows]]
            score, cut = rank[rows], self.score[e]
            tie = score == cut
            if self.key is not None:
                if keys is None:
                    raise ValueError("the backfill cut-offs need the key column")
                tie &= np.asarray(keys[rows] <= self.key[e], dtype=bool)
            picked[rows] = (score > cut) | tie
        return picked


@dataclass(frozen=True, eq=False)
class FittedSelection:
    """A fitted selection: per-class parameters, tiny; `apply` maps a batch to its outputs."""

    spec: SelectionSpec
    sources: dict[str, SourceFit]
    class_counts: np.ndarray  # int64[K]
    columns_read: tuple[str, ...] = ()  # batch columns the fit's block functions received
    criterion_counts: dict[str, np.ndarray] = field(default_factory=dict)  # name -> int64[K]
    backfill: BackfillPlan | None = None

    @property
    def num_samples(self) -> int:
        return int(self.class_counts.sum())

    def evaluate(self, batch: Mapping[str, Any]) -> Batch:
        """Every per-sample quantity, including the per-criterion masks and rank score."""
        spec = self.spec
        labels = _as_labels(batch[spec.label_column])
        if labels.size and (labels.min() < 0 or labels.max() >= spec.num_classes):
            raise ValueError(
                f"labels must be in [0, {spec.num_classes}), got values in "
                f"[{labels.min()}, {labels.max()}]"
            )
        out: Batch = {}
        is_clean = np.ones(labels.shape[0], dtype=bool)
        losses, p_labels = [], []
        for name, p_column, max_column in spec.sources:
            source = self.sources[name]
            p_label = np.asarray(batch[p_column], dtype=np.float64)
            max_p = np.asarray(batch[max_column], dtype=np.float64)
            loss = source.loss_score(p_label, labels)
            p_clean = source.p_clean(loss, labels, spec.gmm)
            consistency = consistency_scores(p_label, max_p)
            gmm_selected = p_clean >= spec.theta_gmm
            consistency_selected = consistency >= spec.theta_cons - CONSISTENCY_TOLERANCE
            is_clean &= gmm_selected & consistency_selected
            out[f"loss_score_{name}"] = loss
            out[f"gmm_p_clean_{name}"] = p_clean
            out[f"consistency_{name}"] = consistency
            out[f"gmm_selected_{name}"] = gmm_selected
            out[f"consistency_selected_{name}"] = consistency_selected
            losses.append(loss)
            p_labels.append(p_label)
        rank = np.mean(losses, axis=0)
        keys = _keys_of(batch, spec.key_column)
        backfilled = (
            self.backfill.picks(labels, rank, keys)
            if self.backfill is not None
            else np.zeros(labels.shape[0], dtype=bool)
        )
        out["rank_score"] = rank
        out["selected_before_backfill"] = is_clean
        out["backfilled"] = backfilled
        out["is_clean"] = is_clean | backfilled
        out["clean_score"] = np.mean(p_labels, axis=0)
        return out

    def output_columns(self) -> list[str]:
        """Names of the columns `apply` adds."""
        names = ["is_clean", "backfilled", "clean_score"]
        for name, _, _ in self.spec.sources:
            names += [f"loss_score_{name}", f"gmm_p_clean_{name}", f"consistency_{name}"]
        return names

    def apply(self, batch: Any) -> Any:
        """Add is_clean, backfilled, clean_score and per-source columns to a batch.

        Accepts a dict of numpy arrays or a pyarrow Table (the type is kept), so it can be
        given to `Dataset.map_batches` with either batch format.
        """
        if isinstance(batch, pa.Table):
            arrays = {name: batch.column(name).to_numpy() for name in self.spec.columns()}
            values = self.evaluate(arrays)
            for name in self.output_columns():
                column = pa.array(values[name])
                index = batch.schema.get_field_index(name)
                batch = (
                    batch.set_column(index, name, column)
                    if index >= 0
                    else batch.append_column(name, column)
                )
            return batch
        values = self.evaluate(batch)
        out = dict(batch)
        out.update({name: values[name] for name in self.output_columns()})
        return out

    def transform(
        self, ds: ray.data.Dataset, *, batch_rows: int = DEFAULT_BATCH_ROWS
    ) -> ray.data.Dataset:
        """The dataset with the selection columns added (a per-sample map_batches)."""
        return ds.map_batches(self.apply, batch_format="pyarrow", batch_size=batch_rows)

    def counts(self) -> dict:
        """Per-class and per-criterion counts, in the format of `SelectionResult.counts`."""
        k = self.spec.num_classes
        total = self.class_counts.astype(int).tolist()
        backfilled = (
            self.backfill.counts if self.backfill is not None else np.zeros(k, dtype=np.int64)
        )
        clean = self.criterion_counts["clean"] + backfilled
        per_class: dict[str, list[int]] = {
            "total": total,
            "clean": clean.astype(int).tolist(),
            "backfilled": backfilled.astype(int).tolist(),
        }
        per_criterion: dict[str, int] = {}
        for name, _, _ in self.spec.sources:
            for criterion in ("gmm", "consistency"):
                key = f"{name}_{criterion}"
                per_criterion[key] = int(self.criterion_counts[key].sum())
                per_class[key] = self.criterion_counts[key].astype(int).tolist()
        return {
            "num_samples": self.num_samples,
            "num_classes": int(k),
            "num_present_classes": int(sum(1 for n in total if n > 0)),
            "num_clean": int(clean.sum()),
            "num_backfilled": int(backfilled.sum()),
            "num_backfilled_classes": int((backfilled > 0).sum()),
            "backfill_size": int(self.backfill.size) if self.backfill is not None else 0,
            "per_criterion": per_criterion,
            "per_class": per_class,
        }


# --------------------------------------------------------------------------- per-sample maths


def _as_labels(values: Any) -> np.ndarray:
    labels = np.asarray(values)
    if np.issubdtype(labels.dtype, np.integer):
        return labels.astype(np.int64, copy=False)
    return labels.astype(np.float64).astype(np.int64)


def _keys_of(batch: Mapping[str, Any], key_column: str | None) -> np.ndarray | None:
    return None if key_column is None else np.asarray(batch[key_column])


def _weighted_log_prob(
    x: np.ndarray, groups: np.ndarray, means: np.ndarray, variances: np.ndarray, weights: np.ndarray
) -> np.ndarray:
    """float64[n, 2]: log w_c + log N(x | mu_c, var_c) for each sample's mixture."""
    constant = np.log(weights) - 0.5 * (LOG_2PI + np.log(variances))
    diff = x[:, None] - means[groups]
    return constant[groups] - 0.5 * diff * diff / variances[groups]


def _responsibilities(
    x: np.ndarray, groups: np.ndarray, means: np.ndarray, variances: np.ndarray, weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(responsibilities float64[n, 2], log-likelihood float64[n]) of the 2-component mixtures."""
    log_prob = _weighted_log_prob(x, groups, means, variances, weights)
    top = log_prob.max(axis=1)
    loglik = top + np.log(np.exp(log_prob[:, 0] - top) + np.exp(log_prob[:, 1] - top))
    return np.exp(log_prob - loglik[:, None]), loglik


def _split_responsibilities(
    x: np.ndarray, groups: np.ndarray, thresholds: np.ndarray
) -> np.ndarray:
    """float64[n, 2] hard responsibilities of a 2-means split: upper component if x >= t."""
    upper = (x >= thresholds[groups]).astype(np.float64)
    return np.stack((1.0 - upper, upper), axis=1)


def _estep_terms(
    x: np.ndarray,
    groups: np.ndarray,
    means: np.ndarray,
    variances: np.ndarray,
    weights: np.ndarray,
    thresholds: np.ndarray | None = None,
) -> np.ndarray:
    """int64[n, 7] fixed-point terms: r0, r0 x, r0 x^2, r1, r1 x, r1 x^2, log-likelihood.

    With thresholds (one per mixture) the responsibilities are the hard 2-means split
    and the log-likelihood term is 0 (the initialisation passes)."""
    if thresholds is not None:
        resp, loglik = _split_responsibilities(x, groups, thresholds), np.zeros(x.shape[0])
    else:
        resp, loglik = _responsibilities(x, groups, means, variances, weights)
    terms = np.empty((x.shape[0], 7), dtype=np.float64)
    for c in range(2):
        terms[:, 3 * c] = resp[:, c]
        terms[:, 3 * c + 1] = resp[:, c] * x
        terms[:, 3 * c + 2] = resp[:, c] * x * x
    terms[:, 6] = np.clip(loglik, -LOGLIK_LIMIT, LOGLIK_LIMIT)
    return to_fixed_point(terms, TERM_BITS)


def _m_step(sums: np.ndarray, reg_covar: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(means, variances, weights) float64[G, 2] from the E-step sums float64[G, 7]."""
    mass = sums[:, [0, 3]]
    first = sums[:, [1, 4]]
    second = sums[:, [2, 5]]
    nk = mass + MIN_COMPONENT_MASS
    means = first / nk
    spread = np.maximum(second - 2.0 * means * first + means * means * mass, 0.0)
    variances = spread / nk + reg_covar
    weights = nk / nk.sum(axis=1, keepdims=True)
    return means, variances, weights


def top_m_per_class(
    labels: np.ndarray, scores: np.ndarray, keys: np.ndarray | None, m: int
) -> np.ndarray:
    """Indices of the best m rows per class (score descending, then key ascending).

    Returned grouped by class (ascending) and, within a class, best first. Without keys,
    ties keep their input order.
    """
    order = np.arange(labels.shape[0])
    if keys is not None:
        order = order[np.argsort(keys, kind="stable")]
    order = order[np.argsort(-scores[order], kind="stable")]
    order = order[np.argsort(labels[order], kind="stable")]
    sorted_labels = labels[order]
    n = sorted_labels.shape[0]
    if n == 0:
        return order
    starts = np.flatnonzero(np.concatenate(([True], sorted_labels[1:] != sorted_labels[:-1])))
    segment_start = np.repeat(starts, np.diff(np.concatenate((starts, [n]))))
    return order[np.arange(n) - segment_start < m]


# --------------------------------------------------------------------------- block functions


def _fold_stats(acc: Batch | None, part: Batch) -> Batch:
    """Exact reduction of one-row statistics: min_* by minimum, max_* by maximum,
    "columns" by union of comma-joined names, everything else (integers) by sum."""
    out: Batch = {}
    for name, values in part.items():
        values = np.asarray(values)
        previous = None if acc is None else acc.get(name)
        if name == "columns":
            names = {n for text in values for n in str(text).split(",") if n}
            if previous is not None:
                names |= set(str(previous[0]).split(","))
            out[name] = np.array([",".join(sorted(names))])
        elif name.startswith("min_"):
            reduced = values.min(axis=0, keepdims=True)
            out[name] = reduced if previous is None else np.minimum(previous, reduced)
        elif name.startswith("max_"):
            reduced = values.max(axis=0, keepdims=True)
            out[name] = reduced if previous is None else np.maximum(previous, reduced)
        else:
            reduced = values.sum(axis=0, keepdims=True)
            out[name] = reduced if previous is None else previous + reduced
    return out


class _BlockPass:
    """A function of a batch whose outputs fold exactly, in any order and grouping."""

    def __call__(self, batch: Batch) -> Batch:
        raise NotImplementedError

    def fold(self, acc: Batch | None, part: Batch) -> Batch:
        """Reduce a new output (one or more rows) into the accumulated one."""
        return _fold_stats(acc, part)

    def over_chunks(self, batch: Batch, chunk_rows: int) -> Batch:
        """The folded output of a whole block, computed chunk by chunk (bounded memory)."""
        num_rows = len(next(iter(batch.values())))
        acc: Batch | None = None
        for start in range(0, max(num_rows, 1), chunk_rows):
            chunk = {name: values[start : start + chunk_rows] for name, values in batch.items()}
            acc = self.fold(acc, self(chunk))
        assert acc is not None
        return acc


@dataclass(frozen=True)
class _RangePass(_BlockPass):
    """Per-block class counts, per-source min / max of log p(label), and input checks."""

    spec: SelectionSpec

    def __call__(self, batch: Batch) -> Batch:
        k = self.spec.num_classes
        raw = np.asarray(batch[self.spec.label_column])
        if raw.dtype == bool or not (
            np.issubdtype(raw.dtype, np.integer) or np.issubdtype(raw.dtype, np.floating)
        ):
            raise ValueError(f"labels must be integers, got dtype {raw.dtype}")
        as_float = raw.astype(np.float64)
        valid = np.isfinite(as_float) & (as_float == np.round(as_float))
        valid &= (as_float >= 0) & (as_float < k)
        labels = np.where(valid, as_float, 0).astype(np.int64)[valid]
        out: Batch = {
            "counts": np.bincount(labels, minlength=k)[None],
            "bad_labels": np.array([int((~valid).sum())]),
            "columns": np.array([",".join(sorted(batch))]),
        }
        for i, (_, p_column, max_column) in enumerate(self.spec.sources):
            p_label = np.asarray(batch[p_column], dtype=np.float64)
            max_p = np.asarray(batch[max_column], dtype=np.float64)
            bad = ~(np.isfinite(p_label) & np.isfinite(max_p)) | (p_label < 0) | (max_p <= 0)
            bad |= p_label > max_p * (1 + 1e-6) + 1e-12
            out[f"bad_{i}"] = np.array([int(bad.sum())])
            log_p = np.log(np.clip(p_label[valid], LOG_EPSILON, None))
            mins = np.full(k, np.inf)
            maxs = np.full(k, -np.inf)
            np.minimum.at(mins, labels, log_p)
            np.maximum.at(maxs, labels, log_p)
            out[f"min_{i}"] = mins[None]
            out[f"max_{i}"] = maxs[None]
        return out


@dataclass(frozen=True, eq=False)
class _HistogramPass(_BlockPass):
    """Per-block histograms (INIT_BINS bins) of the loss scores of every mixture."""

    spec: SelectionSpec
    sources: dict[str, SourceFit]

    def __call__(self, batch: Batch) -> Batch:
        labels = _as_labels(batch[self.spec.label_column])
        out: Batch = {}
        size = self.spec.num_groups * INIT_BINS
        for i, (name, p_column, _) in enumerate(self.spec.sources):
            source = self.sources[name]
            groups = source.group_ids(labels, self.spec.gmm)
            rows = np.flatnonzero(groups >= 0)
            p_label = np.asarray(batch[p_column], dtype=np.float64)[rows]
            loss = source.loss_score(p_label, labels[rows])
            bins = np.minimum((loss * INIT_BINS).astype(np.int64), INIT_BINS - 1)
            cells = groups[rows] * INIT_BINS + bins
            out[f"hist_{i}"] = np.bincount(cells, minlength=size).reshape(1, -1, INIT_BINS)
        return out


@dataclass(frozen=True, eq=False)
class _EStepPass(_BlockPass):
    """One E-step over a block: exact per-mixture sums for every source still fitting."""

    spec: SelectionSpec
    sources: dict[str, SourceFit]
    active: dict[str, np.ndarray]  # source -> bool[G], mixtures not yet converged
    # source -> float64[G]: hard 2-means split at these thresholds instead of the E-step
    thresholds: dict[str, np.ndarray] | None = None

    def __call__(self, batch: Batch) -> Batch:
        labels = _as_labels(batch[self.spec.label_column])
        out: Batch = {}
        for i, (name, p_column, _) in enumerate(self.spec.sources):
            active = self.active.get(name)
            if active is None or not active.any():
                continue
            source = self.sources[name]
            groups = source.group_ids(labels, self.spec.gmm)
            rows = np.flatnonzero(groups >= 0)
            rows = rows[active[groups[rows]]]
            g = groups[rows]
            p_label = np.asarray(batch[p_column], dtype=np.float64)[rows]
            loss = source.loss_score(p_label, labels[rows])
            split = None if self.thresholds is None else self.thresholds[name]
            terms = _estep_terms(loss, g, source.means, source.variances, source.weights, split)
            out[f"em_{i}"] = exact_group_sums(g, terms, self.spec.num_groups)[None]
        return out


@dataclass(frozen=True, eq=False)
class _CountPass(_BlockPass):
    """Per-class counts of every criterion and of the intersection (before backfill)."""

    fitted: FittedSelection

    def __call__(self, batch: Batch) -> Batch:
        spec = self.fitted.spec
        labels = _as_labels(batch[spec.label_column])
        values = self.fitted.evaluate(batch)
        k = spec.num_classes
        out: Batch = {
            "clean": np.bincount(labels[values["selected_before_backfill"]], minlength=k)[None]
        }
        for name, _, _ in spec.sources:
            for criterion in ("gmm", "consistency"):
                mask = values[f"{criterion}_selected_{name}"]
                out[f"{name}_{criterion}"] = np.bincount(labels[mask], minlength=k)[None]
        return out


@dataclass(frozen=True, eq=False)
class _CandidatePass(_BlockPass):
    """Each block's best m samples per empty class (by rank score, then key)."""

    fitted: FittedSelection
    empty: np.ndarray  # bool[K]
    m: int

    def __call__(self, batch: Batch) -> Batch:
        spec = self.fitted.spec
        labels = _as_labels(batch[spec.label_column])
        rows = np.flatnonzero(self.empty[labels])
        sub = {column: np.asarray(batch[column])[rows] for column in spec.columns()}
        rank = self.fitted.evaluate(sub)["rank_score"]
        keys = _keys_of(sub, spec.key_column)
        best = top_m_per_class(labels[rows], rank, keys, self.m)
        out: Batch = {"label": labels[rows][best], "score": rank[best]}
        if keys is not None:
            best_keys = keys[best]
            out["key"] = best_keys.astype(str) if best_keys.dtype == object else best_keys
        return out

    def fold(self, acc: Batch | None, part: Batch) -> Batch:
        """Concatenate candidates and keep the best m per class (bounded size)."""
        merged = (
            part
            if acc is None
            else {name: np.concatenate((acc[name], part[name])) for name in part}
        )
        keys = merged.get("key")
        best = top_m_per_class(merged["label"].astype(np.int64), merged["score"], keys, self.m)
        return {name: np.asarray(values)[best] for name, values in merged.items()}


# --------------------------------------------------------------------------- the fit


def _check_rows(chunk_rows: int) -> int:
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, (int, np.integer)):
        raise ValueError(f"chunk / batch rows must be a positive integer, got {chunk_rows!r}")
    if not 1 <= chunk_rows <= MAX_EXACT_ROWS:
        raise ValueError(f"chunk / batch rows must be in [1, {MAX_EXACT_ROWS}], got {chunk_rows}")
    return int(chunk_rows)


def _local_runner(batch: Batch, chunk_rows: int) -> Runner:
    """Runs a block pass on one in-memory batch, chunk by chunk (the in-memory path)."""
    chunk_rows = _check_rows(chunk_rows)

    def run(fn: _BlockPass) -> Batch:
        return fn.over_chunks(batch, chunk_rows)

    return run


def _dataset_runner(ds: ray.data.Dataset, chunk_rows: int) -> Runner:
    """Runs a block pass with map_batches (one folded output row per block) and folds
    the outputs on the driver as they stream in."""
    chunk_rows = _check_rows(chunk_rows)

    def run(fn: _BlockPass) -> Batch:
        mapped = ds.map_batches(
            fn.over_chunks,
            fn_kwargs={"chunk_rows": chunk_rows},
            batch_format="numpy",
            batch_size=None,
            zero_copy_batch=True,
        )
        acc: Batch | None = None
        for part in mapped.iter_batches(batch_size=None, batch_format="numpy"):
            if part:
                acc = fn.fold(acc, part)
        return acc or {}

    return run


def _initial_sources(spec: SelectionSpec, scan: Batch) -> tuple[dict[str, SourceFit], np.ndarray]:
    """Source fits with ranges from the range pass and the deterministic initialisation."""
    counts = scan["counts"].sum(axis=0).astype(np.int64)
    present = counts > 0
    g = spec.num_groups
    sources: dict[str, SourceFit] = {}
    for i, (name, _, _) in enumerate(spec.sources):
        log_min = scan[f"min_{i}"].min(axis=0)
        log_max = scan[f"max_{i}"].max(axis=0)
        log_min = np.where(present, log_min, np.nan)
        log_max = np.where(present, log_max, np.nan)
        degenerate = present & (np.nan_to_num(log_max - log_min, nan=0.0) <= DEGENERATE_RANGE)
        sources[name] = SourceFit(
            log_min=log_min,
            log_max=log_max,
            degenerate=degenerate,
            means=np.tile([0.0, 1.0], (g, 1)),
            variances=np.full((g, 2), spec.reg_covar),
            weights=np.full((g, 2), 0.5),
            n_iter=np.zeros(g, dtype=np.int64),
            converged=np.zeros(g, dtype=bool),
        )
    return sources, counts


def _fit_counts(spec: SelectionSpec, source: SourceFit, counts: np.ndarray) -> np.ndarray:
    """int64[G]: samples in each mixture's fit."""
    fitted = np.where(source.degenerate, 0, counts)
    return fitted if spec.gmm == "per_class" else np.array([fitted.sum()])


def otsu_threshold(histogram: np.ndarray) -> np.ndarray:
    """float64[G]: each histogram's Otsu split (the 2-means threshold that maximises the
    between-class variance of the bin centres), as the lower edge of its first upper bin.

    Both sides of the split are non-empty whenever two bins are. Groups with an empty
    histogram get 0.5 (they are never fitted)."""
    b = histogram.shape[1]
    counts = histogram.astype(np.float64)
    centres = (np.arange(b) + 0.5) / b
    total = counts.sum(axis=1, keepdims=True)
    below = np.cumsum(counts, axis=1)[:, :-1]  # mass of bins [0, t) for t = 1 .. B-1
    below_sum = np.cumsum(counts * centres, axis=1)[:, :-1]
    overall_mean = (counts * centres).sum(axis=1, keepdims=True) / np.maximum(total, 1.0)
    above = total - below
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (overall_mean * below - below_sum) ** 2 / (below * above)
    between = np.where((below > 0) & (above > 0), between, -1.0)
    split = np.argmax(between, axis=1) + 1  # first bin of the upper component
    return np.where(total[:, 0] > 0, split / b, 0.5)


def _split_init(
    spec: SelectionSpec, run: Runner, sources: dict[str, SourceFit], active: dict[str, np.ndarray]
) -> dict[str, SourceFit]:
    """Initial parameters of every active mixture, as scikit-learn's k-means init.

    The histogram's Otsu split (one pass) is refined by exact Lloyd iterations (one pass
    each: a hard split's exact sums, then the threshold moves to the midpoint of the two
    means) until no sample changes side; the initial means, variances (+ reg_covar) and
    weights are the M-step of that final hard split. Deterministic, and on the scores'
    1-D data the same 2-means partition that sklearn's KMeans reaches.
    """
    histograms = run(_HistogramPass(spec, sources))
    thresholds = {
        name: otsu_threshold(histograms[f"hist_{i}"].sum(axis=0))
        for i, (name, _, _) in enumerate(spec.sources)
    }
    lloyd = {name: a.copy() for name, a in active.items()}
    previous = {name: np.full(spec.num_groups, -1.0) for name in sources}
    split_sums: dict[str, np.ndarray] = {}
    for _ in range(LLOYD_MAX_ITER):
        if not any(a.any() for a in lloyd.values()):
            break
        out = run(_EStepPass(spec, sources, {n: a.copy() for n, a in lloyd.items()}, thresholds))
        for i, (name, _, _) in enumerate(spec.sources):
            moving = lloyd[name]
            if not moving.any():
                continue
            sums = combine_exact_sums(out[f"em_{i}"], TERM_BITS)
            keep = moving[:, None]
            split_sums[name] = np.where(keep, sums, split_sums.get(name, sums))
            lower = sums[:, 0]
            # the same lower-side count as the last pass: nothing changed side (the split
            # is a threshold, so equal counts mean equal partitions)
            settled = moving & (lower == previous[name])
            previous[name] = np.where(moving, lower, previous[name])
            mass = np.maximum(sums[:, [0, 3]], MIN_COMPONENT_MASS)
            centre = 0.5 * (sums[:, 1] / mass[:, 0] + sums[:, 4] / mass[:, 1])
            thresholds[name] = np.where(moving & ~settled, centre, thresholds[name])
            lloyd[name] = moving & ~settled
    for name, fitting in active.items():
        if not fitting.any():
            continue
        means, variances, weights = _m_step(split_sums[name], spec.reg_covar)
        keep = fitting[:, None]
        source = sources[name]
        sources[name] = replace(
            source,
            means=np.where(keep, means, source.means),
            variances=np.where(keep, variances, source.variances),
            weights=np.where(keep, weights, source.weights),
        )
    return sources


def _run_em(
    spec: SelectionSpec, run: Runner, sources: dict[str, SourceFit], counts: np.ndarray
) -> dict[str, SourceFit]:
    """EM for every mixture of every source, one pass over the data per iteration."""
    n_fit = {name: _fit_counts(spec, source, counts) for name, source in sources.items()}
    active = {name: n > 0 for name, n in n_fit.items()}
    lower_bound = {name: np.full(spec.num_groups, -np.inf) for name in sources}
    if any(a.any() for a in active.values()):
        sources = _split_init(spec, run, sources, active)
    for _ in range(spec.max_iter):
        if not any(a.any() for a in active.values()):
            break
        out = run(_EStepPass(spec, sources, {n: a.copy() for n, a in active.items()}))
        for i, (name, _, _) in enumerate(spec.sources):
            fitting = active[name]
            if not fitting.any():
                continue
            sums = combine_exact_sums(out[f"em_{i}"], TERM_BITS)
            means, variances, weights = _m_step(sums, spec.reg_covar)
            source = sources[name]
            bound = sums[:, 6] / np.maximum(n_fit[name], 1)
            converged = fitting & (np.abs(bound - lower_bound[name]) < spec.tol)
            lower_bound[name] = np.where(fitting, bound, lower_bound[name])
            keep = fitting[:, None]
            sources[name] = replace(
                source,
                means=np.where(keep, means, source.means),
                variances=np.where(keep, variances, source.variances),
                weights=np.where(keep, weights, source.weights),
                n_iter=source.n_iter + fitting,
                converged=source.converged | converged,
            )
            active[name] = fitting & ~converged
    return sources


def _backfill_plan(
    spec: SelectionSpec, run: Runner, fitted: FittedSelection
) -> BackfillPlan | None:
    """The m best samples of every present class left empty, via a distributed top-m."""
    counts = fitted.class_counts
    clean = fitted.criterion_counts["clean"]
    empty = (counts > 0) & (clean == 0)
    if not empty.any():
        return None
    k = spec.num_classes
    floor_term = fitted.num_samples // (k * k)
    nonzero = clean[clean > 0]
    m = max(int(nonzero.min()), floor_term) if nonzero.size else floor_term
    m = max(m, 1)
    candidates = run(_CandidatePass(fitted, empty, m))
    labels = candidates["label"].astype(np.int64)
    keys = candidates.get("key")
    best = top_m_per_class(labels, candidates["score"], keys, m)
    best_labels = labels[best]
    classes, first, picks = np.unique(best_labels, return_index=True, return_counts=True)
    last = best[first + picks - 1]
    pick_counts = np.zeros(k, dtype=np.int64)
    pick_counts[classes] = picks
    return BackfillPlan(
        size=m,
        classes=classes.astype(np.int64),
        score=candidates["score"][last].astype(np.float64),
        key=None if keys is None else np.asarray(keys[last], dtype=object),
        counts=pick_counts,
    )


def _fit(spec: SelectionSpec, run: Runner) -> FittedSelection:
    """The whole fit, on any runner (in-memory batch or Ray Data blocks)."""
    validate_thresholds(spec.theta_gmm, spec.theta_cons, spec.gmm)
    if not spec.sources:
        raise ValueError("source_columns is empty: at least one probability source is needed")
    scan = run(_RangePass(spec))
    if not scan:
        raise ValueError("the dataset is empty")
    bad_labels = int(scan["bad_labels"].sum())
    if bad_labels:
        raise ValueError(
            f"{bad_labels} label(s) are not integers in [0, {spec.num_classes}) "
            f"(column {spec.label_column!r})"
        )
    for i, (name, _, _) in enumerate(spec.sources):
        bad = int(scan[f"bad_{i}"].sum())
        if bad:
            raise ValueError(
                f"source {name!r}: {bad} row(s) with NaN, inf, negative or zero max_p, "
                "or p_label above max_p"
            )
    columns_read = tuple(str(scan["columns"][0]).split(","))
    sources, counts = _initial_sources(spec, scan)
    if counts.sum() == 0:
        raise ValueError("the dataset is empty")
    sources = _run_em(spec, run, sources, counts)
    fitted = FittedSelection(
        spec=spec, sources=sources, class_counts=counts, columns_read=columns_read
    )
    tallies = run(_CountPass(fitted))
    criterion_counts = {
        name: values.sum(axis=0).astype(np.int64) for name, values in tallies.items()
    }
    fitted = replace(fitted, criterion_counts=criterion_counts)
    return replace(fitted, backfill=_backfill_plan(spec, run, fitted))


# --------------------------------------------------------------------------- public API: selection


def _spec(
    num_classes: int,
    source_columns: Mapping[str, tuple[str, str]],
    *,
    label_column: str,
    key_column: str | None,
    theta_gmm: float,
    theta_cons: float,
    gmm: str,
    max_iter: int,
    tol: float,
    reg_covar: float,
) -> SelectionSpec:
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
        raise ValueError(f"num_classes must be an integer, got {num_classes!r}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, (int, np.integer)) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}")
    if not (tol > 0 and np.isfinite(tol)):
        raise ValueError(f"tol must be a positive number, got {tol!r}")
    if isinstance(reg_covar, bool) or not (np.isfinite(reg_covar) and 0 < reg_covar <= 1):
        raise ValueError(f"reg_covar must be in (0, 1], got {reg_covar!r}")
    validate_thresholds(theta_gmm, theta_cons, gmm)
    sources = tuple((name, p, m) for name, (p, m) in source_columns.items())
    return SelectionSpec(
        num_classes=int(num_classes),
        sources=sources,
        label_column=label_column,
        key_column=key_column,
        theta_gmm=float(theta_gmm),
        theta_cons=float(theta_cons),
        gmm=gmm,  # type: ignore[arg-type]
        max_iter=int(max_iter),
        tol=float(tol),
        reg_covar=float(reg_covar),
    )


def selection_input(ds: ray.data.Dataset, spec: SelectionSpec) -> ray.data.Dataset:
    """The projection the fit reads: label, p_label / max_p per source, and the key."""
    return ds.select_columns(spec.columns())


def fit_selection(
    ds: ray.data.Dataset,
    num_classes: int,
    *,
    source_columns: Mapping[str, tuple[str, str]],
    label_column: str = "label",
    key_column: str | None = None,
    theta_gmm: float = 0.5,
    theta_cons: float = 0.8,
    gmm: GmmMode = "per_class",
    max_iter: int = 100,
    tol: float = 1e-3,
    reg_covar: float = DEFAULT_REG_COVAR,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    materialize: bool = True,
) -> FittedSelection:
    """Fit the selection over a Ray Dataset without gathering its columns.

    source_columns maps a source name to its (p_label column, max_p column). Only those
    columns, the label and the optional key column are read; with materialize=True they
    are materialised once (in the object store, not on the driver) for the EM passes.
    Raises ValueError for invalid input.
    """
    spec = _spec(
        num_classes,
        source_columns,
        label_column=label_column,
        key_column=key_column,
        theta_gmm=theta_gmm,
        theta_cons=theta_cons,
        gmm=gmm,
        max_iter=max_iter,
        tol=tol,
        reg_covar=reg_covar,
    )
    small = selection_input(ds, spec)
    if materialize:
        small = small.materialize()
    return _fit(spec, _dataset_runner(small, batch_rows))


def distributed_select(
    ds: ray.data.Dataset,
    num_classes: int,
    *,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    **fit_options: Any,
) -> ray.data.Dataset:
    """`fit_selection` (fit_options: its keyword arguments), then the dataset with
    is_clean, backfilled, clean_score and, per source, loss_score_*, gmm_p_clean_*,
    consistency_* added (lazy map_batches)."""
    fitted = fit_selection(ds, num_classes, batch_rows=batch_rows, **fit_options)
    return fitted.transform(ds, batch_rows=batch_rows)


def fit_selection_in_memory(
    labels: np.ndarray,
    num_classes: int,
    sources: Mapping[str, SourceScores],
    *,
    keys: np.ndarray | None = None,
    theta_gmm: float = 0.5,
    theta_cons: float = 0.8,
    gmm: GmmMode = "per_class",
    max_iter: int = 100,
    tol: float = 1e-3,
    reg_covar: float = DEFAULT_REG_COVAR,
    chunk_rows: int = DEFAULT_BATCH_ROWS,
) -> tuple[FittedSelection, Batch]:
    """The same fit on in-memory arrays: (FittedSelection, the batch it was fitted on).

    keys break backfill ties (ascending); default: the row index, as selection.py. The
    rows are processed in chunks of chunk_rows (any value gives the same result).
    """
    labels = validate_selection_input(labels, num_classes, sources, theta_gmm, theta_cons, gmm)
    n = labels.shape[0]
    if keys is None:
        keys = np.arange(n, dtype=np.int64)
    keys = np.asarray(keys)
    if keys.shape != (n,):
        raise ValueError(f"keys must have shape ({n},), got {keys.shape}")
    key_column = f"{IN_MEMORY_PREFIX}key"
    label_column = f"{IN_MEMORY_PREFIX}label"
    batch: Batch = {label_column: labels, key_column: keys}
    source_columns: dict[str, tuple[str, str]] = {}
    for i, (name, scores) in enumerate(sources.items()):
        p_column, max_column = f"{IN_MEMORY_PREFIX}p_{i}", f"{IN_MEMORY_PREFIX}max_{i}"
        batch[p_column] = scores.p_label
        batch[max_column] = scores.max_p
        source_columns[name] = (p_column, max_column)
    spec = _spec(
        num_classes,
        source_columns,
        label_column=label_column,
        key_column=key_column,
        theta_gmm=theta_gmm,
        theta_cons=theta_cons,
        gmm=gmm,
        max_iter=max_iter,
        tol=tol,
        reg_covar=reg_covar,
    )
    return _fit(spec, _local_runner(batch, chunk_rows)), batch


def _evaluate_in_chunks(fitted: FittedSelection, batch: Batch, chunk_rows: int) -> Batch:
    """`fitted.evaluate` chunk by chunk into preallocated columns: the values are per
    sample, so the result is the same, but the temporaries (responsibilities, masks)
    stay chunk-sized instead of N-sized (about 1 GB less at N = 1e7)."""
    num_rows = len(next(iter(batch.values())))
    out: Batch = {}
    for start in range(0, num_rows, chunk_rows):
        chunk = {name: values[start : start + chunk_rows] for name, values in batch.items()}
        for name, values in fitted.evaluate(chunk).items():
            if name not in out:
                out[name] = np.empty(num_rows, dtype=values.dtype)
            out[name][start : start + values.shape[0]] = values
    return out


def select_from_scores_em(
    labels: np.ndarray,
    num_classes: int,
    sources: dict[str, SourceScores],
    *,
    theta_gmm: float = 0.5,
    theta_cons: float = 0.8,
    gmm: GmmMode = "per_class",
    keys: np.ndarray | None = None,
    max_iter: int = 100,
    tol: float = 1e-3,
    reg_covar: float = DEFAULT_REG_COVAR,
    chunk_rows: int = DEFAULT_BATCH_ROWS,
) -> SelectionResult:
    """`select_from_scores` with this module's deterministic EM (the in-memory twin of
    `fit_selection`: same code, bit-identical results)."""
    fitted, batch = fit_selection_in_memory(
        labels,
        num_classes,
        sources,
        keys=keys,
        theta_gmm=theta_gmm,
        theta_cons=theta_cons,
        gmm=gmm,
        max_iter=max_iter,
        tol=tol,
        reg_covar=reg_covar,
        chunk_rows=chunk_rows,
    )
    values = _evaluate_in_chunks(fitted, batch, chunk_rows)
    selections = {
        name: SourceSelection(
            loss_score=values[f"loss_score_{name}"],
            gmm_p_clean=values[f"gmm_p_clean_{name}"],
            gmm_selected=values[f"gmm_selected_{name}"],
            consistency=values[f"consistency_{name}"],
            consistency_selected=values[f"consistency_selected_{name}"],
        )
        for name in sources
    }
    return SelectionResult(
        is_clean=values["is_clean"],
        backfilled=values["backfilled"],
        clean_score=values["clean_score"],
        sources=selections,
        labels=batch[fitted.spec.label_column],
        num_classes=int(num_classes),
        theta_gmm=float(theta_gmm),
        theta_cons=float(theta_cons),
        gmm=gmm,
        backfill_size=fitted.backfill.size if fitted.backfill is not None else 0,
        settings=fitted.spec.settings(),
    )


# --------------------------------------------------------------------------- streaming probe


_HASH_MULTIPLIERS = (np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB))
_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)


def _mix64(h: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    h = (h ^ (h >> np.uint64(30))) * _HASH_MULTIPLIERS[0]
    h = (h ^ (h >> np.uint64(27))) * _HASH_MULTIPLIERS[1]
    return h ^ (h >> np.uint64(31))


def stable_hash(keys: np.ndarray, seed: int = 0) -> np.ndarray:
    """uint64 hash of each key (integers, or strings / bytes via FNV-1a), independent of
    the batch it comes in and of the Python process (no salted hash())."""
    keys = np.asarray(keys)
    if keys.shape[0] == 0:
        return np.zeros(0, dtype=np.uint64)
    salt = _mix64(np.array([seed % 2**64], dtype=np.uint64))[0]
    with np.errstate(over="ignore"):
        if np.issubdtype(keys.dtype, np.integer):
            return _mix64(keys.astype(np.int64).view(np.uint64) ^ salt)
        if keys.dtype.kind == "U" or keys.dtype == object:
            keys = np.char.encode(keys.astype(str), "utf-8")
        if keys.dtype.kind != "S":
            raise ValueError(f"keys must be integers or strings, got dtype {keys.dtype}")
        raw = np.ascontiguousarray(keys).view(np.uint8).reshape(keys.shape[0], -1)
        h = np.full(keys.shape[0], _FNV_OFFSET, dtype=np.uint64)
        for column in range(raw.shape[1]):  # bytes of the key (NUL padding is skipped)
            byte = raw[:, column].astype(np.uint64)
            h = np.where(byte != 0, (h ^ byte) * _FNV_PRIME, h)
        return _mix64(h ^ salt)


def fold_ids(keys: np.ndarray, folds: int, seed: int = 0) -> np.ndarray:
    """int64 fold in [0, folds) per key, from `stable_hash` (block-order independent)."""
    return (stable_hash(keys, seed) % np.uint64(folds)).astype(np.int64)


def embedding_matrix(batch: Any, column: str) -> np.ndarray:
    """float32[n, D] from a pyarrow Table or dict batch (fixed-size lists, tensors, lists)."""
    if isinstance(batch, pa.Table):
        values = batch.column(column).combine_chunks()
        if pa.types.is_fixed_size_list(values.type):
            flat = values.flatten().to_numpy(zero_copy_only=False)
            return flat.reshape(-1, values.type.list_size).astype(np.float32, copy=False)
        if isinstance(values.type, pa.ExtensionType):
            return np.asarray(values.to_numpy(), dtype=np.float32)
        return np.stack(values.to_numpy(zero_copy_only=False)).astype(np.float32)
    array = np.asarray(batch[column])
    if array.dtype == object:
        array = np.stack(list(array)) if array.size else np.zeros((0, 0))
    return array.astype(np.float32, copy=False)


def _column(batch: Any, column: str) -> np.ndarray:
    if isinstance(batch, pa.Table):
        return batch.column(column).to_numpy()
    return np.asarray(batch[column])


@dataclass(frozen=True)
class _FoldCounts:
    """Per-block class counts per fold: int64[1, F, K] (and a bad-label count)."""

    label_column: str
    key_column: str | None
    num_classes: int
    folds: int
    seed: int

    def __call__(self, batch: Batch) -> Batch:
        labels = np.asarray(batch[self.label_column])
        bad = (labels < 0) | (labels >= self.num_classes)
        labels = np.where(bad, 0, labels).astype(np.int64)
        fold = (
            fold_ids(batch[self.key_column], self.folds, self.seed)
            if self.key_column is not None
            else np.zeros(labels.shape[0], dtype=np.int64)
        )
        counts = np.bincount(
            (fold * self.num_classes + labels)[~bad], minlength=self.folds * self.num_classes
        )
        return {
            "counts": counts.reshape(1, self.folds, self.num_classes),
            "bad": np.array([int(bad.sum())]),
        }


@dataclass(frozen=True)
class _ProbeFeatures:
    """Per-block training features: normalised embedding x, label y, fold."""

    embedding_column: str
    label_column: str
    key_column: str | None
    folds: int
    seed: int

    def __call__(self, batch: pa.Table) -> Batch:
        x = l2_normalise(embedding_matrix(batch, self.embedding_column))
        y = _column(batch, self.label_column).astype(np.int64)
        fold = (
            fold_ids(_column(batch, self.key_column), self.folds, self.seed)
            if self.key_column is not None
            else np.zeros(y.shape[0], dtype=np.int64)
        )
        return {"x": x, "y": y, "fold": fold}


@dataclass(frozen=True, eq=False)
class StreamingProbe:
    """Trained probe(s): weights float32[F, D, K], bias float32[F, K]; F = 1 (insample)
    or the number of folds (crossfit, probe f never saw fold f)."""

    weights: np.ndarray
    bias: np.ndarray
    present: np.ndarray  # bool[F, K], classes in each probe's training part
    mode: str
    embedding_column: str
    label_column: str
    key_column: str | None
    seed: int

    @property
    def folds(self) -> int:
        return int(self.weights.shape[0])

    def predict_proba(self, embeddings: np.ndarray, keys: np.ndarray | None = None) -> np.ndarray:
        """float64[n, K]: each row predicted by its out-of-fold probe (insample: the probe)."""
        x = l2_normalise(embeddings)
        if self.mode == "crossfit":
            if keys is None:
                raise ValueError("crossfit prediction needs the keys")
            fold = fold_ids(keys, self.folds, self.seed)
        else:
            fold = np.zeros(x.shape[0], dtype=np.int64)
        probs = np.zeros((x.shape[0], self.weights.shape[2]), dtype=np.float64)
        for f in range(self.folds):  # a loop over the (few) probes, not the samples
            rows = np.flatnonzero(fold == f)
            if rows.size == 0:
                continue
            logits = (x[rows] @ self.weights[f] + self.bias[f]).astype(np.float64)
            logits = np.where(self.present[f], logits, -np.inf)
            logits -= logits.max(axis=1, keepdims=True)
            e = np.exp(logits)
            probs[rows] = e / e.sum(axis=1, keepdims=True)
        return probs

    def predict(self, batch: Any, prefix: str = "probe") -> Any:
        """Add {prefix}_p_label, {prefix}_max_p, {prefix}_argmax to a batch (Table or dict)."""
        keys = _column(batch, self.key_column) if self.key_column is not None else None
        probs = self.predict_proba(embedding_matrix(batch, self.embedding_column), keys)
        labels = _column(batch, self.label_column).astype(np.int64)
        values = {
            f"{prefix}_p_label": probs[np.arange(probs.shape[0]), labels],
            f"{prefix}_max_p": probs.max(axis=1),
            f"{prefix}_argmax": probs.argmax(axis=1).astype(np.int64),
        }
        if isinstance(batch, pa.Table):
            for name, column in values.items():
                batch = batch.append_column(name, pa.array(column))
            return batch
        return {**batch, **values}

    def transform(
        self, ds: ray.data.Dataset, *, prefix: str = "probe", batch_rows: int = 8192
    ) -> ray.data.Dataset:
        """The dataset with the probe's p_label, max_p and argmax columns (map_batches)."""
        return ds.map_batches(
            self.predict,
            fn_kwargs={"prefix": prefix},
            batch_format="pyarrow",
            batch_size=batch_rows,
        )


def _balanced_weights(train_counts: np.ndarray) -> np.ndarray:
    """float32[F, K]: sklearn's class_weight="balanced" on each training part."""
    present = train_counts > 0
    n = train_counts.sum(axis=1, keepdims=True)
    classes = np.maximum(present.sum(axis=1, keepdims=True), 1)
    weights = n / (classes * np.maximum(train_counts, 1))
    return np.where(present, weights, 0.0).astype(np.float32)


def _probe_loss(
    x: torch.Tensor,
    y: torch.Tensor,
    fold: torch.Tensor,
    weights: torch.Tensor,
    bias: torch.Tensor,
    class_weights: torch.Tensor,
    present: torch.Tensor,
    l2: torch.Tensor,
    crossfit: bool,
) -> torch.Tensor:
    """Sum over probes of the batch's class-weighted cross-entropy plus the L2 term."""
    import torch

    logits = torch.einsum("bd,fdk->fbk", x, weights) + bias[:, None, :]
    logits = logits.masked_fill(~present[:, None, :], float("-inf"))
    num_probes = weights.shape[0]
    index = y.expand(num_probes, -1)
    nll = -torch.log_softmax(logits, dim=2).gather(2, index[..., None])[..., 0]  # [F, B]
    if crossfit:
        train = fold[None, :] != torch.arange(num_probes, device=x.device)[:, None]
    else:
        train = torch.ones_like(nll, dtype=torch.bool)
    sample_weight = class_weights.gather(1, index) * train
    nll = torch.where(train, nll, torch.zeros_like(nll))
    data_term = (sample_weight * nll).sum(dim=1) / train.sum(dim=1).clamp(min=1)
    penalty = 0.5 * l2 * (weights * weights).sum(dim=(1, 2))
    return (data_term + penalty).sum()


def fit_probe_streaming(
    ds: ray.data.Dataset,
    embedding_column: str,
    label_column: str,
    num_classes: int,
    *,
    mode: Literal["insample", "crossfit"],
    key_column: str | None = "key",
    folds: int = 5,
    epochs: int = 10,
    lr: float = 0.02,
    batch_size: int = 1024,
    C: float = 1.0,
    shuffle_buffer: int = 16384,
    seed: int = 0,
    device: str = "cpu",
) -> StreamingProbe:
    """Class-balanced multinomial logistic regression trained over `iter_torch_batches`.

    A counting pass gives the per-fold class counts (balanced weights, as sklearn's
    class_weight="balanced"); the objective per probe is the mean class-weighted
    cross-entropy plus ||W||^2 / (2 C N_train), sklearn's objective divided by C N_train.
    Adam with a cosine learning-rate decay, `epochs` passes. crossfit: fold = hash(key)
    mod folds, and one pass trains all `folds` probes (probe f skips fold f). Classes
    absent from a probe's training part get probability 0. The embeddings stream to
    this process (run it in a GPU task for large data); nothing is gathered.
    """
    import torch

    if mode not in PROBE_MODES:
        raise ValueError(f"unknown probe mode {mode!r}; expected one of {PROBE_MODES}")
    if isinstance(folds, bool) or not isinstance(folds, (int, np.integer)) or folds < 2:
        raise ValueError(f"folds must be an integer >= 2, got {folds!r}")
    if mode == "crossfit" and key_column is None:
        raise ValueError("crossfit needs a stable key column to assign folds")
    if not (epochs >= 1 and lr > 0 and batch_size >= 1 and C > 0):
        raise ValueError("epochs, lr, batch_size and C must be positive")
    num_probes = folds if mode == "crossfit" else 1
    fold_key = key_column if mode == "crossfit" else None

    count_columns = [label_column] + ([fold_key] if fold_key is not None else [])
    counted = ds.select_columns(count_columns).map_batches(
        _FoldCounts(label_column, fold_key, num_classes, num_probes, seed), batch_format="numpy"
    )
    fold_counts = np.zeros((num_probes, num_classes), dtype=np.int64)
    bad = 0
    for part in counted.iter_batches(batch_size=None, batch_format="numpy"):
        fold_counts += part["counts"].sum(axis=0)
        bad += int(part["bad"].sum())
    if bad:
        raise ValueError(f"{bad} label(s) outside [0, {num_classes}) in column {label_column!r}")
    total = fold_counts.sum(axis=0)
    if total.sum() == 0:
        raise ValueError("the dataset is empty")
    train_counts = total[None, :] - fold_counts if mode == "crossfit" else fold_counts
    n_train = train_counts.sum(axis=1)

    feature_columns = [embedding_column, label_column] + ([fold_key] if fold_key else [])
    features = ds.select_columns(feature_columns).map_batches(
        _ProbeFeatures(embedding_column, label_column, fold_key, num_probes, seed),
        batch_format="pyarrow",
    )
    dim = int(features.take_batch(1, batch_format="numpy")["x"].shape[1])

    # zero initialisation, as sklearn's lbfgs
    weights = torch.zeros(num_probes, dim, num_classes, device=device, requires_grad=True)
    bias = torch.zeros(num_probes, num_classes, device=device, requires_grad=True)
    class_weights = torch.from_numpy(_balanced_weights(train_counts)).to(device)
    present = torch.from_numpy(train_counts > 0).to(device)
    l2 = torch.from_numpy((1.0 / (C * np.maximum(n_train, 1))).astype(np.float32)).to(device)
    optimiser = torch.optim.Adam([weights, bias], lr=lr)
    steps = epochs * max(1, math.ceil(int(total.sum()) / batch_size))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, steps) / steps))
    )
    for epoch in range(epochs):
        for batch in features.iter_torch_batches(
            batch_size=batch_size,
            dtypes={"x": torch.float32, "y": torch.int64, "fold": torch.int64},
            device=device,
            local_shuffle_buffer_size=shuffle_buffer if shuffle_buffer > 0 else None,
            local_shuffle_seed=seed + epoch if shuffle_buffer > 0 else None,
        ):
            optimiser.zero_grad()
            loss = _probe_loss(
                batch["x"],
                batch["y"],
                batch["fold"],
                weights,
                bias,
                class_weights,
                present,
                l2,
                crossfit=mode == "crossfit",
            )
            loss.backward()
            optimiser.step()
            schedule.step()
    return StreamingProbe(
        weights=weights.detach().cpu().numpy(),
        bias=bias.detach().cpu().numpy(),
        present=train_counts > 0,
        mode=mode,
        embedding_column=embedding_column,
        label_column=label_column,
        key_column=fold_key,
        seed=seed,
    )


# --------------------------------------------------------------------------- fit mode


SMALL_COLUMN_BYTES = 512  # per sample: score-table strings and lists, selection arrays
EMBEDDING_BYTES_PER_DIM = 14  # float16 column + numpy copies + float32 normalised + fold split
PROBABILITY_BYTES_PER_CLASS = 16  # probe probabilities float64[N, K] and one temporary


def estimate_in_memory_bytes(num_samples: int, embed_dim: int, num_classes: int = 0) -> int:
    """Rough peak bytes of the in-memory fit (`cleaner.selection.fit_in_memory`) on one node."""
    for name, value in (
        ("num_samples", num_samples),
        ("embed_dim", embed_dim),
        ("num_classes", num_classes),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    per_sample = (
        SMALL_COLUMN_BYTES
        + EMBEDDING_BYTES_PER_DIM * int(embed_dim)
        + PROBABILITY_BYTES_PER_CLASS * int(num_classes)
    )
    return int(num_samples) * per_sample


def choose_fit_mode(
    num_samples: int, embed_dim: int, memory_budget_bytes: int, *, num_classes: int = 0
) -> FitMode:
    """ "in_memory" when the estimated bytes of the in-memory fit fit the budget, else
    "distributed"."""
    if isinstance(memory_budget_bytes, bool) or not isinstance(
        memory_budget_bytes, (int, np.integer)
    ):
        raise ValueError(f"memory_budget_bytes must be an integer, got {memory_budget_bytes!r}")
    if memory_budget_bytes <= 0:
        raise ValueError(f"memory_budget_bytes must be positive, got {memory_budget_bytes}")
    needed = estimate_in_memory_bytes(num_samples, embed_dim, num_classes)
    return "in_memory" if needed <= memory_budget_bytes else "distributed"
