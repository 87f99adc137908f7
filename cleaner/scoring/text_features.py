"""Encoding the prompt ensemble in a Ray task, on a GPU when the scorers get GPUs.

At K = 1000 classes with 8 prompts on a large text tower this is real work; it runs where
the scorers run (a GPU worker on an autoscaling cluster), never on the driver's CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from cleaner.config import ConfigError, ModelConfig
from cleaner.scoring.prompts import PromptBank


@dataclass(frozen=True)
class TextFeatures:
    """The encoded prompt bank, the model's input size, and where the encoding ran."""

    bank: PromptBank
    image_size: int
    resize: dict  # how the decoder resizes for this model (read_shard's keywords)
    device: str
    gpu_ids: tuple[str, ...]
    pid: int
    node_id: str | None


def encode_text_features_here(model_config: dict, prompts: list[list[str]]) -> TextFeatures:
    """Load the CLIP and encode the prompts, in this process: on the GPU this Ray task
    reserved, on CPU when it reserved none (even where CUDA is visible), and outside Ray on
    a GPU if there is one (cleaner.scoring.devices.select_device)."""
    import ray

    from cleaner.scoring.devices import select_device
    from cleaner.scoring.models import load_clip
    from cleaner.scoring.prompts import encode_prompts

    clip = load_clip(ModelConfig(**model_config), device=select_device())
    bank = encode_prompts(clip.model, clip.tokenizer, prompts, device=clip.device)
    gpu_ids: tuple[str, ...] = ()
    node_id = None
    if ray.is_initialized():
        context = ray.get_runtime_context()
        gpu_ids = tuple(str(g) for g in context.get_accelerator_ids().get("GPU", []))
        node_id = context.get_node_id()
    return TextFeatures(
        bank, clip.image_size, clip.resize, str(clip.device), gpu_ids, os.getpid(), node_id
    )


def encode_text_features(
    model_config: ModelConfig, prompts: list[list[str]], *, num_gpus: float, num_cpus: float = 1
) -> TextFeatures:
    """Encode the prompts in a Ray task with the scorers' GPU request (num_gpus)."""
    import ray

    task = ray.remote(encode_text_features_here).options(
        num_gpus=num_gpus, num_cpus=num_cpus, max_retries=2
    )
    try:
        return ray.get(task.remote(model_config.model_dump(), prompts))
    except ray.exceptions.RayTaskError as err:
        if isinstance(err.cause, ConfigError):
            raise ConfigError(str(err.cause)) from None
        raise
