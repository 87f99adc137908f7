"""The demo dataset: shape generator, shard writer (read back two ways) and the CLI."""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cleaner.classes import DEMO_CLASS_SPEC, ClassSpec
from cleaner.demo.dataset import MANIFEST_NAME, read_manifest, write_demo_shards
from cleaner.demo.shapes import SHAPE_CLASSES, draw_shape, generate_images
from jobs.make_demo_data import main as make_demo_data

NUM_SAMPLES = 50
PER_SHARD = 20
IMAGE_SIZE = 32
KEY_PATTERN = re.compile(r"shapes-(\d{6})-(\d{6})")


def read_tar_samples(shard: Path) -> list[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per sample, grouping consecutive members as webdataset does."""
    samples: list[tuple[str, dict[str, bytes]]] = []
    with tarfile.open(shard) as tar:
        for member in tar:
            key, _, extension = member.name.partition(".")
            data = tar.extractfile(member).read()
            if not samples or samples[-1][0] != key:
                samples.append((key, {}))
            assert extension not in samples[-1][1], f"{member.name} repeated"
            samples[-1][1][extension] = data
    return samples


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[Path, list[Path]]:
    out = tmp_path_factory.mktemp("demo") / "train"
    shards = write_demo_shards(
        out,
        NUM_SAMPLES,
        samples_per_shard=PER_SHARD,
        noise_rate=0.5,
        seed=11,
        image_size=IMAGE_SIZE,
    )
    return out, shards


# ---------------------------------------------------------------------------------------------
# Generator
# ---------------------------------------------------------------------------------------------


def test_shape_classes_follow_the_class_spec():
    assert ClassSpec.load(DEMO_CLASS_SPEC).names == list(SHAPE_CLASSES)


@pytest.mark.parametrize("class_name", SHAPE_CLASSES)
@pytest.mark.parametrize("size", [32, 64])
def test_draw_shape_every_class(class_name, size):
    image, attrs = draw_shape(class_name, np.random.default_rng(0), size)
    assert image.mode == "RGB"
    assert image.size == (size, size)
    assert set(attrs) == {"colour", "background"}
    assert attrs["background"].endswith("background")
    # The shape is visible: the image is not a flat background.
    assert np.asarray(image).std() > 5


def test_draw_shape_is_deterministic_and_varied():
    first, attrs1 = draw_shape("star", np.random.default_rng(42))
    second, attrs2 = draw_shape("star", np.random.default_rng(42))
    assert first.tobytes() == second.tobytes() and attrs1 == attrs2
    others = {draw_shape("star", np.random.default_rng(seed))[0].tobytes() for seed in range(5)}
    assert len(others) == 5


def test_draw_shape_unknown_class():
    with pytest.raises(ValueError, match="hexagon"):
        draw_shape("hexagon", np.random.default_rng(0))


def test_typical_colours_dominate():
    labels = np.zeros(400, dtype=np.int64)  # circles: usually red
    _, attrs = generate_images(labels, seed=3, size=16)
    red = sum(a["colour"] == "red" for a in attrs) / len(attrs)
    assert 0.65 < red < 0.85


def test_generate_images_is_deterministic_per_seed_and_chunkable():
    labels = np.arange(12) % len(SHAPE_CLASSES)
    images, attrs = generate_images(labels, seed=5, size=IMAGE_SIZE)
    again, attrs_again = generate_images(labels, seed=5, size=IMAGE_SIZE)
    tail, tail_attrs = generate_images(labels[6:], seed=5, size=IMAGE_SIZE, start_index=6)
    assert [i.tobytes() for i in images] == [i.tobytes() for i in again]
    assert attrs == attrs_again
    assert [i.tobytes() for i in images[6:]] == [i.tobytes() for i in tail]
    assert attrs[6:] == tail_attrs
    other, _ = generate_images(labels, seed=6, size=IMAGE_SIZE)
    assert [i.tobytes() for i in images] != [i.tobytes() for i in other]
    with pytest.raises(ValueError, match="labels"):
        generate_images(np.array([0, 10]), seed=0)


# ---------------------------------------------------------------------------------------------
# Shards
# ---------------------------------------------------------------------------------------------


def test_shards_read_back_with_tarfile(written):
    out, shards = written
    assert [p.name for p in shards] == [f"shapes-{i:06d}.tar" for i in range(3)]
    assert sorted(out.glob("*.tar")) == shards
    assert not list(out.glob(".*"))  # no temporary files left behind

    manifest = read_manifest(out)
    assert manifest is not None
    assert manifest["num_samples"] == NUM_SAMPLES
    assert manifest["shards"] == [p.name for p in shards]

    keys, true_labels, noisy_labels = [], [], []
    for shard_index, shard in enumerate(shards):
        samples = read_tar_samples(shard)
        assert len(samples) == min(PER_SHARD, NUM_SAMPLES - shard_index * PER_SHARD)
        for key, members in samples:
            match = KEY_PATTERN.fullmatch(key)
            assert match and int(match.group(1)) == shard_index
            assert set(members) == {"jpg", "cls", "json"}
            meta = json.loads(members["json"])
            assert int(members["cls"].decode("ascii")) == meta["label"]
            assert meta["class_name"] == SHAPE_CLASSES[meta["true_label"]]
            assert meta["noise"] == "symmetric"
            image = Image.open(io.BytesIO(members["jpg"]))
            assert image.format == "JPEG"
            assert image.convert("RGB").size == (IMAGE_SIZE, IMAGE_SIZE)
            keys.append(key)
            true_labels.append(meta["true_label"])
            noisy_labels.append(meta["label"])

    assert len(keys) == len(set(keys)) == NUM_SAMPLES
    true_array, noisy_array = np.array(true_labels), np.array(noisy_labels)
    assert np.bincount(true_array, minlength=10).tolist() == manifest["true_label_counts"]
    assert np.bincount(noisy_array, minlength=10).tolist() == manifest["label_counts"]
    assert int((true_array != noisy_array).sum()) == manifest["num_changed"]
    assert manifest["changed_fraction"] == pytest.approx(manifest["num_changed"] / NUM_SAMPLES)
    assert max(manifest["true_label_counts"]) - min(manifest["true_label_counts"]) == 0  # balanced
    assert manifest["num_changed"] > 0


def test_shards_read_back_with_webdataset(written):
    import webdataset as wds

    _, shards = written
    dataset = wds.WebDataset([str(p) for p in shards], shardshuffle=False, empty_check=False)
    samples = list(dataset)
    assert len(samples) == NUM_SAMPLES
    keys = [s["__key__"] for s in samples]
    assert len(set(keys)) == NUM_SAMPLES
    tar_keys = [key for shard in shards for key, _ in read_tar_samples(shard)]
    assert keys == tar_keys
    for sample in samples:
        meta = json.loads(sample["json"])
        assert int(sample["cls"]) == meta["label"]
        assert Image.open(io.BytesIO(sample["jpg"])).size == (IMAGE_SIZE, IMAGE_SIZE)


def test_same_arguments_same_bytes_other_seed_other_data(tmp_path):
    options = {"samples_per_shard": 10, "seed": 4, "image_size": 16}
    first = write_demo_shards(tmp_path / "a", 20, **options)
    second = write_demo_shards(tmp_path / "b", 20, **options)
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]
    assert read_manifest(tmp_path / "a") == read_manifest(tmp_path / "b")
    other = write_demo_shards(tmp_path / "c", 20, **{**options, "seed": 5})
    assert [p.read_bytes() for p in first] != [p.read_bytes() for p in other]


@pytest.mark.parametrize("noise", ["asymmetric", "hard"])
def test_pair_noise_follows_most_similar(tmp_path, noise):
    most_similar = ClassSpec.load(DEMO_CLASS_SPEC).most_similar()
    shards = write_demo_shards(
        tmp_path, 60, samples_per_shard=60, noise=noise, noise_rate=0.6, seed=2, image_size=16
    )
    metas = [json.loads(m["json"]) for _, m in read_tar_samples(shards[0])]
    flipped = [m for m in metas if m["label"] != m["true_label"]]
    assert flipped
    assert all(m["label"] == most_similar[m["true_label"]] for m in flipped)
    assert all(m["noise"] == noise for m in metas)


def test_instance_noise_targets_follow_the_image(tmp_path):
    """Two samples of one class may flip to different classes, at about the asked rate."""
    options = {"samples_per_shard": 200, "noise": "instance", "noise_rate": 0.4, "seed": 4}
    shards = write_demo_shards(tmp_path, 200, image_size=16, **options)
    metas = [json.loads(m["json"]) for _, m in read_tar_samples(shards[0])]
    flipped = [m for m in metas if m["label"] != m["true_label"]]
    assert 0.25 < len(flipped) / len(metas) < 0.55
    targets: dict[int, set[int]] = {}
    for meta in flipped:
        targets.setdefault(meta["true_label"], set()).add(meta["label"])
    assert max(len(t) for t in targets.values()) >= 3  # per sample, not one target per class
    assert all(m["noise"] == "instance" for m in metas)
    again = write_demo_shards(tmp_path / "again", 200, image_size=16, **options)
    assert again[0].read_bytes() == shards[0].read_bytes()


def test_no_noise_and_png(tmp_path):
    shards = write_demo_shards(
        tmp_path, 15, samples_per_shard=15, noise="none", image_format="png", image_size=16
    )
    samples = read_tar_samples(shards[0])
    assert all(set(m) == {"png", "cls", "json"} for _, m in samples)
    assert all(Image.open(io.BytesIO(m["png"])).format == "PNG" for _, m in samples)
    manifest = read_manifest(tmp_path)
    assert manifest["num_changed"] == 0 and manifest["changed_fraction"] == 0.0


def test_rewrite_removes_stale_shards(tmp_path):
    write_demo_shards(tmp_path, 30, samples_per_shard=10, image_size=16)
    assert len(list(tmp_path.glob("*.tar"))) == 3
    write_demo_shards(tmp_path, 10, samples_per_shard=10, image_size=16)
    assert [p.name for p in tmp_path.glob("*.tar")] == ["shapes-000000.tar"]
    assert read_manifest(tmp_path)["num_samples"] == 10


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="noise"):
        write_demo_shards(tmp_path, 10, noise="sideways")
    with pytest.raises(ValueError, match="image_format"):
        write_demo_shards(tmp_path, 10, image_format="gif")
    with pytest.raises(ValueError, match="prefix"):
        write_demo_shards(tmp_path, 10, prefix="a.b")
    odd_spec = ClassSpec.from_dict({"classes": ["circle", "hexagon"]})
    with pytest.raises(ValueError, match="hexagon"):
        write_demo_shards(tmp_path, 10, class_spec=odd_spec)
    assert not list(tmp_path.iterdir())


def test_custom_class_spec_subset(tmp_path):
    spec = ClassSpec.from_dict(
        {"classes": [{"name": "square", "similar_to": "diamond"}, {"name": "diamond"}]}
    )
    shards = write_demo_shards(
        tmp_path,
        20,
        samples_per_shard=20,
        noise="hard",
        noise_rate=1.0,
        class_spec=spec,
        image_size=16,
    )
    metas = [json.loads(m["json"]) for _, m in read_tar_samples(shards[0])]
    assert Counter(m["class_name"] for m in metas) == {"square": 10, "diamond": 10}
    assert all(m["label"] == 1 for m in metas)  # square -> diamond; diamond stays


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def test_cli_writes_splits_then_skips(tmp_path, capsys):
    argv = [
        "--out", str(tmp_path), "--num-samples", "30", "--test-samples", "10",
        "--samples-per-shard", "20", "--noise", "symmetric", "--rate", "0.4",
        "--seed", "0", "--image-size", "16",
    ]  # fmt: skip
    make_demo_data(argv)
    first_output = capsys.readouterr().out
    assert first_output.count("[train] shard") == 2 and first_output.count("[test] shard") == 1
    train, test = read_manifest(tmp_path / "train"), read_manifest(tmp_path / "test")
    assert train["parameters"]["noise"] == "symmetric" and train["num_samples"] == 30
    assert test["parameters"]["noise"] == "none" and test["num_changed"] == 0
    assert test["parameters"]["seed"] != train["parameters"]["seed"]
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}

    make_demo_data(argv)
    second_output = capsys.readouterr().out
    assert "[train] skipped" in second_output and "[test] skipped" in second_output
    assert "[train] shard" not in second_output and "[test] shard" not in second_output
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == stamps

    # A different rate redoes the training split only.
    make_demo_data([*argv[:-6], "--rate", "0.2", *argv[-4:]])
    third_output = capsys.readouterr().out
    assert "[train] shard" in third_output and "[test] skipped" in third_output
    assert read_manifest(tmp_path / "train")["parameters"]["noise_rate"] == 0.2

    # A manifest whose shards are gone is not up to date.
    (tmp_path / "test" / "shapes-000000.tar").unlink()
    make_demo_data([*argv[:-6], "--rate", "0.2", *argv[-4:]])
    assert "[test] shard" in capsys.readouterr().out
    assert (tmp_path / "test" / MANIFEST_NAME).is_file()
