"""URIs: local paths, file://, brace patterns, lists, and s3:// on a moto endpoint."""

from __future__ import annotations

import pytest

from cleaner.reading import uri as uri_lib
from tests.conftest import make_bucket


@pytest.fixture
def shard_folder(tmp_path):
    for i in range(3):
        (tmp_path / f"part-{i:03d}.tar").write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "part-100.tar").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("not a shard")
    return tmp_path


def test_folder_brace_pattern_file_uri_and_list(shard_folder):
    folder = str(shard_folder)
    found = uri_lib.expand_shard_spec(folder)
    assert [uri_lib.basename(s) for s in found] == [
        "part-000.tar",
        "part-001.tar",
        "part-002.tar",
        "part-100.tar",
    ]
    braced = uri_lib.expand_shard_spec(f"{folder}/part-{{000..002}}.tar")
    assert braced == [f"{folder}/part-{i:03d}.tar" for i in range(3)]
    assert uri_lib.expand_shard_spec(f"file://{folder}/part-001.tar") == [
        f"file://{folder}/part-001.tar"
    ]
    listed = uri_lib.expand_shard_spec([f"{folder}/part-000.tar", f"{folder}/sub"])
    assert [uri_lib.basename(s) for s in listed] == ["part-000.tar", "part-100.tar"]
    assert uri_lib.expand_shard_spec([f"{folder}/part-000.tar"] * 2) == [f"{folder}/part-000.tar"]


def test_missing_shards_and_schemes_are_named(shard_folder):
    with pytest.raises(FileNotFoundError, match=r"part-003\.tar.*and 4 more"):
        uri_lib.expand_shard_spec(f"{shard_folder}/part-{{000..009}}.tar")
    (shard_folder / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no \.tar shards"):
        uri_lib.expand_shard_spec(str(shard_folder / "empty"))
    with pytest.raises(FileNotFoundError, match="no such folder"):
        uri_lib.expand_shard_spec(str(shard_folder / "absent"))
    with pytest.raises(ValueError, match="unsupported URI scheme"):
        uri_lib.resolve("gs://bucket/x")


def test_s3_listing_reading_and_atomic_writes(s3_endpoint):
    client = make_bucket("uri-test")
    for i in range(2):
        client.put_object(Bucket="uri-test", Key=f"shards/a-{i}.tar", Body=b"tar")
    client.put_object(Bucket="uri-test", Key="shards/readme.md", Body=b"x")
    assert uri_lib.expand_shard_spec("s3://uri-test/shards") == [
        "s3://uri-test/shards/a-0.tar",
        "s3://uri-test/shards/a-1.tar",
    ]
    uri_lib.write_text("s3://uri-test/out/x.json", '{"a": 1}')
    assert uri_lib.read_text("s3://uri-test/out/x.json") == '{"a": 1}'
    assert uri_lib.exists("s3://uri-test/out/x.json")
    assert not uri_lib.exists("s3://uri-test/out/y.json")
    with pytest.raises(FileNotFoundError):
        uri_lib.expand_shard_spec("s3://uri-test/nothing/")
