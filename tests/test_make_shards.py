"""jobs.make_shards on a local Ray: each native layout -> shards the clean job consumes and
the train job's reader reads, locally and on an S3 endpoint (moto), resumable; the whole
train job trains on the S3 result."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from cleaner.config import load_config
from jobs.clean import run_clean
from jobs.make_shards import main as make_shards_main
from tests.conftest import clean_config, make_bucket
from tests.layout_trees import LAYOUT_TREES, image_bytes, put

pytestmark = pytest.mark.integration


def run_job(tree, output: str, *extra: str) -> dict:
    """The job as the command line runs it; returns its report."""
    from cleaner.reading import uri as uri_lib

    args = [f"--input={tree.root}", f"--output={output}", *tree.overrides, *extra]
    assert make_shards_main(args) == 0
    return json.loads(uri_lib.read_text(uri_lib.join(output, "make_shards_report.json")))


@pytest.mark.parametrize("layout", sorted(LAYOUT_TREES))
def test_each_layout_to_shards_the_clean_job_consumes(local_ray, tmp_path, layout):
    tree = LAYOUT_TREES[layout](tmp_path / "data")
    out = tmp_path / "shards"
    report = run_job(tree, str(out), "shard_size=5")
    counts = report["counts"]
    assert counts["written"] == len(tree.images)
    assert len(report["failures"]) == tree.bad == sum(report["failed_by_reason"].values())
    assert counts["shards_written"] == len(list(out.glob("*.tar"))) == -(-counts["listed"] // 5)
    assert (out / "classes.yaml").exists()

    rerun = run_job(tree, str(out), "shard_size=5")  # resumable: nothing is rewritten
    assert rerun["counts"]["shards_skipped"] == counts["shards_written"]
    assert rerun["counts"]["shards_written"] == 0 and rerun["counts"]["written"] == len(tree.images)

    summary = run_clean(
        clean_config(str(out), str(tmp_path / "run"), f"data.classes={out / 'classes.yaml'}")
    )
    manifest = pq.read_table(tmp_path / "run" / "manifest.parquet")
    assert manifest.num_rows == len(tree.images) == summary["counts"]["samples"]
    assert set(manifest.column("status").to_pylist()) <= {"clean", "noisy"}
    truths = [t for t in manifest.column("true_label").to_pylist() if t >= 0]
    assert len(truths) == len(tree.true_labels)
    assert_the_train_job_reads(out, tmp_path / "run", tmp_path / "train-runs")


def assert_the_train_job_reads(shards: Path | str, clean_run: Path | str, storage: Path | str):
    """The train job's inputs from these shards (a folder or an s3:// prefix) and their clean
    run: its checks pass, and its Ray Train reader yields every usable sample once, under the
    manifest's sample id and label. (The train job trains on shards made from S3 below; what
    differs between layouts is only what these shards and the manifest hold.)"""
    from cleaner.reading import uri as uri_lib
    from jobs.train import training_inputs
    from training.config import TrainJobConfig
    from training.data import decoded_with_ids

    cfg = load_config(
        "configs/train-demo.yaml",
        [
            f"data.input={shards}",
            f"data.manifest={clean_run}",
            f"data.classes={uri_lib.join(str(shards), 'classes.yaml')}",
            "data.test_input=null",
            f"run.storage={storage}",
        ],
        TrainJobConfig,
    )
    inputs = training_inputs(cfg)
    index = inputs.index
    rows = decoded_with_ids(index.shards, index.offsets, cfg, inputs.spec.names).take_all()
    ids = np.sort(np.asarray([row["sample_id"] for row in rows], dtype=np.int64))
    assert np.array_equal(ids, np.flatnonzero(index.trainable))
    assert all(int(row["label"]) == index.labels[row["sample_id"]] for row in rows)
    assert all(row["image"].shape == (cfg.data.image_size, cfg.data.image_size, 3) for row in rows)


def test_smaller_shards_on_rerun_replace_the_old_ones(local_ray, tmp_path):
    tree = LAYOUT_TREES["animal10n"](tmp_path / "a10n")
    out = tmp_path / "shards"
    run_job(tree, str(out), "shard_size=2")
    assert len(list(out.glob("*.tar"))) == 6
    report = run_job(tree, str(out), "shard_size=5", "resize=32")
    assert len(list(out.glob("*.tar"))) == 3 and len(report["removed_stale_shards"]) == 3
    assert report["counts"]["reencoded"] == len(tree.images)  # 64x64 images resized to 32


def _upload(client, folder: Path, bucket: str, prefix: str) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder)}")


def test_s3_in_s3_out_then_clean_and_train_jobs(local_ray, tmp_path):
    """An image folder on S3 -> shards on S3 -> the clean job -> the train job's Ray Train
    reader, and one epoch of the train job in process (its input checks, reader of shards
    and MixFix core; Ray Train on S3 is run by test_job_submit_e2e)."""
    from jobs.train import train_in_process
    from training.config import TrainJobConfig

    for split, count in (("train", 24), ("test", 6)):
        for i in range(count):
            label = i % 3
            put(tmp_path / split, f"{['red', 'blue', 'green'][label]}/{i:03d}.jpg", image_bytes(i))
    client = make_bucket("ingest")
    for split in ("train", "test"):
        _upload(client, tmp_path / split, "ingest", f"raw/{split}")
    tree = LAYOUT_TREES["imagefolder"](tmp_path / "unused")  # only for its overrides
    for split in ("train", "test"):
        tree.root = f"s3://ingest/raw/{split}"
        report = run_job(tree, f"s3://ingest/shards/{split}", "shard_size=10", f"split={split}")
        assert report["counts"]["written"] == (24 if split == "train" else 6)
    listed = client.list_objects_v2(Bucket="ingest", Prefix="shards/train/")["Contents"]
    assert sorted(o["Key"] for o in listed if o["Key"].endswith(".tar")) == [
        f"shards/train/train-00000{i}.tar" for i in range(3)
    ]

    classes = "s3://ingest/shards/train/classes.yaml"
    summary = run_clean(
        clean_config(
            "s3://ingest/shards/train", "s3://ingest/runs/clean", f"data.classes={classes}"
        )
    )
    body = client.get_object(Bucket="ingest", Key="runs/clean/manifest.parquet")["Body"].read()
    manifest = pq.read_table(io.BytesIO(body))
    assert manifest.num_rows == 24 == summary["counts"]["samples"] == summary["counts"]["ok"]

    cfg = load_config(
        "configs/train-demo.yaml",
        [
            "data.input=s3://ingest/shards/train",
            "data.manifest=s3://ingest/runs/clean",
            "data.test_input=s3://ingest/shards/test",
            f"data.classes={classes}",
            "data.cache_decoded=false",
            "run.storage=s3://ingest/runs/train",
            "run.name=ingested",
            "optim.epochs=1",
            "optim.milestones=[]",
            "optim.batch_size=8",
        ],
        TrainJobConfig,
    )
    assert_the_train_job_reads(
        "s3://ingest/shards/train", "s3://ingest/runs/clean", "s3://ingest/runs/train"
    )
    history = train_in_process(cfg)
    assert [h["epoch"] for h in history] == [1]
    assert history[0]["train_samples"] > 0
    assert 0.0 <= history[0]["test_accuracy"] <= 1.0
