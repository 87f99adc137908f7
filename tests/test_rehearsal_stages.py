"""The rehearsal's --from-stage: which stages run again (benchmarks.scale_rehearsal)."""

from __future__ import annotations

import pytest

from benchmarks.scale_rehearsal import STAGES, stages_from


def test_every_stage_runs_without_a_first_stage() -> None:
    assert stages_from(None) == dict.fromkeys(STAGES, True)


def test_a_rerun_from_training_skips_the_stages_whose_outputs_it_reads() -> None:
    assert stages_from("train") == {
        "make_shards": False, "inspect": False, "clean": False, "train": True, "export": True,
    }  # fmt: skip
    assert [name for name, ran in stages_from("export").items() if ran] == ["export"]


def test_an_unknown_stage_is_refused() -> None:
    with pytest.raises(
        ValueError,
        match="unknown stage 'score'; the stages: make_shards, inspect, clean, train, export",
    ):
        stages_from("score")
