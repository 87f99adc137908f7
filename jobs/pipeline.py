"""Clean, then train: the cleaning job's manifest feeds MixFix in one submission.

    python -m jobs.pipeline --clean-config configs/demo.yaml --train-config configs/train-demo.yaml \
        [clean.key=value ...] [train.key=value ...]

The training run reads the shards the clean job read and the manifest it wrote, so
train.data.input and train.data.manifest are set from the clean config.
"""

from __future__ import annotations

import argparse

from cleaner.config import CleanJobConfig, ConfigError, load_config
from jobs.clean import run_clean
from jobs.common import run_main
from jobs.train import run_train
from training.config import TrainJobConfig


def split_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """`clean.a=1 train.b=2` -> (['a=1'], ['b=2']); anything else is an error naming it."""
    clean, train = [], []
    for item in overrides:
        head, _, rest = item.partition(".")
        if head == "clean" and rest:
            clean.append(rest)
        elif head == "train" and rest:
            train.append(rest)
        else:
            raise ConfigError(f"override {item!r} must start with 'clean.' or 'train.'")
    return clean, train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Clean the labels, then train on them.")
    parser.add_argument("--clean-config", required=True)
    parser.add_argument("--train-config", required=True)
    parser.add_argument("overrides", nargs="*", help="clean.key=value / train.key=value")
    args = parser.parse_args(argv)
    clean_overrides, train_overrides = split_overrides(args.overrides)
    clean_cfg = load_config(args.clean_config, clean_overrides, CleanJobConfig)
    inputs = clean_cfg.data.input
    linked = [
        f"data.manifest={clean_cfg.output}",
        f"data.classes={clean_cfg.data.classes}",
        "data.input=" + (inputs if isinstance(inputs, str) else "[" + ", ".join(inputs) + "]"),
    ]
    train_cfg = load_config(args.train_config, [*train_overrides, *linked], TrainJobConfig)
    run_clean(clean_cfg)
    run_train(train_cfg)
    return 0


if __name__ == "__main__":
    run_main(main)
