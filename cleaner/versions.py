"""Versions of the packages a job ran with, written beside its outputs."""

from __future__ import annotations

import logging
import platform
import re
import subprocess
import tomllib
from importlib import metadata
from pathlib import Path

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parent.parent

PACKAGES = (
    "clipcleaner",
    "ray",
    "torch",
    "torchvision",
    "open_clip_torch",
    "numpy",
    "scikit-learn",
    "pyarrow",
    "webdataset",
    "pillow",
)


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages that decide results, plus Python and the git commit."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    versions["git_commit"] = git_commit()
    drift = lock_drift(versions)
    if drift:
        versions["lock_drift"] = drift
        log.warning("installed versions differ from uv.lock: %s", "; ".join(drift))
    return versions


def locked_versions(lock_file: Path = REPO_ROOT / "uv.lock") -> dict[str, str]:
    """{normalized name: version} of the committed lock; empty where no lock travels with the code."""
    try:
        data = tomllib.loads(lock_file.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return {}
    return {normalize(p["name"]): p["version"] for p in data.get("package", [])}


def lock_drift(versions: dict[str, str | None], lock: dict[str, str] | None = None) -> list[str]:
    """One line per package whose installed version is not the locked one (e.g. a cluster node
    set up by hand): `name: installed X, uv.lock Y`."""
    lock = locked_versions() if lock is None else lock
    if not lock:
        return []
    drift = []
    for name, installed in versions.items():
        locked = lock.get(normalize(name))
        if locked is not None and installed is not None and installed != locked:
            drift.append(f"{name}: installed {installed}, uv.lock {locked}")
    return drift


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None
