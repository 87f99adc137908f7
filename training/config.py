"""The training job's typed configuration (docs/method.md, "MixFix" and "Settings")."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from cleaner.config import ActorPoolConfig, ModelConfig, RayConfig, StrictModel


class TrainDataConfig(StrictModel):
    """The training shards, the clean job's manifest, and an optional test split."""

    input: str | list[str] = Field(description="training shards: the ones the clean job read")
    manifest: str = Field(description="the clean job's manifest.parquet (local or s3://)")
    test_input: str | list[str] | None = Field(
        default=None, description="test shards whose labels are true (accuracy per epoch)"
    )
    classes: str = Field(
        description="class spec: a shipped one by name (cifar10, imagenet1k, ...; 'demo' = "
        "the bundled demo's) or a YAML (local, file:// or s3://)"
    )
    image_size: int | None = Field(
        default=None,
        gt=0,
        description="training input size in pixels; default: the network's own "
        "(NETWORK_INPUT_SIZES)",
    )
    image_extensions: list[str] = Field(
        default_factory=lambda: ["jpg", "jpeg", "png", "webp", "bmp"]
    )
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    read_batch_size: int = Field(default=256, gt=0)
    crop_padding: int = Field(default=4, ge=0)
    flip: bool = True
    cache_decoded: bool = Field(
        default=False,
        description="decode once and keep the images in Ray's object store (small datasets)",
    )
    shuffle_buffer: int = Field(
        default=2048,
        ge=0,
        description="local shuffle buffer, in distinct samples: it holds this many times "
        "the epoch's mean repetition (MixFix draws each selected sample about N / selected "
        "times per epoch, its copies in a row) rows, up to shuffle_buffer_mb; 0: no shuffle",
    )
    shuffle_buffer_mb: float = Field(
        default=512, gt=0, description="most memory of a worker's shuffle buffer (MiB)"
    )
    shuffle_shards: bool = Field(
        default=True,
        description="read the shards (or cached blocks) in a different seeded order each "
        "epoch; false: the manifest's order every epoch",
    )


# Each network's own input size (what it was designed and is usually trained at): the
# default of data.image_size. Kept here, not in training.networks, so that validating a
# config does not import torch.
NETWORK_INPUT_SIZES: dict[str, int] = {
    "preact_resnet18": 32,  # CIFAR-sized; global pooling takes larger inputs too
    "resnet50": 224,
    "inception_resnet_v2": 299,
    "vgg19_bn": 224,
    "tiny_cnn": 32,
    "clip_peft": 224,  # most CLIPs' input (ViT-B-32 ...); set data.image_size for others
}


class ClipNetworkConfig(StrictModel):
    """network.name=clip_peft: which CLIP, and how its image tower is adapted."""

    model: ModelConfig = Field(description="the CLIP (as the clean job's model section)")
    peft: Literal["lora", "vpt"] = "lora"
    lora_rank: int = Field(default=8, gt=0)
    vpt_len: int = Field(default=20, gt=0)


class NetworkConfig(StrictModel):
    name: str = "tiny_cnn"
    pretrained: str | None = Field(default=None, description="initial weights: path or s3://")
    clip: ClipNetworkConfig | None = Field(
        default=None,
        description="clip_peft only: CLIP's image tower with LoRA or visual prompts and a "
        "linear head (DeFT's fine-tuning on the clean set)",
    )

    @model_validator(mode="after")
    def _clip_section(self) -> NetworkConfig:
        if self.name == "clip_peft" and self.clip is None:
            raise ValueError("network.name=clip_peft needs network.clip.model.name (a CLIP)")
        if self.name != "clip_peft" and self.clip is not None:
            raise ValueError("network.clip is only for network.name=clip_peft")
        return self

    @field_validator("name")
    @classmethod
    def _known_network(cls, name: str) -> str:
        if name not in NETWORK_INPUT_SIZES:
            raise ValueError(f"unknown network {name!r} (one of {', '.join(NETWORK_INPUT_SIZES)})")
        return name


MIXFIX_MODES = ("noisy", "clean_only", "mixfix", "mixfix_clip", "deft")
UPDATING_MODES = ("mixfix", "mixfix_clip")  # modes that absorb/relabel after each epoch
# The mode the README tells users to run: measured best by benchmarks.train_modes.
RECOMMENDED_MODE = "mixfix_clip"


class MixFixConfig(StrictModel):
    """mixfix: the paper's method; mixfix_clip: MixFix whose absorb/relabel must agree with
    CLIP's zero-shot top-`clip_k` (the manifest's); clean_only: the CLIP clean set, no
    absorb/relabel; noisy: every sample with its given label (no cleaning); deft: DeFT's
    fine-tuning, the clean set drawn uniformly (no class balance) with plain cross-entropy
    (no mixup), meant for network.name=clip_peft."""

    mode: Literal["mixfix", "mixfix_clip", "clean_only", "noisy", "deft"] = RECOMMENDED_MODE
    beta: float = Field(default=1.0, ge=0.0)
    theta_r: float = Field(default=0.8, ge=0.0, le=1.0)
    theta_r2: float = Field(default=0.8, ge=0.0, le=1.0)
    clip_k: int = Field(default=1, ge=1, description="mixfix_clip: CLIP top-k that must agree")
    warmup_epochs: int = Field(
        default=0, ge=0, description="epochs trained on the clean set before the first update"
    )
    sample_weights: Literal["none", "cleannet"] = Field(
        default="none",
        description="cleannet: each sample's loss weighted by max(0, its CleanNet relevance) "
        "(the manifest's cleannet_relevance; CleanNet's w_soft); with mode=noisy this is "
        "CleanNet's own recipe",
    )

    @property
    def mixup_beta(self) -> float:
        """The Beta parameter of mixup (0: none, as DeFT's fine-tuning)."""
        return 0.0 if self.mode == "deft" else self.beta

    @property
    def class_balanced(self) -> bool:
        """Whether epochs draw classes equally (MixFix's sampler) or samples uniformly."""
        return self.mode not in ("noisy", "deft")


class OptimConfig(StrictModel):
    lr: float = Field(default=0.02, gt=0)
    momentum: float = Field(default=0.9, ge=0)
    weight_decay: float = Field(default=5e-4, ge=0)
    batch_size: int = Field(default=128, gt=0, description="global batch (split over workers)")
    epochs: int = Field(default=300, gt=0)
    milestones: list[int] = Field(default_factory=lambda: [200, 250])
    gamma: float = Field(default=0.1, gt=0)
    amp: Literal["auto", "bf16", "fp16", "fp32"] = "auto"


class ScalingConf(StrictModel):
    """Ray Train workers: one process per GPU when use_gpu (DDP over NCCL)."""

    num_workers: int = Field(default=2, gt=0)
    use_gpu: bool = False
    cpus_per_worker: float = Field(default=1.0, gt=0)
    gpus_per_worker: float = Field(
        default=1.0, ge=0, description="must be 1 with use_gpu (one GPU per DDP rank)"
    )
    sync_batchnorm: bool = Field(
        default=True,
        description="SyncBatchNorm across GPU workers (BatchNorm statistics over the whole "
        "global batch, as on the paper's single GPU); CPU runs keep BatchNorm",
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = Field(
        default="PACK",
        description="how the workers' bundles are placed; SPREAD/STRICT_SPREAD put them on "
        "different nodes (multi-node DDP)",
    )

    @model_validator(mode="after")
    def _one_gpu_per_worker(self) -> ScalingConf:
        if self.use_gpu and self.gpus_per_worker != 1:
            why = (
                "ranks sharing a GPU make NCCL fail (duplicate GPU in one communicator)"
                if self.gpus_per_worker < 1
                else "a DDP rank uses one GPU; the others would sit idle (raise num_workers)"
            )
            raise ValueError(
                f"scaling.gpus_per_worker must be 1 with use_gpu (got {self.gpus_per_worker}): "
                f"{why}"
            )
        return self


class RunConf(StrictModel):
    storage: str = Field(description="where runs live: local folder or s3:// prefix")
    name: str = "train"
    max_failures: int = Field(default=1, ge=-1, description="worker-group restarts (-1: forever)")
    checkpoints_to_keep: int = Field(default=2, gt=0)


class TrainJobConfig(StrictModel):
    """Everything the training job needs; written beside its outputs."""

    data: TrainDataConfig
    run: RunConf
    network: NetworkConfig = NetworkConfig()
    mixfix: MixFixConfig = MixFixConfig()
    optim: OptimConfig = OptimConfig()
    scaling: ScalingConf = ScalingConf()
    ray: RayConfig = RayConfig()
    seed: int = 0

    @model_validator(mode="after")
    def _image_size_of_the_network(self) -> TrainJobConfig:
        if self.data.image_size is None:
            self.data.image_size = NETWORK_INPUT_SIZES[self.network.name]
        return self

    @model_validator(mode="after")
    def _batch_divides(self) -> TrainJobConfig:
        if self.optim.batch_size % self.scaling.num_workers:
            raise ValueError(
                f"optim.batch_size ({self.optim.batch_size}) must be a multiple of "
                f"scaling.num_workers ({self.scaling.num_workers})"
            )
        return self


class PredictConfig(StrictModel):
    """The predict job: a trained model (training.load_model) over WebDataset shards."""

    model: str = Field(
        description="the trained model: a training run's output folder or its model/ folder "
        "(local, file:// or s3://)"
    )
    input: str | list[str] = Field(
        description="shards to predict: folder, s3:// prefix, brace pattern or list of these"
    )
    output: str = Field(description="the predictions file, FILE.parquet (local, file:// or s3://)")
    top_k: int = Field(
        default=5, gt=0, description="classes listed per sample, most probable first"
    )
    image_extensions: list[str] = Field(
        default_factory=lambda: ["jpg", "jpeg", "png", "webp", "bmp"]
    )
    amp: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        default="auto", description="autocast on GPU actors (auto: bf16 where native, else fp16)"
    )
    scoring: ActorPoolConfig = Field(
        default_factory=ActorPoolConfig,
        description="the classifier actors and shard readers, as the clean job's scorers",
    )
    ray: RayConfig = RayConfig()

    @field_validator("output")
    @classmethod
    def _parquet_output(cls, v: str) -> str:
        if not v.endswith(".parquet"):
            raise ValueError(f"must be a .parquet file, got {v!r}")
        return v
