"""The predict job: a trained model over WebDataset shards on Ray Data, into one Parquet file.

    python -m jobs.predict model=runs/train/demo-mixfix input=data/demo/test \\
        output=runs/predictions.parquet [scoring.max_actors=4 ...]

Every key is in training/config.py (PredictConfig). The model is a training run's output
folder (or its model/ folder; local or s3://). The shards are read and decoded by CPU
tasks as the model was trained (labels are optional), and predicted by an actor pool with
GPUs when the cluster has them (the clean job's scorer rules, cleaner/scoring/resources.py).

Outputs: FILE.parquet (one row per input sample, in shard order: key, shard, shard_pos,
status, reason, given_label, given_name, predicted_label, predicted_name, confidence,
top_labels, top_probs) and FILE.summary.json (counts, accuracy against the shards' labels
when they have them, config, versions, timings).
"""

from __future__ import annotations

import time

from cleaner.config import ConfigError, load_config
from cleaner.reading import uri as uri_lib
from jobs.common import parse_job_args, run_main, write_json
from training.config import PredictConfig


def summary_uri(output: str) -> str:
    """FILE.summary.json beside FILE.parquet."""
    return output.removesuffix(".parquet") + ".summary.json"


def run_predict(cfg: PredictConfig) -> dict:
    """Predict every sample of cfg.input with cfg.model; returns the summary it writes."""
    from cleaner.progress import ProgressLog, configure_ray_data_progress
    from cleaner.reading.preflight import check_io
    from cleaner.scoring.pipeline import decoded_samples
    from cleaner.scoring.resources import plan_scorers
    from cleaner.selection.manifest import ManifestWriter
    from cleaner.versions import package_versions
    from jobs.common import connect_ray
    from training.predict import PredictionCounts, prediction_stage, predictions_table
    from training.saved_model import preprocessing_of, read_model_info

    started = time.perf_counter()
    check_io([cfg.input, cfg.model], [uri_lib.parent(cfg.output)])
    try:
        info = read_model_info(cfg.model)
    except ValueError as err:
        raise ConfigError(f"model: {err}") from None
    pre = preprocessing_of(info)
    class_names = info["class_names"]
    shards = uri_lib.expand_shard_spec(cfg.input)
    print(
        f"[predict] {len(shards)} shards, model {info['network']['name']} "
        f"({len(class_names)} classes, {pre.image_size}px) from {info['folder']}",
        flush=True,
    )
    connect_ray(cfg.ray)
    configure_ray_data_progress()
    plan = plan_scorers(cfg, len(shards))
    print(
        f"[predict] {plan.min_actors}-{plan.max_actors} actors, {plan.num_gpus:g} GPU and "
        f"{plan.num_cpus:g} CPU each ({plan.reason})",
        flush=True,
    )
    ds = decoded_samples(
        shards,
        class_names=class_names,
        image_size=pre.image_size,
        extensions=cfg.image_extensions,
        read_batch_size=cfg.scoring.read_batch_size,
        max_readers=cfg.scoring.max_readers,
        reader_memory_mb=cfg.scoring.reader_memory_mb,
        resize={"resize_mode": pre.resize_mode, "interpolation": pre.interpolation},
        require_label=False,
    )
    ds = prediction_stage(ds, cfg.model_copy(update={"model": info["folder"]}), plan)
    ds.context.execution_options.preserve_order = True  # rows in shard order, as read
    counts = PredictionCounts()
    progress = ProgressLog("predict", total_units=len(shards), unit="shards", item="samples")
    with ManifestWriter(cfg.output) as writer:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            writer.write(predictions_table(batch, class_names))
            progress.update(units=counts.add(batch), items=len(batch["key"]))
        if counts.samples == 0:  # no rows (cannot happen: a shard always yields one)
            raise RuntimeError("no rows came back from the prediction stage")
    progress.finish()
    summary = {
        "job": "predict",
        "output": cfg.output,
        "model": info["folder"],
        "model_run": info.get("run", {}),
        "shards": len(shards),
        "counts": counts.as_dict(),
        "actors": plan.as_dict(),
        "seconds": round(time.perf_counter() - started, 2),
        "config": cfg.model_dump(mode="json"),
        "versions": package_versions(),
    }
    write_json(summary_uri(cfg.output), summary)
    accuracy = summary["counts"]["accuracy_vs_given_labels"]
    print(
        f"[predict] {counts.samples} samples: {counts.samples - counts.failed} predicted, "
        f"{counts.failed} failed"
        + (f"; accuracy vs the shards' labels {accuracy:.4f}" if accuracy is not None else "")
        + f"; written to {cfg.output}",
        flush=True,
    )
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_job_args("Predict WebDataset shards with a trained model (Ray Data).", argv)
    if args.config is None and not args.overrides:
        raise ConfigError("give --config <yaml> and/or key=value overrides")
    run_predict(load_config(args.config, args.overrides, PredictConfig))
    return 0


if __name__ == "__main__":
    run_main(main)
