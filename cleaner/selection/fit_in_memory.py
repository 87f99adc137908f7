"""The job's global fit on the driver: every shard's scores in memory, the scikit-learn
probe, the EM engine's selection, then the manifest and summary.

This is the only step that sees the whole dataset, and it reads only the small columns
(plus the embeddings when the linear probe is on). Selection is never fitted per shard.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa

from cleaner.config import SelectionConfig
from cleaner.detectors.apply import (
    FittedDetectors,
    apply_in_memory,
    compare_detectors,
    summary_columns,
)
from cleaner.scoring.prompts import PromptBank
from cleaner.selection.fitted import FittedSelection
from cleaner.selection.manifest import build_manifest
from cleaner.selection.probe import fit_probe_probs
from cleaner.selection.rules import SourceScores
from cleaner.selection.score_table import (
    NOTHING_USABLE,
    ScoreBatch,
    duplicate_rows_in_memory,
    engine_options,
    source_columns,
)
from cleaner.selection.select import fit_selection_in_memory
from cleaner.selection.summary import manifest_summary_columns, summary_with_fit


def fit_in_memory(
    batch: ScoreBatch, cfg: SelectionConfig, num_classes: int, seed: int = 0
) -> tuple[FittedSelection | None, np.ndarray | None]:
    """The global fit on one node: sklearn probe, then the deterministic EM selection.

    (None, None) when no sample is usable: there is nothing to fit, and the manifest
    lists every sample as failed with its reason.
    """
    if len(batch.ok_idx) == 0:
        print(NOTHING_USABLE, flush=True)
        return None, None
    probe_probs = None
    if cfg.probe != "none":
        probe_probs = fit_probe_probs(
            batch.usable_embeddings,
            batch.labels[batch.ok_idx],
            num_classes,
            mode=cfg.probe,
            folds=cfg.probe_folds,
            C=cfg.probe_c,
            seed=seed,
        )
    rows = batch.selection_batch(probe_probs)
    sources = {
        name: SourceScores(p_label=rows[p], max_p=rows[m])
        for name, (p, m) in source_columns(probe_probs is not None).items()
    }
    fitted, _ = fit_selection_in_memory(
        rows["label"], num_classes, sources, keys=rows["key"], **engine_options(cfg)
    )
    return fitted, probe_probs


def fit_and_build_manifest(
    table: pa.Table,
    selection_cfg: SelectionConfig,
    class_names: list[str],
    bank: PromptBank,
    tau: float,
    seed: int = 0,
    finish: Callable[[pa.Table, int], pa.Table] | None = None,
    detectors: FittedDetectors | None = None,
) -> tuple[pa.Table, dict]:
    """The in-memory global fit over a whole score table: (manifest, summary parts).

    finish(manifest, 0), when given, adds columns to the manifest before it is summarised
    (the embedding checks: cleaner/checks/manifest_columns.py).
    detectors: the fitted detectors of `selection.detector` other than clipcleaner
    (cleaner/detectors/fit.py); None leaves CLIPCleaner's manifest as it is.
    """
    keys = np.asarray(table.column("key").to_pylist(), dtype=object)
    shards = np.asarray(table.column("shard").to_pylist(), dtype=object)
    batch = ScoreBatch(table, duplicate_rows_in_memory(keys, shards))
    fitted, probe_probs = fit_in_memory(batch, selection_cfg, len(class_names), seed)
    manifest = build_manifest(batch, fitted, probe_probs, selection_cfg, class_names, bank, tau)
    if detectors is not None:
        manifest, detectors = apply_in_memory(manifest, batch, detectors, class_names)
    if finish is not None:
        manifest = finish(manifest, 0)
    summary = summary_with_fit(manifest_summary_columns(manifest), fitted, class_names)
    if detectors is not None:
        summary["detectors"] = compare_detectors(
            manifest_summary_columns(manifest, summary_columns(detectors)), detectors
        )
    return manifest, summary
