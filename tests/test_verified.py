"""The verified-labels file of CleanNet: good files read, every bad case a one-line error."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cleaner.config import ConfigError, load_config
from cleaner.detectors.verified import check_known_keys, read_verified_file

NAMES = ["circle", "square", "triangle"]


def one_line_error(path, match: str) -> str:
    with pytest.raises(ConfigError, match=match) as info:
        read_verified_file(str(path), NAMES)
    message = str(info.value)
    assert "\n" not in message and message.startswith("selection.verified")
    return message


def test_csv_with_integers_and_names(tmp_path):
    path = tmp_path / "verified.csv"
    path.write_text("key,verified_label\na-001,0\na-002,square\n007,2\n")
    verified = read_verified_file(str(path), NAMES)
    assert verified.labels == {"a-001": 0, "a-002": 1, "007": 2}  # "007" stays a string key


def test_parquet_reads(tmp_path):
    path = tmp_path / "verified.parquet"
    pq.write_table(pa.table({"key": ["x", "y"], "verified_label": [2, 1], "note": ["", ""]}), path)
    assert read_verified_file(str(path), NAMES).labels == {"x": 2, "y": 1}


def test_missing_file(tmp_path):
    one_line_error(tmp_path / "absent.csv", "file not found")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("")
    one_line_error(path, "is empty")


def test_header_only_has_no_rows(tmp_path):
    path = tmp_path / "header.csv"
    path.write_text("key,verified_label\n")
    one_line_error(path, "has no rows")


def test_missing_column(tmp_path):
    path = tmp_path / "columns.csv"
    path.write_text("key,label\na,1\n")
    message = one_line_error(path, "lacks column")
    assert "verified_label" in message and "it has key, label" in message


def test_label_out_of_range(tmp_path):
    path = tmp_path / "range.csv"
    path.write_text("key,verified_label\na,0\nb,3\nc,-1\n")
    message = one_line_error(path, r"2 verified_label values are outside \[0, 3\)")
    assert "b=3" in message


def test_label_neither_integer_nor_class(tmp_path):
    path = tmp_path / "names.csv"
    path.write_text("key,verified_label\na,hexagon\n")
    one_line_error(path, "neither an integer nor a class name")


def test_conflicting_duplicate_keys(tmp_path):
    path = tmp_path / "twice.csv"
    path.write_text("key,verified_label\na,0\na,1\nb,2\nb,2\n")
    one_line_error(path, "1 keys are verified twice")


def test_unknown_keys(tmp_path):
    path = tmp_path / "unknown.csv"
    path.write_text("key,verified_label\na,0\nb,1\nghost,2\n")
    verified = read_verified_file(str(path), NAMES)
    check_known_keys(verified, {"a", "b", "ghost", "c"})  # all known: no error
    with pytest.raises(ConfigError, match=r"1 of 3 keys are in no input shard \(first: ghost\)"):
        check_known_keys(verified, {"a", "b"})


def test_cleannet_needs_a_verified_source():
    base = ["data.input=x", "data.classes=demo", "model.name=tiny-clip-shapes", "output=o"]
    with pytest.raises(ConfigError, match=r"detector=cleannet needs selection\.verified"):
        load_config(None, [*base, "selection.detector=cleannet"])
    cfg = load_config(None, [*base, "selection.detector=cleannet", "selection.verified=shards"])
    assert cfg.selection.detector == "cleannet"
    assert load_config(None, base).selection.detector == "clipcleaner"
