"""Which global fit runs: in memory on the driver, or over Ray Data ("distributed").

`choose_mode` reads the score files' Parquet footers (rows, embedding width) and picks
`in_memory` when the estimated size of the in-memory fit fits the budget
(`selection.fit_memory_gb`, default half of the driver's available memory).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow.parquet as pq

from cleaner.config import SelectionConfig
from cleaner.reading import uri as uri_lib

FitMode = Literal["in_memory", "distributed"]


SMALL_COLUMN_BYTES = 512  # per sample: score-table strings and lists, selection arrays


EMBEDDING_BYTES_PER_DIM = 14  # float16 column + numpy copies + float32 normalised + fold split


PROBABILITY_BYTES_PER_CLASS = 16  # probe probabilities float64[N, K] and one temporary


def estimate_in_memory_bytes(num_samples: int, embed_dim: int, num_classes: int = 0) -> int:
    """Rough peak bytes of the in-memory fit (`cleaner.selection.fit_in_memory`) on one node."""
    for name, value in (
        ("num_samples", num_samples),
        ("embed_dim", embed_dim),
        ("num_classes", num_classes),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    per_sample = (
        SMALL_COLUMN_BYTES
        + EMBEDDING_BYTES_PER_DIM * int(embed_dim)
        + PROBABILITY_BYTES_PER_CLASS * int(num_classes)
    )
    return int(num_samples) * per_sample


def choose_fit_mode(
    num_samples: int, embed_dim: int, memory_budget_bytes: int, *, num_classes: int = 0
) -> FitMode:
    """ "in_memory" when the estimated bytes of the in-memory fit fit the budget, else
    "distributed"."""
    if isinstance(memory_budget_bytes, bool) or not isinstance(
        memory_budget_bytes, (int, np.integer)
    ):
        raise ValueError(f"memory_budget_bytes must be an integer, got {memory_budget_bytes!r}")
    if memory_budget_bytes <= 0:
        raise ValueError(f"memory_budget_bytes must be positive, got {memory_budget_bytes}")
    needed = estimate_in_memory_bytes(num_samples, embed_dim, num_classes)
    return "in_memory" if needed <= memory_budget_bytes else "distributed"


GIB = 1024**3


DEFAULT_MEMORY_FRACTION = 0.5  # of the driver's available memory, when no budget is set


@dataclass(frozen=True)
class FitPlan:
    """Which fit runs, and why."""

    mode: str  # "in_memory" | "distributed"
    samples: int
    embed_dim: int
    estimated_gb: float
    budget_gb: float
    requested: str

    def as_dict(self) -> dict:
        return {
            "mode": self.mode,
            "requested": self.requested,
            "samples": self.samples,
            "embed_dim": self.embed_dim,
            "estimated_in_memory_gb": round(self.estimated_gb, 3),
            "memory_budget_gb": round(self.budget_gb, 3),
        }


def available_memory_bytes() -> int:
    """MemAvailable of this node (Linux), else the physical memory size."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def score_file_shape(score_uris: list[str]) -> tuple[int, int]:
    """(rows, embedding width) of the score files, from their Parquet footers only."""
    rows, width = 0, 0
    for uri in score_uris:
        fs, path = uri_lib.resolve(uri)
        with fs.open_input_file(path) as f:
            parquet = pq.ParquetFile(f)
            rows += parquet.metadata.num_rows
            if not width:
                embedding = parquet.schema_arrow.field("embedding").type
                width = int(getattr(embedding, "list_size", 0))
    return rows, width


def choose_mode(cfg: SelectionConfig, score_uris: list[str], num_classes: int) -> FitPlan:
    """The fit mode for these score files: cfg.fit_mode, or by size when it is "auto"."""
    samples, width = score_file_shape(score_uris)
    budget = (
        int(cfg.fit_memory_gb * GIB)
        if cfg.fit_memory_gb is not None
        else int(available_memory_bytes() * DEFAULT_MEMORY_FRACTION)
    )
    estimate = estimate_in_memory_bytes(samples, width, num_classes)
    mode = cfg.fit_mode
    if mode == "auto":
        mode = choose_fit_mode(samples, width, max(budget, 1), num_classes=num_classes)
    return FitPlan(mode, samples, width, estimate / GIB, budget / GIB, cfg.fit_mode)
