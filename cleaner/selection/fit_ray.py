"""The global fit over Ray Data, for runs whose score table does not fit one node.

Same outputs as `cleaner.selection.fit_in_memory.fit_and_build_manifest` (the in-memory fit), built without
gathering the score table on the driver:

1. duplicate keys: a Ray Data groupby on the key column; only keys seen more than once
   (and their shard and position) come back to the driver;
2. probe: `distributed.fit_probe_streaming` over the usable rows' embeddings;
3. selection: `distributed.fit_selection`, whose passes read only label, key and
   p_label / max_p per source (the probe's come from a map over the embeddings);
4. manifest: one Ray task per score file applies the fitted probe and selection and
   builds that shard's manifest rows with `cleaner.selection.fit_in_memory.build_manifest` (the in-memory
   fit's own code); the driver streams the parts, in shard order, into manifest.parquet,
   holding one part at a time, and keeps only `fit.SUMMARY_COLUMNS` for the summary.

`choose_mode` picks between the two fits by the estimated in-memory size.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cleaner.config import SelectionConfig
from cleaner.reading import uri as uri_lib
from cleaner.reading.shards import STATUS_OK
from cleaner.scoring.prompts import PromptBank
from cleaner.selection.engine import (
    FittedSelection,
    StreamingProbe,
    choose_fit_mode,
    estimate_in_memory_bytes,
    fit_probe_streaming,
    fit_selection,
)
from cleaner.selection.fit_in_memory import (
    NOTHING_USABLE,
    SMALL_COLUMNS,
    SUMMARY_COLUMNS,
    ScoreBatch,
    build_manifest,
    duplicate_rows_in_memory,
    engine_options,
    source_columns,
    summary_with_fit,
)

GIB = 1024**3
DEFAULT_MEMORY_FRACTION = 0.5  # of the driver's available memory, when no budget is set
PARTS_IN_FLIGHT_PER_CPU = 2  # manifest tasks queued per cluster CPU


@dataclass(frozen=True)
class FitPlan:
    """Which fit runs, and why."""

    mode: str  # "in_memory" | "distributed"
    samples: int
    embed_dim: int
    estimated_gb: float
    budget_gb: float
    requested: str

    def as_dict(self) -> dict:
        return {
            "mode": self.mode,
            "requested": self.requested,
            "samples": self.samples,
            "embed_dim": self.embed_dim,
            "estimated_in_memory_gb": round(self.estimated_gb, 3),
            "memory_budget_gb": round(self.budget_gb, 3),
        }


def available_memory_bytes() -> int:
    """MemAvailable of this node (Linux), else the physical memory size."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def score_file_shape(score_uris: list[str]) -> tuple[int, int]:
    """(rows, embedding width) of the score files, from their Parquet footers only."""
    rows, width = 0, 0
    for uri in score_uris:
        fs, path = uri_lib.resolve(uri)
        with fs.open_input_file(path) as f:
            parquet = pq.ParquetFile(f)
            rows += parquet.metadata.num_rows
            if not width:
                embedding = parquet.schema_arrow.field("embedding").type
                width = int(getattr(embedding, "list_size", 0))
    return rows, width


def choose_mode(cfg: SelectionConfig, score_uris: list[str], num_classes: int) -> FitPlan:
    """The fit mode for these score files: cfg.fit_mode, or by size when it is "auto"."""
    samples, width = score_file_shape(score_uris)
    budget = (
        int(cfg.fit_memory_gb * GIB)
        if cfg.fit_memory_gb is not None
        else int(available_memory_bytes() * DEFAULT_MEMORY_FRACTION)
    )
    estimate = estimate_in_memory_bytes(samples, width, num_classes)
    mode = cfg.fit_mode
    if mode == "auto":
        mode = choose_fit_mode(samples, width, max(budget, 1), num_classes=num_classes)
    return FitPlan(mode, samples, width, estimate / GIB, budget / GIB, cfg.fit_mode)


def read_score_dataset(score_uris: list[str], columns: list[str]):
    """The score files as one Ray Dataset (rows in file order within each file)."""
    import ray.data

    fs, _ = uri_lib.resolve(score_uris[0])
    paths = [uri_lib.resolve(uri)[1] for uri in score_uris]
    return ray.data.read_parquet(paths, filesystem=fs).select_columns(columns)


def find_duplicate_rows(ds, shard_order: dict[str, int]) -> dict[str, list[tuple[int, str]]]:
    """Per shard: (shard_pos, first shard) of each repeat of a key seen earlier in shard
    order (the in-memory fit's rule). Only repeated keys reach the driver."""
    counts = ds.select_columns(["key"]).groupby("key").count()
    repeated = counts.map_batches(_rows_where_count_above_one, batch_format="pyarrow")
    keys = {row["key"] for row in repeated.take_all()}
    if not keys:
        return {}
    rows = (
        ds.select_columns(["key", "shard", "shard_pos"])
        .map_batches(_rows_with_keys, fn_kwargs={"keys": keys}, batch_format="pyarrow")
        .take_all()
    )
    rows.sort(key=lambda r: (shard_order[r["shard"]], int(r["shard_pos"])))
    keys_in_order = np.array([r["key"] for r in rows], dtype=object)
    shards_in_order = np.array([r["shard"] for r in rows], dtype=object)
    repeats: dict[str, list[tuple[int, str]]] = {}
    for index, first_shard in duplicate_rows_in_memory(keys_in_order, shards_in_order):
        row = rows[index]
        repeats.setdefault(row["shard"], []).append((int(row["shard_pos"]), first_shard))
    return repeats


def _rows_where_count_above_one(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.greater(batch.column("count()"), 1)).select(["key"])


def _rows_with_keys(batch: pa.Table, keys: set[str]) -> pa.Table:
    return batch.filter(pc.is_in(batch.column("key"), pa.array(sorted(keys), pa.string())))


class UsableRows:
    """map_batches: keep the rows that are ok and not a repeated key."""

    def __init__(self, repeats: dict[str, list[tuple[int, str]]]) -> None:
        self.repeats = {(shard, pos) for shard, items in repeats.items() for pos, _ in items}

    def __call__(self, batch: pa.Table) -> pa.Table:
        ok = np.asarray(batch.column("status").to_pylist(), dtype=object) == STATUS_OK
        if self.repeats:
            shards = batch.column("shard").to_pylist()
            positions = batch.column("shard_pos").to_pylist()
            ok &= np.array(
                [(s, p) not in self.repeats for s, p in zip(shards, positions, strict=True)],
                dtype=bool,
            )
        return batch.filter(pa.array(ok))


def manifest_part(
    score_uri: str,
    repeats: list[tuple[int, str]],
    fitted: FittedSelection,
    probe: StreamingProbe | None,
    cfg: SelectionConfig,
    class_names: list[str],
    bank: PromptBank,
    tau: float,
) -> pa.Table:
    """One score file's manifest rows under the fitted probe and selection."""
    fs, path = uri_lib.resolve(score_uri)
    with fs.open_input_file(path) as f:
        table = pq.read_table(f, columns=[*SMALL_COLUMNS, "embedding"])
    row_of = {int(p): i for i, p in enumerate(table.column("shard_pos").to_pylist())}
    duplicate_rows = np.array(
        [(row_of[pos], first) for pos, first in repeats], dtype=object
    ).reshape(-1, 2)
    batch = ScoreBatch(table, duplicate_rows)
    probe_probs = None
    if probe is not None:
        probe_probs = probe.predict_proba(
            batch.usable_embeddings, batch.keys[batch.ok_idx].astype(str)
        )
    return build_manifest(batch, fitted, probe_probs, cfg, class_names, bank, tau)


def ordered_results(task, argument_lists: Iterable[tuple], window: int) -> Iterator:
    """Run `task.remote(*args)` for each argument list and yield the results in that
    order, keeping at most `window` tasks submitted and not yet collected."""
    import ray

    pending: list = []
    for args in argument_lists:
        pending.append(task.remote(*args))
        if len(pending) >= window:
            yield ray.get(pending.pop(0))
    while pending:
        yield ray.get(pending.pop(0))


def fit_and_write_manifest_distributed(
    score_uris: list[str],
    shards: list[str],
    cfg: SelectionConfig,
    class_names: list[str],
    bank: PromptBank,
    tau: float,
    manifest_uri: str,
    seed: int = 0,
) -> dict:
    """The distributed global fit; writes manifest_uri and returns the summary parts.

    score_uris[i] holds the scores of shards[i]; the manifest lists them in that order.
    """
    import ray

    num_classes = len(class_names)
    start = time.perf_counter()

    def elapsed() -> str:
        return f"{time.perf_counter() - start:.1f} s"

    ds = read_score_dataset(score_uris, [*SMALL_COLUMNS, "embedding"])
    repeats = find_duplicate_rows(ds, {shard: i for i, shard in enumerate(shards)})
    print(
        f"[fit] repeated keys: {sum(len(v) for v in repeats.values())} rows ({elapsed()})",
        flush=True,
    )
    # materialised once (in the object store, not on the driver): the probe's epochs and
    # the selection's passes then read blocks instead of the score files
    usable = ds.map_batches(UsableRows(repeats), batch_format="pyarrow").materialize()
    probe, fitted = None, None
    num_usable = usable.count()  # a materialised dataset knows its row count
    if num_usable == 0:
        print(NOTHING_USABLE, flush=True)
    elif cfg.probe != "none":
        print(f"[fit] streaming probe ({cfg.probe}) over the embeddings", flush=True)
        probe = fit_probe_streaming(
            usable,
            "embedding",
            "label",
            num_classes,
            mode=cfg.probe,
            key_column="key",
            folds=cfg.probe_folds,
            C=cfg.probe_c,
            seed=seed,
        )
        usable = probe.transform(usable)
        print(f"[fit] probe trained ({elapsed()})", flush=True)
    if num_usable > 0:
        fitted = fit_selection(
            usable,
            num_classes,
            source_columns=source_columns(probe is not None),
            key_column="key",
            **engine_options(cfg),
        )
        print(f"[fit] GMM selection fitted over Ray Data blocks ({elapsed()})", flush=True)
    refs = {
        "fitted": ray.put(fitted),
        "probe": ray.put(probe),
        "bank": ray.put(bank),
    }
    task = ray.remote(manifest_part).options(num_cpus=1)
    window = max(2, PARTS_IN_FLIGHT_PER_CPU * int(ray.cluster_resources().get("CPU", 1)))

    argument_lists = (
        (
            score_uri,
            repeats.get(shard, []),
            refs["fitted"],
            refs["probe"],
            cfg,
            class_names,
            refs["bank"],
            tau,
        )
        for score_uri, shard in zip(score_uris, shards, strict=True)
    )

    kept: dict[str, list[np.ndarray]] = {name: [] for name in SUMMARY_COLUMNS}
    written = 0
    with ManifestWriter(manifest_uri) as writer:
        for part in ordered_results(task, argument_lists, window):
            writer.write(part)
            for name in SUMMARY_COLUMNS:
                kept[name].append(part.column(name).to_numpy(zero_copy_only=False))
            written += 1
            if written % 50 == 0 or written == len(score_uris):
                print(
                    f"[fit] manifest: {written}/{len(score_uris)} shards ({elapsed()})", flush=True
                )
    columns = {name: np.concatenate(parts) for name, parts in kept.items()}
    return summary_with_fit(columns, fitted, class_names)


def read_manifest_for_report(manifest_uri: str) -> pa.Table:
    """The manifest without its list columns (the report does not read them)."""
    fs, path = uri_lib.resolve(manifest_uri)
    with fs.open_input_file(path) as f:
        schema = pq.read_schema(f)
        columns = [
            field.name
            for field in schema
            if not pa.types.is_fixed_size_list(field.type) and not pa.types.is_list(field.type)
        ]
    with fs.open_input_file(path) as f:
        return pq.read_table(f, columns=columns)


class ManifestWriter:
    """Streams tables into one Parquet file: a temp file renamed on success locally; on S3
    a multipart upload that only becomes visible when closed."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.fs, self.path = uri_lib.resolve(uri)
        self.target = self.path if uri_lib.is_s3(uri) else f"{self.path}.tmp-{os.getpid()}"
        self.stream = None
        self.writer: pq.ParquetWriter | None = None

    def __enter__(self) -> ManifestWriter:
        if not uri_lib.is_s3(self.uri):
            uri_lib.makedirs(os.path.dirname(self.path))
        self.stream = self.fs.open_output_stream(self.target)
        return self

    def write(self, table: pa.Table) -> None:
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.stream, table.schema)
        self.writer.write_table(table)

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.writer is not None:
            self.writer.close()
        self.stream.close()
        if exc_type is None:
            if not uri_lib.is_s3(self.uri):
                os.replace(self.target, self.path)
        elif uri_lib.exists(self.uri if uri_lib.is_s3(self.uri) else self.target):
            self.fs.delete_file(self.target)  # no partial manifest is left behind
