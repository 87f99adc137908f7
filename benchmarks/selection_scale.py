"""Selection at scale: wall time and peak memory, in-memory and distributed vs a plain sklearn loop.

    python -m benchmarks.selection_scale [--sizes 1e5,1e6,1e7] [--classes 50,1000]
        [--modes in_memory,distributed,plain] [--cap 60] [--json ...]

Synthetic columns (what selection reads per sample): label, and for two sources
(zeroshot, probe) p(label) and max p. Each class has its own noise rate (uniform in
[0.1, 0.6]); a clean sample's p(label) is Beta(5, 1.5) (zero-shot) or Beta(8, 1.2)
(probe), a noisy one's Beta(1.2, 6); max p equals p(label) when the label is the argmax
(85% of clean, 10% of noisy samples), otherwise it lies between p(label) and 1. The
columns are generated once per (N, K), in chunks, into .npy files and Parquet files (one
per 500k rows, float32 scores, int64 label and key) in a temp dir.

Modes, each run in a fresh subprocess (peak RSS = its VmHWM, read from /proc at exit):

  in_memory    `cleaner.selection.select.select_from_scores` (the library, the job's
               in-memory fit: the EM engine) on the numpy arrays (loaded
               from .npy first; the load is not timed, its memory is in the peak)
  distributed  `fit_selection` + `FittedSelection.transform` over `ray.data.read_parquet`
               of the Parquet files, the selected dataset written back to Parquet by
               Ray (nothing gathered on the driver); ray.init(num_cpus=2) is not timed.
               Peak = the driver's VmHWM; "ray MB" = the largest sampled sum of the PSS
               (shared pages split fairly) of the Ray processes the driver started
               (GCS, raylet, workers, ...; sampled every 0.2 s, so it can miss spikes),
               and their idle PSS right after ray.init is printed too
  plain        docs/method.md, "Selection", written as a plain loop: per source, per class
               `labels == k`, min-max normalised log p, `GaussianMixture(2, max_iter=100,
               tol=1e-3, reg_covar=1e-6, random_state=0)` (sklearn's default k-means
               init), posterior of the higher-mean component, consistency, intersection,
               backfill of empty classes

The plain mode stops after --cap seconds; their time is then extrapolated from the
mixtures fitted so far (time per fitted mixture x all mixtures) and marked "~" in the
table and "extrapolated" in the JSON. "speedup" is plain's time / the mode's time.
"clean" is the number of samples selected; "agree" the fraction of samples on which the
mode's selection equals in_memory's (distributed must be 1.0: the same EM, bit-identical).

Targets (issue 4): 1e7 samples in <= 60 s and <= 2 GB peak on 2 cores; >= 5x faster than
the plain loop. Timings are as measured on a machine shared with other work.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np

from benchmarks.procstats import pss_kb, status_kb

SOURCES = ("zeroshot", "probe")
MODES = ("in_memory", "distributed", "plain")
ROWS_PER_FILE = 500_000
SEED = 0
BETA_CLEAN = {"zeroshot": (5.0, 1.5), "probe": (8.0, 1.2)}
BETA_NOISY = (1.2, 6.0)
ARGMAX_IF_CLEAN = 0.85
ARGMAX_IF_NOISY = 0.10


# --------------------------------------------------------------------------- data


def synth_chunk(rng: np.random.Generator, start: int, n: int, noise: np.ndarray) -> dict:
    """One chunk of synthetic selection columns (see the module docstring)."""
    k = noise.shape[0]
    labels = rng.integers(0, k, n, dtype=np.int64)
    noisy = rng.random(n) < noise[labels]
    out = {"key": np.arange(start, start + n, dtype=np.int64), "label": labels, "noisy": noisy}
    for source in SOURCES:
        a, b = BETA_CLEAN[source]
        p = np.where(noisy, rng.beta(*BETA_NOISY, n), rng.beta(a, b, n))
        p = np.clip(p, 1e-6, 1.0)
        is_argmax = rng.random(n) < np.where(noisy, ARGMAX_IF_NOISY, ARGMAX_IF_CLEAN)
        other = p + (1.0 - p) * rng.beta(3.0, 2.0, n)
        out[f"{source}_p"] = p.astype(np.float32)
        out[f"{source}_max"] = np.where(is_argmax, p, np.maximum(other, p)).astype(np.float32)
    return out


def generate(root: Path, n: int, k: int) -> Path:
    """Write the columns for (n, k) as .npy files and Parquet files under root/<n>_<k>."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = root / f"{n}_{k}"
    if (folder / "done").exists():
        return folder
    (folder / "parquet").mkdir(parents=True, exist_ok=True)
    noise = np.random.default_rng([SEED, k]).uniform(0.1, 0.6, k)
    columns = ["key", "label", "noisy"] + [f"{s}_{c}" for s in SOURCES for c in ("p", "max")]
    dtypes = {"key": np.int64, "label": np.int64, "noisy": bool}
    arrays = {
        c: np.lib.format.open_memmap(
            folder / f"{c}.npy", mode="w+", dtype=dtypes.get(c, np.float32), shape=(n,)
        )
        for c in columns
    }
    for i, start in enumerate(range(0, n, ROWS_PER_FILE)):
        rows = min(ROWS_PER_FILE, n - start)
        chunk = synth_chunk(np.random.default_rng([SEED, n, k, i]), start, rows, noise)
        for c in columns:
            arrays[c][start : start + rows] = chunk[c]
        table = pa.table({c: chunk[c] for c in columns if c != "noisy"})
        pq.write_table(table, folder / "parquet" / f"part-{i:05d}.parquet")
    for array in arrays.values():
        array.flush()
    del arrays
    (folder / "done").write_text("ok")
    return folder


def load_sources(folder: Path) -> tuple[np.ndarray, dict]:
    from cleaner.selection.rules import SourceScores

    labels = np.load(folder / "label.npy")
    sources = {
        s: SourceScores(
            p_label=np.load(folder / f"{s}_p.npy"), max_p=np.load(folder / f"{s}_max.npy")
        )
        for s in SOURCES
    }
    return labels, sources


# --------------------------------------------------------------------------- memory


def _cpu_s(pid: int | str) -> float:
    """utime + stime of a process so far, in seconds (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def descendants(root: int) -> list[int]:
    """Every live process below `root` (by scanning /proc/*/stat for parent ids)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, stack = [], [root]
    while stack:
        for child in children.get(stack.pop(), []):
            out.append(child)
            stack.append(child)
    return out


class TreeSampler(threading.Thread):
    """Samples the summed PSS of this process's descendants every `interval` seconds."""

    def __init__(self, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.peak_kb = 0
        self.last_kb = 0
        self.peak_shmem_kb = 0
        self.peak_parts: dict[str, list[int]] = {}  # name[pid] -> [PSS MB, of it shmem MB]
        self._stop_event = threading.Event()

    def sample(self) -> int:
        parts = {pid: pss_kb(pid) for pid in descendants(os.getpid())}
        total = sum(pss for pss, _ in parts.values())
        self.last_kb = total
        if total > self.peak_kb:
            self.peak_kb = total
            self.peak_shmem_kb = sum(shmem for _, shmem in parts.values())
            self.peak_parts = {
                f"{_name(pid)}[{pid}]": [pss // 1024, shmem // 1024]
                for pid, (pss, shmem) in parts.items()
            }
        return total

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.sample()
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


class Clock:
    """Wall and CPU seconds since creation; CPU of this process (all threads) and, with
    tree=True, of its descendants (the Ray processes; one that exits early is lost)."""

    def __init__(self, tree: bool = False) -> None:
        self.tree = tree
        self.wall0 = time.perf_counter()
        self.cpu0 = self.cpu()

    def cpu(self) -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        total = usage.ru_utime + usage.ru_stime
        if self.tree:
            total += sum(_cpu_s(pid) for pid in descendants(os.getpid()))
        return total

    def read(self) -> dict:
        return {"wall_s": time.perf_counter() - self.wall0, "cpu_s": self.cpu() - self.cpu0}


# --------------------------------------------------------------------------- the modes


class _Deadline(Exception):
    pass


def plain_select(
    labels: np.ndarray, k: int, sources: dict, cap_s: float, theta_gmm=0.5, theta_cons=0.8
) -> tuple[np.ndarray, int, int]:
    """docs/method.md, "Selection", as a plain loop; returns (is_clean, mixtures fitted, total).

    Raises _Deadline (with the counts) when cap_s runs out.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture

    start = time.perf_counter()
    n = labels.shape[0]
    total_fits = len(sources) * int((np.bincount(labels, minlength=k) > 1).sum())
    fits = 0
    is_clean = np.ones(n, dtype=bool)
    rank = np.zeros(n)
    for scores in sources.values():
        p = scores.p_label.astype(np.float64)
        log_p = np.log(np.clip(p, 1e-12, None))
        p_clean = np.ones(n)
        for c in range(k):
            members = np.flatnonzero(labels == c)
            if members.size == 0:
                continue
            values = log_p[members]
            low, high = values.min(), values.max()
            if high - low <= 1e-12:
                rank[members] += 1.0
                continue
            x = ((values - low) / (high - low)).reshape(-1, 1)
            rank[members] += x[:, 0]
            gmm = GaussianMixture(2, max_iter=100, tol=1e-3, reg_covar=1e-6, random_state=0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", category=ConvergenceWarning)
                gmm.fit(x)
            p_clean[members] = gmm.predict_proba(x)[:, int(np.argmax(gmm.means_.ravel()))]
            fits += 1
            if time.perf_counter() - start > cap_s and fits < total_fits:
                raise _Deadline(fits, total_fits)
        consistency = p / scores.max_p
        is_clean &= (p_clean >= theta_gmm) & (consistency >= theta_cons - 1e-9)
    clean_per_class = np.bincount(labels[is_clean], minlength=k)
    present = np.bincount(labels, minlength=k) > 0
    empty = np.flatnonzero(present & (clean_per_class == 0))
    if empty.size:
        nonzero = clean_per_class[clean_per_class > 0]
        m = max(int(nonzero.min()) if nonzero.size else 0, n // (k * k), 1)
        for c in empty:
            members = np.flatnonzero(labels == c)
            is_clean[members[np.argsort(-rank[members], kind="stable")[:m]]] = True
    return is_clean, fits, total_fits


def extrapolate(clock: Clock, fits: int, total: int) -> dict:
    """Times scaled from `fits` fitted mixtures to all `total` of them."""
    measured = clock.read()
    return {
        "wall_s": measured["wall_s"] * total / fits,
        "cpu_s": measured["cpu_s"] * total / fits,
        "extrapolated": f"{fits}/{total} mixtures in {measured['wall_s']:.0f} s",
    }


def run_in_memory(folder: Path, k: int, cap_s: float, store_mb: float, block_mb: float) -> dict:
    from cleaner.selection.select import select_from_scores

    labels, sources = load_sources(folder)
    clock = Clock()
    result = select_from_scores(labels, k, sources)
    timing = clock.read()
    np.save(folder / "is_clean_in_memory.npy", result.is_clean)
    return {**timing, "num_clean": int(result.is_clean.sum())}


def run_plain(folder: Path, k: int, cap_s: float, store_mb: float, block_mb: float) -> dict:
    labels, sources = load_sources(folder)
    clock = Clock()
    try:
        is_clean, _, _ = plain_select(labels, k, sources, cap_s)
    except _Deadline as stop:
        return extrapolate(clock, *stop.args)
    return {**clock.read(), "num_clean": int(is_clean.sum())}


def run_distributed(folder: Path, k: int, cap_s: float, store_mb: float, block_mb: float) -> dict:
    import ray

    from cleaner.selection.fit_ray import fit_selection

    sampler = TreeSampler()
    t0 = time.perf_counter()
    store = int(store_mb * 1024 * 1024) if store_mb else None
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        object_store_memory=store,
    )
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    if block_mb:
        ctx.target_max_block_size = int(block_mb * 1024 * 1024)
    init_s = time.perf_counter() - t0
    time.sleep(2.0)  # let the prestarted workers come up before the idle sample
    idle_kb = sampler.sample()
    sampler.start()
    out_dir = folder / "selected"
    shutil.rmtree(out_dir, ignore_errors=True)
    clock = Clock(tree=True)
    ds = ray.data.read_parquet(str(folder / "parquet"))
    fitted = fit_selection(
        ds,
        k,
        source_columns={s: (f"{s}_p", f"{s}_max") for s in SOURCES},
        label_column="label",
        key_column="key",
    )
    fit_s = time.perf_counter() - clock.wall0
    fitted.transform(ds).write_parquet(str(out_dir))
    timing = clock.read()
    sampler.stop()
    counts = fitted.counts()
    ray.shutdown()
    return {
        **timing,
        "fit_s": fit_s,
        "ray_init_s": init_s,
        "num_clean": int(counts["num_clean"]),
        "ray_idle_mb": idle_kb / 1024,
        "ray_peak_mb": sampler.peak_kb / 1024,
        "ray_peak_shmem_mb": sampler.peak_shmem_kb / 1024,
        "ray_peak_processes_mb": sampler.peak_parts,
    }


RUNNERS = {
    "in_memory": run_in_memory,
    "distributed": run_distributed,
    "plain": run_plain,
}


def worker(args: argparse.Namespace) -> None:
    """Run one mode in this (fresh) process and write its result JSON."""
    folder = Path(args.folder)
    result = RUNNERS[args.worker](folder, args.k, args.cap, args.object_store_mb, args.block_mb)
    result["peak_mb"] = status_kb("self", "VmHWM") / 1024
    Path(args.result).write_text(json.dumps(result))


# --------------------------------------------------------------------------- driver


def agreement(folder: Path, mode: str, n: int) -> float | None:
    """Fraction of samples whose selection equals in_memory's (None when unavailable)."""
    reference = folder / "is_clean_in_memory.npy"
    if not reference.exists():
        return None
    ref = np.load(reference)
    if mode == "in_memory":
        return 1.0
    if mode == "distributed":
        import pyarrow.parquet as pq

        table = pq.read_table(folder / "selected", columns=["key", "is_clean"])
        got = np.zeros(n, dtype=bool)
        got[table.column("key").to_numpy()] = table.column("is_clean").to_numpy(
            zero_copy_only=False
        )
        if table.num_rows != n:
            return None
        return float((got == ref).mean())
    return None


def run_mode(mode: str, folder: Path, n: int, k: int, args: argparse.Namespace) -> dict:
    result_file = folder / f"result_{mode}.json"
    result_file.unlink(missing_ok=True)
    command = [
        sys.executable,
        "-m",
        "benchmarks.selection_scale",
        "--worker",
        mode,
        "--folder",
        str(folder),
        "--k",
        str(k),
        "--cap",
        str(args.cap),
        "--result",
        str(result_file),
        "--object-store-mb",
        str(args.object_store_mb),
        "--block-mb",
        str(args.block_mb),
    ]
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0 or not result_file.exists():
        print(proc.stdout[-2000:], proc.stderr[-4000:], sep="\n", file=sys.stderr)
        return {"error": f"exit {proc.returncode}", "process_s": time.perf_counter() - start}
    result = json.loads(result_file.read_text())
    result["process_s"] = time.perf_counter() - start
    result["agree"] = agreement(folder, mode, n)
    if mode == "distributed":
        shutil.rmtree(folder / "selected", ignore_errors=True)
    return result


def fmt_row(row: dict, speedup: str) -> str:
    mark = "~" if row.get("extrapolated") else " "
    ray_mb = f"{row['ray_peak_mb']:>8.0f}" if "ray_peak_mb" in row else f"{'-':>8}"
    clean = f"{row['num_clean']:>10}" if "num_clean" in row else f"{'-':>10}"
    agree = f"{row['agree']:>8.4f}" if row.get("agree") is not None else f"{'-':>8}"
    note = f"  extrapolated: {row['extrapolated']}" if row.get("extrapolated") else ""
    if "fit_s" in row:
        note += f"  (fit {row['fit_s']:.1f} s, ray.init {row['ray_init_s']:.1f} s, idle Ray {row['ray_idle_mb']:.0f} MB)"
    return (
        f"{row['n']:>10.0e}{row['k']:>6}  {row['mode']:<12}{mark}{row['wall_s']:>9.1f}{row['cpu_s']:>8.1f}"
        f"{row['peak_mb']:>9.0f}{ray_mb}{speedup:>9}{clean}{agree}{note}"
    )


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1e5,1e6,1e7")
    parser.add_argument("--classes", default="50,1000")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--cap", type=float, default=60.0, help="seconds per sklearn run")
    parser.add_argument(
        "--object-store-mb",
        type=float,
        default=0,
        help="Ray object store size for the distributed mode (0: Ray's default)",
    )
    parser.add_argument(
        "--block-mb",
        type=float,
        default=0,
        help="Ray Data target_max_block_size for the distributed mode (0: Ray's default)",
    )
    parser.add_argument("--tmp", help="where to write the data (default: a new temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the generated data")
    parser.add_argument("--json", default="runs/bench/selection_scale.json")
    # internal: run one mode in this process
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--k", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return []
    sizes = [int(float(s)) for s in args.sizes.split(",") if s]
    classes = [int(c) for c in args.classes.split(",") if c]
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"unknown modes {unknown}; known: {list(MODES)}")
    if "in_memory" in modes:  # first: the reference for "agree"
        modes = ["in_memory", *[m for m in modes if m != "in_memory"]]
    root = Path(args.tmp) if args.tmp else Path(tempfile.mkdtemp(prefix="selection_scale_"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"data under {root}; {os.cpu_count()} cores; sklearn modes capped at {args.cap:.0f} s")
    header = (
        f"{'N':>10}{'K':>6}  {'mode':<12} {'wall s':>9}{'cpu s':>8}{'peak MB':>9}{'ray MB':>8}"
        f"{'speedup':>9}{'clean':>10}{'agree':>8}"
    )
    rows: list[dict] = []
    try:
        for k in classes:
            for n in sizes:
                start = time.perf_counter()
                folder = generate(root, n, k)
                print(
                    f"[N={n:.0e} K={k}] data ready in {time.perf_counter() - start:.1f} s",
                    flush=True,
                )
                block = []
                for mode in modes:
                    result = run_mode(mode, folder, n, k, args)
                    row = {"n": n, "k": k, "mode": mode, **result}
                    block.append(row)
                    if "error" in row:
                        print(f"  {mode}: FAILED ({row['error']})", flush=True)
                    else:
                        print(
                            f"  {mode}: {row['wall_s']:.1f} s{' (extrapolated)' if row.get('extrapolated') else ''}, "
                            f"peak {row['peak_mb']:.0f} MB",
                            flush=True,
                        )
                plain = next((r for r in block if r["mode"] == "plain" and "wall_s" in r), None)
                for row in block:
                    if plain is not None and "wall_s" in row:
                        row["speedup_vs_plain"] = plain["wall_s"] / row["wall_s"]
                rows += block
                if not args.keep:
                    shutil.rmtree(folder, ignore_errors=True)
    finally:
        if not args.keep and not args.tmp:
            shutil.rmtree(root, ignore_errors=True)

    print()
    print(header)
    print("-" * len(header))
    for row in rows:
        if "error" in row:
            print(f"{row['n']:>10.0e}{row['k']:>6}  {row['mode']:<12} FAILED: {row['error']}")
            continue
        speedup = row.get("speedup_vs_plain")
        mark = (
            "~"
            if any(
                r.get("extrapolated")
                for r in rows
                if r["n"] == row["n"] and r["k"] == row["k"] and r["mode"] in ("plain", row["mode"])
            )
            else ""
        )
        print(fmt_row(row, f"{mark}{speedup:.1f}x" if speedup is not None else "-"))
    print("~ = extrapolated from the mixtures fitted within the cap (see the notes)")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(rows, indent=2))
    print(f"wrote {args.json}")
    return rows


if __name__ == "__main__":
    main()
