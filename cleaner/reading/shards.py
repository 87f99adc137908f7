"""Reading WebDataset tar shards into labelled, decoded samples; failures become rows.

A sample is the group of consecutive tar members sharing a key (the member path up to the
first dot of its file name, as in webdataset). Its label comes from `{key}.cls` (an integer
or a class name) or `{key}.json` ("label"; "true_label" when the truth is known).
Nothing is dropped: a sample that cannot be used is emitted with status "failed" and a
reason, and a shard that cannot be read completely adds a shard-level failure row.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from cleaner.reading import uri as uri_lib

STATUS_OK = "ok"
STATUS_FAILED = "failed"
SHARD_ERROR_PREFIX = "__shard_error__"
MISSING_LABEL = -1


@dataclass
class RawSample:
    """The members of one sample: extension (lower case) -> bytes."""

    key: str
    members: dict[str, bytes] = field(default_factory=dict)
    problem: str | None = None


def split_member_name(name: str) -> tuple[str, str]:
    """('dir/abc', 'jpg') for 'dir/abc.jpg'; the key ends at the first dot of the file name."""
    directory, _, filename = name.rpartition("/")
    stem, dot, ext = filename.partition(".")
    key = f"{directory}/{stem}" if directory else stem
    return key, (ext.lower() if dot else "")


class _CountingReader:
    """A read-only stream wrapper that counts the bytes handed out."""

    def __init__(self, stream):
        self.stream, self.bytes_read = stream, 0

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.bytes_read += len(data)
        return data


def iter_tar_samples(stream) -> Iterator[RawSample]:
    """Group a tar stream's members into samples; raises tarfile/OS errors on a broken tar.

    A tar cut at a member boundary reads like a shorter archive to Python's tarfile; it is
    caught here because its end-of-archive block is missing.
    """
    current: RawSample | None = None
    finished: set[str] = set()
    counted = _CountingReader(stream)
    with tarfile.open(fileobj=counted, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, ext = split_member_name(member.name)
            if key.startswith("__") or key.startswith("."):
                continue  # webdataset metadata members
            data = tar.extractfile(member).read()
            if current is not None and key != current.key:
                finished.add(current.key)
                yield current
                current = None
            if current is None:
                current = RawSample(key)
                if key in finished:
                    current.problem = (
                        f"tar members of key {key!r} are not contiguous (key seen earlier in shard)"
                    )
            current.members[ext] = data
        truncated = counted.bytes_read < tar.offset + tarfile.BLOCKSIZE
        end_offset = tar.offset
    if current is not None:
        yield current
    if truncated:
        raise tarfile.ReadError(f"truncated tar: no end-of-archive block after {end_offset} bytes")


def parse_label(value, class_names: list[str]) -> tuple[int, str | None]:
    """(label, None) or (MISSING_LABEL, reason) from an int, a digit string or a class name."""
    if isinstance(value, bool):
        return MISSING_LABEL, f"label {value!r} is not an integer or class name"
    if isinstance(value, (int, np.integer)):
        label = int(value)
    elif isinstance(value, str):
        text = value.strip()
        if text.lstrip("-").isdigit():
            label = int(text)
        elif text in class_names:
            return class_names.index(text), None
        else:
            return MISSING_LABEL, f"label {text!r} is neither an integer nor a known class name"
    else:
        return MISSING_LABEL, f"label {value!r} is not an integer or class name"
    if not 0 <= label < len(class_names):
        return MISSING_LABEL, f"label {label} out of range [0, {len(class_names)})"
    return label, None


def sample_labels(sample: RawSample, class_names: list[str]) -> tuple[int, int, str | None]:
    """(label, true_label, problem) for a sample; true_label is -1 when unknown."""
    meta: dict = {}
    if "json" in sample.members:
        try:
            loaded = json.loads(sample.members["json"].decode("utf-8"))
            meta = loaded if isinstance(loaded, dict) else {}
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            return MISSING_LABEL, MISSING_LABEL, f"unreadable .json: {err}"
    true_label = MISSING_LABEL
    if "true_label" in meta:
        parsed, problem = parse_label(meta["true_label"], class_names)
        true_label = parsed if problem is None else MISSING_LABEL
    if "cls" in sample.members:
        try:
            raw = sample.members["cls"].decode("utf-8")
        except UnicodeDecodeError:
            return MISSING_LABEL, true_label, "unreadable .cls (not UTF-8 text)"
        label, problem = parse_label(raw, class_names)
    elif "label" in meta:
        label, problem = parse_label(meta["label"], class_names)
    else:
        return MISSING_LABEL, true_label, "no label (.cls or .json 'label')"
    return label, true_label, problem


RESAMPLING = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def decode_image(
    data: bytes,
    size: int,
    resize_mode: str = "shortest",
    interpolation: str = "bicubic",
    fill_color: int = 0,
) -> np.ndarray:
    """Decode, convert to RGB and resize as open_clip's inference transform does: uint8 HxWx3.

    resize_mode 'shortest': short side to `size`, centre crop; 'squash': straight to
    size x size; 'longest': long side to `size`, centred on a fill_color square.
    interpolation 'bicubic' or 'bilinear' ('random' means bicubic at inference, as in
    open_clip). The geometry matches torchvision's Resize/CenterCrop pixel for pixel.
    """
    if resize_mode not in ("shortest", "squash", "longest"):
        raise ValueError(f"unknown resize_mode {resize_mode!r} (shortest, squash or longest)")
    resample = RESAMPLING.get(interpolation, Image.Resampling.BICUBIC)
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        rgb = img.convert("RGB")
    width, height = rgb.size
    if width < 1 or height < 1:
        raise ValueError("empty image")
    if resize_mode == "squash":
        if (width, height) != (size, size):
            rgb = rgb.resize((size, size), resample)
        return np.asarray(rgb, dtype=np.uint8)
    if resize_mode == "longest":
        ratio = max(width, height) / size
        new_w, new_h = max(1, round(width / ratio)), max(1, round(height / ratio))
        if (new_w, new_h) != (width, height):
            rgb = rgb.resize((new_w, new_h), resample)
        canvas = Image.new("RGB", (size, size), (fill_color,) * 3)
        canvas.paste(rgb, ((size - new_w) // 2, (size - new_h) // 2))
        return np.asarray(canvas, dtype=np.uint8)
    short, long = min(width, height), max(width, height)
    new_short, new_long = size, int(size * long / short)  # torchvision's rounding
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    if (new_w, new_h) != (width, height):
        rgb = rgb.resize((new_w, new_h), resample)
    left, top = round((new_w - size) / 2.0), round((new_h - size) / 2.0)
    return np.asarray(rgb.crop((left, top, left + size, top + size)), dtype=np.uint8)


def find_image(sample: RawSample, extensions: list[str]) -> bytes | None:
    for ext in extensions:
        if ext in sample.members:
            return sample.members[ext]
    return None


class _BatchBuilder:
    """Accumulates decoded rows and hands them out as column batches."""

    def __init__(self, shard: str, image_size: int):
        self.shard, self.image_size = shard, image_size
        self.rows: list[tuple] = []
        self.position = 0

    def add(self, key, label, true_label, image, status, reason) -> None:
        self.rows.append((self.position, key, label, true_label, image, status, reason))
        self.position += 1

    def __len__(self) -> int:
        return len(self.rows)

    def flush(self, count: int | None = None, shard_total: int = -1) -> dict[str, np.ndarray]:
        """Hand out the first `count` rows (all by default) as columns."""
        count = len(self.rows) if count is None else count
        taken, self.rows = self.rows[:count], self.rows[count:]
        positions, keys, labels, truths, images, statuses, reasons = zip(*taken, strict=True)
        n = len(keys)
        return {
            "key": np.array(keys, dtype=object),
            "shard_pos": np.array(positions, dtype=np.int64),
            "shard": np.array([self.shard] * n, dtype=object),
            "label": np.array(labels, dtype=np.int64),
            "true_label": np.array(truths, dtype=np.int64),
            "image": np.stack(images),
            "status": np.array(statuses, dtype=object),
            "reason": np.array(reasons, dtype=object),
            "shard_total": np.full(n, shard_total, dtype=np.int64),
        }


def read_shard(
    shard: str,
    *,
    class_names: list[str],
    image_size: int,
    extensions: list[str],
    batch_size: int = 256,
    resize_mode: str = "shortest",
    interpolation: str = "bicubic",
    fill_color: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
    """Yield column batches of decoded samples of one shard; the last batch carries the total.

    Every sample of the shard appears exactly once, failed ones with a reason; a shard
    that cannot be opened or is truncated adds one failure row keyed SHARD_ERROR_PREFIX.
    """
    builder = _BatchBuilder(shard, image_size)
    blank = np.zeros((image_size, image_size, 3), dtype=np.uint8)
    total = 0
    try:
        fs, path = uri_lib.resolve(shard)
        with fs.open_input_stream(path, buffer_size=uri_lib.STREAM_BUFFER_BYTES) as stream:
            for sample in iter_tar_samples(stream):
                total += 1
                label, true_label, problem = sample_labels(sample, class_names)
                problem = sample.problem or problem
                image = blank
                if problem is None:
                    data = find_image(sample, extensions)
                    if data is None:
                        problem = f"no image member (expected one of {', '.join(extensions)})"
                    else:
                        try:
                            image = decode_image(
                                data, image_size, resize_mode, interpolation, fill_color
                            )
                        except (OSError, ValueError, Image.DecompressionBombError) as err:
                            problem = f"image decode error: {type(err).__name__}: {err}"
                            image = blank
                status = STATUS_OK if problem is None else STATUS_FAILED
                builder.add(sample.key, label, true_label, image, status, problem or "")
                if len(builder) > batch_size:  # keep a row back to carry the shard total
                    yield builder.flush(batch_size)
    except (tarfile.TarError, OSError, EOFError) as err:
        shard_problem = f"shard unreadable after {total} samples: {type(err).__name__}: {err}"
    else:
        # An empty shard still reports itself through one shard-level row.
        shard_problem = "empty shard: no samples" if total == 0 else None
    if shard_problem is not None:
        total += 1
        key = f"{SHARD_ERROR_PREFIX}/{uri_lib.basename(shard)}"
        builder.add(key, MISSING_LABEL, MISSING_LABEL, blank, STATUS_FAILED, shard_problem)
    yield builder.flush(shard_total=total)


def fetch_thumbnails(
    keys_by_shard: dict[str, list[str]], extensions: list[str], size: int = 96
) -> dict[str, bytes]:
    """Small PNG thumbnails for the given keys, read back from their shards (best effort).

    Samples whose image cannot be read are left out; the caller shows them without one.
    """
    thumbs: dict[str, bytes] = {}
    for shard, keys in keys_by_shard.items():
        wanted = set(keys)
        try:
            fs, path = uri_lib.resolve(shard)
            with fs.open_input_stream(path, buffer_size=uri_lib.STREAM_BUFFER_BYTES) as stream:
                for sample in iter_tar_samples(stream):
                    if sample.key not in wanted:
                        continue
                    data = find_image(sample, extensions)
                    if data is not None:
                        with Image.open(io.BytesIO(data)) as img:
                            thumb = img.convert("RGB")
                            thumb.thumbnail((size, size))
                            buf = io.BytesIO()
                            thumb.save(buf, format="PNG")
                            thumbs[sample.key] = buf.getvalue()
                    wanted.discard(sample.key)
                    if not wanted:
                        break
        except (tarfile.TarError, OSError, EOFError, ValueError):
            continue
    return thumbs
