"""The score table as the fits see it: reading the per-shard score files, the usable
rows (status ok, first occurrence of a key), and the selection's input columns.

`engine_options` is the one place where the selection config becomes the engine's
arguments; both fits (in memory and over Ray Data) call it.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cleaner.config import SelectionConfig
from cleaner.reading import uri as uri_lib
from cleaner.reading.shards import STATUS_FAILED, STATUS_OK
from cleaner.scoring.columns import SCORE_OUTPUT_COLUMNS

# The score files' columns (see ClipScorer / pipeline.scores_to_table) minus the embedding.
SMALL_COLUMNS = [c for c in SCORE_OUTPUT_COLUMNS if c not in ("shard_total", "embedding")]


NOTHING_USABLE = "[fit] no usable sample: every sample failed; the manifest gives each reason"


def read_scores(scores_uri: str, file_names: list[str], with_embeddings: bool) -> pa.Table:
    """Concatenate the per-shard score files (in the given order), reading only needed columns."""
    columns = [*SMALL_COLUMNS, "embedding"] if with_embeddings else SMALL_COLUMNS
    tables = []
    for name in file_names:
        fs, path = uri_lib.resolve(uri_lib.join(scores_uri, name))
        with fs.open_input_file(path) as f:
            tables.append(pq.read_table(f, columns=columns))
    return pa.concat_tables(tables)


def embeddings_of(table: pa.Table) -> np.ndarray:
    column = table.column("embedding").combine_chunks()
    width = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)


class ScoreBatch:
    """One score table (a shard, or the whole run) with its usable rows marked.

    usable = status ok and not a repeat of a key seen earlier; failed and duplicate rows
    keep their reason and get no scores in the manifest.
    """

    def __init__(self, table: pa.Table, duplicate_rows: np.ndarray | None = None) -> None:
        self.table = table
        self.n = table.num_rows
        self.keys = np.asarray(table.column("key").to_pylist(), dtype=object)
        self.shards = np.asarray(table.column("shard").to_pylist(), dtype=object)
        self.status = np.asarray(table.column("status").to_pylist(), dtype=object)
        self.reason = np.asarray(table.column("reason").to_pylist(), dtype=object)
        self.labels = table.column("label").to_numpy()
        if duplicate_rows is not None:
            for row, first_shard in duplicate_rows:
                if self.status[row] == STATUS_OK:
                    self.status[row] = STATUS_FAILED
                    self.reason[row] = duplicate_reason(first_shard)
        self.ok = self.status == STATUS_OK
        self.ok_idx = np.nonzero(self.ok)[0]

    @cached_property
    def usable_embeddings(self) -> np.ndarray:
        """The usable rows' embeddings (as stored, float16), read once per batch."""
        return embeddings_of(self.table)[self.ok_idx]

    @cached_property
    def _zero_shot_rows(self) -> dict[str, np.ndarray]:
        ok = self.ok_idx
        return {
            "key": self.keys[ok].astype(str),
            "label": self.labels[ok].astype(np.int64),
            "p_label": self.table.column("p_label").to_numpy()[ok].astype(np.float64),
            "max_p": self.table.column("max_p").to_numpy()[ok].astype(np.float64),
        }

    def selection_batch(self, probe_probs: np.ndarray | None) -> dict[str, np.ndarray]:
        """The usable rows' key, label and the `source_columns` of each source."""
        batch = dict(self._zero_shot_rows)
        if probe_probs is not None:
            batch["probe_p_label"] = probe_probs[np.arange(len(self.ok_idx)), batch["label"]]
            batch["probe_max_p"] = probe_probs.max(axis=1)
        return batch


def duplicate_reason(first_shard: str) -> str:
    return f"duplicate key (first seen in {uri_lib.basename(first_shard)})"


def duplicate_rows_in_memory(keys: np.ndarray, shards: np.ndarray) -> np.ndarray:
    """(row, first shard) for every repeat of a key seen earlier in row (shard) order."""
    seen: dict[str, str] = {}
    repeats = []
    for i, key in enumerate(keys):
        if key in seen:
            repeats.append((i, seen[key]))
        else:
            seen[key] = shards[i]
    return np.array(repeats, dtype=object).reshape(-1, 2)


def source_columns(with_probe: bool) -> dict[str, tuple[str, str]]:
    """Selection sources and their (p_label, max_p) columns in a selection batch."""
    columns = {"zeroshot": ("p_label", "max_p")}
    if with_probe:
        columns["probe"] = ("probe_p_label", "probe_max_p")
    return columns


def engine_options(cfg: SelectionConfig) -> dict:
    """The selection config's values that the EM engine takes (both fits pass these)."""
    return {
        "theta_gmm": cfg.theta_gmm,
        "theta_cons": cfg.theta_cons,
        "gmm": cfg.gmm,
        "reg_covar": cfg.gmm_reg_covar,
    }
