"""training.local without Ray: a short in-process run on real demo shards and a manifest
whose rows follow the shards, with the CLIP guard on."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cleaner.config import load_config
from cleaner.demo.dataset import write_demo_shards
from cleaner.reading import uri as uri_lib
from cleaner.reading.shards import read_shard
from cleaner.scoring.writing import fixed_size_list_array
from jobs.common import load_class_spec
from training.config import TrainJobConfig
from training.data import load_sample_index
from training.local import run_local


@pytest.fixture(autouse=True)
def restore_torch_threads():
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


def write_manifest(path, shards, class_names) -> tuple[np.ndarray, np.ndarray]:
    """Rows in shard order; clean = the given label is true; CLIP's top-1 = the true label."""
    cols = {"shard": [], "shard_pos": [], "label": [], "true_label": []}
    for shard in shards:
        for batch in read_shard(shard, class_names=class_names, image_size=8, extensions=["jpg"]):
            for name in cols:
                cols[name] += list(batch[name])
    label, true = np.array(cols["label"]), np.array(cols["true_label"])
    other = (true + 1) % len(class_names)
    table = pa.table(
        {
            **cols,
            "is_clean": label == true,
            "status": ["clean"] * len(label),
            "topk_labels_zeroshot": fixed_size_list_array(np.stack([true, other], axis=1)),
        }
    )
    pq.write_table(table, path)
    return label, true


def test_local_run_keeps_the_guarded_set_clean(tmp_path):
    train, test = tmp_path / "train", tmp_path / "test"
    write_demo_shards(train, 160, samples_per_shard=80, noise="symmetric", noise_rate=0.5, seed=1)
    write_demo_shards(test, 40, samples_per_shard=40, noise="none", seed=2)
    names = load_class_spec("demo").names
    shards = uri_lib.expand_shard_spec(str(train))
    manifest = tmp_path / "manifest.parquet"
    label, true = write_manifest(manifest, shards, names)
    assert (label != true).any() and (label == true).any()
    cfg = load_config(
        "configs/train-demo.yaml",
        [
            f"data.input={train}",
            f"data.manifest={manifest}",
            f"data.test_input={test}",
            f"run.storage={tmp_path / 'runs'}",
            "optim.epochs=2",
            "optim.batch_size=32",
            "mixfix.mode=mixfix_clip",
            "mixfix.theta_r=0.0",
            "mixfix.theta_r2=0.0",
        ],
        TrainJobConfig,
    )
    index = load_sample_index(str(manifest), zeroshot_topk=1)
    tests = uri_lib.expand_shard_spec(str(test))
    history = run_local(cfg, index, names, tests, log=lambda m: None)
    assert [h["epoch"] for h in history] == [1, 2]
    # Thresholds 0: the paper's rule would take every sample at the network's label; the
    # guard admits only labels CLIP's top-1 (here the true label) backs, so the set grows
    # beyond the clean set and stays exactly clean.
    assert all(h["selected"] > int((label == true).sum()) for h in history)
    assert all(h["selected_precision"] == 1.0 for h in history)
    assert all(0.0 <= h["test_accuracy"] <= 1.0 for h in history)
    # Shards that do not match the manifest are refused, not silently misaligned.
    with pytest.raises(ValueError, match="shards hold 80 samples, the manifest 160"):
        run_local(cfg, replace(index, shards=shards[:1]), names, [], log=lambda m: None)
