"""CLIP loading through open_clip's factory: bundled config, local and s3:// checkpoints."""

from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch
from open_clip.transformer import QuickGELU
from safetensors.torch import save_file

from cleaner.config import ConfigError, ModelConfig
from cleaner.demo.tiny_clip import TINY_CLIP_NAME as DEMO_MODEL
from cleaner.scoring.devices import autocast_dtype
from cleaner.scoring.models import (
    ASSETS_DIR,
    fetch_to_cache,
    load_clip,
    resolve_quick_gelu,
    stored_quick_gelu,
    uses_quick_gelu,
)
from tests.conftest import make_bucket

CHECKPOINT = ASSETS_DIR / "tiny-clip-shapes.pt"


def test_bundled_tiny_clip_loads_with_its_preprocessing():
    clip = load_clip(ModelConfig(name=DEMO_MODEL), device="cpu")
    assert clip.device.type == "cpu" and clip.amp_dtype is None
    assert clip.image_size == 32 and clip.mean.shape == (3,)
    tokens = clip.tokenizer(["a photo of a circle."])
    assert tokens.shape[-1] == 16
    assert clip.model.encode_text(tokens).shape[-1] == clip.embed_dim


def test_s3_checkpoint_is_fetched_once_and_matches_local(s3_endpoint, tmp_path):
    client = make_bucket("models")
    client.upload_file(str(CHECKPOINT), "models", "tiny/tiny-clip-shapes.pt")
    uri = "s3://models/tiny/tiny-clip-shapes.pt"
    cfg = ModelConfig(name=DEMO_MODEL, pretrained=uri, cache_dir=str(tmp_path))
    remote = load_clip(cfg, device="cpu").model.state_dict()
    local = load_clip(
        ModelConfig(name=DEMO_MODEL, pretrained=str(CHECKPOINT)), device="cpu"
    ).model.state_dict()
    assert remote.keys() == local.keys()
    assert all(torch.equal(remote[k], local[k]) for k in local)
    cached = fetch_to_cache(uri, tmp_path)
    client.delete_object(Bucket="models", Key="tiny/tiny-clip-shapes.pt")
    assert fetch_to_cache(uri, tmp_path) == cached  # served from the node cache


def test_unknown_model_and_missing_checkpoint_are_named():
    with pytest.raises(ValueError, match="unknown open_clip model name 'ViT-Nope'"):
        load_clip(ModelConfig(name="ViT-Nope"), device="cpu")
    with pytest.raises(FileNotFoundError, match="model file not found"):
        load_clip(ModelConfig(name=DEMO_MODEL, pretrained="/nonexistent/model.pt"), device="cpu")
    # configuration errors: the jobs print them as one line (exit 2), not a stack trace
    with pytest.raises(ConfigError, match="unknown open_clip model name 'ViT-Nope'"):
        load_clip(ModelConfig(name="ViT-Nope"), device="cpu")
    with pytest.raises(
        ConfigError,
        match="model 'tiny-clip-shapes': Pretrained value 'no-such-tag' is not a known tag",
    ):
        load_clip(ModelConfig(name=DEMO_MODEL, pretrained="no-such-tag"), device="cpu")


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


def random_checkpoint(name: str, path, **stored) -> str:
    """A small checkpoint file holding a full state dict of `name` with random values.

    Each tensor is one random row broadcast to its shape, so a ViT-B/32 file is a few KB;
    `stored` entries (e.g. quick_gelu=True) are saved beside the state dict.
    """
    with torch.device("meta"):
        shapes = {
            k: v.shape
            for k, v in open_clip.model.CLIP(**open_clip.get_model_config(name))
            .state_dict()
            .items()
        }
    gen = torch.Generator().manual_seed(0)
    state = {
        k: (torch.randn(s[-1], generator=gen) * 0.02).expand(s) if len(s) else torch.tensor(4.6)
        for k, s in shapes.items()
    }
    torch.save({"state_dict": state, **stored}, path)
    return str(path)


def test_openai_tag_builds_quick_gelu_without_downloading(tmp_path, monkeypatch):
    """OpenAI's ViT-B/32 was trained with QuickGELU: 'auto' follows the tag's config.

    Only the download is replaced (by a random-weights file); tag resolution, model
    building, checkpoint loading and preprocessing are open_clip's own.
    """
    fake = random_checkpoint("ViT-B-32", tmp_path / "vit-b-32.pt")
    asked = []

    def no_download(cfg, *args, **kwargs):
        asked.append(cfg)
        return fake

    monkeypatch.setattr(open_clip.factory, "download_pretrained", no_download)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    clip = load_clip(ModelConfig(name="ViT-B-32", pretrained="openai"), device="cpu")
    assert len(asked) == 1 and asked[0]["quick_gelu"] is True
    block = clip.model.visual.transformer.resblocks[0]
    assert isinstance(block.mlp.gelu, QuickGELU)
    assert isinstance(clip.model.transformer.resblocks[0].mlp.gelu, QuickGELU)
    assert clip.quick_gelu and uses_quick_gelu(clip.model)
    assert float(clip.model.logit_scale) == pytest.approx(4.6)  # the file's weights loaded
    assert (clip.image_size, clip.resize_mode, clip.interpolation) == (224, "shortest", "bicubic")
    np.testing.assert_allclose(clip.mean, open_clip.OPENAI_DATASET_MEAN, rtol=1e-6)


def test_checkpoint_files_follow_their_stored_quick_gelu_flag_or_the_config(tmp_path):
    state = torch.load(CHECKPOINT, weights_only=True)
    flagged = tmp_path / "flagged.pt"
    torch.save({"state_dict": state, "quick_gelu": True}, flagged)
    assert stored_quick_gelu(str(flagged)) is True and stored_quick_gelu(str(CHECKPOINT)) is None
    auto = load_clip(ModelConfig(name=DEMO_MODEL, pretrained=str(flagged)), device="cpu")
    assert auto.quick_gelu and uses_quick_gelu(auto.model)
    off = load_clip(
        ModelConfig(name=DEMO_MODEL, pretrained=str(flagged), quick_gelu=False), device="cpu"
    )
    assert not off.quick_gelu and not uses_quick_gelu(off.model)
    plain = load_clip(ModelConfig(name=DEMO_MODEL, pretrained=str(CHECKPOINT)), device="cpu")
    assert not plain.quick_gelu  # no flag stored: the model config's own (GELU)
    forced = load_clip(
        ModelConfig(name=DEMO_MODEL, pretrained=str(CHECKPOINT), quick_gelu=True), device="cpu"
    )
    assert forced.quick_gelu
    for name, value in (("true", True), ("false", False)):  # safetensors: in the metadata
        path = tmp_path / f"{name}.safetensors"
        save_file(state, str(path), metadata={"quick_gelu": name})
        assert (
            load_clip(ModelConfig(name=DEMO_MODEL, pretrained=str(path)), device="cpu").quick_gelu
            is value
        )
    # the same weights score differently with the other activation: the flag matters
    image = torch.rand(2, 3, 32, 32)
    assert not torch.allclose(auto.model.encode_image(image), plain.model.encode_image(image))


def test_quick_gelu_setting_is_validated():
    assert ModelConfig(name=DEMO_MODEL, quick_gelu="true").quick_gelu is True
    with pytest.raises(ValueError, match="quick_gelu"):
        ModelConfig(name=DEMO_MODEL, quick_gelu="sometimes")


def test_a_tag_without_a_quick_gelu_key_keeps_the_model_config():
    """roberta-ViT-B-32's model config says QuickGELU; its laion2b tag says nothing: keep it."""
    assert (open_clip.get_model_config("roberta-ViT-B-32") or {}).get("quick_gelu") is True
    assert "quick_gelu" not in open_clip.get_pretrained_cfg("roberta-ViT-B-32", "laion2b_s12b_b32k")
    flag, why = resolve_quick_gelu("auto", "roberta-ViT-B-32", "laion2b_s12b_b32k", None)
    assert flag is None and "model config" in why
    # a tag that does say (OpenAI's) still decides
    assert resolve_quick_gelu("auto", "ViT-B-32", "openai", None)[0] is True


def test_a_checkpoint_without_a_flag_warns_for_openai_architectures(tmp_path, caplog):
    """No stored flag: the model config's GELU, with a warning where OpenAI's weights for
    that architecture were trained with QuickGELU (an s3:// checkpoint of them, say)."""
    bare = tmp_path / "weights.pt"
    torch.save({"state_dict": {}}, bare)
    caplog.set_level("WARNING", logger="cleaner.scoring.models")
    flag, _ = resolve_quick_gelu("auto", "ViT-B-32", "s3://models/vit-b-32.pt", str(bare))
    assert flag is None
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "model.quick_gelu=true" in warned[0]
    assert "s3://models/vit-b-32.pt" in warned[0]
    caplog.clear()
    for name in ("ViT-B-32-quickgelu", DEMO_MODEL):  # builds QuickGELU already; not OpenAI's
        resolve_quick_gelu("auto", name, "s3://models/x.pt", str(bare))
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
