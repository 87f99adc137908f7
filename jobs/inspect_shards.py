"""Check shards before a long run: samples, keys, label range and classes per shard.

    python -m jobs.inspect_shards s3://bucket/webvision/train/ [--classes classes.yaml] [--json out.json]

No image is decoded; labels are parsed as the clean job parses them. The class spec
defaults to `classes.yaml` beside the shards (what jobs.make_shards writes).
Exit status 1 when a shard is unreadable or a sample would fail, 0 otherwise.
"""

from __future__ import annotations

import json

from cleaner.config import ConfigError, InspectConfig
from cleaner.reading import uri as uri_lib
from cleaner.reading.inspect import format_inspection, inspect_shards
from jobs.cli import COMMANDS
from jobs.command import EXIT_PROBLEMS, run_command, run_main
from jobs.common import load_class_spec


def run_inspect(cfg: InspectConfig) -> int:
    """Print the per-shard table; 0 when every sample is usable, 1 otherwise."""
    inputs = [cfg.input] if isinstance(cfg.input, str) else cfg.input
    classes = cfg.classes or uri_lib.join(inputs[0], "classes.yaml")
    if cfg.classes is None and not uri_lib.exists(classes):
        raise ConfigError(f"no class spec at {classes}: give --classes <spec.yaml>")
    spec = load_class_spec(classes)
    shards = uri_lib.expand_shard_spec(inputs)
    result = inspect_shards(shards, spec.names, threads=cfg.threads)
    print(format_inspection(result), flush=True)
    if cfg.json_output:
        uri_lib.write_text(cfg.json_output, json.dumps(result, indent=2) + "\n")
    t = result["totals"]
    clean = t["unreadable_shards"] == 0 and t["usable"] == t["samples"] and not t["repeated_keys"]
    return 0 if clean else EXIT_PROBLEMS


def main(argv: list[str] | None = None) -> int:
    return run_command(COMMANDS["inspect"], argv, prog="python -m jobs.inspect_shards")


if __name__ == "__main__":
    run_main(main)
