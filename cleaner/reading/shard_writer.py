"""Writing WebDataset shards from a dataset listing: deterministic names, atomic, resumable.

Shard i holds entries [i * shard_size, (i + 1) * shard_size) of the listing (which is in a
deterministic order), by default after a seeded permutation that spreads every class over
the shards, as `<key>.jpg`, `<key>.cls` (the label) and `<key>.json` (the
original relative path, label, class name and, when known, the true label). The key is
the relative path without its extension (dots in it become `_`). A JPEG that needs no
resize is copied byte for byte; other images are re-encoded. An image that cannot be read
is left out of the shard and reported with its reason. Each finished shard gets a small
record under `_make_shards/`; a rerun skips shards whose record matches their content.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time
from dataclasses import dataclass

import numpy as np
from PIL import Image

from cleaner.reading import uri as uri_lib
from cleaner.reading.layouts import Entry
from cleaner.reasons import stable_reason

RECORDS_DIR = "_make_shards"
SHARD_NAME = "{prefix}-{index:06d}.tar"
# Fixed tar metadata, so that the same input gives the same bytes.
_MTIME = 0


@dataclass(frozen=True)
class WriteOptions:
    """How images are stored: shorter side at most `resize` (None: as they are), JPEG quality."""

    resize: int | None = None
    jpeg_quality: int = 95


def sample_key(path: str) -> str:
    """`google/q0001/000001.jpg` -> `google/q0001/000001` (dots in the rest become `_`)."""
    stem = path.rsplit(".", 1)[0] if "." in path.rsplit("/", 1)[-1] else path
    directory, _, name = stem.rpartition("/")
    name = name.replace(".", "_")
    return f"{directory}/{name}" if directory else name


def encode_image(data: bytes, options: WriteOptions) -> tuple[bytes, bool]:
    """(JPEG bytes, re-encoded?): the original bytes when they are a JPEG that needs nothing."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        width, height = img.size
        if width < 1 or height < 1:
            raise ValueError("empty image")
        too_big = options.resize is not None and min(width, height) > options.resize
        if img.format == "JPEG" and img.mode in ("RGB", "L") and not too_big:
            return data, False
        rgb = img.convert("RGB")
    if too_big:
        scale = options.resize / min(width, height)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        rgb = rgb.resize(size, Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=options.jpeg_quality)
    return buf.getvalue(), True


def spread_order(count: int, seed: int) -> list[int]:
    """A seeded permutation of `count` listing positions: the same for the same seed, so a
    rerun plans the same shards (and skips the finished ones)."""
    return [int(i) for i in np.random.default_rng([seed, count]).permutation(count)]


def plan_shards(
    entries: list[Entry], shard_size: int, prefix: str, seed: int | None = None
) -> list[dict]:
    """One plan row per shard: name, entries, and a fingerprint of what decides its bytes.

    seed: spread the entries over the shards in a seeded random order (spread_order), so
    that a class-ordered listing (ImageFolder, WebVision) does not give one-class shards;
    None keeps the listing's order.
    """
    if seed is not None:
        entries = [entries[i] for i in spread_order(len(entries), seed)]
    plans = []
    keys = unique_keys([e.path for e in entries])
    for index, start in enumerate(range(0, len(entries), shard_size)):
        chunk = entries[start : start + shard_size]
        plans.append(
            {
                "name": SHARD_NAME.format(prefix=prefix, index=index),
                "keys": keys[start : start + shard_size],
                "paths": [e.path for e in chunk],
                "labels": [e.label for e in chunk],
                "true_labels": [e.true_label for e in chunk],
            }
        )
    return plans


def unique_keys(paths: list[str]) -> list[str]:
    """Keys of the paths; a key that two paths share (a.jpg, a.png) gets `_<n>` from the second on."""
    seen: dict[str, int] = {}
    keys = []
    for path in paths:
        key = sample_key(path)
        if key in seen:
            seen[key] += 1
            key = f"{key}_{seen[key]}"
        else:
            seen[key] = 0
        keys.append(key)
    return keys


def shard_fingerprint(plan: dict, options: WriteOptions, class_names: list[str]) -> str:
    payload = json.dumps(
        [
            plan["name"],
            plan["keys"],
            plan["paths"],
            plan["labels"],
            plan["true_labels"],
            options.__dict__,
            class_names,
        ]
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """A regular file member with fixed metadata (mtime 0, mode 644): same input, same bytes."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), _MTIME, 0o644
    tar.addfile(info, io.BytesIO(data))


def write_shard(
    plan: dict,
    *,
    root: str,
    output: str,
    class_names: list[str],
    options: WriteOptions,
    resume: bool = True,
) -> dict:
    """Write one shard (atomically) and its record; skip it when its record already matches.

    Returns the record: name, written, reencoded, failures (path, reason), seconds, skipped.
    """
    fingerprint = shard_fingerprint(plan, options, class_names)
    shard_uri = uri_lib.join(output, plan["name"])
    record_uri = uri_lib.join(output, RECORDS_DIR, plan["name"] + ".json")
    record = matching_record(record_uri, fingerprint) if resume else None
    if record is not None and (record.get("written") == 0 or uri_lib.exists(shard_uri)):
        return {**record, "skipped": True}
    started = time.perf_counter()
    buf = io.BytesIO()
    failures: list[dict] = []
    written = reencoded = 0
    keys = plan["keys"]
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for key, path, label, truth in zip(
            keys, plan["paths"], plan["labels"], plan["true_labels"], strict=True
        ):
            try:
                data = uri_lib.read_bytes(uri_lib.join(root, path))
            except FileNotFoundError:
                failures.append({"path": path, "reason": "image file not found"})
                continue
            except OSError as err:
                failures.append({"path": path, "reason": stable_reason(f"unreadable file: {err}")})
                continue
            try:
                image, changed = encode_image(data, options)
            except (OSError, ValueError, Image.DecompressionBombError) as err:
                reason = f"image decode error: {type(err).__name__}: {err}"
                failures.append({"path": path, "reason": stable_reason(reason)})
                continue
            meta = {"path": path, "label": int(label), "class": class_names[int(label)]}
            if int(truth) >= 0:
                meta["true_label"] = int(truth)
            add_member(tar, f"{key}.jpg", image)
            add_member(tar, f"{key}.cls", str(int(label)).encode())
            add_member(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode())
            written += 1
            reencoded += int(changed)
    record = {
        "name": plan["name"],
        "fingerprint": fingerprint,
        "entries": len(plan["paths"]),
        "written": written,
        "reencoded": reencoded,
        "failures": failures,
        "seconds": round(time.perf_counter() - started, 3),
    }
    return commit_shard(shard_uri, record_uri, buf.getvalue(), record)


def matching_record(record_uri: str, fingerprint: str) -> dict | None:
    """The record of an earlier write of a shard, when it was made from the same plan."""
    if not uri_lib.exists(record_uri):
        return None
    record = json.loads(uri_lib.read_text(record_uri))
    return record if record.get("fingerprint") == fingerprint else None


def commit_shard(shard_uri: str, record_uri: str, tar_bytes: bytes, record: dict) -> dict:
    """Write the shard (when it holds a sample), then its record: each atomically (temp +
    rename, or one PUT), so a record never names a shard that is not complete."""
    if record["written"]:
        uri_lib.write_bytes(shard_uri, tar_bytes)
    uri_lib.write_text(record_uri, json.dumps(record) + "\n")
    return {**record, "skipped": False}
