"""From duplicate edges to the manifest's duplicate and leak columns (docs/checks.md).

Rows are numbered by their manifest row (the train rows 0..n_train-1 in manifest order,
then the test rows). Exact edges join rows with the same content hash, near edges rows
whose embeddings' cosine reaches the threshold. Train rows joined by either form a group
(connected components: a chain of near matches is one group); its representative is its
first row in manifest order. A member is `exact` when it has its representative's content
hash, `near` otherwise; the representative is `exact` when some member is. A train row
joined to a test row (or sharing an exact group with one that is) leaks that test row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cleaner.checks.neighbours import EDGE_DTYPE

KIND_EXACT, KIND_NEAR = "exact", "near"


def connected_components(num_nodes: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """int64[num_nodes]: each node's smallest connected node (union-find, path halving)."""
    parent = np.arange(num_nodes, dtype=np.int64)

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for u, v in zip(a.tolist(), b.tolist(), strict=True):
        ru, rv = find(u), find(v)
        if ru != rv:
            parent[max(ru, rv)] = min(ru, rv)
    for x in range(num_nodes):
        parent[x] = find(x)
    return parent


def exact_edges(ids: np.ndarray, hashes: np.ndarray) -> np.ndarray:
    """Edges (first id of a hash, other id, cosine 1) among rows sharing a content hash."""
    ids = np.asarray(ids, dtype=np.int64)
    hashes = np.asarray(hashes, dtype=object)
    if len(ids) == 0:
        return np.empty(0, dtype=EDGE_DTYPE)
    order = np.lexsort((ids, hashes.astype(str)))
    ids, hashes = ids[order], hashes[order]
    starts = np.r_[True, hashes[1:] != hashes[:-1]]
    first = ids[np.maximum.accumulate(np.where(starts, np.arange(len(ids)), 0))]
    keep = ~starts
    edges = np.empty(int(keep.sum()), dtype=EDGE_DTYPE)
    edges["a"], edges["b"], edges["cosine"] = first[keep], ids[keep], 1.0
    return edges


@dataclass
class DuplicateFindings:
    """Sparse per-row results over the train rows (ids are manifest rows)."""

    rows: np.ndarray  # int64: train rows in a group, ascending
    group: np.ndarray  # int64: their group number (0, 1, ... by representative)
    representative: np.ndarray  # int64: their group's representative row
    kind: np.ndarray  # object: "exact" / "near"
    leak_rows: np.ndarray  # int64: train rows that duplicate a test row
    leak_test: np.ndarray  # int64: the test row (id - n_train) each one duplicates
    leak_kind: np.ndarray  # object: "exact" / "near"

    @property
    def num_groups(self) -> int:
        return int(self.group.max()) + 1 if len(self.group) else 0


def find_groups(
    n_train: int, exact: np.ndarray, near: np.ndarray, hashes_of: dict[int, str]
) -> DuplicateFindings:
    """Groups and leaks from exact and near edges (EDGE_DTYPE, ids over train + test rows).

    hashes_of: content hash of every row on an edge (rows without one are never exact).
    """
    edges = np.concatenate([exact, near])
    train_edges = edges[(edges["a"] < n_train) & (edges["b"] < n_train)]
    nodes = np.unique(np.r_[train_edges["a"], train_edges["b"]])
    local = np.searchsorted(nodes, train_edges["a"]), np.searchsorted(nodes, train_edges["b"])
    roots = nodes[connected_components(len(nodes), *local)] if len(nodes) else nodes
    representatives = np.unique(roots)
    group = np.searchsorted(representatives, roots)
    kind = np.array(
        [
            KIND_EXACT
            if hashes_of.get(int(r)) is not None and hashes_of.get(int(r)) == hashes_of.get(int(p))
            else KIND_NEAR
            for r, p in zip(nodes, roots, strict=True)
        ],
        dtype=object,
    )
    # a representative is exact when one of its members is
    exact_groups = set(group[(nodes != roots) & (kind == KIND_EXACT)].tolist())
    is_rep = nodes == roots
    kind[is_rep] = [KIND_EXACT if g in exact_groups else KIND_NEAR for g in group[is_rep]]
    leak_rows, leak_test, leak_kind = _leaks(n_train, edges, exact, nodes, roots, kind)
    return DuplicateFindings(nodes, group, roots, kind, leak_rows, leak_test, leak_kind)


def _leaks(n_train, edges, exact, nodes, roots, kind):
    """Per train row: the test row it matches best (exact first, then highest cosine);
    rows of an exact group inherit their group's leak."""
    cross = edges[(edges["a"] < n_train) != (edges["b"] < n_train)]
    train = np.minimum(cross["a"], cross["b"])
    test = np.maximum(cross["a"], cross["b"]) - n_train
    is_exact = np.zeros(len(cross), dtype=bool)
    is_exact[: int(((exact["a"] < n_train) != (exact["b"] < n_train)).sum())] = True
    order = np.lexsort((test, -cross["cosine"], ~is_exact, train))
    train, test, is_exact = train[order], test[order], is_exact[order]
    first = np.r_[True, train[1:] != train[:-1]] if len(train) else np.zeros(0, bool)
    best = {
        int(r): (int(t), bool(e))
        for r, t, e in zip(train[first], test[first], is_exact[first], strict=True)
    }
    # exact copies inside a train group share their leak
    exact_member = kind == KIND_EXACT
    by_root: dict[int, tuple[int, bool]] = {}
    for node, root in zip(nodes[exact_member], roots[exact_member], strict=True):
        if int(node) in best and best[int(node)][1]:
            by_root.setdefault(int(root), best[int(node)])
    for node, root in zip(nodes[exact_member], roots[exact_member], strict=True):
        if int(node) not in best and int(root) in by_root:
            best[int(node)] = by_root[int(root)]
    rows = np.array(sorted(best), dtype=np.int64)
    return (
        rows,
        np.array([best[r][0] for r in rows.tolist()], dtype=np.int64),
        np.array([KIND_EXACT if best[r][1] else KIND_NEAR for r in rows.tolist()], dtype=object),
    )


def contradicted_members(
    group: np.ndarray, labels: np.ndarray, p_label: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(bool per member: its label disagrees with its group's best-supported label,
    bool per member: its group's labels conflict). The best-supported label is the one
    whose member has the highest zero-shot p(label): the members show (nearly) one image."""
    group = np.asarray(group)
    labels = np.asarray(labels)
    score = np.nan_to_num(np.asarray(p_label, dtype=np.float64), nan=-1.0)
    conflict = np.zeros(len(group), dtype=bool)
    contradicted = np.zeros(len(group), dtype=bool)
    if len(group) == 0:
        return contradicted, conflict
    order = np.lexsort((-score, group))
    starts = np.flatnonzero(np.r_[True, group[order][1:] != group[order][:-1]])
    best_label = np.empty(int(group.max()) + 1, dtype=labels.dtype)
    best_label[group[order][starts]] = labels[order][starts]
    low = np.full(int(group.max()) + 1, np.iinfo(np.int64).max)
    high = np.full(int(group.max()) + 1, np.iinfo(np.int64).min)
    np.minimum.at(low, group, labels)
    np.maximum.at(high, group, labels)
    conflict = low[group] != high[group]
    contradicted = conflict & (labels != best_label[group])
    return contradicted, conflict
