"""The global fit: reads every shard's scores, selects clean samples, builds the manifest.

This is the only step that sees the whole dataset, and it reads only the small columns
(plus the embeddings when the linear probe is on). Selection is never fitted per shard.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cleaner.config import SelectionConfig
from cleaner.metrics import detection_metrics
from cleaner.reading import uri as uri_lib
from cleaner.reading.shards import STATUS_FAILED, STATUS_OK
from cleaner.scoring.pipeline import fixed_size_list_array
from cleaner.scoring.prompts import PromptBank
from cleaner.scoring.scorer import ClipScorer
from cleaner.selection.engine import FittedSelection, fit_selection_in_memory
from cleaner.selection.probe import fit_probe_probs
from cleaner.selection.rules import SourceScores

# The score files' columns (see ClipScorer / pipeline.scores_to_table) minus the embedding.
SMALL_COLUMNS = [c for c in ClipScorer.output_columns if c not in ("shard_total", "embedding")]
SUGGEST_BUDGET = 128 * 1024 * 1024  # bytes of prompt similarities held at once
TOP_SUGGESTIONS = 3
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


@dataclass
class Suggestions:
    """Per usable sample: the top classes of the combined probabilities, and explanations."""

    top_labels: np.ndarray  # int64 [n, TOP_SUGGESTIONS]
    top_probs: np.ndarray  # float32 [n, TOP_SUGGESTIONS]
    given_prompt: np.ndarray  # int64 [n]: index j of the given class's best-matching prompt
    given_similarity: np.ndarray  # float32 [n]: its cosine similarity
    suggested_prompt: np.ndarray  # int64 [n]: same, for the top suggested class
    suggested_similarity: np.ndarray  # float32 [n]


def chunk_rows(num_classes: int, max_prompts: int, budget_bytes: int = SUGGEST_BUDGET) -> int:
    """Rows per chunk so that a chunk's [rows, K, J] similarity block stays within budget."""
    return max(64, budget_bytes // (4 * num_classes * max_prompts))


def suggest_labels(
    embeddings: np.ndarray,
    labels: np.ndarray,
    bank: PromptBank,
    tau: float,
    probe_probs: np.ndarray | None,
) -> Suggestions:
    """Top classes of mean(zero-shot, probe) probabilities, and for the given and the top
    suggested class the prompt (class feature) that matches the image best; in chunks."""
    n = embeddings.shape[0]
    k, j, d = bank.features.shape
    top = min(TOP_SUGGESTIONS, k)
    text = bank.features.reshape(k * j, d).T
    out = Suggestions(
        top_labels=np.empty((n, top), dtype=np.int64),
        top_probs=np.empty((n, top), dtype=np.float32),
        given_prompt=np.empty(n, dtype=np.int64),
        given_similarity=np.empty(n, dtype=np.float32),
        suggested_prompt=np.empty(n, dtype=np.int64),
        suggested_similarity=np.empty(n, dtype=np.float32),
    )
    step = chunk_rows(k, j)
    for start in range(0, n, step):
        stop = min(start + step, n)
        emb = embeddings[start:stop].astype(np.float32)
        emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        sims = (emb @ text).reshape(-1, k, j)
        sims = np.where(bank.mask[None], sims, -np.inf)
        logits = sims / tau
        per_class = np.logaddexp.reduce(logits, axis=2)
        per_class -= per_class.max(axis=1, keepdims=True)
        combined = np.exp(per_class)
        combined /= combined.sum(axis=1, keepdims=True)
        if probe_probs is not None:
            combined = 0.5 * (combined + probe_probs[start:stop])
        order = np.argsort(-combined, axis=1, kind="stable")[:, :top]
        rows = np.arange(stop - start)
        out.top_labels[start:stop] = order
        out.top_probs[start:stop] = np.take_along_axis(combined, order, axis=1)
        for which, classes in (("given", labels[start:stop]), ("suggested", order[:, 0])):
            class_sims = sims[rows, classes]  # [rows, J]
            best = class_sims.argmax(axis=1)
            getattr(out, f"{which}_prompt")[start:stop] = best
            getattr(out, f"{which}_similarity")[start:stop] = class_sims[rows, best]
    return out


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


def build_manifest(
    batch: ScoreBatch,
    fitted: FittedSelection | None,
    probe_probs: np.ndarray | None,
    cfg: SelectionConfig,
    class_names: list[str],
    bank: PromptBank,
    tau: float,
) -> pa.Table:
    """Manifest rows of a score batch under a fitted selection (one row per input row).

    probe_probs: float[usable rows, K] or None; fitted may be None only when no row is
    usable. The same function serves the in-memory fit (the whole run at once) and the
    distributed one (one shard per task).
    """
    table, n, ok, ok_idx, labels = batch.table, batch.n, batch.ok, batch.ok_idx, batch.labels
    num_classes = len(class_names)
    rows = batch.selection_batch(probe_probs)
    by_source = source_columns(probe_probs is not None)
    values: dict[str, np.ndarray] = {}
    if len(ok_idx):
        evaluation_batch = {fitted.spec.label_column: rows["label"]}
        if fitted.spec.key_column is not None:
            evaluation_batch[fitted.spec.key_column] = rows["key"]
        for name, p_column, max_column in fitted.spec.sources:
            evaluation_batch[p_column] = rows[by_source[name][0]]
            evaluation_batch[max_column] = rows[by_source[name][1]]
        values = fitted.evaluate(evaluation_batch)

    def spread(name_or_values, fill, dtype) -> np.ndarray:
        out = np.full(n, fill, dtype=dtype)
        if len(ok_idx):
            v = values[name_or_values] if isinstance(name_or_values, str) else name_or_values
            out[ok_idx] = v
        return out

    is_clean = spread("is_clean", False, bool)
    suggested = np.full(n, -1, dtype=np.int64)
    confidence = np.full(n, np.nan, dtype=np.float32)
    hints = suggest_labels(batch.usable_embeddings, labels[ok_idx], bank, tau, probe_probs)
    confidence[ok_idx] = hints.top_probs[:, 0]
    suggested[ok_idx] = np.where(
        hints.top_probs[:, 0] >= cfg.suggest_min_confidence, hints.top_labels[:, 0], -1
    )
    clean_rows = ok & is_clean
    suggested[clean_rows] = labels[clean_rows]
    final_status = np.where(ok, np.where(is_clean, "clean", "noisy"), STATUS_FAILED)

    def names_of(values: np.ndarray) -> list[str | None]:
        return [class_names[v] if 0 <= v < num_classes else None for v in values]

    columns: dict[str, pa.Array] = {
        "key": pa.array(batch.keys.tolist(), pa.string()),
        "shard": pa.array(batch.shards.tolist(), pa.string()),
        "shard_pos": table.column("shard_pos").combine_chunks(),
        "label": pa.array(np.where(labels >= 0, labels, -1)),
        "label_name": pa.array(names_of(labels), pa.string()),
        "is_clean": pa.array(is_clean),
        "status": pa.array(final_status.tolist(), pa.string()),
        "reason": pa.array(
            [
                r if s == STATUS_FAILED else ""
                for r, s in zip(batch.reason, final_status, strict=True)
            ],
            pa.string(),
        ),
        "suggested_label": pa.array(suggested),
        "suggested_name": pa.array(names_of(suggested), pa.string()),
        "suggested_confidence": pa.array(confidence),
        "clean_score": pa.array(spread("clean_score", np.nan, np.float32)),
        "backfilled": pa.array(spread("backfilled", False, bool)),
    }
    for name, (p_column, max_column) in by_source.items():
        columns[f"p_label_{name}"] = pa.array(spread(rows[p_column], np.nan, np.float32))
        columns[f"max_p_{name}"] = pa.array(spread(rows[max_column], np.nan, np.float32))
        for quantity in ("loss_score", "gmm_p_clean", "consistency"):
            columns[f"{quantity}_{name}"] = pa.array(
                spread(f"{quantity}_{name}", np.nan, np.float32)
            )
    argmax_zs = np.where(ok, table.column("argmax").to_numpy(), -1)
    columns["argmax_zeroshot"] = pa.array(argmax_zs)
    columns["topk_labels_zeroshot"] = table.column("topk_labels").combine_chunks()
    columns["topk_probs_zeroshot"] = table.column("topk_probs").combine_chunks()
    columns["top_labels"] = fixed_size_list_array(spread_rows(hints.top_labels, -1, n, ok_idx))
    columns["top_probs"] = fixed_size_list_array(spread_rows(hints.top_probs, np.nan, n, ok_idx))
    flat_prompts = np.array([p for ps in bank.prompts for p in ps], dtype=object)
    first_prompt = np.cumsum([0] + [len(ps) for ps in bank.prompts])[:-1]
    given_text = np.full(n, None, dtype=object)
    suggested_text = np.full(n, None, dtype=object)
    given_text[ok_idx] = flat_prompts[first_prompt[labels[ok_idx]] + hints.given_prompt]
    suggested_text[ok_idx] = flat_prompts[
        first_prompt[hints.top_labels[:, 0]] + hints.suggested_prompt
    ]
    columns["explain_given_prompt"] = pa.array(given_text.tolist(), pa.string())
    columns["explain_given_similarity"] = pa.array(
        spread(hints.given_similarity, np.nan, np.float32)
    )
    columns["explain_suggested_prompt"] = pa.array(suggested_text.tolist(), pa.string())
    columns["explain_suggested_similarity"] = pa.array(
        spread(hints.suggested_similarity, np.nan, np.float32)
    )
    columns["true_label"] = table.column("true_label").combine_chunks()
    return pa.table(columns)


# The manifest columns `summarise` reads (a few bytes per sample).
SUMMARY_COLUMNS = [
    "status",
    "reason",
    "label",
    "true_label",
    "is_clean",
    "suggested_label",
    "clean_score",
    "argmax_zeroshot",
]


def summarise(columns: Mapping[str, np.ndarray], selection_counts: dict, class_names) -> dict:
    """Counts, detection and suggestion figures from the manifest's SUMMARY_COLUMNS."""
    status = np.asarray(columns["status"], dtype=object)
    reason = np.asarray(columns["reason"], dtype=object)
    labels = np.asarray(columns["label"], dtype=np.int64)
    true_labels = np.asarray(columns["true_label"], dtype=np.int64)
    is_clean = np.asarray(columns["is_clean"], dtype=bool)
    suggested = np.asarray(columns["suggested_label"], dtype=np.int64)
    clean_score = np.asarray(columns["clean_score"], dtype=np.float64)
    argmax_zs = np.asarray(columns["argmax_zeroshot"], dtype=np.int64)
    n = status.shape[0]
    ok = status != STATUS_FAILED
    failed_reasons = reason[~ok]
    duplicates = sum(1 for r in failed_reasons if str(r).startswith("duplicate key"))
    summary = {
        "counts": {
            "samples": int(n),
            "ok": int(ok.sum()),
            "failed": int((~ok).sum()),
            "duplicate_keys": int(duplicates),
            "clean": int((ok & is_clean).sum()),
            "noisy": int((ok & ~is_clean).sum()),
            "noisy_with_suggestion": int((ok & ~is_clean & (suggested >= 0)).sum()),
            "failed_by_reason": failure_reasons(failed_reasons),
        },
        "selection": selection_counts,
        "class_names": list(class_names),
        "zero_shot_accuracy_vs_given_labels": float((argmax_zs[ok] == labels[ok]).mean())
        if ok.any()
        else None,
    }
    truth_rows = ok & (true_labels >= 0)
    if truth_rows.any():
        truly_clean = labels[truth_rows] == true_labels[truth_rows]
        summary["zero_shot_accuracy_vs_true_labels"] = float(
            (argmax_zs[truth_rows] == true_labels[truth_rows]).mean()
        )
        summary["given_label_noise_rate"] = float(1.0 - truly_clean.mean())
        summary["detection"] = detection_metrics(
            is_clean[truth_rows],
            truly_clean,
            clean_score=np.nan_to_num(clean_score[truth_rows], nan=0.0),
        )
        wrong = truth_rows & (labels != true_labels)
        suggested_wrong = wrong & ~is_clean & (suggested >= 0)
        summary["suggestions"] = {
            "wrong_labels": int(wrong.sum()),
            "wrong_labels_with_suggestion": int(suggested_wrong.sum()),
            "suggestion_is_true_label": float(
                (suggested[suggested_wrong] == true_labels[suggested_wrong]).mean()
            )
            if suggested_wrong.any()
            else None,
            "wrong_labels_fixed_fraction": float((suggested[wrong] == true_labels[wrong]).mean())
            if wrong.any()
            else None,
        }
    return summary


def manifest_summary_columns(manifest: pa.Table) -> dict[str, np.ndarray]:
    return {name: manifest.column(name).to_numpy(zero_copy_only=False) for name in SUMMARY_COLUMNS}


def mixture_parameters(fitted: FittedSelection) -> dict:
    """The fitted mixtures per source, for the report's GMM curves (JSON-ready)."""
    out = {"gmm": fitted.spec.gmm, "sources": {}}
    for name, source in fitted.sources.items():
        out["sources"][name] = {
            "means": source.means.tolist(),
            "variances": source.variances.tolist(),
            "weights": source.weights.tolist(),
            "degenerate": source.degenerate.astype(bool).tolist(),
        }
    return out


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


def fit_and_build_manifest(
    table: pa.Table,
    selection_cfg: SelectionConfig,
    class_names: list[str],
    bank: PromptBank,
    tau: float,
    seed: int = 0,
) -> tuple[pa.Table, dict]:
    """The in-memory global fit over a whole score table: (manifest, summary parts)."""
    keys = np.asarray(table.column("key").to_pylist(), dtype=object)
    shards = np.asarray(table.column("shard").to_pylist(), dtype=object)
    batch = ScoreBatch(table, duplicate_rows_in_memory(keys, shards))
    fitted, probe_probs = fit_in_memory(batch, selection_cfg, len(class_names), seed)
    manifest = build_manifest(batch, fitted, probe_probs, selection_cfg, class_names, bank, tau)
    return manifest, summary_with_fit(manifest_summary_columns(manifest), fitted, class_names)


def summary_with_fit(
    columns: Mapping[str, np.ndarray], fitted: FittedSelection | None, class_names
) -> dict:
    """`summarise`, plus the selection counts and mixtures of the fit when there was one."""
    summary = summarise(columns, fitted.counts() if fitted is not None else {}, class_names)
    if fitted is not None:
        summary["mixtures"] = mixture_parameters(fitted)
    return summary


def spread_rows(values: np.ndarray, fill, n: int, rows: np.ndarray) -> np.ndarray:
    """[len(rows), W] values placed at `rows` of an [n, W] array filled with `fill`."""
    out = np.full((n, values.shape[1]), fill, dtype=values.dtype)
    out[rows] = values
    return out


def failure_reasons(reasons: np.ndarray) -> dict[str, int]:
    """Failure counts grouped by the reason's leading phrase (before the first colon)."""
    counts: dict[str, int] = {}
    for text in reasons:
        head = str(text).split(":", 1)[0].strip() or "unknown"
        counts[head] = counts.get(head, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))
