"""Near-duplicate candidates with faiss: a coarse k-means partition of the embeddings,
then an exact k-nearest-neighbour search inside each cell (docs/checks.md).

This is faiss's inverted-file (IVF) idea spread over Ray tasks (cleaner/checks/search.py):
every embedding goes to the cell of its nearest centroid, and also to its second one when
that is almost as near (`margin`), so that a pair split by a cell border is still found in
the cell they share. A cell is searched by one task with a flat inner-product index, so the
only approximation is the partition, whose recall benchmarks/duplicates.py measures
against brute force. Numpy in, numpy out; no Ray here.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

CELL_ROWS = 2000  # target rows per k-means cell: a flat search costs rows^2 per cell
TRAIN_ROWS_PER_CELL = 40  # k-means training sample (faiss warns below 39 per centroid)
MARGIN = 0.05  # a second cell when its centroid is within this cosine of the first's
EDGE_DTYPE = np.dtype([("a", np.int64), ("b", np.int64), ("cosine", np.float32)])
NN_BINS = 2000  # histogram of each row's second-neighbour cosine over [-1, 1]


def normalised(embeddings: np.ndarray) -> np.ndarray:
    """float32 rows of unit length (zero rows stay zero)."""
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def num_cells(rows: int, cell_rows: int = CELL_ROWS) -> int:
    return max(1, round(rows / cell_rows))


def train_centroids(sample: np.ndarray, cells: int, seed: int = 0, threads: int = 1) -> np.ndarray:
    """float32 [cells, D] unit centroids: spherical k-means (faiss) on a sample."""
    import faiss

    faiss.omp_set_num_threads(max(1, threads))
    x = normalised(sample)
    cells = max(1, min(cells, x.shape[0]))
    if cells == 1:
        return normalised(x.mean(axis=0, keepdims=True))
    kmeans = faiss.Kmeans(x.shape[1], cells, niter=10, seed=seed, spherical=True, verbose=False)
    kmeans.train(x)
    return normalised(kmeans.centroids)


def assign_cells(
    embeddings: np.ndarray, centroids: np.ndarray, margin: float = MARGIN, threads: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """(row index, cell) pairs: every row's nearest cell, plus its second nearest when
    that centroid's cosine is within `margin` of the nearest's."""
    import faiss

    faiss.omp_set_num_threads(max(1, threads))
    x = normalised(embeddings)
    rows = np.arange(x.shape[0], dtype=np.int64)
    if centroids.shape[0] == 1:
        return rows, np.zeros(x.shape[0], dtype=np.int64)
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    sims, cells = index.search(x, 2)
    second = sims[:, 1] >= sims[:, 0] - margin
    return (
        np.concatenate([rows, rows[second]]),
        np.concatenate([cells[:, 0], cells[second, 1]]).astype(np.int64),
    )


@dataclass
class CellResult:
    """What a search over some cells returns: candidate edges and the train rows' cosines
    to their SECOND nearest neighbour (a histogram, for the threshold's calibration: an
    image with one copy has the copy as its nearest neighbour, but a distinct image as its
    second, so duplicates barely move this distribution; docs/checks.md)."""

    edges: np.ndarray  # EDGE_DTYPE, a < b, cosine >= the floor
    nn_histogram: np.ndarray  # int64[NN_BINS]


def nn_histogram(best: np.ndarray) -> np.ndarray:
    bins = np.clip(
        ((np.asarray(best, np.float64) + 1.0) / 2.0 * NN_BINS).astype(np.int64), 0, NN_BINS - 1
    )
    return np.bincount(bins, minlength=NN_BINS).astype(np.int64)


def histogram_quantile(histogram: np.ndarray, q: float) -> float:
    """The cosine below which a fraction q of the histogram's rows lie (bin upper edge)."""
    total = histogram.sum()
    if total == 0:
        return 1.0
    index = int(np.searchsorted(np.cumsum(histogram), q * total, side="left"))
    return -1.0 + 2.0 * min(index + 1, NN_BINS) / NN_BINS


def search_cells(
    ids: np.ndarray,
    embeddings: np.ndarray,
    cells: np.ndarray,
    primary: np.ndarray,
    counted: np.ndarray,
    *,
    neighbours: int,
    floor: float,
    threads: int = 1,
) -> CellResult:
    """Exact k-NN inside each cell (faiss flat inner product) of the rows given.

    ids: global row ids (int64); cells: each row's cell; primary: whether this copy is
    the row's nearest cell (it counts once in the histogram); counted: rows whose second
    neighbour goes into the histogram (train rows). Edges join two
    distinct ids at cosine >= floor.
    """
    import faiss

    faiss.omp_set_num_threads(max(1, threads))
    x = normalised(embeddings)
    order = np.argsort(cells, kind="stable")
    bounds = np.flatnonzero(np.r_[True, cells[order][1:] != cells[order][:-1], True])
    found: list[np.ndarray] = []
    second_all: list[np.ndarray] = []
    for start, stop in itertools.pairwise(bounds):
        members = order[start:stop]
        if len(members) < 2:
            continue
        k = min(neighbours + 1, len(members))
        index = faiss.IndexFlatIP(x.shape[1])
        index.add(x[members])
        sims, hits = index.search(x[members], k)
        source = np.repeat(ids[members], k)
        target = ids[members][hits.reshape(-1)]
        cosine = sims.reshape(-1)
        valid = (hits.reshape(-1) >= 0) & (source != target)
        ranked = np.sort(np.where(valid.reshape(-1, k), sims, -np.inf), axis=1)
        second = ranked[:, -2] if k >= 3 else np.full(len(members), -np.inf)
        keep_second = primary[members] & counted[members] & np.isfinite(second)
        second_all.append(second[keep_second])
        keep = valid & (cosine >= floor)
        a, b = np.minimum(source[keep], target[keep]), np.maximum(source[keep], target[keep])
        edges = np.empty(int(keep.sum()), dtype=EDGE_DTYPE)
        edges["a"], edges["b"], edges["cosine"] = a, b, cosine[keep]
        found.append(edges)
    edges = unique_edges(np.concatenate(found)) if found else np.empty(0, dtype=EDGE_DTYPE)
    second = np.concatenate(second_all) if second_all else np.empty(0)
    return CellResult(edges, nn_histogram(second))


def unique_edges(edges: np.ndarray) -> np.ndarray:
    """One row per (a, b), keeping the highest cosine."""
    if len(edges) == 0:
        return edges
    order = np.lexsort((-edges["cosine"], edges["b"], edges["a"]))
    edges = edges[order]
    first = np.r_[True, (edges["a"][1:] != edges["a"][:-1]) | (edges["b"][1:] != edges["b"][:-1])]
    return edges[first]


def brute_force_edges(embeddings: np.ndarray, threshold: float, block: int = 4096) -> np.ndarray:
    """Every pair (a < b) at cosine >= threshold, by exact search in blocks (benchmarks)."""
    x = normalised(embeddings)
    found = []
    for start in range(0, x.shape[0], block):
        sims = x[start : start + block] @ x.T
        rows, cols = np.nonzero(sims >= threshold)
        rows = rows + start
        keep = rows < cols
        edges = np.empty(int(keep.sum()), dtype=EDGE_DTYPE)
        edges["a"], edges["b"] = rows[keep], cols[keep]
        edges["cosine"] = sims[rows[keep] - start, cols[keep]]
        found.append(edges)
    return np.concatenate(found) if found else np.empty(0, dtype=EDGE_DTYPE)
