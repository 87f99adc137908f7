"""Image preprocessing follows each model's preprocess_cfg, as open_clip's own transform."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image

from cleaner.config import ModelConfig
from cleaner.demo.tiny_clip import TINY_CLIP_NAME as DEMO_MODEL
from cleaner.reading.shards import decode_image, read_shard
from cleaner.scoring.models import ASSETS_DIR, load_clip
from tests.conftest import write_tar

CLIPA_LIKE = {"resize_mode": "squash", "interpolation": "bilinear", "mean": (0.5,) * 3}


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("resize_mode", "interpolation"),
    [
        ("shortest", "bicubic"),
        ("squash", "bilinear"),
        ("longest", "bicubic"),
        ("squash", "bicubic"),
    ],
)
def test_decode_equals_open_clip_inference_transform(resize_mode, interpolation):
    """Our uint8 decode + normalisation equals open_clip's transform for the same config."""
    rng = np.random.default_rng(0)
    size, mean, std = 32, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    cfg = PreprocessCfg(
        size=size, resize_mode=resize_mode, interpolation=interpolation, mean=mean, std=std
    )
    reference = image_transform_v2(cfg, is_train=False)
    for height, width in [(48, 80), (61, 37), (32, 32), (12, 20), (33, 100)]:
        image = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
        ours = decode_image(png(image), size, resize_mode, interpolation)
        assert ours.shape == (size, size, 3)
        pixels = torch.from_numpy(ours.copy()).permute(2, 0, 1).float().div(255.0)
        pixels = (pixels - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
        expected = reference(Image.fromarray(image))
        torch.testing.assert_close(pixels, expected, atol=1e-5, rtol=0), (height, width)


def test_models_with_different_preprocess_cfgs_decode_differently(tmp_path):
    """The bundled model (OpenAI-style shortest/bicubic) vs the same model with a CLIPA-style
    preprocess_cfg (squash/bilinear, other mean): load_clip reports each model's own, and
    read_shard resizes as the model asks."""
    folder = tmp_path / "clipa-like"
    folder.mkdir()
    config = json.loads((ASSETS_DIR / "tiny-clip-shapes.json").read_text())
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": config, "preprocess_cfg": CLIPA_LIKE})
    )
    (folder / "open_clip_pytorch_model.bin").write_bytes(
        (ASSETS_DIR / "tiny-clip-shapes.pt").read_bytes()
    )
    openai_like = load_clip(ModelConfig(name=DEMO_MODEL), device="cpu")
    clipa_like = load_clip(ModelConfig(name=f"local-dir:{folder}"), device="cpu")
    assert (openai_like.resize_mode, openai_like.interpolation) == ("shortest", "bicubic")
    assert (clipa_like.resize_mode, clipa_like.interpolation) == ("squash", "bilinear")
    np.testing.assert_allclose(clipa_like.mean, 0.5)
    assert not np.allclose(openai_like.mean, 0.5)

    wide = np.random.default_rng(1).integers(0, 255, (40, 90, 3), dtype=np.uint8)
    shard = write_tar(tmp_path / "s.tar", [("a.png", png(wide)), ("a.cls", b"0")])
    decoded = {}
    for name, clip in (("openai", openai_like), ("clipa", clipa_like)):
        (batch,) = read_shard(
            str(shard),
            class_names=["circle", "square"],
            image_size=clip.image_size,
            extensions=["png"],
            **clip.resize,
        )
        assert list(batch["status"]) == ["ok"]
        decoded[name] = batch["image"][0]
    np.testing.assert_array_equal(
        decoded["clipa"], decode_image(png(wide), 32, "squash", "bilinear")
    )
    np.testing.assert_array_equal(decoded["openai"], decode_image(png(wide), 32))
    assert not np.array_equal(decoded["clipa"], decoded["openai"])
