"""The production flow on a local autoscaling cluster, observed end to end.

    python -m benchmarks.cluster_e2e --out runs/cluster_e2e.json [--samples 600]

One go, torn down even on failure:
1. a moto S3 endpoint with generated demo shards, and the local autoscaling cluster of
   cluster/local/cluster.yaml (GPU-less head, GPU workers from zero, token auth);
2. `ray job submit` of jobs.pipeline (clean, then train) with the DEFAULT scoring settings,
   data and outputs on S3, training with 2 workers spread over 2 nodes;
3. once the idle GPU nodes are removed, a second clean run, on GPU nodes launched from zero
   again, during which the node of a running scorer is killed whole (raylet, object store,
   workers), then the manifest is checked: every input sample once (with --no-train, the
   one clean run is the node-kill run);
4. with --train-kill-run, jobs.train on that run's manifest, during which the node of a
   random training worker is killed at a random batch of a random epoch (the kill and its
   checks are benchmarks.chaos's): every epoch must still be trained;
5. the wait for the GPU nodes to be removed once idle.

Every figure in the JSON is observed (Ray's state API polled during the runs, the jobs' own
manifests and summaries), never read from a config.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

from benchmarks.chaos_trial import Trial, TrialJob, TrialPlan
from benchmarks.chaos_watch import ClusterWatch
from benchmarks.cluster_rehearsal import (
    SCORER_CLASS,
    Observer,
    Rehearsal,
    job_end,
    job_running,
    manifest_counts,
    read_json,
    rehearsal,
    submit,
    wait_gpu_nodes_removed,
    wait_job,
)
from cluster.local.localcluster import LocalCluster


def kill_a_scorer_node(cluster: LocalCluster, observer: Observer, address: str, job_id: str) -> str:
    """Once a scorer has loaded its model on a GPU worker node (it then takes and scores
    blocks), SIGKILL that whole node; returns its id.

    The scorer is looked for twice: in /proc, four times a second (a scorer's worker
    process is titled after its class, with `.__init__` while it loads), and in the
    observer's state-API polls. A scorer of a small run lives for a few seconds only once
    loaded, and on a loaded machine the dashboard can take longer than that to answer.
    """
    status_checked = 0.0
    while True:
        seen = observer.snapshot()
        in_proc = cluster.nodes_running(SCORER_CLASS, unless=".__init__")
        running = in_proc | {node for _, node in seen.alive_scorers}
        for node_id in sorted(running & seen.gpu_nodes):
            cluster.kill_node(node_id)
            source = "/proc" if node_id in in_proc else "the state API"
            print(f"[e2e] a scorer on GPU node {node_id} (seen in {source}): killed", flush=True)
            return node_id
        if time.monotonic() - status_checked > 2:  # not every pass: a dashboard request
            if not job_running(address, job_id):
                break
            status_checked = time.monotonic()
        time.sleep(0.25)
    raise RuntimeError(
        f"job {job_id} ended ({job_end(address, job_id)}) before a scorer was seen on a GPU "
        f"node; seen: {observer.snapshot()}"
    )


def kill_a_trainer_node(
    cluster: LocalCluster,
    observer: Observer,
    client,
    bucket: str,
    prefix: str,
    address: str,
    job_id: str,
) -> tuple[str, set[str]]:
    """Once the run has a checkpoint and a training worker on a worker node, SIGKILL that
    node; returns its id and the nodes that held training workers before."""
    while job_running(address, job_id):
        seen = observer.snapshot()
        listed = client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
        if any("/checkpoint_" in o["Key"] for o in listed):
            for _, node_id in seen.alive_trainers:
                if node_id not in seen.head_nodes:
                    before = set(seen.train_worker_nodes)
                    cluster.kill_node(node_id)
                    return node_id, before
        time.sleep(1)
    raise RuntimeError(f"job {job_id} ended before a checkpoint and a worker-node trainer")


def submit_clean(env: dict, address: str, overrides: list[str], output: str, **kw) -> str:
    """`ray job submit` of jobs.clean with the local cluster's config."""
    return submit(
        env,
        address,
        "jobs.clean",
        "--config=configs/local-cluster.yaml",
        *overrides,
        f"output={output}",
        **kw,
    )


def clean_run_killing_a_scorer_node(rh: Rehearsal, overrides: list[str], prefix: str, args):
    """Submit jobs.clean to s3://bucket/prefix, SIGKILL the GPU node of a running scorer,
    wait for the job; returns the node_kill figures (killed node, inputs, manifest counts)."""
    job = submit_clean(rh.env, rh.info.address, overrides, f"s3://{rh.bucket}/{prefix}", wait=False)
    killed = kill_a_scorer_node(rh.cluster, rh.observer, rh.info.address, job)
    print(f"[e2e] killed node {killed} while it scored", flush=True)
    wait_job(rh.info.address, job, args.job_timeout)
    return {
        "killed_node": killed,
        "input_samples": rh.input_samples,
        **manifest_counts(rh.client, rh.bucket, prefix),
    }


def train_run_killing_a_random_trainer_node(rh: Rehearsal, clean_prefix: str, args) -> dict:
    """jobs.train on the manifest of the clean run at s3://bucket/clean_prefix, with the node
    of a random training worker (rank 0's among them: it published the epoch state, and
    once owned it) killed at a random batch of a random epoch; the kill and the checks are
    benchmarks.chaos's training stage (chaos_trial). Returns the trial's figures."""
    seed = args.seed if args.seed is not None else random.SystemRandom().getrandbits(31)
    plan = TrialPlan(1, "training", 1, seed)
    job = TrialJob(
        [
            "jobs.train",
            "--config=configs/train-local-cluster.yaml",
            f"data.input=s3://{rh.bucket}/train/",
            f"data.manifest=s3://{rh.bucket}/{clean_prefix}",
            "data.classes=demo",
            f"run.storage=s3://{rh.bucket}/train-kill",
            f"optim.epochs={args.epochs}",
            f"optim.batch_size={args.train_batch_size}",
            "data.test_input=null",
        ],
        clean_prefix,
        "train-kill",
    )
    rh.observer.poll_now()
    watch = ClusterWatch(rh.cluster, head=next(iter(rh.observer.snapshot().head_nodes)))
    print(f"[e2e] jobs.train with a {plan.stage} kill (seed {seed}: --seed {seed} replays it)")
    return {"seed": seed, **Trial(rh, watch, plan, job, args).run()}


def run(args) -> dict:
    """Everything above; returns the JSON-ready result."""
    started = time.time()
    result: dict = {}
    with rehearsal("cluster-e2e", args.samples, args.samples_per_shard, "e2e") as rh:
        client, bucket, inputs = rh.client, rh.bucket, rh.input_samples
        cluster, info, env, observer = rh.cluster, rh.info, rh.env, rh.observer
        clean = [
            f"data.input=s3://{bucket}/train/",
            "data.classes=demo",
            f"scoring.batch_size={args.batch_size}",
        ]
        if args.train:
            print("[e2e] submitting jobs.pipeline (clean, then train)", flush=True)
            job = submit(
                env,
                info.address,
                "jobs.pipeline",
                "--clean-config=configs/local-cluster.yaml",
                "--train-config=configs/train-local-cluster.yaml",
                *[f"clean.{o}" for o in clean],
                f"clean.output=s3://{bucket}/runs/clean",
                f"train.run.storage=s3://{bucket}/train-runs",
                f"train.optim.epochs={args.epochs}",
                "train.data.test_input=null",
                wait=False,
            )
            if args.kill_train:
                killed, before = kill_a_trainer_node(
                    cluster, observer, client, bucket, "train-runs/local-cluster/",
                    info.address, job,
                )  # fmt: skip
                print(f"[e2e] killed node {killed} while it trained", flush=True)
            wait_job(info.address, job, args.job_timeout)
            if args.kill_train:
                after = observer.snapshot().train_worker_nodes - before
                result["train_node_kill"] = {
                    "killed_node": killed,
                    "replacement_nodes": len(after),
                }
        else:
            # Without training, the one clean run is also the node-kill run: its scorers
            # start on GPU nodes launched from zero, which leaves a wide window to kill one
            # (warm nodes can score a small input between two polls of the state API).
            print("[e2e] submitting jobs.clean", flush=True)
            if args.kill:
                result["node_kill"] = clean_run_killing_a_scorer_node(rh, clean, "runs/clean", args)
            else:
                submit_clean(env, info.address, clean, f"s3://{bucket}/runs/clean")
        observer.poll_now()
        seen = observer.snapshot()
        summary = read_json(client, bucket, "runs/clean/summary.json")
        result.update(
            gpu_nodes_launched=len(seen.gpu_nodes),
            max_scorer_actors=seen.max_scorer_actors,
            scorer_nodes=len(seen.scorer_nodes),
            default_config_used_gpu_nodes=bool(seen.scorer_nodes)
            and seen.scorer_nodes <= seen.gpu_nodes,
            input_samples=inputs,
            **manifest_counts(client, bucket, "runs/clean"),
            job_samples=summary["counts"]["samples"],
            images_per_second=summary["scoring"]["images_per_second"],
        )
        if args.train:
            train = read_json(client, bucket, "train-runs/local-cluster/summary.json")
            result.update(
                train_worker_nodes=len(seen.train_worker_nodes),
                train_epochs_completed=train["epochs_completed"],
            )
            if args.kill_train:
                result["train_node_kill"]["epochs_completed"] = train["epochs_completed"]
        print(f"[e2e] first run: {json.dumps(result)}", flush=True)

        if args.kill and args.train:
            # The scorer kill in a second run, on GPU nodes launched from zero again (see
            # above): wait for the autoscaler to remove the first run's idle nodes.
            left = wait_gpu_nodes_removed(observer, args.idle_timeout)
            result["gpu_nodes_after_first_idle"] = left
            observer.reset_scorers()
            result["node_kill"] = clean_run_killing_a_scorer_node(rh, clean, "runs/node-kill", args)
            print(f"[e2e] node kill: {json.dumps(result['node_kill'])}", flush=True)

        if args.train_kill_run:
            result["train_kill"] = train_run_killing_a_random_trainer_node(rh, "runs/clean", args)
            print(f"[e2e] training-node kill: {json.dumps(result['train_kill'])}", flush=True)

        result["gpu_nodes_after_idle"] = wait_gpu_nodes_removed(observer, args.idle_timeout)
        result["gpu_nodes_launched"] = len(observer.snapshot().gpu_nodes)
        result["state_api_poll_errors"] = observer.snapshot().errors
        result["slowest_state_api_poll_s"] = round(observer.snapshot().slowest_poll_s, 2)
    result["wall_seconds"] = round(time.time() - started, 1)
    result["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="JSON file for the observed figures")
    parser.add_argument("--samples", type=int, default=600)
    parser.add_argument("--samples-per-shard", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--no-train", dest="train", action="store_false")
    parser.add_argument("--no-kill", dest="kill", action="store_false")
    parser.add_argument("--no-kill-train", dest="kill_train", action="store_false")
    parser.add_argument(
        "--train-kill-run",
        action="store_true",
        help="then jobs.train on the clean run's manifest, a random trainer node killed",
    )
    parser.add_argument("--train-batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=None, help="of --train-kill-run's kill")
    parser.add_argument("--job-timeout", type=float, default=900)
    parser.add_argument("--idle-timeout", type=float, default=150)
    args = parser.parse_args(argv)
    result = run(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
