"""Tests for cleaner.selection.probe (docs/method.md, "Linear probe"), with real scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest

from cleaner.selection.probe import fit_probe_probs, l2_normalise


def _clusters(
    num_samples: int, num_classes: int, dim: int, noise_rate: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(embeddings, noisy labels, true labels): separable Gaussian clusters, flipped labels."""
    rng = np.random.default_rng(seed)
    true = rng.integers(0, num_classes, num_samples)
    centres = rng.normal(0.0, 1.0, (num_classes, dim))
    embeddings = centres[true] + rng.normal(0.0, 1.0, (num_samples, dim))
    flip = rng.random(num_samples) < noise_rate
    noisy = np.where(flip, (true + rng.integers(1, num_classes, num_samples)) % num_classes, true)
    return embeddings, noisy, true


@pytest.mark.parametrize("mode", ["insample", "crossfit"])
def test_shapes_and_rows_are_probabilities(mode: str) -> None:
    embeddings, labels, _ = _clusters(200, 4, 16, 0.2, seed=0)
    probs = fit_probe_probs(embeddings, labels, 4, mode=mode)
    assert probs.shape == (200, 4)
    assert probs.dtype == np.float64
    assert (probs >= 0).all()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)


def test_insample_is_more_over_confident_on_noisy_labels_than_crossfit() -> None:
    embeddings, labels, true = _clusters(400, 4, 32, 0.25, seed=1)
    noisy = labels != true
    rows = np.arange(400)
    insample = fit_probe_probs(embeddings, labels, 4, mode="insample")[rows, labels]
    crossfit = fit_probe_probs(embeddings, labels, 4, mode="crossfit")[rows, labels]
    assert insample[noisy].mean() > crossfit[noisy].mean()
    # both still separate clean from noisy labels
    assert insample[~noisy].mean() > 3 * insample[noisy].mean()
    assert crossfit[~noisy].mean() > 3 * crossfit[noisy].mean()


def test_probe_recovers_true_labels_despite_noise() -> None:
    embeddings, labels, true = _clusters(400, 4, 32, 0.25, seed=2)
    probs = fit_probe_probs(embeddings, labels, 4, mode="crossfit")
    assert (probs.argmax(axis=1) == true).mean() > 0.9


def test_float16_embeddings_are_accepted() -> None:
    embeddings, labels, _ = _clusters(120, 3, 8, 0.1, seed=3)
    as_half = fit_probe_probs(embeddings.astype(np.float16), labels, 3, mode="insample")
    as_float = fit_probe_probs(embeddings.astype(np.float32), labels, 3, mode="insample")
    np.testing.assert_allclose(as_half, as_float, atol=1e-2)


def test_embeddings_are_l2_normalised_so_scale_does_not_matter() -> None:
    embeddings, labels, _ = _clusters(120, 3, 8, 0.1, seed=4)
    np.testing.assert_allclose(np.linalg.norm(l2_normalise(embeddings), axis=1), 1.0, rtol=1e-6)
    small = fit_probe_probs(embeddings, labels, 3, mode="insample")
    large = fit_probe_probs(embeddings * 1000.0, labels, 3, mode="insample")
    np.testing.assert_allclose(small, large, atol=1e-4)


@pytest.mark.parametrize("mode", ["insample", "crossfit"])
def test_missing_class_gets_a_zero_column(mode: str) -> None:
    embeddings, labels, _ = _clusters(150, 3, 8, 0.1, seed=5)
    probs = fit_probe_probs(embeddings, labels + 1, 5, mode=mode)  # classes 0 and 4 absent
    assert probs.shape == (150, 5)
    assert (probs[:, 0] == 0).all() and (probs[:, 4] == 0).all()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    assert (probs.argmax(axis=1) == labels + 1).mean() > 0.8


def test_crossfit_with_classes_smaller_than_folds() -> None:
    embeddings, labels, _ = _clusters(60, 3, 8, 0.0, seed=6)
    embeddings = np.vstack([embeddings, np.full((3, 8), 5.0), np.full((1, 8), -5.0)])
    labels = np.r_[labels, [3, 3, 3], [4]]  # class 3: 3 samples < 5 folds; class 4: 1 sample
    probs = fit_probe_probs(embeddings, labels, 5, mode="crossfit", folds=5)
    assert probs.shape == (64, 5)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    # each class-3 sample is predicted by a probe that saw the two others
    assert (probs[60:63, 3] > 0).all()
    # the singleton cannot be predicted out of sample: its label gets probability 0
    assert probs[63, 4] == 0.0


def test_crossfit_when_every_class_is_smaller_than_folds() -> None:
    embeddings, _, _ = _clusters(6, 3, 4, 0.0, seed=7)
    labels = np.array([0, 1, 2, 0, 1, 2])
    probs = fit_probe_probs(embeddings, labels, 3, mode="crossfit", folds=5)
    assert probs.shape == (6, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)


@pytest.mark.parametrize("mode", ["insample", "crossfit"])
def test_single_class(mode: str) -> None:
    embeddings = np.random.default_rng(8).normal(size=(20, 4))
    probs = fit_probe_probs(embeddings, np.full(20, 2), 3, mode=mode)
    assert probs.shape == (20, 3)
    assert (probs[:, 2] == 1.0).all()


@pytest.mark.parametrize("mode", ["insample", "crossfit"])
def test_single_sample(mode: str) -> None:
    probs = fit_probe_probs(np.ones((1, 4)), np.array([1]), 2, mode=mode)
    assert probs.tolist() == [[0.0, 1.0]]


def test_crossfit_is_deterministic_for_a_seed() -> None:
    embeddings, labels, _ = _clusters(100, 3, 8, 0.2, seed=9)
    first = fit_probe_probs(embeddings, labels, 3, mode="crossfit", seed=3)
    second = fit_probe_probs(embeddings, labels, 3, mode="crossfit", seed=3)
    np.testing.assert_array_equal(first, second)


_X = np.ones((4, 3))
_Y = np.array([0, 1, 0, 1])


@pytest.mark.parametrize(
    ("embeddings", "labels", "num_classes", "kwargs", "match"),
    [
        (_X, _Y, 2, {"mode": "outofbag"}, "unknown probe mode"),
        (_X[:3], _Y, 2, {}, "shape mismatch"),
        (_X[:, 0], _Y, 2, {}, "embeddings must be a 2-D"),
        (np.ones((0, 3)), _Y[:0], 2, {}, "embeddings is empty"),
        (np.full((4, 3), np.nan), _Y, 2, {}, "NaN or inf"),
        (_X, _Y.astype(float), 2, {}, "labels must be integers"),
        (_X, np.array([0, 1, 2, 1]), 2, {}, r"labels must be in \[0, 2\)"),
        (_X, _Y[None, :], 2, {}, "labels must be a 1-D"),
        (_X, _Y, 0, {}, "num_classes"),
        (_X, _Y, 2, {"folds": 1}, "folds"),
        (_X, _Y, 2, {"C": 0.0}, "C must be"),
        (_X, _Y, 2, {"max_iter": 0}, "max_iter"),
    ],
)
def test_bad_input_raises_value_error(
    embeddings: np.ndarray, labels: np.ndarray, num_classes: int, kwargs: dict, match: str
) -> None:
    kwargs = {"mode": "crossfit", **kwargs}
    with pytest.raises(ValueError, match=match):
        fit_probe_probs(embeddings, labels, num_classes, **kwargs)
