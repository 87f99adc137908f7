"""Fitted detectors applied to manifest rows: every detector's own columns, and the
chosen one's verdict in the manifest contract (is_clean, clean_score, status, suggestion).

The base manifest is CLIPCleaner's (cleaner/selection/manifest.py). With
`selection.detector=clipcleaner` nothing here runs and the manifest is unchanged. With
another detector the manifest gains, per usable row:

- clipcleaner_clean, clipcleaner_score: CLIPCleaner's verdict, kept for comparison;
- <name>_clean, <name>_score for each detector run (deft, cleannet, ensemble), plus the
  detector's own columns (deft_p_clean, deft_sim_positive, deft_sim_negative,
  cleannet_relevance, cleannet_verified_label);
- is_clean, clean_score, status (clean / noisy) from the chosen detector; its own label
  suggestion where it has one (DeFT's positive-prompt classifier, CleanNet's verified
  labels), else CLIP's top suggestion (the `top_labels` hint columns) for noisy rows.
`backfilled` and the explanation columns stay CLIPCleaner's.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa

from cleaner.detectors.ensemble import EnsembleCalibration, part_statistics
from cleaner.detectors.output import DetectorOutput
from cleaner.metrics import detection_metrics

CLIPCLEANER = "clipcleaner"
ENSEMBLE = "ensemble"
STATUSES_DECIDED = ("clean", "noisy")  # other statuses (failed, ...) are left as they are


@dataclass(frozen=True, eq=False)
class FittedDetectors:
    """The chosen detector, the fitted members besides CLIPCleaner, and (for the
    ensemble) its calibration once computed. A few hundred KB: shipped to tasks."""

    chosen: str
    members: dict  # name -> FittedDeft / FittedCleanNet
    ensemble_members: tuple[str, ...] = ()
    calibration: EnsembleCalibration | None = None
    suggest_min_confidence: float = 0.5
    fit_seconds: dict = field(default_factory=dict)  # name -> seconds its fit took

    @property
    def needs_calibration(self) -> bool:
        return self.chosen == ENSEMBLE and self.calibration is None

    def names(self) -> list[str]:
        """Every detector whose columns the manifest has, CLIPCleaner first."""
        extra = [ENSEMBLE] if self.chosen == ENSEMBLE else []
        return [CLIPCLEANER, *self.members, *extra]

    def calibrated(self, parts: list[dict]) -> FittedDetectors:
        return replace(
            self, calibration=EnsembleCalibration.from_parts(self.ensemble_members, parts)
        )


def _spread(values: np.ndarray, n: int, rows: np.ndarray, fill, dtype) -> np.ndarray:
    out = np.full(n, fill, dtype=dtype)
    out[rows] = values
    return out


def _set(table: pa.Table, name: str, values) -> pa.Table:
    """Replace a column in place, or append it."""
    array = values if isinstance(values, pa.Array) else pa.array(values)
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, array)
    return table.append_column(name, array)


def _first_entries(table: pa.Table, name: str, fill, dtype) -> np.ndarray:
    """Column 0 of a fixed-size-list column (the top hint), `fill` where null."""
    column = table.column(name).combine_chunks()
    size = column.type.list_size
    values = np.asarray(column.values.to_numpy(zero_copy_only=False), dtype=dtype)
    first = values[column.offset * size :: size][: len(column)]
    if column.null_count:
        nulls = np.asarray(column.is_null().to_numpy(zero_copy_only=False), bool)
        first = np.where(nulls, fill, first)
    return first.astype(dtype)


def member_outputs(
    detectors: FittedDetectors, batch, labels: np.ndarray
) -> dict[str, DetectorOutput]:
    """Each member's verdict on the batch's usable rows (a ScoreBatch: ok_idx, keys,
    shards, usable_embeddings; DeFT with a tuned image tower reads its own embeddings)."""
    ok = batch.ok_idx
    out = {}
    for name, fitted in detectors.members.items():
        if name == "cleannet":
            out[name] = fitted.evaluate(batch.usable_embeddings, labels, batch.keys[ok])
        elif getattr(fitted, "tuned", None):
            positions = batch.table.column("shard_pos").to_numpy()[ok]
            embeddings = fitted.tuned_embeddings(batch.shards[ok], positions)
            out[name] = fitted.evaluate(embeddings, labels)
        else:
            out[name] = fitted.evaluate(batch.usable_embeddings, labels)
    return out


def add_member_columns(
    table: pa.Table, ok_idx: np.ndarray, outputs: dict[str, DetectorOutput]
) -> pa.Table:
    """CLIPCleaner's verdict copied aside, and every member's columns."""
    n = table.num_rows
    table = _set(table, "clipcleaner_clean", table.column("is_clean"))
    table = _set(table, "clipcleaner_score", table.column("clean_score"))
    for name, output in outputs.items():
        table = _set(table, f"{name}_clean", _spread(output.is_clean, n, ok_idx, False, bool))
        table = _set(
            table, f"{name}_score", _spread(output.clean_score, n, ok_idx, np.nan, np.float32)
        )
        for column, values in output.columns.items():
            integer = np.issubdtype(np.asarray(values).dtype, np.integer)
            fill, dtype = (-1, np.int64) if integer else (np.nan, np.float32)
            table = _set(table, column, _spread(values, n, ok_idx, fill, dtype))
    return table


def member_scores(table: pa.Table, rows: np.ndarray, members) -> tuple[dict, dict]:
    """(scores, clean) of the ensemble's members at `rows`, from the manifest's columns."""
    scores = {m: table.column(f"{m}_score").to_numpy(zero_copy_only=False)[rows] for m in members}
    clean = {
        m: table.column(f"{m}_clean").to_numpy(zero_copy_only=False)[rows].astype(bool)
        for m in members
    }
    return scores, clean


def calibration_part(table: pa.Table, ok_idx: np.ndarray, detectors: FittedDetectors) -> dict:
    """A part's ensemble calibration statistics (its table has the member columns)."""
    scores, clean = member_scores(table, ok_idx, detectors.ensemble_members)
    return part_statistics(detectors.ensemble_members, scores, clean)


def set_verdict(
    table: pa.Table,
    ok_idx: np.ndarray,
    labels_ok: np.ndarray,
    is_clean_ok: np.ndarray,
    score_ok: np.ndarray,
    output: DetectorOutput | None,
    min_confidence: float,
    class_names: list[str],
) -> pa.Table:
    """The chosen detector's verdict into is_clean, clean_score, status, suggested_*."""
    n = table.num_rows
    status = np.asarray(table.column("status").to_pylist(), dtype=object)
    decided = np.isin(status, STATUSES_DECIDED)
    rows = ok_idx[decided[ok_idx]]
    keep = decided[ok_idx]
    is_clean = table.column("is_clean").to_numpy(zero_copy_only=False).astype(bool).copy()
    is_clean[rows] = is_clean_ok[keep]
    score = table.column("clean_score").to_numpy(zero_copy_only=False).astype(np.float32)
    score[rows] = score_ok[keep]
    status[rows] = np.where(is_clean_ok[keep], "clean", "noisy")
    suggested = table.column("suggested_label").to_numpy(zero_copy_only=False).astype(np.int64)
    confidence = table.column("suggested_confidence").to_numpy(zero_copy_only=False)
    confidence = confidence.astype(np.float32)
    hint = _first_entries(table, "top_labels", -1, np.int64)
    hint_p = _first_entries(table, "top_probs", np.nan, np.float32)
    own = (
        output.suggested[keep]
        if output is not None and output.suggested is not None
        else np.full(len(rows), -1)
    )
    own_p = (
        output.confidence[keep] if output is not None and output.confidence is not None else None
    )
    chosen = np.where(own >= 0, own, hint[rows])
    chosen_p = np.where(own >= 0, own_p if own_p is not None else np.nan, hint_p[rows])
    labels = labels_ok[keep]
    confidence[rows] = chosen_p
    suggested[rows] = np.where(
        is_clean_ok[keep], labels, np.where(chosen_p >= min_confidence, chosen, -1)
    )
    names = [class_names[v] if 0 <= v < len(class_names) else None for v in suggested]
    table = _set(table, "is_clean", pa.array(is_clean))
    table = _set(table, "clean_score", pa.array(score))
    table = _set(table, "status", pa.array(status.tolist(), pa.string()))
    table = _set(table, "suggested_label", pa.array(suggested))
    table = _set(table, "suggested_name", pa.array(names, pa.string()))
    table = _set(table, "suggested_confidence", pa.array(confidence))
    del n
    return table


def apply_detectors(
    table: pa.Table, batch, detectors: FittedDetectors, class_names: list[str]
) -> pa.Table:
    """A manifest part built from a ScoreBatch (one manifest row per batch row) with the
    detectors' columns and the chosen one's verdict on the batch's usable rows.

    For the ensemble before calibration only the member columns are added (the
    calibration pass reads them)."""
    ok_idx = batch.ok_idx
    labels = table.column("label").to_numpy(zero_copy_only=False).astype(np.int64)
    labels_ok = labels[ok_idx]
    outputs = member_outputs(detectors, batch, labels_ok)
    table = add_member_columns(table, ok_idx, outputs)
    if detectors.chosen == ENSEMBLE:
        if detectors.calibration is None:
            return table
        scores, _ = member_scores(table, ok_idx, detectors.ensemble_members)
        score, is_clean = detectors.calibration.combine(scores)
        n = table.num_rows
        table = _set(table, "ensemble_clean", _spread(is_clean, n, ok_idx, False, bool))
        table = _set(table, "ensemble_score", _spread(score, n, ok_idx, np.nan, np.float32))
        output = outputs.get("cleannet")  # its verified labels are the only suggestions kept
        if output is not None and output.suggested is not None:
            trusted = output.suggested >= 0
            is_clean = np.where(trusted, output.suggested == labels_ok, is_clean)
        return set_verdict(
            table,
            ok_idx,
            labels_ok,
            is_clean,
            score,
            output,
            detectors.suggest_min_confidence,
            class_names,
        )
    output = outputs[detectors.chosen]
    return set_verdict(
        table,
        ok_idx,
        labels_ok,
        output.is_clean,
        output.clean_score,
        output,
        detectors.suggest_min_confidence,
        class_names,
    )


# --------------------------------------------------------------------------------------
# Summary: the detectors side by side
# --------------------------------------------------------------------------------------


def summary_columns(detectors: FittedDetectors | None) -> list[str]:
    """The manifest columns `compare_detectors` reads."""
    if detectors is None:
        return []
    return [f"{name}_{part}" for name in detectors.names() for part in ("clean", "score")]


def compare_detectors(columns: dict, detectors: FittedDetectors | None) -> dict | None:
    """Per detector run: clean count, agreement with the chosen one, and detection figures
    against true labels where the shards carry them."""
    if detectors is None:
        return None
    status = np.asarray(columns["status"], dtype=object)
    ok = status != "failed"
    labels = np.asarray(columns["label"], dtype=np.int64)
    truth = np.asarray(columns["true_label"], dtype=np.int64)
    known = ok & (truth >= 0)
    chosen = np.asarray(columns[f"{detectors.chosen}_clean"], dtype=bool)
    out: dict = {"chosen": detectors.chosen, "detectors": {}}
    for name in detectors.names():
        clean = np.asarray(columns[f"{name}_clean"], dtype=bool)
        score = np.asarray(columns[f"{name}_score"], dtype=np.float64)
        entry: dict = {
            "clean": int((ok & clean).sum()),
            "agreement_with_chosen": float((clean[ok] == chosen[ok]).mean()) if ok.any() else None,
        }
        if known.any():
            entry["detection"] = detection_metrics(
                clean[known],
                labels[known] == truth[known],
                clean_score=np.nan_to_num(score[known], nan=0.0),
            )
        out["detectors"][name] = entry
    fitted = {name: member.as_dict() for name, member in detectors.members.items()}
    if detectors.calibration is not None:
        fitted[ENSEMBLE] = detectors.calibration.as_dict()
    out["fitted"] = fitted
    out["fit_seconds"] = {name: round(s, 2) for name, s in detectors.fit_seconds.items()}
    return out


def apply_in_memory(
    manifest: pa.Table, batch, detectors: FittedDetectors, class_names: list[str]
) -> tuple[pa.Table, FittedDetectors]:
    """The whole run's manifest (one ScoreBatch) with the detectors applied; the ensemble
    is calibrated on it first. Returns (manifest, detectors as applied)."""
    table = apply_detectors(manifest, batch, detectors, class_names)
    if detectors.needs_calibration:
        detectors = detectors.calibrated([calibration_part(table, batch.ok_idx, detectors)])
        table = apply_detectors(manifest, batch, detectors, class_names)
    return table, detectors
