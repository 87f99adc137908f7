"""benchmarks.chaos without a cluster: the trial plan, and how a trial reads a job's logs
to find its moment (rank 0's batches, metrics and checkpoint confirmations)."""

from __future__ import annotations

import random
import subprocess
import time
from collections import Counter

from benchmarks.chaos import plan_trials
from benchmarks.chaos_stages import STAGES, TrialContext, progress_now
from benchmarks.chaos_trial import role_of
from benchmarks.chaos_watch import LogWatch, NodeView, Stored

STAGE_NAMES = ["scoring", "fit", "training", "checkpoint", "export"]


def test_the_plan_spreads_stages_doubles_every_fifth_kill_and_replays_from_its_seed():
    plan = plan_trials(11, 10, STAGE_NAMES)
    assert plan == plan_trials(11, 10, STAGE_NAMES)  # the printed seed replays it
    assert plan != plan_trials(12, 10, STAGE_NAMES)
    assert sorted(Counter(p.stage for p in plan).values()) == [2, 2, 2, 2, 2]
    assert sorted(STAGES) == sorted(STAGE_NAMES)
    assert not [name for name, stage in STAGES.items() if stage.available()]  # all in the plan
    assert [p.number for p in plan if p.kills == 2] == [5, 10]
    assert len({p.seed for p in plan}) == 10


def write(path, *lines: str) -> None:
    with open(path, "a") as f:
        f.writelines(line + "\n" for line in lines)


def test_the_log_watch_follows_rank_0_and_ignores_earlier_jobs(tmp_path):
    logs = tmp_path / "session_latest" / "logs"
    logs.mkdir(parents=True)
    earlier = logs / "worker-aa-01000000-11.out"
    write(earlier, '[train] {"epoch": 3, "loss": 1}')  # another trial's rank 0
    watch = LogWatch(str(tmp_path), "chaos-1")
    out, err = logs / "worker-bb-02000000-22.out", logs / "worker-bb-02000000-22.err"
    write(logs / "job-driver-chaos-1.log", "[fit] distributed global fit over 240 samples")
    write(out, "[train epoch 2/3, rank 0] 4/7 batches, 64 samples, 9 samples/s, ETA 0:03")
    write(earlier, "[train epoch 3/3, rank 0] 7/7 batches")
    watch.listed_at = 0.0  # look for new files at this poll
    watch.poll()
    assert watch.train_progress == (2, 3, 4, 7) and watch.rank0_pids == [22]
    assert watch.driver_has("[fit] distributed global fit") and watch.metrics_epochs == []

    training, checkpoint = STAGES["training"], STAGES["checkpoint"]
    ctx = TrialContext(watch, shards=12, epochs=3, head="head")
    assert training.reached({"epoch": 2, "fraction": 0.5}, ctx, 0.0)  # batch 4 >= 3.5
    assert not training.reached({"epoch": 2, "fraction": 0.8}, ctx, 0.0)
    assert checkpoint.armed({"epoch": 2}, ctx) and not checkpoint.reached({"epoch": 2}, ctx, 0.0)

    write(out, '[train] {"epoch": 2, "lr": 0.05}')  # rank 0 now writes epoch 2's checkpoint
    write(err, '[train] {"epoch": 2, "lr": 0.05}')  # (Ray Train copies stdout to stderr)
    watch.listed_at = 0.0
    watch.poll()
    assert checkpoint.reached({"epoch": 2}, ctx, 0.0) and watch.metrics_epochs == [2]
    assert watch.checkpoint_pending == 2

    write(err, "Checkpoint successfully created at: Checkpoint(filesystem=s3, path=b/c)")
    watch.poll()
    assert watch.checkpoint_pending is None  # Ray Train has uploaded it

    # what decides `partial` is the storage read just after the kill, not the log (which
    # lags the job on a loaded machine): Ray Train's registered epoch, the score files, the
    # manifest
    registered_to_1 = Stored(12, True, registered_epoch=1, checkpoint_folders=1)
    registered_to_2 = Stored(12, True, registered_epoch=2, checkpoint_folders=2)
    assert progress_now("checkpoint", ctx, registered_to_1, {"epoch": 2}).partial
    assert not progress_now("checkpoint", ctx, registered_to_2, {"epoch": 2}).partial
    assert progress_now("training", ctx, registered_to_2, {}).partial  # 2 of 3 epochs
    assert not progress_now("training", ctx, Stored(12, True, 3, 2), {}).partial
    assert progress_now("scoring", ctx, Stored(11, False, 0, 0), {}).partial
    assert not progress_now("fit", ctx, Stored(12, True, 0, 0), {}).partial
    line = progress_now("training", ctx, registered_to_1, {}).line()
    assert line == "epoch 2/3 batch 4/7, checkpoints registered to epoch 1"


def test_the_role_names_what_the_node_ran():
    titles = {1: "MapWorker(MapBatches(ClipScorer)).__init__", 2: "RayTrainWorker", 3: "IDLE2"}
    role = role_of(titles, rank0_pids=[2])
    assert role == "IDLE2, MapWorker(MapBatches(ClipScorer)) (starting), RayTrainWorker (rank 0)"
    assert role_of({}, []) == "no task running (object store only)"


def test_a_refreshed_view_drops_work_that_ended_since_the_look():
    """A kill is aimed at titles read just before it: a worker whose task ended since the
    look (here: gone, or retitled `ray::IDLE`) leaves its node without live work."""
    busy, idle, gone = (
        subprocess.Popen(["bash", "-c", f'exec -a "{title}" sleep 60'])
        for title in ("ray::_FoldCounts", "ray::IDLE", "ray::MapBatches(UsableRows)")
    )
    try:
        time.sleep(0.5)  # exec done: the titles are in /proc
        look = {
            "node-a": [(busy.pid, "ray::_FoldCounts")],
            "node-b": [(idle.pid, "ray::Project->MapBatches(_FoldCounts)")],  # retitled since
            "node-c": [(gone.pid, "ray::MapBatches(UsableRows)")],
        }
        gone.kill()
        gone.wait()
        view = NodeView(
            0.0, {n: {p: t[5:] for p, t in procs} for n, procs in look.items()}, set(look), look
        )
        fresh = view.refreshed(["node-a", "node-b", "node-c"])
        assert {n for n, titles in fresh.work.items() if titles} == {"node-a"}
        assert fresh.work["node-a"] == {busy.pid: "_FoldCounts 60"}  # the title, then its args
        assert fresh.processes["node-c"] == []
    finally:
        for process in (busy, idle, gone):
            process.kill()
            process.wait()


def test_the_export_stage_aims_between_its_first_and_last_lines(tmp_path):
    (tmp_path / "session_latest" / "logs").mkdir(parents=True)
    driver = tmp_path / "session_latest" / "logs" / "job-driver-chaos-2.log"
    watch = LogWatch(str(tmp_path), "chaos-2")
    ctx = TrialContext(watch, shards=12, epochs=3, head="head")
    export = STAGES["export"]
    write(driver, "[train] done")
    watch.poll()
    assert not export.armed({"delay_s": 0.5}, ctx) and not export.reached(
        {"delay_s": 0.5}, ctx, 10.0
    )
    write(driver, "[export] 150 samples (150 clean, 0 relabelled) from 12 shards into 8 shards")
    watch.poll()
    assert export.armed({"delay_s": 0.5}, ctx)
    assert not export.reached({"delay_s": 0.5}, ctx, 10.0)  # first seen now
    assert export.reached({"delay_s": 0.5}, ctx, 10.6)
    titles = {"head": {1: "MapBatches(export_batch)"}, "n1": {2: "MapBatches(export_batch)"},
              "n2": {3: "IDLE"}}  # fmt: skip
    view = NodeView(0.0, titles, set(titles), {})
    assert export.candidates(view, ctx) == ["n1"]  # its shard tasks, off the head
    write(driver, "[export] count check passed: 150 samples written, 150 expected")
    watch.poll()
    assert export.candidates(view, ctx) == [] and not export.armed({"delay_s": 0.5}, ctx)
    # partial until the export's summary is written (after its last shard)
    under_way = Stored(12, True, 3, 3, export_shards=5)
    assert progress_now("export", ctx, under_way, {}).partial
    assert not progress_now("export", ctx, Stored(12, True, 3, 3, 0.0, 8, True), {}).partial
    assert progress_now("export", ctx, under_way, {}).line() == (
        "export: 5 shards written, no summary yet"
    )


def test_the_scoring_moment_counts_score_files_written_not_seconds(tmp_path):
    (tmp_path / "session_latest" / "logs").mkdir(parents=True)
    driver = tmp_path / "session_latest" / "logs" / "job-driver-chaos-3.log"
    watch = LogWatch(str(tmp_path), "chaos-3")
    written = [0]  # score files on S3 now, as the trial lists them
    ctx = TrialContext(watch, shards=12, epochs=3, head="head", scored_now=lambda: written[0])
    scoring = STAGES["scoring"]
    moments = [scoring.pick(random.Random(seed), ctx) for seed in range(200)]
    assert {m["after_shards"] for m in moments} == set(range(10))  # 2 shards left at least
    assert all(0 <= m["delay_s"] <= 1 for m in moments)

    loading = {"n1": {5: "MapWorker(MapBatches(ClipScorerWriter)).__init__"}}
    loaded = {"n1": {5: "MapWorker(MapBatches(ClipScorerWriter))"}, "head": {1: "ClipScorer"}}
    write(driver, "[score] scorers: 2-2 actors, 1 GPU and 1 CPU each")
    watch.poll()
    first, fourth = {"after_shards": 0, "delay_s": 0.5}, {"after_shards": 4, "delay_s": 0.5}
    written[0] = 5  # listed only once a scorer has loaded its model
    scoring.watch(NodeView(1.0, loading, {"n1"}, {}), ctx, 1.0)
    assert not scoring.reached(first, ctx, 5.0) and ctx.scored_seen_at == {}
    written[0] = 3
    scoring.watch(NodeView(2.0, loaded, {"n1"}, {}), ctx, 2.0)
    assert scoring.reached(first, ctx, 2.5) and not scoring.reached(fourth, ctx, 60.0)
    written[0] = 5  # the driver's progress lines play no part (they come in a burst)
    scoring.watch(NodeView(10.0, loaded, {"n1"}, {}), ctx, 10.0)  # 4 was passed unseen
    assert not scoring.reached(fourth, ctx, 10.2) and scoring.reached(fourth, ctx, 10.5)
    assert scoring.candidates(NodeView(10.0, loaded, {"n1"}, {}), ctx) == ["n1"]  # not the head
    write(driver, "Dataset dataset_1 execution finished in 15.06 seconds")
    watch.poll()
    written[0] = 12
    scoring.watch(NodeView(11.0, loaded, {"n1"}, {}), ctx, 11.0)
    assert 12 not in ctx.scored_seen_at  # scoring done: no more listing
    assert scoring.candidates(NodeView(11.0, loaded, {"n1"}, {}), ctx) == []
