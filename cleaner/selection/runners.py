"""Where the selection engine's passes run: a `BlockPass` and the `Runner` protocol.

A pass is a function of one chunk of rows whose outputs fold exactly, in any order and
grouping (`BlockPass`). A runner applies it to every chunk of the data and folds the
outputs: `LocalRunner` over one in-memory batch (this module), `BlockTasksRunner`
over the blocks of a Ray Dataset. `Runner.derive` maps every chunk once to something the
runner keeps (in memory, or in the object store), and returns a runner whose passes run
on those instead: the engine keeps its class-grouped loss scores that way
(`cleaner.selection.grouped`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from cleaner.selection.em import MAX_EXACT_ROWS
from cleaner.selection.fitted import Batch

if TYPE_CHECKING:
    import pyarrow as pa
    import ray.data

MAX_FIT_TASKS = 64  # tasks per pass of BlockTasksRunner, at most (each folds a group of blocks)


def fold_stats(acc: Batch | None, part: Batch) -> Batch:
    """Exact reduction of one-row statistics: min_* by minimum, max_* by maximum,
    "columns" by union of comma-joined names, everything else (integers) by sum."""
    out: Batch = {}
    for name, values in part.items():
        values = np.asarray(values)
        previous = None if acc is None else acc.get(name)
        if name == "columns":
            names = {n for text in values for n in str(text).split(",") if n}
            if previous is not None:
                names |= set(str(previous[0]).split(","))
            out[name] = np.array([",".join(sorted(names))])
        elif name.startswith("min_"):
            reduced = values.min(axis=0, keepdims=True)
            out[name] = reduced if previous is None else np.minimum(previous, reduced)
        elif name.startswith("max_"):
            reduced = values.max(axis=0, keepdims=True)
            out[name] = reduced if previous is None else np.maximum(previous, reduced)
        else:
            reduced = values.sum(axis=0, keepdims=True)
            out[name] = reduced if previous is None else previous + reduced
    return out


class BlockPass:
    """A function of a chunk whose outputs fold exactly, in any order and grouping."""

    def __call__(self, batch: Any) -> Batch:
        raise NotImplementedError

    def fold(self, acc: Batch | None, part: Batch) -> Batch:
        """Reduce a new output (one or more rows) into the accumulated one."""
        return fold_stats(acc, part)

    def over_chunks(self, batch: Batch, chunk_rows: int) -> Batch:
        """The folded output of a whole block, computed chunk by chunk (bounded memory)."""
        acc: Batch | None = None
        for chunk in chunks_of(batch, chunk_rows):
            acc = self.fold(acc, self(chunk))
        assert acc is not None
        return acc


class Runner(Protocol):
    """Runs passes over every chunk of some data (see the module docstring)."""

    def __call__(self, fn: BlockPass) -> Batch: ...

    def derive(self, build: Callable[[Batch], Any]) -> Runner: ...


def check_rows(chunk_rows: int) -> int:
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, (int, np.integer)):
        raise ValueError(f"chunk / batch rows must be a positive integer, got {chunk_rows!r}")
    if not 1 <= chunk_rows <= MAX_EXACT_ROWS:
        raise ValueError(f"chunk / batch rows must be in [1, {MAX_EXACT_ROWS}], got {chunk_rows}")
    return int(chunk_rows)


def chunks_of(batch: Batch, chunk_rows: int) -> list[Batch]:
    """Views of a batch's rows, chunk_rows at a time (one empty chunk for an empty batch)."""
    num_rows = len(next(iter(batch.values())))
    return [
        {name: values[start : start + chunk_rows] for name, values in batch.items()}
        for start in range(0, max(num_rows, 1), chunk_rows)
    ]


@dataclass(frozen=True, eq=False)
class LocalRunner:
    """Runs passes in this process over a list of chunks (or of what they were mapped to)."""

    items: list

    def __call__(self, fn: BlockPass) -> Batch:
        acc: Batch | None = None
        for item in self.items:
            acc = fn.fold(acc, fn(item))
        return acc or {}

    def derive(self, build: Callable[[Batch], Any]) -> LocalRunner:
        return LocalRunner([build(item) for item in self.items])


def local_runner(batch: Batch, chunk_rows: int) -> LocalRunner:
    """Runs passes on one in-memory batch, chunk by chunk (the in-memory path)."""
    return LocalRunner(chunks_of(batch, check_rows(chunk_rows)))


def _block_batches(blocks: tuple[pa.Table, ...]) -> Iterator[Batch]:
    from ray.data.block import BlockAccessor

    for block in blocks:
        if block.num_rows:
            yield BlockAccessor.for_block(block).to_batch_format("numpy")


def _fold_blocks(fn: BlockPass, chunk_rows: int, *blocks: pa.Table) -> Batch:
    """One task of a pass: the folded output of `fn` over a group of blocks."""
    acc: Batch | None = None
    for batch in _block_batches(blocks):
        acc = fn.fold(acc, fn.over_chunks(batch, chunk_rows))
    return acc or {}


def _derive_blocks(build: Callable[[Batch], Any], chunk_rows: int, *blocks: pa.Table) -> list:
    """One task of `derive`: `build` of every chunk of a group of blocks (kept in the object
    store by the runner)."""
    return [
        build(chunk) for batch in _block_batches(blocks) for chunk in chunks_of(batch, chunk_rows)
    ]


def _fold_items(fn: BlockPass, items: list) -> Batch:
    """One task of a pass over derived items: the folded output of `fn`."""
    return LocalRunner(items)(fn)


@dataclass(frozen=True, eq=False)
class BlockTasksRunner:
    """Runs passes as Ray tasks, one per group of blocks (or of derived items), folded on
    the driver. The EM's tens of passes then cost a few task launches each on warm
    workers, instead of a Ray Data job each (or an actor start per fit)."""

    groups: list[list]  # ObjectRefs: blocks, or one list of derived items per group
    chunk_rows: int
    derived: bool = False

    def __call__(self, fn: BlockPass) -> Batch:
        import ray

        fn_ref = ray.put(fn)
        if self.derived:
            task = ray.remote(_fold_items).options(num_cpus=1)
            refs = [task.remote(fn_ref, group[0]) for group in self.groups]
        else:
            task = ray.remote(_fold_blocks).options(num_cpus=1)
            refs = [task.remote(fn_ref, self.chunk_rows, *group) for group in self.groups]
        acc: Batch | None = None
        for part in ray.get(refs):
            if part:
                acc = fn.fold(acc, part)
        return acc or {}

    def derive(self, build: Callable[[Batch], Any]) -> BlockTasksRunner:
        """Each group's chunks mapped by `build`, kept in the object store (one object per
        group, never fetched by the driver); later passes read those instead of blocks."""
        import ray

        if self.derived:
            raise ValueError("derive() of derived items is not supported")
        task = ray.remote(_derive_blocks).options(num_cpus=1)
        build_ref = ray.put(build)
        refs = [task.remote(build_ref, self.chunk_rows, *group) for group in self.groups]
        return BlockTasksRunner([[ref] for ref in refs], self.chunk_rows, derived=True)


def block_tasks_runner(
    ds: ray.data.Dataset, chunk_rows: int, max_tasks: int = MAX_FIT_TASKS
) -> BlockTasksRunner:
    """A Runner over a materialised Dataset's blocks: each pass is one Ray task per group
    of blocks (at most one group per cluster CPU), reading its blocks from the object
    store, folded on the driver."""
    import ray

    chunk_rows = check_rows(chunk_rows)
    refs = ds.to_arrow_refs()
    cpus = int(ray.cluster_resources().get("CPU", 1))
    count = max(1, min(len(refs), max_tasks, cpus))
    return BlockTasksRunner([refs[i::count] for i in range(count)], chunk_rows)
