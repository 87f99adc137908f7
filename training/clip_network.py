"""`clip_peft`: CLIP's image tower, adapted parameter-efficiently (LoRA or deep visual
prompts), with a linear head: DeFT's second phase, fine-tuning a pretrained vision-language
model on the selected clean set (docs/method.md, "DeFT").

The training pipeline normalises images with `data.mean` / `data.std` at `data.image_size`;
the network maps them to CLIP's own normalisation and input size inside its forward, so
the job's data settings need no change. Only the tuner and the head train.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cleaner.config import ModelConfig
from cleaner.detectors.peft import add_peft


class ClipPeftClassifier(nn.Module):
    """CLIP image tower (frozen) + LoRA / visual prompts + linear head."""

    def __init__(
        self,
        model: ModelConfig,
        num_classes: int,
        *,
        peft: str = "lora",
        rank: int = 8,
        length: int = 20,
        input_mean: tuple[float, float, float] = (0.485, 0.456, 0.406),
        input_std: tuple[float, float, float] = (0.229, 0.224, 0.225),
    ) -> None:
        super().__init__()
        from cleaner.scoring.models import load_clip

        clip = load_clip(model, device="cpu")
        self.visual = clip.model.visual
        self.tuner = add_peft(self.visual, peft, rank=rank, length=length)
        self.visual.train()
        self.image_size = clip.image_size
        self.head = nn.Linear(int(self.visual.output_dim), num_classes)
        shape = (1, 3, 1, 1)
        self.register_buffer("input_mean", torch.tensor(input_mean).reshape(shape))
        self.register_buffer("input_std", torch.tensor(input_std).reshape(shape))
        self.register_buffer("clip_mean", torch.from_numpy(clip.mean).reshape(shape))
        self.register_buffer("clip_std", torch.from_numpy(clip.std).reshape(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x * self.input_std + self.input_mean - self.clip_mean) / self.clip_std
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(
                x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False
            )
        return self.head(self.visual(x))
