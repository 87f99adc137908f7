"""Per-epoch curves of a training run as a self-contained HTML page."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence

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
