"""The detectors in the clean job on a local Ray (one run: the ensemble of CLIPCleaner,
DeFT and CleanNet with a verified file, distributed fit), then DeFT's fine-tuning and
CleanNet's soft weights each training a model on its manifest; bad verified files."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from cleaner.config import ConfigError, load_config
from jobs.clean import run_clean
from tests.conftest import REPO_ROOT, clean_config, count_samples
from training.config import TrainJobConfig

pytestmark = pytest.mark.integration

# The embedding checks are another test's (test_checks_job.py): off here, so that CLIPCleaner's
# verdict in the detectors' columns is the manifest's own of a plain run.
NO_CHECKS = ["checks.off_topic=false", "checks.duplicates=false", "checks.test_leaks=false"]
CHEAP = [
    *NO_CHECKS,
    "selection.deft.steps=40",
    "selection.deft.warmup_steps=4",
    "selection.deft.lr=0.004",
    "selection.cleannet.steps=200",
    "selection.cleannet.num_ref=4",
]


def write_verified(path, keys, labels):
    path.write_text(
        "key,verified_label\n" + "".join(f"{k},{v}\n" for k, v in zip(keys, labels, strict=True))
    )
    return path


def test_ensemble_with_verified_file_then_deft_and_soft_weight_training(
    local_ray, demo_shards, tmp_path
):
    out = tmp_path / "run"
    first = run_clean(
        clean_config(str(demo_shards), str(out), *NO_CHECKS, "selection.fit_mode=distributed")
    )
    manifest = pq.read_table(out / "manifest.parquet")
    keys = np.array(manifest.column("key").to_pylist())
    truth = manifest.column("true_label").to_numpy()
    verified = write_verified(tmp_path / "verified.csv", keys[::10], truth[::10])  # 10%

    summary = run_clean(
        clean_config(
            str(demo_shards),
            str(out),
            "selection.detector=ensemble",
            f"selection.verified={verified}",
            "selection.fit_mode=distributed",
            *CHEAP,
        )
    )
    assert summary["scoring"]["shards_scored"] == 0  # scores reused: only the fit reran
    manifest = pq.read_table(out / "manifest.parquet")
    assert manifest.num_rows == count_samples(demo_shards)
    columns = set(manifest.column_names)
    for name in ("clipcleaner", "deft", "cleannet", "ensemble"):
        assert {f"{name}_clean", f"{name}_score"} <= columns
    assert {"deft_p_clean", "deft_sim_positive", "cleannet_relevance"} <= columns
    is_clean = np.array(manifest.column("is_clean").to_pylist())
    status = np.array(manifest.column("status").to_pylist())
    np.testing.assert_array_equal(status == "clean", is_clean)
    # the verified rows keep their verified verdict; the others follow the ensemble
    labels = manifest.column("label").to_numpy()
    rows = np.isin(keys, keys[::10])
    np.testing.assert_array_equal(is_clean[rows], labels[rows] == truth[rows])
    ensemble = np.array(manifest.column("ensemble_clean").to_pylist())
    np.testing.assert_array_equal(is_clean[~rows], ensemble[~rows])
    assert (
        np.array(manifest.column("clipcleaner_clean").to_pylist()).sum()
        == (first["counts"]["clean"])
    )
    comparison = summary["detectors"]
    assert comparison["chosen"] == "ensemble"
    assert set(comparison["detectors"]) == {"clipcleaner", "deft", "cleannet", "ensemble"}
    for name, entry in comparison["detectors"].items():
        # DeFT's positive prompts start at the zero-shot features (selection.deft.ctx_init):
        # CI's 40 steps on 400 demo images get it past 0.7 (random context: 0.57 measured)
        assert entry["detection"]["auroc"] > 0.7, (name, entry["detection"]["auroc"])
    assert np.isfinite(np.array(manifest.column("deft_score").to_pylist(), dtype=float)).all()
    assert comparison["fitted"]["cleannet"]["verified_rows"] == len(keys[::10])
    fit_seconds = comparison["fit_seconds"]  # each member's own fit, within the job's
    assert set(fit_seconds) == {"deft", "cleannet"} and min(fit_seconds.values()) > 0
    assert sum(fit_seconds.values()) <= summary["timings"]["detectors_s"]
    assert "Detectors side by side" in (out / "report.html").read_text()

    # DeFT's fine-tuning (clip_peft, mode deft) and CleanNet's soft weights each train
    from jobs.train import train_in_process

    base = [
        f"data.input={demo_shards}",
        f"data.manifest={out}",
        "data.test_input=null",
        f"run.storage={tmp_path / 'train'}",
        "optim.epochs=1",
        "optim.batch_size=64",
    ]
    from tests.conftest import decoded_split
    from training import load_model

    for name, extra in (
        ("deft", ["mixfix.mode=deft", "network.name=clip_peft",
                  "network.clip.model.name=tiny-clip-shapes"]),
        ("soft", ["mixfix.mode=noisy", "mixfix.sample_weights=cleannet"]),
    ):  # fmt: skip
        cfg = load_config(
            REPO_ROOT / "configs/train-demo.yaml",
            [*base, *extra, f"run.name={name}"],
            TrainJobConfig,
        )
        history = train_in_process(cfg)
        assert len(history) == 1 and np.isfinite(history[0]["loss"])
        # the saved model (clip_peft's LoRA tuner shares its tensors with the tower) loads
        model = load_model(str(tmp_path / "train" / name))
        images, _ = decoded_split(demo_shards, model.class_names, model.preprocessing.image_size)
        assert model.predict(images[:8]).labels.shape == (8,)

    # a verified key that no shard has: a one-line error after the (reused) scores
    bad = write_verified(tmp_path / "unknown.csv", [keys[0], "no-such-key"], [0, 1])
    with pytest.raises(ConfigError, match=r"1 of 2 keys are in no input shard"):
        run_clean(
            clean_config(
                str(demo_shards), str(out), "selection.detector=cleannet",
                f"selection.verified={bad}", *CHEAP,
            )
        )  # fmt: skip


def test_bad_verified_file_exits_2_before_ray(demo_shards, tmp_path):
    bad = tmp_path / "audit.csv"
    bad.write_text("key,label\na,1\n")
    done = subprocess.run(
        [
            sys.executable, "-m", "jobs.clean", f"data.input={demo_shards}", "data.classes=demo",
            "model.name=tiny-clip-shapes",
            f"output={tmp_path / 'out'}", "selection.detector=cleannet",
            f"selection.verified={bad}",
        ],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("error: selection.verified:") and "lacks column" in lines[-1]
    assert "Traceback" not in done.stderr
