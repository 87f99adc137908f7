"""The export-shards job: the clean samples of a clean run as WebDataset shards, on Ray Data.

    python -m jobs.export_shards manifest=runs/demo output=data/demo-clean [relabel=true]

Every key is in cleaner/config.py (ExportShardsConfig). `input` says where the shards
are now when they moved since the clean job read them. Each output shard is written by
one Ray Data task that reads its input shards and copies the selected samples' tar members
unchanged (cleaner/reading/export.py); with relabel=true the noisy samples that have a
suggested label are written too, under it.

Outputs under `output`: <prefix>-000000.tar, ... (deterministic names; a rerun skips the
shards already written alike), classes.yaml (the class spec the labels follow), and
summary.json with the count check: samples written == clean rows (+ relabelled rows).
"""

from __future__ import annotations

import json
import time

import yaml

from cleaner.config import ConfigError, ExportShardsConfig, load_config
from cleaner.reading import uri as uri_lib
from jobs.common import load_class_spec, parse_job_args, run_main, write_json

CLASSES_FILE = "classes.yaml"
SUMMARY_FILE = "summary.json"


def classes_location(cfg: ExportShardsConfig, manifest: str) -> str:
    """cfg.classes, else the class spec the clean run used (its config.yaml's data.classes)."""
    if cfg.classes is not None:
        return cfg.classes
    run_config = uri_lib.join(uri_lib.parent(manifest), "config.yaml")
    if uri_lib.exists(run_config):
        recorded = yaml.safe_load(uri_lib.read_text(run_config)) or {}
        classes = (recorded.get("config") or {}).get("data", {}).get("classes")
        if classes:
            return classes
    raise ConfigError(f"no class spec recorded beside {manifest}: give classes=<spec>")


def run_export(cfg: ExportShardsConfig) -> dict:
    """Export the clean (and relabelled) samples; returns the summary it writes. Raises
    RuntimeError when the count check fails (the summary says which samples are missing)."""
    from cleaner.progress import ProgressLog, configure_ray_data_progress
    from cleaner.reading.export import RECORDS_DIR, export_batch, plan_export, select_rows
    from cleaner.reading.ingest import remove_stale_shards
    from cleaner.reading.preflight import check_io
    from cleaner.reading.shard_roots import absolute_shard, match_shards
    from cleaner.selection.manifest import manifest_file, read_shard_root
    from cleaner.versions import package_versions
    from jobs.common import connect_ray

    started = time.perf_counter()
    manifest = manifest_file(cfg.manifest)
    check_io([manifest, cfg.input], [cfg.output])
    if not uri_lib.exists(manifest):
        raise FileNotFoundError(f"manifest not found: {manifest}")
    spec = load_class_spec(classes_location(cfg, manifest))
    selection = select_rows(manifest, cfg.relabel)
    root = read_shard_root(manifest)
    recorded = list(dict.fromkeys(str(s) for s in selection.shards))
    if cfg.input is not None:
        try:
            locations = match_shards(recorded, root, uri_lib.expand_shard_spec(cfg.input))
        except ValueError as err:
            raise ConfigError(f"input: {err}") from None
    else:
        locations = {r: absolute_shard(r, root) for r in recorded}
        gone = [uri for uri in locations.values() if not uri_lib.exists(uri)]
        if gone:
            raise ConfigError(
                f"the manifest's shards are not where the clean job read them ({gone[0]} and "
                f"{len(gone) - 1} more): give input=<where they are now>"
            )
    plans = plan_export(selection, locations, cfg.prefix, cfg.shard_size)
    counts = selection.counts
    print(
        f"[export] {counts['expected']} samples ({counts['clean']} clean, "
        f"{counts['relabelled']} relabelled) from {len(recorded)} shards into {len(plans)} "
        f"shards in {cfg.output}",
        flush=True,
    )
    uri_lib.makedirs(cfg.output)
    removed = remove_stale_shards(
        cfg.output, cfg.prefix, {plan["name"] for plan in plans}, records_dir=RECORDS_DIR
    )
    records: list[dict] = []
    if plans:
        import ray

        connect_ray(cfg.ray)
        configure_ray_data_progress()
        items = [{"plan": json.dumps(plan)} for plan in plans]
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            export_batch,
            batch_size=1,
            num_cpus=1,
            fn_kwargs={"output": cfg.output, "resume": cfg.resume},
        )
        progress = ProgressLog("export", total_units=len(plans), unit="shards", item="samples")
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for text in batch["record"]:
                record = json.loads(str(text))
                records.append(record)
                progress.update(units=1, items=record["written"])
        progress.finish()
    records.sort(key=lambda r: r["name"])
    written = sum(r["written"] for r in records)
    problems = [p for r in records for p in r["problems"]]
    check = {
        "passed": written == counts["expected"] and not problems,
        "written": written,
        "expected": counts["expected"],
        "rule": "samples written == clean rows" + (" + relabelled rows" if cfg.relabel else ""),
    }
    uri_lib.write_text(
        uri_lib.join(cfg.output, CLASSES_FILE), yaml.safe_dump(spec.to_dict(), sort_keys=False)
    )
    summary = {
        "job": "export_shards",
        "manifest": manifest,
        "output": cfg.output,
        "relabel": cfg.relabel,
        "counts": counts,
        "count_check": check,
        "problems": problems[:100],
        "shards_written": sum(not r["skipped"] for r in records),
        "shards_skipped": sum(r["skipped"] for r in records),
        "stale_shards_removed": removed,
        "shards": [{"name": r["name"], "samples": r["written"]} for r in records],
        "seconds": round(time.perf_counter() - started, 2),
        "config": cfg.model_dump(mode="json"),
        "versions": package_versions(),
    }
    write_json(uri_lib.join(cfg.output, SUMMARY_FILE), summary)
    verdict = "passed" if check["passed"] else "FAILED"
    print(
        f"[export] count check {verdict}: {written} samples written, {counts['expected']} "
        f"expected ({check['rule']}); {summary['shards_written']} shards written, "
        f"{summary['shards_skipped']} already done",
        flush=True,
    )
    if not check["passed"]:
        first = problems[0] if problems else {}
        raise RuntimeError(
            f"export count check failed: {written} of {counts['expected']} samples written "
            f"({len(problems)} problems, first: {first}); see {cfg.output}/{SUMMARY_FILE}"
        )
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_job_args("Export a clean run's clean samples as WebDataset shards.", argv)
    if args.config is None and not args.overrides:
        raise ConfigError("give --config <yaml> and/or key=value overrides")
    run_export(load_config(args.config, args.overrides, ExportShardsConfig))
    return 0


if __name__ == "__main__":
    run_main(main)
