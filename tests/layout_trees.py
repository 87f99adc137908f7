"""Tiny generated trees in the native layouts of the paper's datasets (the real ones cannot
be downloaded here). Each returns what a correct ingestion must produce."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

COLORS = [(220, 30, 30), (30, 30, 220), (30, 200, 30), (220, 220, 30), (160, 30, 200)]


def image_bytes(i: int, fmt: str = "JPEG", size=(48, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, COLORS[i % len(COLORS)]).save(buf, format=fmt)
    return buf.getvalue()


def put(root: Path, rel: str, data: bytes) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


@dataclass
class Tree:
    """A generated dataset: its root, options, and the expected outcome."""

    root: Path
    overrides: list[str]
    images: dict[str, int]  # relative path -> label, every image that must be written
    bad: int  # list lines / files that must be reported
    num_classes: int
    true_labels: dict[str, int] = field(default_factory=dict)


def imagefolder(root: Path) -> Tree:
    images = {}
    for c, name in enumerate(["cat", "dog", "fox"]):
        for i in range(4):
            rel = f"{name}/img.{i}.jpg"  # a dot inside the stem, as real file names have
            put(root, rel, image_bytes(c))
            images[rel] = c
    put(root, "fox/drawing.PNG", image_bytes(2, "PNG"))  # re-encoded to JPEG
    images["fox/drawing.PNG"] = 2
    put(root, "dog/broken.jpg", b"not a jpeg")  # unreadable
    put(root, "README.txt", b"about")  # not in a class folder
    return Tree(root, ["layout=imagefolder"], images, bad=2, num_classes=3)


def labellist(root: Path) -> Tree:
    images, lines = {}, []
    for i in range(9):
        rel = f"photos/batch{i % 2}/p{i:03d}.jpg"
        put(root, rel, image_bytes(i))
        images[rel] = i % 3
        lines.append(f"{rel} {i % 3}")
    lines += ["photos/missing.jpg 1", "a-line-without-label", "photos/batch0/p000.jpg -4", ""]
    (root / "labels.txt").write_text("\n".join(lines))
    (root / "names.txt").write_text("apple\nbanana\ncherry\n")
    overrides = [
        "layout=labellist",
        f"label_list={root / 'labels.txt'}",
        f"class_names={root / 'names.txt'}",
    ]
    return Tree(root, overrides, images, bad=3, num_classes=3)


def webvision(root: Path, mini: bool = False) -> Tree:
    synsets = [f"n{i:08d} name{i}, other" for i in range(60)]
    synsets[7] = "n00000007 name3, duplicate"  # ImageNet repeats names (crane)
    put(root, "info/synsets.txt", "\n".join(synsets).encode())
    images: dict[str, int] = {}
    for source in ("google", "flickr"):
        lines = []
        for i, label in enumerate([0, 3, 7, 49, 50, 59]):
            rel = f"{source}/q{label + 1:04d}/{i:06d}.jpg"
            put(root, rel, image_bytes(label))
            lines.append(f"{rel} {label}")
            if not mini or (source == "google" and label < 50):
                images[rel] = label
        lines.append(f"{source}/q0001/bad.jpg x")  # a bad label line
        put(root, f"info/train_filelist_{source}.txt", "\n".join(lines).encode())
    bad = 1 if mini else 2
    overrides = ["layout=webvision", f"mini={str(mini).lower()}"]
    return Tree(root, overrides, images, bad=bad, num_classes=50 if mini else 60)


def clothing1m(root: Path, split: str = "train") -> Tree:
    noisy, clean, train_keys, test_keys = [], [], [], []
    images: dict[str, int] = {}
    truths: dict[str, int] = {}
    for i in range(10):
        rel = f"images/{i % 3}/{i:02d}/{i:06d}.jpg"
        put(root, rel, image_bytes(i))
        if i < 7:
            noisy.append(f"{rel} {i % 14}")
            train_keys.append(rel)
            if split == "train":
                images[rel] = i % 14
        if i in (2, 5, 8, 9):
            clean.append(f"{rel} {(i + 1) % 14}")
        if i >= 8:
            test_keys.append(rel)
            if split == "test":
                images[rel] = (i + 1) % 14
    truths = {"images/2/02/000002.jpg": 3, "images/2/05/000005.jpg": 6} if split == "train" else {}
    train_keys.append("images/9/99/not-labelled.jpg")  # in the key list, not in the kv
    annotations = root / "annotations"
    annotations.mkdir(parents=True, exist_ok=True)
    (annotations / "noisy_label_kv.txt").write_text("\n".join(noisy))
    (annotations / "clean_label_kv.txt").write_text("\n".join(clean))
    (annotations / "noisy_train_key_list.txt").write_text("\n".join(train_keys))
    (annotations / "clean_test_key_list.txt").write_text("\n".join(test_keys))
    bad = 1 if split == "train" else 0
    overrides = ["layout=clothing1m", f"split={split}"]
    return Tree(root, overrides, images, bad=bad, num_classes=14, true_labels=truths)


def animal10n(root: Path) -> Tree:
    images = {}
    for i in range(12):
        rel = f"training/{i % 10}_{i:05d}.jpg"
        put(root, rel, image_bytes(i, size=(64, 64)))
        images[rel] = i % 10
    put(root, "testing/3_00001.jpg", image_bytes(3))
    put(root, "training/no-label.jpg", image_bytes(1))
    put(root, "training/12_00002.jpg", image_bytes(1))  # label outside the 10 classes
    return Tree(root, ["layout=animal10n"], images, bad=2, num_classes=10)


LAYOUT_TREES = {
    "imagefolder": imagefolder,
    "labellist": labellist,
    "webvision": webvision,
    "mini-webvision": lambda root: webvision(root, mini=True),
    "clothing1m": clothing1m,
    "clothing1m-test": lambda root: clothing1m(root, "test"),
    "animal10n": animal10n,
}
