"""The EM engine's selection, bit for bit, against a straightforward per-class reference.

`reference_fit` below is the engine's algorithm written the plain way: one class at a time,
every pass over that class's samples in a Python loop of numpy calls, exact sums as Python
integers. It shares only constants with `cleaner` (the fixed-point bits, the floors).
The engine runs the same algorithm vectorised over all classes at once, on a class-grouped
layout, skipping converged classes and moving only the samples that change side in the
Lloyd passes; any change to which samples are selected (or to a fitted parameter, or an
iteration count) fails here. Per class:

1. loss score: log p(label) (clipped at LOG_EPSILON) min-max normalised in the class;
   a class whose range is <= DEGENERATE_RANGE is not fitted (p_clean 1);
2. start: 256-bin histogram, Otsu split, then Lloyd passes (threshold to the midpoint of
   the two sides' means) until the lower side keeps its count; M-step of that split;
3. EM to |mean log-likelihood change| < tol (at most max_iter), sums of the per-sample
   terms rounded to multiples of 2^-40 (2^-28 for log-likelihoods) and added exactly;
4. p_clean = posterior of the larger-mean component.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from cleaner.selection.em import LOGLIK_BITS, LOGLIK_LIMIT, MIN_COMPONENT_MASS, STAT_BITS
from cleaner.selection.rules import DEGENERATE_RANGE, LOG_EPSILON, SourceScores
from cleaner.selection.select import fit_selection_in_memory, select_from_scores

BINS = 256
LLOYD_MAX_ITER = 100
LOG_2PI = math.log(2.0 * math.pi)


def exact_sum(values: np.ndarray, bits: int) -> float:
    """The sum of values rounded to multiples of 2^-bits, added exactly, as one float."""
    fixed = np.rint(np.ldexp(values, bits)).astype(np.int64)
    total = int(fixed.astype(object).sum())  # Python integers: exact
    return math.ldexp(float(total), -bits)


def otsu(x: np.ndarray) -> float:
    counts = np.bincount(np.minimum((x * BINS).astype(np.int64), BINS - 1), minlength=BINS)
    counts = counts.astype(np.float64)
    centres = (np.arange(BINS) + 0.5) / BINS
    total = counts.sum()
    below = np.cumsum(counts)[:-1]
    below_sum = np.cumsum(counts * centres)[:-1]
    overall_mean = (counts * centres).sum() / max(total, 1.0)
    above = total - below
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (overall_mean * below - below_sum) ** 2 / (below * above)
    between = np.where((below > 0) & (above > 0), between, -1.0)
    return (np.argmax(between) + 1) / BINS


def m_step(s: list[float], reg_covar: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mass = np.array([s[0], s[3]])
    first = np.array([s[1], s[4]])
    second = np.array([s[2], s[5]])
    nk = mass + MIN_COMPONENT_MASS
    means = first / nk
    spread = np.maximum(second - 2.0 * means * first + means * means * mass, 0.0)
    return means, spread / nk + reg_covar, nk / (nk[0] + nk[1])


def posterior(x, means, variances, weights) -> tuple[np.ndarray, np.ndarray]:
    """(responsibilities [n, 2], log-likelihood [n]) of one mixture."""
    constant = np.log(weights) - 0.5 * (LOG_2PI + np.log(variances))
    diff = x[:, None] - means[None, :]
    log_prob = constant[None, :] - 0.5 * diff * diff / variances[None, :]
    top = log_prob.max(axis=1)
    loglik = top + np.log(np.exp(log_prob[:, 0] - top) + np.exp(log_prob[:, 1] - top))
    return np.exp(log_prob - loglik[:, None]), loglik


def split_sums(x: np.ndarray, threshold: float) -> list[float]:
    upper = x >= threshold
    sums = []
    for side in (~upper, upper):
        r = side.astype(np.float64)
        sums += [
            exact_sum(r, STAT_BITS),
            exact_sum(r * x, STAT_BITS),
            exact_sum(r * x * x, STAT_BITS),
        ]
    return [*sums, 0.0]


def fit_class(x: np.ndarray, max_iter: int, tol: float, reg_covar: float) -> dict:
    """One class's mixture: the split start, then EM (see the module docstring)."""
    threshold, previous = otsu(x), -1.0
    for _ in range(LLOYD_MAX_ITER):
        sums = split_sums(x, threshold)
        if sums[0] == previous:
            break
        previous = sums[0]
        mass = np.maximum([sums[0], sums[3]], MIN_COMPONENT_MASS)
        threshold = 0.5 * (sums[1] / mass[0] + sums[4] / mass[1])
    means, variances, weights = m_step(sums, reg_covar)
    lower_bound, n_iter = -np.inf, 0
    for _ in range(max_iter):
        resp, loglik = posterior(x, means, variances, weights)
        sums = []
        for c in range(2):
            r = resp[:, c]
            sums += [
                exact_sum(r, STAT_BITS),
                exact_sum(r * x, STAT_BITS),
                exact_sum(r * x * x, STAT_BITS),
            ]
        sums.append(exact_sum(np.clip(loglik, -LOGLIK_LIMIT, LOGLIK_LIMIT), LOGLIK_BITS))
        means, variances, weights = m_step(sums, reg_covar)
        n_iter += 1
        bound = sums[6] / max(x.shape[0], 1)
        if abs(bound - lower_bound) < tol:
            break
        lower_bound = bound
    return {"means": means, "variances": variances, "weights": weights, "n_iter": n_iter}


def reference_fit(
    labels: np.ndarray,
    p_label: np.ndarray,
    num_classes: int,
    max_iter: int = 100,
    tol: float = 1e-3,
    reg_covar: float = 1e-6,
) -> tuple[dict[int, dict], np.ndarray]:
    """Per fitted class its mixture; and p_clean per sample (1 outside every fit)."""
    log_p = np.log(np.clip(p_label.astype(np.float64), LOG_EPSILON, None))
    p_clean = np.ones(labels.shape[0])
    fits = {}
    for k in range(num_classes):
        rows = np.flatnonzero(labels == k)
        if rows.size == 0:
            continue
        low, high = log_p[rows].min(), log_p[rows].max()
        if high - low <= DEGENERATE_RANGE:
            continue
        x = np.clip((log_p[rows] - low) / (high - low), 0.0, 1.0)
        fit = fits[k] = fit_class(x, max_iter, tol, reg_covar)
        resp, _ = posterior(x, fit["means"], fit["variances"], fit["weights"])
        p_clean[rows] = resp[:, int(np.argmax(fit["means"]))]
    return fits, p_clean


def score_table(seed: int, n: int, k: int) -> tuple[np.ndarray, dict[str, SourceScores]]:
    """Labels and two sources' (p_label, max_p): per-class noise rates, beta scores, a
    class with one distinct score (degenerate), an absent class, a one-sample class."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k - 2, n)
    labels[:1] = k - 2  # a one-sample class; class k - 1 is absent
    noise = rng.uniform(0.05, 0.6, k)
    noisy = rng.random(n) < noise[labels]
    sources = {}
    for name, clean in (("zeroshot", (5.0, 1.5)), ("probe", (8.0, 1.2))):
        p = np.where(noisy, rng.beta(1.2, 6.0, n), rng.beta(*clean, n)).astype(np.float32)
        p[labels == 3] = 0.25  # degenerate: one distinct score
        max_p = np.maximum(p, rng.uniform(0.2, 1.0, n).astype(np.float32))
        sources[name] = SourceScores(p_label=p, max_p=max_p)
    return labels, sources


@pytest.mark.parametrize("seed", [0, 1])
def test_engine_fit_is_bit_identical_to_the_per_class_reference(seed: int) -> None:
    k = 24
    labels, sources = score_table(seed, 30_000, k)
    fitted, _ = fit_selection_in_memory(labels, k, sources, chunk_rows=4096)
    result = select_from_scores(labels, k, sources, chunk_rows=4096)
    iterations = []
    for name, scores in sources.items():
        fits, p_clean = reference_fit(labels, scores.p_label, k)
        source = fitted.sources[name]
        assert sorted(fits) == [c for c in range(k) if c not in (3, k - 2, k - 1)]
        for c, fit in fits.items():
            for field in ("means", "variances", "weights"):
                np.testing.assert_array_equal(
                    getattr(source, field)[c], fit[field], err_msg=f"{name} {c} {field}"
                )
            assert source.n_iter[c] == fit["n_iter"], (name, c)
            iterations.append(fit["n_iter"])
        np.testing.assert_array_equal(result.sources[name].gmm_p_clean, p_clean)
    # the classes stop at different iterations: converged ones are dropped mid-fit
    assert len(set(iterations)) >= 3, iterations
