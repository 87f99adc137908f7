"""Streaming the shards through CLIP on Ray Data, one score file per input shard.

shards --(CPU tasks: read tar, parse labels, decode, resize)--> uint8 images
       --(ClipScorer actor pool, GPUs when present)--> scores + embeddings
       --(driver: gather rows per shard)--> <scores>/<shard>.parquet, written once complete.
A rerun skips shards whose score file exists (and was made by the same model and classes).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cleaner.config import CleanJobConfig
from cleaner.reading import uri as uri_lib
from cleaner.reading.shards import read_shard
from cleaner.scoring.prompts import PromptBank
from cleaner.scoring.scorer import ClipScorer

log = logging.getLogger(__name__)
SCORES_DIR = "scores"
FINGERPRINT_FILE = "_fingerprint.json"


def shard_output_names(shards: list[str]) -> dict[str, str]:
    """Deterministic, unique score-file names: the shard's stem, plus a hash if stems collide."""
    stems = [uri_lib.shard_stem(s) for s in shards]
    counts: dict[str, int] = defaultdict(int)
    for stem in stems:
        counts[stem] += 1
    names = {}
    for shard, stem in zip(shards, stems, strict=True):
        if counts[stem] > 1:
            stem = f"{stem}-{hashlib.sha256(shard.encode()).hexdigest()[:8]}"
        names[shard] = f"{stem}.parquet"
    return names


def fixed_size_list_array(values: np.ndarray) -> pa.Array:
    """A [N, W] numpy array as an Arrow fixed-size-list column."""
    values = np.ascontiguousarray(values)
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])


def scores_to_table(batch: dict[str, np.ndarray]) -> pa.Table:
    """A score batch (ClipScorer output) as an Arrow table, rows in shard order."""
    order = np.argsort(np.asarray(batch["shard_pos"]), kind="stable")
    columns = {}
    for name in ClipScorer.output_columns:
        if name == "shard_total":
            continue
        values = np.asarray(batch[name])[order]
        if values.ndim == 2:
            columns[name] = fixed_size_list_array(values)
        elif values.dtype == object:
            columns[name] = pa.array(values.tolist(), type=pa.string())
        else:
            columns[name] = pa.array(values)
    return pa.table(columns)


def table_to_parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


@dataclass
class ShardScoreWriter:
    """Gathers scored rows per shard and writes each shard's file once all its rows arrived."""

    scores_uri: str
    names: dict[str, str]
    on_written: Callable[[str, int], None] | None = None
    pending: dict[str, list[dict[str, np.ndarray]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    received: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    totals: dict[str, int] = field(default_factory=dict)
    written: list[str] = field(default_factory=list)

    def add(self, batch: dict[str, np.ndarray]) -> None:
        shards = np.asarray(batch["shard"])
        for shard in np.unique(shards):
            rows = np.nonzero(shards == shard)[0]
            part = {k: np.asarray(v)[rows] for k, v in batch.items()}
            self.pending[shard].append(part)
            self.received[shard] += len(rows)
            totals = part["shard_total"][part["shard_total"] >= 0]
            if len(totals):
                self.totals[shard] = int(totals[0])
            self._maybe_write(shard)

    def _maybe_write(self, shard: str) -> None:
        total = self.totals.get(shard)
        if total is None or self.received[shard] < total:
            return
        if self.received[shard] > total:
            raise RuntimeError(f"shard {shard}: {self.received[shard]} rows for {total} samples")
        parts = self.pending.pop(shard)
        merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        target = uri_lib.join(self.scores_uri, self.names[shard])
        uri_lib.write_bytes(target, table_to_parquet_bytes(scores_to_table(merged)))
        self.written.append(shard)
        if self.on_written:
            self.on_written(shard, total)

    def unfinished(self) -> list[str]:
        return sorted(self.pending)


def check_fingerprint(scores_uri: str, fingerprint: str, resume: bool) -> bool:
    """True if existing score files may be reused (same fingerprint); records the fingerprint."""
    path = uri_lib.join(scores_uri, FINGERPRINT_FILE)
    reusable = False
    if resume and uri_lib.exists(path):
        previous = json.loads(uri_lib.read_text(path)).get("fingerprint")
        reusable = previous == fingerprint
        if not reusable:
            log.warning("existing scores were made by another model/classes: rescoring all shards")
    uri_lib.write_text(path, json.dumps({"fingerprint": fingerprint}))
    return reusable


def read_shards_udf(batch: dict[str, np.ndarray], **read_kwargs):
    """Ray Data UDF: a batch of shard URIs in, decoded sample batches out (a generator)."""
    for shard in batch["shard"]:
        yield from read_shard(str(shard), **read_kwargs)


@dataclass
class ScoringStats:
    shards_total: int
    shards_skipped: int
    shards_scored: int
    samples_scored: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.samples_scored / self.seconds if self.seconds > 0 else 0.0


def actor_resources(cfg: CleanJobConfig) -> dict[str, float]:
    """num_gpus / num_cpus for each scorer actor ('auto' = one GPU if the cluster has any)."""
    import ray

    gpus = cfg.scoring.gpus_per_actor
    if gpus == "auto":
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    return {"num_gpus": float(gpus), "num_cpus": float(cfg.scoring.cpus_per_actor)}


def read_stage(
    cfg: CleanJobConfig,
    shards: list[str],
    class_names: list[str],
    image_size: int,
    resize: dict | None = None,
):
    """Ray Dataset of decoded samples: one CPU task per shard, uint8 images of image_size.

    resize: the model's resize_mode / interpolation / fill_color (LoadedClip.resize).
    """
    return decoded_samples(
        shards,
        class_names=class_names,
        image_size=image_size,
        extensions=cfg.data.image_extensions,
        read_batch_size=cfg.scoring.read_batch_size,
        max_readers=cfg.scoring.max_readers,
        reader_memory_mb=cfg.scoring.reader_memory_mb,
        resize=resize,
    )


def decoded_samples(
    shards: list[str],
    *,
    class_names: list[str],
    image_size: int,
    extensions: list[str],
    read_batch_size: int = 256,
    max_readers: int | None = None,
    reader_memory_mb: int = 768,
    resize: dict | None = None,
):
    """Ray Dataset of the samples of `shards`, decoded in CPU tasks (one task per shard).

    Columns: key, shard, shard_pos, label, true_label, image (uint8 [S, S, 3]), status,
    reason, shard_total (see cleaner.reading.shards.read_shard).
    """
    import ray
    from ray.data import TaskPoolStrategy

    ds = ray.data.from_items([{"shard": s} for s in shards], override_num_blocks=len(shards))
    return ds.map_batches(
        read_shards_udf,
        batch_size=1,
        num_cpus=1,
        compute=TaskPoolStrategy(size=max_readers),
        # Declaring the decoder's memory also keeps Ray from fusing it into the scorer
        # actors on CPU clusters: decoding stays in CPU tasks, in parallel with scoring.
        memory=reader_memory_mb * 1024 * 1024,
        fn_kwargs={
            "class_names": list(class_names),
            "image_size": image_size,
            "extensions": list(extensions),
            "batch_size": read_batch_size,
            **(resize or {}),
        },
    )


def score_stage(ds, cfg: CleanJobConfig, bank_ref):
    """Append the ClipScorer actor pool (bounded min/max, GPUs when present) to a dataset."""
    from ray.data import ActorPoolStrategy

    resources = actor_resources(cfg)
    threads = max(1, int(cfg.scoring.cpus_per_actor)) if resources["num_gpus"] == 0 else None
    return ds.map_batches(
        ClipScorer,
        batch_size=cfg.scoring.batch_size,
        compute=ActorPoolStrategy(min_size=cfg.scoring.min_actors, max_size=cfg.scoring.max_actors),
        fn_constructor_kwargs={
            "model_config": cfg.model.model_dump(),
            "prompt_bank": [bank_ref],
            "tau": cfg.scoring.tau,
            "top_k": cfg.scoring.top_k,
            "num_threads": threads,
        },
        **resources,
    )


def score_shards(
    cfg: CleanJobConfig,
    shards: list[str],
    bank: PromptBank,
    class_names: list[str],
    image_size: int,
    scores_uri: str,
    fingerprint: str,
    resize: dict | None = None,
) -> ScoringStats:
    """Score every shard not already scored; one parquet file per shard under scores_uri."""
    import ray

    start = time.perf_counter()
    uri_lib.makedirs(scores_uri)
    names = shard_output_names(shards)
    reusable = check_fingerprint(scores_uri, fingerprint, cfg.resume)
    todo = [
        s for s in shards if not (reusable and uri_lib.exists(uri_lib.join(scores_uri, names[s])))
    ]
    skipped = len(shards) - len(todo)
    if skipped:
        print(f"[score] {skipped} of {len(shards)} shards already scored: skipped", flush=True)
    if not todo:
        return ScoringStats(len(shards), skipped, 0, 0, time.perf_counter() - start)

    ds = score_stage(read_stage(cfg, todo, class_names, image_size, resize), cfg, ray.put(bank))
    samples = 0
    done = 0

    def report(shard: str, total: int) -> None:
        nonlocal samples, done
        samples += total
        done += 1
        rate = samples / max(time.perf_counter() - start, 1e-9)
        print(
            f"[score] {done}/{len(todo)} shards written ({uri_lib.basename(shard)}: {total} "
            f"samples; {samples} in all, {rate:.0f} img/s)",
            flush=True,
        )

    writer = ShardScoreWriter(scores_uri, names, on_written=report)
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        writer.add(batch)
    if writer.unfinished():
        raise RuntimeError(f"shards with missing rows after scoring: {writer.unfinished()}")
    return ScoringStats(len(shards), skipped, len(todo), samples, time.perf_counter() - start)
