"""The manifest's suggestions at K classes x J prompts, this tree against another commit's,
side by side in one process (rounds interleaved):

    python -m benchmarks.manifest_suggest [--before 7c593d3] [--rows 2000] [--classes 1000]
        [--prompts 80] [--rounds 3] [--out FILE.json]

`cleaner.selection.manifest.suggest_labels` builds every manifest row's suggested label
and explanation from the image embedding and the whole prompt bank (K x J similarities
per row): at K = 1,000 and the 80 ImageNet templates it was the distributed fit's slowest
part (the 100k rehearsal's manifest stage). Random unit embeddings and prompt features;
the two versions' outputs are compared (top labels equal, probabilities within 1e-5).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from cleaner.scoring.prompts import PromptBank
from cleaner.selection import manifest as current

MODULE = "cleaner/selection/manifest.py"


def module_at(commit: str):
    """`cleaner.selection.manifest` as it was at `commit` (imported from a temp file)."""
    source = subprocess.run(
        ["git", "show", f"{commit}:{MODULE}"], check=True, capture_output=True, text=True
    ).stdout
    folder = Path(tempfile.mkdtemp(prefix="manifest-before-"))
    path = folder / "manifest_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("manifest_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="7c593d3")
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--prompts", type=int, default=80)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    k, j = args.classes, args.prompts
    features = rng.normal(size=(k, j, args.dim)).astype(np.float32)
    features /= np.linalg.norm(features, axis=2, keepdims=True)
    bank = PromptBank(features, np.ones((k, j), bool), tuple(("p",) * j for _ in range(k)))
    embeddings = rng.normal(size=(args.rows, args.dim)).astype(np.float32)
    labels = rng.integers(0, k, args.rows)
    probe = rng.random((args.rows, k)).astype(np.float32)
    probe /= probe.sum(axis=1, keepdims=True)

    versions = {"before": module_at(args.before).suggest_labels, "after": current.suggest_labels}
    seconds: dict[str, list[float]] = {name: [] for name in versions}
    outputs = {}
    for round_ in range(args.rounds):
        for name, suggest in versions.items():
            start = time.perf_counter()
            outputs[name] = suggest(embeddings, labels, bank, 0.07, probe)
            seconds[name].append(time.perf_counter() - start)
            print(f"round {round_ + 1} {name}: {seconds[name][-1]:.2f} s", flush=True)
    before, after = outputs["before"], outputs["after"]
    same_top = bool((before.top_labels == after.top_labels).all())
    np.testing.assert_allclose(after.top_probs, before.top_probs, rtol=1e-5, atol=1e-7)
    per_1000 = {n: 1000 * statistics.median(s) / args.rows for n, s in seconds.items()}
    result = {
        "before": args.before,
        "rows": args.rows,
        "classes": k,
        "prompts": j,
        "seconds": seconds,
        "seconds_per_1000_rows_median": per_1000,
        "speedup": per_1000["before"] / per_1000["after"],
        "top_labels_equal": same_top,
        "prompt_choice_equal": bool(
            (before.given_prompt == after.given_prompt).all()
            and (before.suggested_prompt == after.suggested_prompt).all()
        ),
        "load_average": os.getloadavg(),
    }
    print(
        f"per 1,000 rows (median of {args.rounds}): before {per_1000['before']:.2f} s, "
        f"after {per_1000['after']:.2f} s, speed-up {result['speedup']:.1f}x; "
        f"top labels equal: {same_top}; load average {result['load_average'][0]:.1f}"
    )
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
