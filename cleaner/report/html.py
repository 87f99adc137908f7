"""A self-contained HTML report of a cleaning run: one file, plots embedded as base64 PNG.

    html_text = render_report(manifest, summary)          # pyarrow.Table, summary.json dict
    write_report(manifest, summary, "s3://bucket/run/report.html")

The report loads nothing from elsewhere and needs no JavaScript (a filter box over the
per-class table uses an inline handler; without it the browser's find searches the table). Sections: run summary, the classes with the
lowest clean fraction, per-class loss-score histograms (those classes first) (selected clean vs not; truly clean vs noisy when true
labels are known), clean fraction per class, a per-class table, a given-vs-suggested
label confusion table, ROC and precision-recall curves of `clean_score` (true labels
only), failures, and the most confident noisy samples (with thumbnails when given).

Everything is capped so that a run with K ~ 1000 classes and millions of rows still gives
a small, fast report (panels, bars, table rows; see the MAX_* constants). Every text
that comes from data (class names, keys, reasons, paths) is HTML-escaped. Plots use
matplotlib's object API with the Agg canvas: no pyplot, no global figure state.
"""

from __future__ import annotations

import html
from collections.abc import Mapping

import pyarrow as pa

from cleaner.reading import uri as uri_lib
from cleaner.report.checks import section_conflicts, section_leaks, section_off_topic
from cleaner.report.common import MAX_NOISY_ROWS, SECTIONS, _ReportData, _take_column
from cleaner.report.detectors import section_detectors
from cleaner.report.plots import _section_clean_fraction, _section_histograms, _section_roc
from cleaner.report.tables import (
    _section_confusion,
    _section_failures,
    _section_noisy,
    _section_per_class,
    _section_summary,
    _section_worst,
)

__all__ = ["render_report", "top_noisy_keys", "write_report"]


CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 1.5em auto;
       max-width: 1200px; padding: 0 1em; color: #222; line-height: 1.4; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
h3 { font-size: 1.05em; margin-bottom: 0.3em; }
table { border-collapse: collapse; margin: 0.5em 0 1em 0; font-size: 0.88em; }
th, td { border: 1px solid #ddd; padding: 3px 7px; }
th { background: #f3f4f6; text-align: left; position: sticky; top: 0; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
tr:nth-child(even) td { background-color: #fafafa; }
table.kv th { position: static; }
.cards { display: flex; flex-wrap: wrap; gap: 0.8em; margin: 0.8em 0; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 0.5em 0.9em; min-width: 7em; }
.card .v { font-size: 1.4em; font-weight: 600; }
.card .l { font-size: 0.8em; color: #666; }
.card.clean .v { color: #2a9d8f; } .card.noisy .v { color: #e76f51; }
.card.failed .v { color: #888; }
.grid { display: flex; flex-wrap: wrap; gap: 2em; align-items: flex-start; }
.note { color: #666; font-size: 0.88em; }
.muted { color: #999; }
img.plot { max-width: 100%; height: auto; border: 1px solid #eee; }
img.thumb { max-width: 96px; max-height: 96px; display: block; }
td.diag { outline: 2px solid #999; }
code { background: #f3f4f6; padding: 0 3px; border-radius: 3px; }
nav a { margin-right: 1em; font-size: 0.9em; }
div.scroll { max-height: 36em; overflow-y: auto; display: inline-block; }
input.filter { margin: 0.3em 0; padding: 3px 6px; width: 22em; }
"""


def render_report(
    manifest: pa.Table,
    summary: Mapping | None,
    thumbnails: Mapping[str, bytes] | None = None,
    test_thumbnails: Mapping[str, bytes] | None = None,
) -> str:
    """The HTML text of the report for one run.

    `manifest` is the run's manifest table (see `cleaner.selection.fit_in_memory.fit_and_build_manifest`);
    `summary` the dict written to summary.json. Missing columns or keys leave out what
    needs them. `thumbnails` maps a sample key to small JPEG/PNG/GIF/WebP bytes, shown
    beside the most confident noisy samples (see `top_noisy_keys` for which keys).
    """
    summary = dict(summary or {})
    data = _ReportData.from_manifest(manifest, summary)
    parts = [
        _section_summary(data, summary),
        _section_worst(data),
        _section_histograms(data, summary),
        _section_clean_fraction(data),
        _section_per_class(data, summary),
        _section_confusion(data),
        _section_roc(data) if data.has_truth else "",
        section_detectors(manifest, summary),
        _section_failures(data, summary),
        _section_noisy(data, thumbnails or {}),
        section_off_topic(manifest, summary, thumbnails or {}),
        section_conflicts(manifest, summary, thumbnails or {}),
        section_leaks(manifest, summary, thumbnails or {}, test_thumbnails or {}),
    ]
    present = [
        (sid, title)
        for sid, title in SECTIONS
        if (sid != "roc" or data.has_truth) and (sid != "detectors" or summary.get("detectors"))
    ]
    nav = " ".join(f'<a href="#{sid}">{html.escape(title)}</a>' for sid, title in present)
    title = "CLIPCleaner report"
    output = summary.get("output")
    if output:
        title += f": {output}"
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        f"<h1>{html.escape(title)}</h1>\n<nav>{nav}</nav>\n"
        + "\n".join(p for p in parts if p)
        + "\n</body>\n</html>\n"
    )


def write_report(
    manifest: pa.Table,
    summary: Mapping | None,
    target_uri: str,
    thumbnails: Mapping[str, bytes] | None = None,
    test_thumbnails: Mapping[str, bytes] | None = None,
) -> None:
    """Render the report and write it to a local path, file:// or s3:// URI.

    test_thumbnails: by test key, for the leak section (test keys may repeat train keys)."""
    html_text = render_report(manifest, summary, thumbnails, test_thumbnails)
    uri_lib.write_text(target_uri, html_text)


def top_noisy_keys(manifest: pa.Table, n: int = MAX_NOISY_ROWS) -> list[str]:
    """Keys of the noisy rows the report lists (most confident suggestion first).

    Fetch thumbnails for these keys only and pass them to `render_report`.
    """
    data = _ReportData.from_manifest(manifest, {})
    return [str(k) for k in _take_column(manifest, "key", data.top_noisy(n))]
