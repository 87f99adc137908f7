"""Loss scores grouped by mixture: the layout the EM engine's start and EM passes run on.

After the range pass each chunk's loss scores are computed once (`GroupScores`) and kept
with their rows grouped by mixture (a stable counting sort), one float64 per sample and
source (`GroupedScores`). The passes over that layout are cheaper than passes over the
raw rows, and give the same sums bit for bit:

- a pass reads only the rows of the mixtures still fitting (a converged class costs
  nothing), with no label lookups, logs or range normalisation per pass;
- per-mixture sums are `np.add.reduceat` over contiguous segments of the exact
  fixed-point terms (`segment_exact_sums`), instead of a float bincount per column;
- a Lloyd pass of the 2-means start (`SplitSumsPass`) sums only the samples between the
  old and the new threshold of each mixture: those, and only those, change side.

The sums are the exact integer sums of the same fixed-point terms (`em.estep_terms`, whose
per-sample arithmetic is unchanged), held as hi / lo parts like `em.exact_group_sums`'
output, so `em.combine_exact_sums` turns them into the same floats for any partition.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from cleaner.selection.em import (
    SPLIT_BITS,
    STAT_BITS,
    TERM_BITS,
    estep_terms,
    mixture_table,
    round_to_grid,
)
from cleaner.selection.fitted import Batch, SelectionSpec, SourceFit, as_labels
from cleaner.selection.runners import BlockPass

SUM_ROWS = 1 << 13  # rows per exact float64 segment sum (and per E-step chunk)
EXACT_FLOAT = 2.0**53  # integers up to here are exact float64 values
SPLIT_BITS_MASK = (1 << SPLIT_BITS) - 1


@dataclass(frozen=True, eq=False)
class GroupedScores:
    """One chunk's loss scores per source, rows grouped by mixture.

    x[i] holds source i's fitted samples (float64); mixture g's are
    x[i][offsets[i][g] : offsets[i][g + 1]] (in their input order).
    """

    x: tuple[np.ndarray, ...]
    offsets: tuple[np.ndarray, ...]  # int64[G + 1] each

    def segments(self, source: int, selected: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mixtures, their sample counts) of the selected mixtures with samples here."""
        lengths = np.diff(self.offsets[source])
        groups = np.flatnonzero(selected & (lengths > 0))
        return groups, lengths[groups]

    def rows_of(self, source: int, selected: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(x, mixture per row) of the selected mixtures' samples, grouped by mixture."""
        groups, sizes = self.segments(source, selected)
        return self.x_of(source, groups, sizes), np.repeat(groups, sizes)

    def x_of(self, source: int, groups: np.ndarray, sizes: np.ndarray) -> np.ndarray:
        """The samples of `segments`' mixtures (no copy when they are all of them)."""
        x = self.x[source]
        if sizes.sum() == x.shape[0]:
            return x
        ends = np.cumsum(sizes)
        shift = np.repeat(self.offsets[source][groups] - (ends - sizes), sizes)
        return x[np.arange(ends[-1] if ends.size else 0) + shift]


@dataclass(frozen=True, eq=False)
class GroupScores:
    """Builds a chunk's `GroupedScores` from its raw columns (after the range pass)."""

    spec: SelectionSpec
    sources: dict[str, SourceFit]

    def __call__(self, batch: Batch) -> GroupedScores:
        labels = as_labels(batch[self.spec.label_column])
        g = self.spec.num_groups
        sort_dtype = np.int16 if g < np.iinfo(np.int16).max else np.int64  # radix sort
        xs, offsets = [], []
        for name, p_column, _ in self.spec.sources:
            source = self.sources[name]
            groups = source.group_ids(labels, self.spec.gmm)
            rows = np.flatnonzero(groups >= 0)
            rows = rows[np.argsort(groups[rows].astype(sort_dtype), kind="stable")]
            p_label = np.asarray(batch[p_column], dtype=np.float64)[rows]
            xs.append(source.loss_score(p_label, labels[rows]))
            counts = np.bincount(groups[rows], minlength=g)
            offsets.append(np.concatenate(([0], np.cumsum(counts))).astype(np.int64))
        return GroupedScores(tuple(xs), tuple(offsets))


def add_segment_sums(
    out: np.ndarray, groups: np.ndarray, terms: np.ndarray, bits: np.ndarray
) -> None:
    """Add the exact per-mixture sums of rounded terms to out int64[2, G, C] (hi and lo
    parts, see em.exact_group_sums); at most SUM_ROWS rows, grouped by mixture.

    terms float64[C, n]: row c holds multiples of 2^-bits[c] (`em.estep_terms`). Their
    float64 sums are exact while every partial sum is an integer multiple below 2^53
    (checked from the largest term; |values| <= 1 always are); otherwise the row is
    summed as int64. One np.add.reduceat per row over the mixtures' segments.
    """
    if groups.shape[0] == 0:
        return
    firsts = np.flatnonzero(np.concatenate(([True], groups[1:] != groups[:-1])))
    ids = groups[firsts]
    scale = np.ldexp(1.0, bits)
    largest = np.abs(terms).max(axis=1) * scale * groups.shape[0]
    for c in range(terms.shape[0]):
        if largest[c] <= EXACT_FLOAT:
            sums = np.ldexp(np.add.reduceat(terms[c], firsts), bits[c]).astype(np.int64)
        else:
            integers = np.ldexp(terms[c], bits[c]).astype(np.int64)
            sums = np.add.reduceat(integers, firsts)
        out[0, ids, c] += sums >> SPLIT_BITS
        out[1, ids, c] += sums & SPLIT_BITS_MASK


def split_terms(x: np.ndarray) -> np.ndarray:
    """float64[3, n]: a hard split's terms of samples on one side, r = 1, r x, r x^2,
    rounded as em.estep_terms rounds them (1.0 * x * x is x * x)."""
    return round_to_grid(np.stack((np.ones_like(x), x, x * x)), STAT_BITS)


def _chunked_sums(
    terms_of: Callable[..., np.ndarray],
    x: np.ndarray,
    groups: np.ndarray,
    num_groups: int,
    bits: np.ndarray,
    params: np.ndarray | None = None,
) -> np.ndarray:
    """int64[2, G, C]: exact per-mixture sums of terms_of(x[, params]) over SUM_ROWS-row
    chunks (cache-sized temporaries)."""
    out = np.zeros((2, num_groups, bits.shape[0]), dtype=np.int64)
    for start in range(0, x.shape[0], SUM_ROWS):
        rows = slice(start, start + SUM_ROWS)
        terms = terms_of(x[rows]) if params is None else terms_of(x[rows], params[:, rows])
        add_segment_sums(out, groups[rows], terms, bits)
    return out


@dataclass(frozen=True, eq=False)
class GroupedHistogramPass(BlockPass):
    """Per-chunk histograms (bins) of the loss scores of every mixture."""

    num_groups: int
    bins: int

    def __call__(self, item: GroupedScores) -> Batch:
        out: Batch = {}
        size = self.num_groups * self.bins
        for i, (x, offsets) in enumerate(zip(item.x, item.offsets, strict=True)):
            groups = np.repeat(np.arange(self.num_groups), np.diff(offsets))
            cells = groups * self.bins + np.minimum((x * self.bins).astype(np.int64), self.bins - 1)
            out[f"hist_{i}"] = np.bincount(cells, minlength=size).reshape(1, -1, self.bins)
        return out


@dataclass(frozen=True, eq=False)
class SplitSumsPass(BlockPass):
    """Exact sums of split terms (r = 1, r x, r x^2) over the samples with low <= x < high
    of each selected mixture, one output per name: name -> (source, selected, low, high)."""

    num_groups: int
    ranges: dict[str, tuple[int, np.ndarray, np.ndarray, np.ndarray]]

    def __call__(self, item: GroupedScores) -> Batch:
        out: Batch = {}
        for name, (source, selected, low, high) in self.ranges.items():
            x, groups = item.rows_of(source, selected)
            inside = (x >= low[groups]) & (x < high[groups])
            x, groups = x[inside], groups[inside]
            sums = _chunked_sums(split_terms, x, groups, self.num_groups, TERM_BITS[:3])
            out[name] = sums[None]
        return out


@dataclass(frozen=True, eq=False)
class GroupedEStepPass(BlockPass):
    """One E-step over a chunk: exact per-mixture sums for every source still fitting."""

    spec: SelectionSpec
    sources: dict[str, SourceFit]
    active: dict[str, np.ndarray]  # source -> bool[G], mixtures not yet converged

    def __call__(self, item: GroupedScores) -> Batch:
        out: Batch = {}
        for i, (name, _, _) in enumerate(self.spec.sources):
            active = self.active.get(name)
            if active is None or not active.any():
                continue
            source = self.sources[name]
            groups, sizes = item.segments(i, active)
            table = mixture_table(source.means, source.variances, source.weights)
            params = np.repeat(table[:, groups], sizes, axis=1)  # rows are grouped
            x = item.x_of(i, groups, sizes)
            rows = np.repeat(groups, sizes)
            g = self.spec.num_groups
            out[f"em_{i}"] = _chunked_sums(estep_terms, x, rows, g, TERM_BITS, params)[None]
        return out
