"""The mixture maths of cleaner/selection/em.py, each function against an independent
computation: exact integer sums, np.rint rounding, a clipped log-likelihood, the M-step's
formulas, and the per-class top-m order written as a plain sort."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cleaner.selection import em


def python_sums(groups: np.ndarray, terms: np.ndarray, num_groups: int) -> list[list[int]]:
    sums = [[0] * terms.shape[1] for _ in range(num_groups)]
    for g, row in zip(groups.tolist(), terms.tolist(), strict=True):
        for c, value in enumerate(row):
            sums[g][c] += value
    return sums


@pytest.mark.parametrize("chunk_rows", [em.MAX_EXACT_ROWS, 3])
def test_exact_group_sums_equal_integer_sums_in_any_chunking(monkeypatch, chunk_rows):
    """hi * 2^24 + lo summed per group is the exact integer sum, for odd and negative
    fixed-point terms, whole or in chunks of 3 rows (the chunks of MAX_EXACT_ROWS rows)."""
    monkeypatch.setattr(em, "MAX_EXACT_ROWS", chunk_rows)
    rng = np.random.default_rng(0)
    terms = rng.integers(-(2**51), 2**51, size=(11, 2), dtype=np.int64) | 1  # odd: the low bit
    groups = rng.integers(0, 3, 11)
    out = em.exact_group_sums(groups, terms, 3)
    assert out.dtype == np.int64 and out.shape == (2, 3, 2)
    combined = [
        [int(out[0, g, c]) * 2**em.SPLIT_BITS + int(out[1, g, c]) for c in range(2)]
        for g in range(3)
    ]
    assert combined == python_sums(groups, terms, 3)
    assert (out[1] >= 0).all()  # the lo parts are non-negative
    bits = np.array([em.STAT_BITS, em.LOGLIK_BITS])
    expected = np.array(python_sums(groups, terms, 3), dtype=object)
    total = em.combine_exact_sums(out[None], bits)
    for g in range(3):
        for c in range(2):
            assert total[g, c] == math.ldexp(float(expected[g, c]), -int(bits[c]))


@pytest.mark.parametrize(("bits", "signed"), [(40, False), (28, True), (28, False)])
def test_round_to_grid_is_rint_on_its_documented_range(bits, signed):
    """Every value of the documented range rounds as np.rint at 2^-bits, ties to even."""
    rng = np.random.default_rng(bits)
    if signed:
        span = 2.0 ** (51 - bits)
        values = rng.uniform(-span, span, 20_000)
    else:
        values = rng.uniform(0, 2.0 ** (52 - bits), 20_000)
    values = np.concatenate((values, rng.uniform(0, 1, 1_000)))
    step = math.ldexp(1.0, -bits)
    ties = np.array([3.0 + 0.5 * step, 3.0 + 1.5 * step, 1000.0 + 2.5 * step])  # to even
    values = np.concatenate((values, ties, -ties if signed else ties))
    expected = np.ldexp(np.rint(np.ldexp(values, bits)), -bits)
    np.testing.assert_array_equal(em.round_to_grid(values.copy(), bits, signed), expected)
    # the default is unsigned: a value beyond the signed range still rounds at 2^-40
    beyond = np.array([3000.0 + math.ldexp(1.0, -40)])
    assert em.round_to_grid(beyond.copy(), 40)[0] == beyond[0]


def params_with_loglik(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x and mixture params whose log-likelihood is exactly `values`: component 0 sits on
    x (diff 0) with constant = value; component 1 is e^-(10^9) below it."""
    n = values.shape[0]
    x = np.full(n, 0.25)
    params = np.stack((x, np.ones(n), values, np.full(n, 0.75), np.ones(n), values - 1e9)).astype(
        np.float64
    )
    return x, params


def test_estep_loglik_is_clipped_then_rounded_once_at_its_own_grid():
    step = math.ldexp(1.0, -em.LOGLIK_BITS)
    inside = np.array(
        [
            -1000.0 - 1.5 * step + math.ldexp(1.0, -42),  # rounded once: one step down
            -1000.0 - 0.625 * step,  # a rounding at 2^-29 would leave half a step
            12.0 + 0.375 * step,
            -(2.0**19) - 0.625 * step,  # far below zero: an unsigned rounding is off
        ]
    )
    limit = em.LOGLIK_LIMIT
    values = np.concatenate((inside, [-(2.0**30), 2.0**30, -limit, limit]))
    x, params = params_with_loglik(values)
    terms = em.estep_terms(x, params)
    clipped = np.clip(values, -limit, limit)
    expected = np.ldexp(np.rint(np.ldexp(clipped, em.LOGLIK_BITS)), -em.LOGLIK_BITS)
    np.testing.assert_array_equal(terms[6], expected)
    assert terms[6][4] == -limit and terms[6][5] == limit
    # the responsibilities: component 0 carries every sample, r0 x = 0.25, r0 x^2 = 1/16
    np.testing.assert_array_equal(terms[0], 1.0)
    np.testing.assert_array_equal(terms[1:3], [[0.25] * 8, [0.0625] * 8])
    np.testing.assert_array_equal(terms[3:6], 0.0)


def test_estep_of_no_rows_is_empty():
    terms = em.estep_terms(np.empty(0), np.empty((6, 0)))
    assert terms.shape == (7, 0)


def test_m_step_formulas_and_an_empty_component():
    """means = sum r x / n_k, variances = (sum r x^2 - 2 mean sum r x + mean^2 n_k) / n_k
    + reg, weights = n_k / n (n_k with sklearn's 10 eps), per group; an empty component
    keeps a positive weight of 10 eps / n."""
    sums = np.array(
        [
            [4.0, 2.0, 1.5, 6.0, 4.5, 3.6],  # group 0: both components
            [0.0, 0.0, 0.0, 3.0, 1.5, 0.9],  # group 1: component 0 empty
        ]
    )
    reg = 1e-6
    means, variances, weights = em.m_step(sums, reg)
    eps = em.MIN_COMPONENT_MASS
    nk = sums[:, [0, 3]] + eps
    np.testing.assert_allclose(means, sums[:, [1, 4]] / nk, rtol=1e-15)
    spread = sums[:, [2, 5]] - 2 * means * sums[:, [1, 4]] + means**2 * sums[:, [0, 3]]
    np.testing.assert_allclose(variances, spread / nk + reg, rtol=1e-12)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-15)
    np.testing.assert_allclose(weights, nk / nk.sum(axis=1, keepdims=True), rtol=1e-15)
    assert weights[1, 0] > 0 and weights[1, 0] == pytest.approx(eps / (3.0 + 2 * eps))
    assert means[1, 0] == 0.0 and variances[1, 0] == reg


def top_m_reference(labels, scores, keys, m) -> list[int]:
    rows = list(range(len(labels)))
    if keys is None:
        rows.sort(key=lambda i: (labels[i], -scores[i], i))
    else:
        rows.sort(key=lambda i: (labels[i], -scores[i], keys[i], i))
    out, taken = [], {}
    for i in rows:
        if taken.get(labels[i], 0) < m:
            out.append(i)
            taken[labels[i]] = taken.get(labels[i], 0) + 1
    return out


@pytest.mark.parametrize("with_keys", [True, False])
@pytest.mark.parametrize("m", [0, 1, 3, 50])
def test_top_m_per_class_is_a_plain_sort(with_keys, m):
    """Best m per class: labels ascending, score descending, then key ascending (then input
    order): 600 rows, 7 classes, scores with many ties, keys with repeats and out of order."""
    rng = np.random.default_rng(m)
    labels = rng.integers(0, 7, 600)
    scores = rng.integers(0, 4, 600).astype(np.float64) / 4
    keys = rng.permutation(np.repeat(np.arange(300), 2)).astype(str).astype(object)
    keys = keys if with_keys else None
    got = em.top_m_per_class(labels, scores, keys, m)
    assert got.tolist() == top_m_reference(labels, scores, keys, m)


def test_top_m_per_class_of_one_row_and_of_none():
    one = em.top_m_per_class(np.array([2]), np.array([0.5]), None, 1)
    assert one.tolist() == [0]
    assert em.top_m_per_class(np.array([2]), np.array([0.5]), None, 0).tolist() == []
    assert em.top_m_per_class(np.empty(0, np.int64), np.empty(0), None, 3).tolist() == []


def otsu_reference(histogram: np.ndarray) -> float:
    """The textbook Otsu split of one histogram: the first t maximising w0 w1 (mu0 - mu1)^2
    over bin centres, both sides non-empty; as the lower edge t / B of the upper side."""
    b = len(histogram)
    centres = (np.arange(b) + 0.5) / b
    if histogram.sum() == 0:
        return 0.5
    best, best_t = -1.0, 1
    for t in range(1, b):
        w0, w1 = histogram[:t].sum(), histogram[t:].sum()
        if w0 == 0 or w1 == 0:
            continue
        mu0 = (histogram[:t] * centres[:t]).sum() / w0
        mu1 = (histogram[t:] * centres[t:]).sum() / w1
        between = w0 * w1 * (mu0 - mu1) ** 2
        if between > best * (1 + 1e-12):
            best, best_t = between, t
    return best_t / b


def test_otsu_threshold_is_the_textbook_split():
    """Sparse and dense histograms (empty bins at either end, one-sample sides, one
    non-empty bin, none): the split maximises the between-class variance."""
    rng = np.random.default_rng(5)
    dense = rng.integers(0, 50, size=(40, 16))
    sparse = rng.integers(0, 3, size=(40, 16)) * (rng.random((40, 16)) < 0.3)
    crafted = np.zeros((5, 16), dtype=np.int64)
    crafted[0, [3, 9, 15]] = [4, 4, 1]  # the best split leaves one sample above
    crafted[1, 7] = 5  # one non-empty bin: no split has two sides
    crafted[3, [0, 15]] = [1, 1]
    crafted[4, [2, 3, 12]] = [1, 1, 1]
    histograms = np.concatenate((dense, sparse, crafted))
    got = em.otsu_threshold(histograms)
    expected = [otsu_reference(h) for h in histograms]
    np.testing.assert_allclose(got, expected)
    assert got[-3] == 0.5  # the empty histogram (crafted row 2)
    assert got[-4] == 1 / 16  # one non-empty bin: the first split
