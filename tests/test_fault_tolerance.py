"""A scorer actor killed mid-job: the job completes, every sample is scored once, and the
job's output, which is not a terminal here, has one-line progress that counts every shard
and sample once (the retried blocks are not counted twice)."""

from __future__ import annotations

import os
import signal
import threading
import time

import pyarrow.parquet as pq
import pytest

from cleaner.config import load_config
from jobs.clean import run_clean
from tests.conftest import count_samples
from tests.test_training_integration import process_pids

pytestmark = pytest.mark.integration


def test_killed_scorer_loses_nothing_and_the_log_has_progress_lines(
    local_ray, tmp_path, capfd, monkeypatch
):
    """One job, two concerns (each clean job pays its start-up; this one pays it once):
    the scorer pool's fault tolerance, and progress in a non-interactive log (capfd holds
    the process's stdout and stderr, as a log file would)."""
    from cleaner.demo.dataset import write_demo_shards

    monkeypatch.setenv("CLIPCLEANER_PROGRESS_INTERVAL_S", "0")
    monkeypatch.delenv("RAY_DATA_DISABLE_PROGRESS_BARS", raising=False)  # off: not a terminal
    shards = tmp_path / "shards"
    write_demo_shards(
        shards, 3000, samples_per_shard=100, noise="symmetric", noise_rate=0.3, seed=5
    )
    out = tmp_path / "run"
    cfg = load_config(
        None,
        [
            f"data.input={shards}",
            "data.classes=demo",
            "model.name=tiny-clip-shapes",
            f"output={out}",
            "scoring.batch_size=16",
            "scoring.max_actors=1",
            "scoring.max_readers=1",
        ],
    )
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["summary"] = run_clean(cfg)
        except Exception as err:  # surfaced by the assertions below
            outcome["error"] = err

    capfd.readouterr()  # only the job's output from here on
    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.time() + 300
    while time.time() < deadline and not list((out / "scores").glob("*.parquet")):
        time.sleep(0.05)
    victims = process_pids(b"ClipScorer")
    assert victims, "no scorer actor process found"
    os.kill(victims[0], signal.SIGKILL)
    written_before = len(list((out / "scores").glob("*.parquet")))
    thread.join(timeout=600)
    log = "".join(capfd.readouterr())
    assert "error" not in outcome, outcome.get("error")
    assert written_before < 30, "the job had finished before the actor was killed"

    expected = count_samples(shards)
    manifest = pq.read_table(out / "manifest.parquet")
    keys = manifest.column("key").to_pylist()
    assert len(keys) == expected == len(set(keys))
    assert outcome["summary"]["counts"]["failed"] == 0

    assert "\r" not in log, "carriage-return progress redraws in a non-interactive log"
    progress = [line for line in log.splitlines() if line.startswith("[score] ") and "/s" in line]
    assert len(progress) >= 30  # interval 0: a line per shard written, plus the last
    assert progress[-1].startswith(f"[score] 30/30 shards, {expected:,} samples")
    assert "done in" in progress[-1]
    print(
        f"input samples {expected}, output rows {len(keys)}, unique keys {len(set(keys))}; "
        f"log: {len(log)} characters, {len(progress)} progress lines"
    )
