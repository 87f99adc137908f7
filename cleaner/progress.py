"""Progress a person can read: one-line summaries in logs, bars only on a terminal.

In a non-interactive run (stdout not a TTY: `ray job logs`, CI, a file) Ray Data's
carriage-return progress bars are switched off and the jobs print periodic one-line
summaries instead (done/total, rate, ETA). On a terminal Ray Data keeps its bars.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

DEFAULT_INTERVAL_S = 10.0
INTERVAL_ENV = "CLIPCLEANER_PROGRESS_INTERVAL_S"


def interactive() -> bool:
    """True when stdout is a terminal (a person watching), False for logs and files."""
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):  # replaced or closed stdout
        return False


def progress_interval_s() -> float:
    """Seconds between one-line summaries (CLIPCLEANER_PROGRESS_INTERVAL_S, default 10)."""
    raw = os.environ.get(INTERVAL_ENV)
    try:
        return max(0.0, float(raw)) if raw else DEFAULT_INTERVAL_S
    except ValueError:
        return DEFAULT_INTERVAL_S


def configure_ray_data_progress(show_bars: bool | None = None) -> bool:
    """Set this process's Ray Data context: bars on a terminal, none in logs.

    RAY_DATA_DISABLE_PROGRESS_BARS=1 keeps them off on a terminal too.
    Returns whether bars are shown. Datasets carry the context they were created with to
    the actors that execute them (Ray Train's split coordinator included), so calling this
    on the driver before building datasets decides for the whole job.
    """
    from ray.data import DataContext

    if show_bars is None:
        forced_off = os.environ.get("RAY_DATA_DISABLE_PROGRESS_BARS", "0") not in ("", "0")
        show_bars = interactive() and not forced_off
    bars = show_bars
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = bars
    ctx.enable_operator_progress_bars = bars
    # tqdm_ray relays redrawn bars from workers to the driver's log: only on a terminal.
    ctx.use_ray_tqdm = bars
    if not bars:
        # Ray Data warns once per process that its bars are off and how to turn them on; the
        # jobs print their own progress lines instead, so that warning asks nothing of anyone.
        from ray.util.debug import log_once

        log_once("ray_data_progress_manager_disabled")
    return bars


def format_duration(seconds: float) -> str:
    seconds = round(max(0.0, seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class ProgressLog:
    """Periodic one-line progress: `[name] 3/40 shards, 1,500 samples, 850 samples/s, ETA 0:41`.

    `update` prints at most once per interval (the first update prints at once); `finish`
    always prints the closing line. The ETA comes from the fraction of units done (none
    when total_units is None: then only items and rate are shown).
    """

    def __init__(
        self,
        name: str,
        total_units: int | None,
        unit: str,
        item: str,
        interval_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        emit: Callable[[str], None] | None = None,
    ):
        self.name, self.total_units, self.unit, self.item = name, total_units, unit, item
        self.interval_s = progress_interval_s() if interval_s is None else interval_s
        self.clock = clock
        self.emit = emit or (lambda line: print(line, flush=True))
        self.start = clock()
        self.last_print: float | None = None
        self.units = 0
        self.items = 0

    def line(self) -> str:
        elapsed = max(self.clock() - self.start, 1e-9)
        rate = self.items / elapsed
        done = f"{self.units}/{self.total_units} {self.unit}, " if self.total_units else ""
        text = f"[{self.name}] {done}{self.items:,} {self.item}, {rate:,.0f} {self.item}/s"
        if self.total_units and 0 < self.units < self.total_units:
            eta = elapsed * (self.total_units - self.units) / self.units
            text += f", ETA {format_duration(eta)}"
        return text

    def update(self, units: int = 0, items: int = 0) -> None:
        self.units += units
        self.items += items
        now = self.clock()
        if self.last_print is None or now - self.last_print >= self.interval_s:
            self.last_print = now
            self.emit(self.line())

    def finish(self) -> None:
        elapsed = self.clock() - self.start
        self.emit(f"{self.line()}; done in {format_duration(elapsed)}")
