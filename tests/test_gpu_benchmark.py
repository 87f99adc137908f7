"""benchmarks/gpu.py's smoke mode: the GPU benchmark's code paths on CPU, tiny sizes.

Its figures are checked against values known without the benchmark's own formulas: a
clock that advances one second per reading makes every rate the number of images of the
smoke sizes, and the tiny CLIP's FLOPs are counted here from its architecture."""

from __future__ import annotations

import itertools
import json
from types import SimpleNamespace

import pytest
import torch

from benchmarks import gpu
from tests.conftest import free_port


def vit_forward_flops(image: int, patch: int, width: int, layers: int, embed: int) -> int:
    """FLOPs (2 per multiply-add) of a ViT image tower's matmuls for one image: patch
    embedding, per layer qkv, QK^T, AV, output projection and a 4x MLP, then the pooled
    token's projection (layer norms and softmax are not matmuls)."""
    patches = (image // patch) ** 2
    tokens = patches + 1  # the class token
    macs = patches * width * 3 * patch * patch
    per_layer = tokens * width * 3 * width + 2 * tokens * tokens * width
    per_layer += tokens * width * width + 2 * tokens * width * 4 * width
    macs += layers * per_layer + width * embed
    return 2 * macs


TINY_CLIP_FLOPS = vit_forward_flops(image=32, patch=8, width=64, layers=2, embed=64)


def test_flops_are_counted_from_the_network():
    """A linear "image tower" (6,144 multiply-adds); the tiny CLIP's ViT (in eval mode,
    as the scorer runs it) in the smoke run below."""
    linear = torch.nn.Linear(3 * 8 * 8, 32)
    flat = SimpleNamespace(encode_image=lambda x: linear(x.flatten(1)))
    assert gpu.gflop_per_image(flat, 8, torch.device("cpu")) * 1e9 == 2 * 192 * 32
    assert TINY_CLIP_FLOPS == 3_891_712


def test_gpu_benchmark_smoke_mode_writes_its_figures(tmp_path, monkeypatch):
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    seconds = itertools.count()
    monkeypatch.setattr(gpu, "time", SimpleNamespace(perf_counter=lambda: float(next(seconds))))
    out = tmp_path / "smoke.json"
    result = gpu.main(["--smoke", "--json", str(out), "--peak-tflops", "0.5"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    scoring, training = result["scoring"], result["training"]
    assert result["mode"] == "smoke" and result["device"] == "cpu"
    # each timed section is one clock second: 3 batches of 8 scored, 16 JPEGs decoded
    assert scoring["decode_excluded_images_per_s"] == 24.0
    assert scoring["decode_only_images_per_s"] == 16.0
    assert scoring["decode_included_images_per_s"] == 16.0
    assert scoring["gflop_per_image_measured"] * 1e9 == TINY_CLIP_FLOPS
    assert scoring["gflop_per_image_used"] == scoring["gflop_per_image_measured"]
    bound = 0.5e12 / TINY_CLIP_FLOPS  # 0.5 TFLOP/s over the counted FLOPs: 128,478 img/s
    assert scoring["compute_bound_images_per_s"] == pytest.approx(bound, rel=1e-12)
    assert scoring["decode_excluded_fraction_of_bound"] == pytest.approx(24.0 / bound)
    # 3 training steps of 8 images in one clock second, against NVIDIA's 2,470 img/s
    assert training["images_per_s_per_gpu"] == 24.0
    assert training["reference_images_per_s"] == 2470.0
    assert training["ratio_to_reference"] == pytest.approx(24.0 / 2470.0)
    assert training["loss_finite"] is True
    assert result["seconds"] == 9.0  # ten clock readings in all, the first at the start
