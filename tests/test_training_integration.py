"""MixFix on Ray Train with 2 CPU workers (gloo): a killed worker does not lose the run,
a rerun resumes from its checkpoint, and it beats training on the noisy labels.

One test, one fixture: each training run pays Ray Train's start-up (about a minute on 2
cores), so the run that survives the kill is the run that is resumed and compared. The
clean-then-train pipeline is covered by its `ray job submit` in test_job_submit_e2e."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from cleaner.config import load_config
from jobs.clean import run_clean
from jobs.train import run_train, train_in_process
from tests.conftest import decoded_split
from training import load_model
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
                "model.name=tiny-clip-shapes",
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


def run_killing_one_worker(config: TrainJobConfig, run_dir) -> tuple[dict, int]:
    """run_train(config) in a thread; SIGKILL one Ray Train worker once two checkpoints exist.

    Returns (summary, killed pid). Two checkpoint folders: the first is then surely
    registered (the second may be still uploading), so the restarted workers have a
    checkpoint to resume from.
    """
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["summary"] = run_train(config)
        except Exception as err:  # surfaced by the assertions below
            outcome["error"] = err

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.time() + 300
    while time.time() < deadline and len(list(run_dir.glob("checkpoint_*"))) < 2:
        time.sleep(0.2)
    assert len(list(run_dir.glob("checkpoint_*"))) >= 2, "no checkpoint appeared"
    victims = process_pids(b"RayTrainWorker")
    assert victims, "no RayTrainWorker process found"
    os.kill(victims[0], signal.SIGKILL)
    thread.join(timeout=600)
    assert "error" not in outcome, outcome.get("error")
    return outcome["summary"], victims[0]


def test_mixfix_survives_a_killed_worker_resumes_on_rerun_and_beats_noisy_training(cleaned):
    """One MixFix run in two parts, then the noisy-label baseline:

    1. EPOCHS - 2 epochs, with a worker killed once two checkpoints exist: Ray Train
       restarts the workers, which resume from the last checkpoint (run.max_failures);
    2. a rerun of the same run name to EPOCHS resumes after epoch EPOCHS - 2;
    3. training on the noisy labels for EPOCHS (in this process) ends below MixFix.
    """
    run_dir = cleaned / "runs" / "mixfix"
    first, killed = run_killing_one_worker(
        train_config(cleaned, "mixfix", f"optim.epochs={EPOCHS - 2}", "run.max_failures=2"),
        run_dir,
    )
    assert first["epochs_completed"] == EPOCHS - 2
    restarts = [h["resumed_from_epoch"] for h in first["history"] if "resumed_from_epoch" in h]
    assert restarts and 1 <= restarts[0] < EPOCHS - 2, restarts  # resumed mid-run, not from 0
    mixfix = run_train(train_config(cleaned, "mixfix"))
    # The baseline trains in this process (training.local: the same config, data and MixFix
    # core, without a third Ray Train start-up). The engines agree to half a point on noisy
    # labels (docs/benchmarks.md, hard 40%: 0.587 local, 0.590 Ray Train); MixFix's gap here
    # is ~9 points.
    noisy = train_in_process(train_config(cleaned, "noisy", "mixfix.mode=noisy"))[-1]

    history = json.loads((run_dir / "metrics.json").read_text())["epochs"]
    assert [h["epoch"] for h in history] == list(range(1, EPOCHS + 1))
    assert history[EPOCHS - 2].get("resumed_from_epoch") == EPOCHS - 2
    assert all(h["train_samples"] > 0 for h in history)
    assert mixfix["final"]["selected_precision"] > 0.8
    mixfix_acc, noisy_acc = mixfix["final"]["test_accuracy"], noisy["test_accuracy"]
    print(
        f"\nkilled worker {killed}: resumed from epoch {restarts}; test accuracy: "
        f"mixfix {mixfix_acc:.3f} vs noisy labels {noisy_acc:.3f}"
    )
    assert mixfix_acc > noisy_acc
    for name in ("summary.json", "config.yaml", "report.html"):
        assert (run_dir / name).exists()

    # the model the run leaves loads with one call and reproduces the reported accuracy
    model = load_model(str(run_dir))
    assert model.info["run"]["engine"] == "ray_train" and model.info["run"]["epochs"] == EPOCHS
    images, labels = decoded_split(
        cleaned / "test", model.class_names, model.preprocessing.image_size
    )
    accuracy = float((model.predict(images).labels == labels).mean())
    assert abs(accuracy - mixfix_acc) <= 0.005, (accuracy, mixfix_acc)
