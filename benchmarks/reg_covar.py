"""The mixtures' variance floor: the official 1e-6 against DivideMix's 5e-4, on the demo.

    python -m benchmarks.reg_covar [--settings sym20,sym40,sym80,hard40,idn40]
        [--json runs/bench/reg_covar.json]

The demo generator (seed 0) writes the default demo (symmetric 40%) into
data/bench/sym40/train and the clean job scores it once into runs/bench/sym40/ (both
skipped when done). The images do not depend on the noise, and neither do the CLIP
embeddings and zero-shot probabilities, so every other setting takes the same scores
with its own labels: the generator's own labels for that noise (`demo_labels`: the
same labels `jobs.make_demo_data --noise KIND --rate R` writes), or for "idn40"
instance-dependent noise (each label flips, with probability 0.4, to the class the
zero-shot classifier ranks next after the true one). The probe is refitted per setting.

Then the selection is refitted on the same probabilities (zero-shot recomputed from the
stored embeddings, the job's in-sample probe) with `selection.gmm_reg_covar` 1e-6 and
5e-4, with and without the probe, and the clean set is scored against the true labels
(positive = the given label is right): size, precision, recall, F1, and the Jaccard
similarity of the two selections.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np

from benchmarks.cleanlab_compare import (
    SETTINGS as GENERATED,
)
from benchmarks.cleanlab_compare import (
    add_run_arguments,
    generate_and_score,
    instance_dependent_labels,
    load_run,
    normalised,
    settings_of,
)
from cleaner.demo.dataset import demo_labels
from cleaner.selection.probe import fit_probe_probs
from cleaner.selection.rules import DEFAULT_REG_COVAR, DIVIDEMIX_REG_COVAR
from cleaner.selection.select import select_clean
from jobs.common import load_class_spec

SETTINGS: dict[str, tuple[str, float]] = {
    "sym20": GENERATED["sym20"],
    "sym40": ("symmetric", 0.4),
    "sym80": GENERATED["sym80"],
    "hard40": ("hard", 0.4),
    "idn40": GENERATED["idn40"],
}
FLOORS = {"1e-6": DEFAULT_REG_COVAR, "5e-4": DIVIDEMIX_REG_COVAR}


def clean_set_metrics(selected: np.ndarray, truly_clean: np.ndarray) -> dict:
    tp = int((selected & truly_clean).sum())
    precision = tp / max(int(selected.sum()), 1)
    recall = tp / max(int(truly_clean.sum()), 1)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "size": int(selected.sum()),
        "wrong_kept": int((selected & ~truly_clean).sum()),
        "precision": precision,
        "recall": recall,
        "f1": f1,
    }


def score_with_retries(name: str, args: argparse.Namespace, attempts: int = 4) -> Path:
    """`generate_and_score`, retried: on a busy machine Ray's node start can time out."""
    for attempt in range(1, attempts + 1):
        try:
            return generate_and_score(name, *SETTINGS[name], args)
        except subprocess.CalledProcessError:
            if attempt == attempts:
                raise
            print(f"[reg_covar] scoring {name} failed (attempt {attempt}); retrying", flush=True)
            time.sleep(10)
    raise AssertionError("unreachable")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated")
    add_run_arguments(parser, "runs/bench/reg_covar.json")
    args = parser.parse_args(argv)
    names = settings_of(parser, args, SETTINGS)

    results: dict[str, dict] = {}
    base = load_run(score_with_retries("sym40", args))
    spec = load_class_spec(base["cfg"].data.classes)
    for name in names:
        kind, rate = SETTINGS[name]
        run = dict(base)
        if kind == "idn":
            run["labels"] = instance_dependent_labels(base["true_labels"], base["zs"], rate)
        else:
            params = {
                "seed": args.seed,
                "noise": kind,
                "noise_rate": rate,
                "most_similar": spec.most_similar(),
            }
            true, noisy = demo_labels(base["labels"].shape[0], params, spec.num_classes)
            if not np.array_equal(true, base["true_labels"]):
                raise SystemExit("the scored run's rows are not in the generator's order")
            run["labels"] = noisy
        labels, cfg, k = run["labels"], run["cfg"], run["num_classes"]
        truly_clean = labels == run["true_labels"]
        zeroshot = normalised(run["zs"])
        probe = normalised(
            fit_probe_probs(
                run["embeddings"],
                labels,
                k,
                mode="insample",
                folds=cfg.selection.probe_folds,
                C=cfg.selection.probe_c,
                seed=cfg.seed,
            )
        )
        row: dict[str, dict] = {}
        for sources_name, probs in (("zs+probe", (zeroshot, probe)), ("zs", (zeroshot,))):
            masks = {}
            for floor_name, floor in FLOORS.items():
                start = time.perf_counter()
                masks[floor_name] = select_clean(
                    labels,
                    *probs,
                    theta_gmm=cfg.selection.theta_gmm,
                    theta_cons=cfg.selection.theta_cons,
                    gmm=cfg.selection.gmm,
                    reg_covar=floor,
                )
                row[f"{sources_name} {floor_name}"] = {
                    **clean_set_metrics(masks[floor_name], truly_clean),
                    "seconds": time.perf_counter() - start,
                }
            a, b = masks["1e-6"], masks["5e-4"]
            row[f"{sources_name} jaccard"] = {"jaccard": float((a & b).sum() / (a | b).sum())}
        results[name] = {
            "noise": kind,
            "rate": rate,
            "wrong_fraction": float(1.0 - truly_clean.mean()),
            "num_samples": int(labels.shape[0]),
            "selections": row,
        }

    load = os.getloadavg()
    print(f"\nload average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")
    print(
        "| noise (wrong labels) | sources | reg_covar | size | wrong kept | precision | recall | F1 |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, res in results.items():
        for sources_name in ("zs+probe", "zs"):
            for floor_name in FLOORS:
                m = res["selections"][f"{sources_name} {floor_name}"]
                print(
                    f"| {name} ({res['wrong_fraction']:.1%}) | {sources_name} | {floor_name} | "
                    f"{m['size']:,} | {m['wrong_kept']} | {m['precision']:.3f} | "
                    f"{m['recall']:.3f} | {m['f1']:.3f} |"
                )
    print("\nJaccard(1e-6, 5e-4):")
    for name, res in results.items():
        sims = {s: res["selections"][f"{s} jaccard"]["jaccard"] for s in ("zs+probe", "zs")}
        print(f"  {name}: " + ", ".join(f"{s} {v:.3f}" for s, v in sims.items()))
    out = {"load_average": load, "settings": results}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.json}")
    return out


if __name__ == "__main__":
    main()
