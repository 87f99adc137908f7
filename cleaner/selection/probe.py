"""Visual linear probe (docs/method.md, "Linear probe"): P_lr(y | x) from logistic regression.

A class-balanced multinomial logistic regression on the L2-normalised image embeddings,
trained on the noisy labels.

- mode="insample": fit and predict on the same samples (the reference behaviour; its
  probabilities are over-confident on noisily labelled samples).
- mode="crossfit": stratified k-fold; each fold is predicted by a probe fitted on the
  other folds (out-of-sample probabilities).

Decisions for small data:

- The output always has all `num_classes` columns in label order; a class missing from a
  training part gets probability 0 and rows are renormalised.
- A training part with a single class predicts that class with probability 1.
- crossfit uses n_splits = min(folds, N) (at least 2). It does NOT shrink the number of
  folds to the smallest class: a class with c < folds samples is spread over c different
  folds, so each of its samples is still predicted by a probe that saw the other c - 1.
  A class with a single sample cannot be predicted out of sample: its p(label) is 0.
  When stratification is impossible (every class smaller than n_splits) shuffled KFold
  is used; with N < 2 crossfit falls back to insample.
"""

from __future__ import annotations

import warnings
from typing import Literal

import numpy as np

from cleaner.selection.rules import validate_matrix

ProbeMode = Literal["insample", "crossfit"]
PROBE_MODES: tuple[str, ...] = ("insample", "crossfit")


def l2_normalise(embeddings: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, as float32 (all-zero rows stay zero)."""
    x = np.asarray(embeddings, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, np.float32(1e-12))


def _validate(
    embeddings: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    mode: str,
    folds: int,
    C: float,
    max_iter: int,
) -> tuple[np.ndarray, np.ndarray]:
    if mode not in PROBE_MODES:
        raise ValueError(f"unknown probe mode {mode!r}; expected one of {PROBE_MODES}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
        raise ValueError(f"num_classes must be an integer, got {num_classes!r}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    if isinstance(folds, bool) or not isinstance(folds, (int, np.integer)) or folds < 2:
        raise ValueError(f"folds must be an integer >= 2, got {folds!r}")
    if not np.isfinite(C) or C <= 0:
        raise ValueError(f"C must be a positive number, got {C!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, (int, np.integer)) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}")

    x = l2_normalise(validate_matrix("embeddings", embeddings, "[N, D]"))
    if not np.isfinite(x).all():
        raise ValueError("embeddings contain NaN or inf")

    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be a 1-D array, got shape {y.shape}")
    if y.shape[0] != x.shape[0]:
        raise ValueError(
            f"shape mismatch: embeddings has {x.shape[0]} rows but labels has {y.shape[0]}"
        )
    if y.dtype == bool or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {y.dtype}")
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(
            f"labels must be in [0, {num_classes}), got values in [{y.min()}, {y.max()}]"
        )
    return x, y.astype(np.int64, copy=False)


def _fit_predict(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    num_classes: int,
    C: float,
    max_iter: int,
    seed: int,
) -> np.ndarray:
    """Probabilities [n_test, K] from a balanced logistic regression fitted on the train part."""
    probs = np.zeros((test_x.shape[0], num_classes), dtype=np.float64)
    train_classes = np.unique(train_y)
    if train_classes.shape[0] == 1:
        probs[:, train_classes[0]] = 1.0
        return probs
    from sklearn.exceptions import ConvergenceWarning  # lazily: see selection.gmm_p_clean
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=C, max_iter=max_iter, class_weight="balanced", random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=ConvergenceWarning)
        model.fit(train_x, train_y)
    probs[:, model.classes_] = model.predict_proba(test_x)
    return probs / probs.sum(axis=1, keepdims=True)


def _fold_splits(labels: np.ndarray, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified (or, if impossible, plain shuffled) k-fold train/test index pairs."""
    from sklearn.model_selection import KFold, StratifiedKFold

    n_splits = max(2, min(folds, labels.shape[0]))
    largest_class = int(np.bincount(labels).max())
    placeholder = np.zeros((labels.shape[0], 1))
    if largest_class >= n_splits:
        splitter = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        with warnings.catch_warnings():
            # "The least populated class in y has only ... members": expected and handled.
            warnings.simplefilter("ignore", category=UserWarning)
            return list(splitter.split(placeholder, labels))
    splitter = KFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return list(splitter.split(placeholder))


def fit_probe_probs(
    embeddings: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    *,
    mode: ProbeMode,
    folds: int = 5,
    C: float = 1.0,
    max_iter: int = 1000,
    seed: int = 0,
) -> np.ndarray:
    """Linear-probe probabilities float64[N, K] (all K columns, in label order).

    embeddings float[N, D] (float16 accepted), labels int[N] in [0, num_classes).
    mode "insample" fits and predicts on the same samples; "crossfit" predicts each of
    `folds` stratified folds with a probe fitted on the others. Raises ValueError for
    invalid input.
    """
    x, y = _validate(embeddings, labels, num_classes, mode, folds, C, max_iter)
    if mode == "insample" or x.shape[0] < 2:
        return _fit_predict(x, y, x, num_classes, C, max_iter, seed)
    probs = np.zeros((x.shape[0], num_classes), dtype=np.float64)
    for train_idx, test_idx in _fold_splits(y, folds, seed):
        probs[test_idx] = _fit_predict(
            x[train_idx], y[train_idx], x[test_idx], num_classes, C, max_iter, seed
        )
    return probs
