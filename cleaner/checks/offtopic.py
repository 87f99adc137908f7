"""Off-topic images: samples whose image fits none of the classes (docs/checks.md).

The rule is fitted on the run's own score distribution, as the selection is: a
2-component 1-D Gaussian mixture over one per-image score (the zero-shot `max_p` by
default, or `max_similarity`, the best cosine between the image and any class prompt).
The mixture is fitted on a fixed-range histogram, so per-shard histograms add up exactly
and a fit over millions of rows on Ray sees only BINS counts. The low component is the
off-topic one, and only when the split is real: the components are separated (Ashman's D
>= min_separation) and the low one is the minority (weight <= max_weight). Otherwise the
rule is inactive and flags nothing. A sample is off-topic when its posterior of the low
component is >= 0.5 and its score is below the high component's mean.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import numpy as np

from cleaner.selection.em import otsu_threshold

BINS = 1024
SCORE_RANGES = {"max_p": (0.0, 1.0), "max_similarity": (-1.0, 1.0)}
MIN_SEPARATION = 2.0  # Ashman's D: 2 separates two Gaussians cleanly
MAX_WEIGHT = 0.5  # off-topic images are the minority of a dataset
MIN_SAMPLES = 200  # a mixture over fewer scores is no evidence: the rule stays inactive


def score_histogram(values: np.ndarray, score: str) -> np.ndarray:
    """int64[BINS]: counts of the finite `values` over the score's fixed range."""
    low, high = SCORE_RANGES[score]
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    bins = np.clip(((values - low) / (high - low) * BINS).astype(np.int64), 0, BINS - 1)
    return np.bincount(bins, minlength=BINS).astype(np.int64)


@dataclass(frozen=True)
class OffTopicRule:
    """A fitted off-topic rule: the mixture (low component first) and whether it flags."""

    score: str
    means: tuple[float, float]
    variances: tuple[float, float]
    weights: tuple[float, float]
    separation: float
    active: bool
    samples: int

    def posterior(self, values: np.ndarray) -> np.ndarray:
        """float64: posterior of the off-topic (low) component; NaN where values are."""
        x = np.asarray(values, dtype=np.float64)[:, None]
        means, variances = np.asarray(self.means), np.asarray(self.variances)
        log_p = (
            np.log(np.maximum(np.asarray(self.weights), 1e-300))
            - 0.5 * np.log(2 * math.pi * variances)
            - 0.5 * (x - means) ** 2 / variances
        )
        log_p -= log_p.max(axis=1, keepdims=True)
        p = np.exp(log_p)
        return p[:, 0] / p.sum(axis=1)

    def flag(self, values: np.ndarray) -> np.ndarray:
        """bool: off-topic samples (none when the rule is inactive)."""
        values = np.asarray(values, dtype=np.float64)
        if not self.active:
            return np.zeros(values.shape[0], dtype=bool)
        with np.errstate(invalid="ignore"):
            return (self.posterior(values) >= 0.5) & (values < self.means[1])

    def as_dict(self) -> dict:
        """JSON-shaped: tuples become lists, so a summary read back from disk compares equal."""
        return json.loads(json.dumps(asdict(self)))


def fit_off_topic(
    histogram: np.ndarray,
    score: str = "max_p",
    *,
    min_separation: float = MIN_SEPARATION,
    max_weight: float = MAX_WEIGHT,
    min_samples: int = MIN_SAMPLES,
    max_iter: int = 500,
    tol: float = 1e-7,
) -> OffTopicRule:
    """The off-topic rule fitted by EM on a score histogram (counts per bin centre),
    started from the histogram's Otsu split; the variance floor is one bin width squared."""
    low, high = SCORE_RANGES[score]
    counts = np.asarray(histogram, dtype=np.float64)
    total = counts.sum()
    width = (high - low) / BINS
    centres = low + (np.arange(BINS) + 0.5) * width
    floor = width * width
    if total < 2 or np.count_nonzero(counts) < 2:
        mean = float((counts * centres).sum() / max(total, 1.0))
        return OffTopicRule(score, (mean, mean), (floor, floor), (0.0, 1.0), 0.0, False, int(total))
    split = min(BINS - 1, round(float(otsu_threshold(counts[None])[0]) * BINS))
    resp = np.stack([centres < centres[split], centres >= centres[split]], axis=1).astype(float)
    previous = -np.inf
    for _ in range(max_iter):
        mass = (counts[:, None] * resp).sum(axis=0) + 1e-12
        means = (counts[:, None] * resp * centres[:, None]).sum(axis=0) / mass
        variances = (counts[:, None] * resp * (centres[:, None] - means) ** 2).sum(axis=0) / mass
        variances = variances + floor
        weights = mass / mass.sum()
        log_p = (
            np.log(np.maximum(weights, 1e-300))
            - 0.5 * np.log(2 * math.pi * variances)
            - 0.5 * (centres[:, None] - means) ** 2 / variances
        )
        top = log_p.max(axis=1, keepdims=True)
        log_norm = top[:, 0] + np.log(np.exp(log_p - top).sum(axis=1))
        resp = np.exp(log_p - log_norm[:, None])
        loglik = float((counts * log_norm).sum() / total)
        if abs(loglik - previous) < tol:
            break
        previous = loglik
    order = np.argsort(means)
    means, variances, weights = means[order], variances[order], weights[order]
    separation = float(
        math.sqrt(2.0) * abs(means[1] - means[0]) / math.sqrt(variances[0] + variances[1])
    )
    active = separation >= min_separation and weights[0] <= max_weight and total >= min_samples
    return OffTopicRule(
        score,
        (float(means[0]), float(means[1])),
        (float(variances[0]), float(variances[1])),
        (float(weights[0]), float(weights[1])),
        separation,
        bool(active),
        int(total),
    )
