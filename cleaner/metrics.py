"""Clean-sample detection metrics (positive class = clean), JSON-serialisable."""

from __future__ import annotations

import numpy as np


def _as_bool_vector(name: str, values: np.ndarray) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array, got shape {array.shape}")
    if array.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    if array.dtype == bool:
        return array
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ValueError(f"{name} must be boolean (or 0/1), got dtype {array.dtype}")
    if not np.isin(array, (0, 1)).all():
        raise ValueError(f"{name} must be boolean (or 0/1), got other values")
    return array.astype(bool)


def _ratio(numerator: int, denominator: int) -> float | None:
    return float(numerator / denominator) if denominator else None


def detection_metrics(
    is_clean_pred: np.ndarray,
    is_clean_true: np.ndarray,
    clean_score: np.ndarray | None = None,
) -> dict:
    """Precision, recall, F1, selected fraction, counts and AUROC of a clean selection.

    Positive = clean. Undefined ratios (e.g. precision of an empty selection) are None;
    auroc is None when clean_score is not given or the truth has only one class.
    All values are plain Python ints, floats or None.
    """
    pred = _as_bool_vector("is_clean_pred", is_clean_pred)
    truth = _as_bool_vector("is_clean_true", is_clean_true)
    if pred.shape != truth.shape:
        raise ValueError(
            f"shape mismatch: is_clean_pred has {pred.shape[0]} values but is_clean_true "
            f"has {truth.shape[0]}"
        )
    tp = int(np.count_nonzero(pred & truth))
    fp = int(np.count_nonzero(pred & ~truth))
    fn = int(np.count_nonzero(~pred & truth))
    tn = int(np.count_nonzero(~pred & ~truth))
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    if precision is None or recall is None:
        f1 = None
    elif precision + recall == 0:
        f1 = 0.0
    else:
        f1 = float(2 * precision * recall / (precision + recall))

    auroc: float | None = None
    if clean_score is not None:
        score = np.asarray(clean_score, dtype=np.float64)
        if score.ndim != 1 or score.shape[0] != truth.shape[0]:
            raise ValueError(
                f"shape mismatch: clean_score has shape {score.shape} but is_clean_true "
                f"has {truth.shape[0]} values"
            )
        if not np.isfinite(score).all():
            raise ValueError("clean_score contains NaN or inf")
        if 0 < tp + fn < truth.shape[0]:
            from sklearn.metrics import roc_auc_score  # lazily: Ray workers rarely need it

            auroc = float(roc_auc_score(truth, score))

    num_samples = int(truth.shape[0])
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "selected_fraction": float((tp + fp) / num_samples),
        "true_clean_fraction": float((tp + fn) / num_samples),
        "num_samples": num_samples,
        "num_selected": tp + fp,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
        "auroc": auroc,
    }
