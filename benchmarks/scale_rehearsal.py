"""The user's whole path at WebVision scale on the local autoscaling cluster, measured.

    python -m benchmarks.rehearsal --samples N --classes K --out FILE.json
        [--noise-rate 0.4] [--shard-size 1000] [--workdir DIR] [--keep]

(`benchmarks.rehearsal` runs this module.) One go, the cluster torn down even on failure:

1. generate: an ImageFolder tree of N small images (the demo's shapes, 32 px) in K class
   folders; a sample's folder is its given label, wrong with probability --noise-rate
   (uniform over the other classes);
2. make_shards: `ray job submit` of jobs.make_shards (layout imagefolder) on the cluster;
3. inspect: jobs.inspect_shards on this machine;
4. clean: jobs.clean on the cluster with the shipped `imagenet1k` class spec (1,000
   classes, 80 templates; for K != 1000, or before the spec ships, a generated spec of K
   classes and 80 templates), GPU scorer actors on simulated GPU nodes, the distributed
   fit with the streaming probe, and the report;
5. train: one epoch of jobs.train (2 workers, 128 samples per worker batch);
6. export: jobs.export_shards of the clean set, where this tree has that job;
7. with --detectors: the clean job again on the same output (scoring skipped: its score
   files are reused) with selection.detector=ensemble and a verified file of
   --verified-fraction of the samples (their true labels): DeFT and CleanNet fitted over
   the whole run (not counted in whole_path_seconds).

Figures (the JSON): stage_seconds and per-stage throughput (the slowest stage named),
driver_peak_rss_mb (the largest peak RSS of a job's driver process; per job too),
cluster_peak_rss_mb (the largest sampled sum of the PSS of every process of the
cluster), object_store_peak_mb (the largest sampled object-store use summed over the
nodes), report_bytes and report_render_seconds, batch_distinct_classes_mean of the
training epoch, manifest rows and duplicate keys. The tiny CLIP cannot tell 1,000 ImageNet
classes apart: this measures scale, not detection quality.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import yaml

from benchmarks.cluster_rehearsal import environ_restored, submit, wait_job
from benchmarks.procstats import command_line, pss_kb, status_kb
from cluster.local.localcluster import LocalCluster, cluster_pids

REPO_ROOT = Path(__file__).resolve().parent.parent
IMAGE_SIZE = 32
SHIPPED_SPEC = "imagenet1k"
SHIPPED_CLASSES = 1000
NOTE = (
    "The tiny CLIP cannot tell 1,000 ImageNet classes apart: this rehearsal measures scale "
    "(time, memory, rows), not detection quality."
)
# 80 prompt templates for a generated spec (as many as OpenAI's ImageNet ensemble)
TEMPLATE_STYLES = ("photo", "drawing", "painting", "rendering", "sketch", "sculpture",
                   "cropped photo", "close-up photo")  # fmt: skip
TEMPLATE_QUALITIES = ("", "bad ", "good ", "bright ", "dark ", "blurry ", "small ", "large ",
                      "low resolution ", "black and white ")  # fmt: skip
JOBS = ("make_shards", "clean", "train", "export_shards")
DERIVED = ("shards", "clean", "export", "train-runs")  # made from the images


# --------------------------------------------------------------------------- inputs


def generated_spec(k: int) -> dict:
    """A spec of k classes ('class 0000', ...) and 80 templates."""
    templates = [
        f"a {quality}{style} of a {{c}}."
        for style in TEMPLATE_STYLES
        for quality in TEMPLATE_QUALITIES
    ]
    return {"name": f"rehearsal-{k}", "templates": templates,
            "classes": [f"class {i:04d}" for i in range(k)]}  # fmt: skip


def choose_class_spec(k: int, workdir: Path) -> tuple[str, str]:
    """(data.classes value, where it comes from): the shipped imagenet1k spec for
    K = 1000 when this tree ships it, else a generated spec written under workdir."""
    from jobs.common import load_class_spec

    if k == SHIPPED_CLASSES:
        try:
            spec = load_class_spec(SHIPPED_SPEC)
            if spec.num_classes == k:
                return SHIPPED_SPEC, "shipped"
        except (FileNotFoundError, ValueError):  # ConfigError is a ValueError
            pass
    path = workdir / f"classes-{k}.yaml"
    path.write_text(yaml.safe_dump(generated_spec(k), sort_keys=False))
    return str(path), "generated (imagenet1k is not shipped in this tree)" if k == 1000 else (
        "generated"
    )


def _write_images(task: tuple[str, int, int, int, int, float, int]) -> int:
    """Worker of `generate_imagefolder`: samples [start, stop); returns how many are noisy."""
    from PIL import Image

    from cleaner.demo.shapes import SHAPE_CLASSES, generate_images

    root, start, stop, k, seed, noise_rate, pool = task
    rng = np.random.default_rng([seed, start])
    true = np.arange(start, stop) % k
    flip = rng.random(stop - start) < noise_rate
    given = np.where(flip, (true + rng.integers(1, max(k, 2), stop - start)) % k, true)
    # a pool of drawn shapes per shape class; each sample stamps its index into a few pixels
    shapes = len(SHAPE_CLASSES)
    labels = np.repeat(np.arange(shapes), pool)
    images, _ = generate_images(labels, seed, IMAGE_SIZE)
    base = np.stack([np.asarray(image) for image in images]).reshape(shapes, pool, IMAGE_SIZE,
                                                                      IMAGE_SIZE, 3)  # fmt: skip
    for i, (t, g) in enumerate(zip(true.tolist(), given.tolist(), strict=True)):
        index = start + i
        pixels = base[t % shapes, (index // k) % pool].copy()
        pixels[0, :4, 0] = np.frombuffer(index.to_bytes(4, "little"), dtype=np.uint8)
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, format="PNG", compress_level=1)
        (Path(root) / f"c{g:04d}" / f"img{index:08d}.png").write_bytes(out.getvalue())
    return int(flip.sum())


def generate_imagefolder(root: Path, n: int, k: int, noise_rate: float, seed: int) -> dict:
    """N images in K class folders (c0000, ...); returns the counts (see the module doc).
    A tree this function finished with the same arguments is reused as it is."""
    marker = root.parent / "images.json"
    wanted = {"samples": n, "classes": k, "noise_rate": noise_rate, "seed": seed}
    if marker.exists() and json.loads(marker.read_text())["arguments"] == wanted:
        print(f"[rehearsal] reusing the images under {root}", flush=True)
        return json.loads(marker.read_text())["result"]
    if root.exists():  # another size, classes or seed: none of its images may stay
        shutil.rmtree(root)
    marker.unlink(missing_ok=True)
    for label in range(k):
        (root / f"c{label:04d}").mkdir(parents=True, exist_ok=True)
    step = 20_000
    tasks = [(str(root), a, min(a + step, n), k, seed, noise_rate, 20) for a in range(0, n, step)]
    with Pool(processes=min(2, os.cpu_count() or 1)) as pool:
        noisy = sum(pool.imap_unordered(_write_images, tasks))
    names = root.parent / "class_names.txt"
    names.write_text("".join(f"c{label:04d}\n" for label in range(k)))
    result = {"samples": n, "noisy": noisy, "class_names": str(names)}
    for derived in DERIVED:  # shards, runs and exports of the previous images
        shutil.rmtree(root.parent / derived, ignore_errors=True)
    marker.write_text(json.dumps({"arguments": wanted, "result": result}))
    return result


# --------------------------------------------------------------------------- sampling


class ClusterSampler(threading.Thread):
    """Every interval_s: the peak RSS of each job's driver, the summed PSS of the cluster's
    processes, and the object store's use summed over the nodes."""

    def __init__(self, temp_dir: str, gcs_address: str, interval_s: float = 2.0) -> None:
        super().__init__(daemon=True)
        self.temp_dir, self.gcs_address, self.interval_s = temp_dir, gcs_address, interval_s
        self.driver_peak_kb: dict[str, int] = {}
        self.cluster_peak_kb = 0
        self.store_peak_bytes = 0
        self.store_errors = 0
        self.state = None  # Ray's GCS client, made on first use
        self.stopping = threading.Event()

    def sample(self) -> None:
        total = 0
        for pid in cluster_pids(self.temp_dir):
            total += pss_kb(pid)[0]
            line = command_line(pid)
            for job in JOBS:
                if f"-m jobs.{job}" in line:
                    peak = max(self.driver_peak_kb.get(job, 0), status_kb(pid, "VmHWM"))
                    self.driver_peak_kb[job] = peak
        self.cluster_peak_kb = max(self.cluster_peak_kb, total)
        try:
            self.store_peak_bytes = max(self.store_peak_bytes, self.store_bytes())
        except Exception:  # the GCS may be busy or restarting: count it, keep sampling
            self.store_errors += 1

    def store_bytes(self) -> int:
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        if self.state is None:
            self.state = get_state_from_address(self.gcs_address)
        reply = get_memory_info_reply(self.state)
        return int(reply.store_stats.object_store_bytes_used)

    def run(self) -> None:
        while not self.stopping.is_set():
            self.sample()
            self.stopping.wait(self.interval_s)


# --------------------------------------------------------------------------- stages


def timed(stage_seconds: dict, name: str, fn):
    started = time.perf_counter()
    print(f"[rehearsal] {name} ...", flush=True)
    result = fn()
    stage_seconds[name] = round(time.perf_counter() - started, 2)
    print(f"[rehearsal] {name}: {stage_seconds[name]} s", flush=True)
    return result


JOB_TIMEOUT_S = 4 * 3600
STATUS_RETRIES = 30  # a loaded dashboard answers a status request with an error at times
# Agents of a node that starts on a loaded machine can take minutes to report their ports;
# Ray's defaults then kill the node's raylet, and no worker node comes up.
CLUSTER_ENV = {"RAY_agent_register_timeout_ms": "600000", "RAY_raylet_start_wait_time_s": "600"}


def run_job(env: dict, address: str, module: str, *args: str) -> None:
    """`ray job submit` of `python -m jobs.<module> args...` on the cluster, waited for;
    raises with the job's log if it fails (transient dashboard errors are retried)."""
    job_id = submit(env, address, f"jobs.{module}", *args, wait=False)
    for attempt in range(STATUS_RETRIES):
        try:
            wait_job(address, job_id, JOB_TIMEOUT_S)
            return
        except (RuntimeError, ConnectionError) as err:
            if "status code 5" not in str(err) and not isinstance(err, ConnectionError):
                raise  # the job failed: its log is in the message
            print(f"[rehearsal] job status unavailable ({attempt + 1}): {err}", flush=True)
            time.sleep(10)
    raise RuntimeError(f"job {job_id}: no status after {STATUS_RETRIES} tries")


def inspect(shards: Path) -> dict:
    """jobs.inspect_shards on this machine (no Ray); its JSON result."""
    out = shards.parent / "inspect.json"
    subprocess.run(
        [sys.executable, "-m", "jobs.inspect_shards", str(shards), "--json", str(out)],
        cwd=REPO_ROOT, check=False, capture_output=True, text=True,
    )  # fmt: skip
    return json.loads(out.read_text())["totals"]


def manifest_figures(run: Path) -> dict:
    import pyarrow.parquet as pq

    table = pq.read_table(run / "manifest.parquet", columns=["key", "shard"])
    pairs = set(zip(table.column("shard").to_pylist(), table.column("key").to_pylist(),
                    strict=True))  # fmt: skip
    return {"manifest_rows": table.num_rows, "duplicate_keys": table.num_rows - len(pairs)}


def export_stage(env: dict, address: str, run: Path, out: Path) -> dict:
    """jobs.export_shards of the clean set, where this tree has it."""
    if importlib.util.find_spec("jobs.export_shards") is None:
        return {"exported_samples": None,
                "export_note": "jobs.export_shards is not in this tree"}  # fmt: skip
    run_job(env, address, "export_shards", f"manifest={run}", f"output={out}")
    summary = json.loads((out / "summary.json").read_text())
    check = summary["count_check"]
    return {"exported_samples": check["written"], "export_count_check_passed": check["passed"]}


def verified_sample(run: Path, fraction: float, classes: int, seed: int, out: Path) -> int:
    """A verified file (CSV: key, verified_label) of `fraction` of the manifest's rows with
    their true labels (the generator's: image index mod K, the index in the key
    `c<given>/img<index>`) standing in for a person's audit; the number of rows."""
    import pyarrow.parquet as pq

    keys = pq.read_table(run / "manifest.parquet", columns=["key"]).column("key").to_pylist()
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(keys), max(1, round(fraction * len(keys))), replace=False))
    lines = [f"{keys[i]},{int(keys[i].rsplit('img', 1)[1]) % classes}\n" for i in rows]
    out.write_text("key,verified_label\n" + "".join(lines))
    return len(rows)


def detectors_stage(env: dict, address: str, run: Path, classes: str, args) -> dict:
    """The clean job again on the same output (its score files reused: scoring skipped)
    with selection.detector=ensemble and a verified file: DeFT's prompts and CleanNet fitted
    over the whole run, and the ensemble's manifest. Their cost at this scale."""
    verified = run.parent / "verified.csv"
    count = verified_sample(run, args.verified_fraction, args.classes, args.seed, verified)
    run_job(
        env, address, "clean", "--config=configs/local-cluster.yaml",
        f"data.input={run.parent / 'shards'}", f"data.classes={classes}", f"output={run}",
        "selection.fit_mode=distributed", "selection.detector=ensemble",
        f"selection.verified={verified}",
        # the tiny CLIP's 16-token context: 12 for the longest ImageNet class name, 2 for
        # the start and end, 2 learned context tokens (randomly initialised, as DeFT's code)
        "selection.deft.ctx_init=", "selection.deft.n_ctx=2",
    )  # fmt: skip
    summary = json.loads((run / "summary.json").read_text())
    timings = summary["timings"]
    compared = (summary.get("detectors") or {}).get("detectors") or {}
    return {
        "detectors_verified_rows": count,
        "detectors_scoring_skipped": summary["scoring"].get("shards_skipped"),
        "detectors_fit_seconds": round(timings.get("detectors_s", 0.0), 1),
        "detectors_fit_seconds_by_member": (summary.get("detectors") or {}).get("fit_seconds"),
        "detectors_selection_seconds": round(timings.get("selection_s", 0.0), 1),
        "detectors_clean": {name: entry.get("clean") for name, entry in compared.items()},
        "detectors_manifest": manifest_figures(run),
    }


STAGES = ("make_shards", "inspect", "clean", "train", "export")


def stages_from(first: str | None) -> dict[str, bool]:
    """Which stages run: all, or `first` and those after it (the earlier ones' outputs are
    read from the workdir, e.g. after a later stage failed)."""
    if first is not None and first not in STAGES:
        raise ValueError(f"unknown stage {first!r}; the stages: {', '.join(STAGES)}")
    start = STAGES.index(first) if first else 0
    return {name: i >= start for i, name in enumerate(STAGES)}


def rate(items: float | None, seconds: float | None) -> float | None:
    return round(items / seconds, 1) if items and seconds else None


def run(args) -> dict:
    """Everything above; the JSON-ready result."""
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="rehearsal-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    images, shards, run_dir = workdir / "images", workdir / "shards", workdir / "clean"
    stage: dict[str, float] = {}
    result: dict = {"note": NOTE, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                    "load_average_at_start": os.getloadavg(), "workdir": str(workdir)}  # fmt: skip
    classes, spec_source = choose_class_spec(args.classes, workdir)
    result.update(input_samples=args.samples, classes=args.classes, class_spec=classes,
                  class_spec_source=spec_source, noise_rate=args.noise_rate)  # fmt: skip
    generated = timed(stage, "generate", lambda: generate_imagefolder(
        images, args.samples, args.classes, args.noise_rate, args.seed))  # fmt: skip
    result["noisy_samples"] = generated["noisy"]

    cluster = LocalCluster(workdir / "cluster", env=CLUSTER_ENV)
    sampler = None
    try:
        info = timed(stage, "cluster_up", lambda: cluster.up(timeout_s=600))
        env = cluster.client_env()
        os.environ.update(info.env())  # this process's Ray clients (the sampler) too
        sampler = ClusterSampler(info.temp_dir, info.gcs_address)
        sampler.start()
        ran = stages_from(args.from_stage)
        if ran["make_shards"]:
            timed(stage, "make_shards", lambda: run_job(
                env, info.address, "make_shards", "--layout=imagefolder", f"--input={images}",
                f"--output={shards}", f"shard_size={args.shard_size}",
                f"class_names={generated['class_names']}"))  # fmt: skip
        if ran["inspect"]:
            result["inspect"] = timed(stage, "inspect", lambda: inspect(shards))
        if ran["clean"]:
            timed(stage, "clean", lambda: run_job(
                env, info.address, "clean", "--config=configs/local-cluster.yaml",
                f"data.input={shards}", f"data.classes={classes}", f"output={run_dir}",
                "selection.fit_mode=distributed"))  # fmt: skip
        summary = json.loads((run_dir / "summary.json").read_text())
        result.update(manifest_figures(run_dir))
        result["fit_mode"] = summary["fit"]["mode"]
        result["clean_timings"] = summary["timings"]
        result["report_bytes"] = (run_dir / "report.html").stat().st_size
        result["report_render_seconds"] = summary["timings"].get("report_s")
        result["scoring_images_per_second"] = summary["scoring"]["images_per_second"]
        result["scoring_steady_images_per_second"] = summary["scoring"]["steady_images_per_second"]
        storage = workdir / "train-runs"
        if ran["train"]:
            shutil.rmtree(storage, ignore_errors=True)  # a failed run's state: start afresh
            timed(stage, "train", lambda: run_job(
                env, info.address, "train", "--config=configs/train-local-cluster.yaml",
                f"data.input={shards}", f"data.manifest={run_dir}", f"data.classes={classes}",
                "data.test_input=null", "data.cache_decoded=false", "optim.epochs=1",
                "optim.batch_size=256", "optim.milestones=[1]", f"run.storage={storage}"))  # fmt: skip
        trained = json.loads((storage / "local-cluster" / "summary.json").read_text())
        first = trained["history"][0] if trained.get("history") else {}
        result.update(train_epochs_completed=trained.get("epochs_completed"),
                      batch_distinct_classes_mean=first.get("batch_distinct_classes_mean"),
                      train_worker_batch=first.get("worker_batch_size"),
                      train_images_per_second=first.get("train_images_per_s"))  # fmt: skip
        result.update(timed(stage, "export", lambda: export_stage(
            env, info.address, run_dir, workdir / "export")))  # fmt: skip
        if args.detectors:  # last: it rewrites the clean run's manifest (the ensemble's)
            result.update(timed(stage, "detectors", lambda: detectors_stage(
                env, info.address, run_dir, classes, args)))  # fmt: skip
    except Exception as err:  # the figures measured so far still go to the JSON
        result["error"] = f"{type(err).__name__}: {err}"[-4000:]
    finally:
        if sampler is not None:
            sampler.stopping.set()
            sampler.join(timeout=30)
        print(f"[rehearsal] cluster down ({cluster.down()} processes)", flush=True)
    result["stage_seconds"] = stage
    result["whole_path_seconds"] = round(
        sum(v for k, v in stage.items() if k not in ("generate", "detectors")), 1
    )
    if sampler is None:  # the cluster did not come up: nothing was sampled
        sampler = ClusterSampler("", "")
    result["driver_peak_rss_mb"] = round(max(sampler.driver_peak_kb.values(), default=0) / 1024)
    result["driver_peak_rss_mb_by_job"] = {
        job: round(kb / 1024) for job, kb in sampler.driver_peak_kb.items()
    }
    result["cluster_peak_rss_mb"] = round(sampler.cluster_peak_kb / 1024)
    result["object_store_peak_mb"] = round(sampler.store_peak_bytes / 2**20)
    result["object_store_sample_errors"] = sampler.store_errors
    n = args.samples
    throughput = {
        "make_shards": rate(n, stage.get("make_shards")),
        "scoring": result.get("scoring_images_per_second"),
        "fit": rate(n, result.get("clean_timings", {}).get("selection_s")),
        "train": result.get("train_images_per_second"),
        # export reads every input sample's row and shard, and writes the clean ones
        "export": rate(n, stage.get("export")),
    }
    result["images_per_second"] = throughput
    measured = {k: v for k, v in throughput.items() if v}
    result["slowest_stage"] = min(measured, key=measured.get) if measured else None
    result["load_average_at_end"] = os.getloadavg()
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, required=True)
    parser.add_argument("--classes", type=int, default=SHIPPED_CLASSES)
    parser.add_argument("--out", required=True, help="JSON file for the figures")
    parser.add_argument("--noise-rate", type=float, default=0.4)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", help="where the images, shards and runs go (default: temp)")
    parser.add_argument("--keep", action="store_true", help="keep the workdir afterwards")
    parser.add_argument(
        "--detectors", action="store_true",
        help="then refit with selection.detector=ensemble (DeFT, CleanNet) on the same scores",
    )  # fmt: skip
    parser.add_argument("--verified-fraction", type=float, default=0.01)
    parser.add_argument(
        "--from-stage", choices=STAGES,
        help="rerun from this stage on, reading the earlier stages' outputs from --workdir",
    )  # fmt: skip
    args = parser.parse_args(argv)
    with environ_restored():
        result = run(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    if "error" in result:
        print(f"[rehearsal] failed: {result['error']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
