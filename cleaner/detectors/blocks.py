"""The detectors' view of the score files: blocks of usable rows (key, label, embedding),
and the passes over them, in this process or as Ray tasks.

A block is one score file's usable rows: status ok and a label (the rows the selection
scores). Blocks stay where they are made: `RayBlocks` loads each score file in a Ray task
and keeps only the object reference, so a pass (`map`) is one task per group of blocks and
its small result (a gradient of per-class vectors, counts, a sample) is all that moves.
`LocalBlocks` runs the same functions over in-memory blocks (tests, small runs).

A key seen twice (a duplicate the manifest marks failed) is used twice here: detectors
fit on usable rows and the manifest applies them to the first occurrence only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cleaner.reading import uri as uri_lib
from cleaner.reading.shards import STATUS_OK
from cleaner.selection.probe_streaming import stable_hash
from cleaner.selection.score_table import embeddings_of

# key (object), key_hash (uint64), label / true_label (int64), embedding (float16 [n, D])
Block = dict[str, np.ndarray]

BLOCK_COLUMNS = ["key", "label", "true_label", "status", "embedding"]


def block_from_table(table: pa.Table) -> Block:
    """The usable rows of a score table (status ok, label >= 0) as a block."""
    status = np.asarray(table.column("status").to_pylist(), dtype=object)
    labels = table.column("label").to_numpy().astype(np.int64)
    rows = np.flatnonzero((status == STATUS_OK) & (labels >= 0))
    keys = np.asarray(table.column("key").to_pylist(), dtype=object)[rows]
    return {
        "key": keys,
        "key_hash": stable_hash(keys.astype(str)),
        "label": labels[rows],
        "true_label": table.column("true_label").to_numpy().astype(np.int64)[rows],
        "embedding": embeddings_of(table)[rows],
    }


def read_block(score_uri: str) -> Block:
    """One score file's usable rows."""
    fs, path = uri_lib.resolve(score_uri)
    with fs.open_input_file(path) as f:
        return block_from_table(pq.read_table(f, columns=BLOCK_COLUMNS))


def concat_blocks(blocks: Sequence[Block]) -> Block:
    """Blocks joined row-wise (in order)."""
    if not blocks:
        raise ValueError("no blocks to join")
    return {name: np.concatenate([b[name] for b in blocks]) for name in blocks[0]}


def unit_rows(embedding: np.ndarray) -> np.ndarray:
    """float32 rows scaled to unit length (the stored ones are unit length in float16)."""
    rows = np.asarray(embedding, dtype=np.float32)
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)


def _map_group(fn: Callable, num_args: int, *args_then_blocks) -> list:
    """[fn(block, *args) for each block]: the first num_args positionals are the args, so
    that Ray resolves object references among them (it resolves top-level arguments only)."""
    args, blocks = args_then_blocks[:num_args], args_then_blocks[num_args:]
    return [fn(block, *args) for block in blocks]


def _partitioned_group(fn: Callable, partitions: int, num_args: int, *args_then_blocks):
    args, blocks = args_then_blocks[:num_args], args_then_blocks[num_args:]
    results = [fn(block, *args) for block in blocks]
    parts = tuple([r[p] for r in results] for p in range(partitions))
    return parts if partitions > 1 else parts[0]


def flatten(items) -> list:
    """Items of a partition as LocalBlocks or Ray tasks return them (lists per group)."""
    out: list = []
    for item in items:
        out.extend(item if isinstance(item, list) else [item])
    return out


class LocalBlocks:
    """Blocks held in this process; `map` runs the function over each, here."""

    def __init__(self, blocks: Sequence[Block]) -> None:
        self.blocks = [b for b in blocks if len(b["label"])]

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def map(self, fn: Callable[..., Any], *args: Any) -> list:
        """[fn(block, *args) for each block]."""
        return _map_group(fn, len(args), *args, *self.blocks)

    def map_refs(self, fn: Callable[..., Any], *args: Any) -> list:
        """As `map` (no object store here): the results themselves."""
        return self.map(fn, *args)

    def map_partitioned(self, fn: Callable[..., Any], partitions: int, *args: Any) -> list[list]:
        """fn(block, *args) returns `partitions` items; [p] -> the items of partition p."""
        results = self.map(fn, *args)
        return [[r[p] for r in results] for p in range(partitions)]

    def run(self, fn: Callable[..., Any], *args: Any, **options: Any) -> Any:
        """fn(*args) here (a Ray task in RayBlocks)."""
        return fn(*args)

    def get(self, value: Any) -> Any:
        return value

    def release(self) -> None:
        self.blocks = []


def _load_block(score_uri: str) -> Block:
    return read_block(score_uri)


class RayBlocks:
    """One block per score file, loaded by Ray tasks and kept in the object store.

    `map` runs `fn(block, *args)` for every block in at most `max_tasks` tasks (one group
    of blocks each) and returns the per-block results in block order; arguments that are
    object references are resolved in the tasks, never on the driver.
    """

    def __init__(self, score_uris: Sequence[str], max_tasks: int | None = None) -> None:
        import ray

        load = ray.remote(_load_block).options(num_cpus=1)
        self.refs = [load.remote(uri) for uri in score_uris]
        ray.wait(self.refs, num_returns=len(self.refs), fetch_local=False)
        cpus = int(ray.cluster_resources().get("CPU", 1))
        count = max(1, min(len(self.refs), max_tasks or cpus, cpus))
        self.groups = [self.refs[i::count] for i in range(count)]

    @property
    def num_blocks(self) -> int:
        return len(self.refs)

    def map_refs(self, fn: Callable[..., Any], *args: Any) -> list:
        """One object reference per group, each to the list of its blocks' results."""
        import ray

        task = ray.remote(_map_group).options(num_cpus=1)
        return [task.remote(fn, len(args), *args, *group) for group in self.groups]

    def map(self, fn: Callable[..., Any], *args: Any) -> list:
        """Per-block results, in block order (each result should be small)."""
        import ray

        per_group = ray.get(self.map_refs(fn, *args))
        out: list = [None] * len(self.refs)
        count = len(self.groups)
        for g, results in enumerate(per_group):
            for j, result in enumerate(results):
                out[g + j * count] = result
        return out

    def map_partitioned(self, fn: Callable[..., Any], partitions: int, *args: Any) -> list[list]:
        """fn(block, *args) returns `partitions` items; [p] -> object references to the
        items of partition p (one per task: its blocks' items of p, as a list), so that a
        reduce task reads only its partition."""
        import ray

        task = ray.remote(_partitioned_group).options(num_cpus=1, num_returns=partitions)
        outputs = [task.remote(fn, partitions, len(args), *args, *group) for group in self.groups]
        if partitions == 1:
            outputs = [[ref] for ref in outputs]
        return [[refs[p] for refs in outputs] for p in range(partitions)]

    def run(self, fn: Callable[..., Any], *args: Any, **options: Any) -> Any:
        """fn(*args) as a Ray task (options: num_cpus, num_gpus); an object reference."""
        import ray

        return ray.remote(fn).options(**{"num_cpus": 1, **options}).remote(*args)

    def get(self, value: Any) -> Any:
        import ray

        return ray.get(value)

    def release(self) -> None:
        self.refs, self.groups = [], []
