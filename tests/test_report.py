"""Tests for cleaner.report: the self-contained HTML report of a cleaning run."""

from __future__ import annotations

import base64
import datetime
import html
import io
import math
import re
import time
from collections import Counter
from html.parser import HTMLParser

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from cleaner.report import render_report, top_noisy_keys, write_report
from cleaner.report.common import HIST_BINS, SECTIONS
from cleaner.report.plots import _mixture_curves

TITLES = dict(SECTIONS)
PNG_SRC = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')
IMG_SRC = re.compile(r'<img [^>]*src="data:(image/[a-z]+);base64,([A-Za-z0-9+/=]+)"')
TOP_K = 3


def make_manifest(
    n: int = 300,
    num_classes: int = 5,
    *,
    truth: bool = True,
    probe: bool = True,
    failed_every: int = 23,
    seed: int = 0,
) -> pa.Table:
    """A synthetic manifest with the columns of cleaner.selection.fit_in_memory.fit_and_build_manifest."""
    rng = np.random.default_rng(seed)
    true_label = rng.integers(0, num_classes, n)
    flip = rng.random(n) < 0.3
    label = np.where(flip, rng.integers(0, num_classes, n), true_label)
    failed = np.zeros(n, bool)
    if failed_every:
        failed[::failed_every] = True
    status = np.where(failed, "failed", "ok").astype(object)
    p_true = rng.beta(5, 2, n)
    p_label = np.where(label == true_label, p_true, rng.beta(1, 6, n))
    max_p = np.maximum(p_label, rng.uniform(0.3, 0.9, n))
    loss = np.clip(p_label + rng.normal(0, 0.05, n), 0, 1)
    consistency = p_label / max_p
    is_clean = (loss > 0.45) & (consistency > 0.8) & ~failed
    status[~failed] = np.where(is_clean[~failed], "clean", "noisy")
    suggested = np.where(rng.random(n) < 0.8, true_label, rng.integers(0, num_classes, n))
    confidence = rng.uniform(0.3, 1.0, n).astype(np.float32)
    suggested = np.where(confidence >= 0.5, suggested, -1)
    suggested = np.where(is_clean, label, suggested)
    suggested = np.where(failed, -1, suggested)
    confidence = np.where(failed, np.nan, confidence)
    names = [f"class {k}" for k in range(num_classes)]

    def nan_failed(values: np.ndarray) -> pa.Array:
        return pa.array(np.where(failed, np.nan, values).astype(np.float32))

    def names_of(values: np.ndarray) -> list[str | None]:
        return [names[v] if v >= 0 else None for v in values]

    columns = {
        "key": [f"sample{i:06d}" for i in range(n)],
        "shard": [f"s3://bucket/train/shard-{i // 100:04d}.tar" for i in range(n)],
        "shard_pos": pa.array(np.arange(n) % 100),
        "label": pa.array(label),
        "label_name": names_of(label),
        "is_clean": pa.array(is_clean),
        "status": status.tolist(),
        "reason": ["decode error: truncated JPEG" if f else "" for f in failed],
        "suggested_label": pa.array(suggested),
        "suggested_name": names_of(suggested),
        "suggested_confidence": pa.array(confidence.astype(np.float32)),
        "clean_score": nan_failed(p_label),
        "backfilled": pa.array(np.zeros(n, bool)),
    }
    for source in ("zeroshot", "probe") if probe else ("zeroshot",):
        columns[f"p_label_{source}"] = nan_failed(p_label)
        columns[f"max_p_{source}"] = nan_failed(max_p)
        columns[f"loss_score_{source}"] = nan_failed(loss)
        columns[f"gmm_p_clean_{source}"] = nan_failed(loss)
        columns[f"consistency_{source}"] = nan_failed(consistency)
    columns["argmax_zeroshot"] = pa.array(np.where(failed, -1, suggested))
    topk = rng.integers(0, num_classes, (n, TOP_K))
    columns["topk_labels_zeroshot"] = pa.FixedSizeListArray.from_arrays(
        pa.array(topk.ravel()), TOP_K
    )
    columns["topk_probs_zeroshot"] = pa.FixedSizeListArray.from_arrays(
        pa.array(rng.random(n * TOP_K).astype(np.float32)), TOP_K
    )
    if truth:
        columns["true_label"] = pa.array(true_label)
    return pa.table(columns)


def make_summary(manifest: pa.Table, class_names: list[str] | None = None) -> dict:
    status = np.asarray(manifest.column("status").to_pylist())
    num_classes = int(manifest.column("label").to_numpy().max()) + 1
    names = class_names or [f"class {k}" for k in range(num_classes)]
    ok = status != "failed"
    labels = manifest.column("label").to_numpy()[ok]
    clean = manifest.column("is_clean").to_numpy(zero_copy_only=False)[ok]
    per_class = {
        "total": np.bincount(labels, minlength=num_classes).tolist(),
        "clean": np.bincount(labels[clean], minlength=num_classes).tolist(),
        "backfilled": [0] * num_classes,
        "zeroshot_gmm": np.bincount(labels[clean], minlength=num_classes).tolist(),
        "zeroshot_consistency": np.bincount(labels, minlength=num_classes).tolist(),
    }
    summary = {
        "job": "clean",
        "output": "s3://bucket/runs/test",
        "counts": {
            "samples": len(status),
            "ok": int(ok.sum()),
            "failed": int((~ok).sum()),
            "clean": int((status == "clean").sum()),
            "noisy": int((status == "noisy").sum()),
            "failed_by_reason": {"decode error": int((~ok).sum())},
        },
        "selection": {"num_clean": int(clean.sum()), "per_class": per_class},
        "class_names": names,
        "zero_shot_accuracy_vs_given_labels": 0.71,
        "timings": {"setup_s": 1.5, "scoring_s": 12.25, "total_s": 20.0},
        "config": {
            "model": {"name": "ViT-B-32", "pretrained": "openai"},
            "selection": {"probe": "crossfit", "theta_gmm": 0.5, "theta_cons": 0.8},
        },
        "versions": {"python": "3.11", "torch": "2.5"},
    }
    if "true_label" in manifest.column_names:
        summary["detection"] = {"precision": 0.93, "recall": 0.81, "f1": 0.866, "auroc": 0.95}
        summary["zero_shot_accuracy_vs_true_labels"] = 0.8
    return summary


class SectionTables(HTMLParser):
    """The tables of a report, by section id: {section: [table: [row: [cell]]]}, each cell
    (tag, text, attributes); plus each section's notes (the <p class="note"> texts)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tables: dict[str, list[list[list[tuple[str, str, dict]]]]] = {}
        self.notes: dict[str, list[str]] = {}
        self._section = ""
        self._cell: tuple[str, dict] | None = None
        self._note: list[str] | None = None
        self._text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "section":
            self._section = attributes.get("id") or ""
        elif tag == "table":
            self.tables.setdefault(self._section, []).append([])
        elif tag == "tr":
            self.tables[self._section][-1].append([])
        elif tag in ("td", "th"):
            self._cell, self._text = (tag, attributes), []
        elif tag == "p" and attributes.get("class") == "note":
            self._note = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            cell_tag, attributes = self._cell
            text = "".join(self._text).strip()
            self.tables[self._section][-1][-1].append((cell_tag, text, attributes))
            self._cell = None
        elif tag == "p" and self._note is not None:
            self.notes.setdefault(self._section, []).append("".join(self._note))
            self._note = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._text.append(data)
        if self._note is not None:
            self._note.append(data)

    def rows(self, section: str) -> list[list[str]]:
        """The cell texts of the section's only table, header row first."""
        (table,) = self.tables[section]
        return [[text for _, text, _ in row] for row in table]


def section_html(text: str, section: str) -> str:
    """The markup of one section of a rendered report."""
    return text.split(f'<section id="{section}">')[1].split("</section>")[0]


def count_text(value: int) -> str:
    return f"{value:,}"


def percent_text(num: int, den: int) -> str:
    return f"{100.0 * num / den:.1f}%" if den else "—"


def png_images(text: str) -> list[Image.Image]:
    images = []
    for encoded in PNG_SRC.findall(text):
        image = Image.open(io.BytesIO(base64.b64decode(encoded)))
        image.load()
        images.append(image)
    return images


def test_full_report_has_every_section_and_decodable_plots() -> None:
    manifest = make_manifest(truth=True, probe=True)
    text = render_report(manifest, make_summary(manifest))
    assert text.startswith("<!DOCTYPE html>")
    for sid, title in SECTIONS:
        if sid != "detectors":  # only when another detector ran (test_detectors_job.py)
            assert title in text
    images = png_images(text)
    # selection histograms, truth histograms, clean-fraction bars, ROC + PR
    assert len(images) == 4
    assert all(im.format == "PNG" and im.width > 100 and im.height > 100 for im in images)
    assert "s3://bucket/runs/test" in text
    assert "ViT-B-32" in text and "crossfit" in text
    assert "0.9500" in text  # headline AUROC card
    assert "decode error" in text and "shard-0000.tar" in text
    assert "zeroshot gmm" in text and "probe gmm" not in text  # the summary's criteria


def test_criterion_counts_fall_back_to_the_manifest() -> None:
    manifest = make_manifest(truth=True, probe=True)
    summary = make_summary(manifest)
    del summary["selection"]
    text = render_report(manifest, summary)
    for column in ("zeroshot gmm", "zeroshot consistency", "probe gmm", "probe consistency"):
        assert f">{column}</th>" in text


def test_no_truth_omits_roc_and_truth_plots() -> None:
    manifest = make_manifest(truth=False, probe=False)
    text = render_report(manifest, make_summary(manifest))
    assert TITLES["roc"] not in text
    assert 'id="roc"' not in text
    assert "true label" not in text.lower().replace("vs true labels", "")
    assert len(png_images(text)) == 2  # selection histograms, clean-fraction bars
    for sid, title in SECTIONS:
        if sid not in ("roc", "detectors"):
            assert title in text


def test_class_names_and_keys_are_escaped() -> None:
    evil = "<script>alert('x')</script>"
    manifest = make_manifest(num_classes=5)
    names = [evil, "a & b", "$5 bill", "plain", 'quote "q"']
    key_col = manifest.column_names.index("key")
    keys = manifest.column("key").to_pylist()
    keys[1] = "<img src=x onerror=alert(1)>"
    manifest = manifest.set_column(key_col, "key", pa.array(keys))
    text = render_report(manifest, make_summary(manifest, names))
    assert "<script>" not in text
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in text
    assert "a &amp; b" in text
    assert "<img src=x" not in text
    assert len(png_images(text)) == 4  # "$" in a class name does not break matplotlib


def test_mostly_failed_manifest() -> None:
    manifest = make_manifest(n=200, failed_every=0)
    status = np.array(manifest.column("status").to_pylist(), dtype=object)
    status[5:] = "failed"
    manifest = manifest.set_column(
        manifest.column_names.index("status"), "status", pa.array(status.tolist())
    )
    text = render_report(manifest, {})  # no summary at all
    for sid, title in SECTIONS:
        if sid not in ("roc", "detectors"):
            assert title in text
    assert "First 20 of 195 failed samples" in text
    assert len(png_images(text)) >= 2


def test_every_sample_failed_still_renders() -> None:
    manifest = make_manifest(n=50, failed_every=1, truth=False)
    text = render_report(manifest, make_summary(manifest))
    assert "No noisy sample" in text and TITLES["failures"] in text


def test_thumbnails_are_embedded_for_listed_noisy_samples() -> None:
    manifest = make_manifest()
    keys = top_noisy_keys(manifest, 5)
    assert len(keys) == 5

    def encoded(fmt: str, colour: str, size: int = 24) -> bytes:
        out = io.BytesIO()
        Image.new("RGB", (size, size), colour).save(out, format=fmt)
        return out.getvalue()

    thumbs = {keys[0]: encoded("JPEG", "red"), keys[1]: encoded("PNG", "blue")}
    big = np.random.default_rng(0).integers(0, 255, (600, 600, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(big).save(out, format="PNG")
    thumbs[keys[2]] = out.getvalue()  # too large: re-encoded as a small JPEG
    thumbs[keys[3]] = b"not an image"
    text = render_report(manifest, make_summary(manifest), thumbnails=thumbs)
    found = [(mime, base64.b64decode(data)) for mime, data in IMG_SRC.findall(text)]
    thumbs_found = [(m, d) for m, d in found if len(d) < 200_000 and m == "image/jpeg"]
    assert len(thumbs_found) == 2
    for _, data in thumbs_found:
        with Image.open(io.BytesIO(data)) as image:
            assert max(image.size) <= 128
    assert 'class="thumb"' in text and text.count('class="thumb"') == 3
    assert "unreadable" in text
    assert len(png_images(text)) == 4 + 1  # the plots plus the PNG thumbnail
    assert SectionTables(text).rows("noisy")[0][:2] == ["thumbnail", "key"]


def test_large_class_count_lists_the_worst_classes_first_and_every_class_searchably(
    tmp_path,
) -> None:
    """Many classes: no panel per class; the lowest clean fractions first (a table, and
    the histogram panels), every class in one filterable table."""
    manifest = make_manifest(n=4000, num_classes=300, failed_every=50)
    target = tmp_path / "out" / "report.html"
    write_report(manifest, make_summary(manifest), str(target))
    text = target.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    assert "Showing the 50 classes with the lowest clean fraction, of 300 classes" in text
    assert "Showing the 30 most involved" in text
    worst_section = section_html(text, "worst")
    per_class = section_html(text, "per-class")
    assert 'input type="search" class="filter"' in per_class
    assert "getElementById(&#x27;per-class-table&#x27;)" in per_class
    assert '<table id="per-class-table">' in per_class
    assert per_class.count("<tr>") == 1 + 1 + 300  # header, all classes, every class

    rows = manifest.to_pylist()
    usable = [r for r in rows if r["status"] != "failed"]
    totals = Counter(r["label"] for r in usable)
    cleans = Counter(r["label"] for r in usable if r["is_clean"])
    expected = sorted(totals, key=lambda k: (cleans[k] / totals[k], -totals[k], k))[:50]
    listed = [int(m) for m in re.findall(r'<tr><td class="num">(\d+)</td>', worst_section)]
    assert listed == expected
    assert len(text) < 2_000_000


@pytest.mark.parametrize("drop", ["true_label", "loss_score_zeroshot", "clean_score", "status"])
def test_missing_columns_are_tolerated(drop: str) -> None:
    manifest = make_manifest()
    manifest = manifest.drop_columns([drop])
    text = render_report(manifest, {"class_names": ["a", "b"]})  # too few names: extended
    assert TITLES["per-class"] in text


def test_degenerate_inputs() -> None:
    manifest = make_manifest()
    assert "No usable sample" in render_report(manifest.slice(0, 0), {})
    assert TITLES["failures"] in render_report(manifest.select(["key"]), None)
    junk = {
        "counts": "x",
        "selection": {"per_class": {"zeroshot_gmm": [1]}},  # wrong length: ignored
        "detection": None,
        "config": 3,
        "timings": [1],
        "class_names": "abc",
    }
    assert TITLES["noisy"] in render_report(manifest, junk)


def test_mixture_curves_hold_the_class_count_and_skip_degenerate_classes() -> None:
    summary = {
        "mixtures": {
            "gmm": "per_class",
            "sources": {
                "zeroshot": {
                    "means": [[0.3, 0.8], [0.5, 0.5], [0.2, 0.7]],
                    "variances": [[0.01, 0.005], [0.01, 0.01], [0.004, 0.01]],
                    "weights": [[0.3, 0.7], [0.5, 0.5], [0.5, 0.5]],
                    "degenerate": [False, True, False],
                }
            },
        }
    }
    totals = np.array([200, 50, 80])
    curves = _mixture_curves(summary, "zeroshot", [0, 1, 2], totals)
    assert set(curves) == {0, 2}
    for k, (mixture, clean) in curves.items():
        # per-bin counts averaged over [0, 1] times the bins: the class's count
        assert abs(mixture.mean() * HIST_BINS - totals[k]) < 0.03 * totals[k]
        assert (clean <= mixture + 1e-9).all()
    # the clean component is the larger-mean one: its mass sits above 0.5
    x = np.linspace(0, 1, len(curves[0][1]))
    assert curves[0][1][x > 0.5].sum() > 0.95 * curves[0][1].sum()
    assert _mixture_curves({}, "zeroshot", [0], totals) == {}
    global_fit = {"mixtures": {**summary["mixtures"], "gmm": "global"}}
    assert set(_mixture_curves(global_fit, "zeroshot", [0, 2], totals)) == {0, 2}


# The tables against values computed here, row by row, from the manifest itself.


@pytest.fixture
def rendered() -> tuple[list[dict], dict, SectionTables]:
    """A manifest (as rows), its summary, and its rendered report's tables. Rendered for
    each test: mutmut maps a test to the functions it calls while it runs, so a report
    rendered once per module would count only for the first test that asked for it."""
    manifest = make_manifest(n=400, truth=True, probe=True, seed=4)
    summary = make_summary(manifest)
    return manifest.to_pylist(), summary, SectionTables(render_report(manifest, summary))


def test_per_class_table_counts_each_class_from_the_manifest(rendered) -> None:
    rows, summary, tables = rendered
    names = summary["class_names"]
    usable = [r for r in rows if r["status"] != "failed"]
    expected = {}
    for k, name in enumerate(names):
        mine = [r for r in usable if r["label"] == k]
        clean = [r for r in mine if r["is_clean"]]
        truly_clean = [r for r in mine if r["label"] == r["true_label"]]
        selected_truly_clean = [r for r in clean if r["label"] == r["true_label"]]
        failed = sum(1 for r in rows if r["status"] == "failed" and r["label"] == k)
        per_class = summary["selection"]["per_class"]
        expected[name] = [
            str(k),
            name,
            count_text(len(mine)),
            count_text(len(clean)),
            count_text(len(mine) - len(clean)),
            percent_text(len(clean), len(mine)),
            "0",
            count_text(failed),
            count_text(per_class["zeroshot_gmm"][k]),
            count_text(per_class["zeroshot_consistency"][k]),
            percent_text(len(mine) - len(truly_clean), len(mine)),
            percent_text(len(selected_truly_clean), len(clean)),
            percent_text(len(selected_truly_clean), len(truly_clean)),
        ]
    totals = [expected[name][2] for name in names]
    assert len(set(totals)) == len(names)  # distinct: a permuted column cannot pass
    header, everything, *class_rows = tables.rows("per-class")
    assert header[:8] == [
        "#",
        "class",
        "total",
        "clean",
        "noisy",
        "clean %",
        "backfilled",
        "failed",
    ]
    assert header[-3:] == ["true noise %", "precision", "recall"]
    assert {row[1]: row for row in class_rows} == expected
    assert [row[1] for row in class_rows] == names  # in class order
    assert everything[2:5] == [
        count_text(len(usable)),
        count_text(sum(1 for r in usable if r["is_clean"])),
        count_text(sum(1 for r in usable if not r["is_clean"])),
    ]


def test_confusion_cells_count_given_rows_against_suggested_columns(rendered) -> None:
    rows, summary, tables = rendered
    names = summary["class_names"]
    noisy = [r for r in rows if r["status"] == "noisy"]
    pairs = Counter((r["label"], r["suggested_label"]) for r in noisy if r["suggested_label"] >= 0)
    off_diagonal = [(g, s) for g, s in pairs if g != s]
    assert any(pairs[g, s] != pairs[s, g] for g, s in off_diagonal)  # transposing shows
    table = tables.tables["confusion"][0]
    header = table[0]
    assert header[0][1] == "given \\ suggested" and header[-1][1] == "all suggestions"
    columns = [attributes["title"] for _, _, attributes in header[1:-1]]
    assert columns == names  # every class is involved here
    cells = {}
    for row in table[1:]:
        given = row[0][1]
        assert row[0][0] == "th"
        for column, (_, text, _) in zip(columns, row[1:-1], strict=True):
            cells[given, column] = int(text.replace(",", "")) if text else 0
        suggested_here = sum(n for (g, _), n in pairs.items() if names[g] == given)
        assert row[-1][1] == count_text(suggested_here)
    assert cells == {(names[g], names[s]): pairs[g, s] for g in range(5) for s in range(5)}
    without = sum(1 for r in noisy if r["suggested_label"] < 0)
    assert tables.notes["confusion"][0].startswith(
        f"{sum(pairs.values()):,} noisy samples have a suggested label; {without:,} have none"
    )


def test_noisy_samples_are_listed_most_confident_first(rendered) -> None:
    rows, summary, tables = rendered
    names = summary["class_names"]
    noisy = [(i, r) for i, r in enumerate(rows) if r["status"] == "noisy"]

    def most_confident_first(item: tuple[int, dict]) -> tuple[float, int]:
        confidence = item[1]["suggested_confidence"]
        missing = confidence is None or math.isnan(confidence)
        return (math.inf if missing else -confidence, item[0])

    expected = sorted(noisy, key=most_confident_first)[:30]
    assert len(noisy) > 30  # the cut is exercised
    header, *listed = tables.rows("noisy")
    assert header == ["key", "shard", "given label", "suggested", "confidence", "clean_score",
                      "true label"]  # fmt: skip
    aligned = [
        attributes.get("class") == "num" for _, _, attributes in tables.tables["noisy"][0][0]
    ]
    assert aligned == [False, False, False, False, True, True, False]
    assert [row[0] for row in listed] == [r["key"] for _, r in expected]
    for row, (_, r) in zip(listed, expected, strict=True):
        assert row[1] == r["shard"].rsplit("/", 1)[1]
        assert row[2] == names[r["label"]]
        assert row[3] == names[r["suggested_label"]]
        assert row[4] == f"{r['suggested_confidence']:.4f}"
        assert row[5] == f"{r['clean_score']:.4f}"
        assert row[6].removesuffix(" ✓") == names[r["true_label"]]
        assert row[6].endswith("✓") == (r["true_label"] == r["suggested_label"])
    confidences = [float(row[4]) for row in listed]
    assert confidences == sorted(confidences, reverse=True)
    assert top_noisy_keys(pa.Table.from_pylist(rows), 30) == [row[0] for row in listed]


def test_thumbnails_are_embedded_as_they_are_or_shrunk_to_a_jpeg():
    """Small PNG/JPEG/GIF/WebP thumbnails are embedded byte for byte with their MIME type
    (up to THUMB_MAX_BYTES inclusive); other formats, larger files and RGBA images become
    a THUMB_SIZE RGB JPEG at quality 80; unreadable data says so."""
    from cleaner.report.common import THUMB_MAX_BYTES, THUMB_SIZE
    from cleaner.report.tables import _image_mime, _thumbnail_tag

    def encoded(image: Image.Image, fmt: str, **options) -> bytes:
        buf = io.BytesIO()
        image.save(buf, format=fmt, **options)
        return buf.getvalue()

    def embedded(tag: str) -> tuple[str, bytes]:
        match = re.search(r'src="data:([^;]+);base64,([^"]+)"', tag)
        return match.group(1), base64.b64decode(match.group(2))

    small = Image.new("RGB", (20, 10), "red")
    for fmt, mime in (("PNG", "image/png"), ("JPEG", "image/jpeg"), ("GIF", "image/gif"),
                      ("WEBP", "image/webp")):  # fmt: skip
        data = encoded(small, fmt)
        assert _image_mime(data) == mime
        assert embedded(_thumbnail_tag(data, "k")) == (mime, data)
    assert _image_mime(b"RIFF\x00\x00\x00\x00WAVEfmt ") is None
    assert _image_mime(b"RIFX\x00\x00\x00\x00WEBPVP8 ") is None
    assert _image_mime(encoded(small, "BMP")) is None

    # exactly at the limit (a PNG padded after its end): embedded as it is
    at_limit = encoded(small, "PNG")
    at_limit += b"\0" * (THUMB_MAX_BYTES - len(at_limit))
    assert embedded(_thumbnail_tag(at_limit, "k")) == ("image/png", at_limit)

    noise = np.random.default_rng(0).integers(0, 256, (300, 400, 4), dtype=np.uint8)
    large_rgba = encoded(Image.fromarray(noise, "RGBA"), "PNG")
    assert len(large_rgba) > THUMB_MAX_BYTES
    expected = Image.fromarray(noise, "RGBA").convert("RGB")
    expected.thumbnail((THUMB_SIZE, THUMB_SIZE))
    for data in (large_rgba, encoded(small, "BMP")):
        mime, shrunk = embedded(_thumbnail_tag(data, "k"))
        assert mime == "image/jpeg" and Image.open(io.BytesIO(shrunk)).mode == "RGB"
    mime, shrunk = embedded(_thumbnail_tag(large_rgba, "k"))
    assert shrunk == encoded(expected, "JPEG", quality=80)
    assert Image.open(io.BytesIO(shrunk)).size == (THUMB_SIZE, 96)
    assert "unreadable" in _thumbnail_tag(b"\0" * 100, "k")


def _cards(text: str) -> dict[str, str]:
    """The summary section's cards: {label: value}; each count card's CSS class (its
    colour) is checked to be the count's name."""
    found = re.findall(
        r'<div class="card ([^"]*)"><div class="v">([^<]*)</div><div class="l">([^<]*)</div>', text
    )
    for css, _, label in found:
        assert css == (label.split(" ")[0] if label.split(" ")[0] in COUNT_CARDS else ""), label
    assert {css for css, _, _ in found} >= set(COUNT_CARDS)
    return {html.unescape(label): value for _, value, label in found}


COUNT_CARDS = ("samples", "clean", "noisy", "failed")


def test_summary_cards_take_the_run_counts_before_the_manifest() -> None:
    """The cards show the summary's counts when it has them (a run's totals), and the
    manifest's own counts when it has none."""
    manifest = make_manifest(n=120, seed=2)
    summary = make_summary(manifest)
    summary["counts"].update(samples=10_000, clean=6_000, noisy=3_000, failed=1_000)
    cards = _cards(render_report(manifest, summary))
    assert cards["samples"] == "10,000"
    assert cards["clean (66.7% of usable)"] == "6,000"
    assert cards["noisy (33.3% of usable)"] == "3,000"
    assert cards["failed (10.0%)"] == "1,000"

    rows = manifest.to_pylist()
    failed = sum(r["status"] == "failed" for r in rows)
    clean = sum(r["status"] == "clean" for r in rows)
    noisy = sum(r["status"] == "noisy" for r in rows)
    assert len({failed, clean, noisy, 120}) == 4
    summary["counts"] = "not a mapping"
    cards = _cards(render_report(manifest, summary))
    assert cards["samples"] == "120"
    assert cards[f"clean ({percent_text(clean, 120 - failed)} of usable)"] == str(clean)
    assert cards[f"noisy ({percent_text(noisy, 120 - failed)} of usable)"] == str(noisy)
    assert cards[f"failed ({percent_text(failed, 120)})"] == str(failed)


def test_worst_classes_name_the_label_most_often_suggested_instead() -> None:
    """The worst-classes table, row by row against the manifest: lowest clean share first
    (ties: larger class first), and per class the label most often suggested for its
    noisy samples and how often (ties: the lower label); a class whose noisy samples have
    no suggestion shows none."""
    manifest = make_manifest(n=600, num_classes=6, seed=9)
    rows = manifest.to_pylist()
    for r in rows[::7]:
        r["true_label"] = -1  # true label unknown: left out of the true noise
    # class 5: its noisy rows suggest 1 and 3 equally often (a tie), and class 4's noisy
    # rows get no suggestion at all
    noisy5 = [r for r in rows if r["status"] == "noisy" and r["label"] == 5]
    for i, r in enumerate(noisy5):
        r["suggested_label"] = [3, 1][i % 2] if i < 2 * (len(noisy5) // 2) else 0
    for r in rows:
        if r["status"] == "noisy" and r["label"] == 4:
            r["suggested_label"] = -1
        elif r["status"] == "noisy" and r["label"] == 3:
            r["suggested_label"] = 0
    manifest = pa.Table.from_pylist(rows, schema=manifest.schema)
    summary = make_summary(manifest)
    names = summary["class_names"]
    tables = SectionTables(render_report(manifest, summary))
    usable = [r for r in rows if r["status"] != "failed"]
    expected = []
    for k in range(6):
        mine = [r for r in usable if r["label"] == k]
        clean = sum(r["is_clean"] for r in mine)
        suggested = Counter(
            r["suggested_label"] for r in mine if not r["is_clean"] and r["suggested_label"] >= 0
        )
        best = min(suggested, key=lambda s: (-suggested[s], s)) if suggested else None
        known = [r for r in mine if r["true_label"] >= 0]
        wrong = sum(r["true_label"] != k for r in known)
        expected.append(
            (clean / len(mine), -len(mine), k, [
                str(k), names[k], count_text(len(mine)), count_text(clean),
                percent_text(clean, len(mine)),
                names[best] if best is not None else "—",
                count_text(suggested[best]) if best is not None else "",
                percent_text(wrong, len(known)),
            ])
        )  # fmt: skip
    assert any(r["true_label"] == 0 for r in usable)
    header, *listed = tables.rows("worst")
    assert header == ["#", "class", "usable", "clean", "clean %", "most suggested instead",
                      "times", "true noise %"]  # fmt: skip
    assert listed == [row for *_, row in sorted(expected)]
    aligned = [
        attributes.get("class") == "num" for _, _, attributes in tables.tables["worst"][0][0]
    ]
    assert aligned == [True, False, True, True, True, False, True, True]
    assert listed[[row[0] for row in listed].index("5")][5] == names[1]  # the tie: lower label
    assert listed[[row[0] for row in listed].index("3")][5] == names[0]

    # one noisy sample with a suggestion in the whole run: its class names it, once
    lone = [dict(r, suggested_label=-1) if r["status"] == "noisy" else r for r in rows]
    first_noisy = next(i for i, r in enumerate(lone) if r["status"] == "noisy")
    lone[first_noisy]["suggested_label"] = 2
    lone_manifest = pa.Table.from_pylist(lone, schema=manifest.schema)
    header, *listed = SectionTables(render_report(lone_manifest, summary)).rows("worst")
    named = {row[0]: row[5:7] for row in listed}
    given = str(lone[first_noisy]["label"])
    assert named[given] == [names[2], "1"]
    assert all(v == ["—", ""] for k, v in named.items() if k != given)

    # class 4 without a sample, class 5 with one usable sample: 5 classes are present
    odd = [dict(r, label=0) if r["label"] == 4 else r for r in rows]
    fives = [i for i, r in enumerate(odd) if r["label"] == 5 and r["status"] != "failed"]
    odd = [dict(r, label=1) if r["label"] == 5 and i != fives[0] else r for i, r in enumerate(odd)]
    odd_manifest = pa.Table.from_pylist(odd, schema=manifest.schema)
    notes = SectionTables(render_report(odd_manifest, summary)).notes["worst"]
    assert notes[0].startswith("The 5 of 5 classes with the lowest share")


def test_summary_tables_word_for_word() -> None:
    """The summary section's key-value tables, each row as written from the summary: the
    run, detection, suggestions, configuration, timings and versions."""
    manifest = make_manifest(n=200, seed=3)
    summary = make_summary(manifest)
    summary["counts"].update(ok=190, duplicate_keys=3, noisy_with_suggestion=40)
    summary.update(
        shards=12,
        zero_shot_accuracy_vs_true_labels=0.8,
        given_label_noise_rate=0.4,
        detection={"precision": 0.93, "recall": 0.81, "f1": 0.866, "auroc": 0.95,
                   "true_negatives": None, "note": "text is left out"},
        suggestions={"wrong_labels_fixed_fraction": 0.5, "noisy_with_true_label": 1234},
        config={"data": {"input": "s3://bucket/in", "classes": "shapes"},
                "model": {"name": "ViT-B-32", "pretrained": "openai", "precision": "fp16"},
                "scoring": {"tau": 0.01},
                "selection": {"probe": "crossfit", "probe_folds": 5, "gmm": "per_class",
                              "theta_gmm": 0.5, "theta_cons": 0.8, "suggest_min_confidence": 0.6},
                "seed": 7},
        scoring={"images_per_second": 1234.5, "steady_images_per_second": 2000.0},
    )  # fmt: skip
    summary["selection"].update(num_backfilled=5, num_backfilled_classes=2, backfill_size=3)
    text = render_report(manifest, summary)
    run, detection, suggestions, config, timings, versions = SectionTables(text).tables["summary"]

    def pairs(table):
        return [[cell for _, cell, _ in row] for row in table]

    assert pairs(run) == [
        ["output", "s3://bucket/runs/test"], ["job", "clean"], ["shards", "12"],
        ["classes", "5"], ["ok", "190"], ["duplicate keys", "3"],
        ["noisy with suggestion", "40"], ["zero-shot accuracy vs given labels", "71.0%"],
        ["zero-shot accuracy vs true labels", "80.0%"],
        ["given-label noise rate (true)", "40.0%"], ["backfilled", "5"],
        ["backfilled classes", "2"], ["backfill size", "3"],
    ]  # fmt: skip
    assert pairs(detection) == [
        ["precision", "0.93"], ["recall", "0.81"], ["f1", "0.866"], ["auroc", "0.95"],
        ["true negatives", "—"],
    ]  # fmt: skip
    assert pairs(suggestions) == [
        ["wrong labels fixed fraction", "0.5"],
        ["noisy with true label", "1,234"],
    ]
    assert pairs(config) == [
        ["input", "s3://bucket/in"], ["classes", "shapes"], ["model", "ViT-B-32"],
        ["pretrained", "openai"], ["precision", "fp16"], ["tau", "0.01"],
        ["probe", "crossfit"], ["probe folds", "5"], ["gmm", "per_class"],
        ["theta_gmm", "0.5"], ["theta_cons", "0.8"], ["suggest min confidence", "0.6"],
        ["seed", "7"],
    ]  # fmt: skip
    assert pairs(timings) == [
        ["setup_s", "1.5"], ["scoring_s", "12.25"], ["total_s", "20"],
        ["images per second", "1,234.5"], ["steady images per second", "2,000.0"],
    ]  # fmt: skip
    assert pairs(versions) == [["python", "3.11"], ["torch", "2.5"]]
    cards = _cards(text)
    for key, value in (("precision", "0.9300"), ("recall", "0.8100"), ("f1", "0.8660"),
                       ("auroc", "0.9500")):  # fmt: skip
        assert cards[f"selection {key} (vs true labels)"] == value
    titles = re.findall(
        r"<h3>([^<]*)</h3>", text.split('id="summary"', 1)[1].split("</section>")[0]
    )
    assert titles == ["Run", "Detection vs true labels", "Suggestions vs true labels",
                      "Configuration", "Timings and scoring"]  # fmt: skip


def test_criterion_counts_from_the_manifest_include_values_at_the_threshold() -> None:
    from cleaner.report.common import _ReportData
    from cleaner.report.tables import _criterion_counts

    manifest = make_manifest(n=60, num_classes=3, probe=False, seed=5)
    rows = manifest.to_pylist()
    for i, r in enumerate(rows):
        if r["status"] != "failed":
            r["gmm_p_clean_zeroshot"] = [0.2, 0.5, 0.9][i % 3]  # 0.5: exactly theta_gmm
            r["consistency_zeroshot"] = [0.8, 0.7, 1.0][i % 3]  # 0.8: exactly theta_cons
    manifest = pa.Table.from_pylist(rows, schema=manifest.schema)
    summary = make_summary(manifest)
    del summary["selection"]
    counts = _criterion_counts(_ReportData.from_manifest(manifest, summary), summary)
    usable = [(i, r) for i, r in enumerate(rows) if r["status"] != "failed"]
    for criterion, passing in (("gmm", (1, 2)), ("consistency", (0, 2))):
        expected = [sum(1 for i, r in usable if r["label"] == k and i % 3 in passing)
                    for k in range(3)]  # fmt: skip
        assert counts[f"zeroshot_{criterion}"].tolist() == expected, criterion


def test_summary_section_without_timings_or_versions_and_its_note() -> None:
    manifest = make_manifest(n=80, seed=6)
    summary = make_summary(manifest)
    del summary["timings"]
    summary["versions"] = "not a mapping"
    summary["scoring"] = {"images_per_second": 10.0}
    text = render_report(manifest, summary)
    section = text.split('id="summary"', 1)[1].split("</section>", 1)[0]
    timings = SectionTables(text).tables["summary"][-1]
    assert [[cell for _, cell, _ in row] for row in timings] == [["images per second", "10"]]
    assert "<details>" not in section
    between = section.rsplit("</table></div></div>", 1)[1].split('<p class="note">', 1)[0]
    assert between.strip() == ""  # nothing between the tables and the note
    assert re.search(
        r'<p class="note">Report generated \d{4}-\d{2}-\d{2} \d{2}:\d{2} UTC\.</p>', section
    )


def test_the_generation_time_is_utc_whatever_the_machines_zone(monkeypatch) -> None:
    """The note's time is UTC on a machine whose local zone is not (UTC+5:30 here)."""
    manifest = make_manifest(n=40, seed=7)
    monkeypatch.setenv("TZ", "XYZ-5:30")
    time.tzset()
    try:
        before = datetime.datetime.now(datetime.UTC).replace(second=0, microsecond=0)
        text = render_report(manifest, make_summary(manifest))
        after = datetime.datetime.now(datetime.UTC)
    finally:
        monkeypatch.undo()
        time.tzset()
    stamp = re.search(r"Report generated (\d{4}-\d{2}-\d{2} \d{2}:\d{2}) UTC", text).group(1)
    generated = datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M").replace(tzinfo=datetime.UTC)
    assert before <= generated <= after


def test_per_class_numbers_are_right_aligned(rendered) -> None:
    _, _, tables = rendered
    header = tables.tables["per-class"][0][0]
    aligned = [attributes.get("class") == "num" for _, _, attributes in header]
    assert aligned == [True, False] + [True] * (len(header) - 2)


PER_CLASS_NOTE = "Every class, in label order; the box above the table filters it by name."


def _relabelled(manifest: pa.Table, names: list[str], relabel) -> pa.Table:
    """The manifest with each row's label (and label name) set by relabel(index, row)."""
    rows = manifest.to_pylist()
    for i, r in enumerate(rows):
        r["label"] = relabel(i, r)
        r["label_name"] = names[r["label"]]
    return pa.Table.from_pylist(rows, schema=manifest.schema)


def test_per_class_table_lists_the_classes_with_a_sample_usable_or_failed() -> None:
    """Of six classes: 5 has no sample (not listed), 4 only a failed one, 3 one usable one
    (both listed); the note says how the table is ordered and filtered."""
    names = [f"class {k}" for k in range(6)]
    base = make_manifest(n=200, num_classes=6, truth=False, failed_every=10, seed=8)
    failed = [i for i, s in enumerate(base.column("status").to_pylist()) if s == "failed"]
    usable = [i for i in range(200) if i not in failed]

    def relabel(i: int, r: dict) -> int:
        if i == failed[0]:
            return 4
        if i == usable[0]:
            return 3
        return r["label"] if r["label"] < 3 else 0

    manifest = _relabelled(base, names, relabel)
    summary = make_summary(manifest, names)
    del summary["selection"]
    text = render_report(manifest, summary)
    per_class = section_html(text, "per-class")
    assert 'placeholder="filter by class name" aria-label="filter by class name"' in per_class
    tables = SectionTables(text)
    _, everything, *class_rows = tables.rows("per-class")
    assert [row[0] for row in class_rows] == ["0", "1", "2", "3", "4"]
    clean = int(base.column("is_clean")[usable[0]].as_py())
    assert class_rows[3][2:5] == ["1", str(clean), str(1 - clean)]  # total, clean, noisy
    assert class_rows[4][2] == "0" and class_rows[4][7] == "1"  # total, failed
    assert everything[7] == count_text(len(failed))
    assert tables.notes["per-class"][0] == PER_CLASS_NOTE
    assert len(tables.notes["per-class"]) == 2  # no "Listing the largest" note


def test_per_class_table_beyond_its_cap_lists_the_largest_classes_with_their_failures(
    monkeypatch,
) -> None:
    """More classes than the table holds: the largest by usable + failed samples, in label
    order, and a note that says so; exactly as many as it holds: all, without that note."""
    import cleaner.report.tables as tables_module

    names = [f"class {k}" for k in range(4)]
    base = make_manifest(n=400, num_classes=4, truth=False, failed_every=0, seed=9)
    rows = base.to_pylist()
    # class 3 loses two thirds of its usable rows to failures: usable alone would rank it last
    in_three = [i for i, r in enumerate(rows) if r["label"] == 3]
    for i in in_three[: 2 * len(in_three) // 3]:
        rows[i].update(status="failed", is_clean=False, suggested_label=-1, suggested_name=None)
    manifest = pa.Table.from_pylist(rows, schema=base.schema)
    summary = make_summary(manifest, names)
    del summary["selection"]
    sizes = Counter(r["label"] for r in rows)
    usable = Counter(r["label"] for r in rows if r["status"] != "failed")
    largest = sorted(sorted(sizes, key=lambda k: (-sizes[k], k))[:2])
    assert largest != sorted(sorted(usable, key=lambda k: (-usable[k], k))[:2])

    monkeypatch.setattr(tables_module, "MAX_TABLE_CLASSES", 2)
    tables = SectionTables(render_report(manifest, summary))
    assert [int(row[0]) for row in tables.rows("per-class")[2:]] == largest
    assert tables.notes["per-class"][:2] == [
        PER_CLASS_NOTE,
        "Listing the 2 largest of 4 classes (the 'all classes' row covers every class).",
    ]
    monkeypatch.setattr(tables_module, "MAX_TABLE_CLASSES", 4)
    tables = SectionTables(render_report(manifest, summary))
    assert [int(row[0]) for row in tables.rows("per-class")[2:]] == [0, 1, 2, 3]
    assert len(tables.notes["per-class"]) == 2


COUNTS_NOTE = (
    "Counts are over usable (not failed) samples by given label; clean includes backfilled "
    "samples. Criterion columns count the samples each criterion alone selects."
)


@pytest.mark.parametrize("truth", [True, False])
def test_every_note_of_the_report_word_for_word(truth: bool, monkeypatch) -> None:
    """Each section's notes, their numbers counted here from the manifest (the confusion
    table capped at 3 classes, so that its "showing" note appears)."""
    import cleaner.report.tables as tables_module

    monkeypatch.setattr(tables_module, "MAX_CONFUSION_CLASSES", 3)
    manifest = make_manifest(n=300, num_classes=5, truth=truth, seed=10)
    rows = manifest.to_pylist()
    noisy = [r for r in rows if r["status"] == "noisy"]
    suggested = [r for r in noisy if r["suggested_label"] >= 0]
    involved = {r["label"] for r in suggested} | {r["suggested_label"] for r in suggested}
    present = len({r["label"] for r in rows if r["status"] != "failed"})
    notes = SectionTables(render_report(manifest, make_summary(manifest))).notes
    assert notes["per-class"] == [
        PER_CLASS_NOTE,
        COUNTS_NOTE
        + (
            " Precision / recall: of the class's clean selection against 'label = true label'."
            if truth
            else ""
        ),
    ]
    assert notes["worst"] == [
        f"The {present} of {present} classes with the lowest share of their usable samples "
        "selected clean, lowest first (ties: the larger class first). 'Most suggested "
        "instead': the label most often suggested for the class's noisy samples."
    ]
    assert notes["confusion"] == [
        f"{len(suggested)} noisy samples have a suggested label; {len(noisy) - len(suggested)} "
        "have none (not confident enough). Rows: given label; columns: suggested label.",
        f"Showing the 3 most involved of {len(involved)} classes involved.",
    ]
    assert notes["noisy"] == [
        f"The 30 noisy samples (of {len(noisy)}) whose suggested label is the most confident "
        "(combined zero-shot and probe probability)."
        + (" ✓: the suggestion is the true label." if truth else "")
    ]
    assert len(noisy) > 30 and len(involved) > 3 and "failures" not in notes


def test_the_notes_of_empty_sections_word_for_word() -> None:
    failed = make_manifest(n=40, failed_every=1, seed=11)
    notes = SectionTables(render_report(failed, make_summary(failed))).notes
    assert notes["worst"] == ["No usable sample."]
    assert notes["noisy"] == ["No noisy sample."]
    assert notes["confusion"] == [
        "0 noisy samples have a suggested label; 0 have none (not confident enough). "
        "Rows: given label; columns: suggested label."
    ]
    whole = make_manifest(n=40, failed_every=0, seed=11)
    summary = make_summary(whole)
    summary["counts"]["failed_by_reason"] = {}
    assert SectionTables(render_report(whole, summary)).notes["failures"] == ["No sample failed."]


def _headings(text: str, section: str) -> list[str]:
    return re.findall(r"<h3>(.*?)</h3>", section_html(text, section))


def test_failures_by_reason_and_the_first_failed_samples_word_for_word() -> None:
    """The reasons from the run's counts (in their order) or, without them, grouped from the
    manifest (most frequent first); then the first 20 failed rows: key, shard file name and
    reason, a missing key or shard shown as a dash."""
    base = make_manifest(n=500, failed_every=20, seed=12)  # 25 failed rows
    rows = base.to_pylist()
    failed = [r for r in rows if r["status"] == "failed"]
    for j, r in enumerate(failed):
        r["reason"] = "decode error: truncated JPEG" if j % 5 else "no label: missing .cls"
    failed[1].update(key=None, shard=None)
    failed[2]["reason"] = None
    manifest = pa.Table.from_pylist(rows, schema=base.schema)
    summary = make_summary(manifest)
    summary["counts"]["failed_by_reason"] = {"no label": 5, "decode error": 20}
    text = render_report(manifest, summary)
    assert _headings(text, "failures") == ["By reason", "First 20 of 25 failed samples"]
    by_reason, first = SectionTables(text).tables["failures"]
    cells = [[cell for _, cell, _ in row] for row in by_reason]
    assert cells == [["reason", "samples"], ["no label", "5"], ["decode error", "20"]]
    expected = [
        [r["key"] or "—", r["shard"].rsplit("/", 1)[1] if r["shard"] else "—", r["reason"] or ""]
        for r in failed[:20]
    ]
    assert [[cell for _, cell, _ in row] for row in first] == [
        ["key", "shard", "reason"],
        *expected,
    ]
    aligned = [[a.get("class") == "num" for _, _, a in table[0]] for table in (by_reason, first)]
    assert aligned == [[False, True], [False, False, False]]

    summary["counts"]["failed_by_reason"] = {}  # none given: the failed rows still show
    assert _headings(render_report(manifest, summary), "failures") == [
        "By reason",
        "First 20 of 25 failed samples",
    ]

    del summary["counts"]["failed_by_reason"]
    by_reason = SectionTables(render_report(manifest, summary)).tables["failures"][0]
    assert [[cell for _, cell, _ in row] for row in by_reason][1:] == [
        ["decode error: truncated JPEG", "19"],
        ["no label: missing .cls", "5"],
        ["unknown", "1"],
    ]


def _confusion(tables: SectionTables) -> tuple[list[str], dict, dict, dict]:
    """(column classes, cells {(given, suggested): n}, row totals, cell styles) of the
    confusion table, by class name."""
    header, *body = tables.tables["confusion"][0]
    columns = [attributes["title"] for _, _, attributes in header[1:-1]]
    cells, totals, styles = {}, {}, {}
    for row in body:
        given = row[0][1]
        totals[given] = row[-1][1]
        for column, (_, text, attributes) in zip(columns, row[1:-1], strict=True):
            cells[given, column] = int(text.replace(",", "")) if text else 0
            styles[given, column] = attributes.get("style")
    return columns, cells, totals, styles


def test_a_capped_confusion_table_shows_the_most_involved_classes(monkeypatch) -> None:
    """Capped at 3 of 6 classes: the classes with the most noisy samples given or suggested
    (ties: the lower label), in label order, their cells, and each row's total over all
    suggestions (hidden columns too); cells shaded by their share of the largest."""
    import cleaner.report.tables as tables_module

    monkeypatch.setattr(tables_module, "MAX_CONFUSION_CLASSES", 3)
    manifest = make_manifest(n=600, num_classes=6, seed=13)
    summary = make_summary(manifest)
    names = summary["class_names"]
    rows = manifest.to_pylist()
    pairs = Counter(
        (r["label"], r["suggested_label"])
        for r in rows
        if r["status"] == "noisy" and r["suggested_label"] >= 0
    )
    involvement = Counter()
    for (given, suggested), n in pairs.items():
        involvement[given] += n
        involvement[suggested] += n
    top = sorted(sorted(involvement, key=lambda c: (-involvement[c], c))[:3])
    text = render_report(manifest, summary)
    tables = SectionTables(text)
    columns, cells, totals, styles = _confusion(tables)
    assert columns == [names[c] for c in top] and len(involvement) == 6
    section = section_html(text, "confusion")
    assert not re.search(r"</t[hd]>[^<]", section)  # no text between the cells
    for row in tables.tables["confusion"][0][1:]:
        kinds = [attributes.get("class") for _, _, attributes in row[1:-1]]
        assert kinds == ["num diag" if row[0][1] == c else "num" for c in columns]
    assert cells == {(names[g], names[s]): pairs[g, s] for g in top for s in top}
    assert totals == {
        names[g]: count_text(sum(n for (given, _), n in pairs.items() if given == g)) for g in top
    }
    peak = max(pairs[g, s] for g in top for s in top)
    for (g, s), n in cells.items():
        alpha = f"{0.12 + 0.75 * n / peak:.2f}"
        assert styles[g, s] == (f"background-color: rgba(231,111,81,{alpha})" if n else None)

    # one noisy sample with a suggestion: two classes involved, the cell at full shade
    lone = [dict(r, suggested_label=-1) if r["status"] == "noisy" else r for r in rows]
    first = next(r for r in lone if r["status"] == "noisy")
    first["suggested_label"] = (first["label"] + 1) % 6
    tables = SectionTables(
        render_report(pa.Table.from_pylist(lone, schema=manifest.schema), summary)
    )
    columns, cells, totals, styles = _confusion(tables)
    pair = (names[first["label"]], names[first["suggested_label"]])
    assert sorted(columns) == sorted(pair) and cells[pair] == 1 and sum(cells.values()) == 1
    assert styles[pair] == "background-color: rgba(231,111,81,0.87)"
    assert len(tables.notes["confusion"]) == 1  # every involved class shown: no "showing" note


def test_a_noisy_row_without_key_shard_suggestion_or_true_label() -> None:
    """Dashes for what a noisy row lacks (its suggestion's confidence NaN: listed last), an
    empty key, and no check mark where neither the suggestion nor the true label exists."""
    base = make_manifest(n=60, num_classes=3, failed_every=0, seed=14)
    rows = base.to_pylist()
    noisy = [r for r in rows if r["status"] == "noisy"]
    noisy[0].update(key=None, shard=None, suggested_label=-1, suggested_name=None,
                    suggested_confidence=float("nan"), true_label=-1)  # fmt: skip
    manifest = pa.Table.from_pylist(rows, schema=base.schema)
    listed = SectionTables(render_report(manifest, make_summary(manifest))).rows("noisy")[1:]
    assert len(listed) == len(noisy) and noisy[0]["clean_score"] is not None
    assert listed[-1] == ["", "—", f"class {noisy[0]['label']}", "—", "—",
                          f"{noisy[0]['clean_score']:.4f}", "—"]  # fmt: skip


def test_criterion_counts_keep_only_the_summarys_per_class_lists_of_k_numbers() -> None:
    """From the summary: every per-class list of K numbers except the totals; entries of
    another length, with a non-number, or not a list are left out. Without any, from the
    manifest, for the criteria whose threshold the configuration gives."""
    from cleaner.report.common import _ReportData
    from cleaner.report.tables import _criterion_counts

    manifest = make_manifest(n=200, num_classes=3, seed=15)
    summary = make_summary(manifest)
    summary["selection"]["per_class"] = {
        "total": [9, 9, 9], "clean": [8, 8, 8], "backfilled": [0, 1, 0],
        "zeroshot_gmm": [1, 2, 3], "zeroshot_consistency": (4, 5, 6),
        "probe_gmm": [1, 2], "probe_consistency": [1, "2", 3], "note": "text",
    }  # fmt: skip
    data = _ReportData.from_manifest(manifest, summary)
    counts = _criterion_counts(data, summary)
    assert {k: v.tolist() for k, v in counts.items()} == {
        "zeroshot_gmm": [1, 2, 3],
        "zeroshot_consistency": [4, 5, 6],
    }
    assert all(v.dtype == np.int64 for v in counts.values())

    summary["selection"]["per_class"] = {"probe_gmm": [1, 2]}
    del summary["config"]["selection"]["theta_gmm"]
    counts = _criterion_counts(data, summary)
    rows = [r for r in manifest.to_pylist() if r["status"] != "failed"]
    assert sorted(counts) == ["probe_consistency", "zeroshot_consistency"]
    for source in ("zeroshot", "probe"):
        expected = Counter(r["label"] for r in rows if r[f"consistency_{source}"] >= 0.8)
        assert counts[f"{source}_consistency"].tolist() == [expected[k] for k in range(3)]

    # compared in float64: float32(0.7) is just below 0.7, so it does not pass theta 0.7
    summary["config"]["selection"]["theta_cons"] = 0.7
    usable = [r for r in manifest.to_pylist() if r["status"] != "failed"]
    for r in usable:
        r["consistency_zeroshot"] = 0.7
    table = pa.Table.from_pylist(usable, schema=manifest.schema)
    counts = _criterion_counts(_ReportData.from_manifest(table, summary), summary)
    assert counts["zeroshot_consistency"].tolist() == [0, 0, 0]


def test_the_report_reads_only_the_columns_it_uses_and_renders_the_same(tmp_path) -> None:
    """read_manifest_for_report leaves the unused columns on disk (the job's driver holds
    what it reads: half the table at 1M rows), and the report from it is the same page."""
    import pyarrow.parquet as pq

    from cleaner.selection.manifest import read_manifest_for_report

    manifest = make_manifest(n=400, seed=3)
    n = manifest.num_rows
    extra = {
        "max_similarity": pa.array(np.linspace(0.1, 0.3, n)),
        "explain_given_prompt": [f"a photo of a class {i % 5}." for i in range(n)],
        "explain_given_similarity": pa.array(np.linspace(0.2, 0.3, n)),
        "explain_suggested_prompt": [f"a drawing of a class {i % 3}." for i in range(n)],
        "explain_suggested_similarity": pa.array(np.linspace(0.25, 0.35, n)),
    }
    for name, values in extra.items():
        manifest = manifest.append_column(name, pa.array(values))
    path = tmp_path / "manifest.parquet"
    pq.write_table(manifest, path)
    read = read_manifest_for_report(str(path))
    left_out = set(manifest.column_names) - set(read.column_names)
    assert left_out == {
        "shard_pos", "argmax_zeroshot", "topk_labels_zeroshot", "topk_probs_zeroshot",
        "p_label_zeroshot", "max_p_zeroshot", "p_label_probe", "max_p_probe", *extra,
    }  # fmt: skip
    assert read.num_rows == n and read.schema.equals(manifest.select(read.column_names).schema)

    def page(table: pa.Table) -> str:
        text = render_report(table, make_summary(manifest))
        return re.sub(r"Report generated [^<]*UTC", "", text)

    assert page(read) == page(manifest)
