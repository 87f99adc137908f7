"""Writing score rows on the workers: part files per scored batch, one final file per shard.

The driver never holds score rows. A Ray Data stage after the scorers writes each batch's
rows as part files (one per shard in the batch, named by the rows' shard positions, so a
retried batch overwrites its own part) and passes on only where they went and which
positions they hold. The driver counts positions per shard; once a shard is complete a Ray
task merges its parts into `<scores>/<shard>.parquet` (atomic write, rows in shard order,
duplicates from retries dropped) and deletes them. The final file records which process
and node wrote it in its Parquet metadata.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cleaner.reading import uri as uri_lib

PARTS_DIR = "_parts"
WRITER_METADATA_KEY = b"clipcleaner.writer"
PART_COLUMNS = ("shard", "part", "positions", "shard_total")


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


def parts_uri(scores_uri: str, name: str) -> str:
    """The folder of one shard's part files (`name` is the shard's score-file name)."""
    return uri_lib.join(scores_uri, PARTS_DIR, name.removesuffix(".parquet"))


def write_score_parts(
    batch: dict[str, np.ndarray], *, scores_uri: str, names: dict[str, str], columns: list[str]
) -> dict[str, np.ndarray]:
    """Ray Data UDF (on a worker): write a scored batch as one part file per shard in it.

    Returns one small row per part: shard, part URI, the shard positions it holds (int64
    bytes) and the shard's sample count when this part carries it (-1 otherwise).
    """
    shards = np.asarray(batch["shard"])
    out: dict[str, list] = {name: [] for name in PART_COLUMNS}
    for shard in np.unique(shards):
        rows = np.nonzero(shards == shard)[0]
        part = {k: np.asarray(v)[rows] for k, v in batch.items()}
        positions = np.sort(part["shard_pos"].astype(np.int64))
        name = f"{positions[0]:09d}-{positions[-1]:09d}-{len(positions)}.parquet"
        target = uri_lib.join(parts_uri(scores_uri, names[str(shard)]), name)
        uri_lib.write_bytes(target, table_to_parquet_bytes(scores_to_table(part, tuple(columns))))
        totals = part["shard_total"][part["shard_total"] >= 0]
        out["shard"].append(str(shard))
        out["part"].append(target)
        out["positions"].append(positions.tobytes())
        out["shard_total"].append(int(totals[0]) if len(totals) else -1)
    return {
        "shard": np.array(out["shard"], dtype=object),
        "part": np.array(out["part"], dtype=object),
        "positions": np.array(out["positions"], dtype=object),
        "shard_total": np.array(out["shard_total"], dtype=np.int64),
    }


def writer_identity() -> dict:
    """Which process and Ray node runs this code (recorded in each score file)."""
    import ray

    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    return {"pid": os.getpid(), "node_id": node, "host": os.uname().nodename}


def merge_shard_parts(parts: list[str], target: str, total: int) -> int:
    """Merge a shard's part files into its score file (atomic), then delete the parts.

    Rows come out in shard order, one per shard position (a retried batch may have written
    the same rows twice). Raises if the parts do not hold exactly `total` positions.
    Idempotent: parts are deleted only after the score file is written, so a retry that
    finds some gone (its first attempt's node died while deleting) only finishes the job.
    """
    try:
        tables = [pq.read_table(io.BytesIO(uri_lib.read_bytes(p))) for p in parts]
    except OSError:
        if not uri_lib.exists(target) or all(uri_lib.exists(p) for p in parts):
            raise
        for part in parts:
            uri_lib.remove(part)
        return total
    table = pa.concat_tables(tables)
    table = table.sort_by("shard_pos")
    positions = table.column("shard_pos").to_numpy()
    keep = np.ones(len(positions), dtype=bool)
    keep[1:] = positions[1:] != positions[:-1]
    if not keep.all():
        table = table.filter(pa.array(keep))
    if table.num_rows != total:
        raise RuntimeError(f"{target}: {table.num_rows} distinct rows for {total} samples")
    metadata = {WRITER_METADATA_KEY: json.dumps(writer_identity()).encode()}
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    uri_lib.write_bytes(target, table_to_parquet_bytes(table))
    for part in parts:
        uri_lib.remove(part)
    return total


def score_file_writer(path: str) -> dict | None:
    """The writer identity recorded in a score file (None if the file has none)."""
    metadata = pq.read_schema(io.BytesIO(uri_lib.read_bytes(path))).metadata or {}
    raw = metadata.get(WRITER_METADATA_KEY)
    return json.loads(raw) if raw else None


@dataclass
class _Pending:
    parts: dict[str, None] = field(default_factory=dict)  # ordered set of part URIs
    positions: list[np.ndarray] = field(default_factory=list)
    total: int | None = None


@dataclass
class ShardCompletion:
    """Driver-side bookkeeping: which shards have all their rows written as parts.

    Holds only positions (8 bytes a row) of shards still in flight, never score rows.
    """

    pending: dict[str, _Pending] = field(default_factory=dict)

    def add(
        self, shard: str, part: str, positions: bytes, total: int
    ) -> tuple[list[str], int] | None:
        """Record one part; once every position is covered: (the shard's parts, its total)."""
        state = self.pending.setdefault(shard, _Pending())
        if part not in state.parts:
            state.parts[part] = None
            state.positions.append(np.frombuffer(positions, dtype=np.int64))
        if total >= 0:
            state.total = total
        if state.total is None:
            return None
        seen = np.unique(np.concatenate(state.positions))
        state.positions = [seen]
        if len(seen) < state.total:
            return None
        if len(seen) > state.total or seen[0] < 0 or seen[-1] >= state.total:
            raise RuntimeError(f"shard {shard}: rows at positions outside 0..{state.total - 1}")
        del self.pending[shard]
        return list(state.parts), state.total

    def unfinished(self) -> list[str]:
        return sorted(self.pending)
