"""DeFT's detection quality after a number of prompt steps, on a clean run's score files,
in this process (LocalBlocks; no Ray):

    python -m benchmarks.deft_steps --scores RUN/scores [--rows 400] [--seeds 0,1,2]
        --variant steps=12,warmup_steps=4,lr=0.004 --variant steps=300 ...

Each --variant is a list of `selection.deft` settings (DeftConfig fields, e.g. `ctx_init=`
for random context vectors); per variant and seed it trains the prompts on the stored
image embeddings (the first --rows usable rows, all when 0) and prints the AUROC of
p_yes[label] and the precision / recall of DeFT's clean set against the true labels, the
median over the seeds, and the fit's seconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from benchmarks.train_modes import parse_list
from cleaner.config import DeftConfig, ModelConfig
from cleaner.metrics import detection_metrics

METRICS = ("auroc", "precision", "recall")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scores", required=True, help="a clean run's scores/ folder")
    parser.add_argument("--classes", default=None, help="class spec (default: the demo's)")
    parser.add_argument("--model", default="tiny-clip-shapes")
    parser.add_argument("--rows", type=int, default=0, help="first N usable rows (0: all)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--variant", action="append", required=True, help="k=v,k=v settings")
    parser.add_argument("--out", default=None, help="result JSON")
    args = parser.parse_args(argv)
    args.seeds = [int(s) for s in parse_list(args.seeds)]
    return args


def parse_variant(text: str) -> dict:
    """`steps=12,lr=0.004,ctx_init=` -> DeftConfig fields (validated)."""
    settings = dict(item.split("=", 1) for item in parse_list(text))
    return DeftConfig(**settings).model_dump(exclude_unset=True)


def read_rows(scores: str, limit: int) -> dict:
    """The usable rows of every score file (file order), the first `limit` when > 0."""
    from cleaner.detectors.blocks import concat_blocks, read_block

    files = sorted(str(p) for p in Path(scores).glob("*.parquet"))
    if not files:
        raise SystemExit(f"no score files in {scores}")
    rows = concat_blocks([read_block(f) for f in files])
    if limit > 0:
        rows = {name: values[:limit] for name, values in rows.items()}
    return rows


def run_variant(rows: dict, names: list[str], model: str, settings: dict, seed: int) -> dict:
    """One DeFT fit on the rows (split in 4 blocks) and its figures against the truth."""
    from cleaner.detectors import deft
    from cleaner.detectors.blocks import LocalBlocks

    cfg = DeftConfig(**settings)
    blocks = LocalBlocks([{k: v[p::4] for k, v in rows.items()} for p in range(4)])
    started = time.perf_counter()
    trainer = deft.PromptTrainer(
        ModelConfig(name=model).model_dump(), names, cfg.model_dump(), seed=seed
    )
    fitted = deft.train_prompts(
        blocks, deft.Handle(trainer), cfg, len(rows["label"]), seed, log=lambda m: None
    )
    seconds = time.perf_counter() - started
    out = fitted.evaluate(rows["embedding"], rows["label"])
    figures = detection_metrics(out.is_clean, rows["label"] == rows["true_label"], out.clean_score)
    return {**{m: figures[m] for m in METRICS}, "seconds": seconds}


def main(argv: list[str] | None = None) -> dict:
    from cleaner.classes import DEMO_CLASS_SPEC, ClassSpec

    args = parse_args(argv)
    names = ClassSpec.load(args.classes or DEMO_CLASS_SPEC).names
    rows = read_rows(args.scores, args.rows)
    noise = float((rows["label"] != rows["true_label"]).mean())
    print(f"[deft_steps] {len(rows['label'])} rows, {noise:.1%} wrong labels")
    results = {}
    for text in args.variant:
        settings = parse_variant(text)
        runs = [run_variant(rows, names, args.model, settings, seed) for seed in args.seeds]
        median = {
            m: statistics.median(r[m] for r in runs if r[m] is not None)
            for m in (*METRICS, "seconds")
            if any(r[m] is not None for r in runs)
        }
        results[text] = {"settings": settings, "runs": runs, "median": median}
        shown = ", ".join(f"{m} {median[m]:.3f}" for m in METRICS if m in median)
        print(
            f"[deft_steps] {text}: {shown} (fit {median['seconds']:.1f} s; median of "
            f"{len(runs)} seeds; AUROCs {[round(r['auroc'], 3) for r in runs]})"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1, default=float) + "\n")
    return results


if __name__ == "__main__":
    main()
