"""The local-cluster rehearsal shared by benchmarks.cluster_e2e and benchmarks.chaos.

Moto S3 with generated demo shards, the local autoscaling cluster of cluster/local/, an
observer polling Ray's state API, and the `ray job submit` / job-status helpers the runs use.
Everything is torn down on exit, even on failure (the cluster's logs are kept only then).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from cluster.local.localcluster import LocalCluster, free_port, local_runtime_env, own_cpu_group
from cluster.local.submit import ray_job_submit

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
    """A moto S3 server on loopback; yields its endpoint URL (the tests' too).

    It runs in a CPU group of its own, weighted like the cluster's (LOCALCLUSTER_CPU_NICE):
    S3 is a service apart from the cluster, and a cluster favoured over it on a loaded
    machine starves it until its clients' requests time out (3 s without a byte)."""
    port = free_port()
    moto = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen(
        [str(moto), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=own_cpu_group,
    )
    try:
        deadline = time.time() + 60
        while not port_open(port):
            if time.time() > deadline:
                raise TimeoutError(f"moto S3 not listening on 127.0.0.1:{port} after 60 s")
            time.sleep(0.3)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


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
def rehearsal(bucket: str, samples: int, per_shard: int, tag: str, observe_every_s: float = 1.0):
    """Moto S3 with `samples` demo images under s3://bucket/train/, the local autoscaling
    cluster with an observer polling it every `observe_every_s`; all torn down on exit, even on
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
            observer = Observer(info.address, cluster, interval_s=observe_every_s)
            observer.start()
            yield Rehearsal(client, bucket, inputs, cluster, info, env, observer)
        finally:
            if observer is not None:
                observer.stopping.set()
            print(f"[{tag}] cluster down ({cluster.down()} processes)", flush=True)


def read_json(client, bucket: str, key: str) -> dict:
    return json.loads(client.get_object(Bucket=bucket, Key=key)["Body"].read())


def submit(
    env: dict,
    address: str,
    *entrypoint: str,
    wait: bool = True,
    job_id: str = "",
    env_vars: dict[str, str] | None = None,
    then: list[str] | None = None,
) -> str:
    """`ray job submit` of `python -m <entrypoint>` with the project's runtime env (the repo
    in place: `local_runtime_env`, plus `env_vars`), and of `python -m <then>` after it in
    the same job when it succeeds; returns the job's output (wait) or id."""
    job_id = job_id or f"e2e-{uuid.uuid4().hex[:8]}"
    runtime_env = local_runtime_env(env_vars=env_vars)
    options = [f"--runtime-env-json={runtime_env}", f"--submission-id={job_id}"]
    options += [] if wait else ["--no-wait"]
    command = ["python", "-m", *entrypoint]
    if then:  # `ray job submit` quotes each word: the shell's && needs a shell of its own
        command = ["bash", "-c", f"{shlex.join(command)} && {shlex.join(['python', '-m', *then])}"]
    done = ray_job_submit(address, env, options, command)
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


def job_end(address: str, job_id: str) -> str:
    """The status of an ended job, and the tail of its logs if it did not succeed."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    status = client.get_job_status(job_id)
    if status == JobStatus.SUCCEEDED:
        return str(status)
    return f"{status}:\n{client.get_job_logs(job_id)[-4000:]}"


def wait_gpu_nodes_removed(observer: Observer, timeout_s: float) -> int:
    """Wait up to timeout_s for the autoscaler to remove every GPU node; returns how many
    are still alive."""
    deadline = time.time() + timeout_s
    while time.time() < deadline and observer.snapshot().gpu_nodes_alive > 0:
        time.sleep(2)
    observer.poll_now()
    return observer.snapshot().gpu_nodes_alive
