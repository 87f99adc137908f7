"""What a chaos trial watches: the job's log lines as they are written, what each node of
the local cluster runs (from /proc), the job's outputs on S3, and afterwards the recovery
that Ray recorded (state API) and the job logged.

Nothing here kills anything; benchmarks.chaos decides when and what (chaos_stages).
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from cluster.local.localcluster import LocalCluster, process_cmdline

# Ray titles a worker process `ray::<actor class or task name>[.<method>]`. These run on
# every node (agents), idle, or are Ray's own cluster services on the head.
NOT_WORK = ("ray::IDLE", "ray::DashboardAgent", "ray::RuntimeEnvAgent", "ray::JobSupervisor")
# Coordinators and stores a job needs until it ends: they must live on the driver's node.
JOB_STATE_ACTORS = (
    "EpochStateStore",
    "TrainController",
    "SplitCoordinator",
    "ActorLocationTracker",
    "_StatsActor",
    "_AutoscalingCoordinatorActor",
)

TRAIN_PROGRESS = re.compile(r"\[train epoch (\d+)/(\d+), rank 0\] (\d+)/(\d+) batches")
TRAIN_METRICS = re.compile(r'\[train\] \{"epoch": (\d+)')
TRAIN_RESUMED = re.compile(r"\[train\] rank (\d+): resumed after epoch (\d+)")
WORKER_PID = re.compile(r"worker-[0-9a-f]+-[0-9a-f]+-(\d+)\.(out|err)$")
CHECKPOINT_CREATED = "Checkpoint successfully created at"  # Ray Train, on the worker's stderr


def work_titles(processes: list[tuple[int, str]]) -> dict[int, str]:
    """pid -> Ray title of the processes doing a job's work (agents and idle workers left out)."""
    found = {}
    for pid, cmd in processes:
        title = cmd.strip()
        if title.startswith("ray::") and not title.startswith(NOT_WORK):
            found[pid] = title[len("ray::") :]
    return found


class LogWatch:
    """Follows the cluster's session logs: the job driver's log and every worker's stdout.

    Lines are read as the files grow (a worker's `print(..., flush=True)` is seen within a
    poll, before Ray relays it to the driver's log). Keeps what the stages ask about: the
    driver's lines, rank 0's training progress and its pid.
    """

    def __init__(self, temp_dir: str, submission_id: str):
        self.logs = Path(temp_dir) / "session_latest" / "logs"
        self.driver_name = f"job-driver-{submission_id}.log"
        self.offsets: dict[Path, int] = {}
        # workers log to files named after their job: those already there belong to
        # earlier jobs (trials) and are never read
        self.earlier = set(self._worker_files())
        self.worker_files: list[Path] = []
        self.listed_at = 0.0
        self.driver_lines: list[str] = []
        self.worker_lines: list[tuple[int, str]] = []  # (pid, line), in reading order
        self.rank0_pids: list[int] = []
        self.train_progress: tuple[int, int, int, int] | None = None  # epoch, of, batch, of
        self.metrics_epochs: list[int] = []  # epochs whose metrics rank 0 printed
        self.resumed: list[tuple[int, int]] = []  # (rank, after epoch)
        # the epoch whose metrics rank 0 printed and whose checkpoint Ray Train has not yet
        # confirmed as created (rank 0 is writing or uploading it), else None
        self.checkpoint_pending: int | None = None
        self.lock = threading.Lock()

    def _worker_files(self) -> list[Path]:
        try:
            return [p for p in self.logs.iterdir() if WORKER_PID.search(p.name)]
        except OSError:
            return []

    def _new_lines(self, path: Path) -> list[str]:
        try:
            size = path.stat().st_size
            start = self.offsets.get(path, 0)
            if size <= start:
                return []
            with open(path, "rb") as f:
                f.seek(start)
                chunk = f.read(size - start)
        except OSError:
            return []
        complete = chunk.rfind(b"\n") + 1  # a half-written last line waits for the next poll
        self.offsets[path] = start + complete
        return chunk[:complete].decode(errors="replace").splitlines()

    def poll(self) -> None:
        """Read what was written since the last poll (new worker files are looked for once a
        second; the known ones are read at every poll)."""
        lines = self._new_lines(self.logs / self.driver_name)
        if time.monotonic() - self.listed_at > 1.0:
            self.worker_files = [p for p in self._worker_files() if p not in self.earlier]
            self.listed_at = time.monotonic()
        worker_lines, errors = [], []
        for path in self.worker_files:
            match = WORKER_PID.search(path.name)
            pid, stream = int(match.group(1)), match.group(2)
            new = [(pid, line) for line in self._new_lines(path)]
            # Ray Train copies a worker's stdout to its stderr: stdout alone is parsed, and
            # stderr only for Ray Train's own lines
            (worker_lines if stream == "out" else errors).extend(new)
        with self.lock:
            self.driver_lines += lines
            self.worker_lines += worker_lines
            for pid, line in worker_lines:
                if progress := TRAIN_PROGRESS.search(line):
                    self.train_progress = tuple(int(g) for g in progress.groups())
                    self._rank0(pid)
                if metrics := TRAIN_METRICS.search(line):
                    self.metrics_epochs.append(int(metrics.group(1)))
                    self.checkpoint_pending = int(metrics.group(1))
                    self._rank0(pid)
                if resumed := TRAIN_RESUMED.search(line):
                    self.resumed.append((int(resumed.group(1)), int(resumed.group(2))))
            if any(CHECKPOINT_CREATED in line for pid, line in errors if pid in self.rank0_pids):
                self.checkpoint_pending = None

    def _rank0(self, pid: int) -> None:
        if pid not in self.rank0_pids:
            self.rank0_pids.append(pid)

    def driver_has(self, fragment: str) -> bool:
        with self.lock:
            return any(fragment in line for line in self.driver_lines)

    def driver_has_after(self, first: str, then: str) -> bool:
        """Whether a driver line holding `then` came after the first one holding `first`."""
        with self.lock:
            start = next((i for i, ln in enumerate(self.driver_lines) if first in ln), None)
            return start is not None and any(then in ln for ln in self.driver_lines[start:])

    def last_driver_line(self, prefix: str) -> str:
        with self.lock:
            return next((ln for ln in reversed(self.driver_lines) if ln.startswith(prefix)), "")


@dataclass
class NodeView:
    """One look at what every node of the cluster runs."""

    at: float
    work: dict[str, dict[int, str]]  # node id -> pid -> title of its job work
    alive: set[str]
    processes: dict[str, list[tuple[int, str]]]  # node id -> (pid, command line), all

    def nodes_with(self, fragment: str, head: str) -> list[str]:
        """Non-head nodes running work whose title holds `fragment` (sorted)."""
        return sorted(
            node
            for node, titles in self.work.items()
            if node != head and any(fragment in title for title in titles.values())
        )

    def refreshed(self, nodes: list[str]) -> NodeView:
        """This look narrowed to `nodes`, with the titles their processes carry now: a look
        takes a while on a loaded machine, and a task done since has left its worker idle
        (Ray titles it `ray::IDLE` again), so a kill aimed from the look alone can hit a
        node with no work left."""
        processes = {n: self.processes.get(n, []) for n in nodes}
        now = {
            n: [(pid, cmd) for pid, _ in procs if (cmd := process_cmdline(pid))]
            for n, procs in processes.items()
        }
        work = {n: work_titles(procs) for n, procs in now.items()}
        return NodeView(time.time(), work, {n for n in nodes if n in self.alive}, now)


@dataclass
class ClusterWatch:
    """Node births and the placement of job-state actors, over a whole chaos run."""

    cluster: LocalCluster
    head: str  # the head node's id (the driver's node)
    first_seen: dict[str, float] = field(default_factory=dict)
    misplaced: set[str] = field(default_factory=set)  # "<actor> on <node>" off the head

    def look(self) -> NodeView:
        processes = self.cluster.node_processes()
        now = time.time()
        work = {node: work_titles(procs) for node, procs in processes.items()}
        for node in processes:
            self.first_seen.setdefault(node, now)
        for node, titles in work.items():
            if node != self.head:
                for title in titles.values():
                    for actor in JOB_STATE_ACTORS:
                        if title.startswith(actor):
                            self.misplaced.add(f"{actor} on {node}")
        return NodeView(now, work, set(processes), processes)

    def born_after(self, moment: float) -> list[str]:
        return sorted(node for node, seen in self.first_seen.items() if seen > moment)


def s3_keys(client, bucket: str, prefix: str) -> list[str]:
    keys, token = [], None
    while True:
        extra = {"ContinuationToken": token} if token else {}
        page = client.list_objects_v2(Bucket=bucket, Prefix=prefix, **extra)
        keys += [o["Key"] for o in page.get("Contents", [])]
        token = page.get("NextContinuationToken")
        if not token:
            return keys


def score_files(client, bucket: str, clean_prefix: str) -> int:
    """Shards whose score file is complete (merged) under <clean>/scores/."""
    return sum(
        1
        for key in s3_keys(client, bucket, f"{clean_prefix}/scores/")
        if key.endswith(".parquet") and "/_parts/" not in key
    )


def checkpoints(client, bucket: str, train_prefix: str) -> dict[str, int]:
    """Checkpoint folder -> files in it, under the training run's storage."""
    found: dict[str, int] = {}
    for key in s3_keys(client, bucket, f"{train_prefix}/"):
        parts = key.split("/")
        for i, part in enumerate(parts[:-1]):
            if part.startswith("checkpoint_"):
                folder = "/".join(parts[: i + 1])
                found[folder] = found.get(folder, 0) + 1
    return found


def registered_epoch(client, bucket: str, run_prefix: str) -> int:
    """The last epoch whose checkpoint Ray Train has registered (its checkpoint manager's
    snapshot in the run folder), 0 before the first."""
    try:
        body = client.get_object(
            Bucket=bucket, Key=f"{run_prefix}/checkpoint_manager_snapshot.json"
        )
    except client.exceptions.NoSuchKey:
        return 0
    results = json.loads(body["Body"].read()).get("checkpoint_results", [])
    return max((int(r.get("metrics", {}).get("epoch", 0)) for r in results), default=0)


@dataclass
class Stored:
    """The job's outputs on S3, read just after a kill (later, if anything, than the kill:
    work found unfinished there was unfinished at the kill)."""

    shards_complete: int
    manifest_written: bool
    registered_epoch: int
    checkpoint_folders: int
    read_after_s: float = 0.0
    export_shards: int = 0  # tar shards the export has written so far
    export_done: bool = False  # its summary.json (written after every shard) is there


def stored_now(
    client,
    bucket: str,
    clean_prefix: str,
    train_prefix: str,
    run_name: str,
    export_prefix: str = "",
) -> Stored:
    manifest = s3_keys(client, bucket, f"{clean_prefix}/manifest.parquet")
    exported = s3_keys(client, bucket, f"{export_prefix}/") if export_prefix else []
    return Stored(
        shards_complete=score_files(client, bucket, clean_prefix),
        manifest_written=bool(manifest),
        registered_epoch=registered_epoch(client, bucket, f"{train_prefix}/{run_name}"),
        checkpoint_folders=len(checkpoints(client, bucket, train_prefix)),
        export_shards=sum(1 for key in exported if key.endswith(".tar")),
        export_done=f"{export_prefix}/summary.json" in exported,
    )


@dataclass
class Recovery:
    """What Ray recorded of the job's recovery (state API), and what the job logged."""

    # work the kills hit and Ray did again: tasks (actor creations included) with an
    # attempt on a killed node and a later attempt: retried, restarted or reconstructed
    redone_after_kill: int = 0
    redone_names: list[str] = field(default_factory=list)
    actor_restarts: int = 0  # all of the job's, whatever the cause
    restarted_actors: list[str] = field(default_factory=list)
    retried_tasks: int = 0  # task attempts above 0, all of the job's
    train_worker_groups: int = 0
    resumed_from_epochs: list[int] = field(default_factory=list)
    state_api_error: str = ""

    @property
    def worker_group_restarts(self) -> int:
        return max(0, self.train_worker_groups - 1)

    @property
    def observed(self) -> bool:
        """Ray redid work of a killed node, or restarted the training worker group."""
        return bool(self.redone_after_kill or self.worker_group_restarts)


def job_state(address: str, submission_id: str) -> tuple[list, list]:
    """The job's actors (with detail) and task attempts from the state API, asked again
    while a loaded dashboard fails to answer."""
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_actors, list_tasks

    for attempt in range(4):
        try:
            job_id = JobSubmissionClient(address).get_job_info(submission_id).job_id
            only_job = [("job_id", "=", job_id)]
            actors = list_actors(
                address=address, filters=only_job, detail=True, limit=10000,
                raise_on_missing_output=False,
            )  # fmt: skip
            tasks = list_tasks(
                address=address, filters=only_job, limit=10000, raise_on_missing_output=False
            )
            return actors, tasks
        except Exception:  # a busy dashboard: ask again, then let the caller report it
            if attempt == 3:
                raise
            time.sleep(5 * (attempt + 1))
    raise AssertionError("unreachable")


def recovery_of(
    address: str, submission_id: str, killed: set[str], num_train_workers: int, log: LogWatch
) -> Recovery:
    """What Ray redid of the `killed` nodes' work (task attempts by node, from the state
    API), the job's actor restarts and Ray Train worker groups; the resumes from its logs."""
    found = Recovery(resumed_from_epochs=sorted({e for rank, e in log.resumed if rank == 0}))
    try:
        actors, tasks = job_state(address, submission_id)
    except Exception as err:  # reported with the trial rather than guessed
        found.state_api_error = f"{type(err).__name__}: {err}"[:300]
        return found
    for actor in actors:
        if actor.num_restarts:
            found.actor_restarts += actor.num_restarts
            found.restarted_actors.append(f"{actor.class_name} x{actor.num_restarts}")
        if "RayTrainWorker" in (actor.class_name or ""):
            found.train_worker_groups += 1
    found.train_worker_groups = -(-found.train_worker_groups // max(1, num_train_workers))
    found.retried_tasks = sum(1 for t in tasks if t.attempt_number > 0)
    attempts: dict[str, list] = {}
    for task in tasks:
        attempts.setdefault(task.task_id, []).append(task)
    redone = set()
    for task_attempts in attempts.values():
        on_killed = [t.attempt_number for t in task_attempts if t.node_id in killed]
        if on_killed and any(t.attempt_number > min(on_killed) for t in task_attempts):
            redone.add(task_attempts[0].name)
            found.redone_after_kill += 1
    found.redone_names = sorted(redone)[:12]
    return found
