"""The global fit over Ray Data, for runs whose score table does not fit one node.

Same outputs as `fit_in_memory.fit_and_build_manifest` (the in-memory fit), built
without gathering the score table on the driver:

1. duplicate keys: a hash-partitioned search in Ray tasks (`find_duplicate_rows`); only
   keys seen more than once (and their shard and position) come back to the driver;
2. probe: `probe_streaming.fit_probe_streaming` over the usable rows' embeddings;
3. selection: `fit_selection` (below: the EM engine over Ray Data blocks), whose
   passes read only label, key and p_label / max_p per source (the probe's come from a
   map over the embeddings);
4. manifest: one Ray task per score file applies the fitted probe and selection and
   builds that shard's manifest rows with `manifest.build_manifest` (the in-memory
   fit's own code); the driver streams the parts, in shard order, into manifest.parquet,
   holding one part at a time, and keeps only `summary.SUMMARY_COLUMNS` for the summary.

`fit_plan.choose_mode` picks between the two fits by the estimated in-memory size.

`fit_selection` runs the engine's passes (`cleaner.selection.engine`) as Ray tasks over
the materialised blocks of the selection's small columns (`runners.block_tasks_runner`);
`distributed_select` adds the selection columns to the Dataset.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cleaner.config import SelectionConfig
from cleaner.detectors.apply import (
    FittedDetectors,
    apply_detectors,
    calibration_part,
    compare_detectors,
    summary_columns,
)
from cleaner.reading import uri as uri_lib
from cleaner.reading.shards import STATUS_OK
from cleaner.scoring.prompts import PromptBank
from cleaner.selection.engine import make_spec, run_fit
from cleaner.selection.fitted import DEFAULT_BATCH_ROWS, FittedSelection, SelectionSpec
from cleaner.selection.manifest import ManifestWriter, build_manifest, with_relative_shards
from cleaner.selection.probe_streaming import StreamingProbe, fit_probe_streaming, stable_hash
from cleaner.selection.rules import DEFAULT_REG_COVAR, GmmMode
from cleaner.selection.runners import block_tasks_runner
from cleaner.selection.score_table import (
    NOTHING_USABLE,
    SMALL_COLUMNS,
    ScoreBatch,
    duplicate_rows_in_memory,
    engine_options,
    source_columns,
)
from cleaner.selection.summary import SUMMARY_COLUMNS, summary_with_fit

if TYPE_CHECKING:
    import ray.data


def selection_input(ds: ray.data.Dataset, spec: SelectionSpec) -> ray.data.Dataset:
    """The projection the fit reads: label, p_label / max_p per source, and the key."""
    return ds.select_columns(spec.columns())


def fit_selection(
    ds: ray.data.Dataset,
    num_classes: int,
    *,
    source_columns: Mapping[str, tuple[str, str]],
    label_column: str = "label",
    key_column: str | None = None,
    theta_gmm: float = 0.5,
    theta_cons: float = 0.8,
    gmm: GmmMode = "per_class",
    max_iter: int = 100,
    tol: float = 1e-3,
    reg_covar: float = DEFAULT_REG_COVAR,
    batch_rows: int = DEFAULT_BATCH_ROWS,
) -> FittedSelection:
    """Fit the selection over a Ray Dataset without gathering its columns.

    source_columns maps a source name to its (p_label column, max_p column). Only those
    columns, the label and the optional key column are read and materialised once (in
    the object store, never on the driver) for the EM passes (`block_tasks_runner`).
    Raises ValueError for invalid input.
    """
    # deliberately the same typed keywords as select.fit_selection_in_memory: the two
    # entry points of the one engine (Dataset blocks / in-memory batch)
    spec = make_spec(
        num_classes,
        source_columns,
        label_column=label_column,
        key_column=key_column,
        theta_gmm=theta_gmm,
        theta_cons=theta_cons,
        gmm=gmm,
        max_iter=max_iter,
        tol=tol,
        reg_covar=reg_covar,
    )
    small = selection_input(ds, spec).materialize()
    return run_fit(spec, block_tasks_runner(small, batch_rows))


def distributed_select(
    ds: ray.data.Dataset,
    num_classes: int,
    *,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    **fit_options: Any,
) -> ray.data.Dataset:
    """`fit_selection` (fit_options: its keyword arguments), then the dataset with
    is_clean, backfilled, clean_score and, per source, loss_score_*, gmm_p_clean_*,
    consistency_* added (lazy map_batches)."""
    fitted = fit_selection(ds, num_classes, batch_rows=batch_rows, **fit_options)
    return fitted.transform(ds, batch_rows=batch_rows)


PARTS_IN_FLIGHT_PER_CPU = 2  # manifest tasks queued per cluster CPU


def _read_score_file(batch: dict[str, np.ndarray], columns: list[str]) -> pa.Table:
    """Ray Data UDF: the `columns` of the one score file named in the batch."""
    (uri,) = batch["uri"]
    fs, path = uri_lib.resolve(str(uri))
    with fs.open_input_file(path) as f:
        return pq.read_table(f, columns=columns)


def read_score_dataset(score_uris: list[str], columns: list[str]):
    """The score files as one Ray Dataset (one block per file, rows in file order), read
    by plain Ray Data tasks, which Ray runs again when their node is lost. (Ray Data's
    read_parquet lists files through FooterReader actors that are not restarted: losing
    the node of one fails the whole read; docs/reliability.md.)"""
    import ray.data

    uris = ray.data.from_items(
        [{"uri": u} for u in score_uris], override_num_blocks=len(score_uris)
    )
    return uris.map_batches(
        _read_score_file, batch_size=1, batch_format="numpy", fn_kwargs={"columns": list(columns)}
    )


MAX_KEY_PARTITIONS = 256  # hash partitions of the duplicate-key search, at most


def _key_partitions(score_uri: str, shard_index: int, partitions: int):
    """Map side: one score file's (key, shard_pos, shard_index) rows, split by key hash."""
    fs, path = uri_lib.resolve(score_uri)
    with fs.open_input_file(path) as f:
        table = pq.read_table(f, columns=["key", "shard_pos"])
    table = table.append_column(
        "shard_index", pa.array(np.full(table.num_rows, shard_index, dtype=np.int64))
    )
    keys = np.asarray(table.column("key").to_pylist(), dtype=object).astype(str)
    part = (stable_hash(keys) % np.uint64(partitions)).astype(np.int64)
    parts = [table.filter(pa.array(part == p)) for p in range(partitions)]
    return parts if partitions > 1 else parts[0]


def _repeated_in_partition(*parts: pa.Table) -> pa.Table:
    """Reduce side: the rows of one hash partition whose key appears more than once."""
    table = pa.concat_tables(parts)
    if table.num_rows == 0:
        return table
    counts = pc.value_counts(table.column("key"))
    repeated = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
    return table.filter(pc.is_in(table.column("key"), value_set=repeated))


def find_duplicate_rows(
    score_uris: list[str], shards: list[str]
) -> dict[str, list[tuple[int, str]]]:
    """Per shard: (shard_pos, first shard) of each repeat of a key seen earlier in shard
    order (the in-memory fit's rule); score_uris[i] holds the scores of shards[i].

    A hash-partitioned search in plain Ray tasks: one task per score file splits its keys
    by hash into P partitions (P = cluster CPUs, at most MAX_KEY_PARTITIONS), one task per
    partition keeps the keys seen more than once. Only those rows reach the driver. (Ray
    Data's groupby did the same with shuffle actors: 90 s of start-up for 400 rows here.)
    """
    import ray

    if not score_uris:
        return {}
    partitions = max(1, min(MAX_KEY_PARTITIONS, int(ray.cluster_resources().get("CPU", 1))))
    split = ray.remote(_key_partitions).options(num_returns=partitions, num_cpus=1)
    mapped = [split.remote(uri, i, partitions) for i, uri in enumerate(score_uris)]
    if partitions == 1:
        mapped = [[ref] for ref in mapped]
    reduce = ray.remote(_repeated_in_partition).options(num_cpus=1)
    found = ray.get([reduce.remote(*[refs[p] for refs in mapped]) for p in range(partitions)])
    rows = pa.concat_tables(found) if found else None
    if rows is None or rows.num_rows == 0:
        return {}
    order = np.lexsort((rows.column("shard_pos").to_numpy(), rows.column("shard_index").to_numpy()))
    keys_in_order = np.asarray(rows.column("key").to_pylist(), dtype=object)[order]
    shard_index = rows.column("shard_index").to_numpy()[order]
    positions = rows.column("shard_pos").to_numpy()[order]
    shards_in_order = np.array([shards[i] for i in shard_index], dtype=object)
    repeats: dict[str, list[tuple[int, str]]] = {}
    for index, first_shard in duplicate_rows_in_memory(keys_in_order, shards_in_order):
        repeats.setdefault(shards_in_order[index], []).append((int(positions[index]), first_shard))
    return repeats


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
    detectors: FittedDetectors | None = None,
) -> pa.Table:
    """One score file's manifest rows under the fitted probe and selection (and the
    fitted detectors of `selection.detector`, when not clipcleaner)."""
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
    manifest = build_manifest(batch, fitted, probe_probs, cfg, class_names, bank, tau)
    if detectors is None:
        return manifest
    return apply_detectors(manifest, batch, detectors, class_names)


def calibration_of_part(*args) -> dict:
    """manifest_part(*args) reduced to its ensemble calibration statistics."""
    batch_table = manifest_part(*args)
    detectors = args[-1]
    ok_idx = np.flatnonzero(np.asarray(batch_table.column("status").to_pylist()) != "failed")
    return calibration_part(batch_table, ok_idx, detectors)


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
    finish: Callable[[pa.Table, int], pa.Table] | None = None,
    shard_root: str | None = None,
    detectors: FittedDetectors | None = None,
) -> dict:
    """The distributed global fit; writes manifest_uri and returns the summary parts.

    score_uris[i] holds the scores of shards[i]; the manifest lists them in that order,
    relative to shard_root (`manifest.with_relative_shards`).
    finish(part, first manifest row), when given, adds columns to each part on the driver
    before it is written (the embedding checks: cleaner/checks/manifest_columns.py).
    detectors: as in fit_in_memory.fit_and_build_manifest.
    """
    import ray

    num_classes = len(class_names)
    start = time.perf_counter()

    def elapsed() -> str:
        return f"{time.perf_counter() - start:.1f} s"

    ds = read_score_dataset(score_uris, [*SMALL_COLUMNS, "embedding"])
    repeats = find_duplicate_rows(score_uris, shards)
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

    def argument_lists(detectors_ref):
        return (
            (
                score_uri,
                repeats.get(shard, []),
                refs["fitted"],
                refs["probe"],
                cfg,
                class_names,
                refs["bank"],
                tau,
                detectors_ref,
            )
            for score_uri, shard in zip(score_uris, shards, strict=True)
        )

    if detectors is not None and detectors.needs_calibration:
        calibrate = ray.remote(calibration_of_part).options(num_cpus=1)
        parts = list(ordered_results(calibrate, argument_lists(ray.put(detectors)), window))
        detectors = detectors.calibrated(parts)
        print(f"[fit] ensemble calibrated over {len(parts)} parts ({elapsed()})", flush=True)
    detectors_ref = ray.put(detectors)
    kept: dict[str, list[np.ndarray]] = {
        name: [] for name in [*SUMMARY_COLUMNS, *summary_columns(detectors)]
    }
    written = rows_written = 0
    with ManifestWriter(manifest_uri) as writer:
        for part in ordered_results(task, argument_lists(detectors_ref), window):
            if finish is not None:
                part = finish(part, rows_written)
            rows_written += part.num_rows
            writer.write(with_relative_shards(part, shard_root))
            for name in kept:
                kept[name].append(part.column(name).to_numpy(zero_copy_only=False))
            written += 1
            if written % 50 == 0 or written == len(score_uris):
                print(
                    f"[fit] manifest: {written}/{len(score_uris)} shards ({elapsed()})", flush=True
                )
    columns = {name: np.concatenate(parts) for name, parts in kept.items()}
    summary = summary_with_fit(columns, fitted, class_names)
    if detectors is not None:
        summary["detectors"] = compare_detectors(columns, detectors)
    return summary
