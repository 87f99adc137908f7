"""Chaos runs: the pipeline (clean, then train) N times on the local autoscaling cluster,
each trial killing a random worker node at a random moment of a random stage.

    python -m benchmarks.chaos --trials 10 --out runs/chaos.json [--seed S] [--only K]

Each trial `ray job submit`s jobs.pipeline (small demo data on moto S3, the distributed
fit, so that the fit runs on the cluster too; export trials add jobs.export_shards of the
clean set after it, in the same submission) and SIGKILLs a whole non-head node (raylet,
object store, workers) during its stage: scoring, the fit, training, a checkpoint write
or the export (benchmarks.chaos_stages). One trial in five kills a second node a few
seconds after the first. The stage and moment come from the printed seed: `--seed S
--only K` replays trial K's plan.

A trial passes when the job succeeds with every input sample once in the manifest, every
epoch trained, (export trials) exactly the clean samples exported, the progress at each
kill partial (the kill hit unfinished work), a recovery recorded by Ray (work of a killed
node done again: a task retried or reconstructed, an actor restarted; or a training
worker-group restart), and no job-state actor ever seen off the driver's node. One
cluster serves all trials (nodes killed by one trial are replaced by the autoscaler for
the next); only this cluster's processes are ever killed (found under its own temp dir).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import signal
import sys
import time
from pathlib import Path

from benchmarks.chaos_stages import STAGES
from benchmarks.chaos_trial import Trial, TrialJob, TrialPlan
from benchmarks.chaos_watch import ClusterWatch
from benchmarks.cluster_rehearsal import rehearsal
from cluster.local.localcluster import weigh_like_the_cluster

TWO_KILLS_EVERY = 5  # one trial in five kills a second node


def plan_trials(seed: int, trials: int, stages: list[str]) -> list[TrialPlan]:
    """Every stage as often as the others (in a shuffled order), a second kill in every
    fifth trial, and each trial's own seed for its moment and victim."""
    rng = random.Random(seed)
    order = [stages[i % len(stages)] for i in range(trials)]
    rng.shuffle(order)
    return [
        TrialPlan(i + 1, order[i], 2 if (i + 1) % TWO_KILLS_EVERY == 0 else 1, rng.getrandbits(31))
        for i in range(trials)
    ]


EXPORT_SHARD_SIZE = 20  # samples per exported shard: several shard tasks to aim at


def pipeline_job(
    bucket: str, prefix: str, args, export: bool = False, scoring_model: str = ""
) -> TrialJob:
    """jobs.pipeline, small, with the distributed fit (on the cluster, not the driver);
    with `export`, jobs.export_shards of its clean set after it, in the same submission;
    with `scoring_model`, that open_clip architecture (random weights) scores instead of the
    tiny CLIP, so that scoring lasts long enough to be hit at a random shard."""
    command = [
        "jobs.pipeline",
        "--clean-config=configs/local-cluster.yaml",
        "--train-config=configs/train-local-cluster.yaml",
        f"clean.data.input=s3://{bucket}/train/",
        "clean.data.classes=demo",
        f"clean.scoring.batch_size={args.batch_size}",
        "clean.selection.fit_mode=distributed",
        f"clean.output=s3://{bucket}/{prefix}/clean",
        f"train.run.storage=s3://{bucket}/{prefix}/train-runs",
        f"train.optim.epochs={args.epochs}",
        f"train.optim.batch_size={args.train_batch_size}",
        "train.data.test_input=null",
    ]
    if scoring_model:
        command += [f"clean.model.name={scoring_model}", "clean.model.random_weights=true"]
    if not export:
        return TrialJob(command, f"{prefix}/clean", f"{prefix}/train-runs")
    export_command = [
        "jobs.export_shards", f"manifest=s3://{bucket}/{prefix}/clean",
        f"output=s3://{bucket}/{prefix}/export", f"shard_size={EXPORT_SHARD_SIZE}",
    ]  # fmt: skip
    return TrialJob(command, f"{prefix}/clean", f"{prefix}/train-runs",
                    export_prefix=f"{prefix}/export", then=export_command)  # fmt: skip


def table(trials: list[dict]) -> str:
    """The per-trial table (markdown), as docs/reliability.md shows it."""
    rows = [
        "| # | stage | killed node ran | progress at the kill | outcome | rows = inputs | "
        "dup keys | epochs | redone by Ray (tasks and actors of the killed nodes) | "
        "worker-group restarts | new nodes | wall s | passed |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in trials:
        kills = t["kills"] or [
            {"stage": t["stage"], "role": "-", "progress": {"summary": "no kill"}}
        ]
        r = t["recovery"]
        redone = f"{r['redone_after_kill']} ({', '.join(r['redone_names'][:4])})"
        failed = ", ".join(k for k, v in t["checks"].items() if not v)
        rows.append(
            f"| {t['trial']} | {' then '.join(k['stage'] for k in kills)} | "
            f"{'; '.join(k['role'] for k in kills)} | "
            f"{'; '.join(k['progress']['summary'] for k in kills)} | {t['outcome']} | "
            f"{t.get('manifest_rows')} = {t['input_samples']} | {t.get('duplicate_keys')} | "
            f"{t.get('epochs_completed')} | {redone} | {r['worker_group_restarts']} | "
            f"{t['replacement_nodes']} | {t['wall_s']} | {'yes' if t['passed'] else 'NO: ' + failed} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument(
        "--out", required=True, help="JSON file for the trials (rewritten after each)"
    )
    parser.add_argument("--seed", type=int, default=None, help="default: a random one, printed")
    parser.add_argument("--only", type=int, default=None, help="replay only trial K of the plan")
    parser.add_argument("--stage", choices=sorted(STAGES), help="every trial in this stage")
    parser.add_argument("--samples", type=int, default=240)
    parser.add_argument("--samples-per-shard", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16, help="scoring batch size")
    parser.add_argument(
        "--scoring-model",
        default="ViT-B-32",
        help="open_clip architecture (random weights) that scores in scoring trials: the tiny "
        "CLIP scores the demo in about 2 s, too short a window to kill at a random shard",
    )
    parser.add_argument("--train-batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--job-timeout", type=float, default=1200)
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().getrandbits(31)
    unavailable = {name: why for name, stage in STAGES.items() if (why := stage.available())}
    stages = [args.stage] if args.stage else [s for s in STAGES if s not in unavailable]
    plans = plan_trials(seed, args.trials, stages)
    if args.only is not None:
        plans = [p for p in plans if p.number == args.only]
    print(f"[chaos] seed {seed} (replay trial K: --seed {seed} --trials {args.trials} --only K)")
    for name, why in unavailable.items():
        print(f"[chaos] stage {name} left out: {why}")
    started = time.time()
    report: dict = {
        "command": " ".join(
            ["python -m benchmarks.chaos", *(argv if argv is not None else sys.argv[1:])]
        ),
        "seed": seed,
        "date": datetime.date.today().isoformat(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "stages": stages,
        "stages_left_out": unavailable,
        "trials": [],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    weigh_like_the_cluster()
    # SIGTERM (a background run never sees SIGINT) ends the run with its clean-up: the
    # cluster and the S3 endpoint come down
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    # the state API is polled every 5 s only (the trials watch /proc and the logs): the
    # GCS keeps every trial's actors, and listing them all each second loads the head
    with rehearsal("chaos", args.samples, args.samples_per_shard, "chaos", 5.0) as rh:
        rh.observer.poll_now()
        watch = ClusterWatch(rh.cluster, head=next(iter(rh.observer.snapshot().head_nodes)))
        for plan in plans:
            scoring_model = args.scoring_model if plan.stage == "scoring" else ""
            job = pipeline_job(rh.bucket, f"trial-{plan.number:02d}", args,
                               export=plan.stage == "export", scoring_model=scoring_model)  # fmt: skip
            result = Trial(rh, watch, plan, job, args).run()
            report["trials"].append(result)
            failed = [k for k, v in result["checks"].items() if not v]
            print(f"[chaos] trial {plan.number}: {'passed' if result['passed'] else 'FAILED: ' + ', '.join(failed)}"
                  f" ({result['wall_s']} s)", flush=True)  # fmt: skip
            out.write_text(json.dumps(report, indent=2) + "\n")
    report["passed"] = sum(t["passed"] for t in report["trials"])
    report["wall_s"] = round(time.time() - started, 1)
    report["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report["trials"]))
    print(f"[chaos] {report['passed']}/{len(report['trials'])} trials passed (seed {seed}), "
          f"{report['wall_s']} s")  # fmt: skip
    return 0 if report["passed"] == len(report["trials"]) else 1


if __name__ == "__main__":
    sys.exit(main())
