"""Clean, then train: the cleaning job's manifest feeds MixFix in one submission.

    python -m jobs.pipeline --clean-config configs/demo.yaml --train-config configs/train-demo.yaml \
        [clean.key=value ...] [train.key=value ...]

The config has two sections, `clean` and `train` (one --config YAML holding both, or a
file for each). The training run reads the shards the clean job read and the manifest it
wrote, so train.data.input, train.data.manifest and train.data.classes come from the
clean section.
"""

from __future__ import annotations

from typing import Any

from cleaner.config import CleanJobConfig, StrictModel, set_key
from jobs.cli import COMMANDS, train_interrupted
from jobs.command import JobInterrupted, run_command, run_main
from training.config import TrainJobConfig


class PipelineConfig(StrictModel):
    """The clean job's config, then the train job's."""

    clean: CleanJobConfig
    train: TrainJobConfig


def link_train_to_clean(data: dict[str, Any]) -> None:
    """Set train.data.{input,classes,manifest} from the clean section (before validation)."""
    clean, train = data.get("clean"), data.setdefault("train", {})
    if not isinstance(clean, dict) or not isinstance(train, dict):
        return  # validation names the bad section
    clean_data = clean.get("data") if isinstance(clean.get("data"), dict) else {}
    linked = {
        "data.input": clean_data.get("input"),
        "data.classes": clean_data.get("classes"),
        "data.manifest": clean.get("output"),
    }
    for key, value in linked.items():
        if value is not None:
            set_key(train, key, value)


def run_pipeline(cfg: PipelineConfig) -> dict:
    from jobs.clean import run_clean
    from jobs.train import run_train

    run_clean(cfg.clean)
    try:
        return run_train(cfg.train)
    except KeyboardInterrupt:
        line = train_interrupted(cfg.train)
        raise JobInterrupted(f"the clean job had finished ({cfg.clean.output}); {line}") from None


def main(argv: list[str] | None = None) -> int:
    return run_command(COMMANDS["pipeline"], argv, prog="python -m jobs.pipeline")


if __name__ == "__main__":
    run_main(main)
