"""The ingestion job: a dataset in its native layout -> WebDataset shards + class spec.

    python -m jobs.make_shards --layout imagefolder --input ./images --output ./shards
    python -m jobs.make_shards --layout webvision --input s3://b/webvision --output \\
        s3://b/mini-webvision/train mini=true resize=256
    python -m jobs.make_shards --config my.yaml [--dry-run] [key=value ...]

Every key is in cleaner/config.py (MakeShardsConfig); `--layout`, `--input`, `--output`
and `--dry-run` are short for `layout=`, `input=`, `output=` and `dry_run=true`.
"""

from __future__ import annotations

import argparse

from cleaner.config import MakeShardsConfig, load_config
from cleaner.reading.ingest import make_shards
from jobs.common import connect_ray, run_main


def parse_args(argv: list[str] | None) -> tuple[str | None, list[str]]:
    parser = argparse.ArgumentParser(description="Turn a dataset layout into WebDataset shards.")
    parser.add_argument("--config", help="job config YAML")
    parser.add_argument("--layout", help="imagefolder, labellist, webvision, clothing1m, animal10n")
    parser.add_argument("--input", help="dataset root (local or s3://)")
    parser.add_argument("--output", help="shard folder (local or s3://)")
    parser.add_argument("--dry-run", action="store_true", help="list and report, write nothing")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    args = parser.parse_args(argv)
    overrides = [f"{k}={v}" for k in ("layout", "input", "output") if (v := getattr(args, k))]
    if args.dry_run:
        overrides.append("dry_run=true")
    return args.config, overrides + args.overrides


def main(argv: list[str] | None = None) -> int:
    config, overrides = parse_args(argv)
    cfg = load_config(config, overrides, MakeShardsConfig)
    if not cfg.dry_run:
        connect_ray(cfg.ray)
    make_shards(cfg)
    return 0


if __name__ == "__main__":
    run_main(main)
