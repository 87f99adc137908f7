"""The report's plots (matplotlib object API, Agg canvas, embedded as base64 PNG):
per-class loss-score histograms with the fitted mixtures, clean fraction per class,
ROC and precision-recall curves."""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection, PolyCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from cleaner.report.common import (
    COLOR_CLEAN,
    COLOR_MIXTURE,
    COLOR_NOISY,
    CURVE_HEADROOM,
    CURVE_POINTS,
    DPI,
    GRID_COLUMNS,
    HIST_BINS,
    MAX_BAR_CLASSES,
    MAX_CURVE_POINTS,
    MAX_HIST_PANELS,
    NAME_CHARS,
    SOURCES,
    _get,
    _note,
    _numeric,
    _ratio,
    _ReportData,
    _section,
    _worst_classes,
)


def _plot_text(text: str, limit: int = NAME_CHARS) -> str:
    """A class name safe for matplotlib text (no mathtext), shortened to `limit` chars."""
    text = str(text)
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("$", r"\$")


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
    classes = _worst_classes(data, usable, MAX_HIST_PANELS)
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
        content.append(
            _note(
                f"Showing the {len(classes)} classes with the lowest clean fraction, of "
                f"{present} classes (lowest first)."
            )
        )
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
