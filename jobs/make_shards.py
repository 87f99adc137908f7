"""The ingestion job: a dataset in its native layout -> WebDataset shards + class spec.

    python -m jobs.make_shards --layout imagefolder --input ./images --output ./shards
    python -m jobs.make_shards --layout webvision --input s3://b/webvision --output \\
        s3://b/mini-webvision/train mini=true resize=256
    python -m jobs.make_shards --config my.yaml [--dry-run] [key=value ...]

Every key is in cleaner/config.py (MakeShardsConfig); `--layout`, `--input`, `--output`
and `--dry-run` are short for `layout=`, `input=`, `output=` and `dry_run=true`.
"""

from __future__ import annotations

from cleaner.config import MakeShardsConfig
from jobs.cli import COMMANDS
from jobs.command import run_command, run_main
from jobs.common import connect_ray


def run_make_shards(cfg: MakeShardsConfig) -> dict:
    """List the dataset and write its shards (a dry run only lists); returns the report."""
    from cleaner.reading.ingest import make_shards

    if not cfg.dry_run:
        connect_ray(cfg.ray)
    return make_shards(cfg)


def main(argv: list[str] | None = None) -> int:
    return run_command(COMMANDS["make-shards"], argv, prog="python -m jobs.make_shards")


if __name__ == "__main__":
    run_main(main)
