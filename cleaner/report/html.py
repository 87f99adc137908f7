"""A self-contained HTML report of a cleaning run: one file, plots embedded as base64 PNG.

    html_text = render_report(manifest, summary)          # pyarrow.Table, summary.json dict
    write_report(manifest, summary, "s3://bucket/run/report.html")

The report needs no JavaScript and loads nothing from elsewhere. Sections: run summary,
per-class loss-score histograms (selected clean vs not; truly clean vs noisy when true
labels are known), clean fraction per class, a per-class table, a given-vs-suggested
label confusion table, ROC and precision-recall curves of `clean_score` (true labels
only), failures, and the most confident noisy samples (with thumbnails when given).

Everything is capped so that a run with K ~ 1000 classes and millions of rows still gives
a small, fast report (panels, bars, table rows; see the MAX_* constants). Every text
that comes from data (class names, keys, reasons, paths) is HTML-escaped. Plots use
matplotlib's object API with the Agg canvas: no pyplot, no global figure state.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection, PolyCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from cleaner.reading import uri as uri_lib

__all__ = ["render_report", "top_noisy_keys", "write_report"]

MAX_HIST_PANELS = 50  # classes in a histogram grid (the largest ones)
MAX_BAR_CLASSES = 60  # bars in the clean-fraction chart (half lowest, half highest)
MAX_TABLE_CLASSES = 200  # rows in the per-class table (the largest classes)
MAX_CONFUSION_CLASSES = 30  # rows/columns of the confusion table (the most involved)
MAX_FAILED_ROWS = 20
MAX_NOISY_ROWS = 30
MAX_CURVE_POINTS = 2000  # points drawn per ROC / PR curve
HIST_BINS = 20
GRID_COLUMNS = 5
DPI = 80
THUMB_MAX_BYTES = 48_000  # larger thumbnails are re-encoded to THUMB_SIZE JPEGs
THUMB_SIZE = 128
NAME_CHARS = 28  # class names are shortened to this in plots

SOURCES = ("zeroshot", "probe")
COLOR_CLEAN = "#2a9d8f"
COLOR_NOISY = "#e76f51"
COLOR_OTHER = "#457b9d"
COLOR_MIXTURE = "#222222"
CURVE_POINTS = 101  # points per fitted-mixture curve
CURVE_HEADROOM = 1.5  # a curve may raise a panel's scale to this many times its tallest bar

SECTIONS = (
    ("summary", "Run summary"),
    ("histograms", "Per-class loss-score histograms"),
    ("clean-fraction", "Clean fraction per class"),
    ("per-class", "Per-class counts"),
    ("confusion", "Given vs suggested labels (noisy samples)"),
    ("roc", "ROC and precision-recall of clean_score"),
    ("failures", "Failures"),
    ("noisy", "Most confident noisy samples"),
)
TITLES = dict(SECTIONS)

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
"""


# --------------------------------------------------------------------------- public API


def render_report(
    manifest: pa.Table,
    summary: Mapping | None,
    thumbnails: Mapping[str, bytes] | None = None,
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
        _section_histograms(data, summary),
        _section_clean_fraction(data),
        _section_per_class(data, summary),
        _section_confusion(data),
        _section_roc(data) if data.has_truth else "",
        _section_failures(data, summary),
        _section_noisy(data, thumbnails or {}),
    ]
    present = [(sid, title) for sid, title in SECTIONS if sid != "roc" or data.has_truth]
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
) -> None:
    """Render the report and write it to a local path, file:// or s3:// URI."""
    uri_lib.write_text(target_uri, render_report(manifest, summary, thumbnails=thumbnails))


def top_noisy_keys(manifest: pa.Table, n: int = MAX_NOISY_ROWS) -> list[str]:
    """Keys of the noisy rows the report lists (most confident suggestion first).

    Fetch thumbnails for these keys only and pass them to `render_report`.
    """
    data = _ReportData.from_manifest(manifest, {})
    return [str(k) for k in _take_column(manifest, "key", data.top_noisy(n))]


# --------------------------------------------------------------------------- data


def _numeric(table: pa.Table, name: str, fill, dtype) -> np.ndarray | None:
    if name not in table.column_names:
        return None
    column = table.column(name)
    if column.null_count:
        column = pc.fill_null(column, fill)
    return np.asarray(column.to_numpy(), dtype=dtype)


def _take_column(table: pa.Table, name: str, indices: np.ndarray) -> list:
    if name not in table.column_names or len(indices) == 0:
        return [None] * len(indices)
    return table.column(name).take(pa.array(np.asarray(indices, dtype=np.int64))).to_pylist()


@dataclass
class _ReportData:
    """The manifest's columns as numpy arrays, plus derived masks and per-class counts."""

    manifest: pa.Table
    n: int
    num_classes: int
    class_names: list[str]
    labels: np.ndarray  # int64, -1 where unknown
    ok: np.ndarray  # bool: not failed
    clean: np.ndarray  # bool: ok & selected clean
    noisy: np.ndarray  # bool: ok & not selected
    backfilled: np.ndarray
    suggested: np.ndarray  # int64, -1 = none
    confidence: np.ndarray  # float64, NaN = none
    clean_score: np.ndarray | None
    loss_score: np.ndarray | None  # zero-shot (else probe) loss score
    loss_source: str | None
    true_labels: np.ndarray | None  # int64, -1 = unknown
    has_truth: bool  # some ok row with a known true label

    @classmethod
    def from_manifest(cls, manifest: pa.Table, summary: Mapping) -> _ReportData:
        n = manifest.num_rows
        labels = _numeric(manifest, "label", -1, np.int64)
        labels = np.full(n, -1, np.int64) if labels is None else labels
        if "status" in manifest.column_names:
            status = manifest.column("status")
            ok = ~np.asarray(pc.fill_null(pc.equal(status, "failed"), True).to_numpy(), bool)
            status_clean = np.asarray(pc.fill_null(pc.equal(status, "clean"), False).to_numpy())
        else:
            ok = np.ones(n, bool)
            status_clean = None
        is_clean = _numeric(manifest, "is_clean", False, bool)
        if is_clean is None:
            is_clean = status_clean if status_clean is not None else np.zeros(n, bool)
        clean = ok & is_clean
        backfilled = _numeric(manifest, "backfilled", False, bool)
        backfilled = np.zeros(n, bool) if backfilled is None else backfilled & ok
        suggested = _numeric(manifest, "suggested_label", -1, np.int64)
        suggested = np.full(n, -1, np.int64) if suggested is None else suggested
        confidence = _numeric(manifest, "suggested_confidence", np.nan, np.float64)
        confidence = np.full(n, np.nan) if confidence is None else confidence
        clean_score = _numeric(manifest, "clean_score", np.nan, np.float64)
        loss_score, loss_source = None, None
        for source in SOURCES:
            loss_score = _numeric(manifest, f"loss_score_{source}", np.nan, np.float64)
            if loss_score is not None:
                loss_source = source
                break
        true_labels = _numeric(manifest, "true_label", -1, np.int64)
        has_truth = true_labels is not None and bool((ok & (true_labels >= 0)).any())

        class_names = _class_names(manifest, summary, labels, suggested, true_labels)
        num_classes = len(class_names)
        labels = np.where((labels >= 0) & (labels < num_classes), labels, -1)
        suggested = np.where((suggested >= 0) & (suggested < num_classes), suggested, -1)
        if true_labels is not None:
            true_labels = np.where(
                (true_labels >= 0) & (true_labels < num_classes), true_labels, -1
            )
        return cls(
            manifest=manifest,
            n=n,
            num_classes=num_classes,
            class_names=class_names,
            labels=labels,
            ok=ok,
            clean=clean,
            noisy=ok & ~clean,
            backfilled=backfilled,
            suggested=suggested,
            confidence=confidence,
            clean_score=clean_score,
            loss_score=loss_score,
            loss_source=loss_source,
            true_labels=true_labels,
            has_truth=has_truth,
        )

    def name(self, k: int) -> str:
        return self.class_names[k] if 0 <= k < self.num_classes else "—"

    def per_class(self, mask: np.ndarray) -> np.ndarray:
        """Counts of rows in `mask` per given label (rows without a label are left out)."""
        labels = self.labels[mask]
        return np.bincount(labels[labels >= 0], minlength=self.num_classes)[: self.num_classes]

    def top_noisy(self, n: int) -> np.ndarray:
        """Indices of the noisy rows with the most confident suggestion (NaN last)."""
        idx = np.nonzero(self.noisy)[0]
        if len(idx) == 0:
            return idx
        conf = np.nan_to_num(self.confidence[idx], nan=-np.inf)
        order = np.lexsort((idx, -conf))  # most confident first, then manifest order
        return idx[order[:n]]


def _class_names(
    manifest: pa.Table,
    summary: Mapping,
    labels: np.ndarray,
    suggested: np.ndarray,
    true_labels: np.ndarray | None,
) -> list[str]:
    """Class names from the summary, else from the manifest's name columns, else indices."""
    names = summary.get("class_names")
    names = [str(x) for x in names] if isinstance(names, (list, tuple)) else []
    highest = max(
        [int(a.max()) for a in (labels, suggested, true_labels) if a is not None and a.size] or [-1]
    )
    if len(names) > highest:
        return names
    found: dict[int, str] = dict(enumerate(names))
    for index_col, name_col in (("label", "label_name"), ("suggested_label", "suggested_name")):
        values = {"label": labels, "suggested_label": suggested}[index_col]
        if name_col not in manifest.column_names:
            continue
        unique, first = np.unique(values, return_index=True)
        keep = [(int(u), int(i)) for u, i in zip(unique, first, strict=True) if u >= 0]
        keep = [(u, i) for u, i in keep if u not in found]
        if keep:
            taken = _take_column(manifest, name_col, np.array([i for _, i in keep]))
            for (u, _), text in zip(keep, taken, strict=True):
                if text is not None:
                    found[u] = str(text)
    return [found.get(k, f"class {k}") for k in range(highest + 1)]


# --------------------------------------------------------------------------- formatting


def _fmt(value) -> str:
    """A short human form of a number / string (escaped)."""
    if value is None:
        return '<span class="muted">—</span>'
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if not math.isfinite(value):
            return '<span class="muted">—</span>'
        if value != 0 and abs(value) >= 1000:
            return f"{value:,.1f}"
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return html.escape(", ".join(str(v) for v in value))
    return html.escape(str(value))


def _prob(value) -> str:
    """A probability in [0, 1]: four decimals, or scientific below 1e-4."""
    if not _is_number(value) or not math.isfinite(float(value)):
        return '<span class="muted">—</span>'
    value = float(value)
    return f"{value:.4f}" if value == 0 or value >= 1e-4 else f"{value:.1e}"


def _pct(value) -> str:
    if value is None or not isinstance(value, (int, float, np.number)):
        return '<span class="muted">—</span>'
    if not math.isfinite(float(value)):
        return '<span class="muted">—</span>'
    return f"{100.0 * float(value):.1f}%"


def _ratio(num: float, den: float) -> float | None:
    return float(num) / float(den) if den else None


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool)


def _kv_table(rows: Iterable[tuple[str, str]]) -> str:
    """A two-column table of (label, already formatted HTML value); empty if no rows."""
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<table class="kv">{body}</table>' if body else ""


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]], numeric: Sequence[bool]) -> str:
    """An HTML table; `headers` are escaped here, cells must already be HTML."""
    head = "".join(
        f'<th class="num">{html.escape(h)}</th>' if num else f"<th>{html.escape(h)}</th>"
        for h, num in zip(headers, numeric, strict=True)
    )
    body = []
    for row in rows:
        cells = "".join(
            f'<td class="num">{c}</td>' if num else f"<td>{c}</td>"
            for c, num in zip(row, numeric, strict=True)
        )
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _section(sid: str, *content: str) -> str:
    inner = "\n".join(c for c in content if c)
    return f'<section id="{sid}">\n<h2>{html.escape(TITLES[sid])}</h2>\n{inner}\n</section>'


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def _get(mapping, *path):
    """mapping[path[0]][path[1]]..., or None when any step is missing."""
    node = mapping
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return node


def _plot_text(text: str, limit: int = NAME_CHARS) -> str:
    """A class name safe for matplotlib text (no mathtext), shortened to `limit` chars."""
    text = str(text)
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("$", r"\$")


# --------------------------------------------------------------------------- plotting


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _png_img(fig: Figure, alt: str) -> str:
    """Render a figure to an embedded PNG <img> tag, then release the figure."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    fig.clear()
    encoded = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img class="plot" alt="{html.escape(alt)}" src="data:image/png;base64,{encoded}">'


def _binned_counts(
    labels: np.ndarray, scores: np.ndarray, groups: np.ndarray, num_classes: int
) -> np.ndarray:
    """counts[class, group, bin] of scores in [0, 1] in HIST_BINS bins (groups in {0, 1})."""
    bins = np.clip((scores * HIST_BINS).astype(np.int64), 0, HIST_BINS - 1)
    code = (labels * 2 + groups.astype(np.int64)) * HIST_BINS + bins
    counts = np.bincount(code, minlength=num_classes * 2 * HIST_BINS)
    return counts.reshape(num_classes, 2, HIST_BINS)


def _histogram_grid(
    classes: Sequence[int],
    counts: np.ndarray,
    names: Sequence[str],
    legend: tuple[str, str],
    colors: tuple[str, str],
    title: str,
    curves: Mapping[int, tuple[np.ndarray, np.ndarray]] | None = None,
) -> Figure:
    """Small multiples: per class, stacked histograms (group 1 at the bottom, group 0 on top).

    curves: per class, the fitted mixture and its clean component in counts per bin at
    evenly spaced scores from 0 to 1, drawn over the bars (solid and dashed).

    Drawn in ONE axes (panels laid out in data coordinates, bars as two PolyCollections):
    about 20x faster than one matplotlib Axes per class. Each panel's heights are scaled
    to its own tallest bin, whose count is printed in the panel's corner.
    """
    cols = min(GRID_COLUMNS, len(classes))
    rows = math.ceil(len(classes) / cols)
    gap_x, gap_y = 0.14, 0.55  # between panels (the height of a panel is 1)
    width_in, height_in = 2.4 * cols, 1.55 * rows + 0.9
    fig = _new_figure(width_in, height_in)
    ax = fig.add_axes((0.01, 0.35 / height_in, 0.98, 1.0 - 0.95 / height_in))
    ax.set_axis_off()
    edges = np.linspace(0.0, 1.0, HIST_BINS + 1)
    lower, upper = edges[:-1], edges[1:]
    bottom_bars: list[np.ndarray] = []
    top_bars: list[np.ndarray] = []
    frames: list[np.ndarray] = []
    mixture_lines: list[np.ndarray] = []
    component_lines: list[np.ndarray] = []
    for i, k in enumerate(classes):
        row, col = divmod(i, cols)
        x0 = col * (1.0 + gap_x)
        y0 = (rows - 1 - row) * (1.0 + gap_y)
        first, second = counts[k, 1].astype(np.float64), counts[k, 0].astype(np.float64)
        peak = float((first + second).max()) or 1.0
        curve = (curves or {}).get(k)
        if curve is not None:
            peak = max(peak, min(float(curve[0].max()), CURVE_HEADROOM * peak))
            for values, out in zip(curve, (mixture_lines, component_lines), strict=True):
                heights = np.minimum(values / peak, 1.0)
                xs = np.linspace(0.0, 1.0, values.shape[0])
                out.append(np.stack([x0 + xs, y0 + heights], axis=-1))
        h1, h2 = first / peak, (first + second) / peak
        for heights, base, out in ((h1, np.zeros_like(h1), bottom_bars), (h2, h1, top_bars)):
            keep = heights > base
            if keep.any():
                out.append(
                    _bar_vertices(
                        x0 + lower[keep], x0 + upper[keep], y0 + base[keep], y0 + heights[keep]
                    )
                )
        frames.append(
            _bar_vertices(
                np.array([x0]), np.array([x0 + 1.0]), np.array([y0]), np.array([y0 + 1.0])
            )
        )
        total = int(first.sum() + second.sum())
        ax.text(x0, y0 + 1.06, f"{_plot_text(names[k])} (n={total:,})", fontsize=8, va="bottom")
        ax.text(
            x0 + 0.02,
            y0 + 0.96,
            f"max {int(peak):,}",
            fontsize=6,
            va="top",
            color="#555",
            bbox={"facecolor": "white", "alpha": 0.7, "edgecolor": "none", "pad": 1},
        )
        if row == rows - 1 or i + cols >= len(classes):
            for tick in (0.0, 0.5, 1.0):
                ax.text(
                    x0 + tick,
                    y0 - 0.04,
                    f"{tick:g}",
                    fontsize=6,
                    ha="center",
                    va="top",
                    color="#666",
                )
    for bars, color in ((bottom_bars, colors[0]), (top_bars, colors[1])):
        if bars:
            ax.add_collection(
                PolyCollection(np.concatenate(bars), facecolors=color, edgecolors="none")
            )
    ax.add_collection(
        PolyCollection(np.concatenate(frames), facecolors="none", edgecolors="#bbb", linewidths=0.6)
    )
    for lines, style in ((mixture_lines, "solid"), (component_lines, "dashed")):
        if lines:
            ax.add_collection(
                LineCollection(lines, colors=COLOR_MIXTURE, linewidths=0.9, linestyles=style)
            )
    ax.set_xlim(-0.02, cols * (1.0 + gap_x) - gap_x + 0.02)
    ax.set_ylim(-0.25, rows * (1.0 + gap_y) - gap_y + 0.3)
    handles: list = [Patch(color=colors[0]), Patch(color=colors[1])]
    labels = list(legend)
    if mixture_lines:
        handles += [
            Line2D([], [], color=COLOR_MIXTURE, linewidth=0.9),
            Line2D([], [], color=COLOR_MIXTURE, linewidth=0.9, linestyle="dashed"),
        ]
        labels += ["fitted GMM", "its clean component"]
    fig.legend(handles, labels, loc="upper right", ncol=len(labels), fontsize=9, frameon=False)
    fig.text(0.01, 1.0 - 0.1 / height_in, title, fontsize=10, va="top")
    return fig


def _bar_vertices(x0: np.ndarray, x1: np.ndarray, y0: np.ndarray, y1: np.ndarray) -> np.ndarray:
    """[n, 4, 2] rectangle vertices for a PolyCollection."""
    return np.stack(
        [
            np.stack([x0, y0], -1),
            np.stack([x1, y0], -1),
            np.stack([x1, y1], -1),
            np.stack([x0, y1], -1),
        ],
        axis=1,
    )


# --------------------------------------------------------------------------- sections


def _section_summary(data: _ReportData, summary: Mapping) -> str:
    counts = summary.get("counts") if isinstance(summary.get("counts"), Mapping) else {}

    def count(key: str, fallback: int) -> int:
        value = counts.get(key)
        return int(value) if _is_number(value) else int(fallback)

    samples = count("samples", data.n)
    clean = count("clean", int(data.clean.sum()))
    noisy = count("noisy", int(data.noisy.sum()))
    failed = count("failed", int((~data.ok).sum()))
    cards = [
        ("samples", f"{samples:,}", "samples", ""),
        ("clean", f"{clean:,}", f"clean ({_pct(_ratio(clean, samples - failed))} of usable)", ""),
        ("noisy", f"{noisy:,}", f"noisy ({_pct(_ratio(noisy, samples - failed))} of usable)", ""),
        ("failed", f"{failed:,}", f"failed ({_pct(_ratio(failed, samples))})", ""),
    ]
    detection = summary.get("detection") if isinstance(summary.get("detection"), Mapping) else {}
    for key in ("precision", "recall", "f1", "auroc"):
        value = detection.get(key)
        if _is_number(value):
            cards.append(("", f"{float(value):.4f}", f"selection {key} (vs true labels)", ""))
    card_html = "".join(
        f'<div class="card {cls}"><div class="v">{v}</div><div class="l">{html.escape(label)}</div></div>'
        for cls, v, label, _ in cards
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


def _largest_classes(data: _ReportData, totals: np.ndarray, cap: int) -> list[int]:
    present = np.nonzero(totals > 0)[0]
    order = present[np.lexsort((present, -totals[present]))]
    return [int(k) for k in order[:cap]]


def _mixture_curves(
    summary: Mapping, source: str, classes: Sequence[int], totals: np.ndarray
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per class: the fitted 2-component mixture of `source` and its clean (larger-mean)
    component, as expected counts per histogram bin (summary["mixtures"], if present)."""
    fit = _get(summary, "mixtures", "sources", source)
    mode = _get(summary, "mixtures", "gmm")
    if not isinstance(fit, Mapping) or mode not in ("per_class", "global"):
        return {}
    try:
        means = np.asarray(fit["means"], dtype=np.float64)
        variances = np.asarray(fit["variances"], dtype=np.float64)
        weights = np.asarray(fit["weights"], dtype=np.float64)
        degenerate = np.asarray(fit["degenerate"], dtype=bool)
    except (KeyError, TypeError, ValueError):
        return {}
    x = np.linspace(0.0, 1.0, CURVE_POINTS)
    curves = {}
    for k in classes:
        group = k if mode == "per_class" else 0
        if group >= means.shape[0] or k >= degenerate.shape[0] or degenerate[k]:
            continue
        var = np.maximum(variances[group], 1e-12)[:, None]
        densities = (
            weights[group][:, None]
            * np.exp(-((x[None] - means[group][:, None]) ** 2) / (2.0 * var))
            / np.sqrt(2.0 * np.pi * var)
        )
        if not np.isfinite(densities).all():
            continue
        per_bin = totals[k] / HIST_BINS  # expected count in a bin = N * density * width
        clean = int(np.argmax(means[group]))
        curves[int(k)] = (per_bin * densities.sum(axis=0), per_bin * densities[clean])
    return curves


def _section_histograms(data: _ReportData, summary: Mapping) -> str:
    if data.loss_score is None:
        return _section("histograms", _note("The manifest has no loss_score column."))
    usable = data.ok & np.isfinite(data.loss_score) & (data.labels >= 0)
    totals = data.per_class(usable)
    classes = _largest_classes(data, totals, MAX_HIST_PANELS)
    if not classes:
        return _section("histograms", _note("No usable sample with a loss score."))
    source = data.loss_source
    content = [
        _note(
            f"Loss score (log p(label), min-max normalised per class) of the {source} source, "
            f"{HIST_BINS} bins from 0 to 1; stacked: selected clean at the bottom, not selected "
            "on top. Each panel is scaled to its tallest bin (its count: 'max' in the corner). "
            "Lines: the fitted 2-component GMM of the class (solid) and its clean, larger-mean "
            "component (dashed), in expected samples per bin."
        )
    ]
    present = int((totals > 0).sum())
    if present > len(classes):
        content.append(_note(f"Showing the {len(classes)} largest of {present} classes."))
    counts = _binned_counts(
        data.labels[usable], data.loss_score[usable], data.clean[usable], data.num_classes
    )
    fig = _histogram_grid(
        classes,
        counts,
        data.class_names,
        ("selected clean", "not selected (noisy)"),
        (COLOR_CLEAN, COLOR_NOISY),
        f"loss_score_{source} by selection",
        curves=_mixture_curves(summary, source, classes, totals),
    )
    content.append(_png_img(fig, "per-class loss-score histograms by selection"))
    if data.has_truth:
        known = usable & (data.true_labels >= 0)
        truly_clean = data.labels[known] == data.true_labels[known]
        counts = _binned_counts(
            data.labels[known], data.loss_score[known], truly_clean, data.num_classes
        )
        fig = _histogram_grid(
            classes,
            counts,
            data.class_names,
            ("truly clean (label = true label)", "truly noisy"),
            (COLOR_CLEAN, COLOR_NOISY),
            f"loss_score_{source} by true label",
        )
        content.append("<h3>The same classes, split by the true labels</h3>")
        content.append(_png_img(fig, "per-class loss-score histograms by true label"))
    return _section("histograms", *content)


def _section_clean_fraction(data: _ReportData) -> str:
    totals = data.per_class(data.ok)
    cleans = data.per_class(data.clean)
    present = np.nonzero(totals > 0)[0]
    if len(present) == 0:
        return _section("clean-fraction", _note("No usable sample."))
    fraction = cleans[present] / totals[present]
    order = present[np.lexsort((present, fraction))]  # lowest clean fraction first
    notes = []
    if len(order) > MAX_BAR_CLASSES:
        half = MAX_BAR_CLASSES // 2
        notes.append(
            _note(
                f"Showing the {half} classes with the lowest and the {half} with the highest "
                f"clean fraction, of {len(order)} classes."
            )
        )
        shown = [*order[:half].tolist(), None, *order[-half:].tolist()]
    else:
        shown = order.tolist()
    height = 0.24 * len(shown) + 1.0
    fig = _new_figure(8.0, height)
    ax = fig.add_axes((0.3, 0.55 / height, 0.6, 1.0 - 0.85 / height))
    positions = np.arange(len(shown))
    values = [cleans[k] / totals[k] if k is not None else 0.0 for k in shown]
    colors = [COLOR_CLEAN if k is not None else "white" for k in shown]
    ax.barh(positions, values, color=colors, height=0.75)
    ax.set_yticks(positions)
    ax.set_yticklabels(
        [_plot_text(data.class_names[k], 36) if k is not None else "…" for k in shown], fontsize=8
    )
    for pos, k, value in zip(positions, shown, values, strict=True):
        if k is not None:
            ax.text(value + 0.01, pos, f"{cleans[k]:,}/{totals[k]:,}", va="center", fontsize=7)
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(len(shown) - 0.5, -0.5)  # lowest fraction at the top
    ax.set_xlabel("selected clean / usable samples of the class (given label)", fontsize=9)
    ax.tick_params(axis="x", labelsize=8)
    overall = _ratio(int(data.clean.sum()), int(data.ok.sum()))
    if overall is not None:
        ax.axvline(overall, color="#555", lw=1, ls="--")
        ax.text(overall, -0.9, f"all: {overall:.1%}", fontsize=8, ha="center", va="bottom")
    return _section("clean-fraction", *notes, _png_img(fig, "clean fraction per class"))


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
    notes = []
    if len(listed) > MAX_TABLE_CLASSES:
        keep = _largest_classes(data, totals + failed, MAX_TABLE_CLASSES)
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
    return _section("per-class", *notes, _table(headers, rows, numeric))


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


def _short(name: str, limit: int = 14) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"


def _thin(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if len(x) <= MAX_CURVE_POINTS:
        return x, y
    keep = np.unique(np.linspace(0, len(x) - 1, MAX_CURVE_POINTS).astype(np.int64))
    return x[keep], y[keep]


def _section_roc(data: _ReportData) -> str:
    from sklearn.metrics import (
        average_precision_score,
        precision_recall_curve,
        roc_auc_score,
        roc_curve,
    )

    known = data.ok & (data.true_labels >= 0) & (data.labels >= 0)
    truth = data.labels[known] == data.true_labels[known]
    if truth.all() or not truth.any():
        return _section(
            "roc", _note("The true labels have only one class (all clean or all noisy): no curve.")
        )
    scores: list[tuple[str, np.ndarray]] = []
    if data.clean_score is not None:
        scores.append(("clean_score", data.clean_score))
    for source in SOURCES:
        values = _numeric(data.manifest, f"consistency_{source}", np.nan, np.float64)
        if values is not None:
            scores.append((f"consistency_{source}", values))
    if not scores:
        return _section("roc", _note("The manifest has no score column."))
    fig = _new_figure(11.0, 4.6)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.12, top=0.9, wspace=0.22)
    ax_roc, ax_pr = fig.subplots(1, 2)
    for i, (name, values) in enumerate(scores):
        score = values[known]
        finite = np.isfinite(score)
        y, s = truth[finite], score[finite]
        if y.all() or not y.any():
            continue
        style = {"lw": 2.2, "color": "#1d3557"} if i == 0 else {"lw": 1.0, "alpha": 0.8}
        fpr, tpr, _ = roc_curve(y, s)
        ax_roc.plot(*_thin(fpr, tpr), label=f"{name} (AUROC {roc_auc_score(y, s):.4f})", **style)
        precision, recall, _ = precision_recall_curve(y, s)
        ax_pr.plot(
            *_thin(recall, precision),
            label=f"{name} (AP {average_precision_score(y, s):.4f})",
            **style,
        )
    selected = data.clean[known]
    tp = int((selected & truth).sum())
    op_recall = tp / int(truth.sum())
    op_fpr = int((selected & ~truth).sum()) / int((~truth).sum())
    op_precision = _ratio(tp, int(selected.sum()))
    ax_roc.plot([op_fpr], [op_recall], "o", color=COLOR_NOISY, label="selection (clean set)")
    if op_precision is not None:
        ax_pr.plot(
            [op_recall], [op_precision], "o", color=COLOR_NOISY, label="selection (clean set)"
        )
    ax_roc.plot([0, 1], [0, 1], color="#aaa", lw=0.8, ls=":")
    base = float(truth.mean())
    ax_pr.axhline(base, color="#aaa", lw=0.8, ls=":")
    ax_roc.set(xlabel="false positive rate (noisy kept)", ylabel="true positive rate (clean kept)")
    ax_pr.set(xlabel="recall (clean kept)", ylabel="precision (of the kept)")
    ax_roc.set_title("ROC (positive = truly clean)", fontsize=10)
    ax_pr.set_title(f"Precision-recall (clean base rate {base:.3f})", fontsize=10)
    for ax in (ax_roc, ax_pr):
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        ax.legend(fontsize=8, loc="lower left" if ax is ax_pr else "lower right")
        ax.grid(alpha=0.3)
    return _section(
        "roc",
        _note(
            f"{len(truth):,} usable samples with a known true label, {int(truth.sum()):,} truly "
            "clean. clean_score is the mean over sources of p(label); the dot is the final "
            "selection."
        ),
        _png_img(fig, "ROC and precision-recall curves of clean_score"),
    )


def _section_failures(data: _ReportData, summary: Mapping) -> str:
    failed_idx = np.nonzero(~data.ok)[0]
    by_reason = _get(summary, "counts", "failed_by_reason")
    if not isinstance(by_reason, Mapping):
        by_reason = {}
        for text in _take_column(data.manifest, "reason", failed_idx):
            head = str(text or "").split(":", 1)[0].strip() or "unknown"
            by_reason[head] = by_reason.get(head, 0) + 1
        by_reason = dict(sorted(by_reason.items(), key=lambda kv: -kv[1]))
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
