"""Shared fixtures: generated demo shards, a moto S3 endpoint on loopback, a local Ray."""

from __future__ import annotations

import io
import os
import socket
import sys
import tarfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory) -> Path:
    """Four small shards of the demo dataset (400 samples, 40% symmetric noise)."""
    from cleaner.demo.dataset import write_demo_shards

    out = tmp_path_factory.mktemp("demo") / "train"
    write_demo_shards(out, 400, samples_per_shard=100, noise="symmetric", noise_rate=0.4, seed=7)
    return out


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server on 127.0.0.1 with the AWS environment pointing at it."""
    from benchmarks.cluster_rehearsal import moto_s3

    saved = {k: os.environ.get(k) for k in [*S3_ENV, "AWS_ENDPOINT_URL"]}
    with moto_s3() as endpoint:
        os.environ.update(S3_ENV, AWS_ENDPOINT_URL=endpoint)
        try:
            yield endpoint
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def count_samples(folder: Path) -> int:
    """Samples (distinct keys) in all the tar shards of a folder, counted with tarfile."""
    import tarfile

    from cleaner.reading.shards import split_member_name

    keys = set()
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            keys.update(f"{shard.name}/{split_member_name(m.name)[0]}" for m in tar if m.isfile())
    return len(keys)


def make_bucket(name: str):
    import boto3

    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    client.create_bucket(Bucket=name)
    return client


def upload_folder(client, folder: Path, bucket: str, prefix: str) -> list[str]:
    keys = []
    for path in sorted(folder.iterdir()):
        if path.is_file():
            key = f"{prefix}/{path.name}"
            client.upload_file(str(path), bucket, key)
            keys.append(key)
    return keys


SHARED_RAY_NAMESPACE = "tests-shared-local-ray"


@pytest.fixture(scope="module")
def local_ray(s3_endpoint):
    """A local Ray instance whose workers see the S3 test environment.

    4 logical CPUs on the 2-core machine, so that 2 training workers leave room for the
    data tasks that feed them. Shared by consecutive modules (not shut down at module
    end): each start costs about 15 s here, and its warm workers save more. A module that
    needs another Ray calls `own_ray`, which shuts this one down first.
    """
    import ray

    if ray.is_initialized() and ray.get_runtime_context().namespace != SHARED_RAY_NAMESPACE:
        ray.shutdown()
    if not ray.is_initialized():
        ray.init(
            num_cpus=4,
            include_dashboard=False,
            namespace=SHARED_RAY_NAMESPACE,
            runtime_env={"env_vars": {**S3_ENV, "AWS_ENDPOINT_URL": s3_endpoint}},
        )
    yield ray


@pytest.fixture(scope="session", autouse=True)
def _shutdown_ray_at_the_end():
    yield
    if "ray" in sys.modules:  # unit-only runs never import Ray: do not pay for it here
        sys.modules["ray"].shutdown()


def own_ray(**init_options):
    """ray.init for a module that needs its own Ray (other resources, no S3 environment):
    the shared `local_ray` is shut down first. The caller shuts its Ray down."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(include_dashboard=False, **init_options)
    return ray


def clean_config(input_uri: str, output_uri: str, *extra: str, batch_size: int = 128):
    """A clean-job config for tests: demo classes and model, one small scorer actor, overrides."""
    from cleaner.config import load_config

    return load_config(
        None,
        [
            f"data.input={input_uri}",
            "data.classes=demo",
            "model.name=tiny-clip-shapes",
            f"output={output_uri}",
            "scoring.max_actors=1",
            f"scoring.batch_size={batch_size}",
            *extra,
        ],
    )


def jpeg(color=(200, 10, 10), size=(40, 30)) -> bytes:
    """A small solid-colour JPEG (color: an RGB tuple or a colour name)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


def write_tar(
    path: Path,
    members: list[tuple[str, bytes]],
    *,
    mode: str = "w",
    entries: list[tarfile.TarInfo] = (),
) -> Path:
    """A tar file with the given (member name, bytes), in that order, after `entries`
    (directories, links: members without data); mode "w:gz", "w:bz2", "w:xz" compresses."""
    with tarfile.open(path, mode) as tar:
        for entry in entries:
            tar.addfile(entry)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


# Fixtures that start a Ray instance or an S3 endpoint: a test that uses one is an integration
# test even without the marker, so `make test-fast` (unit tests only) leaves it out.
SERVICE_FIXTURES = {"local_ray", "ray_local", "proxy_ray", "s3_endpoint", "fault_proxy"}


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if SERVICE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)
        if item.module.__name__.endswith("test_report_browser"):
            item.add_marker(pytest.mark.browser)


def pytest_runtest_logreport(report):
    """With TEST_TIMINGS=<file>, append each test phase's duration as it ends (the suite's
    slow parts, readable while it still runs)."""
    path = os.environ.get("TEST_TIMINGS")
    if path and report.when in ("setup", "call", "teardown") and report.duration >= 1.0:
        with open(path, "a") as f:
            f.write(
                f"{report.duration:8.1f}s {report.when:8s} {report.outcome:7s} {report.nodeid}\n"
            )


def decoded_split(folder: Path, class_names: list[str], image_size: int):
    """(uint8 images, labels) of the usable samples of a folder's shards, as the jobs decode."""
    import numpy as np

    from cleaner.reading.shards import read_shard

    images, labels = [], []
    for shard in sorted(folder.glob("*.tar")):
        for batch in read_shard(
            str(shard), class_names=class_names, image_size=image_size, extensions=["jpg"]
        ):
            ok = batch["status"] == "ok"
            images.append(batch["image"][ok])
            labels.append(batch["label"][ok])
    return np.concatenate(images), np.concatenate(labels)


def tar_entry(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    """A tar member without data: a directory (tarfile.DIRTYPE) or a link (SYMTYPE)."""
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info
