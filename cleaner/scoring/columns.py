"""The score files' columns: what the scorer writes per sample (a light module: the fit
and the readers import it without torch or open_clip)."""

from __future__ import annotations

PASSTHROUGH_COLUMNS = (
    "key",
    "shard",
    "shard_pos",
    "label",
    "true_label",
    "status",
    "reason",
    "shard_total",
)

SCORE_OUTPUT_COLUMNS = (
    *PASSTHROUGH_COLUMNS,
    "p_label",
    "max_p",
    "argmax",
    "topk_labels",
    "topk_probs",
    "embedding",
    *("content_hash", "max_similarity", "twin_cosine"),  # for the embedding checks
)

SCORE_FORMAT = "2"
"""Bumped when the score files gain or change columns: older score files are rescored."""
