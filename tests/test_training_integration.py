"""MixFix on Ray Train with 2 CPU workers (gloo): it beats training on the noisy labels,
a rerun resumes from its checkpoint, and a killed worker does not lose the run."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from cleaner.config import load_config
from jobs.clean import run_clean
from jobs.train import run_train
from training.config import TrainJobConfig

pytestmark = pytest.mark.integration
EPOCHS = 6


@pytest.fixture(scope="module")
def cleaned(local_ray, tmp_path_factory):
    """Noisy demo shards (60% symmetric noise), a clean test split, and their clean run."""
    from cleaner.demo.dataset import write_demo_shards

    root = tmp_path_factory.mktemp("train-data")
    write_demo_shards(
        root / "train", 2000, samples_per_shard=250, noise="symmetric", noise_rate=0.6, seed=3
    )
    write_demo_shards(root / "test", 500, samples_per_shard=250, noise="none", seed=4)
    run_clean(
        load_config(
            None,
            [
                f"data.input={root / 'train'}",
                "data.classes=demo",
                f"output={root / 'clean'}",
                "scoring.max_actors=1",
            ],
        )
    )
    return root


def train_config(root, name: str, *overrides: str) -> TrainJobConfig:
    return load_config(
        "configs/train-demo.yaml",
        [
            f"data.input={root / 'train'}",
            f"data.manifest={root / 'clean'}",
            f"data.test_input={root / 'test'}",
            "data.cache_decoded=true",
            f"run.storage={root / 'runs'}",
            f"run.name={name}",
            f"optim.epochs={EPOCHS}",
            "optim.milestones=[4]",
            "optim.batch_size=64",
            *overrides,
        ],
        TrainJobConfig,
    )


def test_mixfix_beats_noisy_training_and_resumes_on_rerun(cleaned):
    # MixFix in two parts: EPOCHS - 2 epochs, then a rerun of the same run to EPOCHS.
    first = run_train(train_config(cleaned, "mixfix", f"optim.epochs={EPOCHS - 2}"))
    assert first["epochs_completed"] == EPOCHS - 2
    mixfix = run_train(train_config(cleaned, "mixfix"))
    noisy = run_train(train_config(cleaned, "noisy", "mixfix.mode=noisy"))

    history = json.loads((cleaned / "runs" / "mixfix" / "metrics.json").read_text())["epochs"]
    assert [h["epoch"] for h in history] == list(range(1, EPOCHS + 1))
    assert history[EPOCHS - 2].get("resumed_from_epoch") == EPOCHS - 2
    assert all(h["train_samples"] > 0 for h in history)
    assert mixfix["final"]["selected_precision"] > 0.8
    mixfix_acc, noisy_acc = mixfix["final"]["test_accuracy"], noisy["final"]["test_accuracy"]
    print(f"test accuracy: mixfix {mixfix_acc:.3f} vs noisy labels {noisy_acc:.3f}")
    assert mixfix_acc > noisy_acc
    for name in ("summary.json", "config.yaml", "report.html"):
        assert (cleaned / "runs" / "mixfix" / name).exists()


def process_pids(marker: bytes) -> list[int]:
    """PIDs of processes whose command line (a Ray worker's title names its actor) has marker."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ")
        except OSError:
            continue
        if marker in cmdline:
            pids.append(int(entry))
    return pids


def test_killed_worker_resumes_from_its_checkpoint(cleaned):
    run_dir = cleaned / "runs" / "fault"
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["summary"] = run_train(train_config(cleaned, "fault", "run.max_failures=2"))
        except Exception as err:  # surfaced by the assertions below
            outcome["error"] = err

    thread = threading.Thread(target=run)
    thread.start()
    # Two checkpoint folders: the first is then surely registered (the second may be
    # still uploading), so the restarted workers have a checkpoint to resume from.
    deadline = time.time() + 300
    while time.time() < deadline and len(list(run_dir.glob("checkpoint_*"))) < 2:
        time.sleep(0.2)
    assert len(list(run_dir.glob("checkpoint_*"))) >= 2, "no checkpoint appeared"
    victims = process_pids(b"RayTrainWorker")
    assert victims, "no RayTrainWorker process found"
    os.kill(victims[0], signal.SIGKILL)
    thread.join(timeout=600)
    assert "error" not in outcome, outcome.get("error")
    history = json.loads((run_dir / "metrics.json").read_text())["epochs"]
    assert [h["epoch"] for h in history] == list(range(1, EPOCHS + 1))
    assert any("resumed_from_epoch" in h for h in history)
    assert outcome["summary"]["epochs_completed"] == EPOCHS
    print(
        f"\nkilled worker {victims[0]}: epochs {[h['epoch'] for h in history]}, resumed from "
        f"epoch {[h['resumed_from_epoch'] for h in history if 'resumed_from_epoch' in h]}, "
        f"training samples per epoch {[h['train_samples'] for h in history]}"
    )


def test_pipeline_job_cleans_then_trains(cleaned):
    from jobs.pipeline import main as pipeline_main

    out = cleaned / "pipeline"
    assert (
        pipeline_main(
            [
                "--clean-config=configs/demo.yaml",
                "--train-config=configs/train-demo.yaml",
                f"clean.data.input={cleaned / 'train'}",
                f"clean.output={out / 'clean'}",
                "clean.scoring.max_actors=1",
                f"train.run.storage={out / 'runs'}",
                "train.run.name=pipeline",
                "train.data.test_input=null",
                "train.optim.epochs=1",
                "train.optim.batch_size=64",
            ]
        )
        == 0
    )
    assert (out / "clean" / "manifest.parquet").exists()
    history = json.loads((out / "runs" / "pipeline" / "metrics.json").read_text())["epochs"]
    assert [h["epoch"] for h in history] == [1] and history[0]["selected"] > 0
