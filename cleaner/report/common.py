"""What the report's sections share: limits, colours, the manifest columns as arrays
(`_ReportData`), number formatting and small HTML building blocks."""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

MAX_HIST_PANELS = 50  # classes in a histogram grid (the lowest clean fraction first)


MAX_BAR_CLASSES = 60  # bars in the clean-fraction chart (half lowest, half highest)


MAX_TABLE_CLASSES = 2000  # rows in the per-class table (beyond: the largest classes)


MAX_WORST_CLASSES = 50  # rows of the table of the classes with the lowest clean fraction


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
    ("worst", "Classes with the lowest clean fraction"),
    ("histograms", "Per-class loss-score histograms"),
    ("clean-fraction", "Clean fraction per class"),
    ("per-class", "Per-class counts"),
    ("confusion", "Given vs suggested labels (noisy samples)"),
    ("roc", "ROC and precision-recall of clean_score"),
    ("detectors", "Detectors side by side"),
    ("failures", "Failures"),
    ("noisy", "Most confident noisy samples"),
    ("off-topic", "Most confident off-topic samples"),
    ("conflicts", "Duplicates with conflicting labels"),
    ("leaks", "Train samples that duplicate a test sample"),
)


TITLES = dict(SECTIONS)


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
            off_topic = np.asarray(pc.fill_null(pc.equal(status, "off_topic"), False).to_numpy())
        else:
            ok = np.ones(n, bool)
            status_clean = None
            off_topic = np.zeros(n, bool)
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
            noisy=ok & ~clean & ~off_topic,  # off-topic samples have their own section
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


def _table(
    headers: Sequence[str],
    rows: Iterable[Sequence[str]],
    numeric: Sequence[bool],
    table_id: str | None = None,
) -> str:
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
    opening = f'<table id="{html.escape(table_id)}">' if table_id else "<table>"
    return f"{opening}<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


# The filter box's handler: hides the rows whose second cell does not contain the query.
FILTER_HANDLER = (
    "var q = this.value.toLowerCase(); "
    "var rows = document.getElementById('{table}').tBodies[0].rows; "
    "for (var i = 0; i < rows.length; i++) rows[i].style.display = "
    "rows[i].cells[1].textContent.toLowerCase().indexOf(q) < 0 ? 'none' : '';"
)


def _searchable(table: str, table_id: str, what: str) -> str:
    """A table in a scrolling box, under a box that filters its rows by their second cell
    (an inline handler, no script element; without JavaScript every row stays, and the
    browser's find searches them)."""
    handler = html.escape(FILTER_HANDLER.format(table=table_id))
    label = html.escape(f"filter by {what}")
    box = (
        f'<input type="search" class="filter" placeholder="{label}" aria-label="{label}" '
        f'oninput="{handler}">'
    )
    return f'{box}<div class="scroll">{table}</div>'


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


def _largest_classes(totals: np.ndarray, cap: int) -> list[int]:
    """Up to `cap` classes with the largest positive totals, largest first (ties: lower index)."""
    present = np.nonzero(totals > 0)[0]
    order = present[np.lexsort((present, -totals[present]))]
    return [int(k) for k in order[:cap]]


def _worst_classes(data: _ReportData, usable: np.ndarray, cap: int) -> list[int]:
    """Up to `cap` classes with `usable` rows, lowest clean fraction (selected clean /
    usable) first; ties: the larger class first, then the lower index."""
    totals = data.per_class(usable)
    cleans = data.per_class(usable & data.clean)
    present = np.nonzero(totals > 0)[0]
    fraction = cleans[present] / totals[present]
    order = present[np.lexsort((present, -totals[present], fraction))]
    return [int(k) for k in order[:cap]]


def _short(name: str, limit: int = 14) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"
