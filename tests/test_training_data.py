"""Training data maths without Ray: sample ids, repetition factors, epoch expansion."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from training.config import MixFixConfig
from training.data import (
    _uniform_hash,
    fixed_width_rows,
    load_sample_index,
    repetition_factors,
    with_sample_ids,
)


def write_manifest(path, shards, positions, statuses=None):
    n = len(shards)
    pq.write_table(
        pa.table(
            {
                "shard": shards,
                "shard_pos": positions,
                "label": list(range(n)),
                "is_clean": [True] * n,
                "status": statuses or ["clean"] * n,
                "true_label": list(range(n)),
            }
        ),
        path,
    )
    return str(path)


def test_sample_index_offsets_follow_shard_order(tmp_path):
    uri = write_manifest(
        tmp_path / "m.parquet",
        ["a", "a", "a", "b", "b"],
        [0, 1, 2, 0, 1],
        ["clean", "noisy", "failed", "clean", "clean"],
    )
    index = load_sample_index(uri)
    assert index.shards == ["a", "b"] and index.offsets == {"a": 0, "b": 3}
    assert index.trainable.tolist() == [True, True, False, True, True]
    batch = {
        "shard": np.array(["b", "a", "b"], dtype=object),
        "shard_pos": np.array([1, 2, 0]),
        "status": np.array(["ok", "failed", "ok"], dtype=object),
        "label": np.array([4, 2, 3]),
        "image": np.zeros((3, 2, 2, 3), np.uint8),
    }
    assert with_sample_ids(batch, index.offsets)["sample_id"].tolist() == [4, 3]


def test_sample_index_rejects_unordered_manifests(tmp_path):
    with pytest.raises(ValueError, match="not contiguous"):
        load_sample_index(write_manifest(tmp_path / "x.parquet", ["a", "b", "a"], [0, 0, 1]))
    with pytest.raises(ValueError, match="positions"):
        load_sample_index(write_manifest(tmp_path / "y.parquet", ["a", "a"], [1, 0]))


def test_repetition_factors_balance_classes_and_sum_to_n():
    labels = np.array([0] * 60 + [1] * 30 + [2] * 10)
    selected = np.ones(100, bool)
    selected[:10] = False  # 50 of class 0 stay selected
    factors = repetition_factors(selected, labels, balanced=True)
    assert factors[~selected].sum() == 0
    assert np.isclose(factors.sum(), 100)
    per_class = [factors[labels == c].sum() for c in range(3)]
    assert np.allclose(per_class, 100 / 3)
    plain = repetition_factors(selected, labels, balanced=False)
    assert np.allclose(plain[selected], 100 / 90)


def test_epoch_hash_is_uniform_and_deterministic():
    ids = np.arange(200_000)
    u = _uniform_hash(0, 3, ids)
    assert ((u >= 0) & (u < 1)).all() and abs(u.mean() - 0.5) < 0.01
    assert np.array_equal(u, _uniform_hash(0, 3, ids))
    assert not np.array_equal(u, _uniform_hash(0, 4, ids))


def test_combined_predictions_do_not_depend_on_the_worker_split():
    from training.loop import combine_predictions

    rng = np.random.default_rng(0)
    n = 50
    labels = rng.integers(0, 5, n)
    labels[7] = -1  # a failed sample nobody predicts
    ids = np.array([i for i in range(n) if i != 7])
    probs, preds = rng.random(len(ids)).astype(np.float32), rng.integers(0, 5, len(ids))
    one = combine_predictions([(ids, probs, preds)], labels)
    order = rng.permutation(len(ids))
    parts = [(ids[order[i::3]], probs[order[i::3]], preds[order[i::3]]) for i in (2, 0, 1)]
    three = combine_predictions(parts, labels)
    assert np.array_equal(one[0], three[0]) and np.array_equal(one[1], three[1])
    assert one[0][7] == 0.0 and one[1][7] == 0


def test_sample_index_reads_clip_topk_only_when_asked(tmp_path):
    from cleaner.scoring.writing import fixed_size_list_array

    topk = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    table = pa.table(
        {
            "shard": ["a", "a", "a"],
            "shard_pos": [0, 1, 2],
            "label": [1, 4, 7],
            "is_clean": [True, False, True],
            "status": ["clean", "noisy", "clean"],
            "topk_labels_zeroshot": fixed_size_list_array(topk),
        }
    )
    pq.write_table(table, tmp_path / "m.parquet")
    uri = str(tmp_path / "m.parquet")
    assert load_sample_index(uri).zeroshot_topk is None
    index = load_sample_index(uri, zeroshot_topk=2)
    np.testing.assert_array_equal(index.zeroshot_topk, topk[:, :2])
    with pytest.raises(ValueError, match="holding 3"):
        load_sample_index(uri, zeroshot_topk=4)
    # A sliced column with a null row: offsets respected, the null row unknown (-1).
    column = pa.FixedSizeListArray.from_arrays(
        pa.array(np.arange(12)), 3, mask=pa.array([False, False, True, False])
    ).slice(1)
    np.testing.assert_array_equal(fixed_width_rows(column, 2), [[3, 4], [-1, -1], [9, 10]])
    no_topk = write_manifest(tmp_path / "n.parquet", ["a"], [0])
    with pytest.raises(ValueError, match="topk_labels_zeroshot"):
        load_sample_index(no_topk, zeroshot_topk=1)


def test_mixfix_config_validates_the_guard_options():
    assert MixFixConfig(mode="mixfix_clip", clip_k=2, warmup_epochs=3).clip_k == 2
    for bad in ({"clip_k": 0}, {"warmup_epochs": -1}, {"clip_k": "two"}, {"mode": "guarded"}):
        with pytest.raises(ValueError):
            MixFixConfig(**bad)
