"""Parameter-efficient tuning of an open_clip image tower: LoRA or deep visual prompts.

    tuner = add_peft(clip_model.visual, "lora", rank=8)   # or "vpt", length=20
    features = clip_model.visual(images)                    # now adapted; only tuner trains

- "lora": low-rank updates of the query and value projections of every attention block
  (W_q + s * A B, W_v + s * A B; B starts at zero, s = 1 / rank, as DeFT's code), put in
  as a parametrisation of `in_proj_weight`, so the block's own attention code runs.
- "vpt": deep visual prompt tuning: before every block, `length` learned tokens replace
  the previous block's (appended after the patch tokens); they are dropped again after
  the last block, so the class token and pooling see the usual sequence.

Both work on open_clip's `VisionTransformer` (ViT towers); the rest of the tower is frozen.
`peft_state` / `load_peft_state` round-trip the tuned tensors.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

PEFT_KINDS = ("lora", "vpt")


class LoraDelta(nn.Module):
    """in_proj_weight [3W, W] -> itself plus low-rank updates of its q and v thirds."""

    def __init__(self, width: int, rank: int) -> None:
        super().__init__()
        self.width, self.scaling = width, 1.0 / rank
        self.q_a = nn.Parameter(torch.empty(width, rank))
        self.q_b = nn.Parameter(torch.zeros(rank, width))
        self.v_a = nn.Parameter(torch.empty(width, rank))
        self.v_b = nn.Parameter(torch.zeros(rank, width))
        nn.init.kaiming_uniform_(self.q_a, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.v_a, a=math.sqrt(5))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        # x @ W^T + s x A B  ==  x @ (W + s (A B)^T)^T
        dq = (self.q_a @ self.q_b).T * self.scaling
        dv = (self.v_a @ self.v_b).T * self.scaling
        zero = torch.zeros_like(dq)
        return weight + torch.cat([dq, zero, dv], dim=0).to(weight.dtype)


class DeepPrompts(nn.Module):
    """Learned tokens per block; forward pre-hooks swap them into the sequence."""

    def __init__(self, blocks: int, length: int, width: int, patch_area: int) -> None:
        super().__init__()
        bound = math.sqrt(6.0 / float(3 * patch_area + width))  # VPT's uniform init
        self.prompts = nn.Parameter(torch.empty(blocks, length, width).uniform_(-bound, bound))
        self.length = length
        self.seq_len: int | None = None
        self.batch_first = True


def _vision_blocks(visual: nn.Module):
    transformer = getattr(visual, "transformer", None)
    blocks = getattr(transformer, "resblocks", None)
    if blocks is None or not hasattr(visual, "conv1"):
        raise ValueError(
            "parameter-efficient tuning needs an open_clip ViT image tower "
            f"(got {type(visual).__name__})"
        )
    return transformer, blocks


def add_peft(visual: nn.Module, kind: str, *, rank: int = 8, length: int = 20) -> nn.Module:
    """Freeze `visual` and attach a trainable tuner; returns the tuner module (its params
    are the only trainable ones). The tower's forward now uses it."""
    if kind not in PEFT_KINDS:
        raise ValueError(f"unknown peft kind {kind!r}; choose from {', '.join(PEFT_KINDS)}")
    transformer, blocks = _vision_blocks(visual)
    visual.requires_grad_(False)
    width = blocks[0].attn.embed_dim
    if kind == "lora":
        tuner = nn.ModuleList()
        for block in blocks:
            delta = LoraDelta(width, rank)
            parametrize.register_parametrization(block.attn, "in_proj_weight", delta)
            tuner.append(delta)
        return tuner
    patch = visual.conv1.kernel_size
    tuner = DeepPrompts(len(blocks), length, width, int(patch[0] * patch[1]))
    tuner.batch_first = bool(getattr(transformer, "batch_first", True))

    def swap_in(index: int):
        def hook(module, args, kwargs):
            x = args[0]
            seq = 1 if tuner.batch_first else 0
            if index == 0:
                tuner.seq_len = x.shape[seq]
            x = x.narrow(seq, 0, tuner.seq_len)
            prompt = tuner.prompts[index].to(x.dtype)
            if tuner.batch_first:
                prompt = prompt.unsqueeze(0).expand(x.shape[0], -1, -1)
            else:
                prompt = prompt.unsqueeze(1).expand(-1, x.shape[1], -1)
            return (torch.cat([x, prompt], dim=seq), *args[1:]), kwargs

        return hook

    def drop_prompts(module, args, output):
        seq = 1 if tuner.batch_first else 0
        return output.narrow(seq, 0, tuner.seq_len)

    for index, block in enumerate(blocks):
        block.register_forward_pre_hook(swap_in(index), with_kwargs=True)
    transformer.register_forward_hook(drop_prompts)
    return tuner


def peft_state(tuner: nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().cpu() for name, t in tuner.state_dict().items()}


def load_peft_state(tuner: nn.Module, state: dict[str, torch.Tensor]) -> None:
    tuner.load_state_dict(state)
