"""End to end: a Ray head with token authentication, and one `ray job submit` of the
clean-then-train pipeline: the clean job reads its shards from S3 (moto on loopback) and
writes its outputs back to S3, then MixFix trains on them and checkpoints to S3."""

from __future__ import annotations

import io
import json
import os
import sys
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from cluster.local.localcluster import cluster_pids, kill_pids
from cluster.local.submit import ray_cli, ray_job_submit
from tests.conftest import (
    S3_ENV,
    count_samples,
    free_port,
    make_bucket,
    upload_folder,
)

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def token_head(s3_endpoint, tmp_path_factory):
    """`ray start --head` with RAY_AUTH_MODE=token; yields (dashboard address, env with token)."""
    home = tmp_path_factory.mktemp("home")  # no ~/.ray/auth_token to fall back on
    token = uuid.uuid4().hex + uuid.uuid4().hex
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    base.update(S3_ENV, AWS_ENDPOINT_URL=s3_endpoint, HOME=str(home), RAY_AUTH_MODE="token")
    base["PATH"] = f"{BIN}{os.pathsep}{base.get('PATH', '')}"  # the job's `python` is this venv's
    env = {**base, "RAY_AUTH_TOKEN": token}
    dash_port, gcs_port = free_port(), free_port()
    temp_dir = tmp_path_factory.mktemp("ray")  # marks this head's processes, and only them
    started = ray_cli(
        "start",
        "--head",
        f"--temp-dir={temp_dir}",
        f"--port={gcs_port}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash_port}",
        # Ray's fixed agent port (52365) clashes with any other Ray on the machine (the
        # tests' local Ray, a benchmark): its job agent then never comes up.
        f"--dashboard-agent-listen-port={free_port()}",
        "--num-cpus=4",  # logical: 2 trainers + data tasks on 2 cores
        "--disable-usage-stats",
        env=env,
    )
    assert started.returncode == 0, started.stderr + started.stdout
    try:
        yield f"http://127.0.0.1:{dash_port}", env, base
    finally:
        # Not `ray stop`: it would stop every Ray on the machine, not only this head.
        kill_pids(cluster_pids(str(temp_dir)))


def submit_job(address: str, env: dict, module: str, *overrides: str):
    """`ray job submit` of `python -m <module> ...` with the project's runtime env file, as a
    user runs it; asserts it succeeded."""
    submitted = ray_job_submit(
        address, env, ["--runtime-env=ray_config.yaml"], ["python", "-m", module, *overrides]
    )
    assert submitted.returncode == 0, submitted.stdout[-4000:] + submitted.stderr[-4000:]
    return submitted


@pytest.fixture(scope="module")
def submitted_pipeline(token_head, demo_shards):
    """The demo shards uploaded to S3, and one submitted pipeline job over them: the clean
    job (S3 in, S3 out), then one epoch of MixFix with its checkpoints on S3. Both run on
    the cluster's own CPUs (ray.num_cpus=null). Returns (S3 client, job output, uploaded shard keys)."""
    address, env, _ = token_head
    client = make_bucket("e2e-data")
    uploaded = upload_folder(client, demo_shards, "e2e-data", "train")
    submitted = submit_job(
        address,
        env,
        "jobs.pipeline",
        "--clean-config=configs/demo.yaml",
        "--train-config=configs/train-demo.yaml",
        "clean.data.input=s3://e2e-data/train/",
        "clean.output=s3://e2e-data/runs/e2e",
        "clean.ray.num_cpus=null",
        "train.data.test_input=null",
        "train.data.cache_decoded=false",  # one epoch: decoding while streaming is cheaper
        "train.run.storage=s3://e2e-data/train-runs",
        "train.run.name=e2e",
        "train.optim.epochs=1",
        "train.optim.batch_size=32",
        "train.ray.num_cpus=null",
    )
    return client, submitted.stdout, [k for k in uploaded if k.endswith(".tar")]


def test_submitted_clean_job_reads_and_writes_s3(submitted_pipeline, demo_shards):
    client, stdout, shards = submitted_pipeline
    assert "succeeded" in stdout
    manifest = pq.read_table(
        io.BytesIO(
            client.get_object(Bucket="e2e-data", Key="runs/e2e/manifest.parquet")["Body"].read()
        )
    )
    expected = count_samples(demo_shards)
    assert manifest.num_rows == expected
    assert len(set(manifest.column("key").to_pylist())) == expected
    summary = json.loads(
        client.get_object(Bucket="e2e-data", Key="runs/e2e/summary.json")["Body"].read()
    )
    assert summary["counts"]["samples"] == expected and summary["counts"]["failed"] == 0
    listed = client.list_objects_v2(Bucket="e2e-data", Prefix="runs/e2e/scores/")["Contents"]
    assert len([o for o in listed if o["Key"].endswith(".parquet")]) == len(shards)
    assert "testing" not in json.dumps(summary)  # no credential leaks into the summary


def test_submitted_train_job_checkpoints_to_s3(submitted_pipeline):
    """The pipeline's training half: MixFix for one epoch on the manifest the clean job
    wrote to S3, its checkpoints and metrics on S3."""
    client, _, _ = submitted_pipeline
    keys = [
        o["Key"]
        for o in client.list_objects_v2(Bucket="e2e-data", Prefix="train-runs/e2e/")["Contents"]
    ]
    assert any("/checkpoint_" in k and k.endswith("model.pt") for k in keys)
    metrics = json.loads(
        client.get_object(Bucket="e2e-data", Key="train-runs/e2e/metrics.json")["Body"].read()
    )
    assert [e["epoch"] for e in metrics["epochs"]] == [1]
    assert metrics["epochs"][0]["selected"] > 0


def test_submission_without_the_token_is_refused(token_head):
    address, _, env_without_token = token_head
    refused = ray_cli(
        "job",
        "submit",
        f"--address={address}",
        "--",
        "python",
        "-c",
        "print('should not run')",
        env=env_without_token,
        timeout=120,
    )
    assert refused.returncode != 0
    assert "should not run" not in refused.stdout
    text = (refused.stdout + refused.stderr).lower()
    assert "token" in text or "unauthenticated" in text or "401" in text
