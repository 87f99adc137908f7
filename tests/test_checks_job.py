"""The embedding checks in the clean job (one small run on a local Ray): byte-identical
copies grouped as exact duplicates, a label conflict listed, test images copied into
train flagged with their test key, off-topic samples neither clean nor suggested."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from cleaner.checks.manifest_columns import CHECK_COLUMN_TYPES
from cleaner.demo.contamination import write_contamination
from cleaner.demo.dataset import write_demo_shards
from jobs.clean import run_clean
from tests.conftest import clean_config

pytestmark = pytest.mark.integration


def test_clean_job_flags_duplicates_conflicts_leaks_and_off_topic(local_ray, tmp_path):
    train, test = tmp_path / "data" / "train", tmp_path / "data" / "test"
    write_demo_shards(train, 200, samples_per_shard=100, noise_rate=0.4, seed=3)
    write_demo_shards(test, 60, samples_per_shard=60, noise="none", noise_rate=0.0, seed=4)
    truth = write_contamination(train, test, off_topic=6, exact=8, leaks=6, seed=3)["samples"]
    out = tmp_path / "run"
    summary = run_clean(clean_config(str(train), str(out), f"data.test_input={test}"))
    manifest = pq.read_table(out / "manifest.parquet").to_pydict()
    assert set(CHECK_COLUMN_TYPES) <= set(manifest)
    row = {k: i for i, k in enumerate(manifest["key"])}
    conflicts = 0
    for sample in (t for t in truth if t["kind"] == "exact"):
        a, b = row[sample["key"]], row[sample["source"]]
        assert manifest["duplicate_group"][a] == manifest["duplicate_group"][b] is not None
        assert manifest["duplicate_kind"][a] == manifest["duplicate_kind"][b] == "exact"
        # one of the two is the group's representative, the other points at it
        assert {manifest["duplicate_of"][a], manifest["duplicate_of"][b]} in (
            {None, sample["key"]},
            {None, sample["source"]},
        )
        differ = manifest["label"][a] != manifest["label"][b]
        conflicts += differ
        if differ:
            assert (
                manifest["duplicate_label_conflict"][a] and manifest["duplicate_label_conflict"][b]
            )
    assert conflicts >= 1  # the seed gives copies relabelled at the 40% noise rate
    for sample in (t for t in truth if t["kind"] == "leak" and t["edit"] is None):
        assert manifest["test_duplicate_of"][row[sample["key"]]] == sample["test_key"]
        assert manifest["test_duplicate_kind"][row[sample["key"]]] == "exact"
    checks = summary["checks"]
    assert checks["test_duplicates"] >= 3 and checks["groups_with_label_conflict"] >= 1
    assert checks["exact_duplicates"] >= 8
    status = np.asarray(manifest["status"])
    assert set(status) <= {"clean", "noisy", "off_topic"}
    off = status == "off_topic"
    assert summary["counts"]["off_topic"] == int(off.sum())
    assert not np.asarray(manifest["is_clean"])[off].any()
    assert (np.asarray(manifest["suggested_label"])[off] == -1).all()
    assert (np.asarray(manifest["off_topic"]) == off).all()
    report = (out / "report.html").read_text()
    for section in ("off-topic", "conflicts", "leaks"):
        assert f'<section id="{section}">' in report
    assert report.count("data:image/") >= 2 * 3  # leak pairs shown side by side
    assert json.loads((out / "summary.json").read_text())["checks"] == json.loads(
        json.dumps(checks, default=str)
    )
