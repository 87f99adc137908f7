"""Clean-sample selection (docs/method.md, "Linear probe" and "Selection"): the EM engine, the library API, the
linear probe, the in-memory and Ray Data fits of the job, and the manifest.

The library API is re-exported here (as before the package split):
`from cleaner.selection import select_clean`.
"""

from cleaner.selection.issues import label_issues
from cleaner.selection.rules import (
    DEFAULT_REG_COVAR,
    DIVIDEMIX_REG_COVAR,
    SelectionResult,
    SourceScores,
    SourceSelection,
)
from cleaner.selection.select import select_clean, select_clean_result, select_from_scores

__all__ = [
    "DEFAULT_REG_COVAR",
    "DIVIDEMIX_REG_COVAR",
    "SelectionResult",
    "SourceScores",
    "SourceSelection",
    "label_issues",
    "select_clean",
    "select_clean_result",
    "select_from_scores",
]
