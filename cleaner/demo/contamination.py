"""Injected contamination for the demo data: off-topic images, duplicates and test leaks.

    write_contamination(train_dir, test_dir, off_topic=200, near=200, exact=100, leaks=50)

adds one shard, `contamination-000000.tar`, to the train folder of a demo dataset, and
`contamination.json` beside it with the ground truth of every injected sample:
- off-topic: images of none of the demo's classes (noise, textures, text, empty
  backgrounds, scribbles and shapes outside the spec), labelled with a random class;
- near duplicates: a train image edited (cleaner/checks/perturb.py: re-encoded, resized,
  cropped by a few pixels or flipped); exact duplicates: the train image's very bytes;
- leaks: test images copied into train, half byte for byte, half edited.
A copy's label is its original's true label, or (at the demo's noise rate) another class,
so some duplicate groups carry conflicting labels. Deterministic in the arguments.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from cleaner.checks.perturb import EDITS, edit_image
from cleaner.demo.dataset import _encode_image, _write_shard, demo_labels, read_manifest
from cleaner.demo.shapes import _background, draw_shape, sample_rng

SHARD_NAME = "contamination-000000.tar"
TRUTH_NAME = "contamination.json"
OFF_TOPIC_KINDS = ("noise", "texture", "text", "background", "scribble", "hexagon", "arrow")


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, 3))


def draw_off_topic(kind: str, rng: np.random.Generator, size: int) -> Image.Image:
    """One image of none of the demo's classes."""
    if kind == "noise":
        return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    if kind == "texture":
        coarse = rng.integers(0, 256, (max(2, size // 8), max(2, size // 8), 3), dtype=np.uint8)
        return Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)
    if kind == "background":  # a demo background with no shape on it
        return _background("red", rng, size)[0]
    image = Image.new("RGB", (size, size), _colour(rng))
    draw = ImageDraw.Draw(image)
    if kind == "text":
        for line in range(max(1, size // 14)):
            word = "".join(chr(65 + int(c)) for c in rng.integers(0, 26, 6))
            draw.text((2 + int(rng.integers(0, size // 4)), 2 + 14 * line), word, fill=_colour(rng))
    elif kind == "scribble":
        for _ in range(6):
            ends = [tuple(int(v) for v in rng.integers(0, size, 2)) for _ in range(2)]
            draw.line(ends, fill=_colour(rng), width=max(1, size // 20))
    elif kind in ("hexagon", "arrow"):
        c, r = size / 2, size * rng.uniform(0.25, 0.4)
        if kind == "hexagon":
            angles = np.linspace(0, 2 * math.pi, 7)[:-1] + rng.uniform(0, 1)
            points = [(c + r * math.cos(a), c + r * math.sin(a)) for a in angles]
        else:
            unit = [(-1, -0.3), (0.2, -0.3), (0.2, -0.7), (1, 0), (0.2, 0.7), (0.2, 0.3), (-1, 0.3)]
            points = [(c + r * x, c + r * y) for x, y in unit]
        draw.polygon(points, fill=_colour(rng))
    else:
        raise ValueError(f"unknown off-topic kind {kind!r}; expected one of {OFF_TOPIC_KINDS}")
    return image


def _copy_label(true_label: int, rate: float, num_classes: int, rng) -> int:
    if rng.random() >= rate:
        return true_label
    return int((true_label + 1 + rng.integers(num_classes - 1)) % num_classes)


def write_contamination(
    train_dir: str | Path,
    test_dir: str | Path | None = None,
    *,
    off_topic: int = 0,
    near: int = 0,
    exact: int = 0,
    leaks: int = 0,
    seed: int = 0,
) -> dict:
    """Write the contamination shard and its ground truth; returns the truth dict."""
    train_dir = Path(train_dir)
    train = read_manifest(train_dir)
    if train is None:
        raise ValueError(f"{train_dir} holds no demo dataset (dataset.json)")
    params = train["parameters"]
    names, size, fmt = params["class_names"], params["image_size"], params["image_format"]
    true_labels, _ = demo_labels(params["num_samples"], params, len(names))
    rng = np.random.default_rng([seed, 0xC0DE])
    samples, truth = [], []

    def add(kind: str, image_bytes: bytes, label: int, true_label: int, **extra) -> None:
        key = f"extra-{kind}-{len(samples):06d}"
        meta = {"label": label, "true_label": true_label, "kind": kind, **extra}
        samples.append(
            {
                "__key__": key,
                fmt: image_bytes,
                "cls": str(label).encode(),
                "json": json.dumps(meta).encode(),
            }
        )
        truth.append({"key": key, **meta})

    def original(index: int, seed_: int, label: int) -> Image.Image:
        return draw_shape(names[label], sample_rng(seed_, index), size)[0]

    for i in range(off_topic):
        kind = OFF_TOPIC_KINDS[i % len(OFF_TOPIC_KINDS)]
        image = draw_off_topic(kind, np.random.default_rng([seed, 1, i]), size)
        add("off_topic", _encode_image(image, fmt), int(rng.integers(len(names))), -1, drawn=kind)
    sources = rng.choice(
        params["num_samples"], size=min(near + exact, params["num_samples"]), replace=False
    )
    rate = params["noise_rate"]
    for i, index in enumerate(sources.tolist()):
        label = int(true_labels[index])
        image = original(index, params["seed"], label)
        source_key = f"{params['prefix']}-{index // params['samples_per_shard']:06d}-{index:06d}"
        copy_label = _copy_label(label, rate, len(names), rng)
        if i < exact:
            add("exact", _encode_image(image, fmt), copy_label, label, source=source_key)
        else:
            edit = EDITS[i % len(EDITS)]
            edited = edit_image(
                _decoded(_encode_image(image, fmt)), edit, np.random.default_rng([seed, 2, i])
            )
            add("near", _encode_image(edited, fmt), copy_label, label, source=source_key, edit=edit)
    if leaks:
        test = read_manifest(test_dir) if test_dir is not None else None
        if test is None:
            raise ValueError(f"leaks need the demo's test split; {test_dir} holds none")
        tparams = test["parameters"]
        test_labels, _ = demo_labels(tparams["num_samples"], tparams, len(names))
        for i, index in enumerate(
            rng.choice(
                tparams["num_samples"], size=min(leaks, tparams["num_samples"]), replace=False
            ).tolist()
        ):
            label = int(test_labels[index])
            data = _encode_image(original(index, tparams["seed"], label), fmt)
            test_key = (
                f"{tparams['prefix']}-{index // tparams['samples_per_shard']:06d}-{index:06d}"
            )
            edit = None if i % 2 == 0 else EDITS[i % len(EDITS)]
            if edit is not None:
                data = _encode_image(
                    edit_image(_decoded(data), edit, np.random.default_rng([seed, 3, i])), fmt
                )
            add(
                "leak",
                data,
                _copy_label(label, rate, len(names), rng),
                label,
                test_key=test_key,
                edit=edit,
            )
    _write_shard(train_dir / SHARD_NAME, samples)
    result = {"seed": seed, "samples": truth}
    (train_dir / TRUTH_NAME).write_text(json.dumps(result, indent=1) + "\n")
    return result


def _decoded(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")
