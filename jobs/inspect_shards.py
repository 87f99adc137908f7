"""Check shards before a long run: samples, keys, label range and classes per shard.

    python -m jobs.inspect_shards s3://bucket/webvision/train/ [--classes classes.yaml] [--json out.json]

No image is decoded; labels are parsed as the clean job parses them. The class spec
defaults to `classes.yaml` beside the shards (what jobs.make_shards writes).
Exit status 1 when a shard is unreadable or a sample would fail, 0 otherwise.
"""

from __future__ import annotations

import argparse
import json

from cleaner.config import ConfigError
from cleaner.reading import uri as uri_lib
from cleaner.reading.inspect import format_inspection, inspect_shards
from jobs.common import load_class_spec, run_main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Count samples, keys, labels per shard.")
    parser.add_argument("input", nargs="+", help="shard folders, s3:// prefixes, patterns, files")
    parser.add_argument("--classes", help="class spec YAML (default: <input>/classes.yaml)")
    parser.add_argument("--json", help="also write the full result as JSON here")
    parser.add_argument("--threads", type=int, default=8, help="shards read at once")
    args = parser.parse_args(argv)
    classes = args.classes or uri_lib.join(args.input[0], "classes.yaml")
    if args.classes is None and not uri_lib.exists(classes):
        raise ConfigError(f"no class spec at {classes}: give --classes <spec.yaml>")
    spec = load_class_spec(classes)
    shards = uri_lib.expand_shard_spec(args.input)
    result = inspect_shards(shards, spec.names, threads=args.threads)
    print(format_inspection(result), flush=True)
    if args.json:
        uri_lib.write_text(args.json, json.dumps(result, indent=2) + "\n")
    t = result["totals"]
    clean = t["unreadable_shards"] == 0 and t["usable"] == t["samples"] and not t["repeated_keys"]
    return 0 if clean else 1


if __name__ == "__main__":
    run_main(main)
