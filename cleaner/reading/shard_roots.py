"""Portable shard paths: a shard named relative to the folder its input came from.

The clean job records its shards relative to one input root (the deepest folder or S3
prefix that holds them all), so that a manifest still names the right shards after they
were moved, copied to S3 or mounted elsewhere. Whoever reads the manifest then finds each
shard among the shards it was given now (`match_shards`): first at the recorded root, else
as the one shard whose path ends with the recorded relative path.
"""

from __future__ import annotations

import os
import posixpath
from collections import defaultdict

from cleaner.reading import uri as uri_lib


def normalised(uri: str) -> str:
    """One spelling per location: absolute local paths (no file://), s3:// without a
    trailing slash."""
    if uri_lib.is_s3(uri):
        return uri.rstrip("/")
    return os.path.abspath(uri.removeprefix("file://"))


def shard_root(shards: list[str]) -> str | None:
    """The deepest folder (or S3 prefix) holding every shard; None when they share none
    (local and S3 shards mixed, or several buckets): then paths stay absolute."""
    paths = [normalised(s) for s in shards]
    if not paths:
        return None
    if all(uri_lib.is_s3(p) for p in paths):
        parents = [p[len("s3://") :].split("/")[:-1] for p in paths]
        common = parents[0]
        for parts in parents[1:]:
            size = 0
            while size < min(len(common), len(parts)) and common[size] == parts[size]:
                size += 1
            common = common[:size]
        return "s3://" + "/".join(common) if common else None
    if any(uri_lib.is_s3(p) for p in paths):
        return None
    return os.path.commonpath([os.path.dirname(p) for p in paths])


def relative_to_root(shard: str, root: str | None) -> str:
    """The shard's path below root, with '/' separators (the shard itself when root is None)."""
    if root is None:
        return shard
    path = normalised(shard)
    if uri_lib.is_s3(root):
        return path[len(root) + 1 :]
    return os.path.relpath(path, root).replace(os.sep, "/")


def absolute_shard(recorded: str, root: str | None) -> str:
    """A recorded shard path as a URI: joined to its root, or as it is (no root recorded)."""
    return recorded if root is None else uri_lib.join(root, recorded)


def match_shards(recorded: list[str], root: str | None, available: list[str]) -> dict[str, str]:
    """recorded path -> the shard of `available` it names.

    With a root, a recorded path names the shard at root/path when `available` has it,
    else the one shard of `available` whose path ends with /path. Without a root (an older
    manifest of absolute paths) only the same location matches. Raises ValueError naming
    the shards not found, or found more than once.
    """
    by_location = {normalised(s): s for s in available}
    found: dict[str, str] = {}
    missing: list[str] = []
    ambiguous: list[str] = []
    by_tail: dict[int, dict[str, list[str]]] = {}
    for path in recorded:
        location = normalised(absolute_shard(path, root))
        if location in by_location:
            found[path] = by_location[location]
            continue
        if root is None:
            missing.append(path)
            continue
        depth = path.count("/") + 1
        if depth not in by_tail:
            tails: dict[str, list[str]] = defaultdict(list)
            for norm, shard in by_location.items():
                parts = norm.split("/")
                if len(parts) > depth:
                    tails["/".join(parts[-depth:])].append(shard)
            by_tail[depth] = tails
        candidates = by_tail[depth].get(posixpath.normpath(path), [])
        if len(candidates) == 1:
            found[path] = candidates[0]
        elif candidates:
            ambiguous.append(f"{path} ({', '.join(candidates[:2])})")
        else:
            missing.append(path)
    if missing or ambiguous:
        problems = []
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            problems.append(f"not found: {', '.join(missing[:3])}{more}")
        if ambiguous:
            problems.append(f"found more than once: {'; '.join(ambiguous[:3])}")
        where = f" (recorded relative to {root})" if root else ""
        raise ValueError(
            f"the manifest's shards{where} are not all among the shards given: "
            f"{'; '.join(problems)}"
        )
    return found
