"""One way to reach files: local paths, file:// and s3:// URIs, through pyarrow.fs.

S3-compatible endpoints come from the standard AWS environment (AWS_ENDPOINT_URL,
AWS_DEFAULT_REGION / AWS_REGION, credentials chain); no keys are ever passed in code.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import uuid
from collections.abc import Iterable
from pathlib import Path

import pyarrow.fs as pafs
from braceexpand import braceexpand

S3_RETRY_ATTEMPTS = 8
# Read buffer of sequential readers (tar shards): tarfile reads 10 KB at a time, which on
# S3 would be one ranged GET each (~100,000 requests for a 1 GB shard); buffered, one GET
# fetches 8 MB.
STREAM_BUFFER_BYTES = 8 << 20
# What counts as a shard in a folder or prefix (compressed tars are read transparently).
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def _strip_file_scheme(uri: str) -> str:
    return uri[len("file://") :] if uri.startswith("file://") else uri


def s3_endpoint() -> str | None:
    """The S3 endpoint from the environment (AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL), if any."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def s3_filesystem(
    max_attempts: int = S3_RETRY_ATTEMPTS, connect_timeout: float | None = None
) -> pafs.S3FileSystem:
    """An S3 filesystem honouring AWS_ENDPOINT_URL and the region env vars, with retries.

    Transient errors (5xx, throttling, dropped connections) are retried by the AWS SDK's
    standard strategy, up to `max_attempts` tries per request with jittered backoff.
    """
    endpoint = s3_endpoint()
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    kwargs: dict = {"retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=max_attempts)}
    if connect_timeout is not None:
        kwargs["connect_timeout"] = connect_timeout
    if endpoint:
        kwargs["endpoint_override"] = endpoint
        if endpoint.startswith("http://"):
            kwargs["scheme"] = "http"
        kwargs["region"] = region or "us-east-1"
    elif region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path, file:// or s3:// URI."""
    if is_s3(uri):
        return s3_filesystem(), uri[len("s3://") :].rstrip("/")
    if "://" in uri and not uri.startswith("file://"):
        raise ValueError(f"unsupported URI scheme in {uri!r} (use a local path, file:// or s3://)")
    return pafs.LocalFileSystem(), os.path.abspath(_strip_file_scheme(uri))


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI (keeps the scheme)."""
    if is_s3(uri):
        return "s3://" + posixpath.join(uri[len("s3://") :].rstrip("/"), *parts)
    return os.path.join(_strip_file_scheme(uri), *parts)


def basename(uri: str) -> str:
    return posixpath.basename(uri.rstrip("/"))


def parent(uri: str) -> str:
    """The folder (or S3 prefix) a file is in: `s3://b/p/x.parquet` -> `s3://b/p`."""
    if is_s3(uri):
        return uri.rstrip("/").rsplit("/", 1)[0]
    return os.path.dirname(os.path.abspath(_strip_file_scheme(uri)))


def exists(uri: str) -> bool:
    return path_exists(*resolve(uri))


def path_exists(fs: pafs.FileSystem, path: str) -> bool:
    """Whether `path` exists on an already resolved filesystem."""
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def file_versions(uris: list[str]) -> dict[str, str]:
    """Each file's version as "size:mtime_ns" (S3: the object's size and last-modified
    time): a file rewritten in place gets another. One stat (S3: HEAD) per file."""
    versions: dict[str, str] = {}
    by_fs: dict[str, tuple[pafs.FileSystem, list[tuple[str, str]]]] = {}
    for uri in uris:
        fs, path = resolve(uri)
        by_fs.setdefault(type(fs).__name__, (fs, []))[1].append((uri, path))
    for fs, pairs in by_fs.values():
        infos = fs.get_file_info([path for _, path in pairs])
        for (uri, _), info in zip(pairs, infos, strict=True):
            if info.type != pafs.FileType.File:
                raise FileNotFoundError(f"not a file: {uri}")
            versions[uri] = f"{info.size}:{info.mtime_ns}"
    return versions


def makedirs(uri: str) -> None:
    """Create a folder (no-op on S3, where folders are implicit)."""
    if not is_s3(uri):
        fs, path = resolve(uri)
        fs.create_dir(path, recursive=True)


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file atomically: a temp name then rename locally, a single PUT on S3."""
    fs, path = resolve(uri)
    if is_s3(uri):
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def remove(uri: str) -> None:
    """Delete one file (no error if it is already gone)."""
    fs, path = resolve(uri)
    with contextlib.suppress(FileNotFoundError):
        fs.delete_file(path)


def remove_tree(uri: str) -> None:
    """Delete a folder (or S3 prefix) and everything under it; no error if absent."""
    fs, path = resolve(uri)
    if path_exists(fs, path):
        fs.delete_dir(path)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def shard_stem(uri: str) -> str:
    """A shard's file name without its tar suffix (`a/x.tar.gz` -> `x`)."""
    name = basename(uri)
    for suffix in SHARD_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def list_files(uri: str, suffix: str | tuple[str, ...] = "") -> list[str]:
    """All files under a folder or prefix (recursive) ending with `suffix`, sorted, as URIs."""
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"no such folder or prefix: {uri}")
    if info.type == pafs.FileType.File:
        return [uri] if uri.endswith(suffix) else []
    selector = pafs.FileSelector(path, recursive=True)
    found = [
        f.path
        for f in fs.get_file_info(selector)
        if f.type == pafs.FileType.File and f.path.endswith(suffix)
    ]
    prefix = "s3://" if is_s3(uri) else ""
    return sorted(prefix + p for p in found)


def expand_shard_spec(spec: str | Iterable[str]) -> list[str]:
    """Shard URIs from a folder/prefix (all *.tar, *.tar.gz, *.tgz below it), a brace pattern,
    a file, or a list."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    shards: list[str] = []
    for item in specs:
        if "{" in item:
            shards.extend(braceexpand(item))
        elif item.endswith(SHARD_SUFFIXES):
            shards.append(item)
        else:
            found = list_files(item, SHARD_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"no .tar shards (nor .tar.gz, .tgz) found under {item}")
            shards.extend(found)
    if not shards:
        raise FileNotFoundError(f"no shards in {spec!r}")
    missing = [s for s in shards if not exists(s)]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise FileNotFoundError(f"shard(s) not found: {', '.join(missing[:3])}{more}")
    seen: set[str] = set()
    return [s for s in shards if not (s in seen or seen.add(s))]
