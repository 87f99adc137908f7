"""The report's text sections: run summary, per-class table, given-vs-suggested
confusion table, failures, and the most confident noisy samples with thumbnails."""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
from collections.abc import Mapping

import numpy as np

from cleaner.reading import uri as uri_lib
from cleaner.reasons import group_reasons
from cleaner.report.common import (
    MAX_CONFUSION_CLASSES,
    MAX_FAILED_ROWS,
    MAX_NOISY_ROWS,
    MAX_TABLE_CLASSES,
    MAX_WORST_CLASSES,
    SOURCES,
    THUMB_MAX_BYTES,
    THUMB_SIZE,
    _fmt,
    _get,
    _is_number,
    _kv_table,
    _largest_classes,
    _note,
    _numeric,
    _pct,
    _prob,
    _ratio,
    _ReportData,
    _searchable,
    _section,
    _short,
    _table,
    _take_column,
    _worst_classes,
)


def _section_summary(data: _ReportData, summary: Mapping) -> str:
    counts = summary.get("counts") if isinstance(summary.get("counts"), Mapping) else {}

    def count(key: str, fallback: int) -> int:
        value = counts.get(key)
        return int(value) if _is_number(value) else int(fallback)

    samples = count("samples", data.n)
    clean = count("clean", int(data.clean.sum()))
    noisy = count("noisy", int(data.noisy.sum()))
    failed = count("failed", int((~data.ok).sum()))
    cards = [  # (CSS class: the card's colour, value, label)
        ("samples", f"{samples:,}", "samples"),
        ("clean", f"{clean:,}", f"clean ({_pct(_ratio(clean, samples - failed))} of usable)"),
        ("noisy", f"{noisy:,}", f"noisy ({_pct(_ratio(noisy, samples - failed))} of usable)"),
        ("failed", f"{failed:,}", f"failed ({_pct(_ratio(failed, samples))})"),
    ]
    detection = summary.get("detection") if isinstance(summary.get("detection"), Mapping) else {}
    for key in ("precision", "recall", "f1", "auroc"):
        value = detection.get(key)
        if _is_number(value):
            cards.append(("", f"{float(value):.4f}", f"selection {key} (vs true labels)"))
    card_html = "".join(
        f'<div class="card {cls}"><div class="v">{v}</div><div class="l">{html.escape(label)}</div></div>'
        for cls, v, label in cards
    )

    run_rows: list[tuple[str, str]] = []
    if summary.get("output"):
        run_rows.append(("output", f"<code>{html.escape(str(summary['output']))}</code>"))
    if summary.get("job"):
        run_rows.append(("job", _fmt(summary["job"])))
    if _is_number(summary.get("shards")):
        run_rows.append(("shards", _fmt(summary["shards"])))
    run_rows.append(("classes", _fmt(data.num_classes)))
    for key in ("ok", "duplicate_keys", "noisy_with_suggestion"):
        if _is_number(counts.get(key)):
            run_rows.append((key.replace("_", " "), _fmt(counts[key])))
    for key, label in (
        ("zero_shot_accuracy_vs_given_labels", "zero-shot accuracy vs given labels"),
        ("zero_shot_accuracy_vs_true_labels", "zero-shot accuracy vs true labels"),
        ("given_label_noise_rate", "given-label noise rate (true)"),
    ):
        if _is_number(summary.get(key)):
            run_rows.append((label, _pct(summary[key])))
    selection = summary.get("selection") if isinstance(summary.get("selection"), Mapping) else {}
    for key in ("num_backfilled", "num_backfilled_classes", "backfill_size"):
        if _is_number(selection.get(key)):
            run_rows.append((key.replace("num_", "").replace("_", " "), _fmt(selection[key])))

    detection_rows = [
        (key.replace("_", " "), _fmt(value))
        for key, value in detection.items()
        if _is_number(value) or value is None
    ]
    suggestions = summary.get("suggestions")
    suggestion_rows = (
        [(k.replace("_", " "), _fmt(v)) for k, v in suggestions.items()]
        if isinstance(suggestions, Mapping)
        else []
    )

    config = summary.get("config") if isinstance(summary.get("config"), Mapping) else {}
    config_rows = [
        (label, _fmt(value))
        for label, value in (
            ("input", _get(config, "data", "input")),
            ("classes", _get(config, "data", "classes")),
            ("model", _get(config, "model", "name")),
            ("pretrained", _get(config, "model", "pretrained")),
            ("precision", _get(config, "model", "precision")),
            ("tau", _get(config, "scoring", "tau")),
            ("probe", _get(config, "selection", "probe")),
            ("probe folds", _get(config, "selection", "probe_folds")),
            ("gmm", _get(config, "selection", "gmm")),
            ("theta_gmm", _get(config, "selection", "theta_gmm")),
            ("theta_cons", _get(config, "selection", "theta_cons")),
            ("suggest min confidence", _get(config, "selection", "suggest_min_confidence")),
            ("seed", config.get("seed")),
        )
        if value is not None
    ]
    timing_rows: list[tuple[str, str]] = []
    timings = summary.get("timings")
    if isinstance(timings, Mapping):
        timing_rows = [(k, _fmt(v)) for k, v in timings.items()]
    scoring = summary.get("scoring")
    if isinstance(scoring, Mapping):
        timing_rows += [(k.replace("_", " "), _fmt(v)) for k, v in scoring.items()]

    blocks = []
    for title, rows in (
        ("Run", run_rows),
        ("Detection vs true labels", detection_rows),
        ("Suggestions vs true labels", suggestion_rows),
        ("Configuration", config_rows),
        ("Timings and scoring", timing_rows),
    ):
        if rows:
            blocks.append(f"<div><h3>{html.escape(title)}</h3>{_kv_table(rows)}</div>")
    versions = summary.get("versions")
    extra = ""
    if isinstance(versions, Mapping) and versions:
        extra = (
            "<details><summary>Package versions</summary>"
            + _kv_table((str(k), _fmt(v)) for k, v in versions.items())
            + "</details>"
        )
    generated = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return _section(
        "summary",
        f'<div class="cards">{card_html}</div>',
        f'<div class="grid">{"".join(blocks)}</div>',
        extra,
        _note(f"Report generated {generated}."),
    )


def _criterion_counts(data: _ReportData, summary: Mapping) -> dict[str, np.ndarray]:
    """Per-class counts of each selection criterion: from the summary, else the manifest."""
    per_class = _get(summary, "selection", "per_class")
    found: dict[str, np.ndarray] = {}
    if isinstance(per_class, Mapping):
        for key, values in per_class.items():
            if key in ("total", "clean", "backfilled") or not isinstance(values, (list, tuple)):
                continue
            if len(values) == data.num_classes and all(_is_number(v) for v in values):
                found[key] = np.asarray(values, dtype=np.int64)
    if found:
        return found
    theta_gmm = _get(summary, "config", "selection", "theta_gmm")
    theta_cons = _get(summary, "config", "selection", "theta_cons")
    for source in SOURCES:
        for criterion, column, theta in (
            ("gmm", f"gmm_p_clean_{source}", theta_gmm),
            ("consistency", f"consistency_{source}", theta_cons),
        ):
            values = _numeric(data.manifest, column, np.nan, np.float64)
            if values is not None and _is_number(theta):
                found[f"{source}_{criterion}"] = data.per_class(data.ok & (values >= theta))
    return found


def _section_per_class(data: _ReportData, summary: Mapping) -> str:
    totals = data.per_class(data.ok)
    cleans = data.per_class(data.clean)
    backfilled = data.per_class(data.backfilled)
    failed = data.per_class(~data.ok)
    criteria = _criterion_counts(data, summary)
    headers = ["#", "class", "total", "clean", "noisy", "clean %", "backfilled", "failed"]
    headers += [k.replace("_", " ") for k in criteria]
    numeric = [True, False, *([True] * (len(headers) - 2))]
    if data.has_truth:
        known = data.ok & (data.true_labels >= 0)
        truly_clean = known & (data.labels == data.true_labels)
        tp = data.per_class(truly_clean & data.clean)
        selected = data.per_class(known & data.clean)
        positives = data.per_class(truly_clean)
        headers += ["true noise %", "precision", "recall"]
        numeric += [True, True, True]
        known_per_class = data.per_class(known)

    def row(label: str, name: str, idx) -> list[str]:
        def s(a):  # sum over idx (a slice or one class)
            return int(np.sum(a[idx]))

        cells = [
            label,
            name,
            _fmt(s(totals)),
            _fmt(s(cleans)),
            _fmt(s(totals) - s(cleans)),
            _pct(_ratio(s(cleans), s(totals))),
            _fmt(s(backfilled)),
            _fmt(s(failed)),
        ]
        cells += [_fmt(s(v)) for v in criteria.values()]
        if data.has_truth:
            cells += [
                _pct(_ratio(s(known_per_class) - s(positives), s(known_per_class))),
                _pct(_ratio(s(tp), s(selected))),
                _pct(_ratio(s(tp), s(positives))),
            ]
        return cells

    listed = np.nonzero((totals > 0) | (failed > 0))[0]
    notes = [_note("Every class, in label order; the box above the table filters it by name.")]
    if len(listed) > MAX_TABLE_CLASSES:
        keep = _largest_classes(totals + failed, MAX_TABLE_CLASSES)
        notes.append(
            _note(
                f"Listing the {len(keep)} largest of {len(listed)} classes (the 'all classes' "
                "row covers every class)."
            )
        )
        listed = np.array(sorted(keep))
    rows = [row("", "<b>all classes</b>", slice(None))]
    rows += [row(str(k), html.escape(data.class_names[k]), k) for k in listed]
    notes.append(
        _note(
            "Counts are over usable (not failed) samples by given label; clean includes "
            "backfilled samples. Criterion columns count the samples each criterion alone "
            "selects."
            + (
                " Precision / recall: of the class's clean selection against 'label = true label'."
                if data.has_truth
                else ""
            )
        )
    )
    table = _table(headers, rows, numeric, table_id="per-class-table")
    return _section("per-class", *notes, _searchable(table, "per-class-table", "class name"))


def _top_suggestions(data: _ReportData) -> dict[int, tuple[int, int]]:
    """Per given label: (the label most often suggested for its noisy samples, how many
    times); ties go to the lower label."""
    k = data.num_classes
    mask = data.noisy & (data.suggested >= 0) & (data.labels >= 0)
    codes, counts = np.unique(data.labels[mask] * k + data.suggested[mask], return_counts=True)
    if len(codes) == 0:
        return {}
    given, suggested = codes // k, codes % k
    order = np.lexsort((suggested, -counts, given))
    first = order[np.concatenate(([True], given[order][1:] != given[order][:-1]))]
    return {
        int(g): (int(s), int(c))
        for g, s, c in zip(given[first], suggested[first], counts[first], strict=True)
    }


def _section_worst(data: _ReportData) -> str:
    usable = data.ok & (data.labels >= 0)
    worst = _worst_classes(data, usable, MAX_WORST_CLASSES)
    if not worst:
        return _section("worst", _note("No usable sample."))
    totals = data.per_class(usable)
    cleans = data.per_class(usable & data.clean)
    suggestions = _top_suggestions(data)
    headers = ["#", "class", "usable", "clean", "clean %", "most suggested instead", "times"]
    numeric = [True, False, True, True, True, False, True]
    if data.has_truth:
        known = usable & (data.true_labels >= 0)
        known_per_class = data.per_class(known)
        noisy_per_class = data.per_class(known & (data.labels != data.true_labels))
        headers.append("true noise %")
        numeric.append(True)
    rows = []
    for k in worst:
        suggested, times = suggestions.get(k, (-1, 0))
        row = [
            str(k),
            html.escape(data.class_names[k]),
            _fmt(int(totals[k])),
            _fmt(int(cleans[k])),
            _pct(_ratio(int(cleans[k]), int(totals[k]))),
            html.escape(data.name(suggested)),
            _fmt(times) if times else "",
        ]
        if data.has_truth:
            row.append(_pct(_ratio(int(noisy_per_class[k]), int(known_per_class[k]))))
        rows.append(row)
    present = int((totals > 0).sum())
    note = _note(
        f"The {len(worst)} of {present} classes with the lowest share of their usable samples "
        "selected clean, lowest first (ties: the larger class first). 'Most suggested "
        "instead': the label most often suggested for the class's noisy samples."
    )
    return _section("worst", note, _table(headers, rows, numeric))


def _section_confusion(data: _ReportData) -> str:
    rows_mask = data.noisy & (data.suggested >= 0) & (data.labels >= 0)
    given = data.labels[rows_mask]
    suggested = data.suggested[rows_mask]
    without = int((data.noisy & (data.suggested < 0)).sum())
    intro = _note(
        f"{len(given):,} noisy samples have a suggested label; {without:,} have none "
        "(not confident enough). Rows: given label; columns: suggested label."
    )
    if len(given) == 0:
        return _section("confusion", intro)
    k = data.num_classes
    codes, counts = np.unique(given * k + suggested, return_counts=True)
    pair_given, pair_sugg = codes // k, codes % k
    involvement = np.bincount(pair_given, counts, minlength=k) + np.bincount(
        pair_sugg, counts, minlength=k
    )
    involved = np.nonzero(involvement > 0)[0]
    top = involved[np.lexsort((involved, -involvement[involved]))][:MAX_CONFUSION_CLASSES]
    top = np.sort(top)
    position = np.full(k, -1, np.int64)
    position[top] = np.arange(len(top))
    matrix = np.zeros((len(top), len(top)), np.int64)
    inside = (position[pair_given] >= 0) & (position[pair_sugg] >= 0)
    np.add.at(matrix, (position[pair_given[inside]], position[pair_sugg[inside]]), counts[inside])
    row_totals = np.bincount(pair_given, counts, minlength=k).astype(np.int64)
    peak = max(int(matrix.max()), 1)
    notes = [intro]
    if len(involved) > len(top):
        notes.append(
            _note(f"Showing the {len(top)} most involved of {len(involved)} classes involved.")
        )
    head = "".join(
        f'<th class="num" title="{html.escape(data.class_names[c])}">'
        f"{html.escape(_short(data.class_names[c]))}</th>"
        for c in top
    )
    body = []
    for i, g in enumerate(top):
        cells = []
        for j, s in enumerate(top):
            value = int(matrix[i, j])
            diag = ' diag"' if g == s else '"'
            if value:
                alpha = 0.12 + 0.75 * value / peak
                style = f' style="background-color: rgba(231,111,81,{alpha:.2f})"'
                cells.append(f'<td class="num{diag}{style}>{value:,}</td>')
            else:
                cells.append(f'<td class="num{diag}></td>')
        body.append(
            f"<tr><th>{html.escape(data.class_names[g])}</th>{''.join(cells)}"
            f'<td class="num"><b>{int(row_totals[g]):,}</b></td></tr>'
        )
    table = (
        f"<table><thead><tr><th>given \\ suggested</th>{head}"
        f'<th class="num">all suggestions</th></tr></thead><tbody>{"".join(body)}</tbody></table>'
    )
    return _section("confusion", *notes, '<div style="overflow-x: auto">' + table + "</div>")


def _section_failures(data: _ReportData, summary: Mapping) -> str:
    failed_idx = np.nonzero(~data.ok)[0]
    by_reason = _get(summary, "counts", "failed_by_reason")
    if not isinstance(by_reason, Mapping):
        by_reason = group_reasons(_take_column(data.manifest, "reason", failed_idx))
    if len(failed_idx) == 0 and not by_reason:
        return _section("failures", _note("No sample failed."))
    content = [
        "<h3>By reason</h3>",
        _table(
            ["reason", "samples"],
            [[html.escape(str(r)), _fmt(c)] for r, c in by_reason.items()],
            [False, True],
        ),
    ]
    first = failed_idx[:MAX_FAILED_ROWS]
    if len(first):
        keys = _take_column(data.manifest, "key", first)
        shards = _take_column(data.manifest, "shard", first)
        reasons = _take_column(data.manifest, "reason", first)
        rows = [
            [
                html.escape(str(key)) if key is not None else _fmt(None),
                html.escape(uri_lib.basename(str(shard))) if shard else _fmt(None),
                html.escape(str(reason or "")),
            ]
            for key, shard, reason in zip(keys, shards, reasons, strict=True)
        ]
        content.append(f"<h3>First {len(first)} of {len(failed_idx):,} failed samples</h3>")
        content.append(_table(["key", "shard", "reason"], rows, [False, False, False]))
    return _section("failures", *content)


_IMAGE_TYPES = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)


def _image_mime(data: bytes) -> str | None:
    for magic, mime in _IMAGE_TYPES:
        if data.startswith(magic):
            return mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def _shrink(data: bytes) -> bytes | None:
    """A THUMB_SIZE JPEG of an image too large to embed as is (None if it cannot be read)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            image = image.convert("RGB")
            image.thumbnail((THUMB_SIZE, THUMB_SIZE))
            out = io.BytesIO()
            image.save(out, format="JPEG", quality=80)
            return out.getvalue()
    except Exception:  # an unreadable thumbnail must not break the report
        return None


def _thumbnail_tag(data: bytes | None, key: str) -> str:
    if not data:
        return '<span class="muted">—</span>'
    data = bytes(data)
    if len(data) > THUMB_MAX_BYTES or _image_mime(data) is None:
        data = _shrink(data)
        if data is None:
            return '<span class="muted">unreadable</span>'
    mime = _image_mime(data)
    encoded = base64.b64encode(data).decode("ascii")
    return f'<img class="thumb" alt="{html.escape(key)}" src="data:{mime};base64,{encoded}">'


def _section_noisy(data: _ReportData, thumbnails: Mapping[str, bytes]) -> str:
    top = data.top_noisy(MAX_NOISY_ROWS)
    total = int(data.noisy.sum())
    if len(top) == 0:
        return _section("noisy", _note("No noisy sample."))
    keys = _take_column(data.manifest, "key", top)
    shards = _take_column(data.manifest, "shard", top)
    show_thumbs = bool(thumbnails)
    headers = ["thumbnail"] if show_thumbs else []
    headers += ["key", "shard", "given label", "suggested", "confidence", "clean_score"]
    numeric = [False] * (len(headers) - 2) + [True, True]
    if data.has_truth:
        headers.append("true label")
        numeric.append(False)
    rows = []
    for i, key, shard in zip(top, keys, shards, strict=True):
        key_text = "" if key is None else str(key)
        cells = [_thumbnail_tag(thumbnails.get(key_text), key_text)] if show_thumbs else []
        cells += [
            html.escape(key_text),
            html.escape(uri_lib.basename(str(shard))) if shard else _fmt(None),
            html.escape(data.name(int(data.labels[i]))),
            html.escape(data.name(int(data.suggested[i]))),
            _prob(data.confidence[i]),
            _prob(data.clean_score[i]) if data.clean_score is not None else _fmt(None),
        ]
        if data.has_truth:
            truth = int(data.true_labels[i])
            mark = ""
            if truth >= 0 and truth == int(data.suggested[i]):
                mark = " ✓"
            cells.append(html.escape(data.name(truth)) + mark)
        rows.append(cells)
    notes = [
        _note(
            f"The {len(top)} noisy samples (of {total:,}) whose suggested label is the most "
            "confident (combined zero-shot and probe probability)."
            + (" ✓: the suggestion is the true label." if data.has_truth else "")
        )
    ]
    return _section("noisy", *notes, _table(headers, rows, numeric))
