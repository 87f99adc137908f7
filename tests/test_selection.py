"""Tests for cleaner.selection.rules (docs/method.md, "Selection"), with real scikit-learn mixtures."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from cleaner.selection.rules import (
    SelectionResult,
    SourceScores,
    SourceSelection,
    validate_probs,
)
from cleaner.selection.select import select_clean, select_clean_result, select_from_scores


def _probs_for(true: np.ndarray, num_classes: int, seed: int, signal: float = 4.0) -> np.ndarray:
    """Probabilities [N, K] peaked (softly) on the TRUE label."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 1.0, (true.shape[0], num_classes))
    logits[np.arange(true.shape[0]), true] += signal
    probs = np.exp(logits)
    return probs / probs.sum(axis=1, keepdims=True)


def _noisy_probs(
    num_samples: int, num_classes: int, noise_rate: float, seed: int, signal: float = 4.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(noisy labels, true labels, probabilities peaked on the TRUE label)."""
    rng = np.random.default_rng(seed)
    true = rng.integers(0, num_classes, num_samples)
    flip = rng.random(num_samples) < noise_rate
    noisy = np.where(flip, (true + rng.integers(1, num_classes, num_samples)) % num_classes, true)
    return noisy, true, _probs_for(true, num_classes, seed + 1000, signal)


def _compact(p_label: np.ndarray) -> SourceScores:
    """A source whose labels are always the argmax (consistency 1): isolates the GMM."""
    p_label = np.asarray(p_label, dtype=np.float64)
    return SourceScores(p_label=p_label, max_p=p_label.copy())


def _consistency_source(p_label: np.ndarray, consistent: np.ndarray) -> SourceScores:
    """A source where `consistent` samples have c = 1 and the others c = 0.5."""
    p_label = np.asarray(p_label, dtype=np.float64)
    return SourceScores(p_label=p_label, max_p=np.where(consistent, p_label, 2.0 * p_label))


# --------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("gmm", ["per_class", "global"])
def test_synthetic_selection_has_high_precision_and_recall(gmm: str) -> None:
    labels, true, zeroshot = _noisy_probs(3000, 10, 0.3, seed=0)
    probe = _probs_for(true, 10, seed=1, signal=3.0)
    clean_truth = labels == true

    only_zeroshot = select_clean(labels, zeroshot, gmm=gmm)
    both = select_clean(labels, zeroshot, zeroshot * 0.5 + probe * 0.5, gmm=gmm)
    for selected in (only_zeroshot, both):
        assert selected.dtype == bool and selected.shape == (3000,)
        precision = clean_truth[selected].mean()
        recall = selected[clean_truth].mean()
        assert precision > 0.97
        assert recall > 0.85


def test_select_clean_matches_select_from_scores_on_compact_columns() -> None:
    labels, _, zeroshot = _noisy_probs(500, 5, 0.3, seed=2)
    _, _, probe = _noisy_probs(500, 5, 0.3, seed=3)
    expected = select_clean(labels, zeroshot, probe, theta_cons=0.7)
    sources = {
        "zeroshot": SourceScores(
            p_label=zeroshot[np.arange(500), labels], max_p=zeroshot.max(axis=1)
        ),
        "probe": SourceScores(p_label=probe[np.arange(500), labels], max_p=probe.max(axis=1)),
    }
    result = select_from_scores(labels, 5, sources, theta_gmm=0.5, theta_cons=0.7, gmm="per_class")
    assert isinstance(result, SelectionResult)
    assert np.array_equal(result.is_clean, expected)


def test_selection_is_deterministic() -> None:
    labels, _, zeroshot = _noisy_probs(800, 8, 0.4, seed=4)
    first = select_clean_result(labels, zeroshot)
    second = select_clean_result(labels, zeroshot)
    assert np.array_equal(first.is_clean, second.is_clean)
    assert np.array_equal(
        first.sources["zeroshot"].gmm_p_clean, second.sources["zeroshot"].gmm_p_clean
    )


# --------------------------------------------------------------------------- loss score + GMM


def test_loss_score_is_per_class_min_max_normalised_log_p() -> None:
    labels, _, zeroshot = _noisy_probs(400, 4, 0.3, seed=5)
    result = select_clean_result(labels, zeroshot)
    score = result.sources["zeroshot"].loss_score
    log_p = np.log(zeroshot[np.arange(400), labels] / zeroshot.sum(axis=1))
    for k in range(4):
        members = labels == k
        lo, hi = log_p[members].min(), log_p[members].max()
        np.testing.assert_allclose(score[members], (log_p[members] - lo) / (hi - lo), atol=1e-12)
        assert score[members].min() == pytest.approx(0.0)
        assert score[members].max() == pytest.approx(1.0)


def test_loss_score_clips_zero_probabilities() -> None:
    labels = np.array([0, 0, 0, 1, 1])
    probs = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.0, 1.0], [0.2, 0.8]])
    result = select_clean_result(labels, probs, theta_cons=0.0)
    score = result.sources["zeroshot"].loss_score
    assert np.isfinite(score).all()
    assert score[1] == 0.0 and score[0] == 1.0


def test_gmm_p_clean_favours_the_higher_scores() -> None:
    labels, true, zeroshot = _noisy_probs(1000, 5, 0.4, seed=6)
    result = select_clean_result(labels, zeroshot)
    p_clean = result.sources["zeroshot"].gmm_p_clean
    clean_truth = labels == true
    assert p_clean[clean_truth].mean() > 0.9
    assert p_clean[~clean_truth].mean() < 0.1
    assert np.array_equal(result.sources["zeroshot"].gmm_selected, p_clean >= 0.5)


def test_per_class_gmm_differs_from_global_gmm() -> None:
    """Class 0: two far modes on a wide scale. Class 1: modes at 0 and 0.35 (plus a top
    outlier) on a narrow, much lower scale. Per class, 0.35 is the upper mode (clean);
    pooled with class 0's modes at 0 and 1, it falls with the lower, noisy component."""
    rng = np.random.default_rng(7)
    class0 = np.concatenate([rng.normal(1.0, 0.01, 50), rng.normal(0.0, 0.01, 50)])
    class1 = np.concatenate([rng.normal(0.0, 0.01, 40), rng.normal(0.35, 0.01, 40), [1.0, 1.0]])
    class0 = (class0 - class0.min()) / (class0.max() - class0.min())
    class1 = (class1 - class1.min()) / (class1.max() - class1.min())
    log_p = np.concatenate([-5.0 + 5.0 * class0, -20.0 + 2.0 * class1])  # different scales
    labels = np.array([0] * 100 + [1] * 82)
    sources = {"zeroshot": _compact(np.exp(log_p))}

    per_class = select_from_scores(labels, 2, sources, gmm="per_class")
    pooled = select_from_scores(labels, 2, sources, gmm="global")
    np.testing.assert_allclose(
        per_class.sources["zeroshot"].loss_score, pooled.sources["zeroshot"].loss_score
    )
    middle = np.arange(100 + 40, 100 + 80)
    assert per_class.is_clean[middle].all()
    assert not pooled.is_clean[middle].any()
    # class 0 is split the same way by both
    assert np.array_equal(per_class.is_clean[:100], pooled.is_clean[:100])
    assert per_class.is_clean[:50].all() and not per_class.is_clean[50:100].any()


# --------------------------------------------------------------------------- consistency


def test_consistency_theta_one_means_label_is_argmax() -> None:
    labels, _, zeroshot = _noisy_probs(600, 6, 0.3, seed=8)
    result = select_clean_result(labels, zeroshot, theta_gmm=0.0, theta_cons=1.0)
    expected = zeroshot.argmax(axis=1) == labels
    source = result.sources["zeroshot"]
    assert np.array_equal(source.consistency_selected, expected)
    np.testing.assert_allclose(
        source.consistency, zeroshot[np.arange(600), labels] / zeroshot.max(axis=1)
    )


def test_consistency_exact_ties_count_as_argmax() -> None:
    labels = np.array([0, 1, 0, 1])
    probs = np.array([[0.4, 0.4, 0.2], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4], [0.7, 0.3, 0.0]])
    result = select_clean_result(labels, probs, theta_gmm=0.0, theta_cons=1.0)
    source = result.sources["zeroshot"]
    assert source.consistency[0] == 1.0
    assert source.consistency_selected.tolist() == [True, False, False, False]
    # a ratio exactly at the threshold passes (0.4 / 0.5 = 0.8); 0.39 / 0.5 does not
    ratio = select_clean_result(
        np.array([0, 1]), np.array([[0.4, 0.5, 0.1], [0.5, 0.39, 0.11]]), theta_gmm=0.0
    )
    assert ratio.sources["zeroshot"].consistency_selected.tolist() == [True, False]


# --------------------------------------------------------------------------- intersection


def test_final_selection_is_the_intersection_of_all_four_criteria() -> None:
    labels, _, zeroshot = _noisy_probs(1000, 5, 0.3, seed=9)
    _, _, probe = _noisy_probs(1000, 5, 0.3, seed=10)
    result = select_clean_result(labels, zeroshot, probe)
    assert not result.backfilled.any()
    criteria = [
        mask
        for source in result.sources.values()
        for mask in (source.gmm_selected, source.consistency_selected)
    ]
    assert len(criteria) == 4
    assert np.array_equal(result.is_clean, np.logical_and.reduce(criteria))
    # every criterion removes something on its own here, and nothing failing one is kept
    for mask in criteria:
        assert (~mask).any()
        assert not (result.is_clean & ~mask).any()


def test_a_sample_failing_one_criterion_is_not_clean() -> None:
    labels = np.array([0] * 10 + [1] * 10)
    good = np.tile([0.9, 0.1], (10, 1))
    probs = np.vstack([good, good[:, ::-1]])
    # sample 3: the probe disagrees (consistency 0.1 / 0.9); everything else agrees
    probe = probs.copy()
    probe[3] = [0.1, 0.9]
    without_probe = select_clean(labels, probs)
    with_probe = select_clean_result(labels, probs, probe)
    assert without_probe.all()
    assert not with_probe.is_clean[3]
    assert with_probe.sources["probe"].gmm_selected[3] == np.False_
    assert with_probe.is_clean.sum() == 19


def test_probe_none_uses_only_zeroshot_source() -> None:
    labels, _, zeroshot = _noisy_probs(300, 3, 0.2, seed=11)
    alone = select_clean_result(labels, zeroshot)
    assert list(alone.sources) == ["zeroshot"]
    both = select_clean_result(labels, zeroshot, zeroshot)
    assert list(both.sources) == ["zeroshot", "probe"]
    assert np.array_equal(alone.is_clean, both.is_clean)  # identical sources: same selection
    np.testing.assert_allclose(alone.clean_score, both.clean_score)


def test_clean_score_is_mean_p_label_over_sources() -> None:
    labels, _, zeroshot = _noisy_probs(200, 4, 0.2, seed=12)
    _, _, probe = _noisy_probs(200, 4, 0.2, seed=13)
    result = select_clean_result(labels, zeroshot, probe)
    rows = np.arange(200)
    expected = (zeroshot[rows, labels] + probe[rows, labels]) / 2
    np.testing.assert_allclose(result.clean_score, expected)


# --------------------------------------------------------------------------- backfill


def _two_clean_classes_and_an_empty_one() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """K=3, N=30 (labels, consistent, p_label): classes 0 and 1 keep 6 and 5 consistent
    samples, class 2 none; floor(N / K^2) = 3 -> the backfill takes m = 5 of class 2."""
    labels = np.repeat([0, 1, 2], 10)
    consistent = np.zeros(30, dtype=bool)
    consistent[:6] = True
    consistent[10:15] = True
    return labels, consistent, np.random.default_rng(14).uniform(0.05, 0.9, 30)


def test_backfill_picks_the_best_samples_with_min_nonzero_count() -> None:
    labels, consistent, p_label = _two_clean_classes_and_an_empty_one()
    sources = {"zeroshot": _consistency_source(p_label, consistent)}
    result = select_from_scores(labels, 3, sources, theta_gmm=0.0)
    assert result.backfill_size == 5
    class2 = np.arange(20, 30)
    best5 = class2[np.argsort(-p_label[class2])[:5]]
    assert set(np.flatnonzero(result.backfilled)) == set(best5)
    assert result.is_clean[best5].all()
    assert result.counts()["per_class"]["clean"] == [6, 5, 5]


@pytest.mark.parametrize("key_dtype", [str, object])
@pytest.mark.parametrize("chunk_rows", [4, 1000])
def test_backfill_ties_go_to_the_smallest_keys_in_any_chunking(key_dtype, chunk_rows) -> None:
    """Class 2's ten samples tie on the loss score: the backfill takes exactly m of them,
    those with the smallest keys (here the last rows), whether the candidates come from
    one block or are folded across blocks of 4 rows, with str or object keys."""
    labels, consistent, p_label = _two_clean_classes_and_an_empty_one()
    p_label[20:] = 0.3  # tied
    keys = np.array([f"k{99 - i:02d}" for i in range(30)], dtype=key_dtype)
    sources = {"zeroshot": _consistency_source(p_label, consistent)}
    result = select_from_scores(labels, 3, sources, theta_gmm=0.0, keys=keys, chunk_rows=chunk_rows)
    assert result.backfill_size == 5
    assert np.flatnonzero(result.backfilled).tolist() == [25, 26, 27, 28, 29]


def test_backfill_size_uses_floor_n_over_k_squared() -> None:
    # K=2, N=60: floor(60 / 4) = 15 > smallest non-zero clean count 3
    labels = np.repeat([0, 1], [40, 20])
    consistent = np.zeros(60, dtype=bool)
    consistent[:3] = True
    p_label = np.linspace(0.1, 0.9, 60)
    sources = {"zeroshot": _consistency_source(p_label, consistent)}
    result = select_from_scores(labels, 2, sources, theta_gmm=0.0)
    assert result.backfill_size == 15
    assert np.flatnonzero(result.backfilled).tolist() == list(range(45, 60))  # highest p_label


def test_backfill_when_no_class_has_a_clean_sample() -> None:
    labels = np.repeat([0, 1], [30, 6])  # N=36, K=2: floor(36/4) = 9, capped at 6 for class 1
    p_label = np.linspace(0.1, 0.5, 36)
    sources = {"zeroshot": _consistency_source(p_label, np.zeros(36, dtype=bool))}
    result = select_from_scores(labels, 2, sources, theta_gmm=0.0)
    assert result.backfill_size == 9
    assert result.counts()["per_class"]["backfilled"] == [9, 6]
    assert np.flatnonzero(result.backfilled[:30]).tolist() == list(range(21, 30))


def test_backfill_is_at_least_one() -> None:
    labels = np.array([0, 1, 2, 3])  # floor(4 / 16) = 0, no clean sample anywhere
    probs = np.full((4, 4), 0.25)
    probs[np.arange(4), labels] = 0.01
    result = select_clean_result(labels, probs)
    assert result.backfill_size == 1
    assert result.is_clean.all() and result.backfilled.all()


def test_backfill_ranks_by_mean_loss_score_over_sources() -> None:
    # K=2, N=10: class 0 has 1 clean sample, floor(10/4) = 2 -> m = 2 for class 1
    labels = np.repeat([0, 1], [6, 4])
    consistent = np.r_[True, np.zeros(9, dtype=bool)]
    zeroshot = np.r_[np.full(6, 0.9), [0.1, 0.2, 0.3, 0.4]]  # alone: best are 9, 8
    probe = np.r_[np.full(6, 0.9), [0.4, 0.35, 0.1, 0.2]]  # alone: best are 6, 7
    sources = {
        "zeroshot": _consistency_source(zeroshot, consistent),
        "probe": _consistency_source(probe, consistent),
    }
    result = select_from_scores(labels, 2, sources, theta_gmm=0.0)
    assert result.backfill_size == 2
    assert np.flatnonzero(result.backfilled).tolist() == [7, 9]


# --------------------------------------------------------------------------- degenerate classes


def test_class_with_one_sample() -> None:
    labels = np.r_[np.zeros(20, dtype=int), [1, 2]]
    probs = np.tile([0.8, 0.1, 0.1], (22, 1))
    probs[20] = [0.1, 0.8, 0.1]  # class-1 singleton agrees with its label
    probs[21] = [0.8, 0.1, 0.1]  # class-2 singleton does not
    result = select_clean_result(labels, probs)
    source = result.sources["zeroshot"]
    assert source.gmm_p_clean[20] == 1.0 and source.gmm_p_clean[21] == 1.0
    assert source.loss_score[20] == 1.0
    assert result.is_clean[20] and not result.backfilled[20]
    assert result.is_clean[21] and result.backfilled[21]  # backfilled, capped at size 1


def test_class_with_identical_scores_is_not_split() -> None:
    labels = np.repeat([0, 1], 20)
    probs = np.tile([0.7, 0.3], (40, 1))
    probs[20:] = [0.2, 0.8]
    for gmm in ("per_class", "global"):
        result = select_clean_result(labels, probs, gmm=gmm)
        source = result.sources["zeroshot"]
        assert np.all(source.gmm_p_clean == 1.0)
        assert np.all(source.loss_score == 1.0)
        assert result.is_clean.all()


def test_absent_class_is_skipped() -> None:
    labels, _, probs = _noisy_probs(400, 4, 0.2, seed=15)
    labels = np.where(labels == 3, 0, labels)  # no sample labelled 3
    result = select_clean_result(labels, probs)
    counts = result.counts()
    assert counts["per_class"]["total"][3] == 0
    assert counts["per_class"]["clean"][3] == 0
    assert counts["per_class"]["backfilled"][3] == 0
    assert counts["num_present_classes"] == 3
    assert np.isfinite(result.sources["zeroshot"].loss_score).all()


def test_single_class_dataset() -> None:
    rng = np.random.default_rng(16)
    labels = np.zeros(50, dtype=int)
    probs = rng.uniform(0.01, 1.0, (50, 1))
    result = select_clean_result(labels, probs)
    assert result.sources["zeroshot"].consistency_selected.all()
    assert result.is_clean.any()


# --------------------------------------------------------------------------- counts


def test_counts_are_json_serialisable_and_consistent() -> None:
    labels, _, zeroshot = _noisy_probs(500, 5, 0.3, seed=17)
    _, _, probe = _noisy_probs(500, 5, 0.3, seed=18)
    result = select_clean_result(labels, zeroshot, probe)
    counts = result.counts()
    assert json.loads(json.dumps(counts)) == counts
    assert counts["num_samples"] == 500 and counts["num_classes"] == 5
    assert counts["num_clean"] == int(result.is_clean.sum())
    assert sum(counts["per_class"]["clean"]) == counts["num_clean"]
    assert sum(counts["per_class"]["total"]) == 500
    assert set(counts["per_criterion"]) == {
        "zeroshot_gmm",
        "zeroshot_consistency",
        "probe_gmm",
        "probe_consistency",
    }
    assert counts["per_criterion"]["probe_gmm"] == int(result.sources["probe"].gmm_selected.sum())


# --------------------------------------------------------------------------- bad input

_LABELS = np.array([0, 1, 2, 1])
_PROBS = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [0.3, 0.4, 0.3]])


def _with(row: int, col: int, value: float) -> np.ndarray:
    probs = _PROBS.copy()
    probs[row, col] = value
    return probs


@pytest.mark.parametrize(
    ("labels", "zeroshot", "probe", "kwargs", "match"),
    [
        (_LABELS[:3], _PROBS, None, {}, "shape mismatch"),
        (_LABELS, _PROBS, _PROBS[:3], {}, "shape mismatch: probe_probs"),
        (_LABELS, _PROBS, _PROBS[:, :2], {}, "shape mismatch: probe_probs has 2 classes"),
        (_LABELS, _PROBS[:, 0], None, {}, "zeroshot_probs must be a 2-D"),
        (_LABELS[:0], _PROBS[:0], None, {}, "empty"),
        (_LABELS, np.zeros((4, 0)), None, {}, "zeroshot_probs is empty"),
        (_LABELS[None, :], _PROBS, None, {}, "labels must be a 1-D"),
        (np.array([0, 1, 3, 1]), _PROBS, None, {}, r"labels must be in \[0, 3\)"),
        (np.array([0, -1, 2, 1]), _PROBS, None, {}, r"labels must be in \[0, 3\)"),
        (np.array([0.0, 1.5, 2.0, 1.0]), _PROBS, None, {}, "labels must be integers"),
        (np.array(["a", "b", "c", "d"]), _PROBS, None, {}, "labels must be integers"),
        (_LABELS, _with(1, 1, np.nan), None, {}, "zeroshot_probs contains NaN"),
        (_LABELS, _PROBS, _with(1, 1, np.nan), {}, "probe_probs contains NaN"),
        (_LABELS, _with(0, 2, np.inf), None, {}, "zeroshot_probs contains inf"),
        (_LABELS, _with(2, 0, -0.1), None, {}, "zeroshot_probs contains negative"),
        (_LABELS, _PROBS, _with(2, 0, -0.1), {}, "probe_probs contains negative"),
        (_LABELS, np.vstack([_PROBS[:3], np.zeros(3)]), None, {}, "all zeros"),
        (_LABELS, _PROBS, None, {"theta_gmm": 1.5}, "theta_gmm"),
        (_LABELS, _PROBS, None, {"theta_gmm": -0.1}, "theta_gmm"),
        (_LABELS, _PROBS, None, {"theta_cons": 2.0}, "theta_cons"),
        (_LABELS, _PROBS, None, {"theta_cons": float("nan")}, "theta_cons"),
        (_LABELS, _PROBS, None, {"gmm": "per_shard"}, "unknown gmm mode"),
    ],
)
def test_bad_input_raises_value_error_naming_the_problem(
    labels: np.ndarray,
    zeroshot: np.ndarray,
    probe: np.ndarray | None,
    kwargs: dict,
    match: str,
) -> None:
    with pytest.raises(ValueError, match=match):
        select_clean(labels, zeroshot, probe, **kwargs)


@pytest.mark.parametrize(
    ("num_classes", "sources", "match"),
    [
        (3, {}, "sources is empty"),
        (3, {"zeroshot": SourceScores(np.ones(3), np.ones(3))}, "shape mismatch: source"),
        (3, {"zeroshot": SourceScores(np.full(4, np.nan), np.ones(4))}, "p_label contains NaN"),
        (3, {"zeroshot": SourceScores(np.ones(4), np.zeros(4))}, "max_p"),
        (3, {"zeroshot": SourceScores(np.ones(4), np.full(4, 0.5))}, "p_label exceeds max_p"),
        (
            3,
            {"zeroshot": np.ones(4)},
            r"^source 'zeroshot' must be a SourceScores, got <class 'numpy\.ndarray'>$",
        ),
        (2, {"zeroshot": SourceScores(np.ones(4), np.ones(4))}, r"labels must be in \[0, 2\)"),
        (0, {"zeroshot": SourceScores(np.ones(4), np.ones(4))}, "num_classes"),
    ],
)
def test_select_from_scores_validates(num_classes: int, sources: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        select_from_scores(_LABELS, num_classes, sources)


def test_source_scores_rejects_mismatched_columns() -> None:
    with pytest.raises(ValueError, match="p_label has 3 values but max_p has 2"):
        SourceScores(np.ones(3), np.ones(2))
    with pytest.raises(ValueError, match="1-D"):
        SourceScores(np.ones((3, 1)), np.ones((3, 1)))


def test_counts_match_the_masks_field_by_field_as_plain_ints() -> None:
    # K=4 with class 3 absent; two sources; one backfilled sample in class 2
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    mask = lambda *rows: np.isin(np.arange(9), rows)  # noqa: E731
    zero = np.zeros(9)

    def source(gmm, cons):
        return SourceSelection(zero, zero, gmm, zero, cons)

    result = SelectionResult(
        is_clean=mask(0, 1, 3, 8), backfilled=mask(8), clean_score=zero,
        sources={"zeroshot": source(mask(0, 1, 2), mask(0, 3)),
                 "probe": source(mask(1), mask(3, 4, 5))},
        labels=labels, num_classes=4, theta_gmm=0.5, theta_cons=0.5, gmm="official",
        backfill_size=1,
    )  # fmt: skip
    counts = result.counts()
    assert counts == {
        "num_samples": 9, "num_classes": 4, "num_present_classes": 3, "num_clean": 4,
        "num_backfilled": 1, "num_backfilled_classes": 1, "backfill_size": 1,
        "per_criterion": {"zeroshot_gmm": 3, "zeroshot_consistency": 2, "probe_gmm": 1,
                          "probe_consistency": 3},
        "per_class": {"total": [3, 2, 4, 0], "clean": [2, 1, 1, 0], "backfilled": [0, 0, 1, 0],
                      "zeroshot_gmm": [3, 0, 0, 0], "zeroshot_consistency": [1, 1, 0, 0],
                      "probe_gmm": [1, 0, 0, 0], "probe_consistency": [0, 2, 1, 0]},
    }  # fmt: skip
    # plain ints, not floats equal to them: the summary is JSON, read by other tools
    assert json.dumps(counts) == json.dumps(json.loads(json.dumps(counts)))
    assert ".0" not in json.dumps(counts)


def test_source_scores_coerce_to_float64_arrays_and_reject_mismatched_shapes() -> None:
    scores = SourceScores(p_label=np.array([0.25, 0.5], np.float32), max_p=[0.5, 0.75])
    assert isinstance(scores.max_p, np.ndarray) and len(scores) == 2
    assert scores.p_label.dtype == scores.max_p.dtype == np.float64
    assert scores.p_label[0] == 0.25 and scores.max_p.tolist() == [0.5, 0.75]
    one_d = "SourceScores: p_label and max_p must be 1-D arrays"
    for p_label, max_p in (([[0.5]], [0.5]), ([0.5], [[0.5]])):  # either one 2-D
        with pytest.raises(ValueError, match=f"^{re.escape(one_d)}$"):
            SourceScores(p_label=p_label, max_p=max_p)
    with pytest.raises(ValueError, match=r"^SourceScores: p_label has 2 values but max_p has 1$"):
        SourceScores(p_label=[0.1, 0.2], max_p=[0.3])
    # from_probs renormalises rows: p(label) and max p of [1, 3] are 0.25 and 0.75
    from_probs = SourceScores.from_probs(np.array([0, 1]), np.array([[1.0, 3.0], [2.0, 2.0]]))
    assert from_probs.p_label.tolist() == [0.25, 0.5] and from_probs.max_p.tolist() == [0.75, 0.5]


BAD_SELECTION_INPUT = [  # (labels, num_classes, p_label, max_p, the whole message)
    ([0, 1], True, None, None, "num_classes must be an integer, got True"),
    ([0, 1], 0, None, None, "num_classes must be at least 1, got 0"),
    ([[0, 1]], 2, None, None, "labels must be a 1-D array, got shape (1, 2)"),
    ([], 2, None, None, "labels is empty"),
    ([True, False], 2, None, None, "labels must be integers, got dtype bool"),
    ([0.5, 1.0], 2, None, None, "labels must be integers, got non-integer values"),
    ([0, 2], 2, None, None, "labels must be in [0, 2), got values in [0, 2]"),
    ([0, 1], 2, [0.1], [0.2], "shape mismatch: source 'zs' has 1 samples but labels has 2"),
    ([0, 1], 2, [np.nan, 0.1], [0.5, 0.5], "source 'zs': p_label contains NaN"),
    ([0, 1], 2, [0.1, 0.1], [np.inf, 0.5], "source 'zs': max_p contains inf"),
    ([0, 1], 2, [-0.1, 0.1], [0.5, 0.5], "source 'zs': p_label contains negative probabilities"),
    (
        [0, 1],
        2,
        [0.0, 0.1],
        [0.0, 0.5],
        "source 'zs': max_p must be positive (a row of all zeros?)",
    ),
    ([0, 1], 2, [0.6, 0.1], [0.5, 0.5], "source 'zs': p_label exceeds max_p"),
]


@pytest.mark.parametrize(("labels", "k", "p_label", "max_p", "message"), BAD_SELECTION_INPUT)
def test_bad_selection_input_names_the_problem(labels, k, p_label, max_p, message) -> None:
    p_label = [0.2] * len(labels) if p_label is None else p_label
    max_p = [0.5] * len(labels) if max_p is None else max_p
    source = SourceScores(p_label=np.array(p_label, float), max_p=np.array(max_p, float))
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        select_from_scores(np.array(labels), k, {"zs": source})


BAD_PROBS = [  # (probs, the whole message for name "probs", labels of 2 samples)
    (np.array([["a", "b"], ["c", "d"]]), "probs must be a numeric array, got dtype <U1"),
    (np.ones((2, 2), bool), "probs must be a numeric array, got dtype bool"),
    (np.ones(2), "probs must be a 2-D [N, K] array, got shape (2,)"),
    (np.ones((2, 0)), "probs is empty (shape (2, 0))"),
    (np.ones((3, 2)), "shape mismatch: probs has 3 rows but labels has 2"),
    (np.array([[np.nan, 1.0], [1.0, 1.0]]), "probs contains NaN"),
    (np.array([[np.inf, 1.0], [1.0, 1.0]]), "probs contains inf"),
    (np.array([[-1.0, 1.0], [1.0, 1.0]]), "probs contains negative probabilities"),
    (np.array([[1.0, 1.0], [0.0, 0.0]]), "probs has 1 row(s) of all zeros (first: 1)"),
]


@pytest.mark.parametrize(("probs", "message"), BAD_PROBS)
def test_bad_probability_matrices_name_the_problem(probs, message) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        validate_probs("probs", probs, 2)
    good = validate_probs("probs", np.array([[1, 3], [2, 2]], np.int32), 2)
    assert good.dtype == np.float64 and good.tolist() == [[1.0, 3.0], [2.0, 2.0]]


@pytest.mark.parametrize(
    ("theta_gmm", "theta_cons", "message"),
    [
        (True, 0.5, "theta_gmm must be a number in [0, 1], got True"),
        (0.5, "0.5", "theta_cons must be a number in [0, 1], got '0.5'"),
        (1.5, 0.5, "theta_gmm must be in [0, 1], got 1.5"),
        (0.5, float("nan"), "theta_cons must be in [0, 1], got nan"),
    ],
)
def test_bad_thresholds_name_the_threshold(theta_gmm, theta_cons, message) -> None:
    source = SourceScores(p_label=np.array([0.2, 0.2]), max_p=np.array([0.5, 0.5]))
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        select_from_scores(
            np.array([0, 1]), 2, {"zs": source}, theta_gmm=theta_gmm, theta_cons=theta_cons
        )


def test_edge_inputs_that_are_valid_pass_and_the_edges_of_bad_ones_fail() -> None:
    source = SourceScores(p_label=np.array([0.2, 0.4]), max_p=np.array([0.5, 0.5]))
    float_labels = select_from_scores(np.array([0.0, 1.0], np.float32), 2, {"zs": source})
    assert float_labels.labels.tolist() == [0, 1] and float_labels.labels.dtype == np.int64
    with pytest.raises(ValueError, match=r"^labels must be integers, got non-integer values$"):
        select_from_scores(np.array([0.5, 1.0], np.float32), 2, {"zs": source})
    with pytest.raises(ValueError, match=r"^labels must be integers, got non-integer values$"):
        select_from_scores(np.array([np.nan, 1.0]), 2, {"zs": source})
    empty = "sources is empty: at least one probability source is needed"
    with pytest.raises(ValueError, match=f"^{re.escape(empty)}$"):
        select_from_scores(np.array([0, 1]), 2, {})
    # p(label) up to max_p (1 + 1e-6) + 1e-12 is rounding, accepted; consistency stays <= 1
    edge = 0.5 * (1 + 1e-6) + 1e-12
    at_edge = SourceScores(p_label=np.array([edge, 0.4]), max_p=np.array([0.5, 0.5]))
    result = select_from_scores(np.array([0, 1]), 2, {"zs": at_edge})
    assert result.sources["zs"].consistency.max() == 1.0
    with pytest.raises(ValueError, match=r"^probs is empty \(shape \(0, 2\)\)$"):
        validate_probs("probs", np.ones((0, 2)), 0)
    assert validate_probs("probs", np.ones((1, 2)), 1).shape == (1, 2)  # one row is fine
    low = SourceScores(p_label=np.array([0.5], np.float32), max_p=np.array([0.5], np.float32))
    assert low.p_label.dtype == low.max_p.dtype == np.float64


def _engine_run(batch, source_columns, num_classes=3, wrap=None, **spec_options):
    """run_fit on an in-memory batch (chunks of 4 rows); `wrap` wraps the runner."""
    from cleaner.selection.engine import local_runner, make_spec, run_fit

    options = {"theta_gmm": 0.5, "theta_cons": 0.8, "gmm": "per_class", "max_iter": 100,
               "tol": 1e-3, "reg_covar": 1e-6, **spec_options}  # fmt: skip
    spec = make_spec(num_classes, source_columns, label_column="label", key_column=None, **options)
    runner = local_runner({name: np.asarray(values) for name, values in batch.items()}, 4)
    return run_fit(spec, runner if wrap is None else wrap(runner))


def _engine_fit(labels, p_label, max_p, num_classes=3, **spec_options):
    batch = {"label": labels, "p": p_label, "m": max_p}
    return _engine_run(batch, {"zeroshot": ("p", "m")}, num_classes, **spec_options)


def test_the_engine_checks_its_own_input_word_for_word() -> None:
    """run_fit (the path the distributed fit takes, without the library's validation in
    front): label dtype, labels outside [0, K) counted exactly, bad probability rows
    counted exactly, an empty dataset, and make_spec's bounds (1 iteration and a variance
    floor of 1 allowed)."""
    good_p, good_m = np.full(6, 0.5), np.full(6, 0.6)
    for labels, dtype in ((np.array([True, False] * 3), "bool"), (np.array(["a"] * 6), "<U1")):
        with pytest.raises(ValueError) as error:
            _engine_fit(labels, good_p, good_m)
        assert str(error.value) == f"labels must be integers, got dtype {dtype}"
    labels = np.array([0.0, 1.0, -1.0, 3.0, 1.5, np.nan])
    with pytest.raises(ValueError) as error:
        _engine_fit(labels, good_p, good_m)
    assert str(error.value) == "4 label(s) are not integers in [0, 3) (column 'label')"
    p_label = np.array([np.nan, 0.7, 0.0, -0.1, 0.5, 0.5])  # row 2: only its max_p of 0
    max_p = np.array([0.5, 0.6, 0.0, 0.5, 0.6, 0.6])
    with pytest.raises(ValueError) as error:
        _engine_fit(np.array([0, 1, 2, 0, 1, 2]), p_label, max_p)
    assert str(error.value) == (
        "source 'zeroshot': 4 row(s) with NaN, inf, negative or zero max_p, or p_label above max_p"
    )
    with pytest.raises(ValueError) as error:
        _engine_fit(np.array([], np.int64), np.array([]), np.array([]))
    assert str(error.value) == "the dataset is empty"
    with pytest.raises(ValueError) as error:
        _engine_fit([0], [0.5], [0.5], num_classes=0)
    assert str(error.value) == "num_classes must be at least 1, got 0"
    for reg_covar in (0.0, 1.5):
        with pytest.raises(ValueError) as error:
            _engine_fit([0], [0.5], [0.5], reg_covar=reg_covar)
        assert str(error.value) == f"reg_covar must be in (0, 1], got {reg_covar!r}"

    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 20)
    p_label = rng.uniform(0.1, 0.9, 60)
    fitted = _engine_fit(labels, p_label, p_label * 1.1, max_iter=1, reg_covar=1.0)
    assert fitted.columns_read == ("label", "m", "p")
    assert fitted.class_counts.tolist() == [20, 20, 20]


def test_backfill_size_counts_a_class_with_one_clean_sample() -> None:
    # K=3, N=8: floor(8 / 9) = 0; clean counts 1 and 3 -> m = 1 for the empty class 2
    labels = np.array([0, 0, 1, 1, 1, 1, 2, 2])
    consistent = np.array([True, False, True, True, True, False, False, False])
    p_label = np.linspace(0.2, 0.9, 8)
    sources = {"zeroshot": _consistency_source(p_label, consistent)}
    result = select_from_scores(labels, 3, sources, theta_gmm=0.0)
    assert result.counts()["per_class"]["clean"][:2] == [1, 3]
    assert result.backfill_size == 1
    assert np.flatnonzero(result.backfilled).tolist() == [7]


def test_every_mixture_that_converged_stays_marked_converged() -> None:
    """Mixtures converge at different iterations; each keeps its converged flag and its own
    iteration count after it leaves the EM (`FittedSelection` gives both to its callers)."""
    rng = np.random.default_rng(5)
    labels = np.repeat([0, 1, 2], 200)
    clean = rng.random(600) < np.repeat([0.9, 0.6, 0.75], 200)
    p_label = np.clip(np.where(clean, rng.beta(8, 2, 600), rng.beta(2, 8, 600)), 0.01, 0.99)
    fitted = _engine_fit(labels, p_label, np.maximum(p_label, 0.5))
    source = fitted.sources["zeroshot"]
    assert source.converged.all()
    assert len(set(source.n_iter.tolist())) > 1 and source.n_iter.max() < 100


def _assert_same_fit(fitted, expected, names=("zeroshot",)) -> None:
    for name in names:
        got, want = fitted.sources[name], expected.sources[name]
        for field in ("log_min", "log_max", "degenerate", "means", "variances", "weights"):
            np.testing.assert_array_equal(getattr(got, field), getattr(want, field), err_msg=field)
        assert got.n_iter.tolist() == want.n_iter.tolist()
        assert got.converged.tolist() == want.converged.tolist()


def test_mixtures_left_unfitted_keep_their_placeholders() -> None:
    """An absent class (NaN ranges, not degenerate) and a degenerate one (one score) get no
    fit: their mixtures keep the documented placeholders (`fitted.SourceFit`: means 0 and 1,
    variances reg_covar, weights 0.5, no iteration, not converged), which the summary's
    mixtures carry; the fitted classes iterate and converge. Dtypes as documented."""
    rng = np.random.default_rng(3)
    labels = np.repeat([0, 1, 2], [120, 80, 7])  # class 3 is absent
    p_label = np.r_[rng.uniform(0.05, 0.95, 200), np.full(7, 0.4)]
    fitted = _engine_fit(labels, p_label, np.maximum(p_label, 0.5), num_classes=4, reg_covar=1e-4)
    assert fitted.class_counts.dtype == np.int64
    assert fitted.class_counts.tolist() == [120, 80, 7, 0]
    source = fitted.sources["zeroshot"]
    assert source.degenerate.dtype == bool and source.degenerate.tolist() == [0, 0, 1, 0]
    assert np.isnan(source.log_min[3]) and np.isnan(source.log_max[3])
    assert source.log_min[2] == source.log_max[2] == np.log(0.4)
    for c in (0, 1):
        rows = labels == c
        assert source.log_min[c] == np.log(p_label[rows]).min()
        assert source.log_max[c] == np.log(p_label[rows]).max()
    for field in ("means", "variances", "weights"):
        assert getattr(source, field).dtype == np.float64
    assert source.n_iter.dtype == np.int64 and source.converged.dtype == bool
    unfitted = [2, 3]
    assert source.means[unfitted].tolist() == [[0.0, 1.0]] * 2
    assert source.variances[unfitted].tolist() == [[1e-4, 1e-4]] * 2
    assert source.weights[unfitted].tolist() == [[0.5, 0.5]] * 2
    assert source.n_iter.tolist()[2:] == [0, 0] and min(source.n_iter[:2]) >= 1
    assert source.converged.tolist() == [True, True, False, False]
    assert fitted.criterion_counts["clean"][:3].min() > 0 and fitted.backfill is None


def test_float32_columns_fit_as_their_float64_widening() -> None:
    """Score files hold float32: labels, p(label) and max p in float32 give the fit of the
    same values widened to float64 (the logs of the ranges taken in float64, not float32),
    and a p(label) within the 1e-6 tolerance above a float32 max p is accepted."""
    rng = np.random.default_rng(8)
    labels = np.repeat([0, 1, 2], 40)
    p_label = rng.uniform(0.05, 0.95, 120).astype(np.float32)
    max_p = np.maximum(p_label, np.float32(0.6))
    narrow = _engine_fit(labels.astype(np.float32), p_label, max_p)
    wide = _engine_fit(labels, p_label.astype(np.float64), max_p.astype(np.float64))
    _assert_same_fit(narrow, wide)
    for c in range(3):
        rows = labels == c
        assert narrow.sources["zeroshot"].log_min[c] == np.log(p_label[rows].astype(float)).min()
    # 0.5 * (1 + 9.8e-7) is above 0.5 * (1 + 1e-6) rounded to float32, below it in float64
    p_close = np.r_[p_label[:-1].astype(np.float64), 0.5 * (1 + 9.8e-7)]
    max_close = np.r_[max_p[:-1], np.float32(0.5)].astype(np.float32)
    assert _engine_fit(labels, p_close, max_close).class_counts.tolist() == [40, 40, 40]


def test_a_source_without_fitted_mixtures_leaves_the_others_alone() -> None:
    """A source whose every class is degenerate (one score per class) fits no mixture; the
    next source is fitted exactly as it is alone."""
    rng = np.random.default_rng(9)
    labels = np.repeat([0, 1, 2], 50)
    p_label = rng.uniform(0.05, 0.95, 150)
    flat = np.repeat([0.3, 0.5, 0.7], 50)
    batch = {"label": labels, "p": p_label, "m": np.maximum(p_label, 0.5), "f": flat, "fm": flat}
    both = _engine_run(batch, {"flat": ("f", "fm"), "zeroshot": ("p", "m")})
    alone = _engine_run(batch, {"zeroshot": ("p", "m")})
    assert both.sources["flat"].degenerate.all() and both.sources["flat"].n_iter.sum() == 0
    assert alone.sources["zeroshot"].n_iter.min() >= 1
    _assert_same_fit(both, alone)


class _CountingRunner:
    """A runner that records the name of every pass it runs (its derived runners too)."""

    def __init__(self, inner, passes: list[str]) -> None:
        self.inner, self.passes = inner, passes

    def __call__(self, fn):
        self.passes.append(type(fn).__name__)
        return self.inner(fn)

    def derive(self, build):
        return _CountingRunner(self.inner.derive(build), self.passes)


def _lloyd_passes(x: np.ndarray, threshold: float) -> int:
    """Passes of the engine's initialisation (one per split, the last one finding that no
    sample changed side) from `threshold`, by plain 1-D 2-means (lower side: x < threshold)."""
    passes, sides = 0, None
    while True:
        passes += 1
        lower = x < threshold
        if sides is not None and (lower == sides).all():
            return passes
        sides = lower
        threshold = (x[lower].mean() + x[~lower].mean()) / 2


def test_the_initial_split_refines_any_start_and_stops_once_no_sample_moves(monkeypatch) -> None:
    """The k-means initialisation: from a start with one sample below the threshold (class 0)
    or the right split at once (class 1), exact Lloyd passes reach the partition the
    histogram's split gives, so the fit is the same; a pass that moves no sample ends it
    (the pass count of a plain 2-means, not LLOYD_MAX_ITER)."""
    from cleaner.selection import engine

    rng = np.random.default_rng(11)
    labels = np.repeat([0, 1], 100)
    p_label = np.r_[
        rng.uniform(0.01, 0.03, 30), rng.uniform(0.6, 0.9, 70),  # class 0: 30 low, 70 high
        rng.uniform(0.01, 0.03, 50), rng.uniform(0.6, 0.9, 50),  # class 1: 50 / 50
    ]  # fmt: skip
    plain = _engine_fit(labels, p_label, p_label, num_classes=2)
    x = plain.sources["zeroshot"].loss_score(p_label, labels)
    start = np.array([np.sort(x[labels == 0])[:2].mean(), 0.5])
    assert (x[labels == 0] < start[0]).sum() == 1
    monkeypatch.setattr(engine, "otsu_threshold", lambda histogram: start.copy())
    passes: list[str] = []
    forced = _engine_fit(
        labels, p_label, p_label, num_classes=2, wrap=lambda run: _CountingRunner(run, passes)
    )
    expected = max(_lloyd_passes(x[labels == c], start[c]) for c in (0, 1))
    assert expected >= 3  # class 0's lowest sample alone moves at least once
    assert passes.count("SplitSumsPass") == expected < engine.LLOYD_MAX_ITER
    _assert_same_fit(forced, plain)


def test_make_spec_refuses_each_bad_setting_word_for_word_and_keeps_the_good_ones() -> None:
    from cleaner.selection.engine import make_spec

    good = {"theta_gmm": 0.5, "theta_cons": 0.8, "gmm": "per_class", "max_iter": 100,
            "tol": 1e-3, "reg_covar": 1e-6}  # fmt: skip
    cases = [
        ({"num_classes": True}, "num_classes must be an integer, got True"),
        ({"num_classes": 2.5}, "num_classes must be an integer, got 2.5"),
        ({"max_iter": 0}, "max_iter must be a positive integer, got 0"),
        ({"max_iter": True}, "max_iter must be a positive integer, got True"),
        ({"max_iter": 1.5}, "max_iter must be a positive integer, got 1.5"),
        ({"tol": 0.0}, "tol must be a positive number, got 0.0"),
        ({"tol": float("inf")}, "tol must be a positive number, got inf"),
        ({"tol": -1.0}, "tol must be a positive number, got -1.0"),
    ]
    for change, message in cases:
        options = {"num_classes": 3, **good, **change}
        with pytest.raises(ValueError) as error:
            make_spec(source_columns={"zeroshot": ("p", "m")}, label_column="label",
                      key_column=None, **options)  # fmt: skip
        assert str(error.value) == message
    spec = make_spec(np.int64(4), {"zeroshot": ("p", "m")}, label_column="label",
                     key_column="key", **{**good, "max_iter": np.int64(7), "tol": 0.25})  # fmt: skip
    assert (spec.num_classes, spec.max_iter, spec.tol) == (4, 7, 0.25)
    assert type(spec.num_classes) is int and type(spec.max_iter) is int
    assert type(spec.tol) is float


def test_run_fit_without_sources_or_without_any_block() -> None:
    """No probability source, and a runner with no block at all (a Ray dataset of zero
    blocks): each refused by its own message."""
    from cleaner.selection.engine import make_spec, run_fit
    from cleaner.selection.runners import LocalRunner

    options = {"theta_gmm": 0.5, "theta_cons": 0.8, "gmm": "per_class", "max_iter": 100,
               "tol": 1e-3, "reg_covar": 1e-6}  # fmt: skip
    batch = {"label": np.array([0, 1]), "p": np.array([0.5, 0.5]), "m": np.array([0.5, 0.5])}
    no_source = make_spec(2, {}, label_column="label", key_column=None, **options)
    with pytest.raises(ValueError) as error:
        run_fit(no_source, LocalRunner([batch]))
    assert str(error.value) == "source_columns is empty: at least one probability source is needed"
    spec = make_spec(2, {"zeroshot": ("p", "m")}, label_column="label", key_column=None, **options)
    with pytest.raises(ValueError) as error:
        run_fit(spec, LocalRunner([]))
    assert str(error.value) == "the dataset is empty"


def test_the_engines_backfill_plan_without_keys() -> None:
    """A class with no clean sample, no key column: the plan's cut has no key (ties at the
    cut all picked) and its arrays have the documented types."""
    labels = np.repeat([0, 1, 2], 20)
    p_label = np.r_[np.linspace(0.3, 0.9, 40), np.linspace(0.05, 0.2, 20)]
    max_p = np.r_[p_label[:40], np.full(20, 0.9)]  # class 2 is never the argmax: not clean
    fitted = _engine_fit(labels, p_label, max_p)
    plan = fitted.backfill
    clean = fitted.criterion_counts["clean"]
    assert clean[2] == 0 and min(clean[:2]) > 60 // 9
    assert plan.key is None and plan.size == min(clean[:2])  # m: the smallest clean class
    assert plan.classes.tolist() == [2] and plan.classes.dtype == np.int64
    assert plan.counts.dtype == np.int64 and plan.counts.tolist() == [0, 0, plan.size]
    assert plan.score.dtype == np.float64
