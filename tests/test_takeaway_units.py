"""The take-away parts without Ray: portable shard paths, the saved model, export plans and
relabelled members, reading unlabelled samples, and `cleaner.label_issues`."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image

import cleaner
from cleaner.classes import DEMO_CLASS_SPEC, ClassSpec
from cleaner.reading.export import (
    KEEP_LABEL,
    ExportSelection,
    plan_export,
    plan_fingerprint,
    relabelled_members,
)
from cleaner.reading.shard_roots import match_shards, relative_to_root, shard_root
from cleaner.reading.shards import RawSample, read_shard
from cleaner.selection.manifest import (
    ManifestWriter,
    manifest_file,
    read_manifest_for_report,
    read_shard_root,
    with_relative_shards,
)
from tests.conftest import jpeg, write_tar
from training.networks import build_network
from training.predict import ModelPredictor, PredictionCounts, predictions_table
from training.saved_model import Preprocessing, load_model, write_model


def test_shard_root_and_relative_paths(tmp_path):
    shards = [str(tmp_path / "a" / "x.tar"), str(tmp_path / "a" / "sub" / "y.tar")]
    assert shard_root(shards) == str(tmp_path / "a")
    assert [relative_to_root(s, str(tmp_path / "a")) for s in shards] == ["x.tar", "sub/y.tar"]
    s3 = ["s3://b/data/train/x.tar", "s3://b/data/val/y.tar"]
    assert shard_root(s3) == "s3://b/data"
    assert relative_to_root(s3[1], "s3://b/data") == "val/y.tar"
    assert shard_root(["s3://b1/x.tar", "s3://b2/y.tar"]) is None  # no common bucket
    assert shard_root([shards[0], s3[0]]) is None


def test_match_shards_finds_moved_shards_and_names_what_is_missing(tmp_path):
    recorded = ["x.tar", "sub/y.tar"]
    moved = [str(tmp_path / "new" / "x.tar"), str(tmp_path / "new" / "sub" / "y.tar")]
    extra = str(tmp_path / "new" / "z.tar")
    found = match_shards(recorded, "/old/root", [*moved, extra])
    assert found == {"x.tar": moved[0], "sub/y.tar": moved[1]}
    # on S3 now: the same relative paths under another prefix
    s3 = ["s3://bucket/p/x.tar", "s3://bucket/p/sub/y.tar"]
    assert match_shards(recorded, "/old/root", s3) == dict(zip(recorded, s3, strict=True))
    with pytest.raises(ValueError, match=r"not found: sub/y\.tar"):
        match_shards(recorded, "/old/root", [moved[0]])
    with pytest.raises(ValueError, match=r"found more than once: x\.tar"):
        match_shards(["x.tar"], "/old", [moved[0], str(tmp_path / "other" / "x.tar")])
    # an older manifest (absolute paths, no root): only the same location matches
    assert match_shards([moved[0]], None, moved) == {moved[0]: moved[0]}
    with pytest.raises(ValueError, match="not found"):
        match_shards(["/elsewhere/x.tar"], None, moved)


def test_a_saved_model_loads_and_predicts_as_the_network(tmp_path):
    torch.manual_seed(0)
    spec = ClassSpec.load(DEMO_CLASS_SPEC)
    network = build_network("tiny_cnn", spec.num_classes).eval()
    pre = Preprocessing(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    write_model(
        str(tmp_path / "m"),
        network.state_dict(),
        network="tiny_cnn",
        class_spec=spec,
        preprocessing=pre,
        run={"test_accuracy": 0.5},
    )
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "classes.yaml",
        "model.json",
        "model.safetensors",
    ]
    model = load_model(str(tmp_path / "m"))
    assert model.class_names == spec.names and model.info["run"]["test_accuracy"] == 0.5
    images = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    with torch.no_grad():
        expected = torch.softmax(
            network((torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25),
            dim=1,
        ).numpy()
    np.testing.assert_allclose(model.probabilities(images), expected, atol=1e-6)
    found = model.predict(images, top_k=3)
    assert np.array_equal(found.labels, expected.argmax(axis=1))
    assert found.top_labels.shape == (6, 3) and np.all(
        found.top_probs[:, :-1] >= found.top_probs[:, 1:]
    )
    # encoded bytes, PIL images, arrays of another size and paths are resized alike
    data = jpeg(size=(48, 40))
    (tmp_path / "a.jpg").write_bytes(data)
    as_pil = Image.open(io.BytesIO(data))
    batches = [
        model.preprocessing.batch(x)
        for x in ([data], [as_pil], [np.asarray(as_pil.convert("RGB"))], [str(tmp_path / "a.jpg")])
    ]
    assert all(b.shape == (1, 32, 32, 3) and np.array_equal(b, batches[0]) for b in batches)
    with pytest.raises(ValueError, match=r"uint8 \[N, 32, 32, 3\]"):
        model.predict(np.zeros((2, 16, 16, 3), dtype=np.uint8))
    info = json.loads((tmp_path / "m" / "model.json").read_text())
    (tmp_path / "m" / "model.json").write_text(json.dumps({**info, "format": "other"}))
    with pytest.raises(ValueError, match="not a clipcleaner-classifier"):
        load_model(str(tmp_path / "m"))
    with pytest.raises(FileNotFoundError, match="no trained model"):
        load_model(str(tmp_path / "nothing"))


def test_class_spec_round_trips_through_yaml():
    spec = ClassSpec.load(DEMO_CLASS_SPEC)
    assert ClassSpec.from_yaml_text(yaml.safe_dump(spec.to_dict())) == spec


def selection(shards, positions, relabel_to) -> ExportSelection:
    n = len(shards)
    return ExportSelection(
        shards=np.array(shards, dtype=object),
        positions=np.array(positions, dtype=np.int64),
        keys=np.array([f"k{i}" for i in range(n)], dtype=object),
        given=np.zeros(n, dtype=np.int64),
        relabel_to=np.array(relabel_to, dtype=np.int64),
        counts={},
    )


def test_export_plans_per_input_shard_or_by_size():
    rows = selection(["a", "a", "a", "b", "b"], [0, 2, 5, 1, 3], [KEEP_LABEL] * 4 + [3])
    where = {"a": "/now/a.tar", "b": "/now/b.tar"}
    per_shard = plan_export(rows, where, "clean", None)
    assert [p["name"] for p in per_shard] == ["clean-000000.tar", "clean-000001.tar"]
    assert [s["positions"] for p in per_shard for s in p["segments"]] == [[0, 2, 5], [1, 3]]
    assert per_shard[1]["segments"][0]["relabel_to"] == [KEEP_LABEL, 3]
    by_size = plan_export(rows, where, "clean", 2)
    assert [[(s["shard"], s["positions"]) for s in p["segments"]] for p in by_size] == [
        [("/now/a.tar", [0, 2])],
        [("/now/a.tar", [5]), ("/now/b.tar", [1])],
        [("/now/b.tar", [3])],
    ]
    # where the shards are read from does not change what a shard holds
    elsewhere = plan_export(rows, {"a": "s3://x/a.tar", "b": "s3://x/b.tar"}, "clean", 2)
    assert [plan_fingerprint(p) for p in elsewhere] == [plan_fingerprint(p) for p in by_size]
    assert plan_export(selection([], [], []), {}, "clean", None) == []


def test_relabelled_members_keep_the_given_label_in_the_json():
    sample = RawSample("d/k", {"jpg": b"img", "cls": b"2", "json": b'{"label": 2, "x": 1}'})
    sample.names = {"jpg": "d/k.JPG", "cls": "d/k.cls", "json": "d/k.json"}
    members = dict(relabelled_members(sample, given=2, label=7))
    assert members["d/k.JPG"] == b"img" and members["d/k.cls"] == b"7"
    assert json.loads(members["d/k.json"]) == {"label": 7, "given_label": 2, "x": 1}
    bare = RawSample("k", {"jpg": b"img", "cls": b"2"}, names={"jpg": "k.jpg", "cls": "k.cls"})
    assert json.loads(dict(relabelled_members(bare, 2, 5))["k.json"]) == {
        "label": 5,
        "given_label": 2,
    }


def test_unlabelled_samples_are_read_for_prediction(tmp_path):
    shard = write_tar(tmp_path / "s.tar", [("a.jpg", jpeg()), ("b.jpg", jpeg()), ("b.cls", b"1")])
    names = ["x", "y"]
    strict = next(read_shard(str(shard), class_names=names, image_size=8, extensions=["jpg"]))
    assert list(strict["status"]) == ["failed", "ok"]
    loose = next(
        read_shard(
            str(shard), class_names=names, image_size=8, extensions=["jpg"], require_label=False
        )
    )
    assert list(loose["status"]) == ["ok", "ok"] and list(loose["label"]) == [-1, 1]
    assert loose["image"][0].any()  # decoded


def noisy_problem(n=600, k=6, seed=0):
    rng = np.random.default_rng(seed)
    true = rng.integers(0, k, n)
    labels = true.copy()
    flip = rng.random(n) < 0.3
    labels[flip] = (true[flip] + rng.integers(1, k, flip.sum())) % k
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), true] += 3.0
    zero_shot = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    probe_logits = logits + rng.normal(scale=0.5, size=(n, k))
    probe = np.exp(probe_logits) / np.exp(probe_logits).sum(axis=1, keepdims=True)
    return labels, true, zero_shot, probe


@pytest.mark.parametrize("with_probe", [False, True])
def test_label_issues_agree_with_select_clean_and_rank_the_wrong_labels_first(with_probe):
    labels, true, zero_shot, probe = noisy_problem()
    probe = probe if with_probe else None
    issues = cleaner.label_issues(labels, zero_shot, probe, theta_cons=0.7)
    assert list(issues.columns) == [
        "is_label_issue",
        "label_quality",
        "given_label",
        "suggested_label",
        "suggested_confidence",
    ]
    by_sample = issues.sort_index()
    mask = cleaner.select_clean(labels, zero_shot, probe, theta_cons=0.7)
    assert np.array_equal(by_sample["is_label_issue"].to_numpy(), ~mask)
    result = cleaner.select_clean_result(labels, zero_shot, probe, theta_cons=0.7)
    np.testing.assert_array_equal(by_sample["label_quality"], result.clean_score)
    assert np.array_equal(by_sample["given_label"], labels)
    top = issues.head(100)
    assert (labels[top.index] != true[top.index]).mean() > 0.9  # the worst really are wrong
    assert top["is_label_issue"].all() and top["label_quality"].is_monotonic_increasing
    flagged = by_sample[by_sample["is_label_issue"] & (by_sample["suggested_label"] >= 0)]
    assert (flagged["suggested_label"] == true[flagged.index]).mean() > 0.9
    assert (by_sample.loc[mask, "suggested_label"] == labels[mask]).all()
    combined = zero_shot if probe is None else 0.5 * (zero_shot + probe)
    np.testing.assert_allclose(by_sample["suggested_confidence"], combined.max(axis=1))
    unsure = ~mask & (combined.max(axis=1) < 0.5)
    assert (by_sample.loc[unsure, "suggested_label"] == -1).all()


def test_label_issues_rejects_bad_input():
    labels, _, zero_shot, _ = noisy_problem(n=50)
    with pytest.raises(ValueError, match="suggest_min_confidence"):
        cleaner.label_issues(labels, zero_shot, suggest_min_confidence=1.5)
    with pytest.raises(ValueError, match="labels"):
        cleaner.label_issues(labels[:-1], zero_shot)


def test_the_predictor_keeps_failed_rows_and_counts_complete_shards(tmp_path):
    torch.manual_seed(1)
    spec = ClassSpec.load(DEMO_CLASS_SPEC)
    network = build_network("tiny_cnn", spec.num_classes)
    pre = Preprocessing(image_size=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    write_model(
        str(tmp_path / "m"),
        network.state_dict(),
        network="tiny_cnn",
        class_spec=spec,
        preprocessing=pre,
    )
    predictor = ModelPredictor(str(tmp_path / "m"), top_k=3, amp="auto")
    images = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    batch = {
        "key": np.array(["a", "b", "c"], dtype=object),
        "shard": np.array(["s1", "s1", "s2"], dtype=object),
        "shard_pos": np.array([0, 1, 0]),
        "status": np.array(["ok", "failed", "ok"], dtype=object),
        "reason": np.array(["", "image decode error: x", ""], dtype=object),
        "shard_total": np.array([-1, 2, 1]),
        "label": np.array([4, -1, -1]),
        "image": images,
    }
    out = predictor(batch)
    expected = predictor.model.predict(images[[0, 2]], top_k=3)
    assert list(out["predicted_label"]) == [expected.labels[0], -1, expected.labels[1]]
    table = predictions_table(out, spec.names).to_pydict()
    assert table["predicted_name"][1] is None and table["given_name"] == ["triangle", None, None]
    assert table["top_labels"][1] == [-1, -1, -1] and len(table["top_probs"][0]) == 3
    counts = PredictionCounts()
    assert counts.add(out) == 2  # both shards complete
    summary = counts.as_dict()
    assert summary["failed_by_reason"] == {"image decode error: x": 1}
    assert summary["with_given_label"] == 1
    assert summary["accuracy_vs_given_labels"] == float(expected.labels[0] == 4)


def test_manifest_parts_record_their_root_once(tmp_path):
    root = str(tmp_path / "in")
    parts = [
        pa.table({"key": ["a", "b"], "shard": [f"{root}/x.tar", f"{root}/x.tar"]}),
        pa.table({"key": ["c"], "shard": [f"{root}/sub/y.tar"]}),
    ]
    target = str(tmp_path / "run" / "manifest.parquet")
    with ManifestWriter(target) as writer:
        for part in parts:
            writer.write(with_relative_shards(part, root))
    assert pq.read_table(target).column("shard").to_pylist() == ["x.tar", "x.tar", "sub/y.tar"]
    assert read_shard_root(target) == root
    assert manifest_file(str(tmp_path / "run")) == target
    old = str(tmp_path / "old.parquet")
    pq.write_table(with_relative_shards(parts[1], None), old)  # no root: paths as they were
    assert read_shard_root(old) is None


def test_a_failed_manifest_write_leaves_nothing_and_the_report_reads_scalar_columns(tmp_path):
    target = tmp_path / "run" / "manifest.parquet"
    with pytest.raises(RuntimeError, match="mid-write"), ManifestWriter(str(target)) as writer:
        writer.write(pa.table({"key": ["a"]}))
        raise RuntimeError("mid-write")
    assert not target.exists() and list(target.parent.iterdir()) == []  # no temp file either
    embedding = pa.FixedSizeListArray.from_arrays(pa.array([0.5, 0.5, 1.0, 0.0], pa.float32()), 2)
    table = pa.table({"key": ["a", "b"], "label": [1, 0], "embedding": embedding,
                      "prompts": pa.array([[1], [2, 3]])})  # fmt: skip
    with ManifestWriter(str(target)) as writer:
        writer.write(table.slice(0, 1))
        writer.write(table.slice(1, 1))
    assert list(target.parent.iterdir()) == [target]
    assert pq.read_table(target).equals(table)
    report = read_manifest_for_report(str(target))
    assert report.column_names == ["key", "label"] and report.num_rows == 2


def test_file_versions_change_when_a_file_is_rewritten_in_place(tmp_path):
    from cleaner.reading import uri as uri_lib

    path = tmp_path / "a.tar"
    path.write_bytes(b"x" * 10)
    first = uri_lib.file_versions([str(path)])[str(path)]
    assert first.startswith("10:")
    assert uri_lib.file_versions([str(path)])[str(path)] == first  # unchanged: the same
    os.utime(path, ns=(1, 1))
    assert uri_lib.file_versions([str(path)])[str(path)] == "10:1"
    with pytest.raises(FileNotFoundError, match="not a file"):
        uri_lib.file_versions([str(tmp_path / "missing.tar")])


def test_a_finished_run_is_not_up_to_date_once_a_shard_is_rewritten(tmp_path):
    """jobs.clean's "nothing to do" check covers the shards' versions, not only names."""
    from jobs.clean import finished_run_fingerprint
    from tests.conftest import clean_config

    shard = tmp_path / "train-000000.tar"
    shard.write_bytes(b"x" * 10)
    cfg = clean_config(str(tmp_path), str(tmp_path / "run"))
    spec = ClassSpec.load(DEMO_CLASS_SPEC)
    before = finished_run_fingerprint(cfg, [str(shard)], spec)
    assert finished_run_fingerprint(cfg, [str(shard)], spec) == before
    os.utime(shard, ns=(1, 1))
    assert finished_run_fingerprint(cfg, [str(shard)], spec) != before
