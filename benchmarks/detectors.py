"""The detectors side by side on the demo data: detection quality, then the test accuracy
of training on each detector's clean set.

    python -m benchmarks.detectors --work DIR --out FILE [--noise symmetric,hard]
        [--rate 0.4] [--seeds 0,1,2] [--fractions 0.01,0.03,0.1] [--train-seeds 0]
        [--epochs 12] [--train-mode recommended]

Per noise pattern and data seed it writes a demo dataset (`jobs.make_demo_data`, 6,000 +
1,000 images), runs the clean job once with its defaults (configs/demo.yaml: CLIPCleaner's
selection; its scores are the detectors' input), then, in this process, on the same score
files:

- deft: DeFT's prompts on the stored embeddings (the job's defaults);
- cleannet-<f>: CleanNet with a verified file of a fraction f of the samples (keys drawn
  once per dataset, nested: 1% within 3% within 10%; verified_label = the demo's true
  label, written as CSV);
- ensemble: CLIPCleaner + DeFT; ensemble+cleannet: CLIPCleaner + DeFT + CleanNet-10%;

and measures each detector's AUROC (of its clean score) and precision / recall / F1 at its
operating point (its is_clean) against the true labels, on the samples outside the largest
verified set (the same rows for every detector, none of them seen verified). For the data
seeds in --train-seeds it then trains, per detector, the training job's recommended mode
(training.local, the job's MixFix core in this process, configs/train-demo.yaml) on that
detector's manifest and records the final test accuracy; plus CleanNet's own recipe
(mode noisy with its soft weights) and DeFT's fine-tuning (network clip_peft, mode deft).

Writes FILE (JSON: every figure per dataset, and means / standard deviations over seeds)
and prints the table that docs/benchmarks.md quotes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.train_modes import parse_list
from cleaner.config import CleanJobConfig, load_config
from cleaner.metrics import detection_metrics
from training.config import RECOMMENDED_MODE, TrainJobConfig

DETECTION_METRICS = ("auroc", "precision", "recall", "f1", "selected_fraction")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, help="datasets, runs and manifests go here")
    parser.add_argument("--out", required=True, help="result JSON")
    parser.add_argument("--noise", default="symmetric,hard")
    parser.add_argument("--rate", type=float, default=0.4)
    parser.add_argument("--seeds", default="0,1,2", help="data (and detector) seeds")
    parser.add_argument("--fractions", default="0.01,0.03,0.1", help="CleanNet verified")
    parser.add_argument("--train-seeds", default="0", help="data seeds whose detectors train")
    parser.add_argument("--epochs", type=int, default=12, help="training epochs")
    parser.add_argument("--train-mode", default="recommended")
    parser.add_argument("--clean-config", default="configs/demo.yaml")
    parser.add_argument("--train-config", default="configs/train-demo.yaml")
    parser.add_argument("--no-recipes", action="store_true", help="skip w_soft and clip_peft runs")
    args = parser.parse_args(argv)
    args.noise = parse_list(args.noise)
    args.seeds = [int(s) for s in parse_list(args.seeds)]
    args.train_seeds = [int(s) for s in parse_list(args.train_seeds)]
    args.fractions = sorted(float(f) for f in parse_list(args.fractions))
    if args.train_mode == "recommended":
        args.train_mode = RECOMMENDED_MODE
    return args


def make_dataset(root: Path, pattern: str, rate: float, seed: int) -> Path:
    from jobs import make_demo_data

    folder = root / "data" / f"{pattern}-{rate}-seed{seed}"
    make_demo_data.main(
        ["--out", str(folder), "--noise", pattern, "--rate", str(rate), "--seed", str(seed)]
    )
    return folder


def clean_config(args, data: Path, output: Path, *extra: str) -> CleanJobConfig:
    return load_config(
        args.clean_config,
        [f"data.input={data / 'train'}", f"output={output}", *extra],
        CleanJobConfig,
    )


def verified_files(table, fractions: list[float], folder: Path, seed: int) -> dict[float, Path]:
    """CSV files of nested verified subsets: the first f * N keys of one permutation."""
    keys = np.asarray(table.column("key").to_pylist(), dtype=object)
    truth = table.column("true_label").to_numpy()
    usable = np.flatnonzero(np.asarray(table.column("status").to_pylist()) == "ok")
    order = np.random.default_rng(seed + 1234).permutation(usable)
    out = {}
    for fraction in fractions:
        rows = order[: max(1, round(fraction * len(usable)))]
        path = folder / f"verified-{fraction}.csv"
        lines = ["key,verified_label"] + [f"{keys[i]},{int(truth[i])}" for i in rows]
        path.write_text("\n".join(lines) + "\n")
        out[fraction] = path
    return out


def detection_on(manifest, name: str, exclude: set[str]) -> dict:
    """A detector's figures on usable rows with a true label, outside `exclude`."""
    keys = np.asarray(manifest.column("key").to_pylist(), dtype=object)
    status = np.asarray(manifest.column("status").to_pylist(), dtype=object)
    labels = manifest.column("label").to_numpy()
    truth = manifest.column("true_label").to_numpy()
    rows = (status != "failed") & (truth >= 0) & ~np.isin(keys, list(exclude))
    clean_col, score_col = (
        ("is_clean", "clean_score") if name == "chosen" else (f"{name}_clean", f"{name}_score")
    )
    clean = manifest.column(clean_col).to_numpy(zero_copy_only=False).astype(bool)
    score = manifest.column(score_col).to_numpy(zero_copy_only=False).astype(np.float64)
    figures = detection_metrics(clean[rows], labels[rows] == truth[rows], score[rows])
    return {k: figures[k] for k in DETECTION_METRICS}


def fit_all(args, cfg: CleanJobConfig, table, names, verified: dict, log) -> dict:
    """Every detector's manifest over one score table: {name: manifest}."""
    from cleaner.detectors.apply import FittedDetectors
    from cleaner.detectors.blocks import LocalBlocks, block_from_table
    from cleaner.detectors.fit import fit_detectors
    from cleaner.detectors.verified import read_verified_file
    from cleaner.scoring.prompts import PromptBank
    from cleaner.selection.fit_in_memory import fit_and_build_manifest

    bank: PromptBank = args.bank
    shards = np.asarray(table.column("shard").to_pylist(), dtype=object)
    blocks = [block_from_table(table.filter(shards == s)) for s in dict.fromkeys(shards.tolist())]
    fitted: dict = {}
    timings: dict = {}
    started = time.perf_counter()
    deft = fit_detectors(
        cfg.model_copy(update={"selection": cfg.selection.model_copy(update={"detector": "deft"})}),
        [],
        names,
        blocks=LocalBlocks(blocks),
        log=log,
    )
    fitted["deft"] = deft.members["deft"]
    timings["deft_fit_s"] = round(time.perf_counter() - started, 1)
    for fraction, path in verified.items():
        started = time.perf_counter()
        selection = cfg.selection.model_copy(update={"detector": "cleannet", "verified": str(path)})
        found = fit_detectors(
            cfg.model_copy(update={"selection": selection}),
            [],
            names,
            verified=read_verified_file(str(path), names),
            blocks=LocalBlocks(blocks),
            log=log,
        )
        fitted[f"cleannet-{fraction}"] = found.members["cleannet"]
        timings[f"cleannet-{fraction}_fit_s"] = round(time.perf_counter() - started, 1)
    largest = f"cleannet-{max(verified)}"
    choices = {
        "clipcleaner": None,
        "deft": FittedDetectors("deft", {"deft": fitted["deft"]}),
        **{
            f"cleannet-{f}": FittedDetectors("cleannet", {"cleannet": fitted[f"cleannet-{f}"]})
            for f in verified
        },
        "ensemble": FittedDetectors("ensemble", {"deft": fitted["deft"]}, ("clipcleaner", "deft")),
        "ensemble+cleannet": FittedDetectors(
            "ensemble",
            {"deft": fitted["deft"], "cleannet": fitted[largest]},
            ("clipcleaner", "deft", "cleannet"),
        ),
    }
    manifests = {}
    for name, detectors in choices.items():
        manifest, _ = fit_and_build_manifest(
            table, cfg.selection, names, bank, cfg.scoring.tau, seed=cfg.seed, detectors=detectors
        )
        manifests[name] = manifest
    return {"manifests": manifests, "fitted": fitted, "timings": timings}


def train_on(args, data: Path, manifest_path: Path, work: Path, name: str, seed: int, *extra):
    """Final test accuracy of one in-process training run on a manifest."""
    from jobs.train import train_in_process

    overrides = [
        f"data.input={data / 'train'}",
        f"data.test_input={data / 'test'}",
        f"data.manifest={manifest_path}",
        f"run.storage={work / 'train'}",
        f"run.name={name}",
        f"mixfix.mode={args.train_mode}",
        f"optim.epochs={args.epochs}",
        f"seed={seed}",
        *extra,
    ]
    cfg = load_config(args.train_config, overrides, TrainJobConfig)
    record = work / "finished" / f"{name}.json"
    config = cfg.model_dump(mode="json")
    if record.exists() and json.loads(record.read_text()).get("config") == config:
        return json.loads(record.read_text())
    started = time.perf_counter()
    history = train_in_process(cfg)
    result = {
        "test_accuracy": history[-1].get("test_accuracy"),
        "selected_precision": history[-1].get("selected_precision"),
        "seconds": round(time.perf_counter() - started, 1),
        "config": config,
    }
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(result) + "\n")
    return result


def one_dataset(args, pattern: str, seed: int, log) -> dict:
    import pyarrow.parquet as pq

    from cleaner.reading import uri as uri_lib
    from cleaner.scoring.pipeline import SCORES_DIR, shard_output_names
    from cleaner.selection.score_table import read_scores
    from jobs.clean import run_clean
    from jobs.common import load_class_spec

    root = Path(args.work)
    data = make_dataset(root, pattern, args.rate, seed)
    work = root / "runs" / f"{pattern}-{args.rate}-seed{seed}"
    cfg = clean_config(args, data, work / "clean", f"seed={seed}")
    summary = run_clean(cfg)
    shards = uri_lib.expand_shard_spec(cfg.data.input)
    names = shard_output_names(shards)
    table = read_scores(
        uri_lib.join(cfg.output, SCORES_DIR), [names[s] for s in shards], with_embeddings=True
    )
    spec = load_class_spec(cfg.data.classes)
    args.bank = bank_of(cfg, spec)
    verified = verified_files(table, args.fractions, work, seed)
    largest = verified[max(verified)]
    exclude = {line.split(",")[0] for line in largest.read_text().splitlines()[1:]}
    results = fit_all(args, cfg, table, spec.names, verified, log)
    block: dict = {"detection": {}, "clean_counts": {}, "timings": results["timings"]}
    for name, manifest in results["manifests"].items():
        block["detection"][name] = detection_on(manifest, "chosen", exclude)
        block["clean_counts"][name] = int(
            np.asarray(manifest.column("is_clean").to_numpy(zero_copy_only=False)).sum()
        )
        path = work / "manifests" / f"{name}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(manifest, path)
    block["clipcleaner_summary_detection"] = summary.get("detection")
    if seed in args.train_seeds:
        block["training"] = {}
        for name in results["manifests"]:
            path = work / "manifests" / f"{name}.parquet"
            log(f"[detectors] {pattern} seed {seed}: training on {name}'s clean set")
            block["training"][name] = train_on(args, data, path, work, name, seed)
        if not args.no_recipes:
            largest_name = f"cleannet-{max(verified)}"
            path = work / "manifests" / f"{largest_name}.parquet"
            block["training"][f"{largest_name} w_soft (mode noisy)"] = train_on(
                args, data, path, work, f"{largest_name}-wsoft", seed,
                "mixfix.mode=noisy", "mixfix.sample_weights=cleannet",
            )  # fmt: skip
            block["training"][f"{largest_name} w_soft ({args.train_mode})"] = train_on(
                args, data, path, work, f"{largest_name}-wsoft-{args.train_mode}", seed,
                "mixfix.sample_weights=cleannet",
            )  # fmt: skip
            path = work / "manifests" / "deft.parquet"
            block["training"]["deft clip_peft (mode deft)"] = train_on(
                args, data, path, work, "deft-clip-peft", seed,
                "mixfix.mode=deft", "network.name=clip_peft",
                "network.clip.model.name=tiny-clip-shapes", "optim.lr=0.01",
            )  # fmt: skip
    return block


def bank_of(cfg: CleanJobConfig, spec):
    """The prompt bank the clean job encoded (re-encoded here, in this process)."""
    from cleaner.scoring.text_features import encode_text_features_here

    return encode_text_features_here(cfg.model.model_dump(), spec.prompts()).bank


def aggregate(blocks: list[dict], section: str) -> dict:
    """Mean and standard deviation over datasets of each figure."""
    out: dict = {}
    names = blocks[0][section].keys()
    for name in names:
        entry = {}
        for metric in DETECTION_METRICS:
            values = [
                b[section][name][metric] for b in blocks if b[section][name][metric] is not None
            ]
            if values:
                entry[metric] = statistics.fmean(values)
                entry[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out[name] = entry
    return out


def print_table(result: dict) -> None:
    for pattern, block in result["patterns"].items():
        print(f"\n{pattern} ({len(block['datasets'])} datasets): detection on held-out rows")
        print(f"{'detector':<22}{'AUROC':>16}{'precision':>16}{'recall':>16}{'F1':>16}")
        for name, entry in block["mean"].items():
            cells = "".join(
                f"{entry.get(m, float('nan')):>9.4f} ±{entry.get(m + '_std', 0):.3f}"
                for m in ("auroc", "precision", "recall", "f1")
            )
            print(f"{name:<22}{cells}")
        for seed, dataset in block["datasets"].items():
            for name, run in (dataset.get("training") or {}).items():
                print(f"  seed {seed} train {name:<34} test acc {run['test_accuracy']:.4f}")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("RAY_raylet_start_wait_time_s", "600")
    out = Path(args.out)
    load = os.getloadavg()
    result: dict = {
        "command": "python -m benchmarks.detectors "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "patterns": {},
        "train_mode": args.train_mode,
    }

    def log(message: str) -> None:
        print(message, flush=True)

    for pattern in args.noise:
        block = {"datasets": {}}
        result["patterns"][f"{pattern}-{args.rate}"] = block
        for seed in args.seeds:
            block["datasets"][seed] = one_dataset(args, pattern, seed, log)
            block["mean"] = aggregate(list(block["datasets"].values()), "detection")
            result["load_average"] = {"start": load, "now": os.getloadavg()}
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=2, default=float) + "\n")
    print_table(result)
    return result


if __name__ == "__main__":
    main()
