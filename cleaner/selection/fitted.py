"""A fitted selection: what was fitted (`SelectionSpec`), per-source ranges and mixtures
(`SourceFit`), the backfill cut-offs (`BackfillPlan`), and `FittedSelection`, which maps
any batch of rows to its per-sample selection columns (a few KB; shipped to Ray tasks).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from cleaner.selection.em import log_posteriors, mixture_table
from cleaner.selection.rules import (
    CONSISTENCY_TOLERANCE,
    DEFAULT_REG_COVAR,
    LOG_EPSILON,
    GmmMode,
    consistency_scores,
)

if TYPE_CHECKING:
    import ray.data

Batch = dict[str, np.ndarray]


DEFAULT_BATCH_ROWS = 1 << 18  # rows per chunk inside a block function, and per apply batch


@dataclass(frozen=True)
class SelectionSpec:
    """What to fit: columns, thresholds and EM settings (no data)."""

    num_classes: int
    sources: tuple[tuple[str, str, str], ...]  # (name, p_label column, max_p column)
    label_column: str = "label"
    key_column: str | None = None
    theta_gmm: float = 0.5
    theta_cons: float = 0.8
    gmm: GmmMode = "per_class"
    max_iter: int = 100
    tol: float = 1e-3
    reg_covar: float = DEFAULT_REG_COVAR

    @property
    def num_groups(self) -> int:
        """Mixtures per source: K per class, or a single global one."""
        return self.num_classes if self.gmm == "per_class" else 1

    def columns(self) -> list[str]:
        """The only columns the fit reads."""
        names = [self.label_column]
        for _, p_column, max_column in self.sources:
            names += [p_column, max_column]
        if self.key_column is not None:
            names.append(self.key_column)
        return list(dict.fromkeys(names))

    def settings(self) -> dict[str, float | int | str]:
        return {
            "max_iter": self.max_iter,
            "tol": self.tol,
            "reg_covar": self.reg_covar,
            "init_params": "2-means split (histogram Otsu split, exact Lloyd passes)",
            "em": "numpy fixed-point",
        }


@dataclass(frozen=True, eq=False)
class SourceFit:
    """One source's per-class score ranges and mixture parameters (G mixtures).

    A mixture with no sample to fit (its class absent or degenerate) keeps placeholders:
    means (0, 1), variances reg_covar, weights 0.5, n_iter 0, not converged.
    """

    log_min: np.ndarray  # float64[K], NaN for absent classes
    log_max: np.ndarray  # float64[K]
    degenerate: np.ndarray  # bool[K]
    means: np.ndarray  # float64[G, 2]
    variances: np.ndarray  # float64[G, 2]
    weights: np.ndarray  # float64[G, 2]
    n_iter: np.ndarray  # int64[G]
    converged: np.ndarray  # bool[G]

    def loss_score(self, p_label: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Per-class min-max normalised log p(label) in [0, 1] (1.0 in degenerate classes)."""
        ranges = self.log_max - self.log_min
        safe = np.where(self.degenerate | np.isnan(ranges), 1.0, ranges)
        log_p = np.log(np.clip(p_label, LOG_EPSILON, None))
        normalised = (log_p - self.log_min[labels]) / safe[labels]
        return np.where(self.degenerate[labels], 1.0, np.clip(normalised, 0.0, 1.0))

    def group_ids(self, labels: np.ndarray, gmm: str) -> np.ndarray:
        """Mixture index per sample, -1 for samples left out of the fit (degenerate)."""
        fitted = ~self.degenerate[labels]
        if gmm == "per_class":
            return np.where(fitted, labels, -1)
        return np.where(fitted, 0, -1)

    def p_clean(self, loss: np.ndarray, labels: np.ndarray, gmm: str) -> np.ndarray:
        """Posterior of the larger-mean component (1.0 for samples outside every fit)."""
        groups = self.group_ids(labels, gmm)
        rows = np.flatnonzero(groups >= 0)
        p_clean = np.ones(loss.shape[0], dtype=np.float64)
        if rows.size:
            g = groups[rows]
            table = mixture_table(self.means, self.variances, self.weights)
            first, second, loglik = log_posteriors(loss[rows], table[:, g])
            clean = np.argmax(self.means, axis=1)[g]  # the responsibility of this component
            p_clean[rows] = np.exp(np.where(clean == 0, first, second) - loglik)
        return p_clean


@dataclass(frozen=True, eq=False)
class BackfillPlan:
    """Cut-offs that pick the m best samples (by loss score) of each empty class."""

    size: int  # m
    classes: np.ndarray  # int64[E], the empty present classes
    score: np.ndarray  # float64[E], rank score of the last pick
    key: np.ndarray | None  # [E], key of the last pick; None: every tie at the cut is picked
    counts: np.ndarray  # int64[K], picks per class

    def picks(self, labels: np.ndarray, rank: np.ndarray, keys: np.ndarray | None) -> np.ndarray:
        """bool[n]: the samples of this batch that the backfill adds."""
        position = np.full(self.counts.shape[0], -1, dtype=np.int64)
        position[self.classes] = np.arange(self.classes.shape[0])
        rows = np.flatnonzero(position[labels] >= 0)
        picked = np.zeros(labels.shape[0], dtype=bool)
        if rows.size:
            e = position[labels[rows]]
            score, cut = rank[rows], self.score[e]
            tie = score == cut
            if self.key is not None:
                if keys is None:
                    raise ValueError("the backfill cut-offs need the key column")
                tie &= np.asarray(keys[rows] <= self.key[e], dtype=bool)
            picked[rows] = (score > cut) | tie
        return picked


@dataclass(frozen=True, eq=False)
class FittedSelection:
    """A fitted selection: per-class parameters, tiny; `apply` maps a batch to its outputs."""

    spec: SelectionSpec
    sources: dict[str, SourceFit]
    class_counts: np.ndarray  # int64[K]
    columns_read: tuple[str, ...] = ()  # batch columns the fit's block functions received
    criterion_counts: dict[str, np.ndarray] = field(default_factory=dict)  # name -> int64[K]
    backfill: BackfillPlan | None = None

    @property
    def num_samples(self) -> int:
        return int(self.class_counts.sum())

    def evaluate(self, batch: Mapping[str, Any]) -> Batch:
        """Every per-sample quantity, including the per-criterion masks and rank score."""
        spec = self.spec
        labels = as_labels(batch[spec.label_column])
        if labels.size and (labels.min() < 0 or labels.max() >= spec.num_classes):
            raise ValueError(
                f"labels must be in [0, {spec.num_classes}), got values in "
                f"[{labels.min()}, {labels.max()}]"
            )
        out: Batch = {}
        is_clean = np.ones(labels.shape[0], dtype=bool)
        losses, p_labels = [], []
        for name, p_column, max_column in spec.sources:
            source = self.sources[name]
            p_label = np.asarray(batch[p_column], dtype=np.float64)
            max_p = np.asarray(batch[max_column], dtype=np.float64)
            loss = source.loss_score(p_label, labels)
            p_clean = source.p_clean(loss, labels, spec.gmm)
            consistency = consistency_scores(p_label, max_p)
            gmm_selected = p_clean >= spec.theta_gmm
            consistency_selected = consistency >= spec.theta_cons - CONSISTENCY_TOLERANCE
            is_clean &= gmm_selected & consistency_selected
            out[f"loss_score_{name}"] = loss
            out[f"gmm_p_clean_{name}"] = p_clean
            out[f"consistency_{name}"] = consistency
            out[f"gmm_selected_{name}"] = gmm_selected
            out[f"consistency_selected_{name}"] = consistency_selected
            losses.append(loss)
            p_labels.append(p_label)
        rank = np.mean(losses, axis=0)
        keys = keys_of(batch, spec.key_column)
        backfilled = (
            self.backfill.picks(labels, rank, keys)
            if self.backfill is not None
            else np.zeros(labels.shape[0], dtype=bool)
        )
        out["rank_score"] = rank
        out["selected_before_backfill"] = is_clean
        out["backfilled"] = backfilled
        out["is_clean"] = is_clean | backfilled
        out["clean_score"] = np.mean(p_labels, axis=0)
        return out

    def output_columns(self) -> list[str]:
        """Names of the columns `apply` adds."""
        names = ["is_clean", "backfilled", "clean_score"]
        for name, _, _ in self.spec.sources:
            names += [f"loss_score_{name}", f"gmm_p_clean_{name}", f"consistency_{name}"]
        return names

    def apply(self, batch: Any) -> Any:
        """Add is_clean, backfilled, clean_score and per-source columns to a batch.

        Accepts a dict of numpy arrays or a pyarrow Table (the type is kept), so it can be
        given to `Dataset.map_batches` with either batch format.
        """
        if isinstance(batch, pa.Table):
            arrays = {name: batch.column(name).to_numpy() for name in self.spec.columns()}
            values = self.evaluate(arrays)
            for name in self.output_columns():
                column = pa.array(values[name])
                index = batch.schema.get_field_index(name)
                batch = (
                    batch.set_column(index, name, column)
                    if index >= 0
                    else batch.append_column(name, column)
                )
            return batch
        values = self.evaluate(batch)
        out = dict(batch)
        out.update({name: values[name] for name in self.output_columns()})
        return out

    def transform(
        self, ds: ray.data.Dataset, *, batch_rows: int = DEFAULT_BATCH_ROWS
    ) -> ray.data.Dataset:
        """The dataset with the selection columns added (a per-sample map_batches)."""
        return ds.map_batches(self.apply, batch_format="pyarrow", batch_size=batch_rows)

    def counts(self) -> dict:
        """Per-class and per-criterion counts, in the format of `SelectionResult.counts`."""
        k = self.spec.num_classes
        total = self.class_counts.astype(int).tolist()
        backfilled = (
            self.backfill.counts if self.backfill is not None else np.zeros(k, dtype=np.int64)
        )
        clean = self.criterion_counts["clean"] + backfilled
        per_class: dict[str, list[int]] = {
            "total": total,
            "clean": clean.astype(int).tolist(),
            "backfilled": backfilled.astype(int).tolist(),
        }
        per_criterion: dict[str, int] = {}
        for name, _, _ in self.spec.sources:
            for criterion in ("gmm", "consistency"):
                key = f"{name}_{criterion}"
                per_criterion[key] = int(self.criterion_counts[key].sum())
                per_class[key] = self.criterion_counts[key].astype(int).tolist()
        return {
            "num_samples": self.num_samples,
            "num_classes": int(k),
            "num_present_classes": int(sum(1 for n in total if n > 0)),
            "num_clean": int(clean.sum()),
            "num_backfilled": int(backfilled.sum()),
            "num_backfilled_classes": int((backfilled > 0).sum()),
            "backfill_size": int(self.backfill.size) if self.backfill is not None else 0,
            "per_criterion": per_criterion,
            "per_class": per_class,
        }


def as_labels(values: Any) -> np.ndarray:
    labels = np.asarray(values)
    if np.issubdtype(labels.dtype, np.integer):
        return labels.astype(np.int64, copy=False)
    return labels.astype(np.float64).astype(np.int64)


def keys_of(batch: Mapping[str, Any], key_column: str | None) -> np.ndarray | None:
    return None if key_column is None else np.asarray(batch[key_column])
