"""The checks' manifest columns, added to manifest rows after the selection (docs/checks.md).

    finish = ManifestChecks(results, conflicts_as_evidence=False)
    part = finish(part, first_row)      # any run of consecutive manifest rows

Columns (present in every manifest, null / false where a check is off or did not apply):
off_topic (bool), off_topic_score (posterior of the off-topic component), duplicate_group
(int64), duplicate_of (the representative's key; null for the representative),
duplicate_kind (exact / near), duplicate_label_conflict (bool: the group's labels differ),
test_duplicate_of (the test key a train sample duplicates) and test_duplicate_kind.
An off-topic sample gets status "off_topic", is not clean and has no suggested label.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cleaner.checks.search import CheckResults

STATUS_OFF_TOPIC = "off_topic"
SCORE_COLUMN = {"max_p": "max_p_zeroshot", "max_similarity": "max_similarity"}
CHECK_COLUMN_TYPES = {
    "off_topic": pa.bool_(),
    "off_topic_score": pa.float32(),
    "duplicate_group": pa.int64(),
    "duplicate_of": pa.string(),
    "duplicate_kind": pa.string(),
    "duplicate_label_conflict": pa.bool_(),
    "test_duplicate_of": pa.string(),
    "test_duplicate_kind": pa.string(),
}


def _window(rows: np.ndarray, first: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices into `rows` of the rows in [first, first + n), their offsets from first)."""
    lo, hi = np.searchsorted(rows, [first, first + n])
    picked = np.arange(lo, hi)
    return picked, rows[picked] - first


def _replace(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, values)


@dataclass
class ManifestChecks:
    """Adds the check columns to manifest rows; `first_row` is the rows' manifest row."""

    results: CheckResults | None
    conflicts_as_evidence: bool = False

    def __call__(self, table: pa.Table, first_row: int = 0) -> pa.Table:
        n = table.num_rows
        status = np.asarray(table.column("status").to_pylist(), dtype=object)
        usable = (status == "clean") | (status == "noisy")
        is_clean = table.column("is_clean").to_numpy(zero_copy_only=False).astype(bool)
        out: dict[str, np.ndarray] = {
            "off_topic": np.zeros(n, dtype=bool),
            "off_topic_score": np.full(n, np.nan, dtype=np.float32),
            "duplicate_group": np.full(n, None, dtype=object),
            "duplicate_of": np.full(n, None, dtype=object),
            "duplicate_kind": np.full(n, None, dtype=object),
            "duplicate_label_conflict": np.zeros(n, dtype=bool),
            "test_duplicate_of": np.full(n, None, dtype=object),
            "test_duplicate_kind": np.full(n, None, dtype=object),
        }
        results = self.results
        rule = results.off_topic if results is not None else None
        if rule is not None:
            values = pc.fill_null(table.column(SCORE_COLUMN[rule.score]), np.nan).to_numpy()
            out["off_topic_score"] = np.where(usable, rule.posterior(values), np.nan).astype(
                np.float32
            )
            out["off_topic"] = usable & rule.flag(values)
        found = results.duplicates if results is not None else None
        if found is not None:
            picked, at = _window(found.rows, first_row, n)
            out["duplicate_group"][at] = found.group[picked]
            representative = found.representative[picked]
            is_member = found.rows[picked] != representative
            out["duplicate_of"][at[is_member]] = [
                results.member_keys[int(r)] for r in representative[is_member]
            ]
            out["duplicate_kind"][at] = found.kind[picked]
            out["duplicate_label_conflict"][at] = results.conflict[picked]
            if self.conflicts_as_evidence:
                is_clean[at[results.contradicted[picked]]] = False
            picked, at = _window(found.leak_rows, first_row, n)
            out["test_duplicate_of"][at] = [
                results.test_keys[int(t)][0] for t in found.leak_test[picked]
            ]
            out["test_duplicate_kind"][at] = found.leak_kind[picked]
        off = out["off_topic"]
        demoted = (status == "clean") & ~is_clean  # by a label conflict: no suggestion
        is_clean &= ~off
        new_status = np.where(
            off, STATUS_OFF_TOPIC, np.where(usable, np.where(is_clean, "clean", "noisy"), status)
        )
        table = _replace(table, "status", pa.array(new_status.tolist(), pa.string()))
        table = _replace(table, "is_clean", pa.array(is_clean))
        suggested = table.column("suggested_label").to_numpy(zero_copy_only=False).copy()
        suggested[off | demoted] = -1
        names = np.asarray(table.column("suggested_name").to_pylist(), dtype=object)
        names[off | demoted] = None
        table = _replace(table, "suggested_label", pa.array(suggested))
        table = _replace(table, "suggested_name", pa.array(names.tolist(), pa.string()))
        for name, kind in CHECK_COLUMN_TYPES.items():
            values = out[name]
            array = pa.array(values.tolist() if values.dtype == object else values, kind)
            if name in table.column_names:
                table = _replace(table, name, array)
            else:
                table = table.append_column(pa.field(name, kind), array)
        return table


def checks_summary(results: CheckResults | None) -> dict:
    """summary.json's `checks`: counts and the fitted rule and threshold."""
    if results is None:
        return {"enabled": False}
    out: dict = {"figures": results.figures}
    found = results.duplicates
    if found is not None:
        members = found.rows != found.representative
        conflicting = np.unique(found.group[results.conflict]) if len(found.rows) else []
        out.update(
            duplicate_groups=found.num_groups,
            duplicates=int(members.sum()),
            exact_duplicates=int((members & (found.kind == "exact")).sum()),
            near_duplicates=int((members & (found.kind == "near")).sum()),
            groups_with_label_conflict=len(conflicting),
            test_duplicates=len(found.leak_rows),
        )
    return out
