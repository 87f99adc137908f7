"""The global fit: reads every shard's scores, selects clean samples, builds the manifest.

This is the only step that sees the whole dataset, and it reads only the small columns
(plus the embeddings when the linear probe is on). Selection is never fitted per shard.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cleaner import uri as uri_lib
from cleaner.config import SelectionConfig
from cleaner.metrics import detection_metrics
from cleaner.pipeline import fixed_size_list_array
from cleaner.probe import fit_probe_probs
from cleaner.prompts import PromptBank
from cleaner.scorer import ClipScorer
from cleaner.selection import SelectionResult, SourceScores, select_from_scores
from cleaner.shards import STATUS_FAILED, STATUS_OK

# The score files' columns (see ClipScorer / pipeline.scores_to_table) minus the embedding.
SMALL_COLUMNS = [c for c in ClipScorer.output_columns if c not in ("shard_total", "embedding")]
SUGGEST_BUDGET = 128 * 1024 * 1024  # bytes of prompt similarities held at once
TOP_SUGGESTIONS = 3


def read_scores(scores_uri: str, file_names: list[str], with_embeddings: bool) -> pa.Table:
    """Concatenate the per-shard score files (in the given order), reading only needed columns."""
    columns = [*SMALL_COLUMNS, "embedding"] if with_embeddings else SMALL_COLUMNS
    tables = []
    for name in file_names:
        fs, path = uri_lib.resolve(uri_lib.join(scores_uri, name))
        with fs.open_input_file(path) as f:
            tables.append(pq.read_table(f, columns=columns))
    return pa.concat_tables(tables)


def mark_duplicate_keys(keys: np.ndarray, status: np.ndarray, reason: np.ndarray, shards) -> int:
    """Fail every repeat of a key already seen (in shard order); returns how many were failed."""
    seen: dict[str, str] = {}
    failed = 0
    for i, key in enumerate(keys):
        if key in seen:
            if status[i] == STATUS_OK:
                status[i] = STATUS_FAILED
                reason[i] = f"duplicate key (first seen in {uri_lib.basename(seen[key])})"
                failed += 1
        else:
            seen[key] = shards[i]
    return failed


def embeddings_of(table: pa.Table) -> np.ndarray:
    column = table.column("embedding").combine_chunks()
    width = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)


def fixed_list_to_numpy(column: pa.ChunkedArray) -> np.ndarray:
    array = column.combine_chunks()
    return array.flatten().to_numpy(zero_copy_only=False).reshape(-1, array.type.list_size)


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


def fit_and_build_manifest(
    table: pa.Table,
    selection_cfg: SelectionConfig,
    class_names: list[str],
    bank: PromptBank,
    tau: float,
    seed: int = 0,
) -> tuple[pa.Table, dict]:
    """Select clean samples over the whole table; return (manifest, summary parts)."""
    num_classes = len(class_names)
    n = table.num_rows
    keys = np.asarray(table.column("key").to_pylist(), dtype=object)
    shards = np.asarray(table.column("shard").to_pylist(), dtype=object)
    status = np.asarray(table.column("status").to_pylist(), dtype=object)
    reason = np.asarray(table.column("reason").to_pylist(), dtype=object)
    labels = table.column("label").to_numpy()
    true_labels = table.column("true_label").to_numpy()
    p_label_zs = table.column("p_label").to_numpy().astype(np.float64)
    max_p_zs = table.column("max_p").to_numpy().astype(np.float64)
    duplicates = mark_duplicate_keys(keys, status, reason, shards)
    ok = status == STATUS_OK
    ok_idx = np.nonzero(ok)[0]
    if len(ok_idx) == 0:
        raise ValueError("no usable sample: every sample failed (see the manifest's reasons)")

    sources = {"zeroshot": SourceScores(p_label=p_label_zs[ok_idx], max_p=max_p_zs[ok_idx])}
    probe_probs = None
    embeddings = embeddings_of(table)[ok_idx] if "embedding" in table.column_names else None
    if selection_cfg.probe != "none":
        probe_probs = fit_probe_probs(
            embeddings,
            labels[ok_idx],
            num_classes,
            mode=selection_cfg.probe,
            folds=selection_cfg.probe_folds,
            C=selection_cfg.probe_c,
            seed=seed,
        )
        sources["probe"] = SourceScores.from_probs(labels[ok_idx], probe_probs)
    result: SelectionResult = select_from_scores(
        labels[ok_idx],
        num_classes,
        sources,
        theta_gmm=selection_cfg.theta_gmm,
        theta_cons=selection_cfg.theta_cons,
        gmm=selection_cfg.gmm,
    )

    def spread(values: np.ndarray, fill, dtype) -> np.ndarray:
        out = np.full(n, fill, dtype=dtype)
        out[ok_idx] = values
        return out

    is_clean = spread(result.is_clean, False, bool)
    suggested = np.full(n, -1, dtype=np.int64)
    confidence = np.full(n, np.nan, dtype=np.float32)
    hints = suggest_labels(embeddings, labels[ok_idx], bank, tau, probe_probs)
    confidence[ok_idx] = hints.top_probs[:, 0]
    suggested[ok_idx] = np.where(
        hints.top_probs[:, 0] >= selection_cfg.suggest_min_confidence, hints.top_labels[:, 0], -1
    )
    clean_rows = ok & is_clean
    suggested[clean_rows] = labels[clean_rows]
    final_status = np.where(ok, np.where(is_clean, "clean", "noisy"), STATUS_FAILED)

    def names_of(values: np.ndarray) -> list[str | None]:
        return [class_names[v] if 0 <= v < num_classes else None for v in values]

    columns: dict[str, pa.Array] = {
        "key": pa.array(keys.tolist(), pa.string()),
        "shard": pa.array(shards.tolist(), pa.string()),
        "shard_pos": table.column("shard_pos").combine_chunks(),
        "label": pa.array(np.where(labels >= 0, labels, -1)),
        "label_name": pa.array(names_of(labels), pa.string()),
        "is_clean": pa.array(is_clean),
        "status": pa.array(final_status.tolist(), pa.string()),
        "reason": pa.array(
            [r if s == STATUS_FAILED else "" for r, s in zip(reason, final_status, strict=True)],
            pa.string(),
        ),
        "suggested_label": pa.array(suggested),
        "suggested_name": pa.array(names_of(suggested), pa.string()),
        "suggested_confidence": pa.array(confidence),
        "clean_score": pa.array(spread(result.clean_score, np.nan, np.float32)),
        "backfilled": pa.array(spread(result.backfilled, False, bool)),
    }
    for name, sel in result.sources.items():
        p_label = sources[name].p_label
        max_p = sources[name].max_p
        columns[f"p_label_{name}"] = pa.array(spread(p_label, np.nan, np.float32))
        columns[f"max_p_{name}"] = pa.array(spread(max_p, np.nan, np.float32))
        columns[f"loss_score_{name}"] = pa.array(spread(sel.loss_score, np.nan, np.float32))
        columns[f"gmm_p_clean_{name}"] = pa.array(spread(sel.gmm_p_clean, np.nan, np.float32))
        columns[f"consistency_{name}"] = pa.array(spread(sel.consistency, np.nan, np.float32))
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
    known_truth = true_labels >= 0
    if known_truth.any():
        columns["true_label"] = pa.array(true_labels)
    manifest = pa.table(columns)

    summary = {
        "counts": {
            "samples": int(n),
            "ok": int(ok.sum()),
            "failed": int((~ok).sum()),
            "duplicate_keys": int(duplicates),
            "clean": int(clean_rows.sum()),
            "noisy": int((ok & ~is_clean).sum()),
            "noisy_with_suggestion": int((ok & ~is_clean & (suggested >= 0)).sum()),
            "failed_by_reason": failure_reasons(reason[~ok]),
        },
        "selection": result.counts(),
        "class_names": list(class_names),
        "zero_shot_accuracy_vs_given_labels": float((argmax_zs[ok] == labels[ok]).mean()),
    }
    truth_rows = ok & known_truth
    if truth_rows.any():
        truly_clean = labels[truth_rows] == true_labels[truth_rows]
        summary["zero_shot_accuracy_vs_true_labels"] = float(
            (argmax_zs[truth_rows] == true_labels[truth_rows]).mean()
        )
        summary["given_label_noise_rate"] = float(1.0 - truly_clean.mean())
        summary["detection"] = detection_metrics(
            is_clean[truth_rows],
            truly_clean,
            clean_score=spread(result.clean_score, 0.0, np.float64)[truth_rows],
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
    return manifest, summary


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
