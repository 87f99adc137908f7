"""Score rows are written on the workers: one file per shard, by the scorer holding its rows."""

from __future__ import annotations

import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from cleaner.scoring.scorer import ClipScorer
from cleaner.scoring.writing import ShardRowsWriter, score_file_writer

COLUMNS = tuple(c for c in ClipScorer.output_columns if c != "shard_total")


def scored_batch(shard: str, positions: list[int], total: int = -1) -> dict[str, np.ndarray]:
    """A batch shaped like ClipScorer's output for the given shard positions."""
    n = len(positions)
    return {
        "key": np.array([f"{shard}:k{p}" for p in positions], dtype=object),
        "shard": np.array([shard] * n, dtype=object),
        "shard_pos": np.array(positions, dtype=np.int64),
        "label": np.zeros(n, dtype=np.int64),
        "true_label": np.zeros(n, dtype=np.int64),
        "status": np.array(["ok"] * n, dtype=object),
        "reason": np.array([""] * n, dtype=object),
        "shard_total": np.full(n, total, dtype=np.int64),
        "p_label": np.array(positions, dtype=np.float32) / 10,
        "max_p": np.ones(n, dtype=np.float32),
        "argmax": np.zeros(n, dtype=np.int64),
        "topk_labels": np.zeros((n, 2), dtype=np.int64),
        "topk_probs": np.zeros((n, 2), dtype=np.float32),
        "embedding": np.ones((n, 4), dtype=np.float16),
        "content_hash": np.array([f"h{p}" for p in positions], dtype=object),
        "max_similarity": np.ones(n, dtype=np.float32),
        "twin_cosine": np.full(n, np.nan, dtype=np.float32),
    }


def concat(*batches: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def test_a_shard_is_written_once_complete_in_shard_order_without_retried_duplicates(tmp_path):
    writer = ShardRowsWriter({"s/a.tar": str(tmp_path / "a.parquet")}, COLUMNS)
    target = tmp_path / "a.parquet"
    for positions in ([3, 0, 1], [0, 1]):  # a retried batch sends rows 0-1 again
        out = writer.add(scored_batch("s/a.tar", positions))
        assert len(out["shard"]) == 0 and not target.exists()
    out = writer.add(scored_batch("s/a.tar", [2, 4], total=5))  # the last batch: the total
    assert out["shard"].tolist() == ["s/a.tar"] and out["rows"].tolist() == [5]
    table = pq.read_table(target)
    assert table.column("shard_pos").to_pylist() == [0, 1, 2, 3, 4]
    assert table.column("key").to_pylist() == [f"s/a.tar:k{p}" for p in range(5)]
    assert "shard_total" not in table.column_names
    assert score_file_writer(str(target))["pid"] == os.getpid()  # written in this process
    assert writer.pending == {}  # nothing held once written


def test_a_batch_across_shards_writes_each_shard_when_complete(tmp_path):
    targets = {"s/a.tar": str(tmp_path / "a.parquet"), "s/b.tar": str(tmp_path / "b.parquet")}
    writer = ShardRowsWriter(targets, COLUMNS)
    out = writer.add(concat(scored_batch("s/a.tar", [0, 1], total=2), scored_batch("s/b.tar", [0])))
    assert out["shard"].tolist() == ["s/a.tar"]
    assert pq.read_table(tmp_path / "a.parquet").num_rows == 2
    assert not (tmp_path / "b.parquet").exists()  # b's last row has not come yet
    out = writer.add(scored_batch("s/b.tar", [1, 2], total=3))
    assert out["shard"].tolist() == ["s/b.tar"] and out["rows"].tolist() == [3]


def test_a_shard_with_a_missing_row_is_never_written(tmp_path):
    writer = ShardRowsWriter({"s/a.tar": str(tmp_path / "a.parquet")}, COLUMNS)
    out = writer.add(scored_batch("s/a.tar", [0, 1, 1], total=3))  # position 2 never came
    assert len(out["shard"]) == 0 and not (tmp_path / "a.parquet").exists()
    assert list(writer.pending) == ["s/a.tar"]


def test_rows_beyond_the_shard_total_are_an_error(tmp_path):
    writer = ShardRowsWriter({"s/a.tar": str(tmp_path / "a.parquet")}, COLUMNS)
    with pytest.raises(RuntimeError, match=r"outside 0\.\.1"):
        writer.add(scored_batch("s/a.tar", [0, 7], total=2))
    assert not (tmp_path / "a.parquet").exists()


@pytest.mark.integration
def test_score_files_are_written_by_workers_not_the_driver(local_ray, demo_shards, tmp_path):
    """Every score file records its writer: a Ray worker process, never the driver."""
    from jobs.clean import run_clean
    from tests.conftest import clean_config

    out = tmp_path / "run"
    summary = run_clean(clean_config(str(demo_shards), str(out)))
    assert summary["scoring"]["prompt_encoding"]["pid"] != os.getpid()  # a task, not the driver
    files = sorted((out / "scores").glob("*.parquet"))
    assert len(files) == len(list(demo_shards.glob("*.tar")))
    node_ids = {n["NodeID"] for n in local_ray.nodes()}
    for path in files:
        writer = score_file_writer(str(path))
        assert writer is not None, f"{path.name} has no writer record"
        assert writer["pid"] != os.getpid(), f"{path.name} was written by the driver"
        assert writer["node_id"] in node_ids
