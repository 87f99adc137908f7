"""The clean job on a local Ray: local folders and an S3 endpoint, reruns, bad shards."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from jobs.clean import run_clean
from tests.conftest import clean_config, count_samples, make_bucket, upload_folder

pytestmark = pytest.mark.integration


def test_local_folder_every_sample_once_and_rerun_skips(local_ray, demo_shards, tmp_path):
    out = tmp_path / "run"
    summary = run_clean(clean_config(str(demo_shards), str(out)))
    expected = count_samples(demo_shards)
    manifest = pq.read_table(out / "manifest.parquet")
    keys = manifest.column("key").to_pylist()
    assert manifest.num_rows == expected == summary["counts"]["samples"]
    assert len(set(keys)) == expected
    assert set(manifest.column("status").to_pylist()) <= {"clean", "noisy"}
    score_files = sorted(p.name for p in (out / "scores").glob("*.parquet"))
    assert score_files == sorted(p.stem + ".parquet" for p in demo_shards.glob("*.tar"))
    scoring = summary["scoring"]
    assert scoring["shards_scored"] == len(score_files)
    # start-up (until the first shard was complete) lies within the scoring time (here the
    # 4 shards' rows may all complete at the end: then start-up is all of it); the steady
    # rate against the overall one is benchmarks.throughput's (a timing, not a test)
    total_seconds = scoring["samples_scored"] / scoring["images_per_second"]
    assert 0 < scoring["startup_seconds"] <= total_seconds * 1.01
    assert scoring["scorers"]["max_actors"] >= scoring["scorers"]["min_actors"] >= 1
    assert "detection" in summary and 0.0 <= summary["detection"]["precision"] <= 1.0
    for name in ("summary.json", "config.yaml"):
        assert (out / name).exists()
    assert summary["versions"]["ray"] and summary["config"]["selection"]["probe"] == "insample"

    # A finished run, rerun: nothing to do. An interrupted one (a score file and the
    # summary gone), rerun: only the missing shard is scored, the rest reused.
    written = (out / "manifest.parquet").stat().st_mtime_ns
    assert run_clean(clean_config(str(demo_shards), str(out))) == summary
    assert (out / "manifest.parquet").stat().st_mtime_ns == written
    (out / "summary.json").unlink()
    first_scores = sorted((out / "scores").glob("*.parquet"))[0]
    before = pq.read_table(first_scores).column("p_label").to_numpy()
    first_scores.unlink()
    rerun = run_clean(clean_config(str(demo_shards), str(out)))
    assert rerun["scoring"]["shards_scored"] == 1
    assert rerun["scoring"]["shards_skipped"] == len(score_files) - 1
    # Batches are composed differently on a rerun: scores agree to float precision, and
    # the selection may differ only where a sample sits on a threshold.
    np.testing.assert_allclose(
        pq.read_table(first_scores).column("p_label").to_numpy(), before, atol=1e-4
    )
    again = pq.read_table(out / "manifest.parquet")
    agreement = np.mean(
        np.array(again.column("is_clean").to_pylist())
        == np.array(manifest.column("is_clean").to_pylist())
    )
    assert agreement >= 0.98
    print(
        f"\ninput samples {expected}, manifest rows {manifest.num_rows}; finished rerun: no "
        f"work; interrupted rerun: {rerun['scoring']['shards_scored']} shard scored, "
        f"{rerun['scoring']['shards_skipped']} skipped, manifest rows {again.num_rows}"
    )
    changed = run_clean(clean_config(str(demo_shards), str(out), "selection.theta_cons=0.9"))
    assert changed["scoring"]["shards_scored"] == 0  # same model: scores reused, fit redone
    assert changed["run_fingerprint"] != summary["run_fingerprint"]


def test_s3_input_and_output(local_ray, demo_shards):
    client = make_bucket("integration")
    upload_folder(client, demo_shards, "integration", "shards/train")
    summary = run_clean(clean_config("s3://integration/shards/train", "s3://integration/runs/one"))
    body = client.get_object(Bucket="integration", Key="runs/one/manifest.parquet")["Body"].read()
    manifest = pq.read_table(io.BytesIO(body))
    expected = count_samples(demo_shards)
    assert manifest.num_rows == expected == len(set(manifest.column("key").to_pylist()))
    stored = json.loads(
        client.get_object(Bucket="integration", Key="runs/one/summary.json")["Body"].read()
    )
    assert stored["counts"] == summary["counts"]


def test_bad_samples_and_shards_become_failed_rows(local_ray, demo_shards, tmp_path):
    folder = tmp_path / "shards"
    shutil.copytree(demo_shards, folder)
    first = sorted(folder.glob("*.tar"))[0]
    data = first.read_bytes()
    (folder / "truncated.tar").write_bytes(data[: len(data) // 3])
    (folder / "empty.tar").write_bytes(b"\0" * 1024)
    out = tmp_path / "run"
    summary = run_clean(clean_config(str(folder), str(out)))
    manifest = pq.read_table(out / "manifest.parquet").to_pydict()
    status = np.array(manifest["status"])
    reasons = [r for r, s in zip(manifest["reason"], status, strict=True) if s == "failed"]
    # the truncated copy repeats keys of the first shard: those rows fail as duplicates
    assert any("duplicate key" in r for r in reasons)
    assert any("shard unreadable" in r for r in reasons)
    assert any("empty shard" in r for r in reasons)
    assert summary["counts"]["failed"] == len(reasons) > 0
    assert summary["counts"]["samples"] == len(status)
    assert all(r for r in reasons)  # every failure has a reason
