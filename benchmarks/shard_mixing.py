"""Shards that train well: class-sorted shards read in one order vs spread shards read in a
new order each epoch, on a class-sorted ImageFolder made from the demo data.

    make demo-data
    python -m benchmarks.shard_mixing --data data/demo --work runs/shard-mixing \\
        --out runs/shard-mixing/result.json [--epochs 12] [--workers 1]

The demo's training images are written as an ImageFolder (`<class>/<key>.jpg`, the noisy
label as the folder: listed class by class, like ImageFolder or WebVision), then:

  before  make_shards spread_classes=false (shards hold one or two classes each), and
          training reads the shards in the manifest's order (data.shuffle_shards=false)
  after   the defaults: make_shards spreads the classes over the shards, and each epoch
          reads the shards in its own seeded order

For each: jobs.make_shards, the clean job (configs/demo.yaml), the mean number of distinct
classes per training batch over two epochs of the training job's real stream (with its
local shuffle buffer, as one worker sees it), and the final test accuracy of `clean_only`
trained by the Ray training job (configs/train-demo.yaml, `--epochs`, `--workers`). The
two mixed settings (sorted shards read in a new order, spread shards in one order) get the
classes-per-batch figure only.
"""

from __future__ import annotations

import argparse
import json
import os
import tarfile
import time
from pathlib import Path

import numpy as np

from benchmarks.train_modes import clean_once, train_once
from cleaner.config import MakeShardsConfig, load_config
from cleaner.reading.ingest import make_shards
from cleaner.reading.shards import split_member_name
from cleaner.selection.manifest import manifest_file
from jobs.common import load_class_spec
from training.config import TrainJobConfig
from training.data import (
    load_sample_index,
    repetition_factors,
    start_epoch_state_store,
    training_stream,
)
from training.loop import initial_state

# setting -> (make_shards spread_classes, data.shuffle_shards, trained?)
SETTINGS = {
    "before": (False, False, True),
    "sorted shards, new order each epoch": (False, True, False),
    "spread shards, one order": (True, False, False),
    "after": (True, True, True),
}


def class_sorted_imagefolder(train: Path, root: Path, names: list[str]) -> Path:
    """The demo's training images as `root/<class>/<key>.jpg` (the given label's class);
    returns the class-names file (label order), so labels keep the demo's numbering."""
    for shard in sorted(train.glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: m for m in tar if m.isfile()}
            for name, member in members.items():
                key, ext = split_member_name(name)
                if ext != "jpg":
                    continue
                label = int(tar.extractfile(members[f"{key}.cls"]).read())
                target = root / names[label] / f"{key.replace('/', '_')}.jpg"
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(member).read())
    names_file = root.parent / "classes.txt"
    names_file.write_text("\n".join(names) + "\n")
    return names_file


def shards_for(images: Path, names_file: Path, out: Path, spread: bool, size: int) -> dict:
    cfg = load_config(
        None,
        [
            "layout=imagefolder",
            f"input={images}",
            f"output={out}",
            f"class_names={names_file}",
            f"shard_size={size}",
            f"spread_classes={str(spread).lower()}",
        ],
        MakeShardsConfig,
    )
    return make_shards(cfg, log=lambda _: None)


def classes_per_shard(folder: Path) -> float:
    counts = []
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            counts.append(len({tar.extractfile(m).read() for m in tar if m.name.endswith(".cls")}))
    return float(np.mean(counts))


def classes_per_batch(cfg: TrainJobConfig, names: list[str], epochs: int = 2) -> float:
    """Mean distinct targets per batch of the training job's stream over `epochs` epochs
    (clean_only's class-balanced repetition, the job's local shuffle buffer)."""
    import ray

    index = load_sample_index(manifest_file(cfg.data.manifest))
    store = start_epoch_state_store()
    stream = training_stream(index, cfg, names, store)
    state = initial_state(index, "clean_only")
    counts = []
    for epoch in range(epochs):
        selected = state.selected & index.trainable
        arrays = {
            "repeat": repetition_factors(selected, state.current_labels, True),
            "labels": state.current_labels,
        }
        ray.get(store.publish.remote(epoch, arrays))  # by value: the store puts them
        for batch in stream.iter_batches(
            batch_size=cfg.optim.batch_size // cfg.scaling.num_workers,
            drop_last=True,
            local_shuffle_buffer_size=cfg.data.shuffle_buffer or None,
            local_shuffle_seed=cfg.seed * 1000 + epoch * 10,
        ):
            counts.append(len(np.unique(batch["target"])))
    return float(np.mean(counts))


def start_ray(num_cpus: int, attempts: int = 4) -> None:
    """A local Ray of our own; a loaded host can take minutes to register the node."""
    import ray

    os.environ.setdefault("RAY_raylet_start_wait_time_s", "300")
    for attempt in range(1, attempts + 1):
        try:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False)
            return
        except Exception as err:  # the node's start timed out: try again
            ray.shutdown()
            print(f"[shard_mixing] Ray did not start ({err}); attempt {attempt}", flush=True)
            if attempt == attempts:
                raise


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/demo", help="demo data: train/ and test/")
    parser.add_argument("--work", default="runs/shard-mixing")
    parser.add_argument("--out", default="runs/shard-mixing/result.json")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--workers", type=int, default=1, help="training workers")
    parser.add_argument("--shard-size", type=int, default=500)
    parser.add_argument("--ray-cpus", type=int, default=4)
    args = parser.parse_args(argv)
    import ray

    # what benchmarks.train_modes' helpers read
    args.clean_config, args.train_config, args.engine = (
        "configs/demo.yaml",
        "configs/train-demo.yaml",
        "ray",
    )
    load = os.getloadavg()
    data, work = Path(args.data), Path(args.work)
    names = load_class_spec("demo").names
    images = work / "imagefolder"
    names_file = work / "classes.txt"
    if not names_file.exists():
        names_file = class_sorted_imagefolder(data / "train", images, names)
    start_ray(args.ray_cpus)
    results: dict = {"settings": {}, "command": "python -m benchmarks.shard_mixing"}
    try:
        prepared: dict[bool, tuple[Path, str]] = {}
        for spread in (False, True):
            root = work / ("spread" if spread else "sorted")
            shards_for(images, names_file, root / "train", spread, args.shard_size)
            if not (root / "test").exists():
                (root / "test").symlink_to((data / "test").resolve())
            manifest, _ = clean_once(args, root, root)
            prepared[spread] = (root, manifest)
        for setting, (spread, shuffle, trained) in SETTINGS.items():
            root, manifest = prepared[spread]
            args.set = [
                f"data.shuffle_shards={str(shuffle).lower()}",
                f"scaling.num_workers={args.workers}",
            ]
            overrides = [
                f"data.input={root / 'train'}",
                f"data.manifest={manifest}",
                f"run.storage={root / 'train-runs'}",
                *args.set,
            ]
            cfg = load_config(args.train_config, overrides, TrainJobConfig)
            row = {
                "classes_per_shard": classes_per_shard(root / "train"),
                "classes_per_batch": classes_per_batch(cfg, names),
            }
            if trained:
                run_dir = root / ("shuffled" if shuffle else "ordered")
                started = time.perf_counter()
                history = train_once(args, root, manifest, run_dir, "clean_only", 0)["history"]
                row["test_accuracy"] = history[-1].get("test_accuracy")
                row["curve"] = [h.get("test_accuracy") for h in history]
                row["train_seconds"] = round(time.perf_counter() - started, 1)
            results["settings"][setting] = row
            print(f"[shard_mixing] {setting}: {json.dumps(row)}", flush=True)
    finally:
        ray.shutdown()
    results["epochs"], results["workers"] = args.epochs, args.workers
    results["load_average"] = {"start": load, "end": os.getloadavg()}
    print(f"\n{'setting':<38}{'classes/shard':>14}{'classes/batch':>14}{'test acc':>10}")
    for setting, row in results["settings"].items():
        acc = row.get("test_accuracy")
        print(
            f"{setting:<38}{row['classes_per_shard']:>14.2f}{row['classes_per_batch']:>14.2f}"
            f"{'' if acc is None else format(acc, '.4f'):>10}"
        )
    print(f"load average: start {load}, end {os.getloadavg()}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
