"""benchmarks/gpu.py's smoke mode: the GPU benchmark's code paths on CPU, tiny sizes."""

from __future__ import annotations

import json

from benchmarks import gpu
from tests.conftest import free_port


def test_gpu_benchmark_smoke_mode_writes_its_figures(tmp_path, monkeypatch):
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    out = tmp_path / "smoke.json"
    result = gpu.main(["--smoke", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    scoring, training = result["scoring"], result["training"]
    assert result["mode"] == "smoke" and result["device"] == "cpu"
    for key in ("decode_excluded", "decode_only", "decode_included"):
        assert scoring[f"{key}_images_per_s"] > 0
    assert 0 < scoring["gflop_per_image_measured"] < 0.1  # the tiny model, counted by torch
    assert scoring["compute_bound_images_per_s"] > scoring["decode_excluded_images_per_s"]
    assert training["images_per_s_per_gpu"] > 0 and training["loss_finite"]
    assert training["ratio_to_reference"] == training["images_per_s_per_gpu"] / 2470.0
