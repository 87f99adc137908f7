"""Reading WebDataset tar shards into labelled, decoded samples; failures become rows.

A sample is the group of consecutive tar members sharing a key (the member path up to the
first dot of its file name, as in webdataset). Its label comes from `{key}.cls` (an integer
or a class name) or `{key}.json` ("label"; "true_label" when the truth is known).
Nothing is dropped: a sample that cannot be used is emitted with status "failed" and a
reason, and a shard that cannot be read completely adds a shard-level failure row.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from cleaner.reading import uri as uri_lib
from cleaner.reasons import stable_reason

STATUS_OK = "ok"
STATUS_FAILED = "failed"
SHARD_ERROR_PREFIX = "__shard_error__"
SHARD_SKIPPED_PREFIX = "__shard_skipped__"
MISSING_LABEL = -1


@dataclass
class RawSample:
    """The members of one sample: extension (lower case) -> bytes, and -> the member's name
    in the tar (without `./` prefixes), so that a sample can be written out unchanged."""

    key: str
    members: dict[str, bytes] = field(default_factory=dict)
    problem: str | None = None
    names: dict[str, str] = field(default_factory=dict)


def normalise_member_name(name: str) -> str:
    """The member path without the `./` and `/` prefixes that tar tools add (`./a/b.jpg` -> `a/b.jpg`)."""
    while True:
        if name.startswith("./"):
            name = name[2:]
        elif name.startswith("/"):
            name = name[1:]
        else:
            return name


def split_member_name(name: str) -> tuple[str, str]:
    """('dir/abc', 'jpg') for 'dir/abc.jpg'; the key ends at the first dot of the file name."""
    directory, _, filename = normalise_member_name(name).rpartition("/")
    stem, dot, ext = filename.partition(".")
    key = f"{directory}/{stem}" if directory else stem
    return key, (ext.lower() if dot else "")


def is_metadata_member(name: str) -> bool:
    """Hidden or webdataset-metadata files: the *file name* starts with '.' or '__'."""
    filename = normalise_member_name(name).rpartition("/")[2]
    return filename.startswith(".") or filename.startswith("__")


class _CountingReader:
    """A read-only stream wrapper that counts the bytes handed out."""

    def __init__(self, stream):
        self.stream, self.bytes_read = stream, 0

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.bytes_read += len(data)
        return data


class _Prefixed:
    """A stream whose first bytes were already read (to sniff compression)."""

    def __init__(self, head: bytes, stream):
        self.head, self.stream = head, stream

    def read(self, size: int = -1) -> bytes:
        if not self.head:
            return self.stream.read(size)
        if size is None or size < 0:
            data, self.head = self.head + self.stream.read(), b""
            return data
        data, self.head = self.head[:size], self.head[size:]
        if len(data) < size:
            data += self.stream.read(size - len(data))
        return data


def decompressed(stream):
    """The stream itself, or its gzip / bzip2 / xz decompression (sniffed from magic bytes).

    A truncated compressed stream raises EOFError when read to its end.
    """
    head = stream.read(6)
    joined = _Prefixed(head, stream)
    if head[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=joined, mode="rb")
    if head[:3] == b"BZh":
        return bz2.BZ2File(joined, mode="rb")
    if head[:6] == b"\xfd7zXZ\x00":
        return lzma.LZMAFile(joined, mode="rb")
    return joined


@dataclass
class SkippedMembers:
    """Tar members that are in no sample (hidden/metadata files, links, devices): reported."""

    names: list[str] = field(default_factory=list)
    why: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, why: str) -> None:
        self.names.append(name)
        self.why[why] = self.why.get(why, 0) + 1

    def reason(self) -> str:
        kinds = ", ".join(f"{n} {why}" for why, n in sorted(self.why.items()))
        shown = ", ".join(repr(n) for n in self.names[:3])
        more = f" and {len(self.names) - 3} more" if len(self.names) > 3 else ""
        return f"tar members not read as samples: {kinds} ({shown}{more})"


# Members of a key that tar tools wrote apart (GNU tar stores a folder in readdir order,
# not sorted) are gathered while the samples waiting for their label fit in this budget.
PENDING_BYTES = 128 << 20
LABEL_EXTENSIONS = ("cls", "json")


def _has_label_and_more(sample: RawSample) -> bool:
    return len(sample.members) > 1 and any(ext in sample.members for ext in LABEL_EXTENSIONS)


def iter_tar_samples(
    stream, skipped: SkippedMembers | None = None, pending_bytes: int = PENDING_BYTES
) -> Iterator[RawSample]:
    """Group a tar stream's members into samples; raises tarfile/OS errors on a broken tar.

    Accepts what tar tools write: `./` prefixes and directory entries, pax and GNU long
    names, gzip/bzip2/xz-compressed tars, and members of a key written apart (as
    `tar -C dir -cf x.tar .` does): a sample is handed out when the tar moves to another
    key and it has a label and another member, or at the end of the tar, or when the
    samples waiting exceed `pending_bytes` (oldest first; a later member of that key
    then makes a failed sample "not contiguous"). Members that are not samples (hidden
    or `__` metadata files, links, devices) are counted in `skipped`, never dropped unsaid.
    A tar cut at a member boundary reads like a shorter archive to Python's tarfile; it is
    caught here because its end-of-archive block is missing.
    """
    pending: dict[str, RawSample] = {}
    sizes: dict[str, int] = {}
    waiting = 0
    current: str | None = None
    finished: set[str] = set()
    counted = _CountingReader(decompressed(stream))
    skipped = skipped if skipped is not None else SkippedMembers()

    def release(key: str) -> RawSample:
        nonlocal waiting
        waiting -= sizes.pop(key)
        finished.add(key)
        return pending.pop(key)

    try:
        with tarfile.open(fileobj=counted, mode="r|") as tar:
            for member in tar:
                if member.isdir():
                    continue
                if not member.isfile():
                    skipped.add(member.name, "links or special files")
                    continue
                if is_metadata_member(member.name):
                    skipped.add(member.name, "hidden or metadata files")
                    continue
                key, ext = split_member_name(member.name)
                data = tar.extractfile(member).read()
                moved_on = current is not None and key != current and current in pending
                if moved_on and _has_label_and_more(pending[current]):
                    yield release(current)
                current = key
                sample = pending.get(key)
                if sample is None:
                    sample = pending[key] = RawSample(key)
                    sizes[key] = 0
                    if key in finished:
                        sample.problem = (
                            "tar members of this key are not contiguous (key seen earlier in shard)"
                        )
                    if ".." in key.split("/"):
                        sample.problem = "member path has a '..' component (points outside the tar)"
                if ext in sample.members and sample.problem is None:
                    sample.problem = f"two members of this key with extension {ext!r}"
                sample.members[ext] = data
                sample.names[ext] = normalise_member_name(member.name)
                sizes[key] += len(data)
                waiting += len(data)
                while waiting > pending_bytes and len(pending) > 1:
                    yield release(next(k for k in pending if k != key))
            truncated = counted.bytes_read < tar.offset + tarfile.BLOCKSIZE
            end_offset = tar.offset
    except (tarfile.TarError, OSError, EOFError):
        # Samples read before a broken end are handed out, then the caller reports the error.
        for key in list(pending):
            yield release(key)
        raise
    for key in list(pending):
        yield release(key)
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
            label = class_names.index(text)
            if text in class_names[label + 1 :]:  # ImageNet's two "missile"s: by number only
                return MISSING_LABEL, f"class name {text!r} names several classes: label by number"
            return label, None
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
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        rgb = img.convert("RGB")
    return resize_image(rgb, size, resize_mode, interpolation, fill_color)


def resize_image(
    rgb: Image.Image,
    size: int,
    resize_mode: str = "shortest",
    interpolation: str = "bicubic",
    fill_color: int = 0,
) -> np.ndarray:
    """An RGB image resized as `decode_image` does (see there): uint8 HxWx3."""
    if resize_mode not in ("shortest", "squash", "longest"):
        raise ValueError(f"unknown resize_mode {resize_mode!r} (shortest, squash or longest)")
    resample = RESAMPLING.get(interpolation, Image.Resampling.BICUBIC)
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
        if ext.lower() in sample.members:
            return sample.members[ext.lower()]
    return None


class _BatchBuilder:
    """Accumulates decoded rows and hands them out as column batches."""

    def __init__(self, shard: str):
        self.shard = shard
        self.rows: list[tuple] = []
        self.position = 0

    def add(self, key, label, true_label, image, status, reason) -> None:
        reason = stable_reason(reason) if reason else ""
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
    require_label: bool = True,
) -> Iterator[dict[str, np.ndarray]]:
    """Yield column batches of decoded samples of one shard; the last batch carries the total.

    Every sample of the shard appears exactly once, failed ones with a reason; a shard
    that cannot be opened or is truncated adds one failure row keyed SHARD_ERROR_PREFIX, and
    members that belong to no sample (hidden files, links) one keyed SHARD_SKIPPED_PREFIX.
    require_label=False (prediction): a missing or unreadable label is no failure, the
    sample is decoded with label -1.
    """
    builder = _BatchBuilder(shard)
    blank = np.zeros((image_size, image_size, 3), dtype=np.uint8)
    total = 0
    skipped = SkippedMembers()
    try:
        fs, path = uri_lib.resolve(shard)
        with fs.open_input_stream(path, buffer_size=uri_lib.STREAM_BUFFER_BYTES) as stream:
            for sample in iter_tar_samples(stream, skipped):
                total += 1
                label, true_label, problem = sample_labels(sample, class_names)
                problem = sample.problem or (problem if require_label else None)
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
    if skipped.names:
        total += 1
        key = f"{SHARD_SKIPPED_PREFIX}/{uri_lib.basename(shard)}"
        builder.add(key, MISSING_LABEL, MISSING_LABEL, blank, STATUS_FAILED, skipped.reason())
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
