"""CLIP loading through open_clip's factory: bundled config, local and s3:// checkpoints."""

from __future__ import annotations

import pytest
import torch

from cleaner.config import ConfigError, ModelConfig
from cleaner.scoring.models import ASSETS_DIR, autocast_dtype, fetch_to_cache, load_clip
from tests.conftest import make_bucket

CHECKPOINT = ASSETS_DIR / "tiny-clip-shapes.pt"


def test_bundled_tiny_clip_loads_with_its_preprocessing():
    clip = load_clip(ModelConfig(), device="cpu")
    assert clip.device.type == "cpu" and clip.amp_dtype is None
    assert clip.image_size == 32 and clip.mean.shape == (3,)
    tokens = clip.tokenizer(["a photo of a circle."])
    assert tokens.shape[-1] == 16
    assert clip.model.encode_text(tokens).shape[-1] == clip.embed_dim


def test_s3_checkpoint_is_fetched_once_and_matches_local(s3_endpoint, tmp_path):
    client = make_bucket("models")
    client.upload_file(str(CHECKPOINT), "models", "tiny/tiny-clip-shapes.pt")
    uri = "s3://models/tiny/tiny-clip-shapes.pt"
    cfg = ModelConfig(pretrained=uri, cache_dir=str(tmp_path))
    remote = load_clip(cfg, device="cpu").model.state_dict()
    local = load_clip(ModelConfig(pretrained=str(CHECKPOINT)), device="cpu").model.state_dict()
    assert remote.keys() == local.keys()
    assert all(torch.equal(remote[k], local[k]) for k in local)
    cached = fetch_to_cache(uri, tmp_path)
    client.delete_object(Bucket="models", Key="tiny/tiny-clip-shapes.pt")
    assert fetch_to_cache(uri, tmp_path) == cached  # served from the node cache


def test_unknown_model_and_missing_checkpoint_are_named():
    with pytest.raises(ValueError, match="unknown open_clip model name 'ViT-Nope'"):
        load_clip(ModelConfig(name="ViT-Nope"), device="cpu")
    with pytest.raises(FileNotFoundError, match="model file not found"):
        load_clip(ModelConfig(pretrained="/nonexistent/model.pt"), device="cpu")
    # configuration errors: the jobs print them as one line (exit 2), not a stack trace
    with pytest.raises(ConfigError, match="unknown open_clip model name 'ViT-Nope'"):
        load_clip(ModelConfig(name="ViT-Nope"), device="cpu")
    with pytest.raises(
        ConfigError,
        match="model 'tiny-clip-shapes': Pretrained value 'no-such-tag' is not a known tag",
    ):
        load_clip(ModelConfig(pretrained="no-such-tag"), device="cpu")


def test_missing_weights_are_an_error_unless_random_weights_are_asked_for():
    with pytest.raises(ValueError, match="no pretrained weights for model 'ViT-B-32'"):
        load_clip(ModelConfig(name="ViT-B-32"), device="cpu")
    first = load_clip(ModelConfig(name="ViT-B-32", random_weights=True), device="cpu")
    second = load_clip(ModelConfig(name="ViT-B-32", random_weights=True), device="cpu")
    weights = first.model.visual.conv1.weight
    assert torch.equal(weights, second.model.visual.conv1.weight)


def test_autocast_only_on_gpu():
    assert autocast_dtype(torch.device("cpu"), "auto") is None
    assert autocast_dtype(torch.device("cpu"), "bf16") is None
