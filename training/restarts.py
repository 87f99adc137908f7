"""Fitting a Ray Train run again when its controller gave up on a lost node.

Ray Train restarts a failed worker group from the last checkpoint (run.max_failures), but
in Ray 2.60 a worker that dies in one window of the group's start (after the workers are
set up, while the train function is launched on them: `WorkerGroup._start_impl`) reaches
the controller as a bare `RayActorError`, which its failure policy does not retry: the
whole run fails with `ControllerError`. That is what losing a node at that moment looks
like, so the run is fitted again, and resumes from its last checkpoint (the run's
checkpoint manager keeps them in its storage).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def lost_worker(error: BaseException) -> bool:
    """Whether a failed run's error is Ray Train's controller giving up on a worker actor
    that died (its node lost), rather than on an error in the training code."""
    from ray.exceptions import RayActorError
    from ray.train import ControllerError

    return isinstance(error, ControllerError) and isinstance(
        error.controller_failure, RayActorError
    )


def fit_resuming(
    make_trainer: Callable[[], Any], retries: int, log: Callable[[str], None] = print
) -> Any:
    """`make_trainer().fit()`, fitted again (a new trainer, the same run) up to `retries`
    times (-1: without limit) while it fails only because a worker died (`lost_worker`)."""
    attempt = 0
    while True:
        try:
            return make_trainer().fit()
        except Exception as error:
            if not lost_worker(error) or attempt == retries:
                raise
            attempt += 1
            log(
                f"[train] a worker was lost as its group started ({error.controller_failure!r:.200}):"
                f" fitting the run again from its last checkpoint ({attempt}/{retries})"
            )
