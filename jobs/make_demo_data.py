"""Generate the demo dataset (shapes-10): noisy training shards and clean test shards.

    python -m jobs.make_demo_data --out data/demo --num-samples 6000 --test-samples 1000 \\
        --samples-per-shard 500 --noise symmetric --rate 0.4 --seed 0 --image-size 64

writes ``<out>/train/`` (labels with the requested noise) and ``<out>/test/`` (no noise,
seed + TEST_SEED_OFFSET). A split whose ``dataset.json`` already records identical
parameters is skipped; ``--force`` regenerates it anyway.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from cleaner.demo.dataset import (
    IMAGE_FORMATS,
    demo_parameters,
    is_up_to_date,
    read_manifest,
    write_demo_shards,
)
from cleaner.noise import NOISE_KINDS

TEST_SEED_OFFSET = 10_000
"""The test split uses seed + TEST_SEED_OFFSET, so its images differ from the training ones."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", default="data/demo", help="output folder (default data/demo)")
    parser.add_argument("--num-samples", type=int, default=6000, help="training samples")
    parser.add_argument(
        "--test-samples", type=int, default=1000, help="test samples (0: no test split)"
    )
    parser.add_argument("--samples-per-shard", type=int, default=500)
    parser.add_argument("--noise", choices=NOISE_KINDS, default="symmetric")
    parser.add_argument("--rate", type=float, default=0.4, help="noise rate in [0, 1]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--image-format", choices=IMAGE_FORMATS, default="jpg")
    parser.add_argument("--prefix", default="shapes", help="shard and key prefix")
    parser.add_argument("--force", action="store_true", help="regenerate even if up to date")
    contamination = parser.add_argument_group(
        "contamination (cleaner/demo/contamination.py: one extra train shard + ground truth)"
    )
    contamination.add_argument("--off-topic", type=int, default=0, help="off-topic images")
    contamination.add_argument("--near-duplicates", type=int, default=0, help="edited copies")
    contamination.add_argument("--exact-duplicates", type=int, default=0, help="byte copies")
    contamination.add_argument("--test-leaks", type=int, default=0, help="test images in train")
    args = parser.parse_args(argv)
    if args.num_samples < 1:
        parser.error("--num-samples must be positive")
    if args.test_samples < 0:
        parser.error("--test-samples must be zero or positive")
    if not 0.0 <= args.rate <= 1.0:
        parser.error("--rate must lie in [0, 1]")
    return args


def make_split(name: str, out_dir: Path, num_samples: int, *, force: bool, **options: Any) -> None:
    """Write one split unless it is already up to date; print what happened."""
    parameters = demo_parameters(num_samples, **options)
    if not force and is_up_to_date(out_dir, parameters):
        print(f"[{name}] skipped: {out_dir} already holds these parameters", flush=True)
        return

    def report(path: Path, count: int, done: int, total: int) -> None:
        print(f"[{name}] shard {done}/{total}: {path} ({count} samples)", flush=True)

    write_demo_shards(out_dir, num_samples, on_shard=report, **options)
    manifest = read_manifest(out_dir) or {}
    print(
        f"[{name}] done: {num_samples} samples in {manifest.get('num_shards')} shards, "
        f"{manifest.get('changed_fraction', 0.0):.1%} of labels changed",
        flush=True,
    )


def main(argv: list[str] | None = None) -> None:
    """Generate (or skip) the train and test splits of the demo dataset."""
    args = parse_args(argv)
    try:
        make_splits(args)
        counts = (args.off_topic, args.near_duplicates, args.exact_duplicates, args.test_leaks)
        if any(counts):
            from cleaner.demo.contamination import write_contamination

            truth = write_contamination(
                Path(args.out) / "train",
                Path(args.out) / "test",
                off_topic=args.off_topic,
                near=args.near_duplicates,
                exact=args.exact_duplicates,
                leaks=args.test_leaks,
                seed=args.seed,
            )
            print(f"[contamination] {len(truth['samples'])} samples injected", flush=True)
    except ValueError as error:  # invalid parameters, e.g. an image size below 8
        raise SystemExit(f"make_demo_data: {error}") from None


def make_splits(args: argparse.Namespace) -> None:
    """The train split (noisy) and, unless --test-samples is 0, the clean test split."""
    out = Path(args.out)
    common = {
        "samples_per_shard": args.samples_per_shard,
        "image_size": args.image_size,
        "image_format": args.image_format,
        "prefix": args.prefix,
    }
    make_split(
        "train",
        out / "train",
        args.num_samples,
        force=args.force,
        noise=args.noise,
        noise_rate=args.rate,
        seed=args.seed,
        **common,
    )
    if args.test_samples > 0:
        make_split(
            "test",
            out / "test",
            args.test_samples,
            force=args.force,
            noise="none",
            noise_rate=0.0,
            seed=args.seed + TEST_SEED_OFFSET,
            **common,
        )


if __name__ == "__main__":
    main()
