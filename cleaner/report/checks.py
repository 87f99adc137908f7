"""The report's sections of the embedding checks (docs/checks.md): the most confident
off-topic samples, the duplicate groups whose labels conflict (thumbnails side by side)
and the train samples that duplicate a test sample."""

from __future__ import annotations

import html
from collections.abc import Mapping

import numpy as np
import pyarrow as pa

from cleaner.report.common import (
    _fmt,
    _get,
    _is_number,
    _note,
    _numeric,
    _prob,
    _section,
    _table,
    _take_column,
)
from cleaner.report.tables import _thumbnail_tag

MAX_OFF_TOPIC_ROWS = 30
MAX_CONFLICT_GROUPS = 20
MAX_GROUP_MEMBERS = 8
MAX_LEAK_ROWS = 30


def _column(manifest: pa.Table, name: str) -> list:
    return manifest.column(name).to_pylist() if name in manifest.column_names else []


def top_off_topic(manifest: pa.Table, n: int = MAX_OFF_TOPIC_ROWS) -> np.ndarray:
    """Rows flagged off-topic, the most confident (highest off_topic_score) first."""
    flags = _numeric(manifest, "off_topic", False, bool)
    if flags is None:
        return np.zeros(0, dtype=np.int64)
    rows = np.nonzero(flags)[0]
    score = _numeric(manifest, "off_topic_score", 0.0, np.float64)
    return rows[np.lexsort((rows, -score[rows]))][:n]


def conflict_groups(manifest: pa.Table, n: int = MAX_CONFLICT_GROUPS) -> list[np.ndarray]:
    """Rows of the first n duplicate groups whose labels conflict (largest first)."""
    conflict = _numeric(manifest, "duplicate_label_conflict", False, bool)
    if conflict is None or not conflict.any():
        return []
    rows = np.nonzero(conflict)[0]
    groups = _numeric(manifest, "duplicate_group", -1, np.int64)[rows]
    ids, sizes = np.unique(groups, return_counts=True)
    chosen = ids[np.lexsort((ids, -sizes))][:n]
    return [rows[groups == g][:MAX_GROUP_MEMBERS] for g in chosen]


def leak_rows(manifest: pa.Table, n: int = MAX_LEAK_ROWS) -> np.ndarray:
    if "test_duplicate_of" not in manifest.column_names:
        return np.zeros(0, dtype=np.int64)
    valid = manifest.column("test_duplicate_of").is_valid().to_numpy(zero_copy_only=False)
    return np.nonzero(valid)[0][:n]


def checks_thumbnail_keys(manifest: pa.Table) -> list[str]:
    """Keys of the train samples these sections show (fetch their thumbnails)."""
    rows = [top_off_topic(manifest), leak_rows(manifest), *conflict_groups(manifest)]
    picked = np.unique(np.concatenate(rows)) if rows else np.zeros(0, np.int64)
    return [str(k) for k in _take_column(manifest, "key", picked)]


def _names(manifest: pa.Table, rows: np.ndarray, column: str) -> list[str]:
    return [
        html.escape(str(v)) if v is not None else _fmt(None)
        for v in _take_column(manifest, column, rows)
    ]


def section_off_topic(manifest: pa.Table, summary: Mapping, thumbnails: Mapping[str, bytes]) -> str:
    rows = top_off_topic(manifest)
    flags = _numeric(manifest, "off_topic", False, bool)
    total = int(flags.sum()) if flags is not None else 0
    rule = _get(summary, "checks", "figures", "off_topic_rule")
    notes = []
    pairs = [_get(rule, "means"), _get(rule, "weights")]
    well_formed = _is_number(_get(rule, "separation")) and all(
        isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_number(x) for x in v)
        for v in pairs
    )
    if well_formed:
        state = (
            "active" if rule.get("active") else "inactive (no separate low mode: nothing flagged)"
        )
        notes.append(
            _note(
                f"Rule: a 2-component mixture over {rule.get('score')}, fitted on this run; "
                f"components at {rule['means'][0]:.3f} and {rule['means'][1]:.3f}, weight of the "
                f"low one {rule['weights'][0]:.3f}, separation {rule['separation']:.2f}: {state}."
            )
        )
    if len(rows) == 0:
        return _section("off-topic", *notes, _note("No sample was flagged off-topic."))
    keys = [str(k) for k in _take_column(manifest, "key", rows)]
    scores = _take_column(manifest, "off_topic_score", rows)
    table_rows = [
        [_thumbnail_tag(thumbnails.get(k), k), html.escape(k), label, _prob(s)]
        for k, label, s in zip(keys, _names(manifest, rows, "label_name"), scores, strict=True)
    ]
    notes.append(_note(f"The {len(rows)} most confident of {total:,} off-topic samples."))
    return _section(
        "off-topic",
        *notes,
        _table(
            ["thumbnail", "key", "given label", "off-topic score"],
            table_rows,
            [False, False, False, True],
        ),
    )


def section_conflicts(manifest: pa.Table, summary: Mapping, thumbnails: Mapping[str, bytes]) -> str:
    groups = conflict_groups(manifest)
    checks = _get(summary, "checks")
    checks = checks if isinstance(checks, Mapping) else {}
    figures = [
        f"{checks[k]:,} {k.replace('_', ' ')}"
        for k in (
            "duplicate_groups",
            "exact_duplicates",
            "near_duplicates",
            "groups_with_label_conflict",
        )
        if isinstance(checks.get(k), int)
    ]
    threshold = _get(checks, "figures", "near_threshold")
    intro = _note(
        ("; ".join(figures) + ". " if figures else "")
        + (f"Near duplicates: cosine >= {threshold:.4f}. " if isinstance(threshold, float) else "")
        + "Each row is one group whose members carry different labels."
    )
    if not groups:
        return _section("conflicts", intro, _note("No duplicate group has conflicting labels."))
    body = []
    for rows in groups:
        keys = [str(k) for k in _take_column(manifest, "key", rows)]
        labels = _names(manifest, rows, "label_name")
        kinds = _take_column(manifest, "duplicate_kind", rows)
        cells = "".join(
            f'<td>{_thumbnail_tag(thumbnails.get(k), k)}<div class="note">{html.escape(k)}<br>'
            f"<b>{label}</b> ({html.escape(str(kind))})</div></td>"
            for k, label, kind in zip(keys, labels, kinds, strict=True)
        )
        group = _take_column(manifest, "duplicate_group", rows[:1])[0]
        body.append(f"<tr><th>group {_fmt(group)}</th>{cells}</tr>")
    return _section("conflicts", intro, f"<table><tbody>{''.join(body)}</tbody></table>")


def section_leaks(
    manifest: pa.Table,
    summary: Mapping,
    thumbnails: Mapping[str, bytes],
    test_thumbnails: Mapping[str, bytes],
) -> str:
    rows = leak_rows(manifest)
    count = _get(summary, "checks", "test_duplicates")
    input_ = _get(summary, "config", "data", "test_input")
    if not input_:
        return _section("leaks", _note("No test set given (data.test_input): not checked."))
    if len(rows) == 0:
        return _section("leaks", _note("No train sample duplicates a test sample."))
    keys = [str(k) for k in _take_column(manifest, "key", rows)]
    tests = [str(k) for k in _take_column(manifest, "test_duplicate_of", rows)]
    kinds = _take_column(manifest, "test_duplicate_kind", rows)
    table_rows = [
        [
            _thumbnail_tag(thumbnails.get(k), k),
            _thumbnail_tag(test_thumbnails.get(t), t),
            html.escape(k),
            html.escape(t),
            html.escape(str(kind)),
        ]
        for k, t, kind in zip(keys, tests, kinds, strict=True)
    ]
    total = count if isinstance(count, int) else len(rows)
    return _section(
        "leaks",
        _note(f"{total:,} train samples duplicate a test sample; the first {len(rows)}:"),
        _table(["train", "test", "train key", "test key", "kind"], table_rows, [False] * 5),
    )
