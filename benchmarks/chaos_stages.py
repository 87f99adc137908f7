"""The stages of the pipeline a chaos trial can hit, and when and where each one is hit.

A stage picks, from the trial's random generator, a moment inside it (`pick`), says when
the running job has reached that moment (`reached`, from the job's log lines), and which
non-head nodes then run its live work (`candidates`, from /proc). The trial kills one of
them at random and records the job's progress at that instant (`Progress`), which must be
partial: a kill after the stage's work is done proves nothing.

Adding a stage: a `Stage` subclass with its log markers and the process titles of its
work, listed in `STAGES`; `available` keeps it out of the plan until the code it needs
exists.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from benchmarks.chaos_watch import LogWatch, NodeView, Stored

SCORING_WORK = ("ClipScorer", "read_shards_udf")
SCORING_DONE = "execution finished"  # Ray Data's line on the driver, once a dataset is done
TRAIN_WORK = ("RayTrainWorker",)
EXPORT_WORK = "export_batch"  # the export job's Ray Data tasks (one output shard each)
EXPORT_START = "[export] "  # its first line: the plan (samples, input and output shards)
EXPORT_DONE = "[export] count check"  # its last line, once every shard is written
FIT_STEPS = (  # driver lines that open each step of the distributed fit, in order
    "[fit] distributed global fit",  # the duplicate-key search (hash-partitioned tasks)
    "[fit] repeated keys",  # the usable rows materialised, counted
    "[fit] streaming probe",  # the probe's epochs over materialised blocks
    "[fit] probe trained",  # the selection's EM passes (block tasks)
    "[fit] GMM selection fitted",  # the manifest's per-shard tasks
)


@dataclass
class Progress:
    """The job's progress at a kill: its outputs on S3 just after (`stored`: ground truth),
    and its log as the trial had read it (which may lag the job on a loaded machine)."""

    stage: str
    stored: Stored
    shards: int
    epochs: int
    fit_step: str  # the last fit step the driver announced
    train_epoch: int  # the epoch rank 0 was in (1-based; 0 before training)
    train_batch: int
    batches_per_epoch: int
    checkpoint_in_flight: int | None  # the epoch whose checkpoint rank 0 was writing
    partial: bool  # the work the kill hit was unfinished (by `stored`)

    def line(self) -> str:
        s = self.stored
        if self.stage == "scoring":
            return f"{s.shards_complete}/{self.shards} shards scored"
        if self.stage == "fit":
            return f"fit at '{self.fit_step}', manifest {'written' if s.manifest_written else 'not written'}"
        if self.stage == "export":
            done = "summary written" if s.export_done else "no summary yet"
            return f"export: {s.export_shards} shards written, {done}"
        at = f"epoch {self.train_epoch}/{self.epochs} batch {self.train_batch}/{self.batches_per_epoch}"
        if self.stage == "checkpoint":
            at = f"epoch {self.checkpoint_in_flight or self.train_epoch}'s checkpoint being written"
        return f"{at}, checkpoints registered to epoch {s.registered_epoch}"


@dataclass
class TrialContext:
    """What the stages read: the trial's logs and outputs, its sizes."""

    log: LogWatch
    shards: int
    epochs: int
    head: str
    fit_seen_at: dict[str, float] = field(default_factory=dict)  # fit step -> first seen
    scorer_loaded_at: float | None = None  # when a loaded scorer was first seen on a worker
    scored_seen_at: dict[int, float] = field(default_factory=dict)  # score files -> first seen
    scored_now: Callable[[], int] | None = None  # score files on S3 now (listed while scoring)
    export_seen_at: float | None = None  # when the export's first line was seen


class Stage:
    name = ""
    work: tuple[str, ...] = ()

    def available(self) -> str:
        """'' when the stage can run in this tree, else why not."""
        return ""

    def pick(self, rng: random.Random, ctx: TrialContext) -> dict:
        raise NotImplementedError

    def reached(self, moment: dict, ctx: TrialContext, now: float) -> bool:
        raise NotImplementedError

    def watch(self, view: NodeView, ctx: TrialContext, now: float) -> None:
        """Note what the stage's moment depends on in a look at the nodes (default: nothing)."""

    def armed(self, moment: dict, ctx: TrialContext) -> bool:
        """Whether the moment is near: the trial then looks up its victims' processes ahead,
        to kill within a poll of `reached` (the stages with short windows say so)."""
        return False

    def candidates(self, view: NodeView, ctx: TrialContext) -> list[str]:
        """Non-head nodes running this stage's work now."""
        return sorted({n for fragment in self.work for n in view.nodes_with(fragment, ctx.head)})


class Scoring(Stage):
    """Kill `delay_s` after `after_shards` score files are on S3 (0: after the first scorer
    has loaded its model on a worker node): a node then running a loaded scorer (which also
    writes its shards' score files) or a reader. The moment is counted in shards written,
    the ground truth, not in seconds nor in the driver's progress lines: those reach the
    driver in a burst at the end of a short scoring stage, and a fixed delay overshot it
    (trial 7 of the 2026-12-07 run waited 7.1 s and found scoring done)."""

    name, work = "scoring", SCORING_WORK

    def pick(self, rng, ctx):
        last = max(ctx.shards - 3, 0)  # leave shards unscored when the kill lands
        return {"after_shards": rng.randint(0, last), "delay_s": round(rng.uniform(0, 1), 1)}

    def reached(self, moment, ctx, now):
        after = moment["after_shards"]
        since = ctx.scorer_loaded_at if after == 0 else ctx.scored_seen_at.get(after)
        return since is not None and now - since >= moment["delay_s"]

    def armed(self, moment, ctx):  # the scorers are planned, the fit not begun
        return ctx.log.driver_has("[score] scorers:") and not ctx.log.driver_has("[fit] ")

    def candidates(self, view, ctx):
        """While the scoring dataset runs: nodes of loaded scorers and readers."""
        if ctx.log.driver_has_after("[score] scorers:", SCORING_DONE):
            return []
        work, busy = SCORING_WORK, set()
        for node, titles in view.work.items():
            if node != ctx.head and any(
                w in t and not t.endswith(".__init__") for t in titles.values() for w in work
            ):
                busy.add(node)
        return sorted(busy)

    def watch(self, view, ctx, now):
        if ctx.scorer_loaded_at is None and any(
            node != ctx.head and "ClipScorer" in t and ".__init__" not in t
            for node, titles in view.work.items()
            for t in titles.values()
        ):
            ctx.scorer_loaded_at = now
        if ctx.scorer_loaded_at is None or ctx.scored_now is None:
            return
        if ctx.log.driver_has_after("[score] scorers:", SCORING_DONE):
            return  # scoring done: no more listing
        for done in range(ctx.scored_now() + 1):  # every count up to now's, first seen now
            ctx.scored_seen_at.setdefault(done, now)


class Fit(Stage):
    """Kill `delay_s` after a randomly chosen step of the distributed fit began (the
    manifest's tasks, its last step, are too short to aim at): the node of one of its
    running tasks, while the fit runs."""

    name, work = "fit", ("",)  # every task of the job's during the fit is the fit's

    def pick(self, rng, ctx):
        step = rng.randrange(len(FIT_STEPS) - 1)
        return {"step": step, "delay_s": round(rng.uniform(0, 1.5), 2)}

    def reached(self, moment, ctx, now):
        for step in FIT_STEPS:
            if step not in ctx.fit_seen_at and ctx.log.driver_has(step):
                ctx.fit_seen_at[step] = now
        started = ctx.fit_seen_at.get(FIT_STEPS[moment["step"]])
        return started is not None and now - started >= moment["delay_s"]

    def armed(self, moment, ctx):
        return ctx.log.driver_has(FIT_STEPS[0]) and not self.over(ctx)

    def candidates(self, view, ctx):
        return [] if self.over(ctx) else super().candidates(view, ctx)

    @staticmethod
    def over(ctx) -> bool:
        """The fit's last task is done (the clean job's summary line follows it)."""
        return ctx.log.driver_has(f"[fit] manifest: {ctx.shards}/{ctx.shards}")


class Training(Stage):
    """Kill when rank 0 reaches a random batch of a random epoch (past the last batch:
    during that epoch's prediction pass)."""

    name, work = "training", TRAIN_WORK

    def pick(self, rng, ctx):
        epoch = rng.randint(1, ctx.epochs)  # the last epoch's end is left out: no work left
        return {
            "epoch": epoch,
            "fraction": round(rng.uniform(0, 1 if epoch < ctx.epochs else 0.8), 2),
        }

    def reached(self, moment, ctx, now):
        progress = ctx.log.train_progress
        if progress is None:
            return False
        epoch, _, batch, batches = progress
        target = max(1, round(moment["fraction"] * batches))
        return (epoch, batch) >= (moment["epoch"], target)


class CheckpointWrite(Stage):
    """Kill as rank 0 writes the checkpoint of a random epoch: at once after it printed
    that epoch's metrics (it saves and uploads right after), its node first."""

    name, work = "checkpoint", TRAIN_WORK

    def pick(self, rng, ctx):
        return {"epoch": rng.randint(1, ctx.epochs)}

    def reached(self, moment, ctx, now):
        with ctx.log.lock:
            return moment["epoch"] in ctx.log.metrics_epochs

    def armed(self, moment, ctx):
        progress = ctx.log.train_progress  # rank 0 in that epoch: its checkpoint comes next
        return progress is not None and progress[0] >= moment["epoch"]

    def candidates(self, view, ctx):
        rank0 = [
            node
            for node, titles in view.work.items()
            if node != ctx.head and any(pid in titles for pid in ctx.log.rank0_pids)
        ]
        return rank0 or super().candidates(view, ctx)


class Export(Stage):
    """Kill `delay_s` after the export job announced its plan (`[export] N samples ...`):
    the node of one of its running shard tasks (each reads its input shards from S3 and
    writes one output shard), while the export runs. Export trials run it after the
    pipeline, in the same submission."""

    name, work = "export", (EXPORT_WORK,)

    def pick(self, rng, ctx):
        return {"delay_s": round(rng.uniform(0, 1.0), 2)}

    def reached(self, moment, ctx, now):
        if ctx.export_seen_at is None and ctx.log.driver_has(EXPORT_START):
            ctx.export_seen_at = now
        return ctx.export_seen_at is not None and now - ctx.export_seen_at >= moment["delay_s"]

    def armed(self, moment, ctx):
        return ctx.log.driver_has(EXPORT_START) and not self.over(ctx)

    def candidates(self, view, ctx):
        return [] if self.over(ctx) else super().candidates(view, ctx)

    @staticmethod
    def over(ctx) -> bool:
        return ctx.log.driver_has(EXPORT_DONE)


STAGES: dict[str, Stage] = {
    stage.name: stage for stage in (Scoring(), Fit(), Training(), CheckpointWrite(), Export())
}


def progress_now(stage: str, ctx: TrialContext, stored: Stored, moment: dict) -> Progress:
    """The job's progress at a kill; `partial` says whether the work it hit was unfinished:
    shards not all scored, the manifest not written, training not registered to its last
    epoch, (checkpoint) the targeted epoch's checkpoint not registered, or the export's
    summary not written."""
    log = ctx.log
    with log.lock:
        epoch, _, batch, batches = log.train_progress or (0, ctx.epochs, 0, 0)
        writing = log.checkpoint_pending
    fit_step = next((s for s in reversed(FIT_STEPS) if log.driver_has(s)), "")
    if stage == "scoring":
        partial = stored.shards_complete < ctx.shards
    elif stage == "fit":
        partial = not stored.manifest_written
    elif stage == "export":
        partial = not stored.export_done
    elif stage == "checkpoint":
        partial = stored.registered_epoch < moment.get("epoch", ctx.epochs)
    else:
        partial = stored.registered_epoch < ctx.epochs
    return Progress(stage, stored, ctx.shards, ctx.epochs, fit_step, epoch, batch, batches,
                    writing, partial)  # fmt: skip


def stage_of(stored: Stored, shards: int) -> str:
    """The stage the job was in, from its outputs just after a kill (ground truth, where
    its log can lag): scoring until every shard is scored, the fit until the manifest is
    written, then training."""
    if stored.shards_complete < shards:
        return "scoring"
    return "fit" if not stored.manifest_written else "training"


def as_dict(progress: Progress) -> dict:
    return {**asdict(progress), "summary": progress.line()}
