"""The CLIP scoring stage: uint8 images in, zero-shot scores and embeddings out.

`ClipScorer` is a Ray Data actor class (it loads its model once in __init__ and maps
dict[str, ndarray] -> dict[str, ndarray] in __call__), but it is plain Python and runs
in-process too, which is how the unit tests and the benchmark's model-only stage use it.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from cleaner.config import ModelConfig
from cleaner.reading.shards import STATUS_OK
from cleaner.scoring.models import LoadedClip, load_clip
from cleaner.scoring.prompts import PromptBank, ensemble_log_probs

PASSTHROUGH_COLUMNS = (
    "key",
    "shard",
    "shard_pos",
    "label",
    "true_label",
    "status",
    "reason",
    "shard_total",
)


class ClipScorer:
    """Scores batches with a frozen CLIP and a prompt-ensemble text matrix."""

    input_columns = ("image", "label", "status", *PASSTHROUGH_COLUMNS)
    output_columns = (
        *PASSTHROUGH_COLUMNS,
        "p_label",
        "max_p",
        "argmax",
        "topk_labels",
        "topk_probs",
        "embedding",
    )

    def __init__(
        self,
        model_config: dict,
        prompt_bank: PromptBank | list,
        tau: float = 0.07,
        top_k: int = 5,
        device: str | None = None,
        num_threads: int | None = None,
    ):
        if isinstance(
            prompt_bank, list
        ):  # [ObjectRef] from the driver: fetched, not copied per call
            import ray

            prompt_bank = ray.get(prompt_bank[0])
        if num_threads:
            torch.set_num_threads(num_threads)
        self.clip: LoadedClip = load_clip(ModelConfig(**model_config), device=device)
        self.text = torch.tensor(prompt_bank.features).to(self.clip.device)
        self.mask = torch.tensor(prompt_bank.mask).to(self.clip.device)
        self.tau, self.top_k = tau, min(top_k, prompt_bank.num_classes)
        shape = (1, 3, 1, 1)
        self.mean = torch.from_numpy(self.clip.mean).reshape(shape).to(self.clip.device)
        self.std = torch.from_numpy(self.clip.std).reshape(shape).to(self.clip.device)

    @torch.no_grad()
    def embed(self, images: np.ndarray) -> torch.Tensor:
        """uint8 [B, S, S, 3] -> L2-normalised float32 image embeddings [B, D]."""
        pixels = torch.from_numpy(np.array(images, dtype=np.uint8, copy=True)).to(self.clip.device)
        pixels = pixels.permute(0, 3, 1, 2).float().div_(255.0).sub_(self.mean).div_(self.std)
        amp = (
            torch.autocast(self.clip.device.type, dtype=self.clip.amp_dtype)
            if self.clip.amp_dtype is not None
            else contextlib.nullcontext()
        )
        with amp:
            feats = self.clip.model.encode_image(pixels)
        return torch.nn.functional.normalize(feats.float(), dim=-1)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feats = self.embed(batch["image"])
        with torch.no_grad():
            probs = ensemble_log_probs(feats, self.text, self.mask, self.tau).exp_()
            top_p, top_i = probs.topk(self.top_k, dim=-1)
        probs_np = probs.cpu().numpy()
        labels = np.asarray(batch["label"], dtype=np.int64)
        ok = (np.asarray(batch["status"]) == STATUS_OK) & (labels >= 0)
        p_label = np.full(len(labels), np.nan, dtype=np.float32)
        rows = np.nonzero(ok)[0]
        p_label[rows] = probs_np[rows, labels[rows]]
        out = {name: batch[name] for name in PASSTHROUGH_COLUMNS}
        out.update(
            p_label=p_label,
            max_p=probs_np.max(axis=1).astype(np.float32),
            argmax=probs_np.argmax(axis=1).astype(np.int64),
            topk_labels=top_i.cpu().numpy().astype(np.int64),
            topk_probs=top_p.cpu().numpy().astype(np.float32),
            embedding=feats.cpu().numpy().astype(np.float16),
        )
        return out
