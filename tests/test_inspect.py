"""jobs.inspect_shards: counts per shard before a long run, without decoding images."""

from __future__ import annotations

import json

from cleaner.reading.inspect import inspect_shards
from jobs.inspect_shards import main
from tests.conftest import jpeg, write_tar

CLASSES = ["circle", "square", "star"]


def _shards(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    write_tar(
        folder / "a-000000.tar",
        [("./k0.jpg", jpeg()), ("./k0.cls", b"0"), ("./k1.jpg", jpeg()), ("./k1.cls", b"star")],
    )
    write_tar(
        folder / "a-000001.tar",
        [
            ("k2.jpg", jpeg()),
            ("k2.cls", b"7"),
            ("k3.cls", b"1"),
            ("k0.jpg", jpeg()),
            ("k0.cls", b"1"),
        ],
    )
    whole = write_tar(tmp_path / "whole.tar", [("k9.jpg", jpeg(size=(300, 300))), ("k9.cls", b"1")])
    (folder / "a-000002.tar").write_bytes(whole.read_bytes()[:2000])
    (folder / "classes.yaml").write_text("classes: [circle, square, star]\n")
    return folder


def test_counts_per_shard_and_totals(tmp_path):
    folder = _shards(tmp_path)
    result = inspect_shards(sorted(str(p) for p in folder.glob("*.tar")), CLASSES)
    first, second, cut = result["shards"]
    assert (first["samples"], first["keys"], first["usable"]) == (2, 2, 2)
    assert (first["label_min"], first["label_max"], first["classes"]) == (0, 2, 2)
    assert (second["samples"], second["usable"], second["label_max"]) == (3, 1, 7)
    assert second["problems"] == {
        "label 7 out of range [0, 3)": 1,
        "no image member (expected one of jpg, jpeg, png, webp, bmp)": 1,
    }
    assert cut["error"] and cut["samples"] == 0
    totals = result["totals"]
    assert (totals["samples"], totals["distinct_keys"], totals["repeated_keys"]) == (5, 4, 1)
    assert (totals["label_min"], totals["label_max"], totals["unreadable_shards"]) == (0, 7, 1)


def test_command_line_prints_a_table_and_fails_on_problems(tmp_path, capsys):
    folder = _shards(tmp_path)
    assert main([str(folder), "--json", str(tmp_path / "r.json")]) == 1
    out = capsys.readouterr().out
    assert "a-000001.tar" in out and "0..7" in out and "UNREADABLE" in out
    assert json.loads((tmp_path / "r.json").read_text())["totals"]["samples"] == 5
    good = tmp_path / "good"
    good.mkdir()
    (folder / "a-000000.tar").rename(good / "a-000000.tar")
    assert main([str(good / "a-000000.tar"), "--classes", str(folder / "classes.yaml")]) == 0
