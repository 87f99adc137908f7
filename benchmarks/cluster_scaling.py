"""Scoring throughput on the local autoscaling cluster with 1 and with 2 GPU worker nodes.

    python -m benchmarks.cluster_scaling --out runs/cluster_scaling.json [--samples 400]

One cluster (cluster/local/cluster.yaml: GPU-less head, GPU nodes from zero) and one moto S3
bucket of demo shards. `ray job submit` of the clean job with the default scoring settings
and `scoring.max_actors` 1, then 2, `--repeats` times in turn, each run to its own output:
with one GPU per scorer, that is one GPU node, then two. The model is ViT-B-32 with random
weights by default, so that scoring, not start-up, is what is timed.

Per run, from the job's summary: the steady scoring rate (after the first complete shard:
node launch, actor start and model load excluded) and the whole stage's rate; from Ray's
state API: the scorer actors alive at once and the nodes that ran them. Prints the medians,
the ratio 2 nodes / 1 node and the load average. The simulated GPU nodes score on this
machine's CPUs (one torch thread per scorer, as each reserves one CPU): on 2 cores the ratio
says how well two scorers share them with the readers, not what two real GPUs would give.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from benchmarks.cluster_e2e import submit_clean
from benchmarks.cluster_rehearsal import Rehearsal, read_json, rehearsal


def one_run(rh: Rehearsal, actors: int, name: str, model_overrides: list[str]) -> dict:
    """Submit one clean run with `actors` scorers; returns its observed figures."""
    rh.observer.reset_scorers()
    started = time.time()
    submit_clean(
        rh.env,
        rh.info.address,
        [
            f"data.input=s3://{rh.bucket}/train/",
            "data.classes=demo",
            f"scoring.max_actors={actors}",
            *model_overrides,
        ],
        f"s3://{rh.bucket}/runs/{name}",
    )
    rh.observer.poll_now()
    seen = rh.observer.snapshot()
    scoring = read_json(rh.client, rh.bucket, f"runs/{name}/summary.json")["scoring"]
    return {
        "max_actors": actors,
        "steady_images_per_second": scoring["steady_images_per_second"],
        "images_per_second": scoring["images_per_second"],
        "startup_seconds": scoring["startup_seconds"],
        "scorers_alive_at_once": seen.max_scorer_actors,
        "scorer_nodes": len(seen.scorer_nodes),
        "job_seconds": round(time.time() - started, 1),
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


def summarise(runs: list[dict]) -> dict:
    """Medians per pool size and the 2 / 1 ratios."""
    out: dict = {}
    for actors in sorted({r["max_actors"] for r in runs}):
        mine = [r for r in runs if r["max_actors"] == actors]
        out[f"{actors}_gpu_nodes"] = {
            "median_steady_images_per_second": statistics.median(
                r["steady_images_per_second"] for r in mine
            ),
            "median_images_per_second": statistics.median(r["images_per_second"] for r in mine),
            "most_scorers_alive_at_once": max(r["scorers_alive_at_once"] for r in mine),
        }
    if "1_gpu_nodes" in out and "2_gpu_nodes" in out:
        one, two = out["1_gpu_nodes"], out["2_gpu_nodes"]
        out["steady_ratio_2_over_1"] = round(
            two["median_steady_images_per_second"] / one["median_steady_images_per_second"], 3
        )
        out["whole_stage_ratio_2_over_1"] = round(
            two["median_images_per_second"] / one["median_images_per_second"], 3
        )
    return out


def run(args) -> dict:
    """Everything above; returns the JSON-ready result."""
    started = time.time()
    runs: list[dict] = []
    load_before = round(os.getloadavg()[0], 2)
    model = [f"model.name={args.model}", f"scoring.batch_size={args.batch_size}"]
    if args.model != "tiny-clip-shapes":
        model.append("model.random_weights=true")  # speed only: no weights to download
    with rehearsal("cluster-scaling", args.samples, args.samples_per_shard, "scaling") as rh:
        for repeat in range(args.repeats):
            for actors in (1, 2):
                name = f"actors{actors}-run{repeat}"
                result = one_run(rh, actors, name, model)
                runs.append(result)
                print(f"[scaling] {name}: {json.dumps(result)}", flush=True)
    return {
        "command": " ".join(["python -m benchmarks.cluster_scaling", *sys.argv[1:]]),
        "input_samples": rh.input_samples,
        "samples_per_shard": args.samples_per_shard,
        "model": args.model,
        "batch_size": args.batch_size,
        "runs": runs,
        **summarise(runs),
        "load_average_1m_before": load_before,
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),
        "wall_seconds": round(time.time() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="JSON file for the figures")
    parser.add_argument("--samples", type=int, default=400)
    parser.add_argument("--samples-per-shard", type=int, default=25)
    parser.add_argument(
        "--batch-size",
        type=int,
        default=32,
        help="scoring batch: small enough that the samples make many batches to share out",
    )
    parser.add_argument(
        "--model",
        default="ViT-B-32",
        help="open_clip model, random weights (the bundled tiny-clip-shapes is so fast that "
        "start-up, not scoring, would be measured)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    result = run(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
