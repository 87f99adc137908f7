"""Job configuration: YAML + key=value overrides, validated with messages that name the key."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal, get_args, get_origin

import pytest
from annotated_types import Ge, Gt, Le, Lt
from pydantic import BaseModel

from cleaner.config import CleanJobConfig, ConfigError, MakeShardsConfig, load_config
from training.config import TrainJobConfig

BASE = [
    "data.input=/tmp/shards",
    "data.classes=demo",
    "model.name=tiny-clip-shapes",
    "output=/tmp/out",
]


def test_overrides_are_parsed_as_yaml_into_nested_keys(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(
        "data: {input: a, classes: demo}\nmodel: {name: tiny-clip-shapes}\noutput: o\n"
        "selection: {theta_cons: 0.9}\n"
    )
    cfg = load_config(path, ["selection.theta_cons=1.0", "scoring.max_actors=4", "resume=false"])
    assert isinstance(cfg, CleanJobConfig)
    assert cfg.selection.theta_cons == 1.0 and cfg.scoring.max_actors == 4 and cfg.resume is False
    assert cfg.data.input == "a"


def bounded_keys(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, str, str]]:
    """(key, a value out of its bounds, the error the user is promised) for every key of a
    config model with a numeric bound or a fixed set of choices, nested sections included.

    The cases come from the models themselves, so a key added later is covered; the
    expected message is written here, not taken from pydantic."""
    words = {Gt: "greater than", Ge: "greater than or equal to", Lt: "less than"}
    words[Le] = "less than or equal to"
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from bounded_keys(annotation, f"{key}.")
            continue
        if get_origin(annotation) is Literal:
            choices = [f"'{c}'" for c in get_args(annotation)]
            allowed = " or ".join([", ".join(choices[:-1]), choices[-1]])
            yield key, "not-a-choice", f"{key}: Input should be {allowed}"
        numeric = {a for a in get_args(annotation) or (annotation,) if a in (int, float)}
        for bound in field.metadata:
            if type(bound) not in words:
                continue
            limit = getattr(bound, type(bound).__name__.lower())  # Gt(gt=0).gt
            step = 1 if numeric == {int} else 0.5
            inside = isinstance(bound, (Gt, Lt))  # the bound itself is out of bounds
            value = limit if inside else limit - step if isinstance(bound, Ge) else limit + step
            yield key, f"{value}", f"{key}: Input should be {words[type(bound)]} {limit:g}"


JOBS = {  # each job's config model with the least that validates
    "clean": (CleanJobConfig, BASE),
    "train": (
        TrainJobConfig,
        ["data.input=/s", "data.classes=demo", "data.manifest=/m", "run.storage=/r"],
    ),
    "make_shards": (MakeShardsConfig, ["layout=imagefolder", "input=/i", "output=/o"]),
}
CASES = [
    pytest.param(model, base, key, value, message, id=f"{job}:{key}={value}")
    for job, (model, base) in JOBS.items()
    for key, value, message in bounded_keys(model)
]


def test_the_generated_cases_cover_the_bounded_keys():
    keys = {case.id.split("=")[0] for case in CASES}
    for known in (
        "clean:selection.theta_gmm",
        "clean:selection.gmm",
        "clean:scoring.batch_size",
        "clean:scoring.max_readers",  # optional: None or > 0
        "clean:model.precision",
        "train:optim.lr",
        "train:run.max_failures",
        "train:mixfix.mode",
        "make_shards:jpeg_quality",
    ):
        assert known in keys
    assert len(CASES) >= 50


@pytest.mark.parametrize(("model", "base", "key", "value", "message"), CASES)
def test_bad_values_name_the_key_and_the_bound(model, base, key, value, message):
    load_config(None, base, model)  # the base is valid: the error is the key's own
    with pytest.raises(ConfigError) as error:
        load_config(None, [*base, f"{key}={value}"], model)
    assert str(error.value) == f"invalid config: {message}"


TRAIN_BASE = JOBS["train"][1]


@pytest.mark.parametrize(
    ("model", "overrides", "message"),
    [  # the bounds written as validators (one key's odd range, or two keys together)
        (
            CleanJobConfig,
            [*BASE, "scoring.gpus_per_actor=1.5"],
            "scoring.gpus_per_actor: Value error, gpus_per_actor (1.5) must be a fraction "
            "of one GPU (0 to 1) or a whole number",
        ),
        (
            CleanJobConfig,
            [*BASE, "scoring.gpus_per_actor=-1"],
            "scoring.gpus_per_actor: Value error, gpus_per_actor (-1.0) must be a fraction "
            "of one GPU (0 to 1) or a whole number",
        ),
        (
            CleanJobConfig,
            [*BASE, "scoring.min_actors=3"],  # above the default max_actors (2)
            "scoring: Value error, max_actors (2) must be >= min_actors (3)",
        ),
        (
            CleanJobConfig,
            [*BASE, "scoring.max_actors=1", "scoring.min_actors=2"],
            "scoring: Value error, max_actors (1) must be >= min_actors (2)",
        ),
        (
            TrainJobConfig,
            [*TRAIN_BASE, "optim.batch_size=63"],
            "<root>: Value error, optim.batch_size (63) must be a multiple of "
            "scaling.num_workers (2)",
        ),
        (
            TrainJobConfig,
            [*TRAIN_BASE, "scaling.use_gpu=true", "scaling.gpus_per_worker=0.5"],
            "scaling: Value error, scaling.gpus_per_worker must be 1 with use_gpu (got 0.5): "
            "ranks sharing a GPU make NCCL fail (duplicate GPU in one communicator)",
        ),
    ],
    ids=["gpus-fraction", "gpus-negative", "min-over-default-max", "min-over-max", "batch", "nccl"],
)
def test_validator_bounds_name_the_keys(model, overrides, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, overrides, model)
    assert str(error.value) == f"invalid config: {message}"


def test_missing_required_and_malformed_inputs():
    with pytest.raises(ConfigError, match="output"):
        load_config(None, ["data.input=x", "data.classes=demo"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, [*BASE, "selection.theta_gmm"])
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent/job.yaml")


def test_fingerprint_changes_with_model_and_prompts():
    cfg = load_config(None, BASE)
    other = load_config(None, [*BASE, "model.name=ViT-B-32"])
    assert cfg.fingerprint("a") != other.fingerprint("a")
    assert cfg.fingerprint("a") != cfg.fingerprint("b")
    assert cfg.fingerprint("a") == load_config(None, [*BASE, "model.cache_dir=/x"]).fingerprint("a")
