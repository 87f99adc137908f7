"""The prompt ensemble is encoded in a Ray task that gets a GPU when the scorers do."""

from __future__ import annotations

import os

import numpy as np
import pytest

from cleaner.classes import DEMO_CLASS_SPEC, ClassSpec
from cleaner.config import ConfigError, ModelConfig
from cleaner.demo.tiny_clip import TINY_CLIP_NAME as DEMO_MODEL
from cleaner.scoring.models import load_clip
from cleaner.scoring.prompts import encode_prompts
from cleaner.scoring.text_features import encode_text_features
from tests.conftest import own_ray

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ray_with_a_gpu():
    """A local Ray that declares one (logical) GPU: Ray assigns it like a real one."""
    ray = own_ray(num_cpus=2, num_gpus=1)
    yield ray
    ray.shutdown()


@pytest.mark.parametrize("num_gpus", [1.0, 0.0])
def test_text_features_encoded_in_a_task_with_the_scorers_gpu_request(ray_with_a_gpu, num_gpus):
    spec = ClassSpec.load(DEMO_CLASS_SPEC)
    text = encode_text_features(ModelConfig(name=DEMO_MODEL), spec.prompts(), num_gpus=num_gpus)
    assert text.pid != os.getpid(), "encoded on the driver"
    assert text.node_id in {n["NodeID"] for n in ray_with_a_gpu.nodes()}
    assert text.gpu_ids == (("0",) if num_gpus else ())
    clip = load_clip(ModelConfig(name=DEMO_MODEL), device="cpu")
    here = encode_prompts(clip.model, clip.tokenizer, spec.prompts())
    assert text.image_size == clip.image_size
    np.testing.assert_allclose(text.bank.features, here.features, atol=1e-5)
    np.testing.assert_array_equal(text.bank.mask, here.mask)


def test_a_bad_model_in_the_task_is_a_config_error(ray_with_a_gpu):
    with pytest.raises(ConfigError, match="unknown open_clip model name 'ViT-Nope'"):
        encode_text_features(ModelConfig(name="ViT-Nope"), [["a"]], num_gpus=0)


def encode_where_cuda_looks_available(model_config: dict, prompts: list[list[str]]) -> str:
    """In a Ray task: make CUDA look available (as on a GPU node), encode, restore; the device."""
    import torch

    from cleaner.scoring.text_features import encode_text_features_here

    real = torch.cuda.is_available
    torch.cuda.is_available = lambda: True
    try:
        return encode_text_features_here(model_config, prompts).device
    finally:
        torch.cuda.is_available = real


def test_a_task_that_reserved_no_gpu_encodes_on_cpu_where_cuda_is_visible(ray_with_a_gpu):
    """Ray does not hide a node's GPUs from a task that asked for none: the task must not
    take one (the scorers run on CPU with scoring.gpus_per_actor=0)."""
    task = ray_with_a_gpu.remote(encode_where_cuda_looks_available).options(num_gpus=0)
    config = ModelConfig(name=DEMO_MODEL).model_dump()
    assert ray_with_a_gpu.get(task.remote(config, [["a photo of a circle."]])) == "cpu"
