"""MixFix training core (docs/method.md, "MixFix"), pure torch/numpy: no Ray here.

One MixFix epoch, as the Ray Train loop drives it:

1. `training.sampling.balanced_epoch_indices(...)`: the sample indices of the epoch,
   class-balanced over the currently selected set, `iterations_per_epoch(N_total, batch) *
   batch` of them.
2. The data pipeline loads/augments them (`training.transforms.augment_batch` on CPU
   workers) with the state's `current_labels` as targets; `train_one_epoch(...)` here runs
   mixup + soft cross-entropy.
3. `predict(...)` over every training sample (eval transform `to_tensor_batch`), then
   `update_selection(...)` gives the next epoch's selected set and labels.

`MixFixState` holds the selection between epochs and round-trips through checkpoints with
`state_dict()` / `from_state_dict()`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# --------------------------------------------------------------------------------------
# Mixup and loss
# --------------------------------------------------------------------------------------


def sample_mixup(
    batch_size: int, beta: float, generator: np.random.Generator
) -> tuple[float, np.ndarray]:
    """(lam, permutation) for one batch: lam ~ Beta(beta, beta), lam = max(lam, 1 - lam).

    beta <= 0 disables mixup: lam = 1 and the identity permutation (no random draws).
    """
    if beta <= 0:
        return 1.0, np.arange(batch_size)
    lam = float(generator.beta(beta, beta))
    return max(lam, 1.0 - lam), generator.permutation(batch_size)


def mixup(
    inputs: torch.Tensor,
    soft_targets: torch.Tensor,
    beta: float,
    generator: np.random.Generator,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mix a batch with a random permutation of itself: (mixed inputs, mixed targets, lam).

    mixed = lam * x + (1 - lam) * x[perm], same for the [B, K] soft targets; lam >= 0.5.
    beta <= 0 returns the inputs and targets unchanged with lam = 1.
    """
    if inputs.shape[0] != soft_targets.shape[0]:
        raise ValueError(
            f"inputs ({inputs.shape[0]}) and targets ({soft_targets.shape[0]}) differ in batch size"
        )
    lam, permutation = sample_mixup(inputs.shape[0], beta, generator)
    if lam == 1.0:
        return inputs, soft_targets, lam
    perm = torch.from_numpy(permutation).to(inputs.device)
    mixed_inputs = inputs.mul(lam).add_(inputs[perm], alpha=1.0 - lam)
    mixed_targets = soft_targets.mul(lam).add_(soft_targets[perm], alpha=1.0 - lam)
    return mixed_inputs, mixed_targets, lam


def soft_cross_entropy(
    logits: torch.Tensor, soft_targets: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over the batch of -sum_k t_k log softmax(logits)_k (computed in float32);
    with per-sample weights, the mean of weight * that (CleanNet's w_soft)."""
    log_probs = F.log_softmax(logits.float(), dim=1)
    if weights is None:
        return -(soft_targets.float() * log_probs).sum(dim=1).mean()
    return -(weights.float() * (soft_targets.float() * log_probs).sum(dim=1)).mean()


# --------------------------------------------------------------------------------------
# Selection state and update
# --------------------------------------------------------------------------------------


@dataclass
class MixFixState:
    """The MixFix selection between epochs (one entry per training sample).

    initial_clean: bool[N], the offline CLIP selection (never leaves the set).
    original_labels: int64[N], the noisy labels as given (never modified).
    selected: bool[N], the set trained on next.
    current_labels: int64[N], labels trained with next (original or relabelled).
    epoch: number of selection updates applied (= training epochs completed).
    """

    initial_clean: np.ndarray
    original_labels: np.ndarray
    selected: np.ndarray
    current_labels: np.ndarray
    epoch: int = 0

    def __post_init__(self) -> None:
        self.initial_clean = np.asarray(self.initial_clean, dtype=bool)
        self.original_labels = np.asarray(self.original_labels, dtype=np.int64)
        self.selected = np.asarray(self.selected, dtype=bool)
        self.current_labels = np.asarray(self.current_labels, dtype=np.int64)
        self.epoch = int(self.epoch)
        shapes = {
            name: getattr(self, name).shape
            for name in ("initial_clean", "original_labels", "selected", "current_labels")
        }
        if len(set(shapes.values())) != 1 or len(self.initial_clean.shape) != 1:
            raise ValueError(f"MixFixState arrays must be 1-D of one length, got {shapes}")
        if self.original_labels.size and self.original_labels.min() < 0:
            raise ValueError("original_labels must be non-negative")

    @classmethod
    def initial(cls, initial_clean: np.ndarray, labels: np.ndarray) -> MixFixState:
        """State before the first epoch: the clean set with its original labels."""
        clean = np.asarray(initial_clean, dtype=bool)
        return cls(
            initial_clean=clean.copy(),
            original_labels=np.asarray(labels, dtype=np.int64).copy(),
            selected=clean.copy(),
            current_labels=np.asarray(labels, dtype=np.int64).copy(),
            epoch=0,
        )

    @property
    def num_samples(self) -> int:
        """N, the number of training samples."""
        return int(self.original_labels.shape[0])

    def selected_indices(self) -> np.ndarray:
        """int64 indices of the selected samples."""
        return np.flatnonzero(self.selected).astype(np.int64)

    def state_dict(self) -> dict[str, np.ndarray | int]:
        """Plain numpy arrays and an int, for checkpoints (copies)."""
        return {
            "initial_clean": self.initial_clean.copy(),
            "original_labels": self.original_labels.copy(),
            "selected": self.selected.copy(),
            "current_labels": self.current_labels.copy(),
            "epoch": self.epoch,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, np.ndarray | int]) -> MixFixState:
        """Inverse of state_dict(); validates shapes and dtypes."""
        missing = {"initial_clean", "original_labels", "selected", "current_labels", "epoch"}
        missing -= set(state)
        if missing:
            raise ValueError(f"MixFix state dict lacks {sorted(missing)}")
        # copies (the checkpoint's arrays stay untouched); __post_init__ sets the dtypes
        return cls(
            initial_clean=np.array(state["initial_clean"]),
            original_labels=np.array(state["original_labels"]),
            selected=np.array(state["selected"]),
            current_labels=np.array(state["current_labels"]),
            epoch=int(state["epoch"]),
        )


@dataclass(frozen=True)
class MixFixUpdate:
    """Result of one selection update.

    absorbed / relabelled: samples meeting each rule, over ALL N samples (initial-clean
    ones included); selected: size of the next set; added: selected samples outside the
    initial clean set. precision (current label == true label over the selected set) and
    relabel_accuracy (new label == true label over relabelled samples) need true labels;
    None when not computable.
    """

    state: MixFixState
    absorbed: int
    relabelled: int
    selected: int
    added: int
    absorbed_mask: np.ndarray
    relabelled_mask: np.ndarray
    precision: float | None = None
    relabel_accuracy: float | None = None

    def summary(self) -> dict[str, float | int | None]:
        """Counts and metrics as a flat dict, for logging/reporting."""
        return {
            "epoch": self.state.epoch,
            "absorbed": self.absorbed,
            "relabelled": self.relabelled,
            "selected": self.selected,
            "added": self.added,
            "precision": self.precision,
            "relabel_accuracy": self.relabel_accuracy,
        }


def clip_topk_allows(topk_labels: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """bool[N]: whether labels[i] is among the first k entries of CLIP's top-k row i.

    topk_labels: int[N, K'] zero-shot classes by decreasing probability (the manifest's
    `topk_labels_zeroshot`; negative entries mean unknown and never match). Only the first
    min(k, K') columns count.
    """
    topk = np.asarray(topk_labels)
    labels = np.asarray(labels)
    if topk.ndim != 2 or topk.shape[0] != labels.shape[0]:
        raise ValueError(f"topk_labels must have shape ({labels.shape[0]}, K), got {topk.shape}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    head = topk[:, :k]
    return ((head == labels[:, None]) & (head >= 0)).any(axis=1)


def update_selection(
    state: MixFixState,
    pred_prob_max: np.ndarray,
    pred_label: np.ndarray,
    theta_r: float,
    theta_r2: float,
    true_labels: np.ndarray | None = None,
    *,
    clip_topk: np.ndarray | None = None,
    clip_k: int = 1,
    warmup_epochs: int = 0,
) -> MixFixUpdate:
    """Next epoch's selection from the predictions on every training sample (docs/method.md, "MixFix").

    With p_m = pred_prob_max, y_m = pred_label and y_i the ORIGINAL label:
    - absorb: p_m >= theta_r and y_m == y_i (sample joins with label y_i);
    - relabel: p_m >= theta_r2 and y_m != y_i (sample joins with label y_m);
    next selected = initial clean | absorbed | relabelled. Labels are recomputed from the
    original labels each time (no drift): current = original, then y_m for relabelled
    samples, initial-clean ones included. Comparisons are inclusive (>=), so theta_r2 = 1
    disables relabelling except for predictions of probability exactly 1.0 (possible in
    float32 softmax on saturated logits); use theta_r2 > 1 for a strict disable.
    The returned state's epoch is state.epoch + 1; the input state is not modified.

    Two guards, both off by default (then this is exactly the paper's rule), neither uses
    true labels:
    - clip_topk (int[N, K'], CLIP's zero-shot top-k classes per sample): a sample is
      absorbed or relabelled only when the label it would get (y_i, resp. y_m) is among
      the first clip_k of them. A weak network that learned a systematic flip agrees with
      the flipped label; CLIP, which never saw the labels, usually does not.
    - warmup_epochs: while state.epoch < warmup_epochs nothing is absorbed or relabelled
      (the selection stays the initial clean set), so the first, weakest networks decide
      nothing.
    """
    n = state.num_samples
    prob = np.asarray(pred_prob_max, dtype=np.float64)
    pred = np.asarray(pred_label)
    if prob.shape != (n,) or pred.shape != (n,):
        raise ValueError(f"predictions must have shape ({n},), got {prob.shape} and {pred.shape}")
    if not np.all(np.isfinite(prob)):
        raise ValueError("pred_prob_max contains NaN or infinite values")
    if not np.issubdtype(pred.dtype, np.integer):
        raise ValueError(f"pred_label must be integer, got {pred.dtype}")
    pred = pred.astype(np.int64)
    if n and pred.min() < 0:
        raise ValueError("pred_label must be non-negative")

    if warmup_epochs < 0:
        raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
    agrees = pred == state.original_labels
    absorbed = (prob >= theta_r) & agrees
    relabelled = (prob >= theta_r2) & ~agrees
    if clip_topk is not None:
        absorbed &= clip_topk_allows(clip_topk, state.original_labels, clip_k)
        relabelled &= clip_topk_allows(clip_topk, pred, clip_k)
    if state.epoch < warmup_epochs:
        absorbed = np.zeros(n, dtype=bool)
        relabelled = np.zeros(n, dtype=bool)
    selected = state.initial_clean | absorbed | relabelled
    current = np.where(relabelled, pred, state.original_labels)
    new_state = replace(
        state,
        initial_clean=state.initial_clean.copy(),
        original_labels=state.original_labels.copy(),
        selected=selected,
        current_labels=current,
        epoch=state.epoch + 1,
    )

    precision = relabel_accuracy = None
    if true_labels is not None:
        truth = np.asarray(true_labels, dtype=np.int64)
        if truth.shape != (n,):
            raise ValueError(f"true_labels must have shape ({n},), got {truth.shape}")
        if selected.any():
            precision = float(np.mean(current[selected] == truth[selected]))
        if relabelled.any():
            relabel_accuracy = float(np.mean(pred[relabelled] == truth[relabelled]))

    return MixFixUpdate(
        state=new_state,
        absorbed=int(absorbed.sum()),
        relabelled=int(relabelled.sum()),
        selected=int(selected.sum()),
        added=int((selected & ~state.initial_clean).sum()),
        absorbed_mask=absorbed,
        relabelled_mask=relabelled,
        precision=precision,
        relabel_accuracy=relabel_accuracy,
    )


# --------------------------------------------------------------------------------------
# Training and prediction loops
# --------------------------------------------------------------------------------------


def _as_tensor(value: torch.Tensor | np.ndarray) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.as_tensor(value)


def _autocast(
    device: torch.device, amp_dtype: torch.dtype | None
) -> contextlib.AbstractContextManager:
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def train_one_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    beta: float,
    device: torch.device | str,
    generator: np.random.Generator,
    scaler: torch.amp.GradScaler | None = None,
    amp_dtype: torch.dtype | None = None,
) -> dict[str, float | int]:
    """One pass over `batches` of (inputs [B, C, H, W], targets) with mixup + soft CE.

    targets are hard (int [B]) or soft ([B, K] rows summing to 1); hard targets become
    one-hot with K = the model's output width. A batch may carry per-sample loss weights
    as a third item (inputs, targets, weights [B]); mixup mixes them like the targets. amp_dtype enables autocast (bf16/fp16);
    pass a GradScaler for fp16. The LR scheduler is NOT stepped here (it is per epoch).
    Returns {"loss": mean loss per sample, "samples": count, "batches": count}.
    """
    device = torch.device(device)
    model.train()
    loss_sum = torch.zeros((), device=device)  # on the device: no host sync per step
    samples = 0
    num_batches = 0
    for inputs, targets, *extra in batches:
        weights = _as_tensor(extra[0]).to(device, non_blocking=True) if extra else None
        inputs = _as_tensor(inputs).to(device, non_blocking=True)
        targets = _as_tensor(targets).to(device, non_blocking=True)
        batch_size = inputs.shape[0]
        if targets.shape[0] != batch_size:
            raise ValueError(f"batch of {batch_size} inputs but {targets.shape[0]} targets")
        lam, permutation = sample_mixup(batch_size, beta, generator)
        perm = torch.from_numpy(permutation)
        if device.type == "cuda":  # pinned, non-blocking: the step does not wait for it
            perm = perm.pin_memory().to(device, non_blocking=True)
        if lam != 1.0:
            inputs = inputs.mul(lam).add_(inputs[perm], alpha=1.0 - lam)
        with _autocast(device, amp_dtype):
            logits = model(inputs)
        if targets.ndim == 1:
            targets = F.one_hot(targets.long(), num_classes=logits.shape[1])
        targets = targets.float()
        if lam != 1.0:
            targets = targets.mul(lam).add_(targets[perm], alpha=1.0 - lam)
            if weights is not None:
                weights = weights.float().mul(lam).add_(weights.float()[perm], alpha=1.0 - lam)
        loss = soft_cross_entropy(logits, targets, weights)

        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        loss_sum += loss.detach().float() * batch_size
        samples += batch_size
        num_batches += 1
    return {"loss": float(loss_sum) / max(samples, 1), "samples": samples, "batches": num_batches}


@torch.no_grad()
def predict(
    model: nn.Module,
    batches: Iterable[torch.Tensor | np.ndarray | Sequence[torch.Tensor]],
    device: torch.device | str,
    *,
    amp_dtype: torch.dtype | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(max softmax probability float32[N], argmax int64[N]) in the batches' order.

    Each batch is an input tensor or a tuple/list whose first item is the input tensor
    (so training batches with targets also work). The model is put in eval mode and its
    previous mode restored afterwards.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    max_probs: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    try:
        for batch in batches:
            inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
            inputs = _as_tensor(inputs).to(device, non_blocking=True)
            with _autocast(device, amp_dtype):
                logits = model(inputs)
            probs = F.softmax(logits.float(), dim=1)
            top_prob, top_label = probs.max(dim=1)
            max_probs.append(top_prob.cpu().numpy().astype(np.float32))
            labels.append(top_label.cpu().numpy().astype(np.int64))
    finally:
        model.train(was_training)
    if not max_probs:
        return np.zeros(0, dtype=np.float32), np.zeros(0, dtype=np.int64)
    return np.concatenate(max_probs), np.concatenate(labels)


# --------------------------------------------------------------------------------------
# Optimiser and schedule
# --------------------------------------------------------------------------------------


def make_optimizer(
    model: nn.Module, lr: float, momentum: float = 0.9, weight_decay: float = 5e-4
) -> torch.optim.SGD:
    """SGD over all trainable parameters (weight decay on all of them, as in the paper)."""
    params = [param for param in model.parameters() if param.requires_grad]
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def make_scheduler(
    optimizer: torch.optim.Optimizer, milestones: Sequence[int], gamma: float = 0.1
) -> torch.optim.lr_scheduler.MultiStepLR:
    """LR x gamma at each milestone epoch; call scheduler.step() once per epoch."""
    return torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=sorted(int(m) for m in milestones), gamma=gamma
    )


__all__ = [
    "MixFixState",
    "MixFixUpdate",
    "clip_topk_allows",
    "make_optimizer",
    "make_scheduler",
    "mixup",
    "predict",
    "sample_mixup",
    "soft_cross_entropy",
    "train_one_epoch",
    "update_selection",
]
