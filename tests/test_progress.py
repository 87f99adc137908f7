"""Logs a person can read: one-line progress in files and CI, bars only on a terminal."""

from __future__ import annotations

import os
import pty
import subprocess
import sys

from cleaner.progress import ProgressLog, configure_ray_data_progress, format_duration


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


# A clean job's log off a terminal (one-line progress, no redrawn bars) is checked on the
# job of tests/test_fault_tolerance.py, which also kills a scorer: one job start-up for both.
