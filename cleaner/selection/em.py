"""The maths of the 2-component 1-D Gaussian mixtures: E-step terms, exact sums, M-step.

Numpy only, no data movement: `cleaner.selection.engine` runs these on any partition of
the rows. The E-step terms are rounded to fixed point and summed exactly
(`exact_group_sums`, `grouped.segment_exact_sums`), so any partition gives bit-identical
sums (see engine.py).
"""

from __future__ import annotations

import math

import numpy as np

# Fixed-point accumulation (see the module docstring).
STAT_BITS = 40  # r, r*x, r*x^2 in [0, 1]: multiples of 2^-40


LOGLIK_BITS = 28  # log-likelihood terms, |ll| <= LOGLIK_LIMIT: multiples of 2^-28


# log-likelihoods are clipped here: never reached for x in [0, 1] with reg_covar >= 1e-6
# (|log N| <= 0.5 / reg_covar + 40); 2^20 * 2^28 < 2^52 keeps the terms exact
LOGLIK_LIMIT = 2.0**20


SPLIT_BITS = 24  # terms are split into hi / lo parts so float64 bincounts stay exact


MAX_EXACT_ROWS = 1 << 28  # rows per bincount for exact float64 sums of < 2^24 values


TERM_BITS = np.array([STAT_BITS] * 6 + [LOGLIK_BITS], dtype=np.int64)


MIN_COMPONENT_MASS = 10 * np.finfo(np.float64).eps  # as sklearn's mixtures


LOG_2PI = math.log(2.0 * math.pi)


def exact_group_sums(groups: np.ndarray, terms: np.ndarray, num_groups: int) -> np.ndarray:
    """int64[2, G, C]: exact per-group sums of fixed-point terms, as hi and lo parts.

    terms int64[n, C] (|value| < 2^52); value = hi * 2^SPLIT_BITS + lo with lo in
    [0, 2^SPLIT_BITS). Both parts are summed with float64 bincounts whose partial sums
    stay below 2^53, so they are exact, and so is any sum of these outputs.
    """
    hi = terms >> SPLIT_BITS
    lo = terms & ((1 << SPLIT_BITS) - 1)
    out = np.zeros((2, num_groups, terms.shape[1]), dtype=np.int64)
    for start in range(0, terms.shape[0], MAX_EXACT_ROWS):
        rows = slice(start, start + MAX_EXACT_ROWS)
        for column in range(terms.shape[1]):
            for part, values in enumerate((hi, lo)):
                out[part, :, column] += np.bincount(
                    groups[rows], weights=values[rows, column], minlength=num_groups
                ).astype(np.int64)
    return out


def combine_exact_sums(parts: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """float64[G, C] from stacked `exact_group_sums` outputs int64[B, 2, G, C]."""
    hi = parts[:, 0].sum(axis=0)
    lo = parts[:, 1].sum(axis=0)
    total = np.ldexp(hi.astype(np.float64), SPLIT_BITS) + lo.astype(np.float64)
    return np.ldexp(total, -bits)


def to_fixed_point(values: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """int64 multiples of 2^-bits nearest to values (bits broadcast over the last axis)."""
    return np.rint(np.ldexp(values, bits)).astype(np.int64)


def mixture_table(means: np.ndarray, variances: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """float64[6, G]: per mixture, mean, variance and log w - (log 2 pi + log variance) / 2
    of component 0, then of component 1. Index its columns by each sample's mixture
    (`table[:, groups]`, or np.repeat over grouped rows) for `log_posteriors`."""
    constant = np.log(weights) - 0.5 * (LOG_2PI + np.log(variances))
    return np.stack(
        (means[:, 0], variances[:, 0], constant[:, 0], means[:, 1], variances[:, 1], constant[:, 1])
    )


def _component_log_prob(
    x: np.ndarray, mean: np.ndarray, variance: np.ndarray, constant: np.ndarray
) -> np.ndarray:
    """float64[n]: log w + log N(x | mean, variance) of one component, per sample."""
    diff = x - mean
    out = 0.5 * diff
    out *= diff
    out /= variance
    return np.subtract(constant, out, out=out)


def log_posteriors(x: np.ndarray, params: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(log w_0 N_0, log w_1 N_1, log-likelihood), float64[n] each, of each sample's
    2-component mixture (params: float64[6, n], its `mixture_table` column); the
    responsibility of component c is exp(log w_c N_c - log-likelihood).

    The log-sum-exp keeps only one exp: the larger term's exp(0) is 1 exactly, so
    log(exp(a - top) + exp(b - top)) = log(1 + exp(min - top)), the same float.
    """
    first = _component_log_prob(x, params[0], params[1], params[2])
    second = _component_log_prob(x, params[3], params[4], params[5])
    top = np.maximum(first, second)
    other = np.minimum(first, second)
    other -= top
    np.exp(other, out=other)
    other += 1.0
    np.log(other, out=other)
    return first, second, np.add(top, other, out=other)


def round_to_grid(values: np.ndarray, bits: int, signed: bool = False) -> np.ndarray:
    """values rounded in place to the nearest multiple of 2^-bits, ties to even: the
    floats of to_fixed_point(values, bits) * 2^-bits, without integers.

    Adding and then subtracting C = 2^(52 - bits) (1.5 C for signed values) lets the
    float64 addition round at the 2^-bits place; exact for 0 <= values < 2^(52 - bits)
    (|values| < 2^(51 - bits) when signed), and its ties go to the even multiple, as
    np.rint's do.
    """
    magic = math.ldexp(1.5 if signed else 1.0, 52 - bits)
    values += magic
    values -= magic
    return values


def estep_terms(x: np.ndarray, params: np.ndarray) -> np.ndarray:
    """float64[7, n]: r0, r0 x, r0 x^2, r1, r1 x, r1 x^2 rounded to multiples of 2^-40 and
    the log-likelihood (clipped at +-LOGLIK_LIMIT) to multiples of 2^-28, the E-step
    terms of each sample (params as `log_posteriors`), one row per term."""
    first, second, loglik = log_posteriors(x, params)
    terms = np.empty((7, x.shape[0]))
    for c, log_prob in enumerate((first, second)):
        r = terms[3 * c]
        np.exp(np.subtract(log_prob, loglik, out=log_prob), out=r)
        np.multiply(r, x, out=terms[3 * c + 1])
        np.multiply(terms[3 * c + 1], x, out=terms[3 * c + 2])  # (r x) x
    if loglik.size and not -LOGLIK_LIMIT <= loglik.min() <= loglik.max() <= LOGLIK_LIMIT:
        np.clip(loglik, -LOGLIK_LIMIT, LOGLIK_LIMIT, out=loglik)
    terms[6] = loglik
    round_to_grid(terms[:6], STAT_BITS)  # r, r x, r x^2 are in [0, 1]
    round_to_grid(terms[6], LOGLIK_BITS, signed=True)
    return terms


def m_step(sums: np.ndarray, reg_covar: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(means, variances, weights) float64[G, 2] from the E-step sums float64[G, 7]."""
    mass = sums[:, [0, 3]]
    first = sums[:, [1, 4]]
    second = sums[:, [2, 5]]
    nk = mass + MIN_COMPONENT_MASS
    means = first / nk
    spread = np.maximum(second - 2.0 * means * first + means * means * mass, 0.0)
    variances = spread / nk + reg_covar
    weights = nk / nk.sum(axis=1, keepdims=True)
    return means, variances, weights


def otsu_threshold(histogram: np.ndarray) -> np.ndarray:
    """float64[G]: each histogram's Otsu split (the 2-means threshold that maximises the
    between-class variance of the bin centres), as the lower edge of its first upper bin.

    Both sides of the split are non-empty whenever two bins are. Groups with an empty
    histogram get 0.5 (they are never fitted)."""
    b = histogram.shape[1]
    counts = histogram.astype(np.float64)
    centres = (np.arange(b) + 0.5) / b
    total = counts.sum(axis=1, keepdims=True)
    below = np.cumsum(counts, axis=1)[:, :-1]  # mass of bins [0, t) for t = 1 .. B-1
    below_sum = np.cumsum(counts * centres, axis=1)[:, :-1]
    overall_mean = (counts * centres).sum(axis=1, keepdims=True) / np.maximum(total, 1.0)
    above = total - below
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (overall_mean * below - below_sum) ** 2 / (below * above)
    between = np.where((below > 0) & (above > 0), between, -1.0)
    split = np.argmax(between, axis=1) + 1  # first bin of the upper component
    return np.where(total[:, 0] > 0, split / b, 0.5)


def top_m_per_class(
    labels: np.ndarray, scores: np.ndarray, keys: np.ndarray | None, m: int
) -> np.ndarray:
    """Indices of the best m rows per class (score descending, then key ascending).

    Returned grouped by class (ascending) and, within a class, best first. Without keys,
    ties keep their input order.
    """
    order = np.arange(labels.shape[0])
    if keys is not None:
        order = order[np.argsort(keys, kind="stable")]
    order = order[np.argsort(-scores[order], kind="stable")]
    order = order[np.argsort(labels[order], kind="stable")]
    sorted_labels = labels[order]
    n = sorted_labels.shape[0]
    if n == 0:
        return order
    starts = np.flatnonzero(np.concatenate(([True], sorted_labels[1:] != sorted_labels[:-1])))
    segment_start = np.repeat(starts, np.diff(np.concatenate((starts, [n]))))
    return order[np.arange(n) - segment_start < m]
