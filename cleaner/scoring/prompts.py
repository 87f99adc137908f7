"""Prompt-ensemble zero-shot classifier maths (docs/method.md, "Prompt ensemble").

P_zs(y=k | x) is proportional to sum_j exp(cos(g(x), h(P_kj)) / tau), normalised over k.
Text features are encoded once per job into a padded [K, J_max, D] tensor plus a mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported where it is used: readers and the fit unpickle
    import torch  # PromptBank without paying torch's import (seconds per Ray worker)

DEFAULT_TAU = 0.07


@dataclass(frozen=True)
class PromptBank:
    """Normalised text features of a prompt ensemble, padded to J_max prompts per class."""

    features: np.ndarray  # float32 [K, J_max, D], L2-normalised, zeros where mask is False
    mask: np.ndarray  # bool [K, J_max]
    prompts: tuple[tuple[str, ...], ...]

    @property
    def num_classes(self) -> int:
        return int(self.features.shape[0])


def pad_prompt_features(per_class: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Stack per-class [J_k, D] feature arrays into a padded [K, J_max, D] array and mask."""
    if not per_class:
        raise ValueError("no classes to pad")
    j_max = max(f.shape[0] for f in per_class)
    dim = per_class[0].shape[1]
    features = np.zeros((len(per_class), j_max, dim), dtype=np.float32)
    mask = np.zeros((len(per_class), j_max), dtype=bool)
    for k, f in enumerate(per_class):
        if f.shape[0] == 0:
            raise ValueError(f"class {k} has no prompts")
        features[k, : f.shape[0]] = f
        mask[k, : f.shape[0]] = True
    return features, mask


def encode_prompts(
    model: torch.nn.Module,
    tokenizer,
    prompts: list[list[str]],
    device: torch.device | str = "cpu",
    batch_size: int = 256,
) -> PromptBank:
    """Encode the K x J_k prompts once with the CLIP text tower; L2-normalise each."""
    import torch

    flat = [p for class_prompts in prompts for p in class_prompts]
    chunks = []
    for start in range(0, len(flat), batch_size):
        tokens = tokenizer(flat[start : start + batch_size]).to(device)
        with torch.no_grad():
            feats = model.encode_text(tokens).float()
        chunks.append(torch.nn.functional.normalize(feats, dim=-1).cpu().numpy())
    all_feats = np.concatenate(chunks, axis=0)
    per_class, offset = [], 0
    for class_prompts in prompts:
        per_class.append(all_feats[offset : offset + len(class_prompts)])
        offset += len(class_prompts)
    features, mask = pad_prompt_features(per_class)
    return PromptBank(features, mask, tuple(tuple(p) for p in prompts))


def ensemble_log_probs(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    mask: torch.Tensor,
    tau: float = DEFAULT_TAU,
) -> torch.Tensor:
    """log P_zs(y=k|x) for a batch: logsumexp_j(cos/tau) per class, log-softmax over classes.

    image_features: [B, D] (normalised inside); text_features: [K, J, D] normalised;
    mask: bool [K, J]. Returns float32 [B, K].
    """
    import torch

    img = torch.nn.functional.normalize(image_features.float(), dim=-1)
    k, j, d = text_features.shape
    sims = img @ text_features.float().reshape(k * j, d).T  # [B, K*J]
    logits = (sims / tau).reshape(-1, k, j)
    logits = logits.masked_fill(~mask.bool().unsqueeze(0), float("-inf"))
    per_class = torch.logsumexp(logits, dim=-1)  # [B, K]
    return torch.log_softmax(per_class, dim=-1)


def ensemble_probs_numpy(
    image_features: np.ndarray, bank: PromptBank, tau: float = DEFAULT_TAU
) -> np.ndarray:
    """Numpy convenience wrapper of ensemble_log_probs returning probabilities [N, K]."""
    import torch

    log_p = ensemble_log_probs(
        torch.from_numpy(np.asarray(image_features, dtype=np.float32)),
        torch.from_numpy(bank.features),
        torch.from_numpy(bank.mask),
        tau,
    )
    return log_p.exp().numpy()
