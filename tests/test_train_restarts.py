"""A run whose Ray Train controller gave up on a lost worker is fitted again (training.restarts);
an error of the training code is not. The errors are the ones Ray raised in a chaos trial
(docs/reliability.md): a worker's node killed while its new worker group launched."""

from __future__ import annotations

import pytest
from ray.exceptions import ActorUnavailableError
from ray.train import ControllerError

from training.restarts import fit_resuming, lost_worker


def lost() -> ControllerError:
    return ControllerError(ActorUnavailableError("RpcError: Connection reset by peer", b"0" * 16))


def code_error() -> ControllerError:
    return ControllerError(ValueError("a bug in a callback"))


class Trainer:
    """Stands for TorchTrainer: each fit takes the next outcome (a function that makes the
    error to raise, or the result to return)."""

    def __init__(self, outcomes: list):
        self.outcomes = outcomes

    def fit(self):
        outcome = self.outcomes.pop(0)
        if callable(outcome):
            raise outcome()
        return outcome


def test_lost_workers_are_told_from_code_errors():
    assert lost_worker(lost())
    assert not lost_worker(code_error())
    assert not lost_worker(ActorUnavailableError("not through the controller", b"0" * 16))


def test_a_run_is_fitted_again_while_it_only_lost_workers_and_up_to_its_retries():
    outcomes, said = [lost, lost, "result"], []
    assert fit_resuming(lambda: Trainer(outcomes), retries=2, log=said.append) == "result"
    assert len(said) == 2 and "(2/2)" in said[-1] and "Connection reset by peer" in said[0]

    outcomes = [lost, lost, "result"]
    with pytest.raises(ControllerError):  # out of retries: the run's error is raised
        fit_resuming(lambda: Trainer(outcomes), retries=1, log=said.append)
    assert outcomes == ["result"]
    outcomes = [lost] * 5 + ["ok"]
    assert fit_resuming(lambda: Trainer(outcomes), retries=-1, log=said.append) == "ok"


def test_an_error_in_the_training_code_is_never_fitted_again():
    outcomes = [code_error, "result"]
    with pytest.raises(ControllerError):
        fit_resuming(lambda: Trainer(outcomes), retries=3, log=print)
    assert outcomes == ["result"]  # no second fit
    outcomes = [lambda: RuntimeError("worker group error"), "result"]
    with pytest.raises(RuntimeError):
        fit_resuming(lambda: Trainer(outcomes), retries=3)
    assert outcomes == ["result"]
