"""Human-verified labels for CleanNet: a CSV or Parquet file of `key, verified_label`.

    verified = read_verified_file("s3://bucket/audit.csv", class_names)

`verified_label` is the label a person checked: an integer in [0, K) or a class name.
Every problem with the file is a `ConfigError` with one line naming it (the clean job
exits 2): missing file, unreadable format, missing columns, no rows, labels out of range,
one key verified twice with different labels. Keys that are in no input shard can only
be found once the shards are read: `check_known_keys` reports them the same way.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from cleaner.config import ConfigError
from cleaner.reading import uri as uri_lib

REQUIRED_COLUMNS = ("key", "verified_label")
SHARDS = "shards"  # selection.verified=shards: the true labels the shards carry
SHOWN = 3  # examples named in an error


@dataclass(frozen=True)
class VerifiedLabels:
    """Verified labels by sample key (a few bytes per verified sample)."""

    source: str
    labels: dict[str, int]

    def __len__(self) -> int:
        return len(self.labels)

    def keys(self) -> set[str]:
        return set(self.labels)


def _read_table(location: str) -> pa.Table:
    try:
        data = uri_lib.read_bytes(location)
    except FileNotFoundError:
        raise ConfigError(f"selection.verified: file not found: {location}") from None
    except OSError as err:
        raise ConfigError(f"selection.verified: cannot read {location}: {err}") from None
    if location.lower().endswith((".parquet", ".pq")):
        import pyarrow.parquet as pq

        try:
            return pq.read_table(io.BytesIO(data))
        except (pa.ArrowInvalid, OSError) as err:
            raise ConfigError(f"selection.verified: {location} is not Parquet: {err}") from None
    if not data.strip():
        raise ConfigError(f"selection.verified: {location} is empty (no header, no rows)")
    import pyarrow.csv as pacsv

    try:
        return pacsv.read_csv(
            io.BytesIO(data),
            convert_options=pacsv.ConvertOptions(column_types={"key": pa.string()}),
        )
    except pa.ArrowInvalid as err:
        first = str(err).splitlines()[0]
        raise ConfigError(
            f"selection.verified: {location} is not a readable CSV: {first}"
        ) from None


def _label_values(column: pa.ChunkedArray, class_names: list[str], location: str) -> np.ndarray:
    """int64 labels from integer labels or class names; -1 where neither (reported later)."""
    values = column.to_pylist()
    index = {name: i for i, name in enumerate(class_names)}
    out = np.full(len(values), -1, dtype=np.int64)
    bad: list[str] = []
    for i, value in enumerate(values):
        if (isinstance(value, (int, np.integer)) and not isinstance(value, bool)) or (
            isinstance(value, float) and value.is_integer()
        ):
            out[i] = int(value)
        elif isinstance(value, str) and value.strip() in index:
            out[i] = index[value.strip()]
        elif isinstance(value, str) and value.strip().lstrip("-").isdigit():
            out[i] = int(value.strip())
        else:
            bad.append(repr(value))
    if bad:
        raise ConfigError(
            f"selection.verified: {location}: {len(bad)} verified_label values are neither "
            f"an integer nor a class name (first: {', '.join(bad[:SHOWN])})"
        )
    return out


def parse_verified_table(table: pa.Table, class_names: list[str], location: str) -> VerifiedLabels:
    """Validate a `key, verified_label` table (see the module docstring for the checks)."""
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise ConfigError(
            f"selection.verified: {location} lacks column(s) {', '.join(missing)} "
            f"(it needs {', '.join(REQUIRED_COLUMNS)}; it has {', '.join(table.column_names)})"
        )
    if table.num_rows == 0:
        raise ConfigError(f"selection.verified: {location} has no rows")
    keys = table.column("key").cast(pa.string()).to_pylist()
    if any(k is None or not str(k).strip() for k in keys):
        raise ConfigError(f"selection.verified: {location} has rows with an empty key")
    labels = _label_values(table.column("verified_label"), class_names, location)
    k = len(class_names)
    outside = np.flatnonzero((labels < 0) | (labels >= k))
    if outside.size:
        shown = ", ".join(f"{keys[i]}={labels[i]}" for i in outside[:SHOWN])
        raise ConfigError(
            f"selection.verified: {location}: {outside.size} verified_label values are "
            f"outside [0, {k}) (first: {shown})"
        )
    by_key: dict[str, int] = {}
    conflicts: list[str] = []
    for key, label in zip(keys, labels.tolist(), strict=True):
        previous = by_key.setdefault(str(key), label)
        if previous != label:
            conflicts.append(str(key))
    if conflicts:
        raise ConfigError(
            f"selection.verified: {location}: {len(conflicts)} keys are verified twice with "
            f"different labels (first: {', '.join(conflicts[:SHOWN])})"
        )
    return VerifiedLabels(location, by_key)


def read_verified_file(location: str, class_names: list[str]) -> VerifiedLabels:
    """The verified labels of a CSV or Parquet file (local, file:// or s3://)."""
    return parse_verified_table(_read_table(location), class_names, location)


def check_known_keys(verified: VerifiedLabels, found: set[str]) -> None:
    """ConfigError when verified keys are in no input shard (`found`: the keys seen)."""
    unknown = sorted(verified.keys() - found)
    if unknown:
        raise ConfigError(
            f"selection.verified: {verified.source}: {len(unknown)} of {len(verified)} keys "
            f"are in no input shard (first: {', '.join(unknown[:SHOWN])})"
        )
