"""The library API of the selection (docs/method.md, "Selection") on in-memory arrays.

`select_clean(labels, zeroshot_probs, probe_probs=None, ...)` -> bool[N] mask, and
`select_from_scores` on the compact per-source columns (p(label), max p). Both run the EM
engine (`cleaner.selection.engine`) on one in-memory batch: the same code as the job's
in-memory fit and its Ray Data fit (`cleaner.selection.fit_ray`), so the library and the
job agree bit for bit on the same inputs.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from cleaner.selection.engine import local_runner, make_spec, run_fit
from cleaner.selection.fitted import DEFAULT_BATCH_ROWS, Batch, FittedSelection
from cleaner.selection.rules import (
    DEFAULT_REG_COVAR,
    GmmMode,
    SelectionResult,
    SourceScores,
    SourceSelection,
    validate_labels,
    validate_probs,
    validate_selection_input,
    validate_thresholds,
)

IN_MEMORY_PREFIX = "__"


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

    keys break backfill ties (ascending); default: the row index. The
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
    spec = make_spec(
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
    return run_fit(spec, local_runner(batch, chunk_rows)), batch


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


def select_from_scores(
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
    """Select clean samples from compact per-source columns (p(label), max p).

    Intersects the GMM and consistency selections of every source, then backfills
    present classes left empty. The mixtures are fitted by the EM engine, the same code
    as the job's in-memory and Ray Data fits (bit-identical results). reg_covar is the
    mixtures' variance floor (default 1e-6, the official code's; 5e-4 is DivideMix's);
    keys break backfill ties (ascending; default the row index); chunk_rows bounds the
    temporaries (any value gives the same result). Raises ValueError for invalid input.
    """
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


def select_clean_result(
    labels: np.ndarray,
    zeroshot_probs: np.ndarray,
    probe_probs: np.ndarray | None = None,
    *,
    theta_gmm: float = 0.5,
    theta_cons: float = 0.8,
    gmm: GmmMode = "per_class",
    reg_covar: float = DEFAULT_REG_COVAR,
) -> SelectionResult:
    """Like `select_clean`, but return the full `SelectionResult`.

    (Its signature repeats `select_clean`'s on purpose: both are public entry points.)"""
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
        labels_array,
        num_classes,
        sources,
        theta_gmm=theta_gmm,
        theta_cons=theta_cons,
        gmm=gmm,
        reg_covar=reg_covar,
    )


def select_clean(
    labels: np.ndarray,
    zeroshot_probs: np.ndarray,
    probe_probs: np.ndarray | None = None,
    *,
    theta_gmm: float = 0.5,
    theta_cons: float = 0.8,
    gmm: GmmMode = "per_class",
    reg_covar: float = DEFAULT_REG_COVAR,
) -> np.ndarray:
    """CLIPCleaner selection on in-memory arrays: a bool[N] mask of clean samples.

    labels int[N]; zeroshot_probs / probe_probs float[N, K]. With probe_probs=None only
    the zero-shot GMM and consistency selections are intersected. reg_covar: the
    mixtures' variance floor (1e-6, the official code's; 5e-4 is DivideMix's). Raises
    ValueError naming the problem for invalid input.
    """
    return select_clean_result(
        labels,
        zeroshot_probs,
        probe_probs,
        theta_gmm=theta_gmm,
        theta_cons=theta_cons,
        gmm=gmm,
        reg_covar=reg_covar,
    ).is_clean
