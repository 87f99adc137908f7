"""The training job: MixFix on the cleaned set with Ray Train (DDP), checkpoints, resume.

    python -m jobs.train --config configs/train-demo.yaml [key=value ...]

Outputs under `run.storage`/`run.name`: Ray Train's checkpoints (model, optimiser,
scheduler, epoch, selection, labels, history), metrics.json (one entry per epoch),
summary.json, config.yaml, report.html (curves) and model/ (the trained network: weights,
network config, class spec and preprocessing; `training.load_model`). Rerunning the same run name resumes
from its latest checkpoint; a worker that dies mid-run is replaced and the run resumes
from its last checkpoint (run.max_failures).
"""

from __future__ import annotations

import functools
import json
import os
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from cleaner.classes import ClassSpec
from cleaner.config import ConfigError
from cleaner.progress import configure_ray_data_progress
from cleaner.reading import uri as uri_lib
from cleaner.reading.preflight import check_train_job_io
from cleaner.reading.shard_roots import match_shards
from cleaner.selection.manifest import manifest_file, read_shard_root
from cleaner.versions import package_versions
from jobs.cli import COMMANDS
from jobs.command import run_command, run_main
from jobs.common import connect_ray, load_class_spec, write_json, write_yaml
from training.config import TrainJobConfig
from training.restarts import fit_resuming

if TYPE_CHECKING:  # torch loads in the functions, after the config was validated
    from training.data import SampleIndex


def storage_for_ray(storage: str):
    """(storage_path, storage_filesystem) for RunConfig; S3 through our configured client."""
    if uri_lib.is_s3(storage):
        return storage[len("s3://") :].rstrip("/"), uri_lib.s3_filesystem()
    path = os.path.abspath(storage[len("file://") :] if storage.startswith("file://") else storage)
    return path, None


@dataclass(frozen=True)
class TrainingInputs:
    """What a training run reads, checked before any Ray work starts."""

    spec: ClassSpec
    index: SampleIndex
    test_shards: list[str]


def training_inputs(cfg: TrainJobConfig) -> TrainingInputs:
    """The class spec, the manifest's sample index and the test shards of a run, checked:
    storage reachable and writable, the manifest's shards found among data.input (where
    they are now: see cleaner.reading.shard_roots), its labels within the class spec.
    Errors are ConfigErrors that name the problem."""
    from training.data import load_sample_index

    check_train_job_io(cfg)  # S3 unreachable, no bucket, denied, storage not writable
    spec = load_class_spec(cfg.data.classes)
    guard_k = cfg.mixfix.clip_k if cfg.mixfix.mode == "mixfix_clip" else 0
    manifest = manifest_file(cfg.data.manifest)
    try:
        index = load_sample_index(
            manifest, zeroshot_topk=guard_k, sample_weights=cfg.mixfix.sample_weights
        )
    except ValueError as error:
        raise ConfigError(f"mixfix.mode={cfg.mixfix.mode}: {error}") from None
    try:
        where = match_shards(
            index.shards, read_shard_root(manifest), uri_lib.expand_shard_spec(cfg.data.input)
        )
    except ValueError as error:
        raise ConfigError(f"data.input: {error}") from None
    index = replace(
        index,
        shards=[where[s] for s in index.shards],
        offsets={where[s]: offset for s, offset in index.offsets.items()},
    )
    labels_seen = index.labels[index.trainable]
    if labels_seen.size and labels_seen.max() >= spec.num_classes:
        raise ConfigError(
            f"manifest labels reach {labels_seen.max()} but the class spec has {spec.num_classes}"
        )
    test_shards = uri_lib.expand_shard_spec(cfg.data.test_input) if cfg.data.test_input else []
    return TrainingInputs(spec, index, test_shards)


def train_in_process(cfg: TrainJobConfig) -> list[dict]:
    """One run of `cfg` in this process with training.local (no Ray): the same input checks,
    data and MixFix core as run_train, for small datasets; returns the per-epoch history."""
    from training.local import run_local
    from training.saved_model import write_run_model

    inputs = training_inputs(cfg)

    def keep_model(model, history: list[dict]) -> None:
        target = write_run_model(cfg, inputs.spec, model.state_dict(), history, "in_process")
        print(f"[local] model written to {target}", flush=True)

    return run_local(
        cfg,
        inputs.index,
        inputs.spec.names,
        inputs.test_shards,
        log=lambda message: print(f"[local] {message}", flush=True),
        on_finished=keep_model,
    )


def write_final_model(cfg: TrainJobConfig, spec: ClassSpec, checkpoint_dir: str, history) -> str:
    """The last checkpoint's weights as the run's model folder (training.saved_model)."""
    import torch

    from training.saved_model import write_run_model

    weights = torch.load(
        os.path.join(checkpoint_dir, "model.pt"), map_location="cpu", weights_only=True
    )
    return write_run_model(cfg, spec, weights, history, "ray_train")


def run_train(cfg: TrainJobConfig) -> dict:
    """Run (or resume) a MixFix training run; returns the summary it writes."""
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from training.data import start_epoch_state_store, training_stream
    from training.loop import train_loop_per_worker
    from training.report import write_training_report

    started = time.perf_counter()
    inputs = training_inputs(cfg)
    spec, index, test_shards = inputs.spec, inputs.index, inputs.test_shards
    connect_ray(cfg.ray)
    configure_ray_data_progress()  # before the trainer: it carries this context to its workers
    store = start_epoch_state_store()  # on this (the driver's) node: see training.data
    storage_path, storage_fs = storage_for_ray(cfg.run.storage)
    resources = {"CPU": cfg.scaling.cpus_per_worker}
    if cfg.scaling.use_gpu:
        resources["GPU"] = cfg.scaling.gpus_per_worker
    make_trainer = functools.partial(  # one trainer per fit: see training.restarts
        TorchTrainer,
        train_loop_per_worker,
        train_loop_config={
            "config": cfg.model_dump(mode="json"),
            "index": [ray.put(index)],
            "store": store,
            "class_names": spec.names,
            "test_shards": test_shards,
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker=resources,
            placement_strategy=cfg.scaling.placement_strategy,
        ),
        run_config=RunConfig(
            name=cfg.run.name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.checkpoints_to_keep),
        ),
        datasets={"train": training_stream(index, cfg, spec.names, store)},
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )
    print(
        f"[train] {index.num_samples} samples ({int(index.is_clean.sum())} clean), "
        f"{len(index.shards)} shards, mode {cfg.mixfix.mode}, {cfg.scaling.num_workers} workers",
        flush=True,
    )
    result = fit_resuming(make_trainer, cfg.run.max_failures)
    if result.checkpoint is None:
        raise RuntimeError(f"training finished without a checkpoint: {result.error}")
    with result.checkpoint.as_directory() as directory:
        with open(os.path.join(directory, "history.json")) as f:
            history = json.load(f)
        model_dir = write_final_model(cfg, spec, directory, history)
    out = uri_lib.join(cfg.run.storage, cfg.run.name)
    summary = {
        "job": "train",
        "run": cfg.run.name,
        "mode": cfg.mixfix.mode,
        "epochs_completed": len(history),
        "final": history[-1] if history else {},
        "history": history,
        "checkpoint": result.checkpoint.path,
        "model": model_dir,
        "seconds": round(time.perf_counter() - started, 2),
        "config": cfg.model_dump(mode="json"),
        "versions": package_versions(),
    }
    write_json(uri_lib.join(out, "metrics.json"), {"epochs": history})
    write_json(uri_lib.join(out, "summary.json"), summary)
    write_yaml(
        uri_lib.join(out, "config.yaml"),
        {"config": summary["config"], "versions": summary["versions"]},
    )
    write_training_report(history, summary, uri_lib.join(out, "report.html"))
    final = summary["final"]
    print(
        f"[train] done: {len(history)} epochs, test accuracy {final.get('test_accuracy')}, "
        f"outputs in {out}",
        flush=True,
    )
    return summary


def main(argv: list[str] | None = None) -> int:
    return run_command(COMMANDS["train"], argv, prog="python -m jobs.train")


if __name__ == "__main__":
    run_main(main)
