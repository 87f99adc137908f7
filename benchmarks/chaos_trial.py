"""One chaos trial: a job submitted to the local cluster, watched from its log lines and
/proc, one or two of its worker nodes killed at the planned moment, and what followed
checked (benchmarks.chaos runs the pipeline in trials; benchmarks.cluster_e2e one
training run the same way)."""

from __future__ import annotations

import contextlib
import random
import re
import shutil
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

from benchmarks.chaos_stages import STAGES, TrialContext, as_dict, progress_now, stage_of
from benchmarks.chaos_watch import ClusterWatch, LogWatch, recovery_of, score_files, stored_now
from benchmarks.cluster_rehearsal import (
    Rehearsal,
    job_end,
    job_running,
    manifest_counts,
    read_json,
    submit,
)

TRAIN_WORKERS = 2  # configs/train-local-cluster.yaml
PROGRESS_ENV = {"CLIPCLEANER_PROGRESS_INTERVAL_S": "0"}  # a progress line per shard and batch


@dataclass(frozen=True)
class TrialPlan:
    number: int  # 1-based
    stage: str
    kills: int
    seed: int


def role_of(titles: dict[int, str], rank0_pids: list[int]) -> str:
    """What a node ran when it was killed (its workers' Ray titles without the method they
    ran; `starting` for an actor still in its constructor), rank 0 marked."""
    named = set()
    for pid, title in titles.items():
        name = re.sub(r"\.[A-Za-z_]\w*$", "", title)
        name += " (starting)" if title.endswith(".__init__") else ""
        named.add(name + (" (rank 0)" if pid in rank0_pids else ""))
    return ", ".join(sorted(named)) or "no task running (object store only)"


def job_end_watch(address: str, submission_id: str) -> threading.Event:
    """An event set once the job has ended, asked of the dashboard every 2 s in a thread of
    its own: a loaded dashboard can take seconds to answer, which the kill loop must not wait."""
    ended = threading.Event()

    def watch() -> None:
        while not ended.wait(2):
            with contextlib.suppress(Exception):  # busy dashboard: ask again
                if not job_running(address, submission_id):
                    ended.set()

    threading.Thread(target=watch, daemon=True).start()
    return ended


class Looker(threading.Thread):
    """Looks at what every node runs (ClusterWatch.look: a scan of /proc, which takes a
    while on a loaded machine) every `every_s`, in a thread apart from the loop that
    follows the logs, so that a kill comes within a poll of its moment."""

    def __init__(self, watch: ClusterWatch, ctx: TrialContext, stage, every_s: float = 0.5):
        super().__init__(daemon=True)
        self.watch, self.ctx, self.stage, self.every_s = watch, ctx, stage, every_s
        self.view = None
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                view = self.watch.look()
            except OSError:  # /proc changing under the scan: look again
                continue
            self.stage.watch(view, self.ctx, view.at)
            self.view = view
            self.stopping.wait(self.every_s)

    def latest(self):
        return self.view


@dataclass(frozen=True)
class TrialJob:
    """What a trial submits, and where its outputs go (prefixes in the rehearsal's bucket)."""

    command: list[str]  # the module and its arguments, `python -m` them
    clean_prefix: str  # the clean run whose manifest is checked (written by this job or before)
    train_prefix: str  # the training run's storage
    run_name: str = "local-cluster"  # configs/train-local-cluster.yaml
    export_prefix: str = ""  # where the job exports the clean set after training, if it does
    then: list[str] | None = None  # a module and its arguments run after `command` succeeds


class Trial:
    """One job with its planned kills, watched from submission to its end."""

    def __init__(self, rh: Rehearsal, watch: ClusterWatch, plan: TrialPlan, job: TrialJob, args):
        self.rh, self.watch, self.plan, self.job, self.args = rh, watch, plan, job, args
        self.rng = random.Random(plan.seed)
        self.submission = f"chaos-{plan.number:02d}-{plan.stage}-{uuid.uuid4().hex[:6]}"
        self.shards = -(-rh.input_samples // args.samples_per_shard)
        self.log = LogWatch(rh.info.temp_dir, self.submission)
        self.ctx = TrialContext(self.log, self.shards, args.epochs, watch.head)
        self.ctx.scored_now = partial(score_files, rh.client, rh.bucket, job.clean_prefix)
        self.kills: list[dict] = []
        self.moment: dict = {}

    def kill(self, node: str, stage: str | None, view, known: list | None = None) -> None:
        """SIGKILL `node` at once; then record what it ran and the job's progress: from the
        log as the trial had read it, and from S3 read just after (see chaos_stages.Progress)."""
        role = role_of(view.work.get(node, {}), self.log.rank0_pids)
        at = time.time()
        pids = self.rh.cluster.kill_node(node, known)
        killed_s = time.time() - at
        job = self.job
        stored = stored_now(self.rh.client, self.rh.bucket, job.clean_prefix, job.train_prefix,
                            job.run_name, job.export_prefix)  # fmt: skip
        stored.read_after_s = round(time.time() - at, 2)
        stage = stage or stage_of(stored, self.shards)  # a second kill: wherever the job is
        progress = progress_now(stage, self.ctx, stored, self.moment)
        self.kills.append(
            {"at": at, "node": node, "stage": stage, "role": role,
             "processes_killed": len(pids), "kill_took_s": round(killed_s, 2),
             "progress": as_dict(progress)}
        )  # fmt: skip
        print(
            f"[chaos] trial {self.plan.number}: killed node {node[-6:]} ({role}) during "
            f"{stage}: {progress.line()}",
            flush=True,
        )

    def run(self) -> dict:
        args, plan, address = self.args, self.plan, self.rh.info.address
        stage = STAGES[plan.stage]
        started = time.time()
        submit(self.rh.env, address, *self.job.command, wait=False, job_id=self.submission,
               env_vars=PROGRESS_ENV, then=self.job.then)  # fmt: skip
        moment = self.moment = stage.pick(self.rng, self.ctx)
        second_after_s = round(self.rng.uniform(3, 12), 1)
        print(
            f"[chaos] trial {plan.number}: {plan.stage} at {moment}, seed {plan.seed}", flush=True
        )
        timed_out, waiting = False, False
        ready = ""  # the victim chosen ahead while the stage is armed
        ended = job_end_watch(address, self.submission)
        looker = Looker(self.watch, self.ctx, stage)
        looker.start()
        try:
            while not ended.is_set():
                self.log.poll()
                now, view = time.time(), looker.latest()
                if view is None:  # no look at the nodes yet
                    time.sleep(0.1)
                    continue
                killed = {k["node"] for k in self.kills}
                if not self.kills and stage.armed(moment, self.ctx):
                    victims = [n for n in stage.candidates(view, self.ctx) if n in view.alive]
                    if ready not in victims:
                        ready = self.rng.choice(victims) if victims else ""
                if not self.kills and stage.reached(moment, self.ctx, now):
                    victims = [n for n in stage.candidates(view, self.ctx) if n in view.alive]
                    if victims:  # aim at work still running now, not at the look's
                        view = view.refreshed(victims)
                        victims = stage.candidates(view, self.ctx)
                    if victims:
                        node = ready if ready in victims else self.rng.choice(victims)
                        self.kill(node, plan.stage, view, view.processes.get(node))
                    elif not waiting:  # said once: the moment came before any victim
                        waiting = True
                        busy = {n[-6:]: sorted(set(t.values())) for n, t in view.work.items() if t}
                        print(f"[chaos] trial {plan.number}: moment reached, no {plan.stage} "
                              f"work on a worker node yet: {busy}", flush=True)  # fmt: skip
                elif (
                    len(self.kills) == 1 < plan.kills
                    and now >= self.kills[0]["at"] + second_after_s
                ):
                    victims = sorted(
                        n for n, titles in view.work.items()
                        if titles and n != self.watch.head and n not in killed
                    )  # fmt: skip
                    if victims:  # those still at work now
                        view = view.refreshed(victims)
                        victims = sorted(n for n, titles in view.work.items() if titles)
                    if victims:
                        node = self.rng.choice(victims)
                        self.kill(node, None, view, view.processes.get(node))
                if now - started > args.job_timeout:
                    timed_out = True
                    break
                time.sleep(0.1)
        finally:
            looker.stopping.set()
        self.log.poll()
        return self.result(moment, started, timed_out)

    def result(self, moment: dict, started: float, timed_out: bool) -> dict:
        rh, args = self.rh, self.args
        if timed_out:
            from ray.job_submission import JobSubmissionClient

            JobSubmissionClient(rh.info.address).stop_job(self.submission)
        wall = time.time() - started
        end = "TIMEOUT" if timed_out else job_end(rh.info.address, self.submission)
        out: dict = {"trial": self.plan.number, **asdict(self.plan), "moment": moment,
                     "submission_id": self.submission, "outcome": end.split(":")[0],
                     "kills": self.kills, "wall_s": round(wall, 1),
                     "input_samples": rh.input_samples}  # fmt: skip
        if not end.startswith("SUCCEEDED"):
            out["log_tail"] = end[-3000:]
        try:
            out.update(manifest_counts(rh.client, rh.bucket, self.job.clean_prefix))
            summary = f"{self.job.train_prefix}/{self.job.run_name}/summary.json"
            train = read_json(rh.client, rh.bucket, summary)
            out["epochs_completed"] = train["epochs_completed"]
            if self.job.export_prefix:
                export = read_json(rh.client, rh.bucket, f"{self.job.export_prefix}/summary.json")
                out["export_count_check"] = export["count_check"]
        except Exception as err:  # a failed job left no output: the checks below say so
            out["output_error"] = f"{type(err).__name__}: {err}"[:300]
        killed = {k["node"] for k in self.kills}
        recovery = recovery_of(rh.info.address, self.submission, killed, TRAIN_WORKERS, self.log)
        out["recovery"] = {
            **asdict(recovery),
            "worker_group_restarts": recovery.worker_group_restarts,
        }
        out["replacement_nodes"] = (
            len(self.watch.born_after(self.kills[0]["at"])) if self.kills else 0
        )
        out["job_state_off_driver_node"] = sorted(self.watch.misplaced)
        checks = {
            "job succeeded": out["outcome"] == "SUCCEEDED",
            "rows == inputs": out.get("manifest_rows") == rh.input_samples,
            "no duplicate keys": out.get("duplicate_keys") == 0,
            "every epoch trained": out.get("epochs_completed") == args.epochs,
            # exported samples == clean rows (its count check), when the job exports
            "export complete": not self.job.export_prefix
            or bool(out.get("export_count_check", {}).get("passed")),
            "every planned kill done": len(self.kills) == self.plan.kills,
            "kills hit unfinished work": bool(self.kills)
            and all(k["progress"]["partial"] for k in self.kills),
            "recovery recorded": recovery.observed,
            "job state on the driver's node": not self.watch.misplaced,
        }
        out["checks"] = checks
        out["passed"] = all(checks.values())
        if not out["passed"]:  # the cluster's logs go with it: keep the job's own
            out["driver_log"] = self.keep_driver_log()
        return out

    def keep_driver_log(self) -> str:
        """Copy the job's driver log beside the run's JSON (`--out`); returns where."""
        source = self.log.logs / self.log.driver_name
        target = Path(self.args.out).with_suffix("").parent / "chaos-logs" / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            shutil.copyfile(source, target)
        return str(target)
