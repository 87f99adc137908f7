"""The ensemble: each member's clean score turned into its rank among all usable samples
(an empirical CDF), averaged; clean when that mean rank is at least 1 - f, f the members'
mean clean fraction (docs/method.md, "Ensemble").

Ranks make scores of different scales comparable (CLIPCleaner's mean p(label), DeFT's
p_yes, CleanNet's cosine). The CDFs come from fixed-range histograms, which add up exactly
over the manifest's parts: the in-memory and the distributed fit calibrate alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

BINS = 4096
RANGES = {"clipcleaner": (0.0, 1.0), "deft": (0.0, 1.0), "cleannet": (-1.0, 1.0)}


def histogram(name: str, scores: np.ndarray) -> np.ndarray:
    """int64[BINS] counts of a member's finite scores over its fixed range (clipped)."""
    low, high = RANGES[name]
    values = np.asarray(scores, dtype=np.float64)
    values = np.clip(values[np.isfinite(values)], low, high)
    counts, _ = np.histogram(values, bins=BINS, range=(low, high))
    return counts.astype(np.int64)


@dataclass(frozen=True, eq=False)
class EnsembleCalibration:
    """Per member: its score histogram (the CDF) and how many samples it took as clean."""

    members: tuple[str, ...]
    counts: dict[str, np.ndarray]
    clean: dict[str, int]
    total: int

    @classmethod
    def from_parts(cls, members: tuple[str, ...], parts: list[dict]) -> EnsembleCalibration:
        """Sum of the parts' {"counts": {m: hist}, "clean": {m: n}, "total": n}."""
        counts = {m: np.zeros(BINS, dtype=np.int64) for m in members}
        clean = dict.fromkeys(members, 0)
        total = 0
        for part in parts:
            for m in members:
                counts[m] += part["counts"][m]
                clean[m] += int(part["clean"][m])
            total += int(part["total"])
        return cls(members, counts, clean, total)

    @property
    def clean_fraction(self) -> float:
        """Mean over members of the fraction each took as clean."""
        if self.total == 0:
            return 0.0
        return float(np.mean([self.clean[m] / self.total for m in self.members]))

    def rank(self, name: str, scores: np.ndarray) -> np.ndarray:
        """Empirical CDF of a member's scores (linear within a bin), in [0, 1]."""
        low, high = RANGES[name]
        counts = self.counts[name]
        total = max(int(counts.sum()), 1)
        below = np.concatenate([[0], np.cumsum(counts)[:-1]])
        position = (np.clip(np.asarray(scores, dtype=np.float64), low, high) - low) / (high - low)
        position *= BINS
        index = np.minimum(position.astype(np.int64), BINS - 1)
        within = position - index
        return ((below[index] + within * counts[index]) / total).astype(np.float32)

    def combine(self, scores: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(ensemble score = mean member rank, is_clean = score >= 1 - clean_fraction)."""
        ranks = np.mean([self.rank(m, scores[m]) for m in self.members], axis=0)
        return ranks.astype(np.float32), ranks >= 1.0 - self.clean_fraction

    def as_dict(self) -> dict:
        return {
            "members": list(self.members),
            "clean_fraction_target": self.clean_fraction,
            "rule": "mean of member score ranks >= 1 - mean member clean fraction",
        }


def part_statistics(members: tuple[str, ...], scores: Mapping[str, np.ndarray], clean) -> dict:
    """One manifest part's contribution to the calibration (usable rows only)."""
    return {
        "counts": {m: histogram(m, scores[m]) for m in members},
        "clean": {m: int(np.count_nonzero(clean[m])) for m in members},
        "total": len(next(iter(scores.values()))) if scores else 0,
    }
