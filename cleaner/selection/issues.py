"""The selection as a ranked list of label issues, shaped as cleanlab users expect.

`label_issues(labels, zero_shot_probs, probe_probs=None, ...)` runs `select_clean_result`
(the same EM engine as the clean job) and returns one DataFrame row per sample, the
likeliest wrong labels first, with a suggested label for each: the suggestion rule of the
job's manifest (the top class of the mean of the zero-shot and probe probabilities, kept
when at least `suggest_min_confidence`; a clean sample keeps its given label).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from cleaner.selection.rules import DEFAULT_REG_COVAR, GmmMode
from cleaner.selection.select import select_clean_result

if TYPE_CHECKING:
    import pandas as pd

NO_SUGGESTION = -1
ISSUE_COLUMNS = (
    "is_label_issue",
    "label_quality",
    "given_label",
    "suggested_label",
    "suggested_confidence",
)


def suggestions(
    is_clean: np.ndarray,
    labels: np.ndarray,
    zero_shot_probs: np.ndarray,
    probe_probs: np.ndarray | None,
    min_confidence: float,
) -> tuple[np.ndarray, np.ndarray]:
    """(suggested label, its probability): the top class of the mean of the sources'
    (row-normalised) probabilities; NO_SUGGESTION below min_confidence; the given label
    for clean samples (as the manifest's suggested_label)."""
    combined = zero_shot_probs / zero_shot_probs.sum(axis=1, keepdims=True)
    if probe_probs is not None:
        combined = 0.5 * (combined + probe_probs / probe_probs.sum(axis=1, keepdims=True))
    top = combined.argmax(axis=1)
    confidence = combined[np.arange(len(top)), top]
    suggested = np.where(confidence >= min_confidence, top, NO_SUGGESTION)
    suggested = np.where(is_clean, labels, suggested)
    return suggested.astype(np.int64), confidence.astype(np.float64)


def label_issues(
    labels: np.ndarray,
    zero_shot_probs: np.ndarray,
    probe_probs: np.ndarray | None = None,
    *,
    theta_gmm: float = 0.5,
    theta_cons: float = 0.8,
    gmm: GmmMode = "per_class",
    reg_covar: float = DEFAULT_REG_COVAR,
    suggest_min_confidence: float = 0.5,
) -> pd.DataFrame:
    """Label issues of N samples as a pandas DataFrame, most likely wrong first.

    labels int[N]; zero_shot_probs / probe_probs float[N, K] (as `select_clean`, whose
    selection settings the keywords are). One row per sample, indexed by its position in
    the input; columns:

    - is_label_issue: not selected as clean (`~select_clean(...)`);
    - label_quality: the clean score, mean over the sources of p(given label);
    - given_label, suggested_label (-1: none confident enough), suggested_confidence.

    Rows are ordered issues first, then by label_quality ascending (ties: input order).
    Raises ValueError naming the problem for invalid input.
    """
    import pandas as pd

    if not 0.0 <= suggest_min_confidence <= 1.0:
        raise ValueError(f"suggest_min_confidence must be in [0, 1], got {suggest_min_confidence}")
    result = select_clean_result(
        labels,
        zero_shot_probs,
        probe_probs,
        theta_gmm=theta_gmm,
        theta_cons=theta_cons,
        gmm=gmm,
        reg_covar=reg_covar,
    )
    suggested, confidence = suggestions(
        result.is_clean,
        result.labels,
        np.asarray(zero_shot_probs, dtype=np.float64),
        None if probe_probs is None else np.asarray(probe_probs, dtype=np.float64),
        suggest_min_confidence,
    )
    quality = np.asarray(result.clean_score, dtype=np.float64)
    frame = pd.DataFrame(
        {
            "is_label_issue": ~result.is_clean,
            "label_quality": quality,
            "given_label": result.labels.astype(np.int64),
            "suggested_label": suggested,
            "suggested_confidence": confidence,
        }
    )
    order = np.lexsort((np.arange(len(quality)), quality, result.is_clean))
    return frame.iloc[order]
