"""Label-noise injection: measured change rates, where flips go, validation."""

from __future__ import annotations

import numpy as np
import pytest

from cleaner.noise import (
    CIFAR10_ASYMMETRIC,
    asymmetric_noise,
    changed_fraction,
    hard_noise,
    inject_noise,
    instance_dependent_noise,
    symmetric_noise,
)

NUM_SAMPLES = 20_000
K = 10
RATE = 0.4
# Binomial standard deviation of a change fraction near 0.4 on 20000 samples is ~0.0035.
TOLERANCE = 0.02
MOST_SIMILAR = np.array([1, 0, 3, 2, 8, 6, 5, 0, 2, 7])  # the demo spec's similar_to
FEATURES = np.random.default_rng(321).standard_normal((NUM_SAMPLES, 48))


@pytest.fixture
def true_labels() -> np.ndarray:
    return np.random.default_rng(123).permutation(np.arange(NUM_SAMPLES) % K)


def test_symmetric_change_rate_and_uniform_targets(true_labels):
    original = true_labels.copy()
    noisy = symmetric_noise(true_labels, RATE, K, np.random.default_rng(0))
    np.testing.assert_array_equal(true_labels, original)  # input untouched
    assert noisy.dtype == np.int64
    assert changed_fraction(true_labels, noisy) == pytest.approx(RATE * (K - 1) / K, abs=TOLERANCE)
    # Every wrong class is about equally likely, from every true class.
    changed = noisy != true_labels
    offsets = (noisy[changed] - true_labels[changed]) % K
    counts = np.bincount(offsets, minlength=K)[1:]
    assert counts.min() / counts.max() > 0.8
    targets = np.bincount(noisy[changed], minlength=K)
    assert targets.min() / targets.max() > 0.8


def test_asymmetric_flips_only_along_pairs(true_labels):
    noisy = asymmetric_noise(true_labels, RATE, CIFAR10_ASYMMETRIC, np.random.default_rng(1))
    changed = noisy != true_labels
    for source, target in zip(true_labels[changed], noisy[changed], strict=True):
        assert CIFAR10_ASYMMETRIC[int(source)] == target
    mapped = np.isin(true_labels, list(CIFAR10_ASYMMETRIC))
    assert not changed[~mapped].any()  # classes without an entry never change
    assert changed[mapped].mean() == pytest.approx(RATE, abs=TOLERANCE)


def test_asymmetric_accepts_a_per_class_sequence(true_labels):
    noisy = asymmetric_noise(true_labels, RATE, MOST_SIMILAR.tolist(), np.random.default_rng(2))
    changed = noisy != true_labels
    np.testing.assert_array_equal(noisy[changed], MOST_SIMILAR[true_labels[changed]])
    assert changed.mean() == pytest.approx(RATE, abs=TOLERANCE)  # every demo class has a pair


def test_hard_flips_only_to_the_most_similar_class(true_labels):
    noisy = hard_noise(true_labels, RATE, MOST_SIMILAR, np.random.default_rng(3))
    changed = noisy != true_labels
    np.testing.assert_array_equal(noisy[changed], MOST_SIMILAR[true_labels[changed]])
    assert changed.mean() == pytest.approx(RATE, abs=TOLERANCE)


def test_hard_with_per_sample_targets(true_labels):
    rng = np.random.default_rng(4)
    per_sample = (true_labels + rng.integers(1, K, size=NUM_SAMPLES)) % K  # never the true class
    noisy = hard_noise(true_labels, RATE, per_sample, np.random.default_rng(5))
    changed = noisy != true_labels
    np.testing.assert_array_equal(noisy[changed], per_sample[changed])
    assert changed.mean() == pytest.approx(RATE, abs=TOLERANCE)
    # The same through the dispatcher (length N != K means per sample).
    via_dispatch = inject_noise(
        true_labels, "hard", RATE, K, np.random.default_rng(5), most_similar=per_sample
    )
    np.testing.assert_array_equal(via_dispatch, noisy)


def test_hard_per_class_when_samples_equal_classes():
    labels = np.arange(K)
    forced = hard_noise(labels, 1.0, MOST_SIMILAR, np.random.default_rng(0), per_sample=False)
    np.testing.assert_array_equal(forced, MOST_SIMILAR[labels])
    via_dispatch = inject_noise(
        labels, "hard", 1.0, K, np.random.default_rng(0), most_similar=MOST_SIMILAR
    )
    np.testing.assert_array_equal(via_dispatch, MOST_SIMILAR[labels])


@pytest.mark.parametrize(
    ("kind", "options", "expected"),
    [
        ("symmetric", {}, RATE * (K - 1) / K),
        ("asymmetric", {"pairs": CIFAR10_ASYMMETRIC}, RATE * 5 / K),
        ("hard", {"most_similar": MOST_SIMILAR}, RATE),
        ("instance", {"features": FEATURES}, RATE),
        ("none", {}, 0.0),
    ],
)
def test_dispatcher_change_rates(true_labels, kind, options, expected):
    noisy = inject_noise(true_labels, kind, RATE, K, np.random.default_rng(6), **options)
    assert noisy.dtype == np.int64
    assert noisy is not true_labels
    assert changed_fraction(true_labels, noisy) == pytest.approx(expected, abs=TOLERANCE)


@pytest.mark.parametrize(
    ("kind", "options"),
    [
        ("symmetric", {}),
        ("asymmetric", {"pairs": CIFAR10_ASYMMETRIC}),
        ("hard", {"most_similar": MOST_SIMILAR}),
        ("instance", {"features": FEATURES}),
        ("none", {}),
    ],
)
def test_rate_zero_changes_nothing(true_labels, kind, options):
    noisy = inject_noise(true_labels, kind, 0.0, K, np.random.default_rng(7), **options)
    np.testing.assert_array_equal(noisy, true_labels)


def test_same_seed_same_noise(true_labels):
    first = inject_noise(true_labels, "symmetric", RATE, K, np.random.default_rng(8))
    second = inject_noise(true_labels, "symmetric", RATE, K, np.random.default_rng(8))
    np.testing.assert_array_equal(first, second)


def test_inputs_are_not_mutated_and_lists_work():
    labels = [0, 1, 2, 3] * 5
    noisy = inject_noise(
        labels, "hard", 1.0, 4, np.random.default_rng(0), most_similar=[1, 0, 3, 2]
    )
    assert labels == [0, 1, 2, 3] * 5
    assert noisy.tolist() == [1, 0, 3, 2] * 5


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda rng: inject_noise([0, 1], "symmetric", 1.5, 2, rng), "rate"),
        (lambda rng: inject_noise([0, 1], "symmetric", -0.1, 2, rng), "rate"),
        (lambda rng: inject_noise([0, 1], "symmetric", float("nan"), 2, rng), "rate"),
        (lambda rng: inject_noise([0, 5], "symmetric", 0.5, 2, rng), r"\[0, 2\)"),
        (lambda rng: inject_noise([0, -1], "symmetric", 0.5, 2, rng), "non-negative"),
        (lambda rng: inject_noise([0.5, 1.0], "symmetric", 0.5, 2, rng), "integers"),
        (lambda rng: inject_noise([[0, 1]], "symmetric", 0.5, 2, rng), "1-D"),
        (lambda rng: inject_noise([0, 1], "sideways", 0.5, 2, rng), "sideways"),
        (lambda rng: inject_noise([0, 1], "asymmetric", 0.5, 2, rng), "pairs"),
        (lambda rng: inject_noise([0, 1], "asymmetric", 0.5, 2, rng, pairs={0: 7}), "pairs"),
        (lambda rng: inject_noise([0, 1], "hard", 0.5, 2, rng), "most_similar"),
        (
            lambda rng: inject_noise([0, 1], "hard", 0.5, 2, rng, most_similar=[3, 0]),
            "most_similar",
        ),
        (lambda rng: inject_noise([0, 1], "symmetric", 0.5, 0, rng), "num_classes"),
        (lambda rng: inject_noise([0, 1], "instance", 0.5, 2, rng), "features"),
        (
            lambda rng: inject_noise([0, 1], "instance", 0.5, 2, rng, features=np.zeros((3, 4))),
            "features",
        ),
        (
            lambda rng: inject_noise(
                [0, 1], "instance", 0.5, 2, rng, features=np.full((2, 4), np.nan)
            ),
            "finite",
        ),
        (lambda rng: hard_noise([0, 1, 2], 0.5, [1, 0], rng, per_sample=True), "per-sample"),
        (lambda rng: hard_noise([0, 1, 2], 0.5, [1, 0], rng, per_sample=False), "per-class"),
    ],
)
def test_bad_input_raises_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call(np.random.default_rng(0))


def test_instance_noise_flips_by_the_sample_not_the_class():
    """Xia et al.'s instance-dependent noise: the target follows each sample's features."""
    # Class 0 only; half its samples share one feature vector, half another.
    labels = np.zeros(4000, dtype=np.int64)
    rng = np.random.default_rng(5)
    group_a, group_b = rng.standard_normal(64) * 3, rng.standard_normal(64) * 3
    features = np.where((np.arange(4000) < 2000)[:, None], group_a, group_b)
    noisy = instance_dependent_noise(labels, RATE, features, K, np.random.default_rng(9))
    assert changed_fraction(labels, noisy) == pytest.approx(RATE, abs=TOLERANCE)
    targets_a, targets_b = noisy[:2000][noisy[:2000] != 0], noisy[2000:][noisy[2000:] != 0]
    # Each group flips to "its" class; the two groups of one class flip differently.
    top_a, top_b = np.bincount(targets_a).argmax(), np.bincount(targets_b).argmax()
    assert np.mean(targets_a == top_a) > 0.95 and np.mean(targets_b == top_b) > 0.95
    assert top_a != top_b


def test_instance_noise_spreads_over_classes_and_follows_the_seed(true_labels):
    noisy = instance_dependent_noise(true_labels, RATE, FEATURES, K, np.random.default_rng(3))
    changed = noisy != true_labels
    # Unlike class-conditional noise, one class's flips go to many classes ...
    for label in range(K):
        assert len(np.unique(noisy[changed & (true_labels == label)])) >= K // 2
    # ... and the same seed gives the same labels.
    again = instance_dependent_noise(true_labels, RATE, FEATURES, K, np.random.default_rng(3))
    np.testing.assert_array_equal(noisy, again)
