"""The manifest: one row per input sample (clean / noisy / failed with its reason), the
suggested labels and their explanations; `ManifestWriter` streams it to Parquet.

Its `shard` column names each shard relative to the input root, recorded once in the
Parquet metadata (`SHARD_ROOT_KEY`; cleaner.reading.shard_roots): moved shards are found
again from wherever they are given next. Manifests without the key name absolute paths.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cleaner.config import SelectionConfig
from cleaner.reading import uri as uri_lib
from cleaner.reading.shard_roots import relative_to_root
from cleaner.reading.shards import STATUS_FAILED
from cleaner.scoring.prompts import PromptBank
from cleaner.scoring.writing import fixed_size_list_array
from cleaner.selection.fitted import FittedSelection
from cleaner.selection.score_table import ScoreBatch, source_columns

SUGGEST_BUDGET = 128 * 1024 * 1024  # bytes of prompt similarities held at once


TOP_SUGGESTIONS = 3


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
    budget_bytes: int = SUGGEST_BUDGET,
) -> Suggestions:
    """Top classes of mean(zero-shot, probe) probabilities, and for the given and the top
    suggested class the prompt (class feature) that matches the image best; in chunks of
    `chunk_rows(K, J, budget_bytes)` rows."""
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
    step = min(chunk_rows(k, j, budget_bytes), max(n, 1))
    masked = ~bank.mask.reshape(k * j)
    any_masked = bool(masked.any())
    # two [step, K * J] buffers reused by every chunk: fresh arrays of this size per
    # chunk cost more in page faults than the arithmetic at K = 1,000 x 80 prompts
    sims_buffer = np.empty((step, k * j), dtype=np.float32)
    logits_buffer = np.empty_like(sims_buffer)
    for start in range(0, n, step):
        stop = min(start + step, n)
        emb = embeddings[start:stop].astype(np.float32)
        emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        flat = np.matmul(emb, text, out=sims_buffer[: stop - start])
        if any_masked:
            flat[:, masked] = -np.inf
        sims = flat.reshape(-1, k, j)
        # log-sum-exp over each class's prompts, shifted by the class's best prompt: one
        # exp per similarity (np.logaddexp.reduce takes two transcendentals per element
        # and was 10x slower at K = 1,000 x 80 prompts)
        logits = np.divide(sims, tau, out=logits_buffer[: stop - start].reshape(-1, k, j))
        peak = logits.max(axis=2, keepdims=True)
        np.subtract(logits, peak, out=logits)
        np.exp(logits, out=logits)
        per_class = np.log(logits.sum(axis=2)) + peak[..., 0]
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
    if "max_similarity" in table.column_names:  # best image-prompt cosine (off-topic check)
        columns["max_similarity"] = table.column("max_similarity").combine_chunks()
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


def spread_rows(values: np.ndarray, fill, n: int, rows: np.ndarray) -> np.ndarray:
    """[len(rows), W] values placed at `rows` of an [n, W] array filled with `fill`."""
    out = np.full((n, values.shape[1]), fill, dtype=values.dtype)
    out[rows] = values
    return out


SHARD_ROOT_KEY = b"clipcleaner.shard_root"
MANIFEST_FILE = "manifest.parquet"


def manifest_file(location: str) -> str:
    """The manifest file itself, or manifest.parquet inside a clean run's output folder."""
    return location if location.endswith(".parquet") else uri_lib.join(location, MANIFEST_FILE)


def with_relative_shards(table: pa.Table, root: str | None) -> pa.Table:
    """Manifest rows whose shard column is relative to `root`, with root in the metadata
    (unchanged when root is None: the shards share no root)."""
    if root is None:
        return table
    shards = table.column("shard").to_pylist()
    relative: dict[str, str] = {s: relative_to_root(s, root) for s in set(shards)}
    index = table.schema.get_field_index("shard")
    table = table.set_column(index, "shard", pa.array([relative[s] for s in shards], pa.string()))
    metadata = {**(table.schema.metadata or {}), SHARD_ROOT_KEY: root.encode()}
    return table.replace_schema_metadata(metadata)


def read_shard_root(manifest_uri: str) -> str | None:
    """The input root a manifest's shard paths are relative to; None for absolute paths."""
    fs, path = uri_lib.resolve(manifest_uri)
    with fs.open_input_file(path) as f:
        metadata = pq.read_schema(f).metadata or {}
    root = metadata.get(SHARD_ROOT_KEY)
    return root.decode() if root is not None else None


# manifest columns the report never reads: left on disk by read_manifest_for_report
REPORT_UNUSED_COLUMNS = frozenset(
    ("shard_pos", "argmax_zeroshot", "max_similarity", "explain_given_prompt",
     "explain_given_similarity", "explain_suggested_prompt", "explain_suggested_similarity")
)  # fmt: skip
REPORT_UNUSED_PREFIXES = ("p_label_", "max_p_")


def read_manifest_for_report(manifest_uri: str) -> pa.Table:
    """The manifest's columns that the report reads: no list columns, none of
    REPORT_UNUSED_COLUMNS / _PREFIXES. The clean job's driver holds this table while it
    writes the report; at 1M rows the unused columns (the explanation prompts above all)
    were about half of it."""
    fs, path = uri_lib.resolve(manifest_uri)
    with fs.open_input_file(path) as f:
        schema = pq.read_schema(f)
        columns = [
            field.name
            for field in schema
            if not pa.types.is_fixed_size_list(field.type)
            and not pa.types.is_list(field.type)
            and field.name not in REPORT_UNUSED_COLUMNS
            and not field.name.startswith(REPORT_UNUSED_PREFIXES)
        ]
    with fs.open_input_file(path) as f:
        return pq.read_table(f, columns=columns)


class ManifestWriter:
    """Streams tables into one Parquet file: a temp file renamed on success locally; on S3
    a multipart upload that only becomes visible when closed."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.fs, self.path = uri_lib.resolve(uri)
        self.target = self.path if uri_lib.is_s3(uri) else f"{self.path}.tmp-{os.getpid()}"
        self.stream = None
        self.writer: pq.ParquetWriter | None = None

    def __enter__(self) -> ManifestWriter:
        if not uri_lib.is_s3(self.uri):
            uri_lib.makedirs(os.path.dirname(self.path))
        self.stream = self.fs.open_output_stream(self.target)
        return self

    def write(self, table: pa.Table) -> None:
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.stream, table.schema)
        self.writer.write_table(table)

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.writer is not None:
            self.writer.close()
        self.stream.close()
        if exc_type is None:
            if not uri_lib.is_s3(self.uri):
                os.replace(self.target, self.path)
        elif uri_lib.path_exists(self.fs, self.target):
            self.fs.delete_file(self.target)  # no partial manifest is left behind
