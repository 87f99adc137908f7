"""Permanent S3 errors and a class spec that does not match the data end the job early.

Each case runs the real clean job (jobs.clean.run_clean) against a real moto S3 endpoint
(behind the fault proxy where access must be denied) and checks that it stops with a
message naming the URI and the problem, quickly, and before any compute: Ray is never
started and no score file is written.
"""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from cleaner.config import ConfigError, load_config
from cleaner.demo.shapes import SHAPE_CLASSES
from cleaner.reading import preflight
from cleaner.reading.preflight import PreflightError, check_labels_match_spec
from jobs.clean import run_clean
from tests.conftest import REPO_ROOT, S3_ENV, free_port, make_bucket
from tests.s3_fault_proxy import S3FaultProxy

pytestmark = pytest.mark.integration

DEMO_CLASSES = list(SHAPE_CLASSES)
EARLY_S = 30.0  # "ends early": permanent errors are not retried for minutes


@pytest.fixture
def no_ray():
    """These jobs must fail before Ray starts: begin without one, check none was started."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    yield ray
    assert not ray.is_initialized(), "the job started Ray before failing"


@pytest.fixture(scope="module")
def shard_bucket(s3_endpoint, demo_shards) -> str:
    """A bucket holding one demo shard (100 samples), uploaded straight to moto."""
    client = make_bucket("preflight")
    first = sorted(demo_shards.glob("*.tar"))[0]
    client.upload_file(str(first), "preflight", f"shards/{first.name}")
    return "s3://preflight/shards"


@pytest.fixture
def proxy(s3_endpoint, monkeypatch):
    proxy = S3FaultProxy(s3_endpoint).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    yield proxy
    proxy.stop()


def clean_config(input_uri: str, output_uri: str, *extra: str):
    return load_config(
        None,
        [
            f"data.input={input_uri}",
            "data.classes=demo",
            "model.name=tiny-clip-shapes",
            f"output={output_uri}",
            *extra,
        ],
    )


def fails_early(cfg, match: str) -> tuple[str, float]:
    """Run the clean job, expect a PreflightError matching `match`; (message, seconds)."""
    start = time.perf_counter()
    with pytest.raises(PreflightError, match=match) as caught:
        run_clean(cfg)
    seconds = time.perf_counter() - start
    message = str(caught.value)
    print(f"\n[{seconds:.2f} s] {message}")
    assert seconds < EARLY_S, f"took {seconds:.1f} s to fail"
    return message, seconds


def no_outputs(folder: Path) -> None:
    written = sorted(p.name for p in folder.rglob("*")) if folder.exists() else []
    assert written == [], f"the failed job wrote {written}"


def test_missing_input_bucket(no_ray, s3_endpoint, tmp_path):
    out = tmp_path / "run"
    fails_early(
        clean_config("s3://no-such-bucket/shards/", str(out)),
        r"^s3://no-such-bucket/shards/: bucket 'no-such-bucket' does not exist",
    )
    no_outputs(out)


def test_missing_output_bucket(no_ray, shard_bucket):
    fails_early(
        clean_config(shard_bucket, "s3://no-such-output/run"),
        r"^s3://no-such-output/run: bucket 'no-such-output' does not exist",
    )


def test_missing_prefix_in_existing_bucket(no_ray, shard_bucket, tmp_path):
    fails_early(
        clean_config("s3://preflight/nothing-here", str(tmp_path / "run")),
        r"^s3://preflight/nothing-here: not found \(no such object or prefix in 'preflight'\)",
    )


def test_access_denied(no_ray, shard_bucket, proxy, tmp_path):
    proxy.set_faults(deny="all")
    fails_early(
        clean_config(shard_bucket, str(tmp_path / "run")),
        rf"^{shard_bucket}: access denied \(reading, HeadObject refused by {proxy.url}\)",
    )
    assert proxy.injected["403"] >= 1
    no_outputs(tmp_path / "run")


def test_output_write_denied(no_ray, shard_bucket, proxy):
    """Read-only credentials: the shards can be read, the output cannot be written."""
    proxy.set_faults(deny="writes")
    fails_early(
        clean_config(shard_bucket, "s3://preflight/runs/denied"),
        r"^s3://preflight/runs/denied: access denied \(writing, CreateMultipartUpload refused",
    )
    # the reads went through, the one write was refused: nothing was written
    assert proxy.forwarded >= 1 and proxy.injected["403"] == 1


def test_unreachable_endpoint(no_ray, s3_endpoint, monkeypatch, tmp_path):
    closed = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", closed)
    fails_early(
        clean_config("s3://preflight/shards", str(tmp_path / "run")),
        rf"^cannot reach S3 endpoint {closed} \(needed for s3://preflight/shards\): "
        r"curlCode: 7, Could not connect to server",
    )
    no_outputs(tmp_path / "run")


@pytest.mark.parametrize("case", ["unreachable endpoint", "unknown model name"])
def test_command_line_errors_are_one_line(case, demo_shards, s3_endpoint, tmp_path):
    """`python -m jobs.clean`: one line on stderr, exit status 2, no stack trace."""
    closed = f"http://127.0.0.1:{free_port()}"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), **S3_ENV}
    args = ["data.classes=demo", "model.name=tiny-clip-shapes", f"output={tmp_path / 'run'}"]
    if case == "unreachable endpoint":
        env["AWS_ENDPOINT_URL"] = closed
        args.append("data.input=s3://preflight/shards")
        expected = f"error: cannot reach S3 endpoint {closed} (needed for s3://preflight/shards)"
    else:
        args += [f"data.input={demo_shards}", "model.name=ViT-Nope"]
        expected = "error: unknown open_clip model name 'ViT-Nope': not a registered config"
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "jobs.clean", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    seconds = time.perf_counter() - start
    print(f"\n[{seconds:.2f} s, exit {done.returncode}] {done.stderr.strip()}")
    assert done.returncode == 2
    assert done.stderr.startswith(expected)
    assert len(done.stderr.strip().splitlines()) == 1
    assert "Traceback" not in done.stderr + done.stdout
    assert not (tmp_path / "run" / "scores").exists()
    assert seconds < 60


def test_permanent_errors_are_config_errors():
    """run_main turns ConfigErrors into one line and exit status 2."""
    assert issubclass(PreflightError, ConfigError)


# --------------------------------------------------------------------------------------------
# Class spec vs labels
# --------------------------------------------------------------------------------------------


def spec_file(path: Path, names: list[str]) -> Path:
    path.write_text("name: partial\nclasses:\n" + "".join(f"  - {n}\n" for n in names))
    return path


def relabel(src: Path, dst: Path, labels: dict[int, str], member: str = "cls") -> Path:
    """A copy of a shard with the `member` label of the i-th sample replaced."""
    with tarfile.open(src) as tar_in, tarfile.open(dst, "w") as tar_out:
        keys: list[str] = []
        for info in tar_in:
            data = tar_in.extractfile(info).read()
            key, _, ext = info.name.partition(".")
            if not keys or keys[-1] != key:
                keys.append(key)
            index = len(keys) - 1
            if index in labels and ext == member:
                data = labels[index].encode()
                info.size = len(data)
            tar_out.addfile(info, io.BytesIO(data))
    return dst


def test_fewer_classes_than_the_data_stops_before_compute(no_ray, demo_shards, tmp_path):
    spec = spec_file(tmp_path / "five.yaml", DEMO_CLASSES[:5])
    out = tmp_path / "run"
    cfg = load_config(
        None,
        [
            f"data.input={demo_shards}",
            f"data.classes={spec}",
            "model.name=tiny-clip-shapes",
            f"output={out}",
        ],
    )
    message, _ = fails_early(cfg, r"^class spec mismatch: class spec '.*five\.yaml' has 5 classes")
    assert "integer labels reach 9" in message
    no_outputs(out)


def test_a_few_stray_labels_pass_the_check(demo_shards, tmp_path):
    first = sorted(demo_shards.glob("*.tar"))[0]
    stray = relabel(first, tmp_path / "stray.tar", {3: "10"})
    peek = check_labels_match_spec([str(stray)], DEMO_CLASSES)
    assert (peek.samples, peek.outside, peek.max_label) == (100, 1, 10)
    # 2 of 100 (2%) are still tolerated as strays; 5 of 100 are a mismatch
    two = relabel(first, tmp_path / "two.tar", {3: "10", 50: "12"})
    assert check_labels_match_spec([str(two)], DEMO_CLASSES).outside == 2
    many = relabel(first, tmp_path / "many.tar", {i: "11" for i in range(0, 50, 10)})
    with pytest.raises(PreflightError, match="5 of the first 100 labels"):
        check_labels_match_spec([str(many)], DEMO_CLASSES)


def test_class_names_not_in_the_spec(demo_shards, tmp_path):
    """Labels given as names (.cls text) the spec does not list are a mismatch too."""
    first = sorted(demo_shards.glob("*.tar"))[0]
    names = relabel(first, tmp_path / "names.tar", {i: "hexagon" for i in range(100)})
    with pytest.raises(PreflightError, match=r"100 of the first 100 labels .*'hexagon'"):
        check_labels_match_spec([str(names)], DEMO_CLASSES)
    # the right names, and the integer labels, match
    good = relabel(first, tmp_path / "good.tar", {i: DEMO_CLASSES[i % 10] for i in range(100)})
    assert check_labels_match_spec([str(good)], DEMO_CLASSES).outside == 0
    assert check_labels_match_spec([str(first)], DEMO_CLASSES).outside == 0


def test_classify_aws_errors():
    def kind(text: str) -> str:
        return preflight.classify(OSError(text)).kind

    assert kind("AWS Error NETWORK_CONNECTION during HeadObject operation: curlCode: 7") == (
        "network"
    )
    assert kind("AWS Error UNKNOWN (HTTP status 503) during HeadBucket operation: x") == (
        "transient"
    )
    assert kind("AWS Error SLOW_DOWN during GetObject operation: x") == "transient"
    assert kind("AWS Error ACCESS_DENIED during HeadObject operation: No body") == "denied"
    assert kind("AWS Error UNKNOWN (HTTP status 403) during HeadBucket operation: x") == "denied"
    assert kind("AWS Error NO_SUCH_BUCKET during ListObjectsV2 operation: x") == "no_bucket"
    assert kind("AWS Error INVALID_ACCESS_KEY_ID during GetObject operation: x") == "credentials"
    assert kind("something else") == "other"


def test_train_job_checks_its_io_first(no_ray, shard_bucket):
    """jobs.train runs the same preflight: here its checkpoint storage bucket is missing."""
    from jobs.train import run_train
    from training.config import TrainJobConfig

    cfg = load_config(
        None,
        [
            f"data.input={shard_bucket}",
            "data.classes=demo",
            "data.manifest=s3://preflight/runs/clean/manifest.parquet",
            "run.storage=s3://no-such-storage/train",
        ],
        TrainJobConfig,
    )
    start = time.perf_counter()
    with pytest.raises(PreflightError, match=r"^s3://preflight/runs/clean/manifest\.parquet: not"):
        run_train(cfg)
    cfg = load_config(
        None,
        [
            f"data.input={shard_bucket}",
            "data.classes=demo",
            f"data.manifest={shard_bucket}",
            "run.storage=s3://no-such-storage/train",
        ],
        TrainJobConfig,
    )
    with pytest.raises(
        PreflightError, match=r"^s3://no-such-storage/train: bucket 'no-such-storage' does not"
    ):
        run_train(cfg)
    assert time.perf_counter() - start < EARLY_S


def test_output_folder_that_cannot_be_created(no_ray, demo_shards, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    fails_early(
        clean_config(str(demo_shards), str(blocker / "run")),
        rf"^{blocker / 'run'}: output folder is not writable: ",
    )
