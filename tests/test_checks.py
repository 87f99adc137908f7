"""The embedding checks without Ray: the off-topic rule, duplicate groups and leaks, the
partitioned search against brute force, the manifest columns, the scorer's new columns."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from cleaner.checks.groups import contradicted_members, exact_edges, find_groups
from cleaner.checks.manifest_columns import ManifestChecks, checks_summary
from cleaner.checks.neighbours import (
    EDGE_DTYPE,
    assign_cells,
    brute_force_edges,
    nn_histogram,
    normalised,
    search_cells,
    train_centroids,
)
from cleaner.checks.offtopic import fit_off_topic, score_histogram
from cleaner.checks.search import CheckResults, calibrated_threshold


def edges(*rows) -> np.ndarray:
    out = np.empty(len(rows), dtype=EDGE_DTYPE)
    for i, row in enumerate(rows):
        out[i] = row
    return out


def test_off_topic_rule_flags_a_low_mode_and_nothing_when_there_is_none():
    rng = np.random.default_rng(0)
    on_topic = rng.normal(0.95, 0.03, 4000).clip(0, 1)
    off_topic = rng.normal(0.45, 0.1, 150).clip(0, 1)
    scores = np.r_[on_topic, off_topic]
    rule = fit_off_topic(score_histogram(scores, "max_p"), "max_p")
    assert rule.active and rule.weights[0] < 0.1
    flagged = rule.flag(scores)
    assert flagged[4000:].mean() > 0.95 and flagged[:4000].mean() < 0.005
    assert (rule.posterior(scores)[flagged] >= 0.5).all()
    # one unimodal (skewed) population: the mixture still splits it, the guard says no
    alone = rule_of(rng.beta(20, 2, 4000))
    assert not alone.active and not alone.flag(rng.beta(20, 2, 100)).any()
    # NaN scores (failed rows) are never flagged
    assert not rule.flag(np.array([np.nan])).any()
    # the same two modes in 190 samples: too few for evidence, the rule stays inactive
    few = rule_of(np.r_[on_topic[:150], off_topic[:40]])
    assert few.samples == 190 and not few.active and not few.flag(off_topic).any()
    # the summary's form is JSON's (lists), so a rerun that reads summary.json compares equal
    assert rule.as_dict()["means"] == list(rule.means)


def rule_of(values):
    return fit_off_topic(score_histogram(values, "max_p"), "max_p")


def test_groups_exact_and_near_with_a_label_conflict_and_a_train_test_leak():
    # train rows 0..9, test rows 10..12; rows 1, 4 and test row 11 are byte-identical
    hashes = {1: "h", 4: "h", 11: "h", 2: "a", 3: "b", 8: "c", 5: "d", 12: "e"}
    exact = exact_edges(np.array([4, 1, 11]), np.array(["h", "h", "h"], dtype=object))
    near = edges((2, 3, 0.99), (3, 8, 0.98), (5, 12, 0.97))
    found = find_groups(10, exact, near, hashes)
    assert len(exact_edges(np.array([], dtype=np.int64), np.array([], dtype=object))) == 0
    assert found.rows.tolist() == [1, 2, 3, 4, 8]
    assert found.representative.tolist() == [1, 2, 2, 1, 2]  # first in manifest order
    assert found.group.tolist() == [0, 1, 1, 0, 1]
    assert found.kind.tolist() == ["exact", "near", "near", "exact", "near"]
    # rows 1 and 4 are the test row 1 (id 11) byte for byte; row 5 is near test row 2
    assert found.leak_rows.tolist() == [1, 4, 5]
    assert found.leak_test.tolist() == [1, 1, 2]
    assert found.leak_kind.tolist() == ["exact", "exact", "near"]
    labels = np.array([3, 3, 0, 3, 1])  # group 1: labels 3, 0, 1 conflict
    p_label = np.array([0.9, 0.2, 0.95, 0.9, 0.1])
    contradicted, conflict = contradicted_members(found.group, labels, p_label)
    assert conflict.tolist() == [False, True, True, False, True]
    # group 1's best-supported label is row 3's (p 0.95): rows 2 and 8 are contradicted
    assert contradicted.tolist() == [False, True, False, False, True]


def test_partitioned_search_finds_what_brute_force_finds():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(40, 32))
    x = centres[rng.integers(0, 40, 3000)] + rng.normal(size=(3000, 32)) * 0.7
    x[2000:2100] = x[:100] + rng.normal(size=(100, 32)) * 0.03  # 100 near copies
    x = normalised(x)
    centroids = train_centroids(x[rng.permutation(3000)[:1200]], 6)
    rows, cells = assign_cells(x, centroids)
    primary = np.arange(len(rows)) < 3000
    result = search_cells(
        rows, x[rows], cells, primary, np.ones(len(rows), bool), neighbours=8, floor=0.97
    )
    truth = brute_force_edges(x, 0.97)
    assert len(truth) >= 100
    found = set(zip(result.edges["a"].tolist(), result.edges["b"].tolist(), strict=True))
    assert found == set(zip(truth["a"].tolist(), truth["b"].tolist(), strict=True))
    assert (result.edges["a"] < result.edges["b"]).all()
    assert result.nn_histogram.sum() == 3000  # every row's best neighbour, once


def test_threshold_calibration_takes_the_stricter_of_copies_and_neighbours():
    twins = np.linspace(0.90, 1.0, 200)
    loose = nn_histogram(np.full(1000, 0.5))
    threshold, figures = calibrated_threshold(twins, loose)
    assert abs(threshold - np.quantile(twins, 0.05)) < 1e-9
    assert figures["twin_recall_at_threshold"] >= 0.95
    crowded = nn_histogram(np.r_[np.full(900, 0.5), np.full(100, 0.995)])  # 10% very close
    threshold, figures = calibrated_threshold(twins, crowded)
    assert threshold >= 0.995 and figures["twin_recall_at_threshold"] < 0.1


def manifest_part(n: int) -> pa.Table:
    return pa.table(
        {
            "key": [f"k{i}" for i in range(n)],
            "status": ["clean", "noisy", "failed", "clean", "noisy", "clean"][:n],
            "is_clean": [True, False, False, True, False, True][:n],
            "suggested_label": [0, 2, -1, 1, 3, 1][:n],
            "suggested_name": ["a", "c", None, "b", "d", "b"][:n],
            "label_name": ["a", "b", None, "b", "c", "b"][:n],
            "max_p_zeroshot": [0.99, 0.3, np.nan, 0.98, 0.97, 0.2],
        }
    )


def test_manifest_columns_status_and_suggestions():
    rule = fit_off_topic(
        score_histogram(np.r_[np.full(900, 0.97), np.full(100, 0.25)], "max_p"), "max_p"
    )
    exact = exact_edges(np.array([10, 12]), np.array(["h", "h"], dtype=object))
    found = find_groups(20, exact, edges((3, 10, 0.99), (12, 25, 0.98)), {10: "h", 12: "h"})
    contradicted, conflict = contradicted_members(
        found.group, np.array([1, 0, 1]), np.array([0.9, 0.2, 0.8])
    )
    results = CheckResults(
        n_train=20,
        off_topic=rule,
        duplicates=found,
        member_keys={3: "k3"},
        contradicted=contradicted,
        conflict=conflict,
        test_keys={5: ("t5", "test.tar")},
    )
    # rows 10..15 of the manifest: a part that starts at manifest row 10
    part = ManifestChecks(results, conflicts_as_evidence=True)(manifest_part(6), first_row=10)
    status = part.column("status").to_pylist()
    # row 11 (0.3) and row 15 (0.2) are off-topic; row 12 failed stays failed
    assert status == ["noisy", "off_topic", "failed", "clean", "noisy", "off_topic"]
    assert part.column("off_topic").to_pylist() == [False, True, False, False, False, True]
    assert part.column("suggested_label").to_pylist()[1] == -1
    assert part.column("suggested_name").to_pylist()[5] is None
    assert part.column("duplicate_group").to_pylist() == [0, None, 0, None, None, None]
    assert part.column("duplicate_of").to_pylist() == ["k3", None, "k3", None, None, None]
    assert part.column("duplicate_kind").to_pylist()[0] == "near"
    # row 10 (label 0) is contradicted by its group's best-supported label: not clean
    assert part.column("duplicate_label_conflict").to_pylist()[0] is True
    assert part.column("is_clean").to_pylist()[0] is False
    assert part.column("test_duplicate_of").to_pylist()[2] == "t5"
    assert part.column("test_duplicate_kind").to_pylist()[2] == "near"
    assert part.schema.field("duplicate_group").type == pa.int64()
    summary = checks_summary(results)
    assert summary["duplicate_groups"] == 1 and summary["test_duplicates"] == 1
    assert summary["groups_with_label_conflict"] == 1
    # checks off: same columns, all empty, statuses unchanged
    plain = ManifestChecks(None)(manifest_part(6))
    assert plain.column("status").to_pylist() == manifest_part(6).column("status").to_pylist()
    assert plain.column("duplicate_group").null_count == 6


def test_scorer_hashes_pixels_and_calibrates_on_edited_copies():
    from tests.test_scorer import make_scorer

    scorer, _ = make_scorer()
    size = scorer.clip.image_size
    rng = np.random.default_rng(3)
    n = 200
    images = rng.integers(0, 255, (n, size, size, 3), dtype=np.uint8)
    images[1] = images[0]
    batch = {
        "key": np.array([f"key-{i}" for i in range(n)], dtype=object),
        "shard": np.array(["s.tar"] * n, dtype=object),
        "shard_pos": np.arange(n),
        "label": np.zeros(n, dtype=np.int64),
        "true_label": np.full(n, -1),
        "status": np.array(["ok"] * (n - 1) + ["failed"], dtype=object),
        "reason": np.array([""] * n, dtype=object),
        "shard_total": np.full(n, -1),
        "image": images,
    }
    out = scorer(batch)
    hashes = out["content_hash"]
    assert hashes[0] == hashes[1] and len(set(hashes[:-1])) == n - 2 and hashes[-1] is None
    twins = out["twin_cosine"]
    picked = np.isfinite(twins)
    assert 0 < picked.sum() < n // 10 and not picked[-1]
    assert (twins[picked] <= 1.0 + 1e-5).all()
    again = scorer({k: v[::-1] for k, v in batch.items()})  # the same rows, whatever the batch
    np.testing.assert_allclose(again["twin_cosine"][::-1], twins, atol=1e-5)
    feats = scorer.embed(images[:4]).numpy()
    best = feats @ scorer.flat_text.numpy()
    np.testing.assert_allclose(out["max_similarity"][:4], best.max(axis=1), atol=1e-5)
