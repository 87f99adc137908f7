"""Ray's restart warning about its own actors stays out of a job's log (jobs/ray_noise.py);
every other line, ours included, gets through."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap

import pytest

from jobs.ray_noise import SHOW_ALL_ENV, RayNoiseFilter, is_ray_internal_restart_warning

WARNING = (
    "[2026-12-07 05:33:03,760 E 19073 19073] core_worker.cc:2465: Actor with class name: "
    "'{cls}' and ID: 'a9468f6fd220d1fa758101b004000000' has constructor arguments in the "
    "object store and max_restarts > 0. If the arguments in the object store go out of scope "
    "or are lost, the actor restart will fail. See "
    "https://github.com/ray-project/ray/issues/53727 for more details."
)
FORWARDED = "\x1b[36m(TrainController pid=22499)\x1b[0m " + WARNING


def test_only_rays_own_actors_warnings_are_recognised():
    assert is_ray_internal_restart_warning(WARNING.format(cls="MapWorker(MapBatches(Scorer))"))
    assert is_ray_internal_restart_warning(FORWARDED.format(cls="PreemptionWatcher"))
    # a warning about an actor of ours is something to act on: it stays
    assert not is_ray_internal_restart_warning(WARNING.format(cls="EpochStateStore"))
    assert not is_ray_internal_restart_warning("[score] 8/8 shards, 2,000 samples")


def test_the_filter_drops_those_lines_and_passes_the_rest_whole():
    target = io.StringIO()
    stream = RayNoiseFilter(target)
    stream.write("[clean] 8 shards")  # print writes a line in pieces
    stream.write("\n")
    stream.write(FORWARDED.format(cls="PreemptionWatcher") + "\nkept ")
    stream.write(WARNING.format(cls="EpochStateStore") + "\n")
    stream.write("no newline yet")
    assert (
        target.getvalue()
        == "[clean] 8 shards\nkept " + WARNING.format(cls="EpochStateStore") + "\n"
    )
    stream.flush()
    assert target.getvalue().endswith("no newline yet")


PROBE = textwrap.dedent(
    """
    import ray
    from jobs.ray_noise import absorb_driver_restart_warning

    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    absorb_driver_restart_warning()

    @ray.remote(num_cpus=0, max_restarts=1)
    class ScorerLike:  # a restartable actor whose constructor takes a reference
        def __init__(self, refs):
            self.refs = refs

        def ping(self):
            return len(self.refs)

    actor = ScorerLike.remote([ray.put(1)])
    assert ray.get(actor.ping.remote()) == 1
    print("probe done", flush=True)
    """
)


@pytest.mark.integration
@pytest.mark.parametrize("show_all", [False, True], ids=["filtered", "everything"])
def test_the_drivers_once_per_process_warning_is_absorbed_unseen(show_all):
    """Ray logs the warning once per process, from C++ to descriptor 2: the absorbing actor
    takes that once out of sight, and the actor created after it works and prints none.
    With CLIPCLEANER_RAY_WARNINGS=all the same script shows it (the check can fail)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env[SHOW_ALL_ENV] = "all" if show_all else ""
    done = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "probe done" in done.stdout
    warned = "has constructor arguments in the object store" in done.stderr
    assert warned == show_all, done.stderr[-3000:]
    assert "_AbsorbRestartWarning" not in done.stderr  # the throwaway actor went unnoticed
