"""The shard reader: grouping, labels, decoding, and failures that become rows."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cleaner.reading.shards import (
    SHARD_ERROR_PREFIX,
    decode_image,
    fetch_thumbnails,
    parse_label,
    read_shard,
    split_member_name,
)
from tests.conftest import jpeg, tar_entry, write_tar

CLASSES = ["circle", "square", "star"]


def read_all(path: Path, batch_size: int = 256) -> tuple[list[dict], dict]:
    batches = list(
        read_shard(
            str(path),
            class_names=CLASSES,
            image_size=16,
            extensions=["jpg", "png"],
            batch_size=batch_size,
        )
    )
    merged = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    return batches, merged


def test_split_member_name_uses_first_dot_of_file_name():
    assert split_member_name("a/b.c/key.seg.JPG") == ("a/b.c/key", "seg.jpg")
    assert split_member_name("k001.cls") == ("k001", "cls")
    assert split_member_name("./dir/README") == ("dir/README", "")


@pytest.mark.parametrize(
    ("value", "expected"),
    [(1, (1, None)), ("2\n", (2, None)), ("star", (2, None)), ("7", (-1, "out of range"))],
)
def test_parse_label(value, expected):
    label, problem = parse_label(value, CLASSES)
    assert label == expected[0]
    assert (problem is None) if expected[1] is None else (expected[1] in problem)


def test_parse_label_rejects_unknown_names_and_bools():
    assert "neither an integer nor a known class name" in parse_label("hexagon", CLASSES)[1]
    assert parse_label(True, CLASSES)[0] == -1


def test_decode_image_resizes_short_side_and_centre_crops():
    img = Image.new("RGB", (60, 30), (0, 0, 0))
    img.paste((255, 255, 255), (20, 0, 40, 30))  # white centre stripe
    out = decode_image(_png(img), 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert out[:, 8].mean() > 200 and out[:, 0].mean() < 60


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_every_sample_appears_once_with_status_and_reason(tmp_path):
    members = [
        ("good.jpg", jpeg()),
        ("good.cls", b"1"),
        ("named.jpg", jpeg()),
        ("named.cls", b"star"),
        ("json.png", _png(Image.new("RGB", (20, 20)))),
        ("json.json", json.dumps({"label": 0, "true_label": 2}).encode()),
        ("corrupt.jpg", b"not an image at all"),
        ("corrupt.cls", b"0"),
        ("nolabel.jpg", jpeg()),
        ("outofrange.jpg", jpeg()),
        ("outofrange.cls", b"9"),
        ("noimage.cls", b"1"),
        ("split.jpg", jpeg()),
        ("other.jpg", jpeg()),
        ("other.cls", b"0"),
        ("split.cls", b"1"),  # same key again, apart: gathered into one sample
    ]
    _, rows = read_all(write_tar(tmp_path / "mixed.tar", members))
    by_key = {}
    for i, key in enumerate(rows["key"]):
        by_key.setdefault(key, []).append(i)
    assert sum(len(v) for v in by_key.values()) == len(rows["key"]) == 9
    status = {k: rows["status"][v[-1]] for k, v in by_key.items()}
    reason = {k: rows["reason"][v[-1]] for k, v in by_key.items()}
    assert status["good"] == status["named"] == status["json"] == status["other"] == "ok"
    assert status["split"] == "ok" and len(by_key["split"]) == 1
    assert rows["label"][by_key["named"][0]] == 2
    assert rows["true_label"][by_key["json"][0]] == 2
    assert "image decode error" in reason["corrupt"]
    assert "no label" in reason["nolabel"]
    assert "out of range" in reason["outofrange"]
    assert "no image member" in reason["noimage"]
    assert rows["shard_total"].max() == 9
    assert list(rows["shard_pos"]) == list(range(9))


def test_last_batch_carries_total_even_on_batch_boundary(tmp_path):
    members = []
    for i in range(6):
        members += [(f"k{i}.jpg", jpeg()), (f"k{i}.cls", b"0")]
    batches, rows = read_all(write_tar(tmp_path / "six.tar", members), batch_size=3)
    assert len(rows["key"]) == 6
    assert all(b["shard_total"].max() == -1 for b in batches[:-1])
    assert batches[-1]["shard_total"].max() == 6


def test_truncated_tar_keeps_read_samples_and_adds_a_shard_failure(tmp_path):
    members = []
    for i in range(5):
        members += [(f"k{i}.jpg", jpeg(size=(200, 200))), (f"k{i}.cls", b"0")]
    path = write_tar(tmp_path / "full.tar", members)
    data = path.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2])
    _, rows = read_all(cut)
    ok = rows["status"] == "ok"
    assert 0 < ok.sum() < 5
    shard_rows = [k for k in rows["key"] if k.startswith(SHARD_ERROR_PREFIX)]
    assert len(shard_rows) == 1
    assert "shard unreadable" in rows["reason"][list(rows["key"]).index(shard_rows[0])]
    assert rows["shard_total"].max() == len(rows["key"])


def test_tar_cut_at_a_member_boundary_is_reported(tmp_path):
    members = []
    for i in range(4):
        members += [(f"k{i}.jpg", jpeg()), (f"k{i}.cls", b"0")]
    whole = write_tar(tmp_path / "whole.tar", members).read_bytes()
    with tarfile.open(tmp_path / "whole.tar") as tar:
        boundary = next(m for m in tar.getmembers() if m.name == "k2.jpg").offset
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole[:boundary])
    _, rows = read_all(cut)
    assert [k for k, s in zip(rows["key"], rows["status"], strict=True) if s == "ok"] == [
        "k0",
        "k1",
    ]
    assert "truncated tar" in rows["reason"][-1]


def test_empty_and_missing_shards_report_a_failure_row(tmp_path):
    _, rows = read_all(write_tar(tmp_path / "empty.tar", []))
    assert list(rows["status"]) == ["failed"] and "empty shard" in rows["reason"][0]
    _, rows = read_all(tmp_path / "missing.tar")
    assert list(rows["status"]) == ["failed"] and "shard unreadable" in rows["reason"][0]


def test_thumbnails_are_read_back_for_the_wanted_keys_only(tmp_path):
    first = write_tar(
        tmp_path / "a.tar",
        [("wide.jpg", jpeg("red", (200, 100))), ("wide.cls", b"0"),
         ("small.png", _png(Image.new("RGB", (20, 10), "blue"))), ("small.cls", b"1"),
         ("unwanted.jpg", jpeg()), ("text.txt", b"no image here")],
    )  # fmt: skip
    second = write_tar(tmp_path / "b.tar", [("other.jpg", jpeg("green", (50, 50)))])
    wanted = {str(first): ["wide", "small", "text", "absent"], str(second): ["other"],
              str(tmp_path / "missing.tar"): ["gone"]}  # fmt: skip
    thumbs = fetch_thumbnails(wanted, ["jpg", "png"], size=32)
    assert sorted(thumbs) == ["other", "small", "wide"]  # no image, absent, missing: left out
    sizes = {key: Image.open(io.BytesIO(data)) for key, data in thumbs.items()}
    assert all(img.format == "PNG" and img.mode == "RGB" for img in sizes.values())
    assert sizes["wide"].size == (32, 16)  # fitted in 32 x 32, aspect kept
    assert sizes["small"].size == (20, 10)  # never enlarged
    assert sizes["other"].getpixel((5, 5))[1] > 100  # the right image: green
    assert fetch_thumbnails({str(first): ["small"]}, ["jpg"]) == {}  # extension not accepted


def test_thumbnails_skip_unwanted_samples_and_unreadable_shards_and_convert_to_rgb(tmp_path):
    """An unreadable shard listed first and an unwanted sample before a wanted one do not
    stop the search; grey images become RGB; the default thumbnail fits in 96 x 96."""
    grey = _png(Image.new("L", (200, 100), 90))
    shard = write_tar(
        tmp_path / "a.tar",
        [("skip.jpg", jpeg()), ("skip.cls", b"0"), ("grey.png", grey), ("grey.cls", b"1"),
         ("later.jpg", jpeg("blue", (30, 300))), ("later.cls", b"2")],
    )  # fmt: skip
    wanted = {str(tmp_path / "missing.tar"): ["gone"], str(shard): ["grey", "later"]}
    thumbs = fetch_thumbnails(wanted, ["jpg", "png"])
    assert sorted(thumbs) == ["grey", "later"]
    images = {key: Image.open(io.BytesIO(data)) for key, data in thumbs.items()}
    assert images["grey"].mode == "RGB" and images["grey"].size == (96, 48)
    assert images["later"].size == (10, 96)


def test_skipped_members_are_counted_by_kind_and_named_up_to_three():
    from cleaner.reading.shards import SkippedMembers

    skipped = SkippedMembers()
    for name, why in [(".a", "hidden"), ("l1", "links"), (".b", "hidden"), ("l2", "links"),
                      (".c", "hidden")]:  # fmt: skip
        skipped.add(name, why)
    assert skipped.why == {"hidden": 3, "links": 2}
    assert skipped.reason() == (
        "tar members not read as samples: 3 hidden, 2 links ('.a', 'l1', '.b' and 2 more)"
    )
    three = SkippedMembers()
    for name in ("x", "y", "z"):
        three.add(name, "hidden")
    assert three.reason() == "tar members not read as samples: 3 hidden ('x', 'y', 'z')"
    four = SkippedMembers()
    for name in ("w", "x", "y", "z"):
        four.add(name, "hidden")
    assert four.reason().endswith("('w', 'x', 'y' and 1 more)")


def test_read_shard_batches_word_for_word(tmp_path):
    """Every column of every batch with its dtype; each failure's reason exactly; a row
    held back so that only the last batch carries the shard total (-1 before)."""
    members = [
        ("a.jpg", jpeg()), ("a.cls", b"0"),
        ("latin.jpg", jpeg()), ("latin.cls", "é".encode("latin-1")),
        ("list.jpg", jpeg()), ("list.json", b'["label", 1]'),
        ("noimage.cls", b"1"),
        ("broken.jpg", b"not an image"), ("broken.cls", b"2"),
        (".hidden", b"x"),
    ]  # fmt: skip
    path = write_tar(tmp_path / "s.tar", members)
    batches = list(
        read_shard(str(path), class_names=CLASSES, image_size=16, extensions=["jpg", "png"],
                   batch_size=2)
    )  # fmt: skip
    assert [len(b["key"]) for b in batches] == [2, 2, 2]
    dtypes = {"key": object, "shard_pos": np.int64, "shard": object, "label": np.int64,
              "true_label": np.int64, "image": np.uint8, "status": object, "reason": object,
              "shard_total": np.int64}  # fmt: skip
    for batch in batches:
        assert {name: batch[name].dtype for name in batch} == dtypes
        assert batch["image"].shape == (2, 16, 16, 3)
    assert [list(b["shard_total"]) for b in batches] == [[-1, -1], [-1, -1], [6, 6]]
    rows = {name: np.concatenate([b[name] for b in batches]) for name in dtypes}
    assert list(rows["shard"]) == [str(path)] * 6
    assert list(rows["shard_pos"]) == list(range(6))
    assert list(rows["key"]) == ["a", "latin", "list", "noimage", "broken",
                                 "__shard_skipped__/s.tar"]  # fmt: skip
    assert list(rows["status"]) == ["ok"] + ["failed"] * 5
    assert list(rows["reason"]) == [
        "",
        "unreadable .cls (not UTF-8 text)",
        "no label (.cls or .json 'label')",  # a JSON list is no metadata
        "no image member (expected one of jpg, png)",
        "image decode error: UnidentifiedImageError: cannot identify image file",
        "tar members not read as samples: 1 hidden or metadata files ('.hidden')",
    ]
    assert (rows["image"][1:] == 0).all() and rows["image"][0].any()

    _, empty = read_all(write_tar(tmp_path / "empty.tar", []))
    assert list(empty["reason"]) == ["empty shard: no samples"]
    assert list(empty["shard_total"]) == [1]
    _, missing = read_all(tmp_path / "missing.tar")
    assert missing["reason"][0].startswith("shard unreadable after 0 samples: FileNotFoundError: ")


def test_read_shard_defaults_and_passes_its_image_options(tmp_path):
    """257 samples come in batches of 256 and 1 by default; resize options reach the
    decoder (longest side with a fill colour, bilinear), and the default fill is black."""
    noise = np.random.default_rng(0).integers(0, 256, (20, 40, 3), dtype=np.uint8)
    wide = _png(Image.fromarray(noise))
    members = [(f"k{i:03d}.png", wide) for i in range(257)]
    members += [(f"k{i:03d}.cls", b"0") for i in range(257)]
    path = str(write_tar(tmp_path / "big.tar", members))
    common = {"class_names": CLASSES, "image_size": 16, "extensions": ["png"]}
    assert [len(b["key"]) for b in read_shard(path, **common)] == [256, 1]
    options = {"resize_mode": "longest", "interpolation": "bilinear", "fill_color": 255}
    first = next(read_shard(path, batch_size=1, **common, **options))["image"][0]
    np.testing.assert_array_equal(first, decode_image(wide, 16, **options))
    assert (first[0] == 255).all()  # the padding above the wide image
    assert not np.array_equal(first, decode_image(wide, 16, "longest", "bicubic", 255))
    black = next(read_shard(path, batch_size=1, resize_mode="longest", **common))["image"][0]
    assert (black[0] == 0).all()


def test_a_sample_waits_for_its_label_and_is_handed_out_as_soon_as_complete(tmp_path):
    """A sample with an image but no label yet stays pending while another key comes
    between (its label arrives later); a complete sample is handed out before the rest
    of the tar is read."""
    from cleaner.reading.shards import iter_tar_samples

    members = [("a.jpg", jpeg()), ("a.txt", b"note"), ("b.jpg", jpeg()), ("b.cls", b"1"),
               ("a.cls", b"0"), ("c.jpg", jpeg()), ("c.cls", b"2")]  # fmt: skip
    path = write_tar(tmp_path / "wait.tar", members)
    with open(path, "rb") as stream:
        samples = list(iter_tar_samples(stream))
    by_key = {s.key: s for s in samples}
    assert sorted(by_key) == ["a", "b", "c"] and len(samples) == 3
    assert by_key["a"].problem is None and set(by_key["a"].members) == {"jpg", "txt", "cls"}

    more = [
        (f"z{i:02d}.{ext}", data)
        for i in range(40)
        for ext, data in (("jpg", jpeg()), ("cls", b"0"))
    ]
    data = io.BytesIO(write_tar(tmp_path / "long.tar", members[2:4] + more).read_bytes())
    first = next(iter_tar_samples(data))
    assert first.key == "b" and data.tell() < len(data.getvalue()) // 2


def test_resize_image_defaults_edges_and_interpolation():
    """Defaults (short side, bicubic, black fill), the exact error for an unknown mode and
    an empty image, one-pixel strips kept one pixel thick, bilinear honoured in every
    mode (against PIL's own resize and crop)."""
    from cleaner.reading.shards import resize_image

    noise = np.random.default_rng(0).integers(0, 256, (20, 40, 3), dtype=np.uint8)
    wide = Image.fromarray(noise)
    np.testing.assert_array_equal(
        resize_image(wide, 10), resize_image(wide, 10, "shortest", "bicubic", 0)
    )
    bilinear = resize_image(wide, 10, "shortest", "bilinear")
    expected = wide.resize((20, 10), Image.Resampling.BILINEAR).crop((5, 0, 15, 10))
    np.testing.assert_array_equal(bilinear, np.asarray(expected))
    assert not np.array_equal(bilinear, resize_image(wide, 10))
    padded = resize_image(wide, 10, "longest")
    assert (padded[:2] == 0).all() and (padded[-2:] == 0).all()  # black above and below
    with pytest.raises(ValueError) as error:
        resize_image(wide, 10, "crop")
    assert str(error.value) == "unknown resize_mode 'crop' (shortest, squash or longest)"
    for empty in ((0, 5), (5, 0)):
        with pytest.raises(ValueError) as error:
            resize_image(Image.new("RGB", empty), 8)
        assert str(error.value) == "empty image"
    for size in ((1, 3), (3, 1)):
        assert resize_image(Image.new("RGB", size, "white"), 8).shape == (8, 8, 3)
    strip = resize_image(Image.new("RGB", (100, 1), "white"), 8, "longest")
    assert (strip.any(axis=(1, 2))).sum() == 1  # one row of image, the rest fill
    column = resize_image(Image.new("RGB", (1, 100), "white"), 8, "longest")
    assert (column.any(axis=(0, 2))).sum() == 1


@pytest.mark.parametrize("compression", ["gz", "bz2", "xz"])
def test_compressed_tars_are_read_like_plain_ones(tmp_path, compression):
    from cleaner.reading.shards import iter_tar_samples

    members = [("a.jpg", jpeg()), ("a.cls", b"0"), ("b.jpg", jpeg()), ("b.cls", b"1")]
    path = write_tar(tmp_path / f"s.tar.{compression}", members, mode=f"w:{compression}")
    with open(path, "rb") as stream:
        samples = list(iter_tar_samples(stream))
    assert [(s.key, sorted(s.members), s.problem) for s in samples] == [
        ("a", ["cls", "jpg"], None),
        ("b", ["cls", "jpg"], None),
    ]


def test_prefixed_stream_hands_out_its_head_then_the_rest():
    from cleaner.reading.shards import _Prefixed

    for size in (None, -1):
        stream = _Prefixed(b"abc", io.BytesIO(b"defgh"))
        assert stream.read(size) == b"abcdefgh" and stream.read() == b"" and stream.head == b""
    stream = _Prefixed(b"abc", io.BytesIO(b"defgh"))
    assert stream.read(2) == b"ab" and stream.read(3) == b"cde" and stream.read() == b"fgh"
    stream = _Prefixed(b"abc", io.BytesIO(b"defgh"))
    assert stream.read(0) == b"" and stream.head == b"abc" and stream.read() == b"abcdefgh"


def test_directories_links_and_hidden_members_do_not_stop_the_samples_after_them(tmp_path):
    from cleaner.reading.shards import SkippedMembers, iter_tar_samples

    members = [("sub/.DS_Store", b"x"), ("sub/a.jpg", jpeg()), ("sub/a.cls", b"0"),
               ("../up.jpg", jpeg()), ("../up.cls", b"1")]  # fmt: skip
    entries = [tar_entry("sub", tarfile.DIRTYPE),
               tar_entry("sub/link.jpg", tarfile.SYMTYPE, "elsewhere.jpg")]  # fmt: skip
    path = write_tar(tmp_path / "mixed.tar", members, entries=entries)
    skipped = SkippedMembers()
    with open(path, "rb") as stream:
        samples = list(iter_tar_samples(stream, skipped))
    assert [s.key for s in samples] == ["sub/a", "../up"]
    assert samples[0].problem is None
    assert samples[1].problem == "member path has a '..' component (points outside the tar)"
    assert skipped.why == {"links or special files": 1, "hidden or metadata files": 1}
    with open(path, "rb") as stream:  # without a SkippedMembers of the caller's
        assert [s.key for s in iter_tar_samples(stream)] == ["sub/a", "../up"]


def test_a_tar_with_a_single_end_block_is_complete(tmp_path):
    """The end-of-archive marker is two zero blocks, but one is what the reader needs to
    tell a complete tar from one cut at a member boundary."""
    from cleaner.reading.shards import iter_tar_samples

    full = write_tar(tmp_path / "full.tar", [("a.jpg", jpeg()), ("a.cls", b"0")]).read_bytes()
    with tarfile.open(fileobj=io.BytesIO(full)) as tar:
        tar.getmembers()
        end = tar.offset  # where the end-of-archive blocks start
    one_block = full[: end + tarfile.BLOCKSIZE]
    assert [s.key for s in iter_tar_samples(io.BytesIO(one_block))] == ["a"]
    for cut in (end, end + tarfile.BLOCKSIZE - 1):  # no end block, or a partial one
        with pytest.raises(tarfile.ReadError) as error:
            list(iter_tar_samples(io.BytesIO(full[:cut])))
        assert str(error.value) == f"truncated tar: no end-of-archive block after {end} bytes"


def test_labels_by_number_name_and_their_errors_word_for_word():
    names = ["a", "missile", "missile", "b"]
    assert parse_label(" 3 ", names) == (3, None)
    assert parse_label("b", names) == (3, None)
    assert parse_label("-3", names) == (-1, "label -3 out of range [0, 4)")
    assert parse_label(4, names) == (-1, "label 4 out of range [0, 4)")
    assert parse_label("X3", names) == (
        -1,
        "label 'X3' is neither an integer nor a known class name",
    )
    assert parse_label("missile", names) == (
        -1,
        "class name 'missile' names several classes: label by number",
    )


def test_grey_and_palette_images_decode_to_rgb():
    for mode in ("L", "P", "RGBA"):
        image = decode_image(_png(Image.new(mode, (12, 9))), 8)
        assert image.shape == (8, 8, 3) and image.dtype == np.uint8, mode


NOT_CONTIGUOUS = "tar members of this key are not contiguous (key seen earlier in shard)"


def _budgeted(tmp_path, members: list[tuple[str, int]], budget: int) -> list[tuple]:
    """(key, extensions, problem) of each sample iter_tar_samples hands out, in order, for
    members of the given sizes (bytes, not images: the reader does not decode)."""
    from cleaner.reading.shards import iter_tar_samples

    path = write_tar(tmp_path / "budget.tar", [(name, b"x" * size) for name, size in members])
    with open(path, "rb") as stream:
        samples = list(iter_tar_samples(stream, pending_bytes=budget))
    for sample in samples:
        assert sample.names == {ext: f"{sample.key}.{ext}" for ext in sample.members}
    return [(s.key, sorted(s.members), s.problem) for s in samples]


def test_samples_waiting_for_their_label_are_held_up_to_the_byte_budget(tmp_path):
    """Two images wait for labels written after both (21 bytes at most): a budget of 21
    holds both; 20 hands out the oldest one not being read (y, without its label), and
    y's label then makes a sample of its own that is not contiguous."""
    members = [("x.jpg", 10), ("y.jpg", 10), ("x.cls", 1), ("y.cls", 1)]
    assert _budgeted(tmp_path, members, 21) == [
        ("x", ["cls", "jpg"], None),
        ("y", ["cls", "jpg"], None),
    ]
    assert _budgeted(tmp_path, members, 20) == [
        ("y", ["jpg"], None),
        ("x", ["cls", "jpg"], None),
        ("y", ["cls"], NOT_CONTIGUOUS),
    ]


def test_the_byte_budget_counts_exactly_what_still_waits(tmp_path):
    """Budget 25: the bytes of handed-out samples leave the count, so only a (after c.jpg,
    30 bytes) and b (after e.jpg, 26) go early; later samples fit again (f and g wait for
    their labels at 23 bytes), and a's and b's labels come as samples of their own. Then
    a budget crossed by one byte after a sample left."""
    sizes = {"a": 10, "b": 10, "c": 10, "d": 5, "e": 1}
    members = [(f"{k}.jpg", n) for k, n in sizes.items()] + [(f"{k}.cls", 1) for k in sizes]
    members += [("f.jpg", 10), ("g.jpg", 10), ("f.cls", 1), ("g.cls", 1)]
    complete = ["cls", "jpg"]
    assert _budgeted(tmp_path, members, 25) == [
        ("a", ["jpg"], None),
        ("b", ["jpg"], None),
        ("c", complete, None),
        ("d", complete, None),
        ("e", complete, None),
        ("f", complete, None),
        ("a", ["cls"], NOT_CONTIGUOUS),
        ("b", ["cls"], NOT_CONTIGUOUS),
        ("g", complete, None),
    ]
    # budget 20: a goes when c.jpg makes 25 bytes (15 left), b when d.jpg makes 21
    members = [("a.jpg", 10), ("b.jpg", 10), ("c.jpg", 5), ("d.jpg", 6)]
    members += [("b.cls", 1), ("c.cls", 1), ("d.cls", 1)]
    assert _budgeted(tmp_path, members, 20) == [
        ("a", ["jpg"], None),
        ("b", ["jpg"], None),
        ("c", complete, None),
        ("d", complete, None),
        ("b", ["cls"], NOT_CONTIGUOUS),
    ]
