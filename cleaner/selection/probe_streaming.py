"""The linear probe trained over Ray Data (`fit_probe_streaming`), for runs whose
embeddings do not fit one node.

Class-balanced multinomial logistic regression in torch, trained with Adam over
`iter_torch_batches`; crossfit folds come from a hash of a stable key column
(`stable_hash`, independent of batching and process), and one pass trains all the fold
probes at once. The in-memory job uses scikit-learn's probe (`cleaner.selection.probe`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa

from cleaner.selection.fitted import Batch
from cleaner.selection.probe import PROBE_MODES, l2_normalise

if TYPE_CHECKING:
    import ray.data
    import torch

_HASH_MULTIPLIERS = (np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB))


_FNV_OFFSET = np.uint64(0xCBF29CE484222325)


_FNV_PRIME = np.uint64(0x100000001B3)


def _mix64(h: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    h = (h ^ (h >> np.uint64(30))) * _HASH_MULTIPLIERS[0]
    h = (h ^ (h >> np.uint64(27))) * _HASH_MULTIPLIERS[1]
    return h ^ (h >> np.uint64(31))


def stable_hash(keys: np.ndarray, seed: int = 0) -> np.ndarray:
    """uint64 hash of each key (integers, or strings / bytes via FNV-1a), independent of
    the batch it comes in and of the Python process (no salted hash())."""
    keys = np.asarray(keys)
    if keys.shape[0] == 0:
        return np.zeros(0, dtype=np.uint64)
    salt = _mix64(np.array([seed % 2**64], dtype=np.uint64))[0]
    with np.errstate(over="ignore"):
        if np.issubdtype(keys.dtype, np.integer):
            return _mix64(keys.astype(np.int64).view(np.uint64) ^ salt)
        if keys.dtype.kind == "U" or keys.dtype == object:
            keys = np.char.encode(keys.astype(str), "utf-8")
        if keys.dtype.kind != "S":
            raise ValueError(f"keys must be integers or strings, got dtype {keys.dtype}")
        raw = np.ascontiguousarray(keys).view(np.uint8).reshape(keys.shape[0], -1)
        h = np.full(keys.shape[0], _FNV_OFFSET, dtype=np.uint64)
        for column in range(raw.shape[1]):  # bytes of the key (NUL padding is skipped)
            byte = raw[:, column].astype(np.uint64)
            h = np.where(byte != 0, (h ^ byte) * _FNV_PRIME, h)
        return _mix64(h ^ salt)


def fold_ids(keys: np.ndarray, folds: int, seed: int = 0) -> np.ndarray:
    """int64 fold in [0, folds) per key, from `stable_hash` (block-order independent)."""
    return (stable_hash(keys, seed) % np.uint64(folds)).astype(np.int64)


def embedding_matrix(batch: Any, column: str) -> np.ndarray:
    """float32[n, D] from a pyarrow Table or dict batch (fixed-size lists, tensors, lists)."""
    if isinstance(batch, pa.Table):
        values = batch.column(column).combine_chunks()
        if pa.types.is_fixed_size_list(values.type):
            flat = values.flatten().to_numpy(zero_copy_only=False)
            return flat.reshape(-1, values.type.list_size).astype(np.float32, copy=False)
        if isinstance(values.type, pa.ExtensionType):
            return np.asarray(values.to_numpy(), dtype=np.float32)
        return np.stack(values.to_numpy(zero_copy_only=False)).astype(np.float32)
    array = np.asarray(batch[column])
    if array.dtype == object:
        array = np.stack(list(array)) if array.size else np.zeros((0, 0))
    return array.astype(np.float32, copy=False)


def _column(batch: Any, column: str) -> np.ndarray:
    if isinstance(batch, pa.Table):
        return batch.column(column).to_numpy()
    return np.asarray(batch[column])


@dataclass(frozen=True)
class _FoldCounts:
    """Per-block class counts per fold: int64[1, F, K] (and a bad-label count)."""

    label_column: str
    key_column: str | None
    num_classes: int
    folds: int
    seed: int

    def __call__(self, batch: Batch) -> Batch:
        labels = np.asarray(batch[self.label_column])
        bad = (labels < 0) | (labels >= self.num_classes)
        labels = np.where(bad, 0, labels).astype(np.int64)
        fold = (
            fold_ids(batch[self.key_column], self.folds, self.seed)
            if self.key_column is not None
            else np.zeros(labels.shape[0], dtype=np.int64)
        )
        counts = np.bincount(
            (fold * self.num_classes + labels)[~bad], minlength=self.folds * self.num_classes
        )
        return {
            "counts": counts.reshape(1, self.folds, self.num_classes),
            "bad": np.array([int(bad.sum())]),
        }


@dataclass(frozen=True)
class _ProbeFeatures:
    """Per-block training features: normalised embedding x, label y, fold."""

    embedding_column: str
    label_column: str
    key_column: str | None
    folds: int
    seed: int

    def __call__(self, batch: pa.Table) -> Batch:
        x = l2_normalise(embedding_matrix(batch, self.embedding_column))
        y = _column(batch, self.label_column).astype(np.int64)
        fold = (
            fold_ids(_column(batch, self.key_column), self.folds, self.seed)
            if self.key_column is not None
            else np.zeros(y.shape[0], dtype=np.int64)
        )
        return {"x": x, "y": y, "fold": fold}


@dataclass(frozen=True, eq=False)
class StreamingProbe:
    """Trained probe(s): weights float32[F, D, K], bias float32[F, K]; F = 1 (insample)
    or the number of folds (crossfit, probe f never saw fold f)."""

    weights: np.ndarray
    bias: np.ndarray
    present: np.ndarray  # bool[F, K], classes in each probe's training part
    mode: str
    embedding_column: str
    label_column: str
    key_column: str | None
    seed: int

    @property
    def folds(self) -> int:
        return int(self.weights.shape[0])

    def predict_proba(self, embeddings: np.ndarray, keys: np.ndarray | None = None) -> np.ndarray:
        """float64[n, K]: each row predicted by its out-of-fold probe (insample: the probe)."""
        x = l2_normalise(embeddings)
        if self.mode == "crossfit":
            if keys is None:
                raise ValueError("crossfit prediction needs the keys")
            fold = fold_ids(keys, self.folds, self.seed)
        else:
            fold = np.zeros(x.shape[0], dtype=np.int64)
        probs = np.zeros((x.shape[0], self.weights.shape[2]), dtype=np.float64)
        for f in range(self.folds):  # a loop over the (few) probes, not the samples
            rows = np.flatnonzero(fold == f)
            if rows.size == 0:
                continue
            logits = (x[rows] @ self.weights[f] + self.bias[f]).astype(np.float64)
            logits = np.where(self.present[f], logits, -np.inf)
            logits -= logits.max(axis=1, keepdims=True)
            e = np.exp(logits)
            probs[rows] = e / e.sum(axis=1, keepdims=True)
        return probs

    def predict(self, batch: Any, prefix: str = "probe") -> Any:
        """Add {prefix}_p_label, {prefix}_max_p, {prefix}_argmax to a batch (Table or dict)."""
        keys = _column(batch, self.key_column) if self.key_column is not None else None
        probs = self.predict_proba(embedding_matrix(batch, self.embedding_column), keys)
        labels = _column(batch, self.label_column).astype(np.int64)
        values = {
            f"{prefix}_p_label": probs[np.arange(probs.shape[0]), labels],
            f"{prefix}_max_p": probs.max(axis=1),
            f"{prefix}_argmax": probs.argmax(axis=1).astype(np.int64),
        }
        if isinstance(batch, pa.Table):
            for name, column in values.items():
                batch = batch.append_column(name, pa.array(column))
            return batch
        return {**batch, **values}

    def transform(
        self, ds: ray.data.Dataset, *, prefix: str = "probe", batch_rows: int = 8192
    ) -> ray.data.Dataset:
        """The dataset with the probe's p_label, max_p and argmax columns (map_batches)."""
        return ds.map_batches(
            self.predict,
            fn_kwargs={"prefix": prefix},
            batch_format="pyarrow",
            batch_size=batch_rows,
        )


def _balanced_weights(train_counts: np.ndarray) -> np.ndarray:
    """float32[F, K]: sklearn's class_weight="balanced" on each training part."""
    present = train_counts > 0
    n = train_counts.sum(axis=1, keepdims=True)
    classes = np.maximum(present.sum(axis=1, keepdims=True), 1)
    weights = n / (classes * np.maximum(train_counts, 1))
    return np.where(present, weights, 0.0).astype(np.float32)


def _probe_loss(
    x: torch.Tensor,
    y: torch.Tensor,
    fold: torch.Tensor,
    weights: torch.Tensor,
    bias: torch.Tensor,
    class_weights: torch.Tensor,
    present: torch.Tensor,
    l2: torch.Tensor,
    crossfit: bool,
) -> torch.Tensor:
    """Sum over probes of the batch's class-weighted cross-entropy plus the L2 term."""
    import torch

    logits = torch.einsum("bd,fdk->fbk", x, weights) + bias[:, None, :]
    logits = logits.masked_fill(~present[:, None, :], float("-inf"))
    num_probes = weights.shape[0]
    index = y.expand(num_probes, -1)
    nll = -torch.log_softmax(logits, dim=2).gather(2, index[..., None])[..., 0]  # [F, B]
    if crossfit:
        train = fold[None, :] != torch.arange(num_probes, device=x.device)[:, None]
    else:
        train = torch.ones_like(nll, dtype=torch.bool)
    sample_weight = class_weights.gather(1, index) * train
    nll = torch.where(train, nll, torch.zeros_like(nll))
    data_term = (sample_weight * nll).sum(dim=1) / train.sum(dim=1).clamp(min=1)
    penalty = 0.5 * l2 * (weights * weights).sum(dim=(1, 2))
    return (data_term + penalty).sum()


def fit_probe_streaming(
    ds: ray.data.Dataset,
    embedding_column: str,
    label_column: str,
    num_classes: int,
    *,
    mode: Literal["insample", "crossfit"],
    key_column: str | None = "key",
    folds: int = 5,
    epochs: int = 10,
    lr: float = 0.02,
    batch_size: int = 1024,
    C: float = 1.0,
    shuffle_buffer: int = 16384,
    seed: int = 0,
    device: str = "cpu",
) -> StreamingProbe:
    """Class-balanced multinomial logistic regression trained over `iter_torch_batches`.

    A counting pass gives the per-fold class counts (balanced weights, as sklearn's
    class_weight="balanced"); the objective per probe is the mean class-weighted
    cross-entropy plus ||W||^2 / (2 C N_train), sklearn's objective divided by C N_train.
    Adam with a cosine learning-rate decay, `epochs` passes. crossfit: fold = hash(key)
    mod folds, and one pass trains all `folds` probes (probe f skips fold f). Classes
    absent from a probe's training part get probability 0. The embeddings stream to
    this process (run it in a GPU task for large data); nothing is gathered.
    """
    import torch

    if mode not in PROBE_MODES:
        raise ValueError(f"unknown probe mode {mode!r}; expected one of {PROBE_MODES}")
    if isinstance(folds, bool) or not isinstance(folds, (int, np.integer)) or folds < 2:
        raise ValueError(f"folds must be an integer >= 2, got {folds!r}")
    if mode == "crossfit" and key_column is None:
        raise ValueError("crossfit needs a stable key column to assign folds")
    if not (epochs >= 1 and lr > 0 and batch_size >= 1 and C > 0):
        raise ValueError("epochs, lr, batch_size and C must be positive")
    num_probes = folds if mode == "crossfit" else 1
    fold_key = key_column if mode == "crossfit" else None

    count_columns = [label_column] + ([fold_key] if fold_key is not None else [])
    counted = ds.select_columns(count_columns).map_batches(
        _FoldCounts(label_column, fold_key, num_classes, num_probes, seed), batch_format="numpy"
    )
    fold_counts = np.zeros((num_probes, num_classes), dtype=np.int64)
    bad = 0
    for part in counted.iter_batches(batch_size=None, batch_format="numpy"):
        fold_counts += part["counts"].sum(axis=0)
        bad += int(part["bad"].sum())
    if bad:
        raise ValueError(f"{bad} label(s) outside [0, {num_classes}) in column {label_column!r}")
    total = fold_counts.sum(axis=0)
    if total.sum() == 0:
        raise ValueError("the dataset is empty")
    train_counts = total[None, :] - fold_counts if mode == "crossfit" else fold_counts
    n_train = train_counts.sum(axis=1)

    feature_columns = [embedding_column, label_column] + ([fold_key] if fold_key else [])
    # materialised once (object store, not the driver): each epoch then reads blocks
    # instead of running the feature map again as a new Ray Data job
    features = (
        ds.select_columns(feature_columns)
        .map_batches(
            _ProbeFeatures(embedding_column, label_column, fold_key, num_probes, seed),
            batch_format="pyarrow",
        )
        .materialize()
    )
    dim = int(features.take_batch(1, batch_format="numpy")["x"].shape[1])

    # zero initialisation, as sklearn's lbfgs
    weights = torch.zeros(num_probes, dim, num_classes, device=device, requires_grad=True)
    bias = torch.zeros(num_probes, num_classes, device=device, requires_grad=True)
    class_weights = torch.from_numpy(_balanced_weights(train_counts)).to(device)
    present = torch.from_numpy(train_counts > 0).to(device)
    l2 = torch.from_numpy((1.0 / (C * np.maximum(n_train, 1))).astype(np.float32)).to(device)
    optimiser = torch.optim.Adam([weights, bias], lr=lr)
    steps = epochs * max(1, math.ceil(int(total.sum()) / batch_size))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, steps) / steps))
    )
    for epoch in range(epochs):
        for batch in features.iter_torch_batches(
            batch_size=batch_size,
            dtypes={"x": torch.float32, "y": torch.int64, "fold": torch.int64},
            device=device,
            local_shuffle_buffer_size=shuffle_buffer if shuffle_buffer > 0 else None,
            local_shuffle_seed=seed + epoch if shuffle_buffer > 0 else None,
        ):
            optimiser.zero_grad()
            loss = _probe_loss(
                batch["x"],
                batch["y"],
                batch["fold"],
                weights,
                bias,
                class_weights,
                present,
                l2,
                crossfit=mode == "crossfit",
            )
            loss.backward()
            optimiser.step()
            schedule.step()
    return StreamingProbe(
        weights=weights.detach().cpu().numpy(),
        bias=bias.detach().cpu().numpy(),
        present=train_counts > 0,
        mode=mode,
        embedding_column=embedding_column,
        label_column=label_column,
        key_column=fold_key,
        seed=seed,
    )
