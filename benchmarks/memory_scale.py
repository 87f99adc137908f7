"""Memory flat in N: the clean job on 10k and on 100k samples, driver and whole-cluster peaks.

    python -m benchmarks.memory_scale [--sizes 10000 100000] [--json FILE]

For each size: synthetic WebDataset shards (a pool of demo images drawn once and reused,
32 px, so 100k samples are written in seconds), then `jobs.clean` (default config, tiny
CLIP, its own local Ray) in a child process. Reported per size:
  driver_peak_mb    the driver's VmHWM (peak resident set), read by the driver at the end
  cluster_peak_mb   peak over the run of the summed PSS of the driver and every process
                    under it (GCS, raylet, dashboard, workers), sampled every second
and the ratios 100k / 10k (target: driver <= 1.2). The machine may be shared: the load
average before and after is printed beside the figures.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

IMAGE_POOL_PER_CLASS = 16
IMAGE_SIZE = 32
RAY_START_ATTEMPTS = 3  # a loaded shared machine can make a local Ray miss its start timeouts


def image_pool(class_names: list[str], per_class: int, size: int, seed: int) -> list[list[bytes]]:
    """A few JPEG-encoded demo images per class, drawn once."""
    from cleaner.demo.shapes import draw_shape, sample_rng

    pool = []
    for k, name in enumerate(class_names):
        images = []
        for i in range(per_class):
            image, _ = draw_shape(name, sample_rng(seed, k * per_class + i), size)
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=90)
            images.append(buffer.getvalue())
        pool.append(images)
    return pool


def write_synthetic_shards(
    out_dir: Path, num_samples: int, samples_per_shard: int, noise_rate: float = 0.3, seed: int = 0
) -> list[Path]:
    """WebDataset shards of `num_samples` pool images with noisy .cls labels (deterministic)."""
    from cleaner.classes import DEMO_CLASS_SPEC, ClassSpec

    marker = out_dir / "done.json"
    params = {"samples": num_samples, "per_shard": samples_per_shard, "noise": noise_rate}
    if marker.exists() and json.loads(marker.read_text()) == params:
        return sorted(out_dir.glob("*.tar"))
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.tar"):
        old.unlink()
    names = ClassSpec.load(DEMO_CLASS_SPEC).names
    pool = image_pool(names, IMAGE_POOL_PER_CLASS, IMAGE_SIZE, seed)
    rng = np.random.default_rng(seed)
    true = rng.integers(0, len(names), num_samples)
    flip = rng.random(num_samples) < noise_rate
    noisy = np.where(flip, (true + rng.integers(1, len(names), num_samples)) % len(names), true)
    pick = rng.integers(0, IMAGE_POOL_PER_CLASS, num_samples)
    paths = []
    for shard, start in enumerate(range(0, num_samples, samples_per_shard)):
        path = out_dir / f"synth-{shard:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(start, min(start + samples_per_shard, num_samples)):
                key = f"synth-{shard:06d}-{i:08d}"
                members = (
                    ("jpg", pool[true[i]][pick[i]]),
                    ("cls", str(int(noisy[i])).encode()),
                )
                for ext, data in members:
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    marker.write_text(json.dumps(params))
    return paths


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants (from /proc)."""
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
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_child(shards: Path, output: Path, num_cpus: int, extra: list[str], log: Path) -> dict:
    """Run the clean job in a child process, sampling the PSS of its process tree."""
    result_file = output.parent / f"{output.name}.result.json"
    command = [
        sys.executable,
        "-m",
        "benchmarks.memory_scale",
        "--child",
        str(shards),
        str(output),
        str(result_file),
        str(num_cpus),
        *extra,
    ]
    for attempt in range(1, RAY_START_ATTEMPTS + 1):
        peak_kb, peak_processes, samples = 0, 0, 0
        start = time.perf_counter()
        with open(log, "w") as log_file:
            child = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
            while child.poll() is None:
                pids = process_tree(child.pid)
                total = sum(pss_kb(p) for p in pids)
                if total > peak_kb:
                    peak_kb, peak_processes = total, len(pids)
                samples += 1
                time.sleep(1.0)
        wall = time.perf_counter() - start
        if child.returncode == 0:
            break
        if "timed out during startup" not in log.read_text() or attempt == RAY_START_ATTEMPTS:
            raise RuntimeError(f"clean job failed (exit {child.returncode}); see {log}")
        print(f"  local Ray did not start (machine overloaded?): attempt {attempt + 1}", flush=True)
        subprocess.run(["rm", "-rf", str(output)], check=True)
    result = json.loads(result_file.read_text())
    result.update(
        wall_s=round(wall, 1),
        cluster_peak_mb=round(peak_kb / 1024, 1),
        cluster_processes_at_peak=peak_processes,
        pss_samples=samples,
        attempts=attempt,
        log_bytes=log.stat().st_size,
    )
    return result


def child_main(shards: str, output: str, result_file: str, num_cpus: str, extra: list[str]) -> None:
    """In the child: run the clean job, then record this driver's peak resident set."""
    from cleaner.config import CleanJobConfig, load_config
    from jobs.clean import run_clean

    cfg = load_config(
        None,
        [
            f"data.input={shards}",
            "data.classes=demo",
            "model.name=tiny-clip-shapes",
            f"output={output}",
            f"ray.num_cpus={num_cpus}",
            *extra,
        ],
        CleanJobConfig,
    )
    summary = run_clean(cfg)
    status = Path("/proc/self/status").read_text()
    hwm_kb = int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1])
    Path(result_file).write_text(
        json.dumps(
            {
                "samples": summary["counts"]["samples"],
                "fit_mode": summary.get("fit", {}).get("mode"),
                "driver_peak_mb": round(hwm_kb / 1024, 1),
                "timings": summary["timings"],
                "images_per_second": summary["scoring"]["images_per_second"],
            }
        )
    )


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        child_main(*argv[1:5], argv[5:])
        return {}
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs=2, default=[10_000, 100_000])
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the job's local Ray")
    parser.add_argument("--work", help="folder for shards and runs (default: a temp folder)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("overrides", nargs="*", help="extra clean-job key=value overrides")
    args = parser.parse_args(argv)

    work = Path(args.work or tempfile.mkdtemp(prefix="memory_scale-"))
    results: dict = {"load_before": os.getloadavg(), "runs": []}
    for size in args.sizes:
        t0 = time.perf_counter()
        shards = work / f"shards-{size}"
        write_synthetic_shards(shards, size, args.samples_per_shard)
        gen_s = time.perf_counter() - t0
        output = work / f"run-{size}"
        if output.exists():
            subprocess.run(["rm", "-rf", str(output)], check=True)
        run = run_child(shards, output, args.num_cpus, args.overrides, work / f"log-{size}.txt")
        run.update(size=size, generate_s=round(gen_s, 1), load_after=os.getloadavg())
        results["runs"].append(run)
        print(json.dumps(run), flush=True)
    small, large = results["runs"]
    results["driver_ratio"] = round(large["driver_peak_mb"] / small["driver_peak_mb"], 3)
    results["cluster_ratio"] = round(large["cluster_peak_mb"] / small["cluster_peak_mb"], 3)
    results["load_after"] = os.getloadavg()
    print(
        f"driver peak {small['driver_peak_mb']} MB -> {large['driver_peak_mb']} MB "
        f"(ratio {results['driver_ratio']}, target <= 1.2); all Ray processes "
        f"{small['cluster_peak_mb']} MB -> {large['cluster_peak_mb']} MB "
        f"(ratio {results['cluster_ratio']}); load {results['load_before']} -> "
        f"{results['load_after']}",
        flush=True,
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
