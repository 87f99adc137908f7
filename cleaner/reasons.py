"""Failure reasons as stable text, and grouping them into one line per distinct reason.

A reason must read the same for every sample that failed the same way, so that a million
corrupt images make one line in the summary and the report: object addresses
(`<_io.BytesIO object at 0x7fa4...>`) are removed before a reason is stored.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# `<_io.BytesIO object at 0x7fa47da51df0>`, `<PIL.Image ... at 0x...>`, bare `0x7fa4...`.
_OBJECT_REPR = re.compile(r"\s*<[^<>]*\bat 0x[0-9a-fA-F]+>")
_ADDRESS = re.compile(r"\b0x[0-9a-fA-F]{6,}\b")
MAX_REASON_LINES = 50
OTHER_REASONS = "other reasons"


def stable_reason(text: str) -> str:
    """The reason without object reprs or memory addresses, whitespace collapsed."""
    text = _OBJECT_REPR.sub("", str(text))
    text = _ADDRESS.sub("0x…", text)
    return " ".join(text.split())


def group_reasons(reasons: Iterable, max_lines: int = MAX_REASON_LINES) -> dict[str, int]:
    """{reason: count}, most frequent first; past `max_lines` the rest count as one line."""
    counts: dict[str, int] = {}
    for text in reasons:
        key = stable_reason(text or "") or "unknown"
        counts[key] = counts.get(key, 0) + 1
    ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    if len(ordered) <= max_lines:
        return dict(ordered)
    kept = dict(ordered[: max_lines - 1])
    rest = ordered[max_lines - 1 :]
    kept[f"{OTHER_REASONS} ({len(rest)} distinct)"] = sum(c for _, c in rest)
    return kept
