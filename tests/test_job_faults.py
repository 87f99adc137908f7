"""Whole clean jobs on a local Ray under faults: transient S3 errors and bad inputs.

The S3 endpoint is a real moto server behind tests/s3_fault_proxy.py; the Ray workers
reach S3 through the proxy too, so the shard reads in Ray tasks meet the faults as well as
the driver's listing, score writes, manifest and report writes.
"""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import boto3
import pyarrow.parquet as pq
import pytest
import yaml

from cleaner.classes import DEMO_CLASS_SPEC
from jobs.clean import run_clean
from tests.conftest import S3_ENV, clean_config, count_samples, jpeg, upload_folder, write_tar
from tests.s3_fault_proxy import S3FaultProxy
from tests.test_preflight import relabel

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def fault_proxy(s3_endpoint):
    proxy = S3FaultProxy(s3_endpoint, seed=11).start()
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def proxy_ray(fault_proxy):
    """A local Ray whose workers reach S3 through the fault proxy."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        runtime_env={"env_vars": {**S3_ENV, "AWS_ENDPOINT_URL": fault_proxy.url}},
    )
    yield ray
    ray.shutdown()


@pytest.fixture
def two_shards(demo_shards, tmp_path):
    """Two demo shards of 100 samples each."""
    folder = tmp_path / "shards"
    folder.mkdir()
    for shard in sorted(demo_shards.glob("*.tar"))[:2]:
        shutil.copy(shard, folder / shard.name)
    return folder


def config(input_uri: str, output_uri: str, *extra: str):
    return clean_config(input_uri, output_uri, "scoring.read_batch_size=32", *extra, batch_size=64)


def test_transient_s3_errors_are_retried_to_success(
    proxy_ray, fault_proxy, s3_endpoint, two_shards, monkeypatch
):
    moto = boto3.client("s3", endpoint_url=s3_endpoint)
    moto.create_bucket(Bucket="faults")
    upload_folder(moto, two_shards, "faults", "shards")
    monkeypatch.setenv("AWS_ENDPOINT_URL", fault_proxy.url)
    # Every distinct request (method + path) fails once, then 5% at random fail again and
    # 2% more have their connection reset: 503 SlowDown, 500 InternalError, reset in turn.
    fault_proxy.set_faults(each_once=True, fail_rate=0.05, reset_rate=0.02)
    summary = run_clean(config("s3://faults/shards", "s3://faults/run"))
    injected = dict(fault_proxy.injected)
    faults = list(fault_proxy.faults)
    requests = fault_proxy.requests
    fault_proxy.set_faults()

    body = moto.get_object(Bucket="faults", Key="run/manifest.parquet")["Body"].read()
    manifest = pq.read_table(io.BytesIO(body))
    keys = manifest.column("key").to_pylist()
    expected = count_samples(two_shards)
    print(
        f"\ninput samples {expected}, manifest rows {len(keys)}, unique keys {len(set(keys))}, "
        f"failed {summary['counts']['failed']}; S3 requests {requests}, faults injected "
        f"{sum(injected.values())} {injected}; timings {summary['timings']}"
    )
    assert len(keys) == expected == len(set(keys)) == 200
    assert summary["counts"]["failed"] == 0
    assert set(injected) == {"503", "500", "reset"}

    def faulted(method: str, fragment: str) -> bool:
        return any(m == method and fragment in p for m, p, _ in faults)

    assert faulted("GET", "/faults/shards/") or faulted("HEAD", "/faults/shards/")
    assert faulted("GET", ".tar")  # the shard reads in the Ray reader tasks
    assert any(m in ("PUT", "POST") and "/faults/run/scores/" in p for m, p, _ in faults)
    assert any(m in ("PUT", "POST") and "/faults/run/manifest.parquet" in p for m, p, _ in faults)
    assert faulted("GET", "/faults/run/scores/")  # the fit reads the scores back
    stored = moto.list_objects_v2(Bucket="faults", Prefix="run/")["Contents"]
    names = {o["Key"] for o in stored}
    assert {"run/summary.json", "run/config.yaml", "run/report.html"} <= names
    assert not any("_clipcleaner_preflight" in n for n in names)  # the probe is deleted


def test_larger_class_spec_and_a_stray_label(proxy_ray, two_shards, tmp_path):
    """A spec with 2 classes more than the data uses runs (they stay empty); one label
    outside even that spec is one failed row with its reason, not a job error."""
    spec = yaml.safe_load(DEMO_CLASS_SPEC.read_text())
    spec["classes"] += [{"name": "hexagon"}, {"name": "heart"}]
    spec_path = tmp_path / "twelve.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    first = sorted(two_shards.glob("*.tar"))[0]
    relabel(first, tmp_path / "stray.tar", {3: "12"})
    shutil.move(tmp_path / "stray.tar", first)
    out = tmp_path / "run"
    summary = run_clean(config(str(two_shards), str(out), f"data.classes={spec_path}"))
    manifest = pq.read_table(out / "manifest.parquet").to_pydict()
    failed = [
        (k, r)
        for k, s, r in zip(*(manifest[c] for c in ("key", "status", "reason")), strict=True)
        if s == "failed"
    ]
    expected = count_samples(two_shards)
    selection = summary["selection"]
    print(
        f"\ninput samples {expected}, manifest rows {len(manifest['key'])}, failed {failed}, "
        f"classes {selection['num_classes']} ({selection['num_present_classes']} present), "
        f"per-class totals {selection['per_class']['total']}"
    )
    assert len(manifest["key"]) == expected == 200
    assert failed == [("shapes-000000-000003", "label 12 out of range [0, 12)")]
    assert summary["counts"]["failed"] == 1
    assert (selection["num_classes"], selection["num_present_classes"]) == (12, 10)
    assert selection["per_class"]["total"][10:] == [0, 0]


BAD_SAMPLES = [
    ("bad-corrupt.jpg", b"not an image at all"),
    ("bad-corrupt.cls", b"1"),
    ("bad-nolabel.jpg", None),
    ("bad-outofrange.jpg", None),
    ("bad-outofrange.cls", b"10"),
    ("bad-named.jpg", None),
    ("bad-named.cls", b"star"),
    ("bad-jsonname.jpg", None),
    ("bad-jsonname.json", b'{"label": "ring"}'),
    ("bad-unknownname.jpg", None),
    ("bad-unknownname.cls", b"hexagon"),
    ("bad-split.jpg", None),
    ("bad-other.jpg", None),
    ("bad-other.cls", b"0"),
    ("bad-split.cls", b"1"),  # the key again after another one: gathered into one sample
    ("bad-noimage.cls", b"1"),
    ("bad-badjson.jpg", None),
    ("bad-badjson.json", b"{not json"),
]


def test_every_bad_input_in_one_job(proxy_ray, demo_shards, tmp_path):
    """Bad samples and bad shards side by side in one clean job: each is a failed row with
    its reason (labels given as class names are fine), and nothing is dropped."""
    good, other = sorted(demo_shards.glob("*.tar"))[:2]
    folder = tmp_path / "shards"
    folder.mkdir()
    shutil.copy(good, folder / good.name)
    data = other.read_bytes()
    (folder / "shapes-truncated.tar").write_bytes(data[: len(data) // 3])
    (folder / "shapes-empty.tar").write_bytes(b"\0" * 1024)
    with tarfile.open(good) as tar:  # its first 5 samples again: duplicate keys
        members = [(m.name, tar.extractfile(m).read()) for m in tar][:15]
    write_tar(folder / "shapes-copy.tar", members)
    image = jpeg((200, 30, 30), (64, 64))
    write_tar(folder / "shapes-bad.tar", [(n, image if d is None else d) for n, d in BAD_SAMPLES])

    out = tmp_path / "run"
    summary = run_clean(config(str(folder), str(out)))
    manifest = pq.read_table(out / "manifest.parquet").to_pydict()
    rows = list(zip(*(manifest[c] for c in ("shard", "key", "status", "reason")), strict=True))
    by_shard: dict[str, list[tuple[str, str, str]]] = {}
    for shard, key, status, reason in rows:
        by_shard.setdefault(Path(shard).name, []).append((key, status, reason))

    bad = by_shard["shapes-bad.tar"]
    # labels given as class names (.cls text, .json "label") are usable samples
    # and so is a key whose members were written apart
    usable = {k for k, s, _ in bad if s != "failed"}
    assert usable == {"bad-named", "bad-jsonname", "bad-other", "bad-split"}
    reasons = {(k, r) for k, s, r in bad if s == "failed"}
    corrupt = next(r for k, r in reasons if k == "bad-corrupt")
    assert corrupt == "image decode error: UnidentifiedImageError: cannot identify image file"
    assert reasons - {("bad-corrupt", corrupt)} == {
        ("bad-nolabel", "no label (.cls or .json 'label')"),
        ("bad-outofrange", "label 10 out of range [0, 10)"),
        ("bad-unknownname", "label 'hexagon' is neither an integer nor a known class name"),
        ("bad-noimage", "no image member (expected one of jpg, jpeg, png, webp, bmp)"),
        (
            "bad-badjson",
            "unreadable .json: Expecting property name enclosed in double quotes: "
            "line 1 column 2 (char 1)",
        ),
    }
    labels = dict(zip(manifest["key"], manifest["label"], strict=False))
    assert (labels["bad-named"], labels["bad-jsonname"]) == (5, 7)  # star, ring
    assert [(s, r) for _, s, r in by_shard["shapes-copy.tar"]] == [
        ("failed", f"duplicate key (first seen in {good.name})")
    ] * 5
    assert by_shard["shapes-empty.tar"] == [
        ("__shard_error__/shapes-empty.tar", "failed", "empty shard: no samples")
    ]
    truncated = by_shard["shapes-truncated.tar"]
    read = truncated[:-1]  # the samples read before the cut, then the shard's own row
    kept = [k for k, s, _ in read if s != "failed"]
    cut = [(k, r) for k, s, r in read if s == "failed"]  # at most the key being read at the cut
    assert truncated[-1] == (
        "__shard_error__/shapes-truncated.tar",
        "failed",
        f"shard unreadable after {len(read)} samples: ReadError: unexpected end of data",
    )
    assert len(kept) > 0 and len(cut) <= 1, cut
    assert by_shard[good.name] and all(s != "failed" for _, s, _ in by_shard[good.name])

    # Nothing dropped: every sample group read is a row, plus one row per broken shard.
    groups = 100 + len(read) + 5 + 10  # the bad shard: 10 keys
    print(
        f"\ninput sample groups {groups} + 2 broken shards, manifest rows {len(rows)}, "
        f"failed {summary['counts']['failed']}: {summary['counts']['failed_by_reason']}"
    )
    assert len(rows) == summary["counts"]["samples"] == groups + 2
    assert summary["counts"]["failed"] == len(reasons) + 5 + 2 + len(cut)
    # one line per distinct reason: the 5 duplicates are one line with a count of 5
    assert summary["counts"]["failed_by_reason"][f"duplicate key (first seen in {good.name})"] == 5
