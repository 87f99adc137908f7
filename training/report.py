"""Per-epoch curves of a training run, and the comparison of training modes, as
self-contained HTML pages."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cleaner.reading import uri as uri_lib

CURVES = (
    ("loss", "training loss"),
    ("test_accuracy", "test accuracy"),
    ("selected", "selected samples"),
    ("selected_precision", "precision of the selected set (vs true labels)"),
    ("absorbed", "absorbed"),
    ("relabelled", "relabelled"),
    ("relabel_accuracy", "accuracy of relabels (vs true labels)"),
    ("train_images_per_s", "training images/s"),
)


def _plot(history: Sequence[dict], key: str, title: str) -> str | None:
    points = [(h["epoch"], h[key]) for h in history if h.get(key) is not None]
    if not points:
        return None
    fig = Figure(figsize=(4.2, 2.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    xs, ys = zip(*points, strict=True)
    ax.plot(xs, ys, marker="o", markersize=3)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("epoch", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    fig.clear()
    encoded = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="{html.escape(title)}" src="data:image/png;base64,{encoded}">'


def render_training_report(history: Sequence[dict], summary: dict) -> str:
    """HTML with one small plot per metric present in the history, and the final metrics."""
    plots = [p for key, title in CURVES if (p := _plot(history, key, title))]
    final = history[-1] if history else {}
    rows = "".join(
        f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>"
        for k, v in final.items()
    )
    title = html.escape(f"MixFix training: {summary.get('run', '')} ({summary.get('mode', '')})")
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title>"
        "<style>body{font-family:sans-serif;margin:2em}img{margin:4px;border:1px solid #ddd}"
        "td{padding:2px 8px;border-bottom:1px solid #eee}</style></head><body>"
        f"<h1>{title}</h1><h2>Curves</h2><div>{''.join(plots)}</div>"
        f"<h2>Last epoch</h2><table>{rows}</table></body></html>"
    )


def write_training_report(history: Sequence[dict], summary: dict, target_uri: str) -> None:
    uri_lib.write_text(target_uri, render_training_report(history, summary))


def _png(fig: Figure, alt: str) -> str:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    fig.clear()
    encoded = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{encoded}">'


def _fmt(value: float | None, spread: float | None = None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if not spread else f"{value:.3f} &plusmn; {spread:.3f}"


def comparison_curves_plot(modes: Mapping[str, Mapping], title: str) -> str:
    """One plot: test accuracy per epoch of every mode (the mean over seeds)."""
    fig = Figure(figsize=(6.0, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for mode, result in modes.items():
        curve = result.get("curve") or []
        points = [(i + 1, v) for i, v in enumerate(curve) if v is not None]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o", markersize=3, label=f"{mode} ({_fmt(ys[-1])})")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("epoch", fontsize=9)
    ax.set_ylabel("test accuracy", fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig, title)


def render_comparison_report(result: Mapping) -> str:
    """HTML for benchmarks.train_modes: per noise pattern, one table and one accuracy plot.

    result: {"patterns": {name: {"modes": {mode: {...}}, "clean": {...}}}, "recommended",
    "seeds", "epochs", "command", "load_average"}; each mode holds test_accuracy (final
    epoch, mean over seeds), test_accuracy_std, test_accuracy_seeds, curve,
    selected (final), selected_precision (per epoch).
    """
    recommended = str(result.get("recommended", ""))
    sections = []
    for pattern, block in result.get("patterns", {}).items():
        modes = block.get("modes", {})
        rows = []
        for mode, r in modes.items():
            precision = [p for p in r.get("selected_precision") or [] if p is not None]
            name = (
                f"<b>{html.escape(mode)}</b> (recommended)"
                if mode == recommended
                else (html.escape(mode))
            )
            rows.append(
                f"<tr><td>{name}</td>"
                f"<td>{_fmt(r.get('test_accuracy'), r.get('test_accuracy_std'))}</td>"
                f"<td>{html.escape(', '.join(f'{a:.3f}' for a in r.get('test_accuracy_seeds', [])))}</td>"
                f"<td>{r.get('selected', '-')}</td>"
                f"<td>{_fmt(precision[0] if precision else None)} &rarr; "
                f"{_fmt(precision[-1] if precision else None)}</td></tr>"
            )
        clean = block.get("clean", {})
        clean_line = (
            f"<p>Clean job: {clean.get('clean')} of {clean.get('samples')} samples selected, "
            f"precision {_fmt(clean.get('precision'))}.</p>"
            if clean
            else ""
        )
        sections.append(
            f"<h2>{html.escape(pattern)}</h2>{clean_line}"
            "<table><tr><th>mode</th><th>test accuracy (final epoch)</th><th>per seed</th>"
            "<th>selected (final)</th><th>selected-set precision (first &rarr; last)</th></tr>"
            f"{''.join(rows)}</table>"
            f"<div>{comparison_curves_plot(modes, f'test accuracy per epoch: {pattern}')}</div>"
        )
    meta = html.escape(
        f"seeds {result.get('seeds')}, {result.get('epochs')} epochs, "
        f"load average {result.get('load_average')}; command: {result.get('command', '')}"
    )
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>Training modes compared</title>"
        "<style>body{font-family:sans-serif;margin:2em}img{margin:4px;border:1px solid #ddd}"
        "td,th{padding:2px 8px;border-bottom:1px solid #eee;text-align:left}</style></head><body>"
        "<h1>Training modes compared (final-epoch test accuracy)</h1>"
        f"<p>{meta}</p>{''.join(sections)}</body></html>"
    )


def write_comparison_report(result: Mapping, target_uri: str) -> None:
    uri_lib.write_text(target_uri, render_comparison_report(result))
