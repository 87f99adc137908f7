"""Writing score rows on the workers: one Parquet file per shard, written by the scorer
actor that holds the shard's rows (no part files, no merge pass).

Each shard reaches the scorer pool as one block: the scoring dataset turns Ray Data's
block shaping off (`one_block_per_task`), so a reader task's output, one shard, is one
block, and Ray Data bundles whole blocks for the actors. One scorer actor thus scores
every row of a shard within one task. The actor (`ClipScorerWriter`) gathers its output
rows per shard (`ShardRowsWriter`) and writes `<scores>/<shard>.parquet` (atomically, rows
in shard order) as soon as every position of the shard is in, with the writing process
and node in the Parquet metadata. What flows on to the driver is one small row per shard
written (shard, rows); the driver never holds score rows. A retried block (its actor
died) rewrites the same file with the same rows, so each sample is in exactly one file
once; the driver counts each shard once.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cleaner.reading import uri as uri_lib

WRITER_METADATA_KEY = b"clipcleaner.writer"


def fixed_size_list_array(values: np.ndarray) -> pa.Array:
    """A [N, W] numpy array as an Arrow fixed-size-list column."""
    values = np.ascontiguousarray(values)
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])


def scores_to_table(batch: dict[str, np.ndarray], columns: tuple[str, ...]) -> pa.Table:
    """Score rows (ClipScorer output) as an Arrow table of `columns`, rows in shard order."""
    order = np.argsort(np.asarray(batch["shard_pos"]), kind="stable")
    out = {}
    for name in columns:
        values = np.asarray(batch[name])[order]
        if values.ndim == 2:
            out[name] = fixed_size_list_array(values)
        elif values.dtype == object:
            out[name] = pa.array(values.tolist(), type=pa.string())
        else:
            out[name] = pa.array(values)
    return pa.table(out)


def table_to_parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def writer_identity() -> dict:
    """Which process and Ray node runs this code (recorded in each score file)."""
    import ray

    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    return {"pid": os.getpid(), "node_id": node, "host": os.uname().nodename}


def write_score_file(table: pa.Table, target: str) -> None:
    """Write one shard's score rows (atomically), recording the writer in the metadata."""
    metadata = {WRITER_METADATA_KEY: json.dumps(writer_identity()).encode()}
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    uri_lib.write_bytes(target, table_to_parquet_bytes(table))


def score_file_writer(path: str) -> dict | None:
    """The writer identity recorded in a score file (None if the file has none)."""
    metadata = pq.read_schema(io.BytesIO(uri_lib.read_bytes(path))).metadata or {}
    raw = metadata.get(WRITER_METADATA_KEY)
    return json.loads(raw) if raw else None


@dataclass
class _Gathered:
    """The score rows of one shard seen so far, and its sample count once known."""

    parts: list[dict[str, np.ndarray]] = field(default_factory=list)
    rows: int = 0
    total: int | None = None

    def add(self, part: dict[str, np.ndarray]) -> None:
        self.parts.append(part)
        self.rows += len(part["shard_pos"])
        totals = part["shard_total"][part["shard_total"] >= 0]
        if len(totals):
            self.total = int(totals[0])

    def complete(self, shard: str) -> dict[str, np.ndarray] | None:
        """All the shard's rows, one per position in shard order, once every position is
        in (a retried batch may have sent some twice); None before."""
        if self.total is None or self.rows < self.total:
            return None
        merged = {k: np.concatenate([p[k] for p in self.parts]) for k in self.parts[0]}
        order = np.argsort(merged["shard_pos"], kind="stable")
        positions = merged["shard_pos"][order]
        first = np.concatenate(([True], positions[1:] != positions[:-1]))
        if first.sum() < self.total:
            return None
        if first.sum() > self.total or positions[0] < 0 or positions[-1] >= self.total:
            raise RuntimeError(f"shard {shard}: rows at positions outside 0..{self.total - 1}")
        keep = order[first]
        return {k: v[keep] for k, v in merged.items()}


@dataclass
class ShardRowsWriter:
    """Gathers scored rows per shard; writes each shard's score file once it is complete.

    Holds the rows of the shards not yet complete (on the worker, never the driver).
    """

    targets: dict[str, str]  # shard -> its score file's URI
    columns: tuple[str, ...]
    pending: dict[str, _Gathered] = field(default_factory=dict)

    def add(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Take a scored batch; returns one row (shard, rows) per score file written."""
        shards = np.asarray(batch["shard"])
        written: list[tuple[str, int]] = []
        for shard in dict.fromkeys(shards.tolist()):
            rows = np.nonzero(shards == shard)[0]
            state = self.pending.setdefault(shard, _Gathered())
            state.add({k: np.asarray(v)[rows] for k, v in batch.items()})
            complete = state.complete(shard)
            if complete is None:
                continue
            write_score_file(scores_to_table(complete, self.columns), self.targets[shard])
            del self.pending[shard]
            written.append((shard, state.total or 0))
        return {
            "shard": np.array([s for s, _ in written], dtype=object),
            "rows": np.array([n for _, n in written], dtype=np.int64),
        }


class ClipScorerWriter:
    """Ray Data actor: a `ClipScorer` whose rows go to their shard's score file from here.

    Its name keeps "ClipScorer" in the actor's process title (MapWorker(MapBatches(
    ClipScorerWriter))), which the cluster tools look for.
    """

    def __init__(self, *, targets: dict[str, str], columns: list[str], **scorer: Any) -> None:
        # imported here: this module is light (the driver and the readers import it)
        from cleaner.scoring.scorer import ClipScorer

        self.scorer = ClipScorer(**scorer)
        self.writer = ShardRowsWriter(targets, tuple(columns))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.writer.add(self.scorer(batch))
