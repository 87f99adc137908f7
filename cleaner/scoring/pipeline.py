"""Streaming the shards through CLIP on Ray Data, one score file per input shard.

shards --(CPU tasks: read tar, parse labels, decode, resize; one block per shard)--> images
       --(ClipScorerWriter actor pool, GPUs when present)--> scores + embeddings, written
         by the actor to <scores>/<shard>.parquet once it holds all the shard's rows
         (see cleaner.scoring.writing)
The driver only counts the shards written; it never holds score rows.
A rerun skips shards whose score file exists, was made by the same model and classes, and
whose shard has not changed since (its size and modification time, recorded in
`_shards.json` beside the score files).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, replace

import numpy as np

from cleaner.config import CleanJobConfig
from cleaner.progress import ProgressLog
from cleaner.reading import uri as uri_lib
from cleaner.reading.shards import read_shard
from cleaner.scoring.columns import SCORE_OUTPUT_COLUMNS
from cleaner.scoring.prompts import PromptBank
from cleaner.scoring.resources import ScorerPlan, plan_scorers
from cleaner.scoring.writing import (  # the Arrow helpers are re-exported for fit and jobs
    ClipScorerWriter,
    fixed_size_list_array,
    table_to_parquet_bytes,
)

__all__ = ["fixed_size_list_array", "table_to_parquet_bytes"]

log = logging.getLogger(__name__)
SCORES_DIR = "scores"
FINGERPRINT_FILE = "_fingerprint.json"
SHARD_VERSIONS_FILE = "_shards.json"  # {score file name: its shard's "size:mtime_ns"}


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


def reusable_score_files(
    scores_uri: str, shards: list[str], names: dict[str, str], reusable: bool
) -> set[str]:
    """The shards whose score file may be reused: it exists (and `reusable`: same model
    and classes) and the shard is the version it was scored from. Records the shards'
    current versions, after deleting the score files of shards that changed (an
    interrupted rerun then finds them missing, not stale)."""
    versions = uri_lib.file_versions(shards)
    index = uri_lib.join(scores_uri, SHARD_VERSIONS_FILE)
    recorded: dict[str, str] = {}
    if uri_lib.exists(index):
        recorded = json.loads(uri_lib.read_text(index)).get("versions", {})
    reuse, changed = set(), []
    for shard in shards:
        path = uri_lib.join(scores_uri, names[shard])
        if not (reusable and uri_lib.exists(path)):
            continue
        if recorded.get(names[shard]) == versions[shard]:
            reuse.add(shard)
        else:
            changed.append(shard)
            uri_lib.remove(path)
    if changed:
        print(
            f"[score] {len(changed)} shard(s) changed since they were scored (or scored before "
            f"versions were recorded): rescored, e.g. {changed[0]}",
            flush=True,
        )
    recorded.update({names[s]: versions[s] for s in shards})
    uri_lib.write_text(index, json.dumps({"versions": recorded}, sort_keys=True))
    return reuse


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
    pass_samples: int  # samples of every set the pass scored (this set's when alone)
    seconds: float  # the scoring pass's (shared by every set it scored)
    first_shard_seconds: float = 0.0  # until the pass's first shard's rows were complete
    first_shard_samples: int = 0

    @property
    def images_per_second(self) -> float:
        """Over the whole scoring pass, start-up (nodes, actors, model loads) included."""
        return self.pass_samples / self.seconds if self.seconds > 0 else 0.0

    @property
    def steady_images_per_second(self) -> float:
        """After the first shard was complete: the pool's streaming rate, start-up excluded
        (0 when fewer than two shards were scored)."""
        seconds = self.seconds - self.first_shard_seconds
        samples = self.pass_samples - self.first_shard_samples
        return samples / seconds if seconds > 0 and samples > 0 else 0.0


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
    source=None,
    require_label: bool = True,
):
    """Ray Dataset of the samples of `shards`, decoded in CPU tasks (one task per shard).

    Columns: key, shard, shard_pos, label, true_label, image (uint8 [S, S, 3]), status,
    reason, shard_total (see cleaner.reading.shards.read_shard, also for require_label).
    source: a Dataset of {"shard": uri} rows to read instead of `shards` in their order
    (training reads them in a new order each epoch: training.data.epoch_ordered_samples).
    """
    import ray
    from ray.data import TaskPoolStrategy

    ds = source
    if ds is None:
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
            "require_label": require_label,
            **(resize or {}),
        },
    )


def score_stage(ds, cfg: CleanJobConfig, bank_ref, plan: ScorerPlan, writer: dict | None = None):
    """Append the ClipScorer actor pool (resources and size from `plan`) to a dataset.

    writer: ClipScorerWriter's arguments (targets, columns): the actors then
    write each shard's score file and pass on one row per file (`score_shards`).
    """
    from ray.data import ActorPoolStrategy

    # imported here: the readers' tasks unpickle this module, and must not pay for
    # torch and open_clip (the scorer's imports) on every worker
    from cleaner.scoring.scorer import ClipScorer

    return ds.map_batches(
        ClipScorer if writer is None else ClipScorerWriter,
        batch_size=cfg.scoring.batch_size,
        compute=ActorPoolStrategy(min_size=plan.min_actors, max_size=plan.max_actors),
        fn_constructor_kwargs={
            "model_config": cfg.model.model_dump(),
            "prompt_bank": [bank_ref],
            "tau": cfg.scoring.tau,
            "top_k": cfg.scoring.top_k,
            # as many torch threads as CPUs reserved: a scorer on a shared node (or a
            # simulated GPU node) must not take every core of the machine
            "num_threads": max(1, int(plan.num_cpus)),
            **(writer or {}),
        },
        **plan.remote_args(),
    )


def one_block_per_task(ds):
    """Ray Data's block shaping off for `ds` and the stages built on it: a task's output is
    one block (a reader task's: one whole shard), and bundles of whole blocks are never
    split, so one scorer actor scores all the rows of a shard in one task."""
    ds.context.target_max_block_size = None
    return ds


def score_shards(
    cfg: CleanJobConfig,
    shards: list[str],
    bank_ref,
    class_names: list[str],
    image_size: int,
    scores_uri: str,
    fingerprint: str,
    resize: dict | None = None,
    plan: ScorerPlan | None = None,
) -> ScoringStats:
    """Score every shard not already scored; one parquet file per shard under scores_uri.

    `bank_ref` is the PromptBank or an ObjectRef to it. Score rows are written by the
    scorer actors (cleaner.scoring.writing); the driver sees one row per shard written.
    """
    sets = {scores_uri: shards}
    return score_shard_sets(
        cfg, sets, bank_ref, class_names, image_size, fingerprint, resize, plan
    )[scores_uri]


def score_shard_sets(
    cfg: CleanJobConfig,
    sets: dict[str, list[str]],
    bank_ref,
    class_names: list[str],
    image_size: int,
    fingerprint: str,
    resize: dict | None = None,
    plan: ScorerPlan | None = None,
) -> dict[str, ScoringStats]:
    """`score_shards` for several sets of shards ({scores_uri: shards}, e.g. the training
    and the test shards) in one pass: one pool of scorers, started and loaded once, each
    shard's file written under its own set's scores_uri. Sets that share a shard are
    scored one after the other. Returns each set's stats (the pass's time and rates)."""
    import ray

    listed = [s for shards in sets.values() for s in shards]
    if len(set(listed)) < len(listed):  # a shard in two sets: one pass each
        return {
            uri: score_shard_sets(
                cfg, {uri: shards}, bank_ref, class_names, image_size, fingerprint, resize, plan
            )[uri]
            for uri, shards in sets.items()
        }
    start = time.perf_counter()
    targets: dict[str, str] = {}  # shard -> its score file, for the shards to score
    set_of: dict[str, str] = {}
    skipped: dict[str, int] = {}
    for scores_uri, shards in sets.items():
        uri_lib.makedirs(scores_uri)
        names = shard_output_names(shards)
        reusable = check_fingerprint(scores_uri, fingerprint, cfg.resume)
        reuse = reusable_score_files(scores_uri, shards, names, reusable)
        todo = [s for s in shards if s not in reuse]
        skipped[scores_uri] = len(shards) - len(todo)
        if skipped[scores_uri]:
            print(
                f"[score] {skipped[scores_uri]} of {len(shards)} shards already scored: skipped",
                flush=True,
            )
        for shard in todo:
            targets[shard] = uri_lib.join(scores_uri, names[shard])
            set_of[shard] = scores_uri
    samples: dict[str, int] = dict.fromkeys(sets, 0)
    first_shard: dict = {}  # when the pass's first shard was complete, and its samples
    if targets:
        todo = list(targets)
        if plan is None:
            plan = plan_scorers(cfg, len(todo))
        else:  # planned before the prompts were encoded: no more actors than shards to score
            cap = len(todo)
            plan = replace(
                plan, max_actors=min(plan.max_actors, cap), min_actors=min(plan.min_actors, cap)
            )
        print(
            f"[score] scorers: {plan.min_actors}-{plan.max_actors} actors, {plan.num_gpus:g} GPU "
            f"and {plan.num_cpus:g} CPU each ({plan.reason})",
            flush=True,
        )
        if isinstance(bank_ref, PromptBank):
            bank_ref = ray.put(bank_ref)
        writer = {
            "targets": targets,
            "columns": [c for c in SCORE_OUTPUT_COLUMNS if c != "shard_total"],
        }
        decoded = one_block_per_task(read_stage(cfg, todo, class_names, image_size, resize))
        ds = score_stage(decoded, cfg, bank_ref, plan, writer=writer)
        progress = ProgressLog("score", total_units=len(todo), unit="shards", item="samples")
        written: set[str] = set()  # a retried block's shards are written (and passed on) again
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for shard, rows in zip(batch["shard"], batch["rows"], strict=True):
                if str(shard) in written:
                    continue
                written.add(str(shard))
                samples[set_of[str(shard)]] += int(rows)
                progress.update(units=1, items=int(rows))
                if not first_shard:
                    first_shard.update(seconds=time.perf_counter() - start, samples=progress.items)
        missing = sorted(set(todo) - written)
        if missing:
            raise RuntimeError(
                f"{len(missing)} shard(s) with missing rows after scoring: {missing[:5]}"
            )
        progress.finish()
    seconds, total = time.perf_counter() - start, sum(samples.values())
    return {
        uri: ScoringStats(
            shards_total=len(shards),
            shards_skipped=skipped[uri],
            shards_scored=len(shards) - skipped[uri],
            samples_scored=samples[uri],
            pass_samples=total,
            seconds=seconds,
            first_shard_seconds=first_shard.get("seconds", 0.0),
            first_shard_samples=first_shard.get("samples", 0),
        )
        for uri, shards in sets.items()
    }
