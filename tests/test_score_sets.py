"""Training and test shards scored in one pass: one scorer pool, each set's files in its
own folder, each set's counts; a shard in two sets is scored once per set; a shard
rewritten in place is scored again on a rerun."""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from cleaner.classes import DEMO_CLASS_SPEC, ClassSpec
from cleaner.scoring.pipeline import score_shard_sets, shard_output_names
from cleaner.scoring.text_features import encode_text_features_here
from tests.conftest import clean_config, write_tar

pytestmark = pytest.mark.integration


def test_two_sets_are_scored_in_one_pass_into_their_own_folders(
    local_ray, demo_shards, tmp_path, capsys
):
    (tmp_path / "shards").mkdir()
    shards = [
        str(shutil.copy(p, tmp_path / "shards" / p.name))
        for p in sorted(demo_shards.glob("*.tar"))[:3]
    ]
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

    # A shard rewritten in place (here without its last 10 samples) is scored again, not
    # reused: a score file is reused only for the version of the shard it was scored from.
    with tarfile.open(train[0]) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]
    keys = sorted({name.split(".")[0] for name, _ in members})
    kept = set(keys[:-10])
    write_tar(Path(train[0]), [(n, d) for n, d in members if n.split(".")[0] in kept])
    train_only = {train_dir: train}
    rewritten = score_shard_sets(
        cfg, train_only, bank, spec.names, text.image_size, "fp", text.resize
    )[train_dir]
    assert (rewritten.shards_scored, rewritten.shards_skipped) == (1, 1)
    assert "1 shard(s) changed since they were scored" in capsys.readouterr().out
    table = pq.read_table(Path(train_dir, shard_output_names(train)[train[0]]), columns=["key"])
    assert set(table.column("key").to_pylist()) == kept
    again = score_shard_sets(cfg, train_only, bank, spec.names, text.image_size, "fp", text.resize)
    assert again[train_dir].shards_skipped == 2
