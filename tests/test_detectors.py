"""The detectors beside CLIPCleaner's (cleaner/detectors/) on small generated embeddings,
in this process (LocalBlocks): DeFT's prompts, CleanNet's transfer, the ensemble, and
their columns in a manifest."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from cleaner.config import CleanNetConfig, ConfigError, DeftConfig, load_config
from cleaner.detectors import cleannet, deft
from cleaner.detectors.apply import FittedDetectors, apply_detectors, compare_detectors
from cleaner.detectors.blocks import LocalBlocks, concat_blocks
from cleaner.detectors.ensemble import EnsembleCalibration, histogram, part_statistics
from cleaner.detectors.fit import fit_cleannet
from cleaner.detectors.verified import VerifiedLabels
from cleaner.metrics import detection_metrics
from cleaner.scoring.writing import fixed_size_list_array
from cleaner.selection.probe_streaming import stable_hash
from cleaner.selection.score_table import ScoreBatch


def blocks_of(embeddings, labels, true_labels, parts: int = 3) -> list[dict]:
    """Generated rows as `parts` blocks (keys k0, k1, ...)."""
    keys = np.array([f"k{i}" for i in range(len(labels))], dtype=object)
    rows = {
        "key": keys,
        "key_hash": stable_hash(keys.astype(str)),
        "label": np.asarray(labels, dtype=np.int64),
        "true_label": np.asarray(true_labels, dtype=np.int64),
        "embedding": np.asarray(embeddings, dtype=np.float16),
    }
    return [{name: v[p::parts] for name, v in rows.items()} for p in range(parts)]


def noisy_clusters(centres, n, spread, noise_rate, seed):
    """Unit embeddings around class centres; symmetric label noise. (emb, labels, truth)"""
    rng = np.random.default_rng(seed)
    k = len(centres)
    truth = rng.integers(0, k, n)
    emb = centres[truth] + rng.normal(0, spread, (n, centres.shape[1]))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    flip = rng.random(n) < noise_rate
    labels = np.where(flip, (truth + rng.integers(1, k, n)) % k, truth)
    return emb, labels, truth


# --------------------------------------------------------------------------------------
# DeFT
# --------------------------------------------------------------------------------------


def test_deft_block_gradients_sum_to_the_whole_batch_gradient():
    """The trainer's step uses the sum of per-block gradients: it must equal the gradient
    of the one-batch loss (cls mean over the taken samples + neg mean over all)."""
    import torch

    rng = np.random.default_rng(1)
    k, d, n = 5, 8, 90
    emb, labels, truth = noisy_clusters(rng.normal(size=(k, d)), n, 0.5, 0.4, 2)
    state = {
        "positive": rng.normal(size=(k, d)).astype(np.float32),
        "negative": rng.normal(size=(k, d)).astype(np.float32),
        "scale": 4.0,
    }
    state["positive"] /= np.linalg.norm(state["positive"], axis=1, keepdims=True)
    state["negative"] /= np.linalg.norm(state["negative"], axis=1, keepdims=True)
    blocks = blocks_of(emb, labels, truth, parts=3)
    for warmup in (True, False):
        total = deft.sum_partials(
            [deft.deft_partial(b, state, 7, warmup, 1.0, False, 0) for b in blocks]
        )
        whole = concat_blocks(blocks)
        pos = torch.tensor(state["positive"], requires_grad=True)
        neg = torch.tensor(state["negative"], requires_grad=True)
        images = torch.from_numpy(whole["embedding"].astype(np.float32))
        images = torch.nn.functional.normalize(images, dim=1)
        other = deft.complementary_labels(
            whole["label"], k, deft.step_uniforms(whole["key_hash"], 0, 7, 1)
        )
        cls_sum, count, neg_sum, selected = deft.deft_objective(
            4.0 * images @ pos.T,
            4.0 * images @ neg.T,
            torch.from_numpy(whole["label"]),
            torch.from_numpy(other),
            warmup=warmup,
            require_argmax=False,
        )
        (cls_sum / count + neg_sum / n).backward()
        assert total["n"] == n and total["cls_count"] == count
        assert (count == n) == warmup and int(selected.sum()) == total["selected"]
        np.testing.assert_allclose(total["grad_positive"] / count, pos.grad, atol=1e-5)
        np.testing.assert_allclose(total["grad_negative"] / n, neg.grad, atol=1e-5)
        assert np.abs(pos.grad.numpy()).sum() > 0 and np.abs(neg.grad.numpy()).sum() > 0


def test_complementary_labels_never_the_label():
    labels = np.arange(1000) % 7
    other = deft.complementary_labels(labels, 7, np.random.default_rng(0).random(1000))
    assert (other != labels).all() and set(np.unique(other)) == set(range(7))


def tiny_clip_zero_shot():
    """The demo's class names, the tiny CLIP and its unit text features of "a photo of a
    {class}." [K, D]."""
    import torch

    from cleaner.classes import DEMO_CLASS_SPEC, ClassSpec
    from cleaner.config import ModelConfig
    from cleaner.scoring.models import load_clip

    names = ClassSpec.load(DEMO_CLASS_SPEC).names
    clip = load_clip(ModelConfig(name="tiny-clip-shapes"), device="cpu")
    with torch.no_grad():
        text = clip.model.encode_text(clip.tokenizer([f"a photo of a {c}." for c in names]))
    return names, clip, torch.nn.functional.normalize(text.float(), dim=-1).numpy()


def fit_deft_here(names, emb, labels, truth, cfg: DeftConfig):
    """DeFT's prompts trained in this process on generated rows (3 blocks)."""
    from cleaner.config import ModelConfig

    trainer = deft.PromptTrainer(
        ModelConfig(name="tiny-clip-shapes").model_dump(), names, cfg.model_dump(), seed=0
    )
    blocks = LocalBlocks(blocks_of(emb, labels, truth))
    return deft.train_prompts(blocks, deft.Handle(trainer), cfg, len(labels), 0, log=lambda m: None)


def test_deft_positive_prompts_start_at_the_zero_shot_features():
    """ctx_init (default "a photo of a", CoOp's): the context is the template's 4 token
    embeddings, so the positive prompts start as CLIP's zero-shot text features of "a photo
    of a {class}." (random context vectors, the official init, do not); a template that
    leaves no room for the class names is a config error naming it."""
    import torch

    names, clip, zero_shot = tiny_clip_zero_shot()
    for ctx_init, n_ctx in (("a photo of a", 4), ("", 11)):
        learner = deft.PromptLearner(clip, names, DeftConfig(ctx_init=ctx_init), seed=0)
        assert learner.n_ctx == n_ctx  # random: what the tiny CLIP's 16-token context holds
        with torch.no_grad():
            positive = learner.encode(learner.positive).numpy()
            negative = learner.encode(learner.negative).numpy()
        gap = np.abs(positive - zero_shot).max()
        assert (gap < 1e-4) == bool(ctx_init), (ctx_init, gap)
        assert np.abs(negative - zero_shot).max() > 1e-3  # the negatives: random context
    with pytest.raises(ConfigError, match="ctx_init"):
        deft.PromptLearner(clip, names, DeftConfig(ctx_init="a b c d e f g h i j k l"), 0)


def test_deft_prompts_detect_noise_with_the_tiny_clip():
    """Images near the tiny CLIP's text features of their true class, 40% wrong labels:
    the learned prompts flag the wrong ones and their classifier suggests the truth."""
    names, _, centres = tiny_clip_zero_shot()
    emb, labels, truth = noisy_clusters(centres, 600, 0.2, 0.4, 3)
    cfg = DeftConfig(steps=40, warmup_steps=4, lr=0.004)
    fitted = fit_deft_here(names, emb, labels, truth, cfg)
    assert fitted.n_ctx == 4  # the tokens of ctx_init, "a photo of a"
    out = fitted.evaluate(emb, labels)
    metrics = detection_metrics(out.is_clean, labels == truth, out.clean_score)
    assert metrics["auroc"] > 0.9
    assert metrics["precision"] > (labels == truth).mean() + 0.2
    assert metrics["recall"] > 0.7
    assert (out.suggested == truth).mean() > 0.9
    np.testing.assert_array_equal(out.is_clean, out.columns["deft_p_clean"] > 0.5)
    np.testing.assert_array_equal(
        out.is_clean, out.columns["deft_sim_positive"] > out.columns["deft_sim_negative"]
    )


# --------------------------------------------------------------------------------------
# CleanNet
# --------------------------------------------------------------------------------------


def test_cleannet_transfers_to_classes_without_verified_samples():
    """Verified samples from classes 0-3 only; relevance still separates right from wrong
    labels in classes 4 and 5, and the threshold comes from held-out verified rows."""
    centres = np.random.default_rng(5).normal(size=(6, 24))
    emb, labels, truth = noisy_clusters(centres, 1200, 0.35, 0.4, 6)
    blocks = LocalBlocks(blocks_of(emb, labels, truth))
    verified_rows = np.flatnonzero(labels < 4)[:120]
    verified = VerifiedLabels("test", {f"k{i}": int(truth[i]) for i in verified_rows.tolist()})
    cfg = load_config(
        None,
        [
            "data.input=x",
            "data.classes=demo",
            "model.name=tiny-clip-shapes",
            "output=o",
            "selection.detector=cleannet",
            "selection.verified=v.csv",
            "selection.cleannet.steps=1500",
            "selection.cleannet.num_ref=8",
        ],
    )
    fitted = fit_cleannet(blocks, cfg, verified, 6, 24, log=lambda m: None)
    assert fitted.calibration["verified_classes"] == 4
    assert (
        fitted.calibration["threshold_rows"] == 24 and not fitted.calibration["threshold_in_sample"]
    )
    keys = np.array([f"k{i}" for i in range(len(labels))], dtype=object)
    out = fitted.evaluate(emb, labels, keys)
    unseen = labels >= 4
    held = detection_metrics(
        out.is_clean[unseen], (labels == truth)[unseen], out.clean_score[unseen]
    )
    assert held["auroc"] > 0.9 and held["precision"] > 0.85
    # verified rows are trusted: their verdict and suggestion are the verified label's
    rows = verified_rows
    np.testing.assert_array_equal(out.is_clean[rows], labels[rows] == truth[rows])
    np.testing.assert_array_equal(out.suggested[rows], truth[rows])
    assert (out.columns["cleannet_verified_label"][rows] == truth[rows]).all()
    assert (out.columns["cleannet_verified_label"][~np.isin(np.arange(1200), rows)] == -1).all()


def test_cleannet_threshold_is_the_most_accurate_cut():
    cos = np.array([0.9, 0.8, 0.3, 0.2, 0.6, 0.1])
    right = np.array([1, 1, 0, 0, 1, 0], dtype=bool)
    threshold, accuracy = cleannet.fit_threshold(cos, right)
    assert accuracy == 1.0 and 0.3 < threshold <= 0.6


def test_cleannet_reference_sets_are_k_means_of_each_class():
    centres = np.eye(3, 4) * 3
    emb, labels, truth = noisy_clusters(centres, 300, 0.05, 0.0, 7)
    block = blocks_of(emb, labels, truth, parts=1)[0]
    cfg = CleanNetConfig(num_ref=2, ref_sample=50)
    parts = cleannet.sample_candidates(block, np.ones(3), 1, seed=0)
    out = cleannet.class_samples_and_references(cfg, 3, 4, 0, parts[0])
    assert sorted(out["references"]) == [0, 1, 2]
    for k in range(3):
        assert len(out["samples"][k]) == 50  # the lowest priorities, at most ref_sample
        assert out["references"][k].shape == (2, 4)
        assert np.argmax(out["references"][k].mean(axis=0)) == k


# --------------------------------------------------------------------------------------
# Ensemble
# --------------------------------------------------------------------------------------


def test_ensemble_ranks_add_up_over_parts_and_follow_each_member():
    rng = np.random.default_rng(0)
    base = rng.random(500)  # members that mostly agree, as detectors of one dataset do
    scores = {"clipcleaner": base, "deft": 0.9 * base + rng.uniform(0, 0.1, 500)}
    clean = {m: s > 0.4 for m, s in scores.items()}
    members = ("clipcleaner", "deft")
    whole = EnsembleCalibration.from_parts(members, [part_statistics(members, scores, clean)])
    halves = [
        part_statistics(
            members, {m: s[i::2] for m, s in scores.items()}, {m: c[i::2] for m, c in clean.items()}
        )
        for i in range(2)
    ]
    split = EnsembleCalibration.from_parts(members, halves)
    for m in members:
        np.testing.assert_array_equal(whole.counts[m], split.counts[m])
        rank = whole.rank(m, scores[m])
        exact = np.argsort(np.argsort(scores[m])) / 500
        assert np.abs(rank - exact).max() < 0.01  # the CDF is each score's rank
    assert whole.clean_fraction == pytest.approx(np.mean([c.mean() for c in clean.values()]))
    score, is_clean = whole.combine(scores)
    assert is_clean.mean() == pytest.approx(whole.clean_fraction, abs=0.06)
    assert np.array_equal(is_clean, score >= 1 - whole.clean_fraction)
    assert histogram("cleannet", np.array([-2.0, 2.0, np.nan])).sum() == 2  # clipped, NaN out


# --------------------------------------------------------------------------------------
# Into the manifest
# --------------------------------------------------------------------------------------


def small_manifest() -> pa.Table:
    """Five manifest rows as CLIPCleaner writes them: rows 0-3 usable, row 4 failed."""
    return pa.table(
        {
            "key": ["a", "b", "c", "d", "e"],
            "label": [0, 1, 1, 0, -1],
            "is_clean": [True, True, False, False, False],
            "status": ["clean", "clean", "noisy", "noisy", "failed"],
            "suggested_label": [0, 1, 0, -1, -1],
            "suggested_confidence": np.array([0.9, 0.8, 0.7, 0.2, np.nan], np.float32),
            "clean_score": np.array([0.9, 0.7, 0.2, 0.3, np.nan], np.float32),
            "true_label": [0, 0, 0, 0, -1],
            "top_labels": fixed_size_list_array(
                np.array([[0, 1], [1, 0], [0, 1], [1, 0], [-1, -1]])
            ),
            "top_probs": fixed_size_list_array(
                np.array(
                    [[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.2, 0.1], [np.nan, np.nan]], np.float32
                )
            ),
        }
    )


def test_deft_verdict_replaces_the_contract_columns():
    # two classes, two dimensions: images on the axes; class 0's positive prompt on axis 0
    fitted = deft.FittedDeft(
        positive=np.eye(2, dtype=np.float32),
        negative=np.full((2, 2), 0.5**0.5, dtype=np.float32),
        scale=10.0,
    )
    detectors = FittedDetectors("deft", {"deft": fitted}, ("clipcleaner", "deft"))
    table = small_manifest()
    embeddings = np.array([[1, 0], [1, 0], [0, 1], [1, 0], [0, 0]], dtype=np.float16)
    scores = pa.table(
        {
            "key": list("abcde"),
            "shard": ["s"] * 5,
            "shard_pos": np.arange(5),
            "status": ["ok"] * 4 + ["failed"],
            "reason": [""] * 4 + ["unreadable image"],
            "label": [0, 1, 1, 0, -1],
            "embedding": fixed_size_list_array(embeddings),
        }
    )
    out = apply_detectors(table, ScoreBatch(scores), detectors, ["x", "y"])
    # row: label, image axis -> deft clean when the label's axis is the image's
    assert out.column("is_clean").to_pylist() == [True, False, True, True, False]
    assert out.column("status").to_pylist() == ["clean", "noisy", "clean", "clean", "failed"]
    assert out.column("clipcleaner_clean").to_pylist() == [True, True, False, False, False]
    assert out.column("deft_clean").to_pylist() == out.column("is_clean").to_pylist()
    # the noisy row gets DeFT's own suggestion (class 0, the image's axis); clean rows their label
    assert out.column("suggested_label").to_pylist() == [0, 0, 1, 0, -1]
    assert out.column("suggested_name").to_pylist() == ["x", "x", "y", "x", None]
    assert np.isnan(out.column("deft_p_clean").to_numpy()[4])
    comparison = compare_detectors(
        {name: out.column(name).to_numpy(zero_copy_only=False) for name in out.column_names},
        detectors,
    )
    assert comparison["chosen"] == "deft"
    assert comparison["detectors"]["deft"]["clean"] == 3
    assert comparison["detectors"]["clipcleaner"]["agreement_with_chosen"] == 0.25
    assert comparison["detectors"]["deft"]["detection"]["tp"] == 2  # rows a, d (true 0)


def _rows_plus(block, state, extra):
    return len(block["label"]) + state["offset"] + extra


@pytest.mark.integration
def test_ray_blocks_resolve_object_references_among_the_arguments(local_ray):
    """DeFT's steps pass the trainer's state as an object reference: the block tasks get
    the value (a reference nested in a tuple would reach them unresolved)."""
    from cleaner.detectors.blocks import RayBlocks

    blocks = RayBlocks.__new__(RayBlocks)
    blocks.refs = [local_ray.put({"label": np.zeros(n, dtype=np.int64)}) for n in (3, 5, 7)]
    blocks.groups = [blocks.refs[0::2], blocks.refs[1::2]]
    state = local_ray.put({"offset": 100})
    assert blocks.map(_rows_plus, state, 1) == [104, 106, 108]
    parts = blocks.map_partitioned(_rows_plus_pair, 2, state)
    assert sorted(flat for p in local_ray.get(parts[1]) for flat in p) == [203, 205, 207]


def _rows_plus_pair(block, state):
    n = len(block["label"]) + state["offset"]
    return n, n + 100
