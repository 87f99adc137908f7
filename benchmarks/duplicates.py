"""The near-duplicate search at scale, on Ray: wall time, peak memory, recall vs brute force.

    python -m benchmarks.duplicates --samples 1000000 --out runs/bench/duplicates-1m.json
        [--dim 512] [--files 100] [--recall-subset 50000] [--cpus 2] [--work runs/bench/dup]

Writes N synthetic score files' worth of rows (the columns the checks read: status,
content_hash, max_p, twin_cosine, embedding as float16; and key, label, p_label), then runs
`cleaner.checks.search.run_checks` over them on a local Ray of --cpus CPUs, exactly as the
clean job does (duplicates and off-topic on, no test set). The embeddings are clustered as
CLIP's are (N/200 centres on the sphere, each point at cosine ~0.65 from its centre), with
2% edited copies (cosine ~0.98 to their original) and 0.5% exact copies (same content
hash and embedding); 1 row in 64 has a calibration cosine drawn like an edited copy's.

Recall: on the first --recall-subset rows, every pair at or above the run's threshold found
by exact brute-force search, and the share of those pairs that the run put in one group.
Memory: the peak over the run of the summed resident memory of this process and all its
children (Ray's GCS, raylet and workers; shared object-store pages are counted in every
process that maps them, so this over-counts), and the largest single process, sampled
every 0.2 s from /proc.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cleaner.checks.neighbours import brute_force_edges
from cleaner.config import ChecksConfig
from cleaner.scoring.writing import fixed_size_list_array

NEAR_SHARE, EXACT_SHARE = 0.02, 0.005


def synthetic_rows(n: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(float16 unit embeddings [n, dim], content hash ids int64[n]) with copies."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(max(1, n // 200), dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = np.empty((n, dim), dtype=np.float16)
    hashes = np.arange(n, dtype=np.int64)
    step = 65536
    for start in range(0, n, step):
        stop = min(n, start + step)
        pick = rng.integers(0, len(centres), stop - start)
        rows = centres[pick] + rng.normal(
            scale=1.15 / np.sqrt(dim), size=(stop - start, dim)
        ).astype(np.float32)
        x[start:stop] = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    copies = rng.permutation(n)
    near = copies[: int(NEAR_SHARE * n)]
    exact = copies[int(NEAR_SHARE * n) : int((NEAR_SHARE + EXACT_SHARE) * n)]
    sources = rng.integers(0, n, len(near) + len(exact))
    edited = x[sources[: len(near)]].astype(np.float32)
    edited += rng.normal(scale=0.2 / np.sqrt(dim), size=edited.shape).astype(np.float32)
    x[near] = edited / np.linalg.norm(edited, axis=1, keepdims=True)
    x[exact] = x[sources[len(near) :]]
    hashes[exact] = hashes[sources[len(near) :]]
    return x, hashes


def write_files(
    x: np.ndarray, hashes: np.ndarray, files: int, folder: Path, seed: int
) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed + 1)
    n = x.shape[0]
    twin = np.full(n, np.nan, dtype=np.float32)
    chosen = rng.random(n) < 1 / 64
    twin[chosen] = rng.normal(0.98, 0.006, int(chosen.sum())).clip(-1, 1)
    uris = []
    for i, rows in enumerate(np.array_split(np.arange(n), files)):
        table = pa.table(
            {
                "key": [f"s{j}" for j in rows],
                "status": ["ok"] * len(rows),
                "label": rng.integers(0, 100, len(rows)),
                "p_label": rng.random(len(rows)).astype(np.float32),
                "content_hash": [f"{h:032x}" for h in hashes[rows]],
                "max_p": rng.beta(20, 2, len(rows)).astype(np.float32),
                "twin_cosine": twin[rows],
                "embedding": fixed_size_list_array(x[rows]),
            }
        )
        path = folder / f"part-{i:05d}.parquet"
        pq.write_table(table, path)
        uris.append(str(path))
    return uris


def _rss_tree(root: int) -> tuple[int, int]:
    """(summed RSS bytes of root and its descendants, largest single RSS)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry))
            rss[int(entry)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    total, largest, todo = 0, 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        largest = max(largest, rss.get(pid, 0))
        todo.extend(children.get(pid, []))
    return total, largest


class PeakMemory:
    def __init__(self) -> None:
        self.total = self.largest = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.is_set():
            total, largest = _rss_tree(os.getpid())
            self.total, self.largest = max(self.total, total), max(self.largest, largest)
            self.stop.wait(0.2)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--files", type=int, default=100)
    parser.add_argument("--recall-subset", type=int, default=50_000)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--work", default="runs/bench/duplicates")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    x, hashes = synthetic_rows(args.samples, args.dim, args.seed)
    uris = write_files(x, hashes, args.files, Path(args.work) / f"scores-{args.samples}", args.seed)
    print(
        f"[bench] {args.samples} rows in {len(uris)} files ({time.perf_counter() - t0:.1f} s)",
        flush=True,
    )

    import ray

    from cleaner.checks.search import run_checks

    ray.init(num_cpus=args.cpus, include_dashboard=False)
    memory = PeakMemory()
    memory.thread.start()
    start = time.perf_counter()
    results = run_checks(uris, [], ChecksConfig(test_leaks=False), seed=args.seed)
    seconds = time.perf_counter() - start
    memory.stop.set()
    memory.thread.join()
    ray.shutdown()

    found = results.duplicates
    group_of = dict(zip(found.rows.tolist(), found.group.tolist(), strict=True))
    threshold = results.figures["near_threshold"]
    subset = min(args.recall_subset, args.samples)
    t1 = time.perf_counter()
    truth = brute_force_edges(x[:subset].astype(np.float32), threshold)
    brute_seconds = time.perf_counter() - t1
    together = [
        group_of.get(a, -1) >= 0 and group_of.get(a) == group_of.get(b)
        for a, b in zip(truth["a"].tolist(), truth["b"].tolist(), strict=True)
    ]
    result = {
        "samples": args.samples,
        "dim": args.dim,
        "cpus": args.cpus,
        "seconds": round(seconds, 1),
        "peak_rss_sum_gb": round(memory.total / 2**30, 2),
        "peak_rss_largest_process_gb": round(memory.largest / 2**30, 2),
        "embeddings_gb_float16": round(args.samples * args.dim * 2 / 2**30, 2),
        "figures": results.figures,
        "duplicate_groups": found.num_groups,
        "recall_subset": subset,
        "brute_force_pairs": len(truth),
        "brute_force_seconds": round(brute_seconds, 1),
        "recall": float(np.mean(together)) if together else None,
        "load_average": os.getloadavg(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(json.dumps(result, indent=1, default=str))
    return result


if __name__ == "__main__":
    main()
