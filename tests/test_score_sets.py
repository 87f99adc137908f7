"""Training and test shards scored in one pass: one scorer pool, each set's files in its
own folder, each set's counts; a shard in two sets is scored once per set."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from cleaner.classes import DEMO_CLASS_SPEC, ClassSpec
from cleaner.scoring.pipeline import score_shard_sets, shard_output_names
from cleaner.scoring.text_features import encode_text_features_here
from tests.conftest import clean_config

pytestmark = pytest.mark.integration


def test_two_sets_are_scored_in_one_pass_into_their_own_folders(
    local_ray, demo_shards, tmp_path, capsys
):
    shards = sorted(str(p) for p in demo_shards.glob("*.tar"))
    train, test = shards[:2], shards[2:3]
    cfg = clean_config(str(demo_shards), str(tmp_path / "run"), "resume=true", batch_size=50)
    spec = ClassSpec.load(DEMO_CLASS_SPEC)
    text = encode_text_features_here(cfg.model.model_dump(), spec.prompts())
    bank = local_ray.put(text.bank)
    train_dir, test_dir = str(tmp_path / "scores"), str(tmp_path / "test_scores")
    sets = {train_dir: train, test_dir: test}
    stats = score_shard_sets(cfg, sets, bank, spec.names, text.image_size, "fp", text.resize)

    out = capsys.readouterr().out
    assert out.count("[score] scorers:") == 1  # one pool for both sets
    for folder, its_shards in sets.items():
        names = shard_output_names(its_shards)
        files = sorted(p.name for p in Path(folder).glob("*.parquet"))
        assert files == sorted(names.values())  # each set's files in its own folder only
        for shard in its_shards:
            table = pq.read_table(Path(folder, names[shard]), columns=["shard", "shard_pos"])
            assert set(table.column("shard").to_pylist()) == {shard}
            assert sorted(table.column("shard_pos").to_pylist()) == list(range(100))
    assert (stats[train_dir].samples_scored, stats[test_dir].samples_scored) == (200, 100)
    assert stats[train_dir].shards_scored == 2 and stats[test_dir].shards_total == 1
    assert stats[train_dir].seconds == stats[test_dir].seconds  # the one pass's time
    assert stats[train_dir].images_per_second == pytest.approx(300 / stats[train_dir].seconds)

    again = score_shard_sets(cfg, sets, bank, spec.names, text.image_size, "fp", text.resize)
    assert [(s.shards_skipped, s.samples_scored) for s in again.values()] == [(2, 0), (1, 0)]
    assert "[score] scorers:" not in capsys.readouterr().out  # nothing left: no pool

    both = {str(tmp_path / "a"): train[:1], str(tmp_path / "b"): train[:1]}  # one shard, twice
    twice = score_shard_sets(cfg, both, bank, spec.names, text.image_size, "fp", text.resize)
    assert capsys.readouterr().out.count("[score] scorers:") == 2  # a pass per set
    assert [s.samples_scored for s in twice.values()] == [100, 100]


def test_a_shard_rewritten_in_place_is_scored_again_not_reused(local_ray, demo_shards, tmp_path):
    """A rerun reuses a score file only for the version of the shard it was scored from:
    a shard rewritten under the same name (here without its last 10 samples) is scored
    again, and its score file then holds exactly the new shard's rows."""
    import shutil
    import tarfile

    from tests.conftest import write_tar

    shards = []
    for source in sorted(demo_shards.glob("*.tar"))[:2]:
        shards.append(str(shutil.copy(source, tmp_path / source.name)))
    cfg = clean_config(str(tmp_path), str(tmp_path / "run"), "resume=true", batch_size=50)
    spec = ClassSpec.load(DEMO_CLASS_SPEC)
    text = encode_text_features_here(cfg.model.model_dump(), spec.prompts())
    bank = local_ray.put(text.bank)
    folder = str(tmp_path / "scores")

    def score() -> dict:
        stats = score_shard_sets(
            cfg, {folder: shards}, bank, spec.names, text.image_size, "fp", text.resize
        )[folder]
        return {"scored": stats.shards_scored, "skipped": stats.shards_skipped}

    assert score() == {"scored": 2, "skipped": 0}
    assert score() == {"scored": 0, "skipped": 2}
    with tarfile.open(shards[0]) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]
    keys = sorted({name.split(".")[0] for name, _ in members})
    kept = set(keys[:-10])
    write_tar(Path(shards[0]), [(n, d) for n, d in members if n.split(".")[0] in kept])
    assert score() == {"scored": 1, "skipped": 1}
    table = pq.read_table(Path(folder, shard_output_names(shards)[shards[0]]), columns=["key"])
    assert set(table.column("key").to_pylist()) == kept
    assert score() == {"scored": 0, "skipped": 2}
