"""What every detector gives for a batch of usable rows: the manifest contract's values
(is_clean, clean_score, a suggestion where it has one) and its own prefixed columns."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class DetectorOutput:
    """One detector's verdict on n usable rows."""

    is_clean: np.ndarray  # bool[n]
    clean_score: np.ndarray  # float32[n], higher = more likely clean (its AUROC score)
    suggested: np.ndarray | None = None  # int64[n], its own label suggestion (-1: none)
    confidence: np.ndarray | None = None  # float32[n], of the suggestion
    columns: dict[str, np.ndarray] = field(default_factory=dict)  # "<name>_..." columns

    def __post_init__(self) -> None:
        n = len(self.is_clean)
        arrays = {"clean_score": self.clean_score, **self.columns}
        if self.suggested is not None:
            arrays["suggested"] = self.suggested
        for name, values in arrays.items():
            if len(values) != n:
                raise ValueError(f"detector column {name} has {len(values)} rows, not {n}")


def softmax_rows(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of a float array (stable)."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    out = np.exp(shifted)
    out /= out.sum(axis=1, keepdims=True)
    return out
