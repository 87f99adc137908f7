"""Every shipped config validates; the paper presets carry the settings table of docs/method.md, "Settings"."""

from __future__ import annotations

from pathlib import Path

import pytest

from cleaner.config import CleanJobConfig, load_config
from training.config import TrainJobConfig
from training.networks import NETWORKS

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

# dataset: (network, batch, epochs, milestones, beta, theta_r, theta_r2), docs/method.md, "Settings"
PAPER = {
    "cifar10-sym": ("preact_resnet18", 128, 300, [200, 250], 1.0, 0.8, 0.8),
    "cifar100-sym": ("preact_resnet18", 128, 300, [200, 250], 1.0, 0.8, 0.8),
    "cifar10-idn": ("preact_resnet18", 128, 300, [200, 250], 1.0, 1.0, 1.0),
    "animal10n": ("vgg19_bn", 128, 300, [200, 250], 0.5, 0.7, 0.95),
    "red-mini-imagenet": ("preact_resnet18", 64, 300, [200, 250], 4.0, 0.8, 0.95),
    "mini-webvision": ("inception_resnet_v2", 64, 150, [80, 120], 0.5, 0.7, 1.0),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_presets_match_the_method_table(name):
    cfg = load_config(CONFIGS / "presets" / f"{name}.yaml", model=TrainJobConfig)
    network, batch, epochs, milestones, beta, theta_r, theta_r2 = PAPER[name]
    assert cfg.network.name == network
    assert (cfg.optim.batch_size, cfg.optim.epochs, cfg.optim.milestones) == (
        batch,
        epochs,
        milestones,
    )
    assert (cfg.mixfix.beta, cfg.mixfix.theta_r, cfg.mixfix.theta_r2) == (beta, theta_r, theta_r2)
    assert cfg.mixfix.mode == "mixfix" and cfg.optim.momentum == 0.9


def test_every_shipped_config_validates():
    presets = sorted((CONFIGS / "presets").glob("*.yaml"))
    assert {p.stem for p in presets} >= {*PAPER, "clothing1m"}
    for path in presets:
        cfg = load_config(path, model=TrainJobConfig)
        assert cfg.network.name in NETWORKS
        assert cfg.optim.batch_size % cfg.scaling.num_workers == 0
    load_config(CONFIGS / "train-demo.yaml", model=TrainJobConfig)
    for name in ("demo.yaml", "vit-b-32-s3.yaml"):
        load_config(CONFIGS / name, model=CleanJobConfig)


@pytest.mark.parametrize("name", ["animal10n", "clothing1m", "mini-webvision"])
def test_native_layout_presets_point_at_make_shards_output(name):
    """data.classes is the classes.yaml jobs.make_shards writes beside the train shards."""
    cfg = load_config(CONFIGS / "presets" / f"{name}.yaml", model=TrainJobConfig)
    assert cfg.data.classes == cfg.data.input.rstrip("/") + "/classes.yaml"
    text = (CONFIGS / "presets" / f"{name}.yaml").read_text()
    assert "python -m jobs.make_shards --layout" in text and cfg.data.input.rstrip("/") in text
