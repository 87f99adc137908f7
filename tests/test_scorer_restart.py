"""A scorer actor whose process dies is restarted by Ray with its constructor's data.

Ray logs `... MapWorker(MapBatches(ClipScorer)) has constructor arguments in the object
store and max_restarts > 0 ...` for every scoring pool: Ray Data passes each pool actor
its DataContext and its map function (ClipScorer and its constructor's keywords, the prompt
bank's reference among them) as objects the driver put. A restart re-runs the constructor
with them, so it works while the driver holds them, on the driver's node (see
docs/reliability.md). This test kills a scorer's process on its first batch and checks
that Ray restarted the same actor, that the restarted constructor got the prompt bank, and
that every sample was scored once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from cleaner.classes import DEMO_CLASS_SPEC, ClassSpec
from cleaner.scoring import pipeline as pipeline_module
from cleaner.scoring.pipeline import score_shards, shard_output_names
from cleaner.scoring.text_features import encode_text_features_here
from tests.conftest import clean_config

pytestmark = pytest.mark.integration


def dies_once_scorer(records: str):
    """The job's scorer actor (ClipScorerWriter: a ClipScorer that writes its shards' score
    files) that writes down each construction (pid, actor, restarted, the bank's checksum)
    and kills its own process on its first batch, once. Defined in a function: Ray ships
    the class by value, `records` with it."""
    import ray

    class DiesOnceScorer(pipeline_module.ClipScorerWriter):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            context = ray.get_runtime_context()
            entry = {
                "pid": os.getpid(),
                "actor": context.get_actor_id(),
                "restarted": context.was_current_actor_reconstructed,
                "bank_sum": float(self.scorer.text.double().sum()),
            }
            Path(records, f"init-{os.getpid()}.json").write_text(json.dumps(entry))

        def __call__(self, batch):
            marker = Path(records, "died")
            if not marker.exists():
                marker.write_text(str(os.getpid()))
                os._exit(1)  # the process dies mid-task, as when its node is lost
            return super().__call__(batch)

    return DiesOnceScorer


def test_a_restarted_scorer_gets_its_prompt_bank_and_scores_every_sample(
    local_ray, demo_shards, tmp_path, monkeypatch
):
    records = tmp_path / "records"
    records.mkdir()
    monkeypatch.setattr(pipeline_module, "ClipScorerWriter", dies_once_scorer(str(records)))
    shards = sorted(str(p) for p in demo_shards.glob("*.tar"))[:2]
    cfg = clean_config(str(demo_shards), str(tmp_path / "run"), batch_size=50)
    spec = ClassSpec.load(DEMO_CLASS_SPEC)
    text = encode_text_features_here(cfg.model.model_dump(), spec.prompts())
    scores = str(tmp_path / "scores")

    bank = local_ray.put(text.bank)
    stats = score_shards(cfg, shards, bank, spec.names, text.image_size, scores, "fp", text.resize)

    inits = sorted(
        (json.loads(p.read_text()) for p in records.glob("init-*.json")),
        key=lambda entry: entry["restarted"],
    )
    died = int((records / "died").read_text())
    assert [entry["restarted"] for entry in inits] == [False, True], inits
    first, restarted = inits
    assert first["pid"] == died != restarted["pid"]  # a new process ...
    assert first["actor"] == restarted["actor"]  # ... of the same actor, restarted by Ray
    expected = float(np.asarray(text.bank.features, dtype=np.float64).sum())
    assert restarted["bank_sum"] == pytest.approx(expected, rel=1e-6)  # the bank reached it
    names = shard_output_names(shards)
    for shard in shards:
        table = pq.read_table(Path(scores, names[shard]), columns=["shard_pos"])
        positions = sorted(table.column("shard_pos").to_pylist())
        assert positions == list(range(100)), shard  # every sample of the shard, once
    assert stats.samples_scored == 200
