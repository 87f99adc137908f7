"""Shards that train well: make_shards spreads a class-sorted listing over the shards, and
training reads the shards in a different seeded order each epoch."""

from __future__ import annotations

import numpy as np
import pytest

from cleaner.config import MakeShardsConfig, load_config
from cleaner.reading.ingest import list_for, shard_plans
from cleaner.reading.shard_writer import WriteOptions, write_shard
from cleaner.reading.shards import read_shard
from tests.layout_trees import image_bytes, put
from training.data import epoch_order

CLASSES = [f"class{k}" for k in range(10)]


def class_sorted_imagefolder(root, per_class: int = 40):
    """root/<class>/<image>: listed class by class, as ImageFolder and WebVision are."""
    for k, name in enumerate(CLASSES):
        for i in range(per_class):
            put(root, f"{name}/{i:04d}.jpg", image_bytes(k, size=(8, 8)))
    return root


def write_all(cfg: MakeShardsConfig) -> list[list[int]]:
    """Write the planned shards in-process; the labels each shard holds, read back."""
    listing = list_for(cfg)
    labels = []
    for plan in shard_plans(cfg, listing):
        record = write_shard(
            plan,
            root=cfg.input,
            output=cfg.output,
            class_names=listing.class_names,
            options=WriteOptions(),
        )
        assert not record["skipped"] and not record["failures"]
        shard = f"{cfg.output}/{plan['name']}"
        labels.append(
            [
                int(v)
                for b in read_shard(shard, class_names=CLASSES, image_size=8, extensions=["jpg"])
                for v in b["label"]
            ]
        )
    return labels


def config(root, out, *extra: str) -> MakeShardsConfig:
    return load_config(
        None,
        ["layout=imagefolder", f"input={root}", f"output={out}", "shard_size=40", *extra],
        MakeShardsConfig,
    )


def test_make_shards_spreads_a_class_sorted_folder_over_the_shards(tmp_path):
    root = class_sorted_imagefolder(tmp_path / "images")
    spread = write_all(config(root, tmp_path / "spread"))
    sorted_ = write_all(config(root, tmp_path / "sorted", "spread_classes=false"))
    assert [len(set(s)) for s in sorted_] == [1] * 10  # what the listing order gives
    per_shard = [len(set(s)) for s in spread]
    print(f"\nclasses per shard, spread: {per_shard}")
    assert len(spread) == 10 and min(per_shard) >= 8  # 40 random images of 10 classes
    flat = [sorted(label for shard in shards for label in shard) for shards in (spread, sorted_)]
    assert flat[0] == flat[1] and len(flat[0]) == 400  # the same images
    # deterministic: a rerun plans the same shards (so it skips the finished ones)
    cfg = config(root, tmp_path / "spread")
    again = shard_plans(cfg, list_for(cfg))
    assert again == shard_plans(cfg, list_for(cfg))
    kwargs = {"root": cfg.input, "output": cfg.output, "options": WriteOptions()}
    assert all(write_shard(p, class_names=CLASSES, **kwargs)["skipped"] for p in again)
    other = config(root, tmp_path / "o", "seed=1")
    assert shard_plans(other, list_for(other)) != again


def test_each_epoch_reads_the_shards_in_its_own_seeded_order():
    orders = [epoch_order(seed=0, epoch=e, count=12) for e in range(5)]
    assert all(sorted(o) == list(range(12)) for o in orders)
    assert len({tuple(o) for o in orders}) == 5  # a new order every epoch
    np.testing.assert_array_equal(orders[3], epoch_order(seed=0, epoch=3, count=12))  # resume
    assert not np.array_equal(orders[0], epoch_order(seed=1, epoch=0, count=12))


@pytest.mark.integration
@pytest.mark.parametrize("cache_decoded", [False, True])
def test_the_training_stream_follows_the_epoch_order(local_ray, tmp_path, cache_decoded):
    """Real Ray Data: with preserve_order, the stream's shards come in epoch_order."""
    import ray

    from cleaner.demo.dataset import write_demo_shards
    from jobs.common import load_class_spec
    from training.config import TrainJobConfig
    from training.data import SampleIndex, start_epoch_state_store, training_stream

    shards_dir = tmp_path / "shards"
    write_demo_shards(shards_dir, 24, samples_per_shard=4, noise="none", seed=3)
    shards = sorted(str(p) for p in shards_dir.glob("*.tar"))
    n = 4 * len(shards)
    index = SampleIndex(
        shards=shards,
        offsets={s: 4 * i for i, s in enumerate(shards)},
        labels=np.zeros(n, dtype=np.int64),
        is_clean=np.ones(n, dtype=bool),
        trainable=np.ones(n, dtype=bool),
        true_labels=None,
    )
    cfg = load_config(
        None,
        [
            f"data.input={shards_dir}",
            "data.manifest=unused",
            "data.classes=demo",
            f"data.cache_decoded={str(cache_decoded).lower()}",
            "data.read_batch_size=4",
            "network.name=tiny_cnn",
            "run.storage=unused",
        ],
        TrainJobConfig,
    )
    store = start_epoch_state_store()
    context = ray.data.DataContext.get_current()
    preserve = context.execution_options.preserve_order
    context.execution_options.preserve_order = True
    try:
        stream = training_stream(index, cfg, load_class_spec("demo").names, store)
        # the policy that deadlocked the 1M rehearsal's split epoch is off for this stream
        # alone (training.data.without_downstream_capacity_backpressure)
        assert stream.context.downstream_capacity_backpressure_ratio is None
        assert context.downstream_capacity_backpressure_ratio is not None
        seen = []
        for epoch in range(2):
            state = {"repeat": np.ones(n), "labels": np.zeros(n, dtype=np.int64)}
            ray.get(store.publish.remote(epoch, state))  # the arrays by value, as rank 0 sends them
            ids = np.concatenate([b["sample_id"] for b in stream.iter_batches(batch_size=None)])
            seen.append(list(dict.fromkeys(int(i) // 4 for i in ids)))  # shards, in order read
    finally:
        context.execution_options.preserve_order = preserve
    if not cache_decoded:  # one block per shard: the order is the epoch's shard order
        assert seen == [list(epoch_order(cfg.seed, e, len(shards))) for e in range(2)]
    assert seen[0] != seen[1] and sorted(seen[0]) == list(range(len(shards)))
