"""clipcleaner: clean noisy image labels with CLIP (CLIPCleaner), from one machine to a Ray cluster.

The library is importable without a cluster; `jobs/` holds the Ray entry points.
"""

from cleaner.classes import ClassSpec
from cleaner.selection import (
    SelectionResult,
    SourceScores,
    label_issues,
    select_clean,
    select_clean_result,
    select_from_scores,
)

__all__ = [
    "ClassSpec",
    "SelectionResult",
    "SourceScores",
    "label_issues",
    "select_clean",
    "select_clean_result",
    "select_from_scores",
]
__version__ = "0.1.0"
