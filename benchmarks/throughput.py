"""Scoring throughput: the whole pipeline vs its slowest stage run alone, in one run.

    python -m benchmarks.throughput --input data/demo/train [--readers 1 --actors 1]

Stages, each on the same shards and the same resources it has in the pipeline:
  decode-only   read + parse + decode + resize tasks, rows consumed and dropped
  model-only    the ClipScorer actor pool over already-decoded rows (materialised first)
  pipeline      the clean job's scoring step (read -> score -> per-shard parquet writes)
The ratio pipeline / min(decode-only, model-only) says how well the stages overlap
(1.0 = the pipeline is as fast as its bottleneck). Target >= 0.8.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

from cleaner.config import load_config
from cleaner.reading import uri as uri_lib
from cleaner.scoring.models import load_clip
from cleaner.scoring.pipeline import read_stage, score_shards, score_stage
from cleaner.scoring.prompts import encode_prompts
from cleaner.scoring.resources import plan_scorers
from jobs.common import load_class_spec


def consume(ds) -> int:
    rows = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        rows += len(batch["key"])
    return rows


def timed(label: str, fn) -> dict:
    start = time.perf_counter()
    rows = fn()
    seconds = time.perf_counter() - start
    result = {"stage": label, "rows": rows, "seconds": seconds, "images_per_s": rows / seconds}
    print(f"  {label:<12} {rows:>8} rows {seconds:8.2f} s {result['images_per_s']:10.1f} img/s")
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help="shards: folder, s3:// prefix or pattern")
    parser.add_argument("--classes", default="demo")
    parser.add_argument("--model", default="tiny-clip-shapes")
    parser.add_argument(
        "--random-weights", action="store_true", help="no checkpoint needed (speed only)"
    )
    parser.add_argument("--readers", type=int, default=1, help="reader tasks at once")
    parser.add_argument("--actors", type=int, default=1, help="scorer actors")
    parser.add_argument("--cpus-per-actor", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--num-cpus", type=int, default=None, help="local Ray CPUs")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    import ray

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(
            None,
            [
                f"data.input={args.input}",
                f"data.classes={args.classes}",
                f"output={tmp}",
                f"model.name={args.model}",
                f"model.random_weights={str(args.random_weights).lower()}",
                f"scoring.max_readers={args.readers}",
                f"scoring.min_actors={args.actors}",
                f"scoring.max_actors={args.actors}",
                f"scoring.cpus_per_actor={args.cpus_per_actor}",
                f"scoring.batch_size={args.batch_size}",
                "resume=false",
            ],
        )
        spec = load_class_spec(cfg.data.classes)
        shards = uri_lib.expand_shard_spec(cfg.data.input)
        clip = load_clip(cfg.model, device="cpu")
        bank = encode_prompts(clip.model, clip.tokenizer, spec.prompts())
        size = clip.image_size
        ray.init(num_cpus=args.num_cpus, include_dashboard=False)
        bank_ref = ray.put(bank)
        print(f"{len(shards)} shards; readers={args.readers} actors={args.actors}")

        # Warm-up: start workers and import everything once, so no stage pays for it alone.
        consume(read_stage(cfg, shards[:1], spec.names, size))
        decode = timed("decode-only", lambda: consume(read_stage(cfg, shards, spec.names, size)))
        decoded = read_stage(cfg, shards, spec.names, size).materialize()
        plan = plan_scorers(cfg, len(shards))
        model = timed("model-only", lambda: consume(score_stage(decoded, cfg, bank_ref, plan)))

        runs = []

        def pipeline_run() -> int:
            runs.append(
                score_shards(
                    cfg,
                    shards,
                    bank,
                    spec.names,
                    size,
                    uri_lib.join(tmp, "scores"),
                    "bench",
                    clip.resize,
                )
            )
            return runs[-1].samples_scored

        pipeline = timed("pipeline", pipeline_run)
        ray.shutdown()
    slowest = min(decode["images_per_s"], model["images_per_s"])
    ratio = pipeline["images_per_s"] / slowest
    print(f"pipeline / slowest stage alone = {ratio:.3f}  (target >= 0.8)")
    # The job's summary splits its rate at the first complete shard: start-up (nodes,
    # actors, model loads) apart from the streaming rate after it, which should be faster
    # than the overall rate (with several shards; 0 when every shard completes at the end).
    stats = runs[-1]
    start_up = {
        "startup_seconds": stats.first_shard_seconds,
        "overall_images_per_s": stats.images_per_second,
        "steady_images_per_s": stats.steady_images_per_second,
        "steady_over_overall": stats.steady_images_per_second / stats.images_per_second,
    }
    print(
        f"pipeline start-up {start_up['startup_seconds']:.2f} s; steady "
        f"{start_up['steady_images_per_s']:.1f} img/s / overall "
        f"{start_up['overall_images_per_s']:.1f} img/s = {start_up['steady_over_overall']:.3f}"
        "  (> 1: start-up is apart from the streaming rate)"
    )
    results = {
        "stages": [decode, model, pipeline],
        "ratio": ratio,
        "start_up": start_up,
        "args": vars(args),
    }
    if args.json:
        uri_lib.write_text(args.json, json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
