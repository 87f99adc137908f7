"""Shards as ordinary tools write them: GNU tar, Python's tarfile, compressed, long names.

Every input member must end up in a sample row or be reported (a failed sample row or a
shard-level row); nothing is dropped silently.
"""

from __future__ import annotations

import io
import random
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from cleaner.reading.shards import (
    SHARD_ERROR_PREFIX,
    SHARD_SKIPPED_PREFIX,
    is_metadata_member,
    read_shard,
    split_member_name,
)
from cleaner.reasons import group_reasons, stable_reason
from tests.conftest import jpeg, tar_entry, write_tar

CLASSES = ["circle", "square", "star"]


def read_rows(path: Path) -> dict[str, np.ndarray]:
    batches = list(
        read_shard(
            str(path), class_names=CLASSES, image_size=8, extensions=["jpg", "png"], batch_size=7
        )
    )
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def by_key(rows) -> dict[str, tuple[str, str]]:
    keys = list(rows["key"])
    assert len(keys) == len(set(keys)), f"a key appears twice: {keys}"
    return {k: (s, r) for k, s, r in zip(keys, rows["status"], rows["reason"], strict=True)}


def write_tree(root: Path, samples: dict[str, int]) -> Path:
    """Files `<key>.jpg` + `<key>.cls` under root (keys may hold directories)."""
    for key, label in samples.items():
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_name(path.name + ".jpg").write_bytes(jpeg(size=(12, 10)))
        path.with_name(path.name + ".cls").write_text(str(label))
    return root


def gnu_tar(*args: str) -> None:
    subprocess.run(["tar", *args], check=True, capture_output=True)


def test_gnu_tar_of_dot_gives_dot_slash_members_and_every_sample(tmp_path):
    tree = write_tree(tmp_path / "images", {f"{i:04d}": i % 3 for i in range(6)})
    gnu_tar("-C", str(tree), "-cf", str(tmp_path / "x.tar"), ".")
    with tarfile.open(tmp_path / "x.tar") as tar:
        names = tar.getnames()
    assert "./0000.jpg" in names and "." in names  # the case under test
    rows = by_key(read_rows(tmp_path / "x.tar"))
    assert rows == {f"{i:04d}": ("ok", "") for i in range(6)}


def test_members_of_a_key_written_apart_are_gathered(tmp_path):
    # GNU tar stores a folder in readdir order: .jpg and .cls of a key can be far apart.
    members = [(f"k{i}.jpg", jpeg()) for i in range(5)] + [(f"k{i}.cls", b"1") for i in range(5)]
    rows = read_rows(write_tar(tmp_path / "apart.tar", members))
    assert by_key(rows) == {f"k{i}": ("ok", "") for i in range(5)}


def test_past_the_pending_budget_a_late_member_is_a_failed_row(tmp_path):
    from cleaner.reading.shards import iter_tar_samples

    members = [(f"k{i}.jpg", jpeg()) for i in range(4)] + [(f"k{i}.cls", b"1") for i in range(4)]
    path = write_tar(tmp_path / "apart.tar", members)
    with open(path, "rb") as stream:
        samples = list(iter_tar_samples(stream, pending_bytes=1))
    keys = [s.key for s in samples]
    assert sorted(set(keys)) == ["k0", "k1", "k2", "k3"] and len(keys) == 8
    late = [s for s in samples if "cls" in s.members]
    assert all("not contiguous" in s.problem for s in late)


def test_python_tarfile_add_of_dot_with_directory_entries(tmp_path):
    tree = write_tree(tmp_path / "images", {"a/0001": 0, "a/b/0002": 1, "0003": 2})
    with tarfile.open(tmp_path / "py.tar", "w") as tar:
        tar.add(tree, arcname=".")
    with tarfile.open(tmp_path / "py.tar") as tar:
        assert any(m.isdir() and m.name.startswith("./a") for m in tar)
    assert by_key(read_rows(tmp_path / "py.tar")) == {
        k: ("ok", "") for k in ("a/0001", "a/b/0002", "0003")
    }


def test_bsdtar_style_names_and_absolute_names(tmp_path):
    # bsdtar (libarchive) writes `./` members too; it is not installed here, so its naming
    # is written member by member: a `./` directory entry, `./`-prefixed files, and `/x`.
    members = [("./k1.jpg", jpeg()), ("./k1.cls", b"1"), ("/abs/k2.jpg", jpeg()),
               ("/abs/k2.cls", b"2")]  # fmt: skip
    entries = [tar_entry("./", tarfile.DIRTYPE)]
    path = write_tar(tmp_path / "bsd.tar", members, entries=entries)
    assert by_key(read_rows(path)) == {"k1": ("ok", ""), "abs/k2": ("ok", "")}


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_long_names_python_tarfile(tmp_path, fmt):
    deep = "/".join(["a-rather-long-directory-name"] * 6)  # > 100 characters
    key = f"{deep}/sample-with-a-long-name-{'x' * 80}"
    assert len(key) > 255
    path = tmp_path / "long.tar"
    with tarfile.open(path, "w", format=fmt) as tar:
        for ext, data in (("jpg", jpeg()), ("cls", b"0")):
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert by_key(read_rows(path)) == {key: ("ok", "")}


@pytest.mark.parametrize("fmt", ["pax", "gnu"])
def test_long_names_gnu_tar(tmp_path, fmt):
    key = "/".join(["long-directory-name-" + "d" * 40] * 3) + "/" + "f" * 120
    write_tree(tmp_path / "tree", {key: 1})
    gnu_tar(f"--format={fmt}", "-C", str(tmp_path / "tree"), "-cf", str(tmp_path / "l.tar"), ".")
    assert by_key(read_rows(tmp_path / "l.tar")) == {key: ("ok", "")}


def test_upper_case_extensions(tmp_path):
    path = write_tar(
        tmp_path / "upper.tar",
        [("IMG_0001.JPG", jpeg()), ("IMG_0001.CLS", b"2"), ("b.Jpg", jpeg()), ("b.Cls", b"1")],
    )
    rows = read_rows(path)
    assert by_key(rows) == {"IMG_0001": ("ok", ""), "b": ("ok", "")}
    assert list(rows["label"]) == [2, 1]


@pytest.mark.parametrize("suffix", [".tar.gz", ".tgz"])
def test_gzip_compressed_shards_gnu_tar_and_tarfile(tmp_path, suffix):
    tree = write_tree(tmp_path / "tree", {f"s{i}": i % 3 for i in range(5)})
    expected = {f"s{i}": ("ok", "") for i in range(5)}
    gnu_tar("-C", str(tree), "-czf", str(tmp_path / f"gnu{suffix}"), ".")
    assert by_key(read_rows(tmp_path / f"gnu{suffix}")) == expected
    with tarfile.open(tmp_path / f"py{suffix}", "w:gz") as tar:
        tar.add(tree, arcname=".")
    assert by_key(read_rows(tmp_path / f"py{suffix}")) == expected


def test_truncated_gzip_shard_keeps_read_samples_and_reports(tmp_path):
    members = []
    for i in range(6):
        members += [(f"k{i}.jpg", np.random.default_rng(i).bytes(3000)), (f"k{i}.cls", b"0")]
    path = tmp_path / "whole.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = path.read_bytes()
    (tmp_path / "cut.tar.gz").write_bytes(data[: len(data) * 2 // 3])
    rows = by_key(read_rows(tmp_path / "cut.tar.gz"))
    shard_row = rows.pop(f"{SHARD_ERROR_PREFIX}/cut.tar.gz")
    assert shard_row[0] == "failed" and "shard unreadable" in shard_row[1]
    assert 0 < len(rows) < 6


def test_same_key_under_different_directories(tmp_path):
    path = write_tar(
        tmp_path / "dirs.tar",
        [
            ("train/a/0001.jpg", jpeg()),
            ("train/a/0001.cls", b"0"),
            ("train/b/0001.jpg", jpeg()),
            ("train/b/0001.cls", b"1"),
        ],
    )
    rows = read_rows(path)
    assert by_key(rows) == {"train/a/0001": ("ok", ""), "train/b/0001": ("ok", "")}
    assert list(rows["label"]) == [0, 1]


def test_hidden_rule_applies_to_the_file_name_not_the_directory(tmp_path):
    assert not is_metadata_member("./.cache/0001.jpg")
    assert is_metadata_member("photos/._0001.jpg") and is_metadata_member("__meta__.json")
    path = write_tar(
        tmp_path / "hidden.tar",
        [
            (".cache/0001.jpg", jpeg()),
            (".cache/0001.cls", b"0"),
            ("./.DS_Store", b"junk"),
            ("photos/._0001.jpg", b"AppleDouble"),
            ("photos/0001.jpg", jpeg()),
            ("photos/0001.cls", b"1"),
        ],
    )
    rows = by_key(read_rows(path))
    skipped = rows.pop(f"{SHARD_SKIPPED_PREFIX}/hidden.tar")
    assert rows == {".cache/0001": ("ok", ""), "photos/0001": ("ok", "")}
    assert skipped[0] == "failed"
    assert "2 hidden or metadata files" in skipped[1] and "._0001.jpg" in skipped[1]


def test_dot_dot_member_is_a_failed_row_not_dropped(tmp_path):
    path = write_tar(
        tmp_path / "up.tar",
        [
            ("../escape.jpg", jpeg()),
            ("../escape.cls", b"0"),
            ("fine.jpg", jpeg()),
            ("fine.cls", b"1"),
        ],
    )
    rows = by_key(read_rows(path))
    assert rows["fine"] == ("ok", "")
    assert rows["../escape"][0] == "failed" and "'..'" in rows["../escape"][1]


def test_links_are_reported_and_duplicate_extensions_fail_the_sample(tmp_path):
    path = tmp_path / "links.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in [("k.jpg", jpeg()), ("k.JPG", jpeg()), ("k.cls", b"0")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("alias.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "k.jpg"
        tar.addfile(link)
    rows = by_key(read_rows(path))
    assert rows["k"][0] == "failed" and "two members" in rows["k"][1]
    skipped = rows[f"{SHARD_SKIPPED_PREFIX}/links.tar"]
    assert "1 links or special files" in skipped[1] and "alias.jpg" in skipped[1]


def test_corrupt_image_reason_is_stable_and_groups(tmp_path):
    members = []
    for i in range(30):
        members += [(f"bad{i}.jpg", b"not an image " + bytes([i])), (f"bad{i}.cls", b"0")]
    rows = read_rows(write_tar(tmp_path / "bad.tar", members))
    reasons = set(rows["reason"])
    assert len(reasons) == 1, reasons
    (reason,) = reasons
    assert "0x" not in reason and "object at" not in reason
    assert reason == "image decode error: UnidentifiedImageError: cannot identify image file"
    assert group_reasons(list(rows["reason"]) * 1000) == {reason: 30_000}


def test_group_reasons_caps_the_number_of_lines():
    assert stable_reason("x <_io.BytesIO object at 0x7fa47da51df0> y") == "x y"
    grouped = group_reasons([f"label {i} out of range" for i in range(200)] + ["a"] * 5, 10)
    assert len(grouped) == 10 and sum(grouped.values()) == 205
    assert next(iter(grouped)) == "a" and "other reasons (192 distinct)" in grouped


def _random_tree(rng: random.Random, root: Path) -> set[str]:
    """Random keys (nested dirs, dotted dirs, upper-case extensions) written as files."""
    keys: set[str] = set()
    for i in range(rng.randint(1, 25)):
        parts = [
            rng.choice(["a", "B", ".hid", "x y", "long" * 20]) for _ in range(rng.randint(0, 3))
        ]
        key = "/".join([*parts, f"s{i}_{rng.randint(0, 3)}"])
        ext_img, ext_cls = rng.choice([("jpg", "cls"), ("JPG", "CLS"), ("png", "cls")])
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_name(f"{path.name}.{ext_img}").write_bytes(jpeg(size=(9, 9)))
        path.with_name(f"{path.name}.{ext_cls}").write_text(str(rng.randint(0, 2)))
        keys.add(key)
    return keys


@pytest.mark.parametrize("seed", range(6))
def test_property_rows_equal_distinct_keys(tmp_path, seed):
    rng = random.Random(seed)
    tree = tmp_path / "tree"
    keys = _random_tree(rng, tree)
    with tarfile.open(tmp_path / "py.tar", "w", format=rng.choice([1, 2])) as tar:  # GNU, pax
        tar.add(tree, arcname=".")
    fmt = rng.choice(["gnu", "pax", "posix"])
    gnu_tar(f"--format={fmt}", "--sort=name", "-C", str(tree), "-cf", str(tmp_path / "g.tar"), ".")
    for shard in ("py.tar", "g.tar"):
        rows = read_rows(tmp_path / shard)
        assert len(rows["key"]) == len(set(rows["key"])) == len(keys), (shard, fmt)
        assert set(rows["key"]) == keys
        assert set(rows["status"]) == {"ok"}


def test_split_member_name_strips_tar_prefixes():
    assert split_member_name("./a/b.c/key.seg.JPG") == ("a/b.c/key", "seg.jpg")
    assert split_member_name("././k.cls") == ("k", "cls")


@pytest.mark.integration
def test_clean_job_on_a_gnu_tar_of_dot(local_ray, tmp_path):
    """`tar -C dir -cf x.tar .` shards clean with every sample (was: one 'empty shard' row)."""
    from jobs.clean import run_clean
    from tests.conftest import clean_config

    colors = ["red", "blue", "green"]
    for shard in range(2):
        tree = tmp_path / f"images{shard}"
        for i in range(20):
            key = tree / f"{shard}{i:03d}"
            key.parent.mkdir(parents=True, exist_ok=True)
            key.with_suffix(".jpg").write_bytes(jpeg(colors[i % 3], size=(64, 64)))
            key.with_suffix(".cls").write_text(str(i % 3))
        (tmp_path / "shards").mkdir(exist_ok=True)
        gnu_tar("-C", str(tree), "-cf", str(tmp_path / "shards" / f"shard-{shard:06d}.tar"), ".")
    run_clean(clean_config(str(tmp_path / "shards"), str(tmp_path / "run")))
    manifest = pq.read_table(tmp_path / "run" / "manifest.parquet")
    assert manifest.num_rows == 40 == len(set(manifest.column("key").to_pylist()))
    assert set(manifest.column("status").to_pylist()) <= {"clean", "noisy"}
