"""Tests for training.mixfix (docs/method.md, "MixFix") and training.networks; no Ray."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from training.mixfix import (
    MixFixState,
    clip_topk_allows,
    make_optimizer,
    make_scheduler,
    mixup,
    predict,
    soft_cross_entropy,
    train_one_epoch,
    update_selection,
)
from training.networks import NETWORKS, build_network, load_initial_weights
from training.sampling import ClassBalancedSampler, balanced_epoch_indices, iterations_per_epoch
from training.transforms import augment_batch, to_tensor_batch


@pytest.fixture(autouse=True)
def single_torch_thread():
    """One intra-op thread: on small shared CPUs, OpenMP spinning makes 2 threads ~10x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# --------------------------------------------------------------------------------------
# update_selection
# --------------------------------------------------------------------------------------


def _state(original: list[int], initial_clean: list[bool]) -> MixFixState:
    return MixFixState.initial(np.array(initial_clean), np.array(original))


def test_absorb_and_relabel_branches() -> None:
    #                  0     1     2     3     4     5
    original = [0, 1, 2, 0, 1, 2]
    clean = [False] * 6
    state = _state(original, clean)
    prob = np.array([0.9, 0.5, 0.97, 0.85, 0.2, 0.99])
    pred = np.array([0, 1, 0, 1, 0, 2])
    # theta_r = 0.8, theta_r2 = 0.95
    # 0: agrees, p >= 0.8 -> absorbed
    # 1: agrees, p < 0.8 -> out
    # 2: disagrees, p >= 0.95 -> relabelled to 0
    # 3: disagrees, 0.8 <= p < 0.95 -> out (relabel needs theta_r2)
    # 4: disagrees, low p -> out
    # 5: agrees, high p -> absorbed
    update = update_selection(state, prob, pred, theta_r=0.8, theta_r2=0.95)
    new = update.state
    np.testing.assert_array_equal(new.selected, [True, False, True, False, False, True])
    np.testing.assert_array_equal(new.current_labels, [0, 1, 0, 0, 1, 2])
    np.testing.assert_array_equal(update.absorbed_mask, [True, False, False, False, False, True])
    np.testing.assert_array_equal(update.relabelled_mask, [False, False, True, False, False, False])
    assert (update.absorbed, update.relabelled, update.selected, update.added) == (2, 1, 3, 3)
    assert new.epoch == state.epoch + 1
    # The input state is untouched and the originals are never modified.
    np.testing.assert_array_equal(state.selected, np.zeros(6, dtype=bool))
    np.testing.assert_array_equal(new.original_labels, original)


def test_clip_guard_blocks_updates_clip_disagrees_with() -> None:
    # Every sample would be absorbed (0, 1) or relabelled (2, 3) by the paper's rule.
    state = _state([0, 1, 2, 3], [False] * 4)
    prob = np.full(4, 0.99)
    pred = np.array([0, 1, 0, 1])
    topk = np.array([[0, 5], [4, 1], [0, 2], [2, 1]])
    paper = update_selection(state, prob, pred, theta_r=0.8, theta_r2=0.8)
    assert paper.absorbed == 2 and paper.relabelled == 2
    # k = 1: CLIP's argmax must be the label the sample gets.
    # 0: absorbed as 0, CLIP top-1 is 0 -> kept; 1: absorbed as 1, CLIP top-1 is 4 -> blocked;
    # 2: relabelled to 0, CLIP top-1 is 0 -> kept; 3: relabelled to 1, CLIP top-1 is 2 -> blocked.
    guarded = update_selection(state, prob, pred, 0.8, 0.8, clip_topk=topk, clip_k=1)
    np.testing.assert_array_equal(guarded.state.selected, [True, False, True, False])
    np.testing.assert_array_equal(guarded.state.current_labels, [0, 1, 0, 3])
    assert (guarded.absorbed, guarded.relabelled) == (1, 1)
    # k = 2 lets the second choice through as well.
    wider = update_selection(state, prob, pred, 0.8, 0.8, clip_topk=topk, clip_k=2)
    np.testing.assert_array_equal(wider.state.selected, [True, True, True, True])
    np.testing.assert_array_equal(wider.state.current_labels, [0, 1, 0, 1])


def test_clip_guard_keeps_initial_clean_and_ignores_unknown_entries() -> None:
    state = _state([0, 1, 2], [True, False, False])
    prob = np.full(3, 0.99)
    pred = np.array([1, 1, 2])  # 0 would be relabelled to 1; 1 and 2 absorbed
    topk = np.array([[0, 2], [-1, -1], [2, -1]])
    update = update_selection(state, prob, pred, 0.8, 0.8, clip_topk=topk, clip_k=2)
    # 0 stays selected (initial clean) with its own label: CLIP does not back the relabel;
    # 1 has no CLIP classes (-1): never absorbed; 2 agrees with CLIP's top-1.
    np.testing.assert_array_equal(update.state.selected, [True, False, True])
    np.testing.assert_array_equal(update.state.current_labels, [0, 1, 2])


def test_clip_topk_allows_checks_shapes_and_k() -> None:
    topk = np.array([[3, 1, 2], [0, 1, 2]])
    np.testing.assert_array_equal(clip_topk_allows(topk, np.array([1, 1]), 1), [False, False])
    np.testing.assert_array_equal(clip_topk_allows(topk, np.array([1, 1]), 2), [True, True])
    np.testing.assert_array_equal(clip_topk_allows(topk, np.array([2, 3]), 9), [True, False])
    with pytest.raises(ValueError, match="shape"):
        clip_topk_allows(topk, np.array([1, 1, 1]), 1)
    with pytest.raises(ValueError, match="shape"):  # one row per sample, but not 2-D
        clip_topk_allows(np.array([3, 1]), np.array([1, 1]), 1)
    with pytest.raises(ValueError, match="k must"):
        clip_topk_allows(topk, np.array([1, 1]), 0)


def test_warmup_defers_every_update() -> None:
    state = _state([0, 1, 2], [True, False, False])
    prob = np.full(3, 0.99)
    pred = np.array([0, 1, 0])
    for epoch in range(2):
        update = update_selection(state, prob, pred, 0.8, 0.8, warmup_epochs=2)
        assert (update.absorbed, update.relabelled, update.added) == (0, 0, 0)
        np.testing.assert_array_equal(update.state.selected, [True, False, False])
        assert update.state.epoch == epoch + 1
        state = update.state
    after = update_selection(state, prob, pred, 0.8, 0.8, warmup_epochs=2)
    assert (after.absorbed, after.relabelled) == (2, 1)
    np.testing.assert_array_equal(after.state.current_labels, [0, 1, 0])
    with pytest.raises(ValueError, match="warmup"):
        update_selection(state, prob, pred, 0.8, 0.8, warmup_epochs=-1)


def test_thresholds_are_inclusive() -> None:
    state = _state([0, 0], [False, False])
    prob = np.array([0.8, 0.95])
    pred = np.array([0, 1])
    update = update_selection(state, prob, pred, theta_r=0.8, theta_r2=0.95)
    np.testing.assert_array_equal(update.absorbed_mask, [True, False])
    np.testing.assert_array_equal(update.relabelled_mask, [False, True])
    np.testing.assert_array_equal(update.state.current_labels, [0, 1])
    # Just below each threshold: nothing.
    below = update_selection(state, np.nextafter(prob, 0), pred, theta_r=0.8, theta_r2=0.95)
    assert below.selected == 0


def test_theta_r2_one_only_relabels_certain_predictions() -> None:
    state = _state([0, 0, 0], [False, False, False])
    prob = np.array([0.999999, 1.0, 1.0])
    pred = np.array([1, 1, 0])
    update = update_selection(state, prob, pred, theta_r=1.0, theta_r2=1.0)
    np.testing.assert_array_equal(update.relabelled_mask, [False, True, False])
    np.testing.assert_array_equal(update.absorbed_mask, [False, False, True])
    # theta_r2 > 1 disables relabelling strictly.
    strict = update_selection(state, prob, pred, theta_r=1.0, theta_r2=1.0 + 1e-9)
    assert strict.relabelled == 0


def test_relabel_applies_to_initial_clean_samples() -> None:
    state = _state([0, 1], [True, True])
    update = update_selection(
        state, np.array([0.99, 0.99]), np.array([2, 1]), theta_r=0.8, theta_r2=0.9
    )
    np.testing.assert_array_equal(update.state.current_labels, [2, 1])
    np.testing.assert_array_equal(update.state.selected, [True, True])
    assert update.relabelled == 1 and update.added == 0


def test_labels_recomputed_from_originals_each_epoch() -> None:
    state = _state([3, 3], [True, False])
    first = update_selection(
        state, np.array([0.99, 0.99]), np.array([1, 1]), theta_r=0.8, theta_r2=0.9
    )
    np.testing.assert_array_equal(first.state.current_labels, [1, 1])
    np.testing.assert_array_equal(first.state.selected, [True, True])
    # Next epoch the predictions return to the original label (sample 0) or are unsure
    # (sample 1): both labels go back to the original; sample 1 leaves the set.
    second = update_selection(
        first.state, np.array([0.99, 0.5]), np.array([3, 2]), theta_r=0.8, theta_r2=0.9
    )
    np.testing.assert_array_equal(second.state.current_labels, [3, 3])
    np.testing.assert_array_equal(second.state.selected, [True, False])
    assert second.state.epoch == 2


def test_initial_clean_never_leaves() -> None:
    rng = np.random.default_rng(0)
    clean = rng.random(50) < 0.4
    state = MixFixState.initial(clean, rng.integers(0, 5, 50))
    for _ in range(3):
        update = update_selection(
            state, rng.random(50) * 0.5, rng.integers(0, 5, 50), theta_r=0.8, theta_r2=0.9
        )
        state = update.state
        assert np.all(state.selected[clean])
        assert update.selected == clean.sum()


def test_precision_and_relabel_accuracy_with_true_labels() -> None:
    state = _state([0, 1, 2, 0], [True, False, False, False])
    truth = np.array([0, 2, 1, 0])
    update = update_selection(
        state,
        np.array([0.1, 0.99, 0.99, 0.1]),
        np.array([0, 2, 0, 0]),
        theta_r=0.8,
        theta_r2=0.9,
        true_labels=truth,
    )
    # selected: 0 (clean, label 0 correct), 1 (relabelled to 2: correct), 2 (relabelled to
    # 0: wrong) -> precision 2/3, relabel accuracy 1/2.
    assert update.precision == pytest.approx(2 / 3)
    assert update.relabel_accuracy == pytest.approx(0.5)
    assert update.summary() == {
        "epoch": update.state.epoch,
        "absorbed": update.absorbed,
        "relabelled": update.relabelled,
        "selected": 3,
        "added": update.added,
        "precision": update.precision,
        "relabel_accuracy": update.relabel_accuracy,
    }
    assert update.absorbed + update.relabelled > 0


def test_update_selection_rejects_bad_predictions() -> None:
    state = _state([0, 1], [True, False])
    with pytest.raises(ValueError, match="shape"):
        update_selection(state, np.array([0.5]), np.array([0]), 0.8, 0.9)
    with pytest.raises(ValueError, match="NaN"):
        update_selection(state, np.array([np.nan, 0.5]), np.array([0, 1]), 0.8, 0.9)


def test_update_selection_errors_word_for_word() -> None:
    state = _state([0, 1], [True, False])
    cases = [
        ((np.array([0.5]), np.array([0, 1])), "predictions must have shape (2,), got (1,) and (2,)"),
        ((np.array([0.5, 0.5]), np.array([0])), "predictions must have shape (2,), got (2,) and (1,)"),
        ((np.array([np.inf, 0.5]), np.array([0, 1])), "pred_prob_max contains NaN or infinite values"),
        ((np.array([0.5, 0.5]), np.array([0, -1])), "pred_label must be non-negative"),
        ((np.array([0.5, 0.5]), np.array([0.0, 1.0])), "pred_label must be integer, got float64"),
    ]  # fmt: skip
    for (prob, pred), message in cases:
        with pytest.raises(ValueError) as error:
            update_selection(state, prob, pred, 0.8, 0.9)
        assert str(error.value) == message
    with pytest.raises(ValueError) as error:
        update_selection(state, np.array([0.5, 0.5]), np.array([0, 1]), 0.8, 0.9, np.zeros(3))
    assert str(error.value) == "true_labels must have shape (2,), got (3,)"
    with pytest.raises(ValueError) as error:
        MixFixState(
            np.ones((2, 2), bool), np.zeros((2, 2)), np.ones((2, 2), bool), np.zeros((2, 2))
        )
    assert str(error.value).startswith("MixFixState arrays must be 1-D of one length, got ")
    with pytest.raises(ValueError) as error:
        MixFixState(np.ones(2, bool), np.array([0, -1]), np.ones(2, bool), np.zeros(2))
    assert str(error.value) == "original_labels must be non-negative"


def test_clip_guard_checks_the_label_each_sample_would_get_and_metrics() -> None:
    """The CLIP guard (default k = 1) looks up y_i for absorbed samples and y_m for
    relabelled ones; without true labels both metrics are None; the relabel accuracy
    counts the relabels that hit the truth."""
    #        0: absorb (y 1, CLIP top-1 1)   1: absorb refused (CLIP top-1 0, y 1 second)
    #        2: relabel 0 -> 2 (CLIP top-1 2, y 0 second)   3: relabel 1 -> 0 refused
    state = _state([1, 1, 0, 1], [False] * 4)
    clip = np.array([[1, 0], [0, 1], [2, 0], [1, 2]])
    update = update_selection(
        state, np.full(4, 0.99), np.array([1, 1, 2, 0]), 0.8, 0.9, clip_topk=clip
    )
    np.testing.assert_array_equal(update.state.selected, [True, False, True, False])
    np.testing.assert_array_equal(update.state.current_labels, [1, 1, 2, 1])
    assert update.precision is None and update.relabel_accuracy is None
    assert update.state.selected_indices().dtype == np.int64

    three = _state([0, 0, 0, 1], [False] * 4)
    relabels = update_selection(
        three, np.full(4, 0.99), np.array([1, 2, 1, 1]), 0.8, 0.9, np.array([1, 2, 2, 1])
    )
    assert relabels.relabelled == 3 and relabels.relabel_accuracy == pytest.approx(2 / 3)


def test_state_dict_round_trip() -> None:
    state = _state([0, 1, 2], [True, False, True])
    state = update_selection(state, np.array([0.9, 0.99, 0.1]), np.array([0, 2, 2]), 0.8, 0.9).state
    restored = MixFixState.from_state_dict(state.state_dict())
    for name in ("initial_clean", "original_labels", "selected", "current_labels"):
        np.testing.assert_array_equal(getattr(restored, name), getattr(state, name))
        assert getattr(restored, name).dtype == getattr(state, name).dtype
    assert restored.epoch == state.epoch == 1
    with pytest.raises(ValueError, match="lacks"):
        MixFixState.from_state_dict({"epoch": 0})


# --------------------------------------------------------------------------------------
# mixup, loss
# --------------------------------------------------------------------------------------


def test_mixup_targets_sum_to_one_and_lam_at_least_half() -> None:
    generator = np.random.default_rng(0)
    inputs = torch.randn(16, 3, 8, 8)
    targets = F.one_hot(torch.randint(0, 5, (16,)), 5).float()
    for beta in (0.5, 1.0, 4.0):
        for _ in range(20):
            mixed_x, mixed_t, lam = mixup(inputs, targets, beta, generator)
            assert 0.5 <= lam <= 1.0
            torch.testing.assert_close(mixed_t.sum(dim=1), torch.ones(16))
            assert mixed_x.shape == inputs.shape
            assert mixed_t.max() >= lam - 1e-6  # each row keeps its own label at weight >= lam
    same_x, same_t, lam = mixup(inputs, targets, 0.0, generator)
    assert lam == 1.0 and same_x is inputs and same_t is targets


def test_mixup_mixes_each_row_with_its_permuted_partner() -> None:
    """mixed = lam * x + (1 - lam) * x[perm], inputs and targets alike, with the lam and
    permutation that sample_mixup draws from the same generator state."""
    from training.mixfix import sample_mixup

    inputs = torch.randn(6, 2, 3, 3)
    targets = F.one_hot(torch.arange(6) % 4, 4).float()
    lam, perm = sample_mixup(6, 1.0, np.random.default_rng(3))
    mixed_x, mixed_t, got_lam = mixup(inputs, targets, 1.0, np.random.default_rng(3))
    assert got_lam == lam and 0.5 < lam < 1.0 and (perm != np.arange(6)).any()
    index = torch.from_numpy(perm)
    torch.testing.assert_close(mixed_x, lam * inputs + (1 - lam) * inputs[index])
    torch.testing.assert_close(mixed_t, lam * targets + (1 - lam) * targets[index])
    with pytest.raises(ValueError) as error:
        mixup(torch.zeros(4, 2), torch.zeros(3, 5), 1.0, np.random.default_rng(0))
    assert str(error.value) == "inputs (4) and targets (3) differ in batch size"


def test_soft_cross_entropy_matches_hard_cross_entropy() -> None:
    logits = torch.randn(12, 7)
    labels = torch.randint(0, 7, (12,))
    torch.testing.assert_close(
        soft_cross_entropy(logits, F.one_hot(labels, 7).float()), F.cross_entropy(logits, labels)
    )


# --------------------------------------------------------------------------------------
# class-balanced sampling
# --------------------------------------------------------------------------------------


def test_balanced_epoch_indices_equal_class_frequencies() -> None:
    rng = np.random.default_rng(1)
    num_total, num_classes = 1000, 6
    labels = rng.integers(0, num_classes, num_total)
    labels[:300] = 0  # a dominant class
    selected = rng.random(num_total) < 0.3
    selected[labels == 4] = False  # a class absent from the selection
    rare_class = np.flatnonzero(labels == 5)
    selected[rare_class] = False
    selected[rare_class[:3]] = True  # a rare class: 3 samples
    selected_indices = np.flatnonzero(selected)
    iterations = iterations_per_epoch(num_total, 64)
    assert iterations == 15

    draws = balanced_epoch_indices(selected_indices, labels, num_classes, iterations, 64, rng)
    assert draws.shape == (iterations * 64,) and draws.dtype == np.int64
    assert np.all(selected[draws]), "a non-selected sample was drawn"
    counts = np.bincount(labels[draws], minlength=num_classes)
    assert counts[4] == 0
    present = counts[[0, 1, 2, 3, 5]]
    assert present.max() - present.min() <= 1
    # Within the rare class, its three samples are cycled evenly.
    rare = np.bincount(draws[labels[draws] == 5])
    rare = rare[rare > 0]
    assert rare.size == 3 and rare.max() - rare.min() <= 1
    # Fewer draws than classes still works (some classes get nothing this epoch).
    assert balanced_epoch_indices(selected_indices, labels, num_classes, 1, 2, rng).shape == (2,)


def test_class_balanced_sampler_is_deterministic_per_epoch() -> None:
    labels = np.arange(100) % 4
    sampler = ClassBalancedSampler(np.arange(0, 100, 3), labels, 4, num_total=100, batch_size=8)
    assert len(sampler) == 96
    first = list(sampler)
    assert first == list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first


def test_iterations_per_epoch_floor_at_least_one() -> None:
    assert iterations_per_epoch(50000, 128) == 390
    assert iterations_per_epoch(10, 128) == 1
    with pytest.raises(ValueError):
        iterations_per_epoch(10, 0)


def test_train_one_epoch_hard_and_soft_targets_agree() -> None:
    inputs = torch.randn(24, 3, 8, 8)
    labels = torch.randint(0, 3, (24,))
    losses = []
    for targets in (labels, F.one_hot(labels, 3).float()):
        torch.manual_seed(0)
        model = build_network("tiny_cnn", 3)
        optimizer = make_optimizer(model, lr=0.1)
        batches = [(inputs[:12], targets[:12]), (inputs[12:], targets[12:])]
        stats = train_one_epoch(
            model, optimizer, batches, beta=0.0, device="cpu", generator=np.random.default_rng(0)
        )
        assert stats["samples"] == 24 and stats["batches"] == 2
        losses.append(stats["loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    # bf16 autocast runs on CPU too (the GPU path uses the same code).
    stats = train_one_epoch(
        model,
        optimizer,
        batches,
        beta=1.0,
        device="cpu",
        generator=np.random.default_rng(0),
        amp_dtype=torch.bfloat16,
    )
    assert np.isfinite(stats["loss"])
    prob, label = predict(model, [inputs[:5], inputs[5:]], "cpu", amp_dtype=torch.bfloat16)
    assert prob.shape == label.shape == (24,) and prob.dtype == np.float32
    assert np.all((prob >= 1 / 3 - 1e-6) & (prob <= 1)) and label.dtype == np.int64


# --------------------------------------------------------------------------------------
# transforms, optimiser
# --------------------------------------------------------------------------------------


def test_augment_batch_crop_and_flip() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (8, 10, 12, 3), dtype=np.uint8)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    plain = to_tensor_batch(images, mean, std)
    assert plain.shape == (8, 3, 10, 12) and plain.dtype == torch.float32
    torch.testing.assert_close(
        plain[0, 1, 2, 3],
        torch.tensor((images[0, 2, 3, 1] / 255 - 0.5) / 0.25, dtype=torch.float32),
    )
    unchanged = augment_batch(images, rng, crop_padding=0, flip=False, mean=mean, std=std)
    torch.testing.assert_close(unchanged, plain)
    flipped_or_not = augment_batch(images, rng, crop_padding=0, flip=True, mean=mean, std=std)
    for index in range(8):
        assert torch.equal(flipped_or_not[index], plain[index]) or torch.equal(
            flipped_or_not[index], plain[index].flip(-1)
        )
    cropped = augment_batch(images, rng, crop_padding=4, mean=mean, std=std)
    assert cropped.shape == plain.shape
    zero_value = (0 - 0.5) / 0.25  # padding shows up as black pixels in shifted crops
    assert torch.isclose(cropped, torch.tensor(zero_value)).any()


def test_optimizer_and_scheduler() -> None:
    model = torch.nn.Linear(3, 2)
    optimizer = make_optimizer(model, lr=0.02, momentum=0.9, weight_decay=5e-4)
    assert optimizer.param_groups[0]["weight_decay"] == 5e-4
    defaults = make_optimizer(model, lr=0.02).param_groups[0]  # the paper's SGD settings
    assert (defaults["momentum"], defaults["weight_decay"]) == (0.9, 5e-4)
    scheduler = make_scheduler(optimizer, milestones=[2, 4])
    lrs = []
    for _ in range(5):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.02, 0.02, 0.002, 0.002, 0.0002])
    halving = make_optimizer(model, lr=0.02, momentum=0.9, weight_decay=5e-4)
    scheduler = make_scheduler(halving, milestones=[1], gamma=0.5)
    halving.step()
    scheduler.step()
    assert halving.param_groups[0]["lr"] == pytest.approx(0.01)


def test_mixfix_state_from_another_writer_gets_bool_and_int64_arrays() -> None:
    """A state dict with int32 labels and 0/1 uint8 masks (as another tool or an older
    checkpoint may store them) loads with the dtypes the updates rely on."""
    stored = {
        "initial_clean": np.array([1, 0, 1], np.uint8),
        "original_labels": np.array([0, 2, 1], np.int32),
        "selected": [1, 1, 0],
        "current_labels": np.array([0, 1, 1], np.int32),
        "epoch": np.int64(4),
    }
    state = MixFixState.from_state_dict(stored)
    state.original_labels[0] = 2
    assert stored["original_labels"][0] == 0  # a copy: the stored arrays stay as they were
    assert state.initial_clean.dtype == bool and state.selected.dtype == bool
    assert state.original_labels.dtype == np.int64 and state.current_labels.dtype == np.int64
    np.testing.assert_array_equal(state.selected, [True, True, False])
    assert state.epoch == 4 and type(state.epoch) is int


# --------------------------------------------------------------------------------------
# end to end on a separable synthetic dataset
# --------------------------------------------------------------------------------------


def _synthetic_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """32px images: a 10px square of the class's colour at a random place, on noise."""
    colours = np.array([(255, 40, 40), (40, 255, 40), (40, 40, 255), (255, 255, 40)], np.uint8)
    n = labels.shape[0]
    images = rng.integers(0, 80, (n, 32, 32, 3)).astype(np.uint8)
    top, left = rng.integers(0, 23, n), rng.integers(0, 23, n)
    rows = top[:, None] + np.arange(10)  # [N, 10]
    cols = left[:, None] + np.arange(10)
    images[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]] = colours[labels][
        :, None, None, :
    ]
    return images


def _batches(images: np.ndarray, targets: np.ndarray, batch_size: int):
    for start in range(0, images.shape[0], batch_size):
        yield (
            to_tensor_batch(images[start : start + batch_size]),
            torch.from_numpy(targets[start : start + batch_size]),
        )


def test_mixfix_end_to_end_improves_accuracy() -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    num_train, batch_size = 320, 32
    true = rng.integers(0, 4, num_train)
    flip = rng.random(num_train) < 0.4
    noisy = np.where(flip, (true + rng.integers(1, 4, num_train)) % 4, true)
    initial_clean = (noisy == true) & (rng.random(num_train) < 0.5)
    images = _synthetic_images(true, rng)
    test_labels = rng.integers(0, 4, 200)
    test_images = _synthetic_images(test_labels, rng)

    model = build_network("tiny_cnn", 4)
    optimizer = make_optimizer(model, lr=0.05, momentum=0.9, weight_decay=5e-4)

    def test_accuracy() -> float:
        _, pred = predict(model, (x for x, _ in _batches(test_images, test_labels, 100)), "cpu")
        return float(np.mean(pred == test_labels))

    before = test_accuracy()
    state = MixFixState.initial(initial_clean, noisy)
    generator = np.random.default_rng(1)
    iterations = iterations_per_epoch(num_train, batch_size)
    for _ in range(3):
        order = balanced_epoch_indices(
            state.selected_indices(), state.current_labels, 4, iterations, batch_size, rng
        )
        # Hard targets on the training side: train_one_epoch one-hot encodes them.
        augmented = augment_batch(images[order], rng)
        batches = (
            (
                augmented[i : i + batch_size],
                torch.from_numpy(state.current_labels[order[i : i + batch_size]]),
            )
            for i in range(0, order.size, batch_size)
        )
        stats = train_one_epoch(
            model, optimizer, batches, beta=1.0, device="cpu", generator=generator
        )
        assert stats["samples"] == iterations * batch_size and np.isfinite(stats["loss"])
        prob, pred = predict(model, _batches(images, noisy, 64), "cpu")
        update = update_selection(state, prob, pred, theta_r=0.8, theta_r2=0.8, true_labels=true)
        state = update.state
    after = test_accuracy()
    assert after >= 0.9 and after > before + 0.3, (before, after)
    assert update.added > 0 and update.precision >= 0.9, update.summary()
    assert model.training  # predict restored the mode


# --------------------------------------------------------------------------------------
# networks
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "size", "batch"),
    [
        ("tiny_cnn", 32, 2),
        ("tiny_cnn", 64, 2),
        ("preact_resnet18", 32, 2),
        ("resnet50", 64, 2),
        ("inception_resnet_v2", 75, 1),  # its 299px default is slow on CPU; 75px is the minimum
    ],
)
def test_network_output_shapes(name: str, size: int, batch: int) -> None:
    model = build_network(name, 7).eval()
    with torch.no_grad():
        out = model(torch.zeros(batch, 3, size, size))
    assert out.shape == (batch, 7)


def test_network_sizes() -> None:
    tiny = sum(p.numel() for p in build_network("tiny_cnn", 10).parameters())
    assert 50_000 < tiny < 150_000
    preact = sum(p.numel() for p in build_network("preact_resnet18", 10).parameters())
    assert 11.0e6 < preact < 11.3e6


def test_unknown_network_lists_known_names() -> None:
    with pytest.raises(ValueError, match="known networks") as excinfo:
        build_network("vgg7", 10)
    for name in NETWORKS:
        assert name in str(excinfo.value)


def test_pretrained_path_with_different_head(tmp_path, caplog) -> None:
    source = build_network("tiny_cnn", 10)
    state = {f"module.{k}": v for k, v in source.state_dict().items()}  # as saved under DDP
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "init.pt"
    torch.save({"state_dict": state, "epoch": 3}, path)

    with caplog.at_level(logging.WARNING, logger="training.networks"):
        model = build_network("tiny_cnn", 4, pretrained_path=str(path))
    assert "linear.weight" in caplog.text and "extra.weight" in caplog.text
    torch.testing.assert_close(model.features[0].weight, source.features[0].weight)
    assert model.linear.weight.shape == (4, 128)

    report = load_initial_weights(build_network("tiny_cnn", 4), str(path))
    assert set(report.mismatched) == {"linear.weight", "linear.bias"}
    assert report.unexpected == ["extra.weight"]
    assert set(report.missing) == {"linear.weight", "linear.bias"}
    assert not report.exact
    exact = load_initial_weights(build_network("tiny_cnn", 10), f"file://{path}")
    assert exact.mismatched == [] and exact.unexpected == ["extra.weight"]


def _reference_epoch(model, batches, beta, seed, amp_dtype=None):
    """train_one_epoch written out plainly: per batch, mixup of inputs, one-hot targets
    and weights with sample_mixup's draw, weighted soft cross-entropy, one SGD step."""
    from training.mixfix import sample_mixup

    generator = np.random.default_rng(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for inputs, labels, *extra in batches:
        inputs = torch.as_tensor(inputs)
        lam, perm = sample_mixup(len(inputs), beta, generator)
        index = torch.from_numpy(perm)
        mixed = lam * inputs + (1 - lam) * inputs[index]
        if amp_dtype is None:
            logits = model(mixed)
        else:
            with torch.autocast("cpu", dtype=amp_dtype):
                logits = model(mixed)
        targets = F.one_hot(torch.as_tensor(labels), 5).float()
        targets = lam * targets + (1 - lam) * targets[index]
        weights = torch.ones(len(inputs))
        if extra:
            weights = torch.as_tensor(extra[0]).float()
            weights = lam * weights + (1 - lam) * weights[index]
        per_sample = -(targets * F.log_softmax(logits.float(), dim=1)).sum(dim=1)
        loss = (weights * per_sample).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()) * len(inputs))
    return sum(losses) / sum(len(b[0]) for b in batches)


@pytest.mark.parametrize("amp_dtype", [None, torch.float16])
def test_train_one_epoch_equals_mixup_and_weighted_soft_cross_entropy(amp_dtype) -> None:
    """Parameters and mean loss after an epoch equal the plain reference: inputs, targets
    and weights mixed with the same lam and permutation, hard targets one-hot over the
    model's K outputs (a batch without the last class too), autocast in the given dtype."""
    import copy

    gen = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(6, 3, 2, 2, generator=gen), torch.tensor([0, 1, 2, 3, 0, 1])),
        (torch.randn(6, 3, 2, 2, generator=gen), torch.tensor([4, 4, 0, 2, 1, 3]),
         torch.tensor([1.0, 0.2, 0.5, 1.0, 0.0, 0.7])),
        (np.random.default_rng(1).normal(size=(4, 3, 2, 2)).astype(np.float32),
         np.array([0, 1, 1, 0])),
    ]  # fmt: skip
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))
    reference = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    result = train_one_epoch(
        model, optimizer, batches, beta=1.0, device="cpu",
        generator=np.random.default_rng(4), amp_dtype=amp_dtype,
    )  # fmt: skip
    expected_loss = _reference_epoch(reference, batches, 1.0, 4, amp_dtype)
    assert result["samples"] == 16 and result["batches"] == 3
    assert result["loss"] == pytest.approx(expected_loss, rel=1e-5)
    for got, want in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(got, want)
    if amp_dtype is not None:  # autocast really ran in that dtype: float32 differs
        plain = copy.deepcopy(reference)
        assert _reference_epoch(plain, batches, 1.0, 4) != pytest.approx(expected_loss, rel=1e-6)
    with pytest.raises(ValueError) as error:
        train_one_epoch(model, optimizer, [(torch.zeros(3, 3, 2, 2), torch.zeros(2, 5))],
                        beta=1.0, device="cpu", generator=np.random.default_rng(0))  # fmt: skip
    assert str(error.value) == "batch of 3 inputs but 2 targets"


def test_initial_state_owns_its_arrays_and_a_one_sample_epoch_keeps_its_loss() -> None:
    clean, labels = np.array([True, False]), np.array([1, 0])
    state = MixFixState.initial(clean, labels)
    clean[0], labels[0] = False, 0
    assert state.initial_clean.tolist() == [True, False] and state.selected.tolist() == [
        True,
        False,
    ]
    assert state.original_labels.tolist() == [1, 0] and state.current_labels.tolist() == [1, 0]

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    inputs, targets = torch.randn(1, 1, 2, 2), torch.tensor([2])
    expected = float(F.cross_entropy(model(inputs), targets))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    result = train_one_epoch(model, optimizer, [(inputs, targets)], beta=1.0, device="cpu",
                             generator=np.random.default_rng(0))  # fmt: skip
    assert result["samples"] == 1 and result["loss"] == pytest.approx(expected, rel=1e-5)
