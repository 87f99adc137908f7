"""The selection's EM engine: one fit, on any partition of the rows into blocks.

The library (`cleaner.selection.select`), the job's in-memory fit and its Ray Data fit
(`cleaner.selection.fit_ray`) all run `run_fit` here, with a different `Runner`: one
in-memory batch in chunks (`local_runner`), or the blocks of a `ray.data.Dataset`
(`fit_ray.block_tasks_runner`). docs/method.md, "Selection", fitted in passes; the driver only
holds per-class
arrays (K values, K x INIT_BINS for the initialisation) and, for the backfill, at most
m candidates per empty class. Only the label, p_label / max_p and key columns are read.

The passes (each a `BlockPass`: a function of a batch whose outputs fold exactly):

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
   passes 2 and 3 run on each chunk's loss scores, computed once after pass 1 and kept
   grouped by mixture (`Runner.derive`, `cleaner.selection.grouped`): a pass reads only
   the mixtures still fitting, sums contiguous segments, and a Lloyd pass after the
   first reads only the samples that change side;
4. count: per-class counts of every criterion and of the intersection, which give the
   empty classes and the backfill size m;
5. top-m (only if a class is empty): each block's best m samples per empty class by
   loss score, folded into the global best m.

The result is a `FittedSelection` (ranges, mixture parameters, backfill cut-offs: a few
KB) whose `apply` maps a batch to its per-sample columns in a `map_batches`.

Exact equality of the in-memory and Ray Data fits: both run the same
block functions and driver code; only the partition of the rows into blocks and chunks
differs. Per-sample values are elementwise; counts, histograms, min / max and the top-m
(a total order: score descending, then key) are exact; the EM sums are made
order-independent by fixed-point accumulation: each per-sample term is rounded to a
multiple of 2^-40 (2^-28 for log-likelihoods), held as int64 and summed exactly
(`em.exact_group_sums`, `grouped.segment_exact_sums`). Integer addition is associative, so any partition gives
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
ascending key (the library uses the row index as key).
Without a key column, every sample tied with the m-th best score is picked.

The maths (E-step terms, exact sums, M-step, Otsu split) is in `cleaner.selection.em`;
the fitted parameters and the per-sample evaluation in `cleaner.selection.fitted`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np

from cleaner.selection.em import (
    MIN_COMPONENT_MASS,
    TERM_BITS,
    combine_exact_sums,
    m_step,
    otsu_threshold,
    top_m_per_class,
)
from cleaner.selection.fitted import (
    BackfillPlan,
    Batch,
    FittedSelection,
    SelectionSpec,
    SourceFit,
    as_labels,
    keys_of,
)
from cleaner.selection.grouped import (
    GroupedEStepPass,
    GroupedHistogramPass,
    GroupScores,
    SplitSumsPass,
)
from cleaner.selection.rules import DEGENERATE_RANGE, LOG_EPSILON, validate_thresholds
from cleaner.selection.runners import BlockPass, Runner, check_rows, local_runner

__all__ = ["BlockPass", "Runner", "check_rows", "local_runner", "make_spec", "run_fit"]


INIT_BINS = 256  # histogram bins of the normalised loss score for the initialisation


LLOYD_MAX_ITER = 100  # exact 2-means (Lloyd) passes that refine the histogram's split


@dataclass(frozen=True)
class _RangePass(BlockPass):
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
class _CountPass(BlockPass):
    """Per-class counts of every criterion and of the intersection (before backfill)."""

    fitted: FittedSelection

    def __call__(self, batch: Batch) -> Batch:
        spec = self.fitted.spec
        labels = as_labels(batch[spec.label_column])
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
class _CandidatePass(BlockPass):
    """Each block's best m samples per empty class (by rank score, then key)."""

    fitted: FittedSelection
    empty: np.ndarray  # bool[K]
    m: int

    def __call__(self, batch: Batch) -> Batch:
        spec = self.fitted.spec
        labels = as_labels(batch[spec.label_column])
        rows = np.flatnonzero(self.empty[labels])
        sub = {column: np.asarray(batch[column])[rows] for column in spec.columns()}
        rank = self.fitted.evaluate(sub)["rank_score"]
        keys = keys_of(sub, spec.key_column)
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


def _split_sums(
    spec: SelectionSpec,
    run: Runner,
    moving: dict[str, np.ndarray],
    thresholds: dict[str, np.ndarray],
    kept: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
) -> dict[str, np.ndarray]:
    """float64[G, 7] per source with moving mixtures: the hard split's E-step sums (r, r x,
    r x^2 of the lower, then the upper side; log-likelihood 0) at `thresholds`.

    kept[name] = (exact sums of all samples, of the lower side, its thresholds) is updated
    in place: the first pass sums everything; later passes add or remove only the samples
    between a mixture's old and new threshold (those that changed side).
    """
    g = spec.num_groups
    unbounded = np.full(g, np.inf)
    ranges = {}
    for i, (name, _, _) in enumerate(spec.sources):
        if not moving[name].any():
            continue
        if name not in kept:
            ranges[f"total_{i}"] = (i, moving[name], -unbounded, unbounded)
            ranges[f"lower_{i}"] = (i, moving[name], -unbounded, thresholds[name])
        else:
            before = kept[name][2]
            low = np.minimum(before, thresholds[name])
            ranges[f"moved_{i}"] = (i, moving[name], low, np.maximum(before, thresholds[name]))
    out = run(SplitSumsPass(g, ranges))
    sums = {}
    for i, (name, _, _) in enumerate(spec.sources):
        if not moving[name].any():
            continue
        if name not in kept:
            total, lower = out[f"total_{i}"].sum(axis=0), out[f"lower_{i}"].sum(axis=0)
        else:
            total, lower, before = kept[name]
            # samples between the thresholds join the lower side if it moved up
            sign = np.where(thresholds[name] > before, 1, -1)[None, :, None]
            lower = lower + sign * out[f"moved_{i}"].sum(axis=0)
        kept[name] = (total, lower, thresholds[name].copy())
        parts = (lower, total - lower, np.zeros((2, g, 1), dtype=np.int64))
        sums[name] = combine_exact_sums(np.concatenate(parts, axis=2)[None], TERM_BITS)
    return sums


def _split_init(
    spec: SelectionSpec, run: Runner, sources: dict[str, SourceFit], active: dict[str, np.ndarray]
) -> dict[str, SourceFit]:
    """Initial parameters of every active mixture, as scikit-learn's k-means init.

    The histogram's Otsu split (one pass) is refined by exact Lloyd iterations (one pass
    each: a hard split's exact sums, then the threshold moves to the midpoint of the two
    means) until no sample changes side; the initial means, variances (+ reg_covar) and
    weights are the M-step of that final hard split. Deterministic, and on the scores'
    1-D data the same 2-means partition that sklearn's KMeans reaches. `run` runs on
    the class-grouped loss scores (`cleaner.selection.grouped`): a Lloyd pass after the
    first reads only the samples that change side.
    """
    histograms = run(GroupedHistogramPass(spec.num_groups, INIT_BINS))
    thresholds = {
        name: otsu_threshold(histograms[f"hist_{i}"].sum(axis=0))
        for i, (name, _, _) in enumerate(spec.sources)
    }
    lloyd = {name: a.copy() for name, a in active.items()}
    previous = {name: np.full(spec.num_groups, -1.0) for name in sources}
    split_sums: dict[str, np.ndarray] = {}
    kept: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for _ in range(LLOYD_MAX_ITER):
        if not any(a.any() for a in lloyd.values()):
            break
        out = _split_sums(spec, run, lloyd, thresholds, kept)
        for name, sums in out.items():
            moving = lloyd[name]
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
        means, variances, weights = m_step(split_sums[name], spec.reg_covar)
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
    """EM for every mixture of every source, one pass per iteration over the loss scores
    of the mixtures still fitting (kept grouped by mixture: `run.derive(GroupScores)`)."""
    n_fit = {name: _fit_counts(spec, source, counts) for name, source in sources.items()}
    active = {name: n > 0 for name, n in n_fit.items()}
    lower_bound = {name: np.full(spec.num_groups, -np.inf) for name in sources}
    if not any(a.any() for a in active.values()):
        return sources
    grouped = run.derive(GroupScores(spec, sources))
    sources = _split_init(spec, grouped, sources, active)
    for _ in range(spec.max_iter):
        if not any(a.any() for a in active.values()):
            break
        out = grouped(GroupedEStepPass(spec, sources, {n: a.copy() for n, a in active.items()}))
        for i, (name, _, _) in enumerate(spec.sources):
            fitting = active[name]
            if not fitting.any():
                continue
            sums = combine_exact_sums(out[f"em_{i}"], TERM_BITS)
            means, variances, weights = m_step(sums, spec.reg_covar)
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


def run_fit(spec: SelectionSpec, run: Runner) -> FittedSelection:
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


def make_spec(
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
