"""What the detectors add to training: CleanNet's soft weights in the MixFix loss, and the
clip_peft network (CLIP's image tower with LoRA or visual prompts) of DeFT's fine-tuning."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cleaner.config import ConfigError, ModelConfig, load_config
from training.config import ClipNetworkConfig, TrainDataConfig, TrainJobConfig
from training.data import load_sample_index
from training.mixfix import soft_cross_entropy, train_one_epoch
from training.networks import build_network


def test_soft_weights_scale_each_sample_and_leave_the_default_alone():
    logits = torch.randn(6, 4)
    targets = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 3, 0, 1]), 4).float()
    plain = soft_cross_entropy(logits, targets)
    assert torch.equal(soft_cross_entropy(logits, targets, torch.ones(6)), plain)
    assert soft_cross_entropy(logits, targets, torch.zeros(6)) == 0
    per_sample = torch.stack(
        [soft_cross_entropy(logits[i : i + 1], targets[i : i + 1]) for i in range(6)]
    )
    weights = torch.tensor([1.0, 0.0, 0.5, 0.25, 0.0, 2.0])
    torch.testing.assert_close(
        soft_cross_entropy(logits, targets, weights), (weights * per_sample).mean()
    )


def test_zero_weights_train_nothing_and_unit_weights_train_as_unweighted():
    def run(weights):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        x = torch.randn(8, 3, 2, 2)
        y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
        batch = (x, y) if weights is None else (x, y, weights)
        before = [p.detach().clone() for p in model.parameters()]
        train_one_epoch(
            model, optimizer, [batch], beta=1.0, device="cpu", generator=np.random.default_rng(3)
        )
        return before, [p.detach() for p in model.parameters()]

    before, after = run(torch.zeros(8))
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    _, unweighted = run(None)
    _, unit = run(torch.ones(8))
    assert all(torch.equal(a, b) for a, b in zip(unweighted, unit, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(before, unweighted, strict=True))


def test_sample_index_reads_cleannet_relevance_as_weights(tmp_path):
    path = tmp_path / "manifest.parquet"
    manifest = {
        "shard": ["s"] * 4,
        "shard_pos": [0, 1, 2, 3],
        "label": [0, 1, 1, -1],
        "is_clean": [True, False, True, False],
        "status": ["clean", "noisy", "clean", "failed"],
    }
    pq.write_table(pa.table(manifest), path)
    with pytest.raises(ValueError, match="no cleannet_relevance column"):
        load_sample_index(str(path), sample_weights="cleannet")
    relevance = pa.array([0.8, -0.3, 0.1, None], pa.float32())
    pq.write_table(pa.table({**manifest, "cleannet_relevance": relevance}), path)
    index = load_sample_index(str(path), sample_weights="cleannet")
    np.testing.assert_allclose(index.weights, [0.8, 0.0, 0.1, 0.0])
    assert load_sample_index(str(path)).weights is None


@pytest.mark.parametrize("peft", ["lora", "vpt"])
def test_clip_peft_trains_only_its_tuner_and_head(peft):
    data = TrainDataConfig(input="x", classes="demo", manifest="m", image_size=24)
    clip = ClipNetworkConfig(
        model=ModelConfig(name="tiny-clip-shapes"), peft=peft, lora_rank=2, vpt_len=3
    )
    model = build_network("clip_peft", 3, clip=clip, data=data)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert (
        frozen and trainable and all(n.startswith(("tuner", "head", "visual")) for n in trainable)
    )
    assert {"head.weight", "head.bias"} <= trainable
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x = torch.randn(4, 3, 24, 24)  # resized to the tiny CLIP's 32 px inside
    logits = model(x)
    assert logits.shape == (4, 3)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 0])).backward()
    optimizer.step()
    for name, value in model.named_parameters():
        if name in frozen:
            assert torch.equal(value, frozen[name]), name
    assert not torch.equal(model(x), logits)


def test_clip_peft_needs_its_clip_section():
    base = ["data.input=x", "data.classes=demo", "data.manifest=m", "run.storage=s"]
    with pytest.raises(ConfigError, match=r"clip_peft needs network\.clip"):
        load_config(None, [*base, "network.name=clip_peft"], TrainJobConfig)
    cfg = load_config(
        None,
        [
            *base,
            "network.name=clip_peft",
            "network.clip.model.name=tiny-clip-shapes",
            "mixfix.mode=deft",
        ],
        TrainJobConfig,
    )
    assert cfg.mixfix.mixup_beta == 0.0 and not cfg.mixfix.class_balanced
    assert load_config(None, base, TrainJobConfig).mixfix.mixup_beta == 1.0
