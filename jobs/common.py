"""Shared plumbing of the job entry points: Ray connection, class specs, outputs.

The command line (arguments, config loading, exit statuses) is in jobs/command.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from cleaner.classes import DEMO_CLASS_SPEC, ClassSpec
from cleaner.config import ConfigError, RayConfig
from cleaner.reading import uri as uri_lib


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
    """The class spec from a local/file:///s3:// YAML, or the bundled demo spec for 'demo'."""
    if location == "demo":
        return ClassSpec.load(DEMO_CLASS_SPEC)
    try:
        return ClassSpec.from_yaml_text(uri_lib.read_text(location))
    except FileNotFoundError:
        raise ConfigError(f"class spec not found: {location}") from None


def write_json(target: str, payload: dict) -> None:
    uri_lib.write_text(target, json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")


def write_yaml(target: str, payload: dict) -> None:
    uri_lib.write_text(target, yaml.safe_dump(payload, sort_keys=False))


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent
