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
4. the wait for the GPU nodes to be removed once idle.

Every figure in the JSON is observed (Ray's state API polled during the runs, the jobs' own
manifests and summaries), never read from a config.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from cluster.local.localcluster import LocalCluster, free_port, local_runtime_env
from cluster.local.submit import ray_job_submit

REPO_ROOT = Path(__file__).resolve().parent.parent

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
SCORER_CLASS = "ClipScorer"  # Ray Data names the pool's actors MapWorker(MapBatches(ClipScorer))
TRAIN_WORKER_CLASS = "RayTrainWorker"


@dataclass
class Observation:
    """What the state API showed while the jobs ran."""

    gpu_nodes: set[str] = field(default_factory=set)  # every node seen with GPUs
    gpu_nodes_alive: int = 0
    max_scorer_actors: int = 0
    scorer_nodes: set[str] = field(default_factory=set)
    scorer_gpu_nodes: set[str] = field(default_factory=set)
    train_worker_nodes: set[str] = field(default_factory=set)
    alive_scorers: list[tuple[str, str]] = field(default_factory=list)  # (actor id, node id)
    errors: int = 0
    alive_trainers: list[tuple[str, str]] = field(default_factory=list)
    head_nodes: set[str] = field(default_factory=set)
    slowest_poll_s: float = 0.0


class Observer(threading.Thread):
    """Polls the cluster's state API (nodes, actors) every `interval_s` seconds."""

    def __init__(self, address: str, cluster: LocalCluster | None = None, interval_s: float = 2.0):
        super().__init__(daemon=True)
        self.address, self.interval_s, self.cluster = address, interval_s, cluster
        self.seen = Observation()
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.seen_actors: set[str] = set()
        self.earlier_actors: set[str] = set()

    def poll(self) -> None:
        from ray.util.state import list_actors, list_nodes

        started = time.monotonic()
        nodes = list_nodes(address=self.address, limit=1000, raise_on_missing_output=False)
        gpu_nodes = {n.node_id for n in nodes if (n.resources_total or {}).get("GPU", 0) > 0}
        alive_gpu = {
            n.node_id
            for n in nodes
            if n.state == "ALIVE" and (n.resources_total or {}).get("GPU", 0) > 0
        }
        listed = list_actors(address=self.address, limit=10000, raise_on_missing_output=False)
        with self.lock:  # the actors of runs before the last reset_scorers() are not counted
            listed = [a for a in listed if a.actor_id not in self.earlier_actors]
            self.seen_actors |= {a.actor_id for a in listed}
        actors = [a for a in listed if a.state == "ALIVE"]
        scorers = [a for a in actors if SCORER_CLASS in (a.class_name or "")]
        trainers = [a for a in actors if TRAIN_WORKER_CLASS in (a.class_name or "")]
        # the GCS keeps finished actors with their node: a scorer that lived between two
        # polls (or while the dashboard was too busy to answer) is still counted
        ran = {
            a.node_id
            for a in listed
            if SCORER_CLASS in (a.class_name or "")
            and a.node_id
            and a.state != "DEPENDENCIES_UNREADY"
        }
        with self.lock:
            s = self.seen
            s.gpu_nodes |= gpu_nodes
            s.gpu_nodes_alive = len(alive_gpu)
            s.max_scorer_actors = max(s.max_scorer_actors, len(scorers))
            s.scorer_nodes |= ran
            s.scorer_gpu_nodes |= {node for node in ran if node in s.gpu_nodes}
            s.train_worker_nodes |= {a.node_id for a in trainers if a.node_id}
            s.alive_scorers = [(a.actor_id, a.node_id) for a in scorers]
            s.alive_trainers = [(a.actor_id, a.node_id) for a in trainers]
            s.head_nodes |= {n.node_id for n in nodes if n.is_head_node}
            s.slowest_poll_s = max(s.slowest_poll_s, time.monotonic() - started)

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                if self.cluster is not None:
                    self.cluster.reprioritise()
                self.poll()
            except Exception:  # the dashboard is busy or restarting: try again next round
                with self.lock:
                    self.seen.errors += 1
            self.stopping.wait(self.interval_s)

    def poll_now(self, attempts: int = 10) -> None:
        """One poll from the caller's thread, retried while the dashboard is busy."""
        for attempt in range(attempts):
            try:
                self.poll()
                return
            except Exception:  # busy dashboard: the next attempt usually answers
                with self.lock:
                    self.seen.errors += 1
                time.sleep(2 * (attempt + 1))

    def snapshot(self) -> Observation:
        with self.lock:
            s = self.seen
            return Observation(
                set(s.gpu_nodes),
                s.gpu_nodes_alive,
                s.max_scorer_actors,
                set(s.scorer_nodes),
                set(s.scorer_gpu_nodes),
                set(s.train_worker_nodes),
                list(s.alive_scorers),
                s.errors,
                list(s.alive_trainers),
                set(s.head_nodes),
                s.slowest_poll_s,
            )

    def reset_scorers(self) -> None:
        """Forget the scorer figures of the runs so far (read before the next run): the GCS
        keeps their ended actors, which are no longer counted."""
        self.poll_now()
        with self.lock:
            self.earlier_actors |= self.seen_actors
            self.seen.max_scorer_actors = 0
            self.seen.scorer_nodes = set()
            self.seen.scorer_gpu_nodes = set()


@contextlib.contextmanager
def environ_restored():
    """Restore os.environ on exit: the run points this process at its own S3 and cluster,
    which must not outlive it (a caller's later ray.init would find a dead cluster)."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@contextlib.contextmanager
def work_folder(tag: str):
    """A temporary folder (shards, the cluster's Ray logs): removed after a run that
    succeeded, kept after one that failed, for its logs."""
    folder = Path(tempfile.mkdtemp(prefix=f"{tag}-"))
    try:
        yield folder
    except BaseException:
        print(f"[{tag}] the run failed: its cluster logs are kept in {folder}", flush=True)
        raise
    shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def moto_s3():
    """A moto S3 server on loopback; yields its endpoint URL."""
    port = free_port()
    moto = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen(
        [str(moto), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        endpoint = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        import socket

        while time.time() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.3)
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def upload_demo_shards(client, bucket: str, samples: int, per_shard: int, workdir: Path) -> int:
    """Generate demo shards, upload them to s3://bucket/train/; returns the samples in them
    (distinct keys counted from the tars, not from the request)."""
    from cleaner.demo.dataset import write_demo_shards

    folder = workdir / "train"
    write_demo_shards(folder, samples, samples_per_shard=per_shard, noise="symmetric",
                      noise_rate=0.4, seed=11)  # fmt: skip
    keys = set()
    for path in sorted(folder.iterdir()):
        client.upload_file(str(path), bucket, f"train/{path.name}")
        if path.suffix == ".tar":
            with tarfile.open(path) as tar:
                keys |= {f"{path.name}/{m.name.split('.')[0]}" for m in tar if m.isfile()}
    return len(keys)


def manifest_counts(client, bucket: str, prefix: str) -> dict:
    """Rows and duplicate keys of the manifest a clean job wrote to s3://bucket/prefix/."""
    import pyarrow.parquet as pq

    body = client.get_object(Bucket=bucket, Key=f"{prefix}/manifest.parquet")["Body"].read()
    table = pq.read_table(io.BytesIO(body), columns=["key", "shard"])
    pairs = list(
        zip(table.column("shard").to_pylist(), table.column("key").to_pylist(), strict=True)
    )
    return {"manifest_rows": table.num_rows, "duplicate_keys": len(pairs) - len(set(pairs))}


@dataclass
class Rehearsal:
    """A running local cluster with demo shards on moto S3, and its state-API observer."""

    client: object  # boto3 S3 client on the moto endpoint
    bucket: str
    input_samples: int
    cluster: LocalCluster
    info: object  # localcluster.ClusterInfo
    env: dict  # environment for the `ray` CLI (address, token)
    observer: Observer


@contextlib.contextmanager
def rehearsal(bucket: str, samples: int, per_shard: int, tag: str):
    """Moto S3 with `samples` demo images under s3://bucket/train/, the local autoscaling
    cluster with an observer polling it every second; all torn down on exit, even on
    failure (the cluster's logs are kept only after a failure)."""
    import boto3

    started = time.time()
    with work_folder(tag) as workdir, moto_s3() as endpoint, environ_restored():
        s3env = {**S3_ENV, "AWS_ENDPOINT_URL": endpoint}
        os.environ.update(s3env)
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket=bucket)
        inputs = upload_demo_shards(client, bucket, samples, per_shard, workdir)
        print(f"[{tag}] {inputs} samples uploaded to s3://{bucket}/train/", flush=True)
        cluster = LocalCluster(workdir / "cluster", env=s3env)
        observer = None
        try:
            info = cluster.up()
            env = cluster.client_env()
            os.environ.update(info.env())
            print(
                f"[{tag}] cluster up at {info.address} ({time.time() - started:.0f} s)", flush=True
            )
            observer = Observer(info.address, cluster, interval_s=1.0)
            observer.start()
            yield Rehearsal(client, bucket, inputs, cluster, info, env, observer)
        finally:
            if observer is not None:
                observer.stopping.set()
            print(f"[{tag}] cluster down ({cluster.down()} processes)", flush=True)


def read_json(client, bucket: str, key: str) -> dict:
    return json.loads(client.get_object(Bucket=bucket, Key=key)["Body"].read())


def submit(env: dict, address: str, *entrypoint: str, wait: bool = True, job_id: str = "") -> str:
    """`ray job submit` with the project's runtime env (the repo in place: `local_runtime_env`);
    returns the job's output (wait) or id."""
    job_id = job_id or f"e2e-{uuid.uuid4().hex[:8]}"
    options = [f"--runtime-env-json={local_runtime_env()}", f"--submission-id={job_id}"]
    options += [] if wait else ["--no-wait"]
    done = ray_job_submit(address, env, options, ["python", "-m", *entrypoint])
    if done.returncode != 0:
        raise RuntimeError(f"job {job_id} failed:\n{done.stdout[-6000:]}\n{done.stderr[-3000:]}")
    return done.stdout if wait else job_id


def wait_job(address: str, job_id: str, timeout_s: float) -> str:
    """Wait for a submitted job to end; returns its status, raises with its logs if it failed."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        status = client.get_job_status(job_id)
        if status in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
            if status != JobStatus.SUCCEEDED:
                raise RuntimeError(f"job {job_id} {status}:\n{client.get_job_logs(job_id)[-6000:]}")
            return str(status)
        time.sleep(2)
    client.stop_job(job_id)
    raise TimeoutError(f"job {job_id} still running after {timeout_s:.0f} s")


def job_running(address: str, job_id: str) -> bool:
    from ray.job_submission import JobStatus, JobSubmissionClient

    status = JobSubmissionClient(address).get_job_status(job_id)
    return status in {JobStatus.PENDING, JobStatus.RUNNING}


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


def job_end(address: str, job_id: str) -> str:
    """The status of an ended job, and the tail of its logs if it did not succeed."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    status = client.get_job_status(job_id)
    if status == JobStatus.SUCCEEDED:
        return str(status)
    return f"{status}:\n{client.get_job_logs(job_id)[-4000:]}"


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


def wait_gpu_nodes_removed(observer: Observer, timeout_s: float) -> int:
    """Wait up to timeout_s for the autoscaler to remove every GPU node; returns how many
    are still alive."""
    deadline = time.time() + timeout_s
    while time.time() < deadline and observer.snapshot().gpu_nodes_alive > 0:
        time.sleep(2)
    observer.poll_now()
    return observer.snapshot().gpu_nodes_alive


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
