"""The demo dataset "shapes-10" as WebDataset tar shards, with injected label noise.

Each sample ``{prefix}-{shard:06d}-{index:06d}`` (index = position in the whole dataset) has
``.jpg`` (or ``.png``), ``.cls`` (the noisy label as an ASCII integer) and ``.json``
(``{"label", "true_label", "class_name", "noise"}``). True labels are balanced over the
classes; noisy labels come from ``cleaner.noise``. ``dataset.json`` beside the shards records
the parameters and counts and is written last, so its presence means the set is complete.
Same arguments, same labels, images and tar bytes.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cleaner.classes import DEMO_CLASS_SPEC, ClassSpec
from cleaner.demo.shapes import SHAPE_CLASSES, draw_shape, sample_rng
from cleaner.noise import NOISE_KINDS, changed_fraction, inject_noise

MANIFEST_NAME = "dataset.json"
IMAGE_FORMATS: tuple[str, ...] = ("jpg", "png")
JPEG_QUALITY = 90
# Bump when the images or labels drawn for given parameters change, so old data are redone.
GENERATOR_VERSION = 1
# Random streams for labels and noise; 3 words with a non-zero last one, so they never
# coincide with the per-image streams sample_rng(seed, index) = [seed, index].
_LABEL_STREAM = (0x5EED, 1)
_NOISE_STREAM = (0x5EED, 2)
TAR_MTIME = 0  # fixed member times make the tar files byte-for-byte reproducible
NOISE_FEATURE_SIZE = 16
"""Instance-dependent noise sees each image downsampled to this many pixels a side (RGB)."""

ShardCallback = Callable[[Path, int, int, int], None]
"""Called after each shard with (shard path, samples in it, shards done, shards in all)."""


def demo_parameters(
    num_samples: int,
    *,
    samples_per_shard: int = 500,
    noise: str = "symmetric",
    noise_rate: float = 0.4,
    seed: int = 0,
    image_size: int = 64,
    image_format: str = "jpg",
    prefix: str = "shapes",
    class_spec: ClassSpec | None = None,
) -> dict[str, Any]:
    """The parameters of a demo dataset as recorded in dataset.json (validated)."""
    spec = class_spec if class_spec is not None else ClassSpec.load(DEMO_CLASS_SPEC)
    unknown = [name for name in spec.names if name not in SHAPE_CLASSES]
    if unknown:
        raise ValueError(f"class spec has classes the generator cannot draw: {unknown}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be positive, got {num_samples}")
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be positive, got {samples_per_shard}")
    if noise not in NOISE_KINDS:
        raise ValueError(f"unknown noise kind {noise!r}; expected one of {NOISE_KINDS}")
    if not 0.0 <= noise_rate <= 1.0:
        raise ValueError(f"noise_rate must lie in [0, 1], got {noise_rate}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8 pixels, got {image_size}")
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", prefix):
        raise ValueError(f"prefix must be letters, digits, '-' or '_' (no dots), got {prefix!r}")
    return {
        "generator_version": GENERATOR_VERSION,
        "num_samples": int(num_samples),
        "samples_per_shard": int(samples_per_shard),
        "noise": noise,
        "noise_rate": float(noise_rate),
        "seed": int(seed),
        "image_size": int(image_size),
        "image_format": image_format,
        "prefix": prefix,
        "class_spec": spec.name,
        "class_names": spec.names,
        "most_similar": spec.most_similar(),
    }


def read_manifest(out_dir: str | Path) -> dict[str, Any] | None:
    """The dataset.json of a demo dataset folder, or None if it is missing or unreadable."""
    path = Path(out_dir) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def is_up_to_date(out_dir: str | Path, parameters: dict[str, Any]) -> bool:
    """Whether `out_dir` holds a complete dataset made with exactly these parameters."""
    manifest = read_manifest(out_dir)
    if manifest is None or manifest.get("parameters") != parameters:
        return False
    return all((Path(out_dir) / name).is_file() for name in manifest.get("shards", []))


def demo_labels(
    num_samples: int, parameters: dict[str, Any], num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """(true labels, noisy labels) for the given parameters: balanced, shuffled, then noised."""
    seed = parameters["seed"]
    true_labels = np.arange(num_samples, dtype=np.int64) % num_classes
    true_labels = np.random.default_rng([seed, *_LABEL_STREAM]).permutation(true_labels)
    most_similar = parameters["most_similar"]
    noise = parameters["noise"]
    noisy_labels = inject_noise(
        true_labels,
        noise,
        parameters["noise_rate"],
        num_classes,
        np.random.default_rng([seed, *_NOISE_STREAM]),
        pairs=most_similar if noise == "asymmetric" else None,
        most_similar=most_similar if noise == "hard" else None,
        features=noise_features(true_labels, parameters) if noise == "instance" else None,
    )
    return true_labels, noisy_labels


def noise_features(true_labels: np.ndarray, parameters: dict[str, Any]) -> np.ndarray:
    """Per-sample features for instance-dependent noise: standardised low-resolution pixels.

    Each sample's image is drawn as write_demo_shards draws it, downsampled to
    NOISE_FEATURE_SIZE pixels a side, and every pixel value standardised over the dataset
    (as a Normalize transform would), giving an [N, 3 * NOISE_FEATURE_SIZE ** 2] array.
    The images are drawn here and again when the shards are written: every label must
    exist before the first shard is, and holding every full image until then would cost
    N x image_size^2 x 3 bytes instead of one extra draw (about 1 ms) per image.
    """
    names, seed, size = parameters["class_names"], parameters["seed"], parameters["image_size"]
    side = min(NOISE_FEATURE_SIZE, size)
    rows = [
        np.asarray(
            draw_shape(names[label], sample_rng(seed, index), size)[0].resize(
                (side, side), Image.Resampling.BOX
            ),
            dtype=np.float64,
        ).ravel()
        for index, label in enumerate(true_labels.tolist())
    ]
    pixels = np.stack(rows)
    return (pixels - pixels.mean(axis=0)) / np.maximum(pixels.std(axis=0), 1e-6)


def _encode_image(image: Image.Image, image_format: str) -> bytes:
    buffer = io.BytesIO()
    if image_format == "jpg":
        image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    else:
        image.save(buffer, format="PNG")
    return buffer.getvalue()


def _write_shard(path: Path, samples: list[dict[str, Any]]) -> None:
    """Write one tar shard atomically: to a hidden temporary name, then rename."""
    import webdataset as wds  # imported here: it pulls in torch, which the skip path never needs

    temporary = path.with_name(f".{path.name}.partial")
    try:
        with open(temporary, "wb") as stream:
            with wds.TarWriter(stream, encoder=False, mtime=TAR_MTIME) as writer:
                for sample in samples:
                    writer.write(sample)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _write_text_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.partial")
    temporary.write_text(text)
    os.replace(temporary, path)


def write_demo_shards(
    out_dir: str | Path,
    num_samples: int,
    *,
    samples_per_shard: int = 500,
    noise: str = "symmetric",
    noise_rate: float = 0.4,
    seed: int = 0,
    image_size: int = 64,
    image_format: str = "jpg",
    prefix: str = "shapes",
    class_spec: ClassSpec | None = None,
    on_shard: ShardCallback | None = None,
) -> list[Path]:
    """Write the demo dataset as `{prefix}-{shard:06d}.tar` shards plus dataset.json.

    True labels are balanced over the classes and shuffled; noisy labels follow `noise`
    ("none", "symmetric", "asymmetric" along class_spec.most_similar(), "hard" towards it,
    or "instance": per-sample rates and targets from each image's pixels) at `noise_rate`.
    Deterministic in the arguments. An existing dataset.json is removed first and shards of
    an older, larger run with the same prefix are deleted. Returns the shard paths in order.
    """
    spec = class_spec if class_spec is not None else ClassSpec.load(DEMO_CLASS_SPEC)
    parameters = demo_parameters(
        num_samples,
        samples_per_shard=samples_per_shard,
        noise=noise,
        noise_rate=noise_rate,
        seed=seed,
        image_size=image_size,
        image_format=image_format,
        prefix=prefix,
        class_spec=spec,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_NAME).unlink(missing_ok=True)  # incomplete until rewritten at the end

    true_labels, noisy_labels = demo_labels(num_samples, parameters, spec.num_classes)
    num_shards = -(-num_samples // samples_per_shard)
    shard_paths: list[Path] = []
    for shard in range(num_shards):
        start = shard * samples_per_shard
        stop = min(start + samples_per_shard, num_samples)
        samples = []
        for index in range(start, stop):
            true_label, noisy_label = int(true_labels[index]), int(noisy_labels[index])
            image, _ = draw_shape(spec.names[true_label], sample_rng(seed, index), image_size)
            meta = {
                "label": noisy_label,
                "true_label": true_label,
                "class_name": spec.names[true_label],
                "noise": noise,
            }
            samples.append(
                {
                    "__key__": f"{prefix}-{shard:06d}-{index:06d}",
                    image_format: _encode_image(image, image_format),
                    "cls": str(noisy_label).encode("ascii"),
                    "json": json.dumps(meta).encode("utf-8"),
                }
            )
        path = out / f"{prefix}-{shard:06d}.tar"
        _write_shard(path, samples)
        shard_paths.append(path)
        if on_shard is not None:
            on_shard(path, stop - start, shard + 1, num_shards)

    stale = re.compile(rf"{re.escape(prefix)}-(\d{{6}})\.tar")
    for path in out.iterdir():
        match = stale.fullmatch(path.name)
        if match and int(match.group(1)) >= num_shards:
            path.unlink()

    num_changed = int(np.count_nonzero(true_labels != noisy_labels))
    manifest = {
        "parameters": parameters,
        "num_samples": int(num_samples),
        "num_shards": num_shards,
        "shards": [path.name for path in shard_paths],
        "num_changed": num_changed,
        "changed_fraction": changed_fraction(true_labels, noisy_labels),
        "true_label_counts": np.bincount(true_labels, minlength=spec.num_classes).tolist(),
        "label_counts": np.bincount(noisy_labels, minlength=spec.num_classes).tolist(),
    }
    _write_text_atomically(out / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")
    return shard_paths
