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

    @field_validator("max_actors")
    @classmethod
    def _max_at_least_min(cls, v: int, info) -> int:
        low = info.data.get("min_actors", 1)
        if v < low:
            raise ValueError(f"max_actors ({v}) must be >= min_actors ({low})")
        return v


DETECTORS = ("clipcleaner", "deft", "cleannet", "ensemble")


class DeftConfig(StrictModel):
    """DeFT's learned positive/negative prompts (docs/method.md, "DeFT")."""

    n_ctx: int = Field(
        default=16,
        gt=0,
        description="learned context tokens per prompt (as the official code); lowered to "
        "what the text tower's context length holds (the tiny CLIP's holds fewer)",
    )
    class_specific: bool = Field(
        default=False, description="one context per class (CoOp's CSC); false: shared, as DeFT"
    )
    steps: int = Field(default=300, gt=0, description="optimiser steps")
    warmup_steps: int = Field(
        default=30, ge=0, description="steps of the warm-up loss (every sample, given labels)"
    )
    batch_size: int = Field(
        default=32768, gt=0, description="usable rows drawn per step (all when fewer)"
    )
    lr: float = Field(default=0.002, gt=0)
    weight_decay: float = Field(default=5e-4, ge=0)
    init_std: float = Field(default=0.02, gt=0, description="context vectors ~ N(0, std)")
    require_argmax: bool = Field(
        default=False,
        description="clean also needs the label to be the argmax of p(yes) (the official "
        "code's real-data variant)",
    )
    image_tuning: Literal["none", "vpt", "lora"] = Field(
        default="none",
        description="none: prompts on the score files' embeddings (frozen image tower); "
        "vpt / lora: the image tower adapted too, on images, with Ray Train",
    )
    vpt_len: int = Field(default=20, gt=0, description="image_tuning=vpt: prompt tokens/layer")
    lora_rank: int = Field(default=8, gt=0, description="image_tuning=lora: rank of q/v updates")
    image_epochs: int = Field(default=10, gt=0, description="image_tuning: epochs over images")
    image_warmup_epochs: int = Field(default=1, ge=0)
    image_batch_size: int = Field(default=64, gt=0, description="image_tuning: global batch")
    image_lr: float = Field(default=0.03, gt=0, description="image_tuning: SGD lr (official)")
    image_workers: int = Field(default=1, gt=0, description="image_tuning: Ray Train workers")
    image_use_gpu: bool | Literal["auto"] = Field(
        default="auto", description="image_tuning: GPU workers (auto: when the cluster has GPUs)"
    )


class CleanNetConfig(StrictModel):
    """CleanNet's verified reference-set relevance (docs/method.md, "CleanNet")."""

    num_ref: int = Field(default=32, gt=0, description="reference embeddings per class (k-means)")
    ref_sample: int = Field(
        default=1000, gt=0, description="per-class sample the k-means runs on (at most)"
    )
    steps: int = Field(default=4000, gt=0)
    batch_verified: int = Field(default=32, gt=0)
    batch_unverified: int = Field(default=32, ge=0)
    lr: float = Field(default=0.01, gt=0)
    momentum: float = Field(default=0.9, ge=0)
    weight_decay: float = Field(default=1e-4, ge=0)
    neg_weight: float = Field(default=5.0, ge=0, description="weight of wrong-label pairs")
    margin: float = Field(default=0.1, description="cosine margin of wrong-label pairs")
    reconstruction_weight: float = Field(default=0.1, ge=0)
    unsupervised_weight: float = Field(default=0.1, ge=0)
    unsupervised_threshold: float = Field(
        default=0.1, description="pseudo verification label of unverified rows: cos >= this"
    )
    dropout: float = Field(default=0.0, ge=0, lt=1)
    threshold: float | Literal["fit"] = Field(
        default="fit",
        description="relevance threshold; fit: the most accurate on held-out verified rows",
    )
    holdout_fraction: float = Field(
        default=0.2, ge=0, lt=1, description="verified rows kept out of training to fit it"
    )
    trust_verified: bool = Field(
        default=True, description="verified rows take their verified decision in the manifest"
    )


class EnsembleConfig(StrictModel):
    """How the ensemble combines its members (docs/method.md, "Ensemble")."""

    members: list[Literal["clipcleaner", "deft", "cleannet"]] | None = Field(
        default=None,
        description="default: clipcleaner, deft, and cleannet when a verified set is given",
    )


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
    detector: Literal["clipcleaner", "deft", "cleannet", "ensemble"] = Field(
        default="clipcleaner",
        description="what decides is_clean: CLIPCleaner's selection (the default), DeFT's "
        "learned prompts, CleanNet's verified reference sets, or their ensemble "
        "(cleaner/detectors/)",
    )
    verified: str | None = Field(
        default=None,
        description="human-verified labels for CleanNet: a CSV or Parquet file with `key` "
        "and `verified_label` (local, file:// or s3://), or 'shards': the true labels the "
        "shards carry (Clothing1M's clean labels)",
    )
    deft: DeftConfig = DeftConfig()
    cleannet: CleanNetConfig = CleanNetConfig()
    ensemble: EnsembleConfig = EnsembleConfig()

    @model_validator(mode="after")
    def _cleannet_needs_verified(self) -> SelectionConfig:
        if self.detector == "cleannet" and self.verified is None:
            raise ValueError(
                "selection.detector=cleannet needs selection.verified (a CSV/Parquet file "
                "with key and verified_label, or 'shards')"
            )
        members = self.ensemble.members or []
        if "cleannet" in members and self.verified is None:
            raise ValueError("selection.ensemble.members has cleannet: give selection.verified")
        return self


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
