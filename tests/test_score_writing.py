"""Score rows are written on the workers: part files, per-shard merges, the driver off the path."""

from __future__ import annotations

import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from cleaner.scoring.scorer import ClipScorer
from cleaner.scoring.writing import (
    PARTS_DIR,
    ShardCompletion,
    merge_shard_parts,
    score_file_writer,
    write_score_parts,
)

COLUMNS = [c for c in ClipScorer.output_columns if c != "shard_total"]


def scored_batch(shard: str, positions: list[int], total: int = -1) -> dict[str, np.ndarray]:
    """A batch shaped like ClipScorer's output for the given shard positions."""
    n = len(positions)
    return {
        "key": np.array([f"k{p}" for p in positions], dtype=object),
        "shard": np.array([shard] * n, dtype=object),
        "shard_pos": np.array(positions, dtype=np.int64),
        "label": np.zeros(n, dtype=np.int64),
        "true_label": np.zeros(n, dtype=np.int64),
        "status": np.array(["ok"] * n, dtype=object),
        "reason": np.array([""] * n, dtype=object),
        "shard_total": np.array([total if p == max(positions) else -1 for p in positions]),
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


def write(tmp_path, shard: str, positions: list[int], total: int = -1) -> dict:
    return write_score_parts(
        scored_batch(shard, positions, total),
        scores_uri=str(tmp_path),
        names={shard: "a.parquet"},
        columns=COLUMNS,
    )


def test_parts_complete_a_shard_and_merge_in_order_without_retried_duplicates(tmp_path):
    completion = ShardCompletion()
    first = write(tmp_path, "s/a.tar", [3, 0, 1])
    retried = write(tmp_path, "s/a.tar", [0, 1])  # a retried batch wrote rows 0-1 again
    last = write(tmp_path, "s/a.tar", [2, 4], total=5)
    done = None
    for out in (first, retried, last):
        assert list(out["shard"]) == ["s/a.tar"] and len(out["part"]) == 1
        assert done is None  # not complete before the last part
        done = completion.add("s/a.tar", out["part"][0], out["positions"][0], out["shard_total"][0])
    assert done is not None and done[1] == 5 and len(done[0]) == 3
    assert completion.unfinished() == []

    target = str(tmp_path / "a.parquet")
    assert merge_shard_parts(done[0], target, done[1]) == 5
    table = pq.read_table(target)
    assert table.column("shard_pos").to_pylist() == [0, 1, 2, 3, 4]
    assert table.column("key").to_pylist() == ["k0", "k1", "k2", "k3", "k4"]
    assert not list((tmp_path / PARTS_DIR).rglob("*.parquet"))  # parts deleted
    assert score_file_writer(target)["pid"] == os.getpid()  # merged in this process here


def test_a_retried_merge_whose_first_attempt_died_deleting_parts_finishes_it(tmp_path):
    """The node of a merge task died after it wrote the score file, between two part
    deletions: Ray runs the task again, which finds a part gone and the file written."""
    first = write(tmp_path, "s/a.tar", [0, 1])["part"][0]
    second = write(tmp_path, "s/a.tar", [2], total=3)["part"][0]
    target = str(tmp_path / "a.parquet")
    assert merge_shard_parts([first, second], target, 3) == 3
    written = pq.read_table(target)
    retried_parts = [first, write(tmp_path, "s/a.tar", [2], total=3)["part"][0]]
    assert merge_shard_parts(retried_parts, target, 3) == 3  # `first` is gone: finished
    assert pq.read_table(target).equals(written)
    assert not list((tmp_path / PARTS_DIR).rglob("*.parquet"))  # the leftover part deleted
    os.remove(target)  # without the score file a missing part is an error, as before
    with pytest.raises(FileNotFoundError):
        merge_shard_parts([first], target, 3)


def test_merge_refuses_a_shard_with_missing_rows(tmp_path):
    part = write(tmp_path, "s/a.tar", [0, 1], total=3)["part"][0]
    with pytest.raises(RuntimeError, match="2 distinct rows for 3 samples"):
        merge_shard_parts([part], str(tmp_path / "a.parquet"), 3)
    assert not (tmp_path / "a.parquet").exists()


def test_completion_rejects_positions_beyond_the_total(tmp_path):
    completion = ShardCompletion()
    out = write(tmp_path, "s/a.tar", [0, 7], total=2)
    with pytest.raises(RuntimeError, match=r"outside 0\.\.1"):
        completion.add("s/a.tar", out["part"][0], out["positions"][0], out["shard_total"][0])


@pytest.mark.integration
def test_score_files_are_written_by_workers_not_the_driver(local_ray, demo_shards, tmp_path):
    """Every score file records its writer: a Ray worker process, never the driver."""
    from jobs.clean import run_clean
    from tests.conftest import clean_config

    out = tmp_path / "run"
    # A leftover part of a killed earlier run must not end up in the scores.
    stale = out / "scores" / PARTS_DIR / next(demo_shards.glob("*.tar")).stem
    stale.mkdir(parents=True)
    (stale / "000000000-000000099-100.parquet").write_bytes(b"not parquet")
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
    assert not (out / "scores" / PARTS_DIR).exists()
