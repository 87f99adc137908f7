"""Shared plumbing of the job entry points: Ray connection, class specs, outputs.

The command line (arguments, config loading, exit statuses) is in jobs/command.py.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import yaml

from cleaner.classes import ClassSpec, ClassSpecError, shipped_spec_names, shipped_spec_path
from cleaner.config import ConfigError, RayConfig
from cleaner.reading import uri as uri_lib
from jobs.command import parse_job_args, run_main

# the command line lives in jobs/command.py; these two names are kept here for job modules
__all__ = [
    "connect_ray",
    "load_class_spec",
    "parse_job_args",
    "run_main",
    "write_json",
    "write_yaml",
]


RAY_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
DEFAULT_TOKEN_AUTH_NOTICE = "Token authentication is enabled for this Ray cluster"


class DefaultTokenAuthNotice(logging.Filter):
    """Drops Ray's warning that a new local instance has token authentication on.

    Ray 2.60 turns token authentication on for every instance that `ray.init` starts and
    warns that it did, naming RAY_AUTH_MODE=disabled as the way out. For a job's own local
    instance that is the setting we want, so the line asks nothing of the user. (Setting
    RAY_AUTH_MODE=token ourselves would also silence it, but Ray caches the mode when it is
    imported, and a mode set later makes its GCS require a token the driver never made.)
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(DEFAULT_TOKEN_AUTH_NOTICE)


def connect_ray(cfg: RayConfig) -> None:
    """Join the configured cluster, RAY_ADDRESS (as under `ray job submit`), or start locally."""
    import ray

    from jobs.ray_noise import absorb_driver_restart_warning, filter_forwarded_lines

    if ray.is_initialized():
        return
    filter_forwarded_lines()  # Ray's restart warning for its own actors: a false alarm
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        notice = DefaultTokenAuthNotice()
        auth_log = logging.getLogger(RAY_AUTH_LOGGER)
        auth_log.addFilter(notice)
        try:
            # "local": a new instance of our own, never a cluster that happens to run here.
            ray.init(address="local", num_cpus=cfg.num_cpus, log_to_driver=True)
        finally:
            auth_log.removeFilter(notice)
    absorb_driver_restart_warning()


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


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent
