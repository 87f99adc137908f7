"""The CLIP scoring stage in-process: the same code path the Ray actors run."""

from __future__ import annotations

import io

import numpy as np
import open_clip
import torch
from PIL import Image

from cleaner.classes import DEMO_CLASS_SPEC, ClassSpec
from cleaner.config import ModelConfig
from cleaner.demo.tiny_clip import TINY_CLIP_NAME as DEMO_MODEL
from cleaner.reading.shards import decode_image
from cleaner.scoring.models import load_clip
from cleaner.scoring.prompts import encode_prompts
from cleaner.scoring.scorer import ClipScorer


def make_scorer() -> tuple[ClipScorer, ClassSpec]:
    spec = ClassSpec.load(DEMO_CLASS_SPEC)
    clip = load_clip(ModelConfig(name=DEMO_MODEL), device="cpu")
    bank = encode_prompts(clip.model, clip.tokenizer, spec.prompts())
    return ClipScorer(ModelConfig(name=DEMO_MODEL).model_dump(), bank, device="cpu"), spec


def test_decode_path_matches_open_clip_preprocess():
    """Our uint8 resize/crop + on-device normalisation equals open_clip's own transform."""
    scorer, _ = make_scorer()
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (48, 80, 3), dtype=np.uint8)) for _ in range(4)]
    _, _, preprocess = open_clip.create_model_and_transforms(
        "tiny-clip-shapes", pretrained=None, device="cpu"
    )
    reference = torch.stack([preprocess(img) for img in images])
    with torch.no_grad():
        ref_feats = torch.nn.functional.normalize(
            scorer.clip.model.encode_image(reference).float(), dim=-1
        )

    def to_png(img):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return buf.getvalue()

    ours = np.stack([decode_image(to_png(img), scorer.clip.image_size) for img in images])
    feats = scorer.embed(ours)
    cosine = (feats * ref_feats).sum(-1)
    assert cosine.min().item() > 0.98, cosine


def test_scores_are_consistent_and_failed_rows_have_no_label_score():
    scorer, spec = make_scorer()
    n, size = 6, scorer.clip.image_size
    rng = np.random.default_rng(1)
    batch = {
        "key": np.array([f"k{i}" for i in range(n)], dtype=object),
        "shard": np.array(["s.tar"] * n, dtype=object),
        "shard_pos": np.arange(n),
        "label": np.array([0, 1, 2, 3, -1, 5]),
        "true_label": np.full(n, -1),
        "status": np.array(["ok"] * 4 + ["failed", "ok"], dtype=object),
        "reason": np.array([""] * n, dtype=object),
        "shard_total": np.full(n, -1),
        "image": rng.integers(0, 255, (n, size, size, 3), dtype=np.uint8),
    }
    out = scorer(batch)
    assert set(ClipScorer.output_columns) == set(out)
    assert "image" not in out
    assert out["embedding"].dtype == np.float16 and out["embedding"].shape[0] == n
    assert np.isnan(out["p_label"][4]) and not np.isnan(out["p_label"][[0, 1, 2, 3, 5]]).any()
    assert (out["p_label"][[0, 1, 2, 3, 5]] <= out["max_p"][[0, 1, 2, 3, 5]] + 1e-6).all()
    assert out["topk_labels"].shape == (n, 5)
    np.testing.assert_array_equal(out["topk_labels"][:, 0], out["argmax"])
    np.testing.assert_allclose(out["topk_probs"][:, 0], out["max_p"], rtol=1e-5)
    assert out["argmax"].max() < spec.num_classes


def test_one_transfer_back_per_batch_and_no_extra_image_copy(monkeypatch):
    """The scorer brings a batch's results back in one .cpu() (one sync), and reads the
    uint8 batch in place (no full copy before the device transfer)."""
    scorer, _ = make_scorer()
    size = scorer.clip.image_size
    images = np.random.default_rng(2).integers(0, 255, (5, size, size, 3), dtype=np.uint8)
    images.setflags(write=False)  # as Ray Data hands batches over
    pixels = scorer.to_device(images)
    assert pixels.data_ptr() == images.ctypes.data
    calls = []
    real_cpu = torch.Tensor.cpu

    def counting_cpu(self, *args, **kwargs):
        calls.append(tuple(self.shape))
        return real_cpu(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "cpu", counting_cpu)
    n = len(images)
    batch = {
        "key": np.array([f"k{i}" for i in range(n)], dtype=object),
        "shard": np.array(["s.tar"] * n, dtype=object),
        "shard_pos": np.arange(n),
        "label": np.arange(n),
        "true_label": np.full(n, -1),
        "status": np.array(["ok"] * n, dtype=object),
        "reason": np.array([""] * n, dtype=object),
        "shard_total": np.full(n, -1),
        "image": images,
    }
    out = scorer(batch)
    assert len(calls) == 1, calls
    reference = scorer.embed(images).numpy().astype(np.float16)
    np.testing.assert_array_equal(out["embedding"], reference)
    assert out["topk_labels"].dtype == np.int64
