"""Keep one false alarm of Ray's out of a job's log: its restart warning for Ray's own actors.

Ray logs, once per process that creates such an actor,

    E ... core_worker.cc:NNNN: Actor with class name: 'MapWorker(MapBatches(ClipScorerWriter))'
    and ID: '...' has constructor arguments in the object store and max_restarts > 0. ...

(ray-project/ray#53727) for every restartable actor whose constructor takes an object
reference. Ray Data's map actors get one from Ray Data itself (the handle of its
ActorLocationTracker: ray-project/ray#57838), whatever the user's class takes, and Ray
Train's controller creates its PreemptionWatcher the same way. Neither is ours to change,
and the restart it warns about works: tests/test_scorer_restart.py kills a scorer actor
mid-run and the restarted one gets its prompt bank and scores every sample. That bank is
the one reference of ours in a restartable actor's constructor (`prompt_bank=[ref]`): the
driver put it on its own node and holds it until scoring ends, so a restart finds it
(docs/reliability.md). Our other actors are not restartable or take no references.

Two routes reach the log, and each is closed for Ray's own actors only:
- the driver's own line (the clean job's scorer pool) is written by Ray's C++ logger to file
  descriptor 2 once per process: `absorb_driver_restart_warning` spends that once on a
  throwaway actor, with descriptor 2 pointed at a file for the instant it takes;
- lines of other processes (Ray Train's controller) that Ray forwards to the driver are
  printed through `sys.stderr`: `RayNoiseFilter` drops them there.

`CLIPCLEANER_RAY_WARNINGS=all` turns both off (the log then shows everything Ray says).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import tempfile
import threading
from typing import TextIO

SHOW_ALL_ENV = "CLIPCLEANER_RAY_WARNINGS"
RESTART_WARNING = re.compile(
    r"core_worker\.cc:\d+: Actor (?:\S+ )?with class name: '(?P<cls>[^']*)' and ID: "
    r"'[0-9a-f]+' has constructor arguments in the object store and max_restarts > 0"
)
# Ray's own actor classes (Ray Data names its map actors MapWorker(<operators>))
RAY_INTERNAL_ACTORS = ("MapWorker(", "PreemptionWatcher", "_AbsorbRestartWarning")


def is_ray_internal_restart_warning(line: str) -> bool:
    """Whether `line` is Ray's max_restarts warning about one of Ray's own actors."""
    match = RESTART_WARNING.search(line)
    return bool(match) and match.group("cls").startswith(RAY_INTERNAL_ACTORS)


def showing_everything() -> bool:
    return os.environ.get(SHOW_ALL_ENV, "").lower() == "all"


class RayNoiseFilter(io.TextIOBase):
    """A text stream that passes every line to `target` except Ray's restart warnings
    about its own actors. Text is held until its line is complete (print writes a line in
    pieces); `flush` passes what is held."""

    def __init__(self, target: TextIO):
        super().__init__()
        self.target = target
        self.pending = ""
        self.lock = threading.Lock()

    def write(self, text: str) -> int:
        with self.lock:
            self.pending += text
            *lines, self.pending = self.pending.split("\n")
            kept = [line + "\n" for line in lines if not is_ray_internal_restart_warning(line)]
            if kept:
                self.target.write("".join(kept))
        return len(text)

    def flush(self) -> None:
        with self.lock:
            if self.pending and not is_ray_internal_restart_warning(self.pending):
                self.target.write(self.pending)
            self.pending = ""
        self.target.flush()

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return self.target.isatty()

    def fileno(self) -> int:
        return self.target.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.target, "encoding", "utf-8")


def filter_forwarded_lines() -> None:
    """Route sys.stderr (where Ray prints other processes' forwarded error lines) through
    RayNoiseFilter, once."""
    if not showing_everything() and not isinstance(sys.stderr, RayNoiseFilter):
        sys.stderr = RayNoiseFilter(sys.stderr)


@contextlib.contextmanager
def descriptor_2_captured():
    """File descriptor 2 pointed at a temporary file for the block; what was written to it
    that is not Ray's warning about its own actors is written to the real one afterwards."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            text = capture.read().decode(errors="replace")
            kept = [ln for ln in text.splitlines(True) if not is_ray_internal_restart_warning(ln)]
            if kept:
                os.write(2, "".join(kept).encode())


def absorb_driver_restart_warning() -> None:
    """Spend this process's one restart warning (Ray logs it once per process) on a
    throwaway actor, unseen, so that the scorer pool's does not reach the log. Call right
    after ray.init, before any actor is created. The actor is killed at once."""
    if showing_everything():
        return
    import ray

    absorbing = ray.remote(num_cpus=0, max_restarts=1)(_AbsorbRestartWarning)
    reference = ray.put(0)
    with descriptor_2_captured():
        actor = absorbing.remote([reference])  # the warning is logged here
    ray.kill(actor, no_restart=True)


class _AbsorbRestartWarning:
    """A restartable actor whose constructor takes a reference: Ray warns on its creation."""

    def __init__(self, refs: list) -> None:
        self.refs = refs
