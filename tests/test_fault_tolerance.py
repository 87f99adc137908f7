"""A scorer actor killed mid-job: the job completes and every sample is scored once."""

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


def test_killed_scorer_actor_loses_and_duplicates_nothing(local_ray, tmp_path):
    from cleaner.demo.dataset import write_demo_shards

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
    assert "error" not in outcome, outcome.get("error")
    assert written_before < 30, "the job had finished before the actor was killed"
    expected = count_samples(shards)
    manifest = pq.read_table(out / "manifest.parquet")
    keys = manifest.column("key").to_pylist()
    print(f"input samples {expected}, output rows {len(keys)}, unique keys {len(set(keys))}")
    assert len(keys) == expected == len(set(keys))
    assert outcome["summary"]["counts"]["failed"] == 0
