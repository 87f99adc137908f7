"""The report's "Detectors side by side" section: when the clean job ran a detector other
than CLIPCleaner's (selection.detector), each detector's clean count, agreement with the
chosen one and detection figures, its ROC curve with its operating point, and what was
fitted (summary.json "detectors"; the manifest's <name>_clean / <name>_score columns)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pyarrow as pa

from cleaner.report.common import _fmt, _note, _numeric, _pct, _prob, _section, _table
from cleaner.report.plots import _new_figure, _png_img, _thin

SECTION = ("detectors", "Detectors side by side")


def _roc_plot(manifest: pa.Table, names: list[str]) -> str:
    from sklearn.metrics import roc_auc_score, roc_curve

    labels = _numeric(manifest, "label", -1, np.int64)
    truth_labels = _numeric(manifest, "true_label", -1, np.int64)
    if labels is None or truth_labels is None:
        return ""
    fig = _new_figure(6.0, 4.6)
    ax = fig.subplots()
    drawn = 0
    for name in names:
        score = _numeric(manifest, f"{name}_score", np.nan, np.float64)
        clean = _numeric(manifest, f"{name}_clean", False, bool)
        if score is None or clean is None:
            continue
        known = np.isfinite(score) & (truth_labels >= 0) & (labels >= 0)
        truth = labels[known] == truth_labels[known]
        if truth.all() or not truth.any():
            continue
        fpr, tpr, _ = roc_curve(truth, score[known])
        auroc = roc_auc_score(truth, score[known])
        line = ax.plot(*_thin(fpr, tpr), lw=1.6, label=f"{name} (AUROC {auroc:.4f})")[0]
        kept = clean[known]
        ax.plot(
            [(kept & ~truth).sum() / (~truth).sum()],
            [(kept & truth).sum() / truth.sum()],
            "o",
            color=line.get_color(),
        )
        drawn += 1
    if not drawn:
        return ""
    ax.plot([0, 1], [0, 1], color="#aaa", lw=0.8, ls=":")
    ax.set(xlabel="false positive rate (noisy kept)", ylabel="true positive rate (clean kept)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _png_img(fig, "ROC curves of each detector's clean score")


def section_detectors(manifest: pa.Table, summary: Mapping) -> str:
    """The section's HTML, or "" when only CLIPCleaner ran."""
    comparison = summary.get("detectors")
    if not isinstance(comparison, Mapping) or not comparison.get("detectors"):
        return ""
    chosen = comparison.get("chosen")
    rows = []
    for name, entry in comparison["detectors"].items():
        det = entry.get("detection") or {}
        rows.append(
            [
                _fmt(name) + (" <b>(chosen)</b>" if name == chosen else ""),
                _fmt(entry.get("clean")),
                _pct(entry.get("agreement_with_chosen")),
                _prob(det.get("precision")),
                _prob(det.get("recall")),
                _prob(det.get("f1")),
                _prob(det.get("auroc")),
            ]
        )
    table = _table(
        ["detector", "clean", "agrees with chosen", "precision", "recall", "F1", "AUROC"],
        rows,
        [False, True, True, True, True, True, True],
    )
    fitted = comparison.get("fitted") or {}
    details = _table(
        ["detector", "fitted"],
        [
            [_fmt(name), _fmt(", ".join(f"{k}={v}" for k, v in info.items()))]
            for name, info in fitted.items()
        ],
        [False, False],
    )
    return _section(
        SECTION[0],
        _note(
            f"is_clean, clean_score, status and suggestions are the chosen detector's ({chosen}); "
            "each detector's own verdict is in the manifest's <name>_clean and <name>_score "
            "columns. Precision, recall and AUROC are against the true labels the shards "
            "carry (positive = clean); the dots are each detector's operating point."
        ),
        table,
        _roc_plot(manifest, list(comparison["detectors"])),
        details if fitted else "",
    )
