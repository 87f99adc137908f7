"""`ray job submit` with this environment's `ray`, as the tests and the local-cluster
benchmarks run it."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
AGENT_NOT_READY = "No available agent to submit job"


def ray_cli(*args: str, env: dict, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run this environment's `ray` command line in the repo root; never raises on failure."""
    return subprocess.run(
        [str(Path(sys.executable).parent / "ray"), *args],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def ray_job_submit(
    address: str,
    env: dict,
    options: list[str],
    command: list[str],
    *,
    agent_wait_s: float = 180,
    timeout: float = 900,
) -> subprocess.CompletedProcess:
    """`ray job submit --address=<address> <options> -- <command>`; returns the finished CLI.

    The dashboard learns of a just-started head's job agent a little after `ray start`, and
    refuses submissions until then, before any job exists: the submission is retried until
    the agent answers or agent_wait_s has passed.
    """
    deadline = time.monotonic() + agent_wait_s
    while True:
        done = ray_cli(
            "job", "submit", f"--address={address}", *options, "--", *command,
            env=env, timeout=timeout,
        )  # fmt: skip
        refused = AGENT_NOT_READY in done.stdout + done.stderr
        if done.returncode == 0 or not refused or time.monotonic() > deadline:
            return done
        time.sleep(3)
