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
    test_input: str | list[str] | None = Field(
        default=None,
        description="test shards (as input): embedded too, so that train samples that "
        "duplicate a test sample are flagged (test_duplicate_of)",
    )
    image_extensions: list[str] = ["jpg", "jpeg", "png", "webp", "bmp"]


class ModelConfig(StrictModel):
    """Which CLIP scores the images (any open_clip model); a real run names its model."""

    name: str = Field(
        description="open_clip model name, e.g. ViT-B-32 (required: no default model; the "
        "bundled demo's is tiny-clip-shapes)"
    )
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


class ActorPoolConfig(StrictModel):
    """A Ray Data stage of model actors (GPUs when the cluster has them) fed by shard readers:
    the CLIP scorers of the clean job, the classifier of the predict job."""

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


class ScoringConfig(ActorPoolConfig):
    """The Ray Data scoring stage."""

    tau: float = Field(default=0.07, gt=0)
    top_k: int = Field(default=5, gt=0)


DETECTORS = ("clipcleaner", "deft", "cleannet", "ensemble")


class DeftConfig(StrictModel):
    """DeFT's learned positive/negative prompts (docs/method.md, "DeFT")."""

    n_ctx: int = Field(
        default=16,
        gt=0,
        description="ctx_init empty: learned context tokens per prompt (as the official "
        "code); lowered to what the text tower's context length holds (the tiny CLIP's "
        "holds fewer)",
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
    ctx_init: str = Field(
        default="a photo of a",
        description="the context vectors start as this template's token embeddings (CoOp's "
        "ctx_init; the prompts start at CLIP's zero-shot text features), and their number is "
        "the template's tokens; empty: n_ctx random vectors ~ N(0, init_std), as the official "
        "code",
    )
    init_std: float = Field(
        default=0.02, gt=0, description="ctx_init empty: context vectors ~ N(0, std)"
    )
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
    """The global clean-sample selection (docs/method.md, "Linear probe" and "Selection")."""

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


class ChecksConfig(StrictModel):
    """The embedding checks after the selection (docs/checks.md): off-topic images, exact
    and near duplicates, train/test leaks."""

    off_topic: bool = Field(default=True, description="flag images that fit none of the classes")
    off_topic_score: Literal["max_p", "max_similarity"] = Field(
        default="max_p",
        description="the score whose mixture finds them: zero-shot max probability, or the "
        "best cosine to any class prompt (measured: docs/benchmarks.md)",
    )
    duplicates: bool = Field(default=True, description="exact and near-duplicate groups")
    test_leaks: bool = Field(
        default=True, description="train samples that duplicate a test sample (data.test_input)"
    )
    near_threshold: float | Literal["auto"] = Field(
        default="auto",
        description="cosine above which two embeddings are near duplicates; auto: "
        "calibrated on the run (docs/checks.md)",
    )
    neighbours: int = Field(default=16, ge=1, le=256, description="neighbours searched per image")
    conflicts_as_evidence: bool = Field(
        default=False,
        description="a duplicate whose label disagrees with its group's best-supported "
        "label is not clean (measured: docs/benchmarks.md)",
    )

    @field_validator("near_threshold")
    @classmethod
    def _cosine(cls, v: float | str) -> float | str:
        if not isinstance(v, str) and not 0.0 < v <= 1.0:
            raise ValueError(f"near_threshold ({v}) must be a cosine in (0, 1] or 'auto'")
        return v


class RayConfig(StrictModel):
    """How the job reaches Ray: an address, RAY_ADDRESS, or a new local instance."""

    address: str | None = None
    num_cpus: int | None = Field(default=None, gt=0)


class CleanJobConfig(StrictModel):
    """Everything the cleaning job needs; written beside its outputs."""

    data: DataConfig
    output: str = Field(description="output folder URI (local, file:// or s3://)")
    # validated from {} when absent, so that a config without a model names `model.name`
    model: ModelConfig = Field(default_factory=dict, validate_default=True)
    scoring: ScoringConfig = ScoringConfig()
    selection: SelectionConfig = SelectionConfig()
    checks: ChecksConfig = ChecksConfig()
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


def set_key(data: dict[str, Any], key: str, value: Any) -> None:
    """Set the dotted `key` (`scoring.batch_size`) of a nested mapping, in place."""
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError("empty key")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{part!r} is not a section")
        node = child
    node[parts[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (values parsed as YAML) to a nested mapping, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {err}") from None
        try:
            set_key(data, key, value)
        except ConfigError as err:
            raise ConfigError(f"override {item!r}: {err}") from None
    return data


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML config file as a mapping ({} when empty). Raises ConfigError naming the problem."""
    try:
        loaded = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a folder") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return loaded or {}


def validate_config(data: dict[str, Any], model: type[BaseModel] = CleanJobConfig):
    """Validate a config mapping. Raises ConfigError naming every problem with its key."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in err.errors()
        )
        raise ConfigError(f"invalid config: {problems}") from None


def load_config(
    path: str | Path | None,
    overrides: list[str] | None = None,
    model: type[BaseModel] = CleanJobConfig,
):
    """Load a YAML config, apply overrides, validate. Raises ConfigError naming each problem."""
    data = read_config_file(path) if path is not None else {}
    apply_overrides(data, overrides or [])
    return validate_config(data, model)


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
    spread_classes: bool = Field(
        default=True,
        description="spread the images over the shards in a seeded random order, so that "
        "each shard mixes the classes (false: the listing's order, class by class for "
        "ImageFolder and WebVision)",
    )
    seed: int = Field(default=0, description="seed of the spread (same seed: same shards)")
    resize: int | None = Field(default=None, gt=0, description="shorter side at most this")
    jpeg_quality: int = Field(default=95, ge=1, le=100, description="when re-encoding")
    prefix: str | None = Field(default=None, description="shard name prefix (default: the split)")
    dataset_name: str | None = Field(
        default=None, description="name in a written bare class spec (not a shipped one)"
    )
    resume: bool = Field(default=True, description="skip shards already written with this plan")
    dry_run: bool = Field(default=False, description="list and report, write no shard")
    ray: RayConfig = RayConfig()


class ExportShardsConfig(StrictModel):
    """The export-shards job: the clean samples of a manifest as WebDataset shards."""

    manifest: str = Field(description="the clean job's manifest.parquet, or its output folder")
    output: str = Field(description="folder for the exported shards (local, file:// or s3://)")
    relabel: bool = Field(
        default=False,
        description="also export the noisy samples that have a suggested label, under it "
        "(.cls rewritten; the given label kept in the .json as given_label)",
    )
    input: str | list[str] | None = Field(
        default=None,
        description="where the manifest's shards are now (folder, s3:// prefix, pattern or "
        "list); default: where the clean job read them",
    )
    shard_size: int | None = Field(
        default=None, gt=0, description="samples per output shard (default: one per input shard)"
    )
    prefix: str = Field(default="clean", description="output shards are <prefix>-000000.tar, ...")
    classes: str | None = Field(
        default=None,
        description="class spec copied beside the shards as classes.yaml (default: the clean "
        "run's data.classes, from its config.yaml)",
    )
    resume: bool = Field(default=True, description="skip output shards already written alike")
    ray: RayConfig = RayConfig()

    @field_validator("prefix")
    @classmethod
    def _plain_prefix(cls, v: str) -> str:
        if not v or "/" in v:
            raise ValueError(f"prefix must be a non-empty name without '/', got {v!r}")
        return v


class InspectConfig(StrictModel):
    """The shard check: samples, keys, labels per shard, without decoding an image."""

    input: str | list[str] = Field(
        description="shard folders, s3:// prefixes, brace patterns or files (a list of these)"
    )
    classes: str | None = Field(
        default=None, description="class spec YAML (default: classes.yaml beside the shards)"
    )
    json_output: str | None = Field(default=None, description="also write the result as JSON here")
    threads: int = Field(default=8, gt=0, description="shards read at once")
