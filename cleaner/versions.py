"""Versions of the packages a job ran with, written beside its outputs."""

from __future__ import annotations

import platform
import subprocess
from importlib import metadata
from pathlib import Path

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
    return versions


def git_commit() -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None
