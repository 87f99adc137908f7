"""No credential appears in a job's outputs, logs or configs.

The clean job runs on S3 (moto) with dummy secrets in its environment, each a unique
random string: the AWS keys it really uses, and tokens of other services it must never
touch. Every object it writes (summary.json, config.yaml, report.html, the manifest and
score files, decoded), everything the driver printed or logged, and every file of the Ray
session's logs are searched for those strings.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import secrets
import shutil
from pathlib import Path

import boto3
import pyarrow.parquet as pq
import pytest
import yaml

from cleaner.config import load_config
from jobs.clean import run_clean
from tests.conftest import REPO_ROOT, count_samples, upload_folder
from tests.test_cluster_configs import SECRET_PATTERNS

pytestmark = pytest.mark.integration

SECRET_VARS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "HF_TOKEN",
    "WANDB_API_KEY",
    "GITHUB_TOKEN",
)


@pytest.fixture(scope="module")
def secret_env(s3_endpoint):
    """Dummy secrets in the environment of the driver and of a fresh local Ray."""
    import ray

    values = {name: f"{name.lower()}-{secrets.token_hex(12)}" for name in SECRET_VARS}
    saved = {name: os.environ.get(name) for name in SECRET_VARS}
    if ray.is_initialized():
        ray.shutdown()
    os.environ.update(values)
    # No runtime_env: the workers inherit the driver's environment, secrets included, as
    # they do on a node whose credentials come from its environment.
    ray.init(num_cpus=4, include_dashboard=False)
    try:
        yield values
    finally:
        ray.shutdown()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def worker_sees(name: str) -> str:
    """sha256 of an environment variable as a Ray worker sees it (never the value itself)."""
    import ray

    @ray.remote
    def digest(var: str) -> str:
        return hashlib.sha256(os.environ.get(var, "").encode()).hexdigest()

    return ray.get(digest.remote(name))


def parquet_text(data: bytes) -> str:
    """Every value and the metadata of a parquet file, as text (its pages are compressed)."""
    table = pq.read_table(io.BytesIO(data))
    metadata = table.schema.metadata or {}
    return repr(table.to_pylist()) + repr(metadata)


def test_no_secret_in_outputs_or_logs(secret_env, demo_shards, tmp_path, capfd, caplog):
    import ray

    for name, value in secret_env.items():
        assert worker_sees(name) == hashlib.sha256(value.encode()).hexdigest()

    shards = tmp_path / "shards"
    shards.mkdir()
    for shard in sorted(demo_shards.glob("*.tar"))[:2]:
        shutil.copy(shard, shards / shard.name)
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    client.create_bucket(Bucket="secrets")
    upload_folder(client, shards, "secrets", "shards")
    cfg = load_config(
        None,
        [
            "data.input=s3://secrets/shards",
            "data.classes=demo",
            "model.name=tiny-clip-shapes",
            "output=s3://secrets/run",
            "scoring.max_actors=1",
            "scoring.batch_size=64",
        ],
    )
    # Only the job's own output is searched: botocore, which the test uses to set up and
    # read back (the job does not), logs its signed request headers at DEBUG level.
    capfd.readouterr()
    caplog.clear()
    caplog.set_level(logging.DEBUG)
    summary = run_clean(cfg)
    out, err = capfd.readouterr()
    records = list(caplog.records)
    caplog.set_level(logging.WARNING)
    assert summary["counts"]["samples"] == count_samples(shards) == 200

    # Everything the job wrote.
    haystacks: dict[str, str] = {}
    listed = client.list_objects_v2(Bucket="secrets", Prefix="run/")["Contents"]
    for obj in listed:
        data = client.get_object(Bucket="secrets", Key=obj["Key"])["Body"].read()
        haystacks[f"s3://secrets/{obj['Key']}"] = data.decode("latin-1")
        if obj["Key"].endswith(".parquet"):
            haystacks[f"s3://secrets/{obj['Key']} (decoded)"] = parquet_text(data)
    written = {k.removeprefix("s3://secrets/run/") for k in haystacks}
    assert {"summary.json", "config.yaml", "report.html", "manifest.parquet"} <= written
    assert any(k.startswith("scores/") and k.endswith(".parquet") for k in written)
    manifest = haystacks["s3://secrets/run/manifest.parquet (decoded)"]
    assert "shapes-000000-000003" in manifest  # the decoded text is searchable

    # Everything the driver printed and logged, and the Ray session's log files.
    haystacks["stdout"], haystacks["stderr"] = out, err
    haystacks["logging"] = "\n".join(f"{r.name} {r.getMessage()}" for r in records)
    assert "[clean] 200 samples" in out
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    log_files = [p for p in (session / "logs").rglob("*") if p.is_file()]
    assert log_files
    for path in log_files:
        haystacks[str(path)] = path.read_bytes().decode("latin-1")

    leaks = [
        f"{name} in {where}"
        for where, text in haystacks.items()
        for name, value in secret_env.items()
        if value in text
    ]
    print(
        f"\nsearched {len(haystacks)} outputs/logs "
        f"({sum(len(t) for t in haystacks.values()) / 1e6:.1f} MB), "
        f"{len(listed)} objects written {sorted(written)}, {len(records)} log records, "
        f"{len(log_files)} Ray log files: leaks {leaks}"
    )
    assert not leaks


def test_runtime_env_and_configs_carry_no_secrets():
    """ray_config.yaml and the job configs: no keys, no literal tokens, no secret variables."""
    paths = [REPO_ROOT / "ray_config.yaml", *sorted((REPO_ROOT / "configs").rglob("*.yaml"))]
    offenders = [
        f"{path.relative_to(REPO_ROOT)}: {what}: {match.group(0)!r}"
        for path in paths
        for what, pattern in SECRET_PATTERNS.items()
        for match in pattern.finditer(path.read_text())
    ]
    assert not offenders, offenders
    env_vars = yaml.safe_load((REPO_ROOT / "ray_config.yaml").read_text()).get("env_vars", {})
    suspicious = [
        k for k in env_vars if any(w in k.upper() for w in ("KEY", "TOKEN", "SECRET", "PASS"))
    ]
    assert not suspicious, f"ray_config.yaml env_vars look like secrets: {suspicious}"
    assert len(paths) > 1
