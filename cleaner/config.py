"""Typed, validated job configuration: loaded from YAML, overridable with key=value pairs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)


class ConfigError(ValueError):
    """A job configuration that cannot be loaded or does not validate."""


class StrictModel(BaseModel):
    """A config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(StrictModel):
    """Where the shards are and how their samples are labelled."""

    input: str | list[str] = Field(
        description="folder, s3:// prefix, brace pattern (shard-{000..009}.tar) or list of these"
    )
    classes: str = Field(description="class spec YAML (local, file:// or s3://); 'demo' = bundled")
    image_extensions: list[str] = ["jpg", "jpeg", "png", "webp", "bmp"]


class ModelConfig(StrictModel):
    """Which CLIP scores the images (any open_clip model)."""

    name: str = "tiny-clip-shapes"
    pretrained: str | None = Field(
        default=None, description="open_clip tag, local path, file:// or s3:// checkpoint"
    )
    config_file: str | None = Field(
        default=None, description="extra open_clip model config JSON (local or s3://)"
    )
    cache_dir: str | None = Field(default=None, description="per-node cache for s3:// files")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        default="auto",
        description="auto: bf16 on GPUs with native bf16 (compute capability 8.0+), else fp16",
    )
    quick_gelu: bool | Literal["auto"] = Field(
        default="auto",
        description="QuickGELU activations; auto: as the pretrained tag was trained (OpenAI's: "
        "true), or the quick_gelu flag stored with a checkpoint file",
    )
    random_weights: bool = Field(
        default=False, description="allow a model without weights (seeded; speed tests only)"
    )


class ScoringConfig(StrictModel):
    """The Ray Data scoring stage."""

    batch_size: int = Field(default=256, gt=0)
    min_actors: int = Field(default=1, gt=0)
    max_actors: int = Field(default=2, gt=0)
    gpus_per_actor: float | Literal["auto"] = Field(
        default="auto",
        description="GPUs per scorer actor; fractions put several actors on one GPU "
        "(0.5: two), a throughput knob; 0: CPU actors; auto: 1 if the cluster has or can launch GPUs, else 0 "
        "(cleaner/scoring/resources.py)",
    )
    cpus_per_actor: float = Field(default=1.0, gt=0)
    gpu_probe_s: float = Field(
        default=30.0,
        gt=0,
        description="how long to wait for an autoscaler to start launching a node for "
        "resources no node has (auto: then CPUs; set: then an error)",
    )
    schedule_timeout_s: float = Field(
        default=900.0,
        gt=0,
        description="how long the first scorer may take to start (nodes booting) before "
        "the job stops with an error naming what it asked for and what the cluster has",
    )
    read_batch_size: int = Field(default=256, gt=0, description="samples per block from a shard")
    max_readers: int | None = Field(
        default=None, gt=0, description="shard-reader tasks at once (None: as resources allow)"
    )
    reader_memory_mb: int = Field(default=768, gt=0, description="memory of one shard-reader task")
    tau: float = Field(default=0.07, gt=0)
    top_k: int = Field(default=5, gt=0)

    @field_validator("gpus_per_actor")
    @classmethod
    def _gpus_ray_can_grant(cls, v: float | str) -> float | str:
        if isinstance(v, str):
            return v
        if v < 0 or (v > 1 and v != int(v)):
            raise ValueError(
                f"gpus_per_actor ({v}) must be a fraction of one GPU (0 to 1) or a whole number"
            )
        return v

    @model_validator(mode="after")
    def _max_at_least_min(self) -> ScoringConfig:
        # after the fields, so that a min_actors above the default max_actors is caught too
        if self.max_actors < self.min_actors:
            raise ValueError(
                f"max_actors ({self.max_actors}) must be >= min_actors ({self.min_actors})"
            )
        return self


class SelectionConfig(StrictModel):
    """The global clean-sample selection (METHOD.md sections 2-3)."""

    theta_gmm: float = Field(default=0.5, ge=0.0, le=1.0)
    theta_cons: float = Field(default=0.8, ge=0.0, le=1.0)
    gmm: Literal["per_class", "global"] = "per_class"
    gmm_reg_covar: float = Field(
        default=1e-6,
        gt=0.0,
        le=1.0,
        description="variance floor of the 2-component mixtures: 1e-6 as the official "
        "code (scikit-learn's default); 5e-4 (DivideMix's) keeps a larger, less pure set",
    )
    probe: Literal["insample", "crossfit", "none"] = "insample"
    probe_folds: int = Field(default=5, ge=2)
    probe_c: float = Field(default=1.0, gt=0)
    suggest_min_confidence: float = Field(
        default=0.5, ge=0.0, le=1.0, description="suggest a label only this confident or more"
    )
    fit_mode: Literal["auto", "in_memory", "distributed"] = Field(
        default="auto",
        description="global fit on the driver (in_memory) or over Ray Data (distributed); "
        "auto: in_memory when its estimated size fits fit_memory_gb",
    )
    fit_memory_gb: float | None = Field(
        default=None,
        gt=0,
        description="memory budget of the in-memory fit; default half of "
        "the driver's available memory",
    )


class RayConfig(StrictModel):
    """How the job reaches Ray: an address, RAY_ADDRESS, or a new local instance."""

    address: str | None = None
    num_cpus: int | None = Field(default=None, gt=0)


class CleanJobConfig(StrictModel):
    """Everything the cleaning job needs; written beside its outputs."""

    data: DataConfig
    output: str = Field(description="output folder URI (local, file:// or s3://)")
    model: ModelConfig = ModelConfig()
    scoring: ScoringConfig = ScoringConfig()
    selection: SelectionConfig = SelectionConfig()
    ray: RayConfig = RayConfig()
    seed: int = 0
    resume: bool = Field(default=True, description="skip shards whose scores already exist")

    def fingerprint(self, *parts: str) -> str:
        """A short hash of what decides the scores (model, classes, tau): reused scores must match."""
        payload = json.dumps(
            [self.model.model_dump(exclude={"cache_dir"}), self.scoring.tau, *parts],
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (values parsed as YAML) to a nested mapping, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"override {item!r} has an empty key")
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = child
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {err}") from None
    return data


def load_config(
    path: str | Path | None,
    overrides: list[str] | None = None,
    model: type[BaseModel] = CleanJobConfig,
):
    """Load a YAML config, apply overrides, validate. Raises ConfigError naming each problem."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        data = loaded or {}
    apply_overrides(data, overrides or [])
    try:
        return model.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in err.errors()
        )
        raise ConfigError(f"invalid config: {problems}") from None


class MakeShardsConfig(StrictModel):
    """The ingestion job: a dataset in its native layout -> WebDataset shards + class spec."""

    layout: Literal["imagefolder", "labellist", "webvision", "clothing1m", "animal10n"] = Field(
        description="how the dataset is laid out (cleaner/reading/layouts.py)"
    )
    input: str = Field(
        description="dataset root (local, file:// or s3://); image paths are under it"
    )
    output: str = Field(description="shard folder (local, file:// or s3://)")
    split: Literal["train", "val", "test"] = "train"
    label_list: str | None = Field(
        default=None, description="labellist: the `<relative path> <label>` file (local or s3://)"
    )
    class_names: str | None = Field(
        default=None, description="file with one class name per line, in label order"
    )
    mini: bool = Field(default=False, description="webvision: mini-WebVision (first 50 classes)")
    sources: list[Literal["google", "flickr"]] | None = Field(
        default=None, description="webvision train lists (default google+flickr; mini: google)"
    )
    shard_size: int = Field(default=1000, gt=0, description="images per shard")
    resize: int | None = Field(default=None, gt=0, description="shorter side at most this")
    jpeg_quality: int = Field(default=95, ge=1, le=100, description="when re-encoding")
    prefix: str | None = Field(default=None, description="shard name prefix (default: the split)")
    dataset_name: str | None = Field(default=None, description="name in the class spec")
    resume: bool = Field(default=True, description="skip shards already written with this plan")
    dry_run: bool = Field(default=False, description="list and report, write no shard")
    ray: RayConfig = RayConfig()
