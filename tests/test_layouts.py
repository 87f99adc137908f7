"""Native layouts -> listings -> shards, without Ray: every image written or reported."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest

from cleaner.classes import ClassSpec
from cleaner.config import ConfigError, MakeShardsConfig, load_config
from cleaner.reading.ingest import class_spec_yaml, list_for
from cleaner.reading.shard_writer import (
    WriteOptions,
    encode_image,
    plan_shards,
    sample_key,
    write_shard,
)
from cleaner.reading.shards import read_shard
from tests.layout_trees import LAYOUT_TREES, image_bytes


def config(tree, out, *extra: str) -> MakeShardsConfig:
    return load_config(
        None, [*tree.overrides, f"input={tree.root}", f"output={out}", *extra], MakeShardsConfig
    )


def write_and_read(cfg: MakeShardsConfig):
    """List, write every planned shard in-process, read them back with the clean job's reader."""
    listing = list_for(cfg)
    plans = plan_shards(listing.entries, cfg.shard_size, cfg.split)
    records = [
        write_shard(
            p,
            root=cfg.input,
            output=cfg.output,
            class_names=listing.class_names,
            options=WriteOptions(resize=cfg.resize),
        )
        for p in plans
    ]
    rows: dict[str, list] = {"key": [], "label": [], "true_label": [], "status": []}
    metas = {}
    for record in records:
        path = f"{cfg.output}/{record['name']}"
        if not record["written"]:
            continue
        for batch in read_shard(
            path, class_names=listing.class_names, image_size=8, extensions=["jpg"]
        ):
            for k in rows:
                rows[k].extend(batch[k].tolist())
        with tarfile.open(path) as tar:
            for m in tar:
                if m.name.endswith(".json"):
                    metas[m.name[: -len(".json")]] = json.loads(tar.extractfile(m).read())
    return listing, records, rows, metas


@pytest.mark.parametrize("layout", sorted(LAYOUT_TREES))
def test_each_layout_gives_shards_the_reader_accepts(tmp_path, layout):
    tree = LAYOUT_TREES[layout](tmp_path / "data")
    cfg = config(tree, tmp_path / "shards", "shard_size=4")
    listing, records, rows, metas = write_and_read(cfg)
    assert len(listing.class_names) == tree.num_classes
    ClassSpec.from_yaml_text(class_spec_yaml(listing.class_names, layout))  # the jobs' format
    failures = sum(len(r["failures"]) for r in records)
    assert len(listing.problems) + failures == tree.bad, (listing.problems, records)
    assert all(p["reason"] for p in listing.problems)
    # every image is a usable sample with its label, and its path is kept in .json
    assert set(rows["status"]) == {"ok"}
    assert len(rows["key"]) == len(set(rows["key"])) == len(tree.images)
    by_path = {m["path"]: (k, m) for k, m in metas.items()}
    assert set(by_path) == set(tree.images)
    labels = dict(zip(rows["key"], rows["label"], strict=True))
    truths = dict(zip(rows["key"], rows["true_label"], strict=True))
    for path, label in tree.images.items():
        key, meta = by_path[path]
        assert labels[key] == label == meta["label"]
        assert meta["class"] == listing.class_names[label]
        assert truths[key] == tree.true_labels.get(path, -1)


def test_webvision_class_names_from_synsets_and_mini_subset(tmp_path):
    tree = LAYOUT_TREES["mini-webvision"](tmp_path / "wv")
    listing = list_for(config(tree, tmp_path / "o"))
    assert len(listing.class_names) == 50 and listing.class_names[0] == "name0"
    assert listing.class_names[3] == "name3 (n00000003)"
    assert listing.class_names[7] == "name3 (n00000007)"
    assert listing.excluded == 2  # google labels 50 and 59; the flickr list is not read
    assert all(e.path.startswith("google/") and e.label < 50 for e in listing.entries)


def test_keys_come_from_paths_and_stay_unique():
    assert sample_key("google/q0001/000001.jpg") == "google/q0001/000001"
    assert sample_key("dog/img.3.jpg") == "dog/img_3"
    plans = plan_shards(
        [type("E", (), {"path": p, "label": 0, "true_label": -1})() for p in ["a.jpg", "a.png"]],
        10,
        "train",
    )
    assert plans[0]["keys"] == ["a", "a_1"]


def test_reencode_only_when_needed():
    jpg = image_bytes(0, size=(300, 200))
    assert encode_image(jpg, WriteOptions()) == (jpg, False)
    assert encode_image(jpg, WriteOptions(resize=256)) == (jpg, False)  # shorter side 200
    small, changed = encode_image(jpg, WriteOptions(resize=100))
    import io

    from PIL import Image

    assert changed and Image.open(io.BytesIO(small)).size == (150, 100)
    png, changed = encode_image(image_bytes(0, "PNG"), WriteOptions())
    assert changed and png[:3] == b"\xff\xd8\xff"


def test_rewrite_is_skipped_when_the_record_matches(tmp_path):
    tree = LAYOUT_TREES["animal10n"](tmp_path / "a10n")
    cfg = config(tree, tmp_path / "shards", "shard_size=5")
    listing = list_for(cfg)
    plans = plan_shards(listing.entries, 5, "train")
    kwargs = {
        "root": cfg.input,
        "output": cfg.output,
        "class_names": listing.class_names,
        "options": WriteOptions(),
    }
    first = [write_shard(p, **kwargs) for p in plans]
    assert not any(r["skipped"] for r in first)
    data = (tmp_path / "shards" / plans[0]["name"]).read_bytes()
    again = [write_shard(p, **kwargs) for p in plans]
    assert all(r["skipped"] for r in again)
    (tmp_path / "shards" / plans[1]["name"]).unlink()  # an interrupted write
    third = [write_shard(p, **kwargs) for p in plans]
    assert [r["skipped"] for r in third] == [True, False, True]
    changed = write_shard(plans[0], **{**kwargs, "options": WriteOptions(resize=32)})
    assert not changed["skipped"]
    assert (tmp_path / "shards" / plans[0]["name"]).read_bytes() != data


def test_bad_options_are_config_errors(tmp_path):
    tree = LAYOUT_TREES["labellist"](tmp_path / "ll")
    with pytest.raises(ConfigError, match="label_list"):
        list_for(load_config(None, ["layout=labellist", "input=x", "output=y"], MakeShardsConfig))
    with pytest.raises(ConfigError, match="layout"):
        load_config(None, ["layout=cifar", "input=x", "output=y"], MakeShardsConfig)
    with pytest.raises(ConfigError, match="split must be train or test"):
        list_for(config(LAYOUT_TREES["animal10n"](tmp_path / "a"), tmp_path / "o", "split=val"))
    assert np.all(
        [
            p["reason"].startswith("bad label line") or "out of range" in p["reason"]
            for p in list_for(config(tree, tmp_path / "o")).problems
        ]
    )


def test_dry_run_lists_and_reports_without_writing(tmp_path, capsys):
    from jobs.make_shards import main

    tree = LAYOUT_TREES["labellist"](tmp_path / "ll")
    out = tmp_path / "never"
    assert main(["--dry-run", f"--input={tree.root}", f"--output={out}", *tree.overrides]) == 0
    printed = capsys.readouterr().out
    assert "labellist train: 10 images, 3 classes, 2 unusable list entries" in printed
    assert "bad label line" in printed and not out.exists()
