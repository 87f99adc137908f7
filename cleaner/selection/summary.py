"""summary.json's counts, detection and suggestion figures, from the manifest's small
columns, plus the fitted mixtures for the report."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pyarrow as pa

from cleaner.metrics import detection_metrics
from cleaner.reading.shards import STATUS_FAILED
from cleaner.reasons import group_reasons
from cleaner.selection.fitted import FittedSelection

# The manifest columns `summarise` reads (a few bytes per sample).
SUMMARY_COLUMNS = [
    "status",
    "reason",
    "label",
    "true_label",
    "is_clean",
    "suggested_label",
    "clean_score",
    "argmax_zeroshot",
]


def summarise(columns: Mapping[str, np.ndarray], selection_counts: dict, class_names) -> dict:
    """Counts, detection and suggestion figures from the manifest's SUMMARY_COLUMNS."""
    status = np.asarray(columns["status"], dtype=object)
    reason = np.asarray(columns["reason"], dtype=object)
    labels = np.asarray(columns["label"], dtype=np.int64)
    true_labels = np.asarray(columns["true_label"], dtype=np.int64)
    is_clean = np.asarray(columns["is_clean"], dtype=bool)
    suggested = np.asarray(columns["suggested_label"], dtype=np.int64)
    clean_score = np.asarray(columns["clean_score"], dtype=np.float64)
    argmax_zs = np.asarray(columns["argmax_zeroshot"], dtype=np.int64)
    n = status.shape[0]
    ok = status != STATUS_FAILED
    off_topic = status == "off_topic"  # usable, neither clean nor noisy (cleaner/checks)
    failed_reasons = reason[~ok]
    duplicates = sum(1 for r in failed_reasons if str(r).startswith("duplicate key"))
    summary = {
        "counts": {
            "samples": int(n),
            "ok": int(ok.sum()),
            "failed": int((~ok).sum()),
            "duplicate_keys": int(duplicates),
            "clean": int((ok & is_clean).sum()),
            "noisy": int((ok & ~is_clean & ~off_topic).sum()),
            "off_topic": int(off_topic.sum()),
            "noisy_with_suggestion": int((ok & ~is_clean & (suggested >= 0)).sum()),
            "failed_by_reason": failure_reasons(failed_reasons),
        },
        "selection": selection_counts,
        "class_names": list(class_names),
        "zero_shot_accuracy_vs_given_labels": float((argmax_zs[ok] == labels[ok]).mean())
        if ok.any()
        else None,
    }
    truth_rows = ok & (true_labels >= 0)
    if truth_rows.any():
        truly_clean = labels[truth_rows] == true_labels[truth_rows]
        summary["zero_shot_accuracy_vs_true_labels"] = float(
            (argmax_zs[truth_rows] == true_labels[truth_rows]).mean()
        )
        summary["given_label_noise_rate"] = float(1.0 - truly_clean.mean())
        summary["detection"] = detection_metrics(
            is_clean[truth_rows],
            truly_clean,
            clean_score=np.nan_to_num(clean_score[truth_rows], nan=0.0),
        )
        wrong = truth_rows & (labels != true_labels)
        suggested_wrong = wrong & ~is_clean & (suggested >= 0)
        summary["suggestions"] = {
            "wrong_labels": int(wrong.sum()),
            "wrong_labels_with_suggestion": int(suggested_wrong.sum()),
            "suggestion_is_true_label": float(
                (suggested[suggested_wrong] == true_labels[suggested_wrong]).mean()
            )
            if suggested_wrong.any()
            else None,
            "wrong_labels_fixed_fraction": float((suggested[wrong] == true_labels[wrong]).mean())
            if wrong.any()
            else None,
        }
    return summary


def manifest_summary_columns(manifest: pa.Table, extra: list[str] = ()) -> dict[str, np.ndarray]:
    """SUMMARY_COLUMNS (and `extra` ones) of a manifest as arrays."""
    return {
        name: manifest.column(name).to_numpy(zero_copy_only=False)
        for name in [*SUMMARY_COLUMNS, *extra]
    }


def mixture_parameters(fitted: FittedSelection) -> dict:
    """The fitted mixtures per source, for the report's GMM curves (JSON-ready)."""
    out = {"gmm": fitted.spec.gmm, "sources": {}}
    for name, source in fitted.sources.items():
        out["sources"][name] = {
            "means": source.means.tolist(),
            "variances": source.variances.tolist(),
            "weights": source.weights.tolist(),
            "degenerate": source.degenerate.astype(bool).tolist(),
        }
    return out


def summary_with_fit(
    columns: Mapping[str, np.ndarray], fitted: FittedSelection | None, class_names
) -> dict:
    """`summarise`, plus the selection counts and mixtures of the fit when there was one."""
    summary = summarise(columns, fitted.counts() if fitted is not None else {}, class_names)
    if fitted is not None:
        summary["mixtures"] = mixture_parameters(fitted)
    return summary


def failure_reasons(reasons: np.ndarray) -> dict[str, int]:
    """Failure counts, one entry per distinct (stable) reason, most frequent first."""
    return group_reasons(reasons)
