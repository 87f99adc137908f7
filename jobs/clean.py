"""The cleaning job: shards -> CLIP prompt-ensemble scores on Ray Data -> global selection -> manifest.

    python -m jobs.clean --config configs/demo.yaml [key=value ...]

Outputs under `output`: scores/<shard>.parquet (one per input shard, reused on rerun),
manifest.parquet (one row per input sample; shards named relative to the input root, which
summary.json records as shard_root), summary.json, config.yaml, report.html.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time

from cleaner.checks.manifest_columns import ManifestChecks, checks_summary
from cleaner.checks.search import run_checks
from cleaner.config import CleanJobConfig
from cleaner.detectors.fit import fit_detectors, members_needed
from cleaner.detectors.verified import SHARDS, VerifiedLabels, read_verified_file
from cleaner.progress import configure_ray_data_progress
from cleaner.reading import uri as uri_lib
from cleaner.reading.preflight import check_clean_job_io, check_labels_match_spec
from cleaner.reading.shard_roots import absolute_shard, shard_root
from cleaner.reading.shards import fetch_thumbnails
from cleaner.scoring.columns import SCORE_FORMAT
from cleaner.scoring.pipeline import (
    SCORES_DIR,
    score_shard_sets,
    shard_output_names,
    table_to_parquet_bytes,
)
from cleaner.scoring.resources import plan_scorers
from cleaner.scoring.text_features import encode_text_features
from cleaner.selection.fit_in_memory import fit_and_build_manifest
from cleaner.selection.fit_plan import choose_mode
from cleaner.selection.fit_ray import fit_and_write_manifest_distributed
from cleaner.selection.manifest import read_manifest_for_report, with_relative_shards
from cleaner.selection.score_table import read_scores
from cleaner.versions import package_versions
from jobs.cli import COMMANDS
from jobs.command import run_command, run_main
from jobs.common import connect_ray, load_class_spec, write_json, write_yaml

log = logging.getLogger(__name__)
TEST_SCORES_DIR = "test_scores"
MAX_LEAK_THUMBNAILS = 200


def run_clean(cfg: CleanJobConfig) -> dict:
    """Run the whole cleaning job for a validated config; returns the summary it writes."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    check_clean_job_io(cfg)  # S3 unreachable, no bucket, denied, output not writable: stop now
    spec = load_class_spec(cfg.data.classes)
    shards = uri_lib.expand_shard_spec(cfg.data.input)
    print(
        f"[clean] {len(shards)} shards, {spec.num_classes} classes, model {cfg.model.name}",
        flush=True,
    )
    verified = verified_labels(cfg, spec.names)  # a bad verified file stops here (exit 2)
    run_fingerprint = finished_run_fingerprint(cfg, shards, spec, verified)
    summary_uri = uri_lib.join(cfg.output, "summary.json")
    if cfg.resume and uri_lib.exists(summary_uri):
        previous = json.loads(uri_lib.read_text(summary_uri))
        if previous.get("run_fingerprint") == run_fingerprint:
            print(f"[clean] {cfg.output} is up to date with this config: nothing to do", flush=True)
            return previous
    check_labels_match_spec(shards, spec.names, f"class spec {cfg.data.classes!r}")
    # torch and open_clip load here, after the config and the inputs were checked
    from cleaner.scoring.models import check_model_config

    check_model_config(cfg.model)  # a bad model name stops here, before Ray starts
    import ray

    connect_ray(cfg.ray)
    configure_ray_data_progress()
    # The scorers' resources are planned first (on an autoscaling cluster this may launch GPU
    # nodes); the text tower then runs where the scorers run (a GPU when they get one).
    scorer_plan = plan_scorers(cfg, len(shards))
    text = encode_text_features(
        cfg.model, spec.prompts(), num_gpus=scorer_plan.num_gpus, num_cpus=scorer_plan.num_cpus
    )
    bank, image_size, resize = text.bank, text.image_size, text.resize
    print(
        f"[clean] prompts encoded on {text.device} (Ray task, GPUs {list(text.gpu_ids)})",
        flush=True,
    )
    timings["setup_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    scores_uri = uri_lib.join(cfg.output, SCORES_DIR)
    fingerprint = cfg.fingerprint(
        SCORE_FORMAT, *spec.names, *[p for ps in spec.prompts() for p in ps]
    )
    bank_ref = ray.put(bank)
    sets = {scores_uri: shards}
    test_shards, test_score_uris = [], []
    if cfg.data.test_input and cfg.checks.test_leaks:  # embedded for the train/test leak check
        test_shards = uri_lib.expand_shard_spec(cfg.data.test_input)
        test_scores = uri_lib.join(cfg.output, TEST_SCORES_DIR)
        sets[test_scores] = test_shards
        test_names = shard_output_names(test_shards)
        test_score_uris = [uri_lib.join(test_scores, test_names[s]) for s in test_shards]
    # one pass, one pool of scorers (started and loaded once) for the train and test shards
    set_stats = score_shard_sets(
        cfg, sets, bank_ref, spec.names, image_size, fingerprint, resize, plan=scorer_plan
    )
    stats = set_stats.pop(scores_uri)
    test_samples = sum(st.samples_scored for st in set_stats.values())  # 0 without test shards
    timings["scoring_s"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    names = shard_output_names(shards)
    score_uris = [uri_lib.join(scores_uri, names[s]) for s in shards]
    checks = run_checks(score_uris, test_score_uris, cfg.checks, seed=cfg.seed)
    finish = ManifestChecks(checks, conflicts_as_evidence=cfg.checks.conflicts_as_evidence)
    print(f"[checks] {json.dumps(checks_summary(checks), default=str)}", flush=True)
    timings["checks_s"] = time.perf_counter() - t2
    t2 = time.perf_counter()
    detectors = fit_detectors(
        cfg,
        score_uris,
        spec.names,
        shards=shards,
        verified=verified,
        num_gpus=scorer_plan.num_gpus,
    )
    if detectors is not None:
        timings["detectors_s"] = time.perf_counter() - t2
    plan = choose_mode(cfg.selection, score_uris, spec.num_classes)
    print(
        f"[fit] {plan.mode} global fit over {plan.samples} samples (in-memory estimate "
        f"{plan.estimated_gb:.2f} GB, budget {plan.budget_gb:.2f} GB)",
        flush=True,
    )
    manifest_uri = uri_lib.join(cfg.output, "manifest.parquet")
    root = shard_root(shards)  # the manifest names shards relative to it (portable)
    if plan.mode == "in_memory":
        table = read_scores(scores_uri, [names[s] for s in shards], with_embeddings=True)
        manifest, parts = fit_and_build_manifest(
            table,
            cfg.selection,
            spec.names,
            bank,
            cfg.scoring.tau,
            seed=cfg.seed,
            finish=finish,
            detectors=detectors,
        )
        del table
        manifest = with_relative_shards(manifest, root)
        uri_lib.write_bytes(manifest_uri, table_to_parquet_bytes(manifest))
    else:
        parts = fit_and_write_manifest_distributed(
            score_uris,
            shards,
            cfg.selection,
            spec.names,
            bank,
            cfg.scoring.tau,
            manifest_uri,
            seed=cfg.seed,
            finish=finish,
            shard_root=root,
            detectors=detectors,
        )
        manifest = read_manifest_for_report(manifest_uri)
    parts["fit"] = plan.as_dict()
    timings["selection_s"] = time.perf_counter() - t2

    timings["total_s"] = time.perf_counter() - t0
    summary = {
        "job": "clean",
        "output": cfg.output,
        "run_fingerprint": run_fingerprint,
        "shards": len(shards),
        "shard_root": root,
        "scoring": {
            "shards_scored": stats.shards_scored,
            "shards_skipped": stats.shards_skipped,
            "samples_scored": stats.samples_scored,
            "test_samples_scored": test_samples,  # the leak check's, in the same pass
            "images_per_second": round(stats.images_per_second, 2),
            "startup_seconds": round(stats.first_shard_seconds, 2),
            "steady_images_per_second": round(stats.steady_images_per_second, 2),
            "scorers": scorer_plan.as_dict(),
            "prompt_encoding": {
                "device": text.device,
                "gpu_ids": list(text.gpu_ids),
                "pid": text.pid,
                "node_id": text.node_id,
            },
        },
        **parts,
        "checks": checks_summary(checks),
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "config": cfg.model_dump(mode="json"),
        "versions": package_versions(),
    }
    t3 = time.perf_counter()
    try:
        from cleaner.report import write_report

        write_report(
            manifest,
            summary,
            uri_lib.join(cfg.output, "report.html"),
            thumbnails=report_thumbnails(manifest, cfg.data.image_extensions, root),
            test_thumbnails=test_thumbnails(checks, cfg.data.image_extensions),
        )
    except Exception as err:  # the report must not fail a job whose manifest is written
        log.exception("report.html could not be written")
        summary["report_error"] = f"{type(err).__name__}: {err}"
    summary["timings"]["report_s"] = round(time.perf_counter() - t3, 3)
    write_json(uri_lib.join(cfg.output, "summary.json"), summary)
    write_yaml(
        uri_lib.join(cfg.output, "config.yaml"),
        {"config": cfg.model_dump(mode="json"), "versions": summary["versions"]},
    )
    print_summary(summary)
    return summary


def finished_run_fingerprint(
    cfg: CleanJobConfig, shards: list[str], spec, verified: VerifiedLabels | None = None
) -> str:
    """What decides a finished run's outputs: config (not how Ray is reached), shards and
    their versions (size, modification time), prompts, and the verified labels' content
    when a verified file is given."""
    exclude: dict = {"ray": True, "resume": True}
    if cfg.selection.detector == "clipcleaner":  # detector settings decide nothing then
        exclude["selection"] = {"detector", "verified", "deft", "cleannet", "ensemble"}
    versions = uri_lib.file_versions(shards)
    parts = [
        cfg.model_dump(mode="json", exclude=exclude),
        [[shard, versions[shard]] for shard in shards],
        spec.prompts(),
    ]
    if verified is not None:
        parts.append(sorted(verified.labels.items()))
    payload = json.dumps(parts, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def verified_labels(cfg: CleanJobConfig, class_names: list[str]) -> VerifiedLabels | None:
    """The verified file of a CleanNet run, read and checked (None: none, or 'shards')."""
    location = cfg.selection.verified
    if location is None or location == SHARDS or "cleannet" not in members_needed(cfg.selection):
        return None
    return read_verified_file(location, class_names)


def report_thumbnails(manifest, extensions: list[str], root: str | None) -> dict[str, bytes]:
    """Thumbnails of the samples the report lists, read back from their shards (the
    manifest's shard paths are relative to root)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from cleaner.report import checks_thumbnail_keys, top_noisy_keys

    keys = set(top_noisy_keys(manifest)) | set(checks_thumbnail_keys(manifest))
    wanted = pa.array(sorted(keys), type=pa.string())
    listed = manifest.filter(pc.is_in(manifest.column("key").cast(pa.string()), value_set=wanted))
    by_shard: dict[str, list[str]] = {}  # only the listed rows become Python strings
    for key, shard in zip(
        listed.column("key").to_pylist(), listed.column("shard").to_pylist(), strict=True
    ):
        by_shard.setdefault(absolute_shard(shard, root), []).append(key)
    return fetch_thumbnails(by_shard, extensions)


def test_thumbnails(checks, extensions: list[str]) -> dict[str, bytes]:
    """Thumbnails of the test samples that train samples duplicate (the report's leaks)."""
    by_shard: dict[str, list[str]] = {}
    for key, shard in list(checks.test_keys.values())[:MAX_LEAK_THUMBNAILS]:
        by_shard.setdefault(shard, []).append(key)
    return fetch_thumbnails(by_shard, extensions)


def print_summary(summary: dict) -> None:
    counts = summary["counts"]
    print(
        f"[clean] {counts['samples']} samples: {counts['clean']} clean, {counts['noisy']} noisy, "
        f"{counts['failed']} failed, {counts.get('off_topic', 0)} off-topic; outputs in {summary['output']}",
        flush=True,
    )
    for reason, count in list(counts.get("failed_by_reason", {}).items())[:10]:
        print(f"[clean]   failed {count:>9,} x {reason}", flush=True)
    det = summary.get("detection")
    if det:
        # a metric is None where it is undefined (no wrong label, or none flagged)
        figures = " ".join(
            f"{name} {'n/a' if det.get(name) is None else format(det[name], '.4f')}"
            for name in ("precision", "recall", "f1", "auroc")
        )
        print(f"[clean] detection vs true labels: {figures}", flush=True)
    print_detectors(summary.get("detectors"))


def print_detectors(comparison: dict | None) -> None:
    """One line per detector run: clean count and, with true labels, its figures."""
    if not comparison:
        return
    for name, entry in comparison["detectors"].items():
        det = entry.get("detection") or {}
        figures = " ".join(
            f"{key} {'n/a' if det.get(key) is None else format(det[key], '.4f')}"
            for key in ("precision", "recall", "auroc")
            if det
        )
        mark = " (chosen)" if name == comparison["chosen"] else ""
        print(f"[clean] detector {name}{mark}: {entry['clean']} clean {figures}", flush=True)


def main(argv: list[str] | None = None) -> int:
    return run_command(COMMANDS["clean"], argv, prog="python -m jobs.clean")


if __name__ == "__main__":
    run_main(main)
