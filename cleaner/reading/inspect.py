"""Checking shards before a long run: samples, keys, labels and classes per shard, fast.

Reads the tar members (no image is decoded), parses the labels as the clean job does, and
counts per shard what would fail. Shards are read in parallel threads (I/O bound on S3).
"""

from __future__ import annotations

import json
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

from cleaner.reading import uri as uri_lib
from cleaner.reading.shards import (
    MISSING_LABEL,
    SkippedMembers,
    find_image,
    iter_tar_samples,
    sample_labels,
)
from cleaner.reasons import group_reasons

DEFAULT_EXTENSIONS = ["jpg", "jpeg", "png", "webp", "bmp"]


@dataclass
class ShardStats:
    """What one shard holds, as the clean job would read it."""

    shard: str
    samples: int = 0
    keys: int = 0
    usable: int = 0
    label_min: int | None = None
    label_max: int | None = None
    classes: int = 0
    skipped_members: int = 0
    error: str | None = None
    problems: dict[str, int] = field(default_factory=dict)
    key_list: list[str] = field(default_factory=list, repr=False)


def raw_int_label(sample) -> int | None:
    """The integer label as written (also when outside the class spec), else None."""
    raw = sample.members.get("cls")
    if raw is None and "json" in sample.members:
        try:
            value = json.loads(sample.members["json"]).get("label")
        except (ValueError, AttributeError):
            return None
        raw = str(value).encode() if isinstance(value, int) else None
    try:
        text = raw.decode("utf-8").strip() if raw is not None else ""
    except UnicodeDecodeError:
        return None
    return int(text) if text.lstrip("-").isdigit() else None


def inspect_shard(
    shard: str, class_names: list[str], extensions: list[str] = DEFAULT_EXTENSIONS
) -> ShardStats:
    """Counts for one shard; a shard that cannot be read completely gets `error`."""
    stats = ShardStats(shard)
    labels: set[int] = set()
    reasons: list[str] = []
    skipped = SkippedMembers()
    try:
        fs, path = uri_lib.resolve(shard)
        with fs.open_input_stream(path, buffer_size=uri_lib.STREAM_BUFFER_BYTES) as stream:
            for sample in iter_tar_samples(stream, skipped):
                stats.samples += 1
                stats.key_list.append(sample.key)
                label, _, problem = sample_labels(sample, class_names)
                problem = sample.problem or problem
                if problem is None and find_image(sample, extensions) is None:
                    problem = f"no image member (expected one of {', '.join(extensions)})"
                label = label if label != MISSING_LABEL else raw_int_label(sample)
                if label is not None:
                    labels.add(label)
                if problem is None:
                    stats.usable += 1
                else:
                    reasons.append(problem)
    except (tarfile.TarError, OSError, EOFError) as err:
        stats.error = f"{type(err).__name__}: {err}"
    stats.keys = len(set(stats.key_list))
    stats.skipped_members = len(skipped.names)
    stats.problems = group_reasons(reasons)
    if labels:
        stats.label_min, stats.label_max = min(labels), max(labels)
    stats.classes = len(labels)
    return stats


def inspect_shards(
    shards: list[str],
    class_names: list[str],
    extensions: list[str] = DEFAULT_EXTENSIONS,
    threads: int = 8,
) -> dict:
    """Per-shard stats plus totals: samples, distinct keys (duplicates across shards), classes."""
    with ThreadPoolExecutor(max_workers=threads) as pool:
        stats = list(pool.map(lambda s: inspect_shard(s, class_names, extensions), shards))
    all_keys: set[str] = set()
    repeated = 0
    for s in stats:
        for key in s.key_list:
            repeated += key in all_keys
            all_keys.add(key)
    present = [s for s in stats if s.label_min is not None]
    totals = {
        "shards": len(stats),
        "samples": sum(s.samples for s in stats),
        "distinct_keys": len(all_keys),
        "repeated_keys": repeated,
        "usable": sum(s.usable for s in stats),
        "unreadable_shards": sum(1 for s in stats if s.error),
        "label_min": min((s.label_min for s in present), default=None),
        "label_max": max((s.label_max for s in present), default=None),
        "num_classes_in_spec": len(class_names),
        "problems": group_reasons(
            r for s in stats for r, n in s.problems.items() for _ in range(n)
        ),
    }
    rows = []
    for s in stats:
        row = asdict(s)
        row.pop("key_list")
        rows.append(row)
    return {"totals": totals, "shards": rows}


def format_inspection(result: dict) -> str:
    """A fixed-width table, one line per shard, then the totals."""
    lines = [
        f"{'shard':<32} {'samples':>8} {'keys':>8} {'usable':>8} {'labels':>11} {'classes':>7}  "
        "problems"
    ]
    for row in result["shards"]:
        span = "-" if row["label_min"] is None else f"{row['label_min']}..{row['label_max']}"
        problems = "; ".join(f"{n} x {r}" for r, n in row["problems"].items())
        if row["skipped_members"]:
            problems = f"{row['skipped_members']} members skipped; " + problems
        if row["error"]:
            problems = f"UNREADABLE: {row['error']}; " + problems
        lines.append(
            f"{uri_lib.basename(row['shard'])[:32]:<32} {row['samples']:>8} {row['keys']:>8} "
            f"{row['usable']:>8} {span:>11} {row['classes']:>7}  {problems.rstrip('; ')}".rstrip()
        )
    t = result["totals"]
    span = "-" if t["label_min"] is None else f"{t['label_min']}..{t['label_max']}"
    lines.append(
        f"total: {t['shards']} shards, {t['samples']} samples, {t['distinct_keys']} distinct keys "
        f"({t['repeated_keys']} repeated), {t['usable']} usable, labels {span} "
        f"(class spec: {t['num_classes_in_spec']} classes), {t['unreadable_shards']} unreadable "
        "shards"
    )
    for reason, count in t["problems"].items():
        lines.append(f"  {count:>9,} x {reason}")
    return "\n".join(lines)
