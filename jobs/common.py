"""Shared plumbing of the job entry points: argument parsing, Ray connection, outputs."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import yaml

from cleaner.classes import ClassSpec, ClassSpecError, shipped_spec_names, shipped_spec_path
from cleaner.config import ConfigError, RayConfig
from cleaner.reading import uri as uri_lib


def parse_job_args(description: str, argv: list[str] | None = None) -> argparse.Namespace:
    """`--config <yaml> [key=value ...]`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="job config YAML")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    return parser.parse_args(argv)


def connect_ray(cfg: RayConfig) -> None:
    """Join the configured cluster, RAY_ADDRESS (as under `ray job submit`), or start locally."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # "local": a new instance of our own, never a cluster that happens to run here.
        ray.init(address="local", num_cpus=cfg.num_cpus, log_to_driver=True)


def load_class_spec(location: str) -> ClassSpec:
    """The class spec named by `data.classes`: a shipped one by name (cleaner/specs/, 'demo'
    for the bundled demo's) or a local/file:///s3:// YAML. Any problem is a ConfigError."""
    shipped = shipped_spec_path(location)
    try:
        if shipped is not None:
            return ClassSpec.load(shipped)
        return ClassSpec.from_yaml_text(uri_lib.read_text(location))
    except FileNotFoundError:
        hint = ""
        if "/" not in location and not location.endswith((".yaml", ".yml")):
            hint = f" (shipped specs: demo, {', '.join(shipped_spec_names())})"
        raise ConfigError(f"class spec not found: {location}{hint}") from None
    except ClassSpecError as err:
        raise ConfigError(f"{err} ({location})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"class spec {location} is not UTF-8 text") from None
    except OSError as err:  # a folder, a permission error...
        raise ConfigError(f"class spec {location} cannot be read: {err}") from None


def write_json(target: str, payload: dict) -> None:
    uri_lib.write_text(target, json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")


def write_yaml(target: str, payload: dict) -> None:
    uri_lib.write_text(target, yaml.safe_dump(payload, sort_keys=False))


def run_main(main) -> None:
    """Run a job's main; configuration errors exit 2 with a one-line message, not a trace."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        sys.exit(main())
    except (ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent
