"""`clipcleaner`: one command for every job (`clipcleaner <subcommand> --help`).

    clipcleaner demo                                      # demo data (once), then clean it
    clipcleaner make-shards --layout imagefolder --input ./images --output ./shards
    clipcleaner inspect ./shards
    clipcleaner clean --config configs/clean.yaml --input ./shards --output runs/mine
    clipcleaner train --config configs/train-demo.yaml data.manifest=runs/mine
    clipcleaner predict --model DIR --input SHARDS --output FILE.parquet
    clipcleaner export-shards --manifest runs/mine/manifest.parquet --output ./clean

Each subcommand is the job module `python -m jobs.<name>` runs (for `ray job submit`),
with the same arguments: `--config FILE`, its flags, and `key=value` overrides.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

from cleaner.reading import uri as uri_lib
from jobs.command import JobCommand, run_command, run_main


def _count_files(folder: str, suffix: str, skip: str | None = None) -> int:
    """Files ending in `suffix` below a folder, except under `skip/`; 0 when it is missing."""
    if not uri_lib.exists(folder):
        return 0
    files = uri_lib.list_files(folder, suffix)
    return sum(1 for f in files if skip is None or f"/{skip}/" not in f)


def clean_interrupted(cfg) -> str:
    from cleaner.scoring.pipeline import SCORES_DIR

    scores = uri_lib.join(cfg.output, SCORES_DIR)
    kept = _count_files(scores, ".parquet")
    return (
        f"{kept} shard score file(s) kept in {scores}; rerun the same command to reuse them "
        f"and score the rest (resume=true)"
    )


def train_interrupted(cfg) -> str:
    run = uri_lib.join(cfg.run.storage, cfg.run.name)
    kept = _count_files(run, "history.json")
    return (
        f"{kept} checkpoint(s) kept in {run}; rerun with the same run.name ({cfg.run.name}) "
        f"to resume from the last one"
    )


def make_shards_interrupted(cfg) -> str:
    if cfg.dry_run:
        return "a dry run writes nothing; rerun the same command"
    from cleaner.reading.shard_writer import RECORDS_DIR

    records = uri_lib.join(cfg.output, RECORDS_DIR)
    kept = _count_files(records, ".json")
    return (
        f"{kept} finished shard(s) kept in {cfg.output}; rerun the same command to skip "
        f"them and write the rest (resume=true)"
    )


def pipeline_interrupted(cfg) -> str:
    """Ctrl-C while the clean job ran (jobs.pipeline says itself when training was)."""
    return clean_interrupted(cfg.clean) + "; training had not started"


def inspect_interrupted(cfg) -> str:
    return "inspect writes nothing but its report; rerun the same command"


def predict_interrupted(cfg) -> str:
    return f"predictions are not resumed: rerun the same command to write {cfg.output} anew"


def export_interrupted(cfg) -> str:
    kept = _count_files(cfg.output, ".tar")
    return (
        f"{kept} exported shard(s) kept in {cfg.output}; rerun the same command to skip the "
        f"finished ones and write the rest (resume=true)"
    )


COMMANDS: dict[str, JobCommand] = {
    c.name: c
    for c in (
        JobCommand(
            name="demo",
            summary="Generate the demo shards (6,000 shapes, 40% wrong labels) once, then clean "
            "them on a local Ray: runs/demo/report.html.",
            module="jobs.cli",
            config="cleaner.config:CleanJobConfig",
            run="jobs.cli:run_demo",
            flags={"--output": "output"},
            base_config="configs/demo.yaml",
            interrupted=clean_interrupted,
            notes="The demo data is written beside data.input (default data/demo/train and "
            "data/demo/test) unless it is already there.",
        ),
        JobCommand(
            name="make-shards",
            summary="Turn a dataset in its native layout into WebDataset shards + classes.yaml.",
            module="jobs.make_shards",
            config="cleaner.config:MakeShardsConfig",
            run="jobs.make_shards:run_make_shards",
            flags={"--layout": "layout", "--input": "input", "--output": "output"},
            switches={"--dry-run": "dry_run"},
            interrupted=make_shards_interrupted,
        ),
        JobCommand(
            name="inspect",
            summary="Count samples, keys and labels per shard, and what would fail, before a "
            "long run (no image is decoded). Exit status 1 when something would fail.",
            module="jobs.inspect_shards",
            config="cleaner.config:InspectConfig",
            run="jobs.inspect_shards:run_inspect",
            flags={"--classes": "classes", "--json": "json_output", "--threads": "threads"},
            positional="input",
            interrupted=inspect_interrupted,
        ),
        JobCommand(
            name="clean",
            summary="Score every image with CLIP on Ray Data, select the clean labels, write "
            "manifest.parquet, summary.json and report.html.",
            module="jobs.clean",
            config="cleaner.config:CleanJobConfig",
            run="jobs.clean:run_clean",
            flags={
                "--input": "data.input",
                "--classes": "data.classes",
                "--output": "output",
                "--model": "model.name",
                "--pretrained": "model.pretrained",
            },
            interrupted=clean_interrupted,
        ),
        JobCommand(
            name="train",
            summary="Train a classifier on the cleaned labels with MixFix on Ray Train (DDP); "
            "checkpoints every epoch, resumes by run.name.",
            module="jobs.train",
            config="training.config:TrainJobConfig",
            run="jobs.train:run_train",
            flags={
                "--input": "data.input",
                "--manifest": "data.manifest",
                "--test-input": "data.test_input",
                "--classes": "data.classes",
                "--storage": "run.storage",
                "--name": "run.name",
            },
            interrupted=train_interrupted,
        ),
        JobCommand(
            name="pipeline",
            summary="Clean, then train on the result, in one submission.",
            module="jobs.pipeline",
            config="jobs.pipeline:PipelineConfig",
            run="jobs.pipeline:run_pipeline",
            section_files={"--clean-config": "clean", "--train-config": "train"},
            prepare="jobs.pipeline:link_train_to_clean",
            interrupted=pipeline_interrupted,
            notes="train.data.input, train.data.manifest and train.data.classes are taken "
            "from the clean section (the shards it read, the output it wrote).",
        ),
        JobCommand(
            name="predict",
            summary="Run a trained model (the train job's model/ folder) on shards: key, "
            "predicted label and name, confidence, top-5, as Parquet.",
            module="jobs.predict",
            config="training.config:PredictConfig",
            run="jobs.predict:run_predict",
            flags={"--model": "model", "--input": "input", "--output": "output"},
            interrupted=predict_interrupted,
        ),
        JobCommand(
            name="export-shards",
            summary="Write the clean samples of a manifest as WebDataset shards (original "
            "members byte for byte); --relabel adds the noisy ones under their suggestion.",
            module="jobs.export_shards",
            config="cleaner.config:ExportShardsConfig",
            run="jobs.export_shards:run_export",
            flags={"--manifest": "manifest", "--output": "output", "--input": "input"},
            switches={"--relabel": "relabel"},
            interrupted=export_interrupted,
        ),
    )
}


def run_demo(cfg) -> dict:
    """The demo data beside data.input (generated once), then the clean job on it."""
    from jobs.clean import run_clean
    from jobs.make_demo_data import main as make_demo_data

    make_demo_data(["--out", str(demo_data_root(cfg.data.input))])
    return run_clean(cfg)


def demo_data_root(data_input) -> Path:
    """`data/demo` for `data/demo/train`: where make_demo_data writes train/ and test/."""
    from cleaner.config import ConfigError

    if not isinstance(data_input, str) or uri_lib.is_s3(data_input):
        raise ConfigError("demo: data.input must be one local folder ending in /train")
    path = Path(data_input.removeprefix("file://"))
    if path.name != "train":
        raise ConfigError(f"demo: data.input must end in /train (got {data_input})")
    return path.parent


def overview() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [
        "usage: clipcleaner <subcommand> [--config FILE] [flags] [key=value ...]",
        "",
        "Clean noisy image labels with CLIP (CLIPCleaner) on Ray, train on the result.",
        "",
        "subcommands:",
        *(
            textwrap.fill(
                f"  {name:<{width}}  {c.summary}", 92, subsequent_indent=" " * (width + 4)
            )
            for name, c in COMMANDS.items()
        ),
        "",
        "`clipcleaner <subcommand> --help` lists its flags and every config key with its",
        "default and bounds. `python -m <module>` runs the same job (for `ray job submit`).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """The console script: dispatch to a subcommand, exit with its status."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(overview())
        sys.exit(0 if argv else 2)
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"clipcleaner: unknown subcommand {name!r}\n\n{overview()}", file=sys.stderr)
        sys.exit(2)
    run_main(lambda: run_command(COMMANDS[name], rest))


if __name__ == "__main__":
    main()
