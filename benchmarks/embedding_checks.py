"""The embedding checks' quality on demo data with injected contamination, beside cleanlab.

    python -m benchmarks.embedding_checks [--data data/bench/checks] [--work runs/bench/checks]
        [--num-samples 6000] [--test-samples 1000] [--off-topic 300] [--near 300]
        [--exact 100] [--leaks 100] [--out runs/bench/checks/quality.json]
    python -m benchmarks.embedding_checks --cost [--repeats 3]   # wall time, checks on vs off

Quality: the demo generator writes the data (`jobs.make_demo_data`, 40% symmetric noise)
plus one contamination shard (cleaner/demo/contamination.py: off-topic images, edited and
byte-identical copies of train images, test images copied into train); the clean job
(configs/demo.yaml, tiny CLIP, data.test_input = the test split) runs with every check on.
Against the injected truth it reports precision and recall of
- off_topic: flagged rows vs the injected off-topic images; beside it the alternative
  rules, refitted here on the same run: the mixture over max_p or max_similarity, with
  or without the separation guard, and "none of these" prompts (generic prompts added as
  a K+1-th class of the ensemble, flagged when it wins);
- duplicates: an injected copy counts as found when it shares a duplicate_group with its
  source (recall, per edit); precision = the flagged rows (duplicate_group set) that are an
  injected copy or its source;
- leaks: test_duplicate_of names the copied test key;
and cleanlab's Datalab `near_duplicate` and `outlier` issue types on the same (train, usable)
embeddings, scored the same way. `conflicts_as_evidence` is measured on the same run:
the clean selection's precision and recall against the true labels with and without it.

Cost: `make demo`'s job (data/demo, configs/demo.yaml) run --repeats times with every check
on (and data.test_input=data/demo/test) and with every check off, alternating, each into a
fresh output folder; the medians of the job's wall time and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from cleaner.checks.groups import contradicted_members
from cleaner.checks.offtopic import fit_off_topic, score_histogram
from cleaner.metrics import detection_metrics
from jobs import make_demo_data

NONE_OF_THESE = (
    "a photo of noise.",
    "a photo of a texture.",
    "a photo of text.",
    "an empty background.",
    "a photo of something else.",
    "a scribble.",
)
OFF_CHECKS = ["checks.off_topic=false", "checks.duplicates=false", "checks.test_leaks=false"]


def run_job(data: Path, out: Path, *overrides: str) -> float:
    """The clean job in a fresh process (as `make demo` runs it): its wall time."""
    shutil.rmtree(out, ignore_errors=True)
    command = [
        sys.executable,
        "-m",
        "jobs.clean",
        "--config",
        "configs/demo.yaml",
        f"data.input={data / 'train'}",
        f"output={out}",
        *overrides,
    ]
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def precision_recall(predicted: np.ndarray, truth: np.ndarray) -> dict:
    tp = int((predicted & truth).sum())
    return {
        "flagged": int(predicted.sum()),
        "true": int(truth.sum()),
        "precision": tp / int(predicted.sum()) if predicted.any() else None,
        "recall": tp / int(truth.sum()) if truth.any() else None,
    }


def off_topic_alternatives(manifest, truth: np.ndarray, run: Path) -> dict:
    usable = np.isin(np.asarray(manifest["status"]), ["clean", "noisy", "off_topic"])
    out = {}
    for score, column in (("max_p", "max_p_zeroshot"), ("max_similarity", "max_similarity")):
        values = np.asarray(manifest[column], dtype=np.float64)
        for guard in (True, False):
            rule = fit_off_topic(
                score_histogram(values[usable], score),
                score,
                min_separation=2.0 if guard else 0.0,
                max_weight=0.5 if guard else 1.0,
            )
            name = f"mixture over {score}" + ("" if guard else " (no guard)")
            out[name] = {
                **precision_recall(usable & rule.flag(values), truth),
                "rule": rule.as_dict(),
            }
    out["none-of-these prompts"] = precision_recall(usable & none_of_these(run, len(usable)), truth)
    return out


def none_of_these(run: Path, n: int) -> np.ndarray:
    """Rows whose ensemble prefers generic "none of these" prompts over every class."""
    import torch

    from cleaner.classes import DEMO_CLASS_SPEC, ClassSpec
    from cleaner.config import ModelConfig
    from cleaner.scoring.models import load_clip
    from cleaner.scoring.prompts import encode_prompts, ensemble_probs_numpy
    from cleaner.selection.score_table import embeddings_of

    spec = ClassSpec.load(DEMO_CLASS_SPEC)
    clip = load_clip(ModelConfig(name="tiny-clip-shapes"), device="cpu")
    with torch.no_grad():
        bank = encode_prompts(clip.model, clip.tokenizer, [*spec.prompts(), list(NONE_OF_THESE)])
    files = sorted((run / "scores").glob("*.parquet"))
    embeddings = np.concatenate(
        [embeddings_of(pq.read_table(f, columns=["embedding"])) for f in files]
    )
    probs = ensemble_probs_numpy(embeddings.astype(np.float32), bank)
    assert probs.shape[0] == n
    return probs.argmax(axis=1) == spec.num_classes


def cleanlab_issues(manifest, embeddings_rows: np.ndarray, embeddings: np.ndarray) -> dict:
    from cleanlab import Datalab

    labels = np.asarray(manifest["label"])[embeddings_rows]
    lab = Datalab(data={"label": labels.tolist()}, label_name="label", verbosity=0)
    start = time.perf_counter()
    lab.find_issues(features=embeddings, issue_types={"near_duplicate": {}, "outlier": {}})
    seconds = time.perf_counter() - start
    near = lab.get_issues("near_duplicate")
    outlier = lab.get_issues("outlier")
    n = len(manifest["key"])
    flagged_near = np.zeros(n, bool)
    flagged_near[embeddings_rows] = near["is_near_duplicate_issue"].to_numpy()
    flagged_out = np.zeros(n, bool)
    flagged_out[embeddings_rows] = outlier["is_outlier_issue"].to_numpy()
    sets = near["near_duplicate_sets"].to_list()
    partner = {
        int(embeddings_rows[i]): {int(embeddings_rows[j]) for j in s} for i, s in enumerate(sets)
    }
    return {"near": flagged_near, "outlier": flagged_out, "partners": partner, "seconds": seconds}


def quality(args) -> dict:
    data, work = Path(args.data), Path(args.work)
    make_demo_data.main(
        f"--out {data} --num-samples {args.num_samples} --test-samples {args.test_samples} "
        f"--samples-per-shard 500 --off-topic {args.off_topic} --near-duplicates {args.near} "
        f"--exact-duplicates {args.exact} --test-leaks {args.leaks}".split()
    )
    run = work / "run"
    if args.reuse and (run / "summary.json").exists():
        seconds = json.loads((run / "summary.json").read_text())["timings"]["total_s"]
    else:
        seconds = run_job(data, run, f"data.test_input={data / 'test'}")
    manifest = pq.read_table(run / "manifest.parquet").to_pydict()
    truth = json.loads((data / "train" / "contamination.json").read_text())["samples"]
    keys = manifest["key"]
    row_of = {k: i for i, k in enumerate(keys)}
    n = len(keys)
    kind = np.full(n, "", dtype=object)
    for t in truth:
        kind[row_of[t["key"]]] = t["kind"]
    off_truth = kind == "off_topic"
    result: dict = {
        "rows": n,
        "job_seconds": round(seconds, 1),
        "injected": {k: int((kind == k).sum()) for k in ("off_topic", "near", "exact", "leak")},
    }
    summary = json.loads((run / "summary.json").read_text())
    result["checks"] = summary.get("checks")
    result["off_topic"] = {
        "flag": precision_recall(np.asarray(manifest["off_topic"], bool), off_truth)
    }
    result["off_topic"]["alternatives"] = off_topic_alternatives(manifest, off_truth, run)

    group = np.array([-1 if g is None else g for g in manifest["duplicate_group"]])
    pairs = [
        (row_of[t["key"]], row_of[t["source"]], t["kind"], t.get("edit"))
        for t in truth
        if t["kind"] in ("near", "exact")
    ]
    involved = np.zeros(n, bool)
    for a, b, _, _ in pairs:
        involved[a] = involved[b] = True
    found = {(a, b): group[a] >= 0 and group[a] == group[b] for a, b, _, _ in pairs}
    recall_by = {}
    for label in ("exact", "reencode", "resize", "crop", "flip"):
        chosen = [
            (a, b) for a, b, k, e in pairs if (k == "exact" and label == "exact") or e == label
        ]
        recall_by[label] = sum(found[p] for p in chosen) / len(chosen) if chosen else None
    flagged = group >= 0
    result["duplicates"] = {
        "flagged": int(flagged.sum()),
        "precision": float(involved[flagged].mean()) if flagged.any() else None,
        "recall": float(np.mean(list(found.values()))) if found else None,
        "recall_by_edit": recall_by,
    }
    leak_truth = {row_of[t["key"]]: t["test_key"] for t in truth if t["kind"] == "leak"}
    leak_pred = {i: k for i, k in enumerate(manifest["test_duplicate_of"]) if k is not None}
    correct = sum(1 for i, k in leak_pred.items() if leak_truth.get(i) == k)
    result["leaks"] = {
        "flagged": len(leak_pred),
        "precision": correct / len(leak_pred) if leak_pred else None,
        "recall": correct / len(leak_truth) if leak_truth else None,
        "recall_exact": _share(leak_pred, leak_truth, truth, row_of, exact=True),
        "recall_edited": _share(leak_pred, leak_truth, truth, row_of, exact=False),
    }

    # cleanlab's Datalab on the same embeddings (train rows the job could use)
    from cleaner.selection.score_table import embeddings_of

    files = sorted((run / "scores").glob("*.parquet"))
    table_status = np.concatenate(
        [
            pq.read_table(f, columns=["status"]).column("status").to_numpy(zero_copy_only=False)
            for f in files
        ]
    )
    embeddings = np.concatenate(
        [embeddings_of(pq.read_table(f, columns=["embedding"])) for f in files]
    )
    rows = np.nonzero(table_status == "ok")[0]
    lab = cleanlab_issues(manifest, rows, embeddings[rows].astype(np.float32))
    lab_found = {(a, b): b in lab["partners"].get(a, set()) for a, b, _, _ in pairs}
    result["cleanlab"] = {
        "seconds": round(lab["seconds"], 1),
        "near_duplicate": {
            "flagged": int(lab["near"].sum()),
            "precision": float(involved[lab["near"]].mean()) if lab["near"].any() else None,
            "recall": float(np.mean(list(lab_found.values()))) if lab_found else None,
        },
        "outlier_as_off_topic": precision_recall(lab["outlier"], off_truth),
    }

    # a label conflict as evidence: the selection with and without it, vs the true labels
    true = np.asarray(manifest["true_label"])
    labels = np.asarray(manifest["label"])
    is_clean = np.asarray(manifest["is_clean"], bool)
    known = np.isin(np.asarray(manifest["status"]), ["clean", "noisy"]) & (true >= 0)
    members = np.nonzero(group >= 0)[0]
    contradicted, _ = contradicted_members(
        group[members], labels[members], np.asarray(manifest["p_label_zeroshot"], float)[members]
    )
    with_evidence = is_clean.copy()
    with_evidence[members[contradicted]] = False
    truly_clean = labels[known] == true[known]
    result["conflicts_as_evidence"] = {
        "contradicted": int(contradicted.sum()),
        "without": detection_metrics(is_clean[known], truly_clean),
        "with": detection_metrics(with_evidence[known], truly_clean),
    }
    return result


def _share(pred, truth_map, truth, row_of, exact: bool) -> float | None:
    rows = [
        row_of[t["key"]] for t in truth if t["kind"] == "leak" and (t.get("edit") is None) == exact
    ]
    return sum(pred.get(r) == truth_map[r] for r in rows) / len(rows) if rows else None


def cost(args) -> dict:
    data = Path("data/demo")
    make_demo_data.main(  # `make demo-data`'s arguments (skipped when up to date)
        [
            "--out",
            "data/demo",
            "--num-samples",
            "6000",
            "--test-samples",
            "1000",
            "--samples-per-shard",
            "500",
            "--noise",
            "symmetric",
            "--rate",
            "0.4",
            "--seed",
            "0",
        ]
    )
    on, off = [], []
    for i in range(args.repeats):
        on.append(
            run_job(data, Path(args.work) / f"cost-on-{i}", f"data.test_input={data / 'test'}")
        )
        off.append(run_job(data, Path(args.work) / f"cost-off-{i}", *OFF_CHECKS))
        print(
            f"[cost] run {i}: on {on[-1]:.1f} s, off {off[-1]:.1f} s, load {os.getloadavg()}",
            flush=True,
        )
    checks_s = [
        json.loads((Path(args.work) / f"cost-on-{i}" / "summary.json").read_text())["timings"].get(
            "checks_s"
        )
        for i in range(args.repeats)
    ]
    return {
        "on_seconds": on,
        "off_seconds": off,
        "checks_stage_seconds": checks_s,
        "median_on": statistics.median(on),
        "median_off": statistics.median(off),
        "ratio": statistics.median(on) / statistics.median(off),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/bench/checks")
    parser.add_argument("--work", default="runs/bench/checks")
    parser.add_argument("--num-samples", type=int, default=6000)
    parser.add_argument("--test-samples", type=int, default=1000)
    parser.add_argument("--off-topic", type=int, default=300)
    parser.add_argument("--near", type=int, default=300)
    parser.add_argument("--exact", type=int, default=100)
    parser.add_argument("--leaks", type=int, default=100)
    parser.add_argument(
        "--cost", action="store_true", help="time make demo's job, checks on vs off"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reuse", action="store_true", help="reuse a finished quality run")
    parser.add_argument("--out", default=None, help="JSON results (default <work>/quality.json)")
    args = parser.parse_args(argv)
    result = cost(args) if args.cost else quality(args)
    result["load_average"] = os.getloadavg()
    out = Path(args.out or Path(args.work) / ("cost.json" if args.cost else "quality.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(json.dumps(result, indent=1, default=str))
    return result


if __name__ == "__main__":
    main()
