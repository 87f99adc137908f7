"""Logs a person can read: one-line progress in files and CI, bars only on a terminal."""

from __future__ import annotations

import os
import pty
import subprocess
import sys

import pytest

from cleaner.progress import ProgressLog, configure_ray_data_progress, format_duration
from tests.conftest import REPO_ROOT


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_lines_are_periodic_with_rate_and_eta():
    clock, lines = Clock(), []
    log = ProgressLog("score", 4, "shards", "samples", 10.0, clock=clock, emit=lines.append)
    clock.now = 2.0
    log.update(units=1, items=100)  # the first update prints at once
    clock.now = 5.0
    log.update(units=1, items=100)  # within the interval: silent
    clock.now = 12.5
    log.update(units=1, items=100)
    clock.now = 20.0
    log.update(units=1, items=100)  # 7.5 s after the last line: silent
    log.finish()
    assert lines == [
        "[score] 1/4 shards, 100 samples, 50 samples/s, ETA 0:06",
        "[score] 3/4 shards, 300 samples, 24 samples/s, ETA 0:04",
        "[score] 4/4 shards, 400 samples, 20 samples/s; done in 0:20",
    ]
    assert all("\r" not in line for line in lines)


def test_progress_without_a_known_total_shows_items_and_rate():
    clock, lines = Clock(), []
    log = ProgressLog("train", None, "batches", "samples", 0.0, clock=clock, emit=lines.append)
    clock.now = 4.0
    log.update(units=1, items=64)
    assert lines == ["[train] 64 samples, 16 samples/s"]
    assert format_duration(3725) == "1:02:05"


def test_ray_data_bars_off_when_not_on_a_terminal(monkeypatch):
    from ray.data import DataContext

    monkeypatch.delenv("RAY_DATA_DISABLE_PROGRESS_BARS", raising=False)
    ctx = DataContext.get_current()
    saved = (ctx.enable_progress_bars, ctx.enable_operator_progress_bars, ctx.use_ray_tqdm)
    try:
        assert configure_ray_data_progress() is False  # pytest's stdout is not a TTY
        assert (ctx.enable_progress_bars, ctx.use_ray_tqdm) == (False, False)
        assert configure_ray_data_progress(show_bars=True) is True
        assert (ctx.enable_progress_bars, ctx.use_ray_tqdm) == (True, True)
    finally:
        ctx.enable_progress_bars, ctx.enable_operator_progress_bars, ctx.use_ray_tqdm = saved


def run_on_a_terminal(code: str, env: dict) -> str:
    """Run `python -c code` with stdout on a pseudo-terminal; returns what it printed."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=follower, stderr=subprocess.DEVNULL, env=env
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 4096)
        except OSError:  # EIO once the child has closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=120)
    os.close(leader)
    return b"".join(chunks).decode()


def test_interactive_runs_keep_their_bars():
    code = "from cleaner.progress import configure_ray_data_progress as c; print('bars', c())"
    env = {k: v for k, v in os.environ.items() if k != "RAY_DATA_DISABLE_PROGRESS_BARS"}
    assert "bars True" in run_on_a_terminal(code, env)
    assert "bars False" in run_on_a_terminal(code, {**env, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"})


@pytest.mark.integration
def test_clean_job_log_in_a_file_has_progress_lines_and_no_redrawn_bars(demo_shards, tmp_path):
    log_path = tmp_path / "clean.log"
    env = {**os.environ, "CLIPCLEANER_PROGRESS_INTERVAL_S": "0"}
    env.pop("RAY_DATA_DISABLE_PROGRESS_BARS", None)
    args = [
        f"data.input={demo_shards}",
        "data.classes=demo",
        f"output={tmp_path / 'run'}",
        "ray.num_cpus=2",
        "scoring.max_actors=1",
        "scoring.batch_size=64",
    ]
    with open(log_path, "wb") as log:
        done = subprocess.run(
            [sys.executable, "-m", "jobs.clean", *args],
            cwd=REPO_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=600,
        )
    text = log_path.read_bytes()
    assert done.returncode == 0, text[-3000:].decode(errors="replace")
    assert b"\r" not in text, "carriage-return progress redraws in a non-interactive log"
    shards = len(list(demo_shards.glob("*.tar")))
    progress = [
        line for line in text.decode().splitlines() if line.startswith("[score] ") and "/s" in line
    ]
    assert len(progress) >= shards  # interval 0: a line per shard written, plus the last
    assert progress[-1].startswith(f"[score] {shards}/{shards} shards, 400 samples")
    assert "done in" in progress[-1]
    print(f"\nlog: {len(text)} bytes, {len(text.splitlines())} lines")
