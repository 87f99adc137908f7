"""Tests for cleaner.metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cleaner.metrics import detection_metrics


def test_counts_precision_recall_f1() -> None:
    pred = np.array([True, True, True, False, False, False])
    truth = np.array([True, True, False, True, False, False])
    metrics = detection_metrics(pred, truth)
    assert (metrics["tp"], metrics["fp"], metrics["fn"], metrics["tn"]) == (2, 1, 1, 2)
    assert metrics["precision"] == pytest.approx(2 / 3)
    assert metrics["recall"] == pytest.approx(2 / 3)
    assert metrics["f1"] == pytest.approx(2 / 3)
    assert metrics["selected_fraction"] == pytest.approx(0.5)
    assert metrics["num_selected"] == 3 and metrics["num_samples"] == 6
    assert metrics["auroc"] is None


def test_auroc_of_clean_score() -> None:
    truth = np.array([True, True, False, False])
    perfect = detection_metrics(truth, truth, clean_score=np.array([0.9, 0.8, 0.2, 0.1]))
    assert perfect["auroc"] == pytest.approx(1.0)
    reversed_score = detection_metrics(truth, truth, clean_score=np.array([0.1, 0.2, 0.8, 0.9]))
    assert reversed_score["auroc"] == pytest.approx(0.0)
    half = detection_metrics(truth, truth, clean_score=np.array([0.9, 0.1, 0.5, 0.5]))
    assert half["auroc"] == pytest.approx(0.5)


def test_auroc_is_none_when_truth_has_one_class() -> None:
    truth = np.ones(4, dtype=bool)
    metrics = detection_metrics(truth, truth, clean_score=np.arange(4.0))
    assert metrics["auroc"] is None
    assert metrics["precision"] == 1.0 and metrics["recall"] == 1.0


def test_undefined_ratios_are_none() -> None:
    nothing_selected = detection_metrics(np.zeros(3, dtype=bool), np.array([True, False, True]))
    assert nothing_selected["precision"] is None
    assert nothing_selected["recall"] == 0.0
    assert nothing_selected["f1"] is None
    no_clean = detection_metrics(np.array([True, False]), np.zeros(2, dtype=bool))
    assert no_clean["precision"] == 0.0 and no_clean["recall"] is None
    all_wrong = detection_metrics(np.array([True, False]), np.array([False, True]))
    assert all_wrong["f1"] == 0.0


def test_values_are_plain_python_and_json_serialisable() -> None:
    rng = np.random.default_rng(0)
    truth = rng.random(50) < 0.7
    pred = rng.random(50) < 0.6
    metrics = detection_metrics(pred, truth, clean_score=rng.random(50).astype(np.float32))
    assert json.loads(json.dumps(metrics)) == metrics
    for value in metrics.values():
        assert value is None or type(value) in (int, float)


def test_zero_one_integers_are_accepted() -> None:
    metrics = detection_metrics(np.array([1, 0, 1]), np.array([1, 1, 0]))
    assert (metrics["tp"], metrics["fp"], metrics["fn"], metrics["tn"]) == (1, 1, 1, 0)


@pytest.mark.parametrize(
    ("pred", "truth", "score", "match"),
    [
        (np.ones(3, bool), np.ones(2, bool), None, "shape mismatch"),
        (np.ones(3, bool), np.ones(3, bool), np.ones(2), "shape mismatch: clean_score"),
        (np.ones((3, 1), bool), np.ones(3, bool), None, "is_clean_pred must be a 1-D"),
        (np.ones(0, bool), np.ones(0, bool), None, "is_clean_pred is empty"),
        (np.array([0, 2, 1]), np.ones(3, bool), None, "is_clean_pred must be boolean"),
        (np.ones(3, bool), np.array(["a", "b", "c"]), None, "is_clean_true must be boolean"),
        (np.ones(3, bool), np.ones(3, bool), np.array([0.1, np.nan, 0.3]), "NaN or inf"),
    ],
)
def test_bad_input_raises_value_error(
    pred: np.ndarray, truth: np.ndarray, score: np.ndarray | None, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        detection_metrics(pred, truth, clean_score=score)
