"""Noisy-label detection: our selection vs cleanlab's find_label_issues, on the same probabilities.

    python -m benchmarks.cleanlab_compare [--settings sym20,sym50,sym80,asym40,hard30,idn40]
        [--num-samples 6000] [--json runs/bench/cleanlab_compare.json]

For each noise setting the demo generator (`jobs.make_demo_data`, seed 0, so every setting
has the same images and only the labels differ) writes data/bench/<setting>/train and the
clean job (`jobs.clean`, configs/demo.yaml, tiny CLIP) scores it into runs/bench/<setting>/
(both skipped when already done). Then, from the run's stored fp16 embeddings (the score
files keep only the top-5 zero-shot probabilities), this script recomputes:

- the full zero-shot probabilities [N, K] (the prompt ensemble, as `cleaner.selection.fit_in_memory`), and
- the linear-probe probabilities, cross-fitted (5 folds: out-of-sample, what cleanlab
  expects) and in-sample (the job's default, for reference),

and feeds the SAME float64 matrices (rows renormalised) to both methods:

  ours              `cleaner.selection.engine.select_from_scores` (the job's selection: the
                    deterministic-EM GMMs, consistency, intersection of every source;
                    docs/method.md, "Selection"),
                    on one or two sources
  cleanlab default  `cleanlab.filter.find_label_issues(labels, pred_probs)`
                    (filter_by="prune_by_noise_rate")
  cleanlab CL       the same with filter_by="confident_learning"

cleanlab takes one matrix: where ours uses two sources (zero-shot and probe), cleanlab gets
their mean (the combination `cleaner.selection.fit_in_memory` uses for suggestions). Positive = the given label
is wrong: precision, recall and F1 of the flagged samples; AUROC of our clean_score (mean
over sources of p(label)) and of cleanlab's `get_label_quality_scores` (self_confidence =
p(label) of its matrix: on the same probabilities the two rankings coincide, so the AUROCs
are equal by construction), plus the AUROC of our per-class normalised loss score
("rank"). The ratio column is our F1 / cleanlab's F1.

Settings: symmetric 20/50/80%, asymmetric 40% and the generator's "hard" noise. On the
demo classes the generator's "hard" noise is the per-class flip to the most similar
class, the same mechanism (and random stream) as its "asymmetric" noise, so hard 40%
would repeat asym40's labels exactly: it runs at 30%. "idn40" adds instance-dependent
noise that the generator does not offer: each sample's label flips, with probability
0.4, to the class the zero-shot classifier ranks next after the true one for that image
(docs/method.md, "Noise models": hard, per sample); it re-uses the embeddings of a scored setting (the
images are the same) and needs no scoring of its own.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from sklearn.metrics import roc_auc_score

from cleaner.config import CleanJobConfig
from cleaner.reading import uri as uri_lib
from cleaner.reading.shards import STATUS_OK
from cleaner.scoring.models import load_clip
from cleaner.scoring.pipeline import SCORES_DIR, shard_output_names
from cleaner.scoring.prompts import encode_prompts, ensemble_probs_numpy
from cleaner.selection.probe import fit_probe_probs
from cleaner.selection.rules import SourceScores
from cleaner.selection.score_table import embeddings_of, read_scores
from cleaner.selection.select import select_from_scores
from jobs.common import load_class_spec

# setting -> (generator noise kind, rate); "idn" is derived here, not generated
SETTINGS: dict[str, tuple[str, float]] = {
    "sym20": ("symmetric", 0.2),
    "sym50": ("symmetric", 0.5),
    "sym80": ("symmetric", 0.8),
    "asym40": ("asymmetric", 0.4),
    "hard30": ("hard", 0.3),
    "idn40": ("idn", 0.4),
}
IDN_SEED = 12345
# probability set -> (our sources, description)
PROB_SETS: dict[str, tuple[tuple[str, ...], str]] = {
    "zs": (("zeroshot",), "zero-shot"),
    "cf": (("probe_cf",), "cross-fitted probe"),
    "zs+cf": (("zeroshot", "probe_cf"), "zero-shot + cross-fitted probe"),
    "zs+is": (("zeroshot", "probe_is"), "zero-shot + in-sample probe (job default)"),
}
METHODS = ("ours", "cleanlab_default", "cleanlab_cl")


def generate_and_score(name: str, kind: str, rate: float, args: argparse.Namespace) -> Path:
    """Demo shards for one setting and the clean job on them (each skipped when done)."""
    data = Path(args.data_root) / name
    run = Path(args.runs_root) / name
    subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.make_demo_data",
            "--out",
            str(data),
            "--num-samples",
            str(args.num_samples),
            "--test-samples",
            "0",
            "--samples-per-shard",
            str(args.samples_per_shard),
            "--noise",
            kind,
            "--rate",
            str(rate),
            "--seed",
            str(args.seed),
        ],
        check=True,
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.clean",
            "--config",
            args.config,
            f"data.input={data / 'train'}",
            f"output={run}",
        ],
        check=True,
    )
    return run


def load_run(run: Path) -> dict:
    """Labels, true labels, embeddings, recomputed zero-shot probs and the run's config."""
    stored = yaml.safe_load(uri_lib.read_text(uri_lib.join(str(run), "config.yaml")))
    cfg = CleanJobConfig.model_validate(stored["config"])
    spec = load_class_spec(cfg.data.classes)
    shards = uri_lib.expand_shard_spec(cfg.data.input)
    names = shard_output_names(shards)
    table = read_scores(
        uri_lib.join(str(run), SCORES_DIR), [names[s] for s in shards], with_embeddings=True
    )
    status = np.asarray(table.column("status").to_pylist(), dtype=object)
    ok = np.flatnonzero(status == STATUS_OK)
    clip = load_clip(cfg.model, device="cpu")
    bank = encode_prompts(clip.model, clip.tokenizer, spec.prompts())
    embeddings = embeddings_of(table)[ok].astype(np.float32)
    zs = ensemble_probs_numpy(embeddings, bank, cfg.scoring.tau).astype(np.float64)
    labels = table.column("label").to_numpy()[ok].astype(np.int64)
    stored_p = table.column("p_label").to_numpy()[ok].astype(np.float64)
    recomputed_p = zs[np.arange(ok.shape[0]), labels] / zs.sum(axis=1)
    return {
        "cfg": cfg,
        "num_classes": spec.num_classes,
        "labels": labels,
        "true_labels": table.column("true_label").to_numpy()[ok].astype(np.int64),
        "embeddings": embeddings,
        "zs": zs,
        "p_label_max_abs_diff": float(np.abs(stored_p - recomputed_p).max()),
    }


def instance_dependent_labels(true_labels: np.ndarray, zs: np.ndarray, rate: float) -> np.ndarray:
    """Flip each label, with probability rate, to the zero-shot runner-up after its true class."""
    masked = zs.copy()
    masked[np.arange(true_labels.shape[0]), true_labels] = -np.inf
    target = masked.argmax(axis=1)
    hit = np.random.default_rng(IDN_SEED).random(true_labels.shape[0]) < rate
    return np.where(hit, target, true_labels)


def normalised(probs: np.ndarray) -> np.ndarray:
    probs = np.asarray(probs, dtype=np.float64)
    return probs / probs.sum(axis=1, keepdims=True)


def detection(flagged: np.ndarray, noisy: np.ndarray, noisy_score: np.ndarray) -> dict:
    """Precision, recall, F1 of flagged (positive = wrong label) and AUROC of noisy_score."""
    tp = int((flagged & noisy).sum())
    precision = tp / flagged.sum() if flagged.any() else float("nan")
    recall = tp / noisy.sum() if noisy.any() else float("nan")
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    auroc = float(roc_auc_score(noisy, noisy_score)) if 0 < noisy.sum() < noisy.size else None
    return {
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "auroc": auroc,
        "flagged": int(flagged.sum()),
    }


def compare(labels: np.ndarray, true_labels: np.ndarray, probs: dict, cfg, k: int) -> dict:
    """Every method on every probability set; returns {prob_set: {method: metrics}}."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    noisy = labels != true_labels
    out: dict[str, dict] = {}
    for set_name, (sources, _) in PROB_SETS.items():
        matrices = [probs[s] for s in sources]
        start = time.perf_counter()
        result = select_from_scores(
            labels,
            k,
            {s: SourceScores.from_probs(labels, probs[s]) for s in sources},
            theta_gmm=cfg.selection.theta_gmm,
            theta_cons=cfg.selection.theta_cons,
            gmm=cfg.selection.gmm,
        )
        ours_s = time.perf_counter() - start
        rank = np.mean([s.loss_score for s in result.sources.values()], axis=0)
        ours = detection(~result.is_clean, noisy, -result.clean_score)
        ours["auroc_rank"] = float(roc_auc_score(noisy, -rank))
        ours["seconds"] = ours_s
        combined = normalised(np.mean(matrices, axis=0))
        quality = get_label_quality_scores(labels, combined)
        row = {"ours": ours}
        for method, filter_by in (
            ("cleanlab_default", "prune_by_noise_rate"),
            ("cleanlab_cl", "confident_learning"),
        ):
            start = time.perf_counter()
            flagged = find_label_issues(labels, combined, filter_by=filter_by)
            seconds = time.perf_counter() - start
            row[method] = {**detection(flagged, noisy, -quality), "seconds": seconds}
        out[set_name] = row
    return out


def fmt(value: float | None, width: int = 7) -> str:
    return f"{'-':>{width}}" if value is None or value != value else f"{value:>{width}.3f}"


def print_table(results: dict) -> None:
    print()
    header = (
        f"{'setting':<8}{'wrong':>7}  {'probs':<7}{'method':<18}"
        f"{'prec':>7}{'recall':>7}{'F1':>7}{'AUROC':>7}{'flagged':>8}{'F1 ours/this':>13}"
    )
    print(header)
    print("-" * len(header))
    for name, res in results.items():
        for set_name, row in res["methods"].items():
            ours_f1 = row["ours"]["f1"]
            for method in METHODS:
                m = row[method]
                ratio = ours_f1 / m["f1"] if method != "ours" and m["f1"] else None
                auroc = m["auroc"]
                extra = f" (rank {m['auroc_rank']:.3f})" if method == "ours" else ""
                print(
                    f"{name:<8}{res['wrong_fraction']:>7.3f}  {set_name:<7}{method:<18}"
                    f"{fmt(m['precision'])}{fmt(m['recall'])}{fmt(m['f1'])}{fmt(auroc)}"
                    f"{m['flagged']:>8}{fmt(ratio, 13)}{extra}"
                )
        print()


def add_run_arguments(parser: argparse.ArgumentParser, json_default: str) -> None:
    """The options of `generate_and_score` (data, runs, config) and the JSON output."""
    parser.add_argument("--num-samples", type=int, default=6000)
    parser.add_argument("--samples-per-shard", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--data-root", default="data/bench")
    parser.add_argument("--runs-root", default="runs/bench")
    parser.add_argument("--json", default=json_default)


def settings_of(parser: argparse.ArgumentParser, args: argparse.Namespace, known: dict) -> list:
    """The --settings names, checked against the known ones."""
    names = [s for s in args.settings.split(",") if s]
    unknown = [s for s in names if s not in known]
    if unknown:
        parser.error(f"unknown settings {unknown}; known: {list(known)}")
    return names


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated")
    add_run_arguments(parser, "runs/bench/cleanlab_compare.json")
    args = parser.parse_args(argv)
    names = settings_of(parser, args, SETTINGS)

    import cleanlab

    results: dict[str, dict] = {}
    base: dict | None = None  # a scored run, for the embeddings of derived settings
    for name in [n for n in names if SETTINGS[n][0] != "idn"] + [
        n for n in names if SETTINGS[n][0] == "idn"
    ]:
        kind, rate = SETTINGS[name]
        t0 = time.perf_counter()
        if kind == "idn":
            if base is None:
                base = load_run(generate_and_score("sym20", *SETTINGS["sym20"], args))
            run = dict(base)
            run["labels"] = instance_dependent_labels(base["true_labels"], base["zs"], rate)
            source = f"labels derived from {args.runs_root}/sym20's embeddings"
        else:
            run = load_run(generate_and_score(name, kind, rate, args))
            base = base or run
            source = f"{args.runs_root}/{name}"
        prepared_s = time.perf_counter() - t0
        labels, cfg, k = run["labels"], run["cfg"], run["num_classes"]
        probe_kwargs = {
            "folds": cfg.selection.probe_folds,
            "C": cfg.selection.probe_c,
            "seed": cfg.seed,
        }
        probs = {
            "zeroshot": normalised(run["zs"]),
            "probe_cf": normalised(
                fit_probe_probs(run["embeddings"], labels, k, mode="crossfit", **probe_kwargs)
            ),
            "probe_is": normalised(
                fit_probe_probs(run["embeddings"], labels, k, mode="insample", **probe_kwargs)
            ),
        }
        methods = compare(labels, run["true_labels"], probs, cfg, k)
        results[name] = {
            "noise": kind,
            "rate": rate,
            "source": source,
            "num_samples": int(labels.shape[0]),
            "wrong_fraction": float((labels != run["true_labels"]).mean()),
            "zeroshot_accuracy_true": float(
                (probs["zeroshot"].argmax(1) == run["true_labels"]).mean()
            ),
            "stored_vs_recomputed_p_label_max_abs_diff": run["p_label_max_abs_diff"],
            "prepare_seconds": prepared_s,
            "methods": methods,
        }
        print(
            f"[{name}] {labels.shape[0]} samples, {results[name]['wrong_fraction']:.1%} wrong labels, "
            f"recomputed vs stored zero-shot p(label) max |diff| {run['p_label_max_abs_diff']:.2e}",
            flush=True,
        )

    print_table(results)
    print("F1 ratio ours / cleanlab (probabilities zs+cf; zs):")
    for name, res in results.items():
        parts = []
        for set_name in ("zs+cf", "zs"):
            row = res["methods"][set_name]
            parts.append(
                f"{set_name}: default {row['ours']['f1'] / row['cleanlab_default']['f1']:.2f}, "
                f"CL {row['ours']['f1'] / row['cleanlab_cl']['f1']:.2f}"
            )
        print(f"  {name:<8}" + "; ".join(parts))
    payload = {
        "cleanlab_version": cleanlab.__version__,
        "num_samples": args.num_samples,
        "prob_sets": {k: v[1] for k, v in PROB_SETS.items()},
        "settings": results,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(payload, indent=2))
    print(f"wrote {args.json}")
    return payload


if __name__ == "__main__":
    main()
