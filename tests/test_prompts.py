"""Prompt-ensemble maths: sum over prompts of exp(cos / tau), normalised over classes."""

from __future__ import annotations

import numpy as np
import torch

from cleaner.classes import DEMO_CLASS_SPEC, ClassSpec
from cleaner.scoring.prompts import (
    PromptBank,
    ensemble_log_probs,
    ensemble_probs_numpy,
    pad_prompt_features,
)


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def reference_probs(img: np.ndarray, per_class: list[np.ndarray], tau: float) -> np.ndarray:
    """Direct transcription of docs/method.md, "Prompt ensemble", one sample and class at a time."""
    img = unit(img)
    out = np.zeros((img.shape[0], len(per_class)))
    for i in range(img.shape[0]):
        for k, feats in enumerate(per_class):
            out[i, k] = sum(np.exp(float(img[i] @ f) / tau) for f in feats)
        out[i] /= out[i].sum()
    return out


def test_matches_the_formula_with_uneven_prompt_counts():
    rng = np.random.default_rng(0)
    per_class = [unit(rng.normal(size=(j, 8))).astype(np.float32) for j in (1, 3, 5, 2)]
    img = rng.normal(size=(6, 8)).astype(np.float32)
    features, mask = pad_prompt_features(per_class)
    bank = PromptBank(features, mask, prompts=((),) * 4)
    got = ensemble_probs_numpy(img, bank, tau=0.07)
    np.testing.assert_allclose(got, reference_probs(img, per_class, 0.07), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=1e-5)


def test_padding_is_ignored_and_summing_differs_from_averaging_embeddings():
    rng = np.random.default_rng(1)
    per_class = [unit(rng.normal(size=(j, 4))).astype(np.float32) for j in (4, 1)]
    features, mask = pad_prompt_features(per_class)
    assert mask.tolist() == [[True] * 4, [True, False, False, False]]
    img = torch.from_numpy(rng.normal(size=(3, 4)).astype(np.float32))
    log_p = ensemble_log_probs(img, torch.from_numpy(features), torch.from_numpy(mask), 0.07)
    averaged = torch.stack([torch.from_numpy(unit(f.mean(0))) for f in per_class])
    avg_log_p = torch.log_softmax(
        torch.nn.functional.normalize(img, dim=-1) @ averaged.T / 0.07, -1
    )
    assert not torch.allclose(log_p, avg_log_p, atol=1e-3)


def test_class_spec_prompts_use_features_then_templates():
    spec = ClassSpec.from_dict(
        {
            "templates": ["a photo of a {c}.", "art of a {c}."],
            "classes": [{"name": "cat", "features": ["has whiskers"]}, "dog"],
        }
    )
    assert spec.prompts() == [
        ["a photo of a cat, which has whiskers."],
        ["a photo of a dog.", "art of a dog."],
    ]
    demo = ClassSpec.load(DEMO_CLASS_SPEC)
    assert demo.num_classes == 10 and all(len(p) >= 7 for p in demo.prompts())
    assert demo.most_similar()[demo.index_of("square")] == demo.index_of("rectangle")
