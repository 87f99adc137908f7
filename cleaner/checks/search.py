"""The embedding checks over the score files, on Ray (docs/checks.md).

    results = run_checks(train_score_uris, test_score_uris, cfg.checks)

Plain Ray tasks, the driver only ever holding small things (histograms, samples, edges):
1. one task per score file reads its usable rows: content hashes split into P hash
   partitions, the embeddings kept in the object store, a sample of them for the
   k-means, the off-topic score's histogram, the calibration cosines (`twin_cosine`);
2. one task per hash partition finds the rows sharing a content hash (exact edges);
3. the driver trains the k-means centroids on the sample (faiss);
4. one task per file assigns its embeddings (exact copies left out) to cells, split into
   P partitions by cell, so that no task holds more than its share of the embeddings;
5. one task per partition searches its cells (cleaner/checks/neighbours.py), returning
   its best-neighbour histogram; its candidate edges stay in the object store until the
   driver has calibrated the threshold, then tasks hand over the edges above it;
6. the driver groups the edges (cleaner/checks/groups.py) and one task per file that
   holds a grouped or leaking row reads those rows' keys and labels.
Row ids are manifest rows: train files in manifest order, then the test files.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cleaner.checks.groups import DuplicateFindings, contradicted_members, exact_edges, find_groups
from cleaner.checks.neighbours import (
    EDGE_DTYPE,
    NN_BINS,
    assign_cells,
    histogram_quantile,
    num_cells,
    search_cells,
    train_centroids,
    unique_edges,
)
from cleaner.checks.offtopic import OffTopicRule, fit_off_topic, score_histogram
from cleaner.config import ChecksConfig
from cleaner.reading import uri as uri_lib
from cleaner.reading.shards import STATUS_OK
from cleaner.selection.probe_streaming import stable_hash

TWIN_QUANTILE = 0.05  # the threshold keeps 95% of the calibration copies ...
NN_TAIL = 0.01  # ... unless more than 1% of the images have a SECOND neighbour that close
MIN_TWINS = 20  # fewer calibration copies: the threshold rests on the neighbours alone
PARTITION_BYTES = 512 << 20  # float32 embeddings one search task holds, at most
SAMPLE_ROWS = 50_000  # k-means training rows, at most


@dataclass
class CheckResults:
    """What the manifest needs from the checks (sparse, by manifest row) and their figures."""

    n_train: int
    off_topic: OffTopicRule | None = None
    duplicates: DuplicateFindings | None = None
    member_keys: dict[int, str] = field(default_factory=dict)  # representative row -> key
    contradicted: np.ndarray | None = None  # bool per duplicates.rows
    conflict: np.ndarray | None = None  # bool per duplicates.rows
    test_keys: dict[int, tuple[str, str]] = field(default_factory=dict)  # test row -> (key, shard)
    figures: dict = field(default_factory=dict)


def _read_columns(uri: str, columns: list[str]) -> pa.Table:
    fs, path = uri_lib.resolve(uri)
    with fs.open_input_file(path) as f:
        return pq.read_table(f, columns=columns)


def _embeddings(table: pa.Table) -> np.ndarray:
    column = table.column("embedding").combine_chunks()
    return column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), -1)


def _scan_file(
    uri: str, first_id: int, partitions: int, sample_rate: float, score: str, is_test: bool
):
    """Step 1 for one score file: P hash parts, the embedding block, and its figures."""
    table = _read_columns(uri, ["status", "content_hash", score, "twin_cosine", "embedding"])
    ok = np.asarray(table.column("status").to_pylist(), dtype=object) == STATUS_OK
    rows = np.nonzero(ok)[0]
    ids = first_id + rows.astype(np.int64)
    hashes = np.asarray(table.column("content_hash").to_pylist(), dtype=object)[rows]
    embeddings = _embeddings(table)[rows].astype(np.float16)
    part = stable_hash(hashes.astype(str)) % np.uint64(partitions) if len(rows) else ids
    hash_parts = [{"ids": ids[part == p], "hashes": hashes[part == p]} for p in range(partitions)]
    rng = np.random.default_rng(first_id)
    sampled = rng.random(len(rows)) < sample_rate
    twins = table.column("twin_cosine").to_numpy(zero_copy_only=False)[rows]
    scores = table.column(score).to_numpy(zero_copy_only=False)[rows]
    info = {
        "rows": len(rows),
        "sample": embeddings[sampled],
        "twins": twins[np.isfinite(twins)] if not is_test else np.empty(0),
        "histogram": None if is_test else score_histogram(scores, score),
    }
    block = {"ids": ids, "embeddings": embeddings}
    return (*hash_parts, block, info) if partitions > 1 else (hash_parts[0], block, info)


def _exact_in_partition(*parts: dict) -> np.ndarray:
    """Step 2: exact edges among the rows of one hash partition."""
    ids = np.concatenate([p["ids"] for p in parts])
    hashes = np.concatenate([p["hashes"] for p in parts])
    return exact_edges(ids, hashes)


def _assign_block(
    block: dict, centroids: np.ndarray, skip: np.ndarray, n_train: int, partitions: int
):
    """Step 4: a file's embeddings (exact copies skipped) by cell, split into P parts."""
    keep = ~np.isin(block["ids"], skip)
    ids, embeddings = block["ids"][keep], block["embeddings"][keep]
    rows, cells = assign_cells(embeddings, centroids)
    primary = np.zeros(len(rows), dtype=bool)
    primary[: len(ids)] = True
    target = cells % partitions
    parts = [
        {
            "ids": ids[rows[target == p]],
            "embeddings": embeddings[rows[target == p]],
            "cells": cells[target == p],
            "primary": primary[target == p],
            "counted": ids[rows[target == p]] < n_train,
        }
        for p in range(partitions)
    ]
    return parts if partitions > 1 else parts[0]


def _search_partition(neighbours: int, floor: float, *parts: dict):
    """Step 5: (best-neighbour histogram, candidate edges) of one partition's cells."""
    if not parts or not sum(len(p["ids"]) for p in parts):
        return np.zeros(NN_BINS, dtype=np.int64), np.empty(0, dtype=EDGE_DTYPE)
    joined = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    result = search_cells(
        joined["ids"],
        joined["embeddings"],
        joined["cells"],
        joined["primary"],
        joined["counted"],
        neighbours=neighbours,
        floor=floor,
    )
    return result.nn_histogram, result.edges


def _edges_above(edges: np.ndarray, threshold: float) -> np.ndarray:
    return edges[edges["cosine"] >= threshold]


def _lookup(uri: str, positions: np.ndarray, is_test: bool) -> dict:
    """Step 6: key (and label, p_label, content hash) of some rows of one score file."""
    columns = (
        ["key", "shard", "content_hash"] if is_test else ["key", "label", "p_label", "content_hash"]
    )
    table = _read_columns(uri, columns).take(pa.array(positions))
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in columns}


def calibrated_threshold(twins: np.ndarray, nn_histogram: np.ndarray) -> tuple[float, dict]:
    """max(the 5% quantile of the calibration copies' cosines, the cosine that only 1% of
    the images' second-nearest neighbours reach), and the figures behind it: the copies
    say how close a duplicate is, the second neighbours how close distinct images come
    (docs/checks.md)."""
    twins = np.asarray(twins, dtype=np.float64)
    nn_level = histogram_quantile(nn_histogram, 1.0 - NN_TAIL)
    twin_level = float(np.quantile(twins, TWIN_QUANTILE)) if len(twins) >= MIN_TWINS else None
    threshold = nn_level if twin_level is None else max(nn_level, twin_level)
    threshold = min(threshold, 1.0)
    figures = {
        "twins": len(twins),
        "twin_quantile": twin_level,
        "neighbour_quantile": nn_level,
        "twin_recall_at_threshold": float((twins >= threshold).mean()) if len(twins) else None,
    }
    return threshold, figures


def run_checks(
    train_uris: list[str], test_uris: list[str], cfg: ChecksConfig, seed: int = 0
) -> CheckResults:
    """The enabled checks over the score files (train in manifest order, then test)."""
    import ray

    start = time.perf_counter()
    uris = list(train_uris) + (list(test_uris) if cfg.test_leaks else [])
    counts = [_num_rows(u) for u in uris]
    n_train = int(sum(counts[: len(train_uris)]))
    firsts = np.r_[0, np.cumsum(counts)[:-1]].astype(np.int64)
    results = CheckResults(n_train=n_train)
    if not uris or not (cfg.off_topic or cfg.duplicates or (cfg.test_leaks and test_uris)):
        return results
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    total = int(sum(counts))
    partitions = max(cpus, math.ceil(total * 512 * 4 * 1.2 / PARTITION_BYTES))
    partitions = min(partitions, max(1, total // 2))
    sample_rate = min(1.0, SAMPLE_ROWS / max(total, 1))
    scan = ray.remote(_scan_file).options(num_returns=partitions + 2, num_cpus=1)
    scanned = [
        scan.remote(u, int(f), partitions, sample_rate, cfg.off_topic_score, i >= len(train_uris))
        for i, (u, f) in enumerate(zip(uris, firsts, strict=True))
    ]
    infos = ray.get([refs[-1] for refs in scanned])
    blocks = [refs[-2] for refs in scanned]
    figures: dict = {"rows": total, "partitions": partitions}
    if cfg.off_topic:
        histogram = np.sum([i["histogram"] for i in infos[: len(train_uris)]], axis=0)
        results.off_topic = fit_off_topic(histogram, cfg.off_topic_score)
        figures["off_topic_rule"] = results.off_topic.as_dict()
    if cfg.duplicates or (cfg.test_leaks and test_uris):
        exact_task = ray.remote(_exact_in_partition).options(num_cpus=1)
        exact = np.concatenate(
            ray.get([exact_task.remote(*[refs[p] for refs in scanned]) for p in range(partitions)])
        )
        del scanned
        twins = np.concatenate([i["twins"] for i in infos])
        near, threshold_figures = _near_edges(
            blocks, infos, exact, cfg, n_train, partitions, twins, seed
        )
        figures.update(threshold_figures)
        _fill_duplicates(results, uris, firsts, len(train_uris), exact, near)
        figures["exact_edges"] = len(exact)
        figures["near_edges"] = len(near)
    figures["seconds"] = round(time.perf_counter() - start, 3)
    results.figures = figures
    return results


def _num_rows(uri: str) -> int:
    fs, path = uri_lib.resolve(uri)
    with fs.open_input_file(path) as f:
        return pq.ParquetFile(f).metadata.num_rows


def _near_edges(blocks, infos, exact, cfg: ChecksConfig, n_train, partitions, twins, seed):
    """Steps 3-5: centroids, cells, the search, the threshold; the edges at or above it."""
    import ray

    sample = np.concatenate([i["sample"] for i in infos])
    total = int(sum(i["rows"] for i in infos))
    if total < 2:
        return np.empty(0, dtype=EDGE_DTYPE), {}
    centroids = train_centroids(sample, num_cells(total), seed=seed, threads=1)
    skip = np.unique(exact["b"])
    assign = ray.remote(_assign_block).options(num_returns=partitions, num_cpus=1)
    skip_ref, centroids_ref = ray.put(skip), ray.put(centroids)
    assigned = [assign.remote(b, centroids_ref, skip_ref, n_train, partitions) for b in blocks]
    if partitions == 1:
        assigned = [[ref] for ref in assigned]
    fixed = cfg.near_threshold != "auto"
    enough_twins = len(twins) >= MIN_TWINS
    floor = (
        float(cfg.near_threshold)
        if fixed
        else (float(np.quantile(twins, TWIN_QUANTILE)) if enough_twins else 0.5)
    )
    search = ray.remote(_search_partition).options(num_returns=2, num_cpus=1)
    searched = [
        search.remote(cfg.neighbours, floor, *[refs[p] for refs in assigned])
        for p in range(partitions)
    ]
    del assigned
    nn_histogram = np.sum(ray.get([h for h, _ in searched]), axis=0)
    if fixed:
        threshold = float(cfg.near_threshold)
        figures = {"neighbour_quantile": histogram_quantile(nn_histogram, 1.0 - NN_TAIL)}
    else:
        threshold, figures = calibrated_threshold(twins, nn_histogram)
    figures = {
        "near_threshold": threshold,
        "threshold_source": "config" if fixed else "calibrated",
        **figures,
    }
    above = ray.remote(_edges_above).options(num_cpus=1)
    edges = ray.get([above.remote(e, threshold) for _, e in searched])
    near = unique_edges(np.concatenate(edges)) if edges else np.empty(0, dtype=EDGE_DTYPE)
    return near, figures


def _fill_duplicates(results: CheckResults, uris, firsts, num_train_files, exact, near) -> None:
    """Step 6: groups and leaks, then the keys and labels of the rows involved."""
    ids = np.unique(np.r_[exact["a"], exact["b"], near["a"], near["b"]])
    looked = _lookup_rows(ids, uris, firsts, num_train_files)
    hashes = {int(i): looked[int(i)]["content_hash"] for i in ids}
    findings = find_groups(results.n_train, exact, near, hashes)
    results.duplicates = findings
    results.member_keys = {
        int(r): str(looked[int(r)]["key"]) for r in np.unique(findings.representative)
    }
    labels = np.array([looked[int(r)]["label"] for r in findings.rows], dtype=np.int64)
    p_label = np.array([looked[int(r)]["p_label"] for r in findings.rows], dtype=np.float64)
    results.contradicted, results.conflict = contradicted_members(findings.group, labels, p_label)
    results.test_keys = {
        int(t): (
            str(looked[int(t) + results.n_train]["key"]),
            str(looked[int(t) + results.n_train]["shard"]),
        )
        for t in np.unique(findings.leak_test)
    }


def _lookup_rows(ids: np.ndarray, uris, firsts, num_train_files) -> dict[int, dict]:
    import ray

    if len(ids) == 0:
        return {}
    file_of = np.searchsorted(firsts, ids, side="right") - 1
    task = ray.remote(_lookup).options(num_cpus=1)
    refs = {}
    for f in np.unique(file_of):
        mine = ids[file_of == f]
        refs[int(f)] = (mine, task.remote(uris[f], mine - firsts[f], f >= num_train_files))
    out: dict[int, dict] = {}
    for mine, ref in refs.values():
        found = ray.get(ref)
        for i, row in enumerate(mine.tolist()):
            out[row] = {name: values[i] for name, values in found.items()}
    return out
