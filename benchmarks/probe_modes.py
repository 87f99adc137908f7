"""Linear-probe modes on the same scores: none vs insample vs crossfit (docs/method.md, "Linear probe").

    python -m benchmarks.probe_modes --run runs/demo

Reads a finished clean run's score files (no rescoring) and refits the global selection
with each probe mode, printing clean-selection precision, recall, F1 and AUROC against
the true labels, plus the fit time. Needs shards whose .json carries "true_label".
"""

from __future__ import annotations

import argparse
import json
import time

import yaml

from cleaner.config import CleanJobConfig
from cleaner.reading import uri as uri_lib
from cleaner.scoring.models import load_clip
from cleaner.scoring.pipeline import SCORES_DIR, shard_output_names
from cleaner.scoring.prompts import encode_prompts
from cleaner.selection.fit_in_memory import fit_and_build_manifest
from cleaner.selection.score_table import read_scores
from jobs.common import load_class_spec

MODES = ("none", "insample", "crossfit")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/demo", help="output folder of a clean run")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    stored = yaml.safe_load(uri_lib.read_text(uri_lib.join(args.run, "config.yaml")))
    cfg = CleanJobConfig.model_validate(stored["config"])
    spec = load_class_spec(cfg.data.classes)
    shards = uri_lib.expand_shard_spec(cfg.data.input)
    clip = load_clip(cfg.model, device="cpu")
    bank = encode_prompts(clip.model, clip.tokenizer, spec.prompts())
    names = shard_output_names(shards)
    table = read_scores(
        uri_lib.join(args.run, SCORES_DIR), [names[s] for s in shards], with_embeddings=True
    )
    print(f"{table.num_rows} samples from {args.run}")
    print(
        f"{'probe':<10}{'precision':>10}{'recall':>10}{'f1':>10}{'auroc':>10}{'clean':>8}{'fit s':>8}"
    )
    results = []
    for mode in MODES:
        selection = cfg.selection.model_copy(update={"probe": mode})
        start = time.perf_counter()
        _, summary = fit_and_build_manifest(
            table, selection, spec.names, bank, cfg.scoring.tau, seed=cfg.seed
        )
        seconds = time.perf_counter() - start
        det = summary.get("detection")
        if det is None:
            raise SystemExit("no true labels in these shards: nothing to compare against")
        row = {"probe": mode, "seconds": seconds, **det}
        results.append(row)
        print(
            f"{mode:<10}{det['precision']:>10.4f}{det['recall']:>10.4f}{det['f1']:>10.4f}"
            f"{(det['auroc'] or float('nan')):>10.4f}{summary['counts']['clean']:>8}{seconds:>8.2f}"
        )
    if args.json:
        uri_lib.write_text(args.json, json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
