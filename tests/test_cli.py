"""`clipcleaner`: one command line for every job; help generated from the config models;
config errors before any heavy import; flags that agree across jobs. No Ray here."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cleaner.config import CleanJobConfig, ConfigError, MakeShardsConfig, load_config
from cleaner.config_keys import config_keys
from jobs.cli import COMMANDS, main
from jobs.command import (
    EXIT_CONFIG,
    EXIT_INTERRUPTED,
    JobInterrupted,
    config_model,
    load_command_config,
    parse_command_args,
    run_command,
    run_main,
)
from training.config import TrainJobConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
CLI = Path(sys.executable).parent / "clipcleaner"
SUBCOMMANDS = {
    "demo",
    "make-shards",
    "inspect",
    "clean",
    "train",
    "pipeline",
    "predict",
    "export-shards",
}


def load(name: str, argv: list[str]):
    command = COMMANDS[name]
    return load_command_config(command, parse_command_args(command, argv))


# --------------------------------------------------------------------------------------------
# config_keys: every leaf key with its default, bounds and choices
# --------------------------------------------------------------------------------------------


def test_config_keys_walk_nested_sections_with_defaults_bounds_and_choices():
    keys = {k.key: k for k in config_keys(CleanJobConfig)}
    assert {"data.input", "output", "scoring.batch_size", "selection.theta_gmm", "seed"} <= set(
        keys
    )
    assert not any(k in keys for k in ("data", "scoring", "selection", "model", "ray"))
    assert keys["data.input"].required and keys["output"].required
    batch = keys["scoring.batch_size"]
    assert (batch.required, batch.default, batch.bounds, batch.type_name) == (
        False,
        256,
        {"gt": 0},
        "int",
    )
    theta = keys["selection.theta_gmm"]
    assert theta.bounds == {"ge": 0.0, "le": 1.0} and theta.constraints == ">= 0.0, <= 1.0"
    assert keys["selection.gmm"].choices == ("per_class", "global")
    assert keys["model.quick_gelu"].choices == (True, False, "auto")
    assert keys["scoring.gpus_per_actor"].type_name == "float | auto"
    assert "variance floor" in keys["selection.gmm_reg_covar"].description
    train = {k.key: k for k in config_keys(TrainJobConfig)}
    assert train["optim.milestones"].default == [200, 250]  # a default factory, called
    assert train["run.max_failures"].bounds == {"ge": -1}


MODEL = ["model.name=tiny-clip-shapes"]
REQUIRED = {
    CleanJobConfig: [
        "data.input=x",
        "data.classes=demo",
        "model.name=tiny-clip-shapes",
        "output=o",
    ],
    TrainJobConfig: ["data.input=x", "data.classes=demo", "data.manifest=m", "run.storage=s"],
    MakeShardsConfig: ["layout=imagefolder", "input=i", "output=o"],
}


@pytest.mark.parametrize("model", list(REQUIRED), ids=lambda m: m.__name__)
def test_every_key_named_is_one_the_config_accepts_with_its_default(model):
    keys = config_keys(model)
    assert {k.key for k in keys if k.required} == {r.split("=")[0] for r in REQUIRED[model]}
    for key in keys:
        if not key.required:
            cfg = load_config(
                None, [*REQUIRED[model], f"{key.key}={json.dumps(key.default)}"], model
            )
            assert cfg.model_dump() == load_config(None, REQUIRED[model], model).model_dump()


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_help_lists_every_config_key_with_its_default(name, capsys):
    command = COMMANDS[name]
    with pytest.raises(SystemExit) as stop:
        main([name, "--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: clipcleaner {name}")
    for flag in (*command.flags, *command.switches, *command.section_files, "--config"):
        assert flag in text
    for key in config_keys(config_model(command)):
        assert f"  {key.key}  (" in text, key.key
    if name == "clean":
        assert "  scoring.batch_size  (int; default 256; > 0)" in text
        assert "  data.input  (str | list[str]; required)" in text


def test_the_overview_names_every_subcommand(capsys):
    assert set(COMMANDS) == SUBCOMMANDS
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert all(f"  {name} " in out for name in SUBCOMMANDS)
    with pytest.raises(SystemExit) as stop:
        main(["cleen"])
    assert stop.value.code == EXIT_CONFIG
    assert "unknown subcommand 'cleen'" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# One way to give a config: --config FILE, flags for the common keys, key=value overrides
# --------------------------------------------------------------------------------------------


def test_flags_are_aliases_of_config_keys_and_overrides_win(tmp_path):
    cfg = load("clean", ["--input", "shards/", "--output", "runs/x", "data.classes=demo", *MODEL])
    assert (cfg.data.input, cfg.output, cfg.data.classes) == ("shards/", "runs/x", "demo")
    cfg = load(
        "clean", ["--output=runs/x", "output=runs/y", "--input", "s", "data.classes=demo", *MODEL]
    )
    assert cfg.output == "runs/y"
    job = tmp_path / "job.yaml"
    job.write_text(
        "data: {input: a, classes: demo}\nmodel: {name: tiny-clip-shapes}\noutput: o\n"
        "scoring: {batch_size: 8}\n"
    )
    cfg = load("clean", ["--config", str(job), "--output", "p", "scoring.max_actors=3"])
    assert (cfg.output, cfg.scoring.batch_size, cfg.scoring.max_actors) == ("p", 8, 3)
    shards = load("make-shards", ["--layout", "imagefolder", "--input", "i", "--output", "o"])
    assert (shards.layout, shards.input, shards.output, shards.dry_run) == (
        "imagefolder",
        "i",
        "o",
        False,
    )
    assert load("make-shards", ["--dry-run", "layout=imagefolder", "input=i", "output=o"]).dry_run
    train = load(
        "train",
        ["--manifest", "m", "--input", "i", "--storage", "s", "--name", "n", "data.classes=demo"],
    )
    assert (train.data.manifest, train.run.storage, train.run.name) == ("m", "s", "n")
    # a flag value is taken as it is: a run name of digits stays a string
    assert load(
        "train",
        ["--manifest", "m", "--input", "i", "--storage", "s", "--name", "007", "data.classes=demo"],
    )


def test_inspect_takes_shard_folders_as_bare_arguments():
    cfg = load("inspect", ["a/", "s3://b/k=v/", "--json", "r.json", "threads=2"])
    assert cfg.input == ["a/", "s3://b/k=v/"]  # k=v inside a URI is not an override
    assert (cfg.json_output, cfg.threads) == ("r.json", 2)
    with pytest.raises(ConfigError, match="not a key=value"):
        load("clean", ["shards/"])


def test_demo_runs_configs_demo_yaml_unless_given_another():
    cfg = load("demo", [])
    assert (cfg.data.input, cfg.output, cfg.data.classes) == (
        "data/demo/train",
        "runs/demo",
        "demo",
    )
    assert load("demo", ["--output", "runs/d2", "scoring.batch_size=64"]).output == "runs/d2"


def test_pipeline_sections_come_from_files_and_train_reads_what_clean_wrote():
    cfg = load(
        "pipeline",
        [
            f"--clean-config={REPO_ROOT / 'configs/demo.yaml'}",
            f"--train-config={REPO_ROOT / 'configs/train-demo.yaml'}",
            "clean.output=runs/p",
            "clean.data.input=[s1/, s2/]",
            "train.optim.epochs=1",
            "train.data.manifest=ignored",  # always the clean job's output
        ],
    )
    assert cfg.clean.output == "runs/p" and cfg.clean.scoring.max_actors == 1
    assert (cfg.train.data.manifest, cfg.train.data.input) == ("runs/p", ["s1/", "s2/"])
    assert cfg.train.optim.epochs == 1 and cfg.train.network.name == "tiny_cnn"
    with pytest.raises(ConfigError, match=r"train\.run: Field required"):
        load("pipeline", [f"--clean-config={REPO_ROOT / 'configs/demo.yaml'}"])
    with pytest.raises(ConfigError, match="selection"):
        load("pipeline", ["selection.theta_gmm=0.4"])  # a key outside both sections


def test_interrupt_lines_count_what_was_kept(tmp_path):
    from jobs.cli import clean_interrupted, make_shards_interrupted, train_interrupted

    cfg = load("clean", [f"--output={tmp_path / 'run'}", "--input=s", "data.classes=demo", *MODEL])
    scores = tmp_path / "run" / "scores"
    assert clean_interrupted(cfg).startswith(f"0 shard score file(s) kept in {scores};")
    scores.mkdir(parents=True)
    for name in ("a.parquet", "b.parquet", "notes.txt"):
        (scores / name).write_bytes(b"x")
    assert clean_interrupted(cfg) == (
        f"2 shard score file(s) kept in {scores}; rerun the same command to reuse them and "
        "score the rest (resume=true)"
    )
    train = load(
        "train",
        ["--input=i", "--manifest=m", f"--storage={tmp_path}", "--name=r", "data.classes=demo"],
    )
    for checkpoint in ("checkpoint_000000", "checkpoint_000001"):
        (tmp_path / "r" / checkpoint).mkdir(parents=True)
        (tmp_path / "r" / checkpoint / "history.json").write_text("[]")
    assert train_interrupted(train) == (
        f"2 checkpoint(s) kept in {tmp_path / 'r'}; rerun with the same run.name (r) to "
        "resume from the last one"
    )
    shards = load("make-shards", ["--layout=imagefolder", "--input=i", f"--output={tmp_path}"])
    (tmp_path / "_make_shards").mkdir()
    (tmp_path / "_make_shards" / "train-000000.tar.json").write_text("{}")
    assert make_shards_interrupted(shards).startswith(f"1 finished shard(s) kept in {tmp_path};")


def _ctrl_c(cfg):
    raise KeyboardInterrupt


def _ctrl_c_said(cfg):
    raise JobInterrupted("training had 3 checkpoints")


@pytest.mark.parametrize(
    ("run", "line"),
    [
        ("tests.test_cli:_ctrl_c", "0 finished shard(s) kept in o; rerun the same command"),
        ("tests.test_cli:_ctrl_c_said", "training had 3 checkpoints"),
    ],
)
def test_ctrl_c_in_a_job_ends_with_its_line_and_status_130(run, line, capsys):
    """run_command turns Ctrl-C into JobInterrupted with the job's line (a line the job
    raised itself passes unchanged); run_main prints it alone and exits 130."""
    command = dataclasses.replace(COMMANDS["make-shards"], run=run)
    argv = ["--layout", "imagefolder", "--input", "i", "--output", "o"]
    with pytest.raises(JobInterrupted, match=re.escape(line)):
        run_command(command, argv)
    with pytest.raises(SystemExit) as stop:
        run_main(lambda: run_command(command, argv))
    assert stop.value.code == EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert err.startswith(f"interrupted: {line}") and err.count("\n") == 1


# --------------------------------------------------------------------------------------------
# Config errors: exit status 2, one line, before torch or Ray is imported
# --------------------------------------------------------------------------------------------

BAD = {
    "demo": ["scoring.batch_size=0"],
    "clean": ["--input", "s/", "--output", "o", "data.classes=demo", "selection.theta_gmm=2"],
    "train": ["--input", "i", "--manifest", "m", "run.storage=s", "optim.epochs=0"],
    "pipeline": [
        "--clean-config=configs/demo.yaml",
        "--train-config=configs/train-demo.yaml",
        "train.mixfix.mode=sometimes",
    ],
    "make-shards": ["--layout", "cifar", "--input", "i", "--output", "o"],
    "inspect": ["shards/", "threads=0"],
    "predict": ["--model", "m", "--input", "i", "--output", "predictions.csv"],
    "export-shards": ["--manifest", "m", "--output", "o", "prefix=a/b"],
}
HEAVY = ("torch", "ray", "open_clip", "torchvision", "matplotlib")
PROBE = """
import json, sys
from cleaner.config import ConfigError
from jobs.cli import COMMANDS
from jobs.command import run_command
import jobs.clean, jobs.train, jobs.pipeline, jobs.make_shards, jobs.inspect_shards
import jobs.predict, jobs.export_shards
errors = {}
for name, argv in json.loads(sys.argv[1]).items():
    try:
        run_command(COMMANDS[name], argv)
    except ConfigError as err:
        errors[name] = str(err)
heavy = [m for m in json.loads(sys.argv[2]) if m in sys.modules]
print(json.dumps({"errors": errors, "heavy": heavy}))
"""


def test_config_errors_come_before_torch_and_ray_are_imported():
    """Every subcommand's config error, and importing every job module, in one process:
    none of torch, Ray, open_clip, matplotlib is in sys.modules afterwards."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(BAD), json.dumps(HEAVY)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(result["errors"]) == set(BAD), result
    assert "selection.theta_gmm" in result["errors"]["clean"]
    assert "train.mixfix.mode" in result["errors"]["pipeline"]
    assert (
        ".parquet" in result["errors"]["predict"] and "prefix" in result["errors"]["export-shards"]
    )
    assert result["heavy"] == []


def test_the_console_script_reports_a_config_error_in_one_line(tmp_path):
    start = time.perf_counter()
    done = subprocess.run(
        [str(CLI), "clean", "--input", "shards/", "--output", str(tmp_path / "o")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    seconds = time.perf_counter() - start
    print(f"\n[{seconds:.2f} s] {done.stderr.strip()}")
    assert done.returncode == EXIT_CONFIG
    assert done.stderr.strip() == (
        "error: invalid config: data.classes: Field required; model.name: Field required"
    )
    assert done.stdout == "" and not (tmp_path / "o").exists()
