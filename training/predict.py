"""A trained model over WebDataset shards on Ray Data: the predict job's stages.

shards --(CPU tasks: read tar, decode, resize as the model was trained; labels optional)-->
       --(ModelPredictor actor pool: GPUs when the cluster has them)--> predictions
       --(driver: a few numbers per sample)--> one Parquet file, in shard order.

Nothing is lost: a sample that cannot be read or decoded is a row with status "failed"
and its reason, and no prediction.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from cleaner.reading.shards import MISSING_LABEL, STATUS_OK
from cleaner.reasons import group_reasons
from cleaner.scoring.writing import fixed_size_list_array

PASSED_THROUGH = ("key", "shard", "shard_pos", "status", "reason", "shard_total")


class ModelPredictor:
    """Ray Data actor: loads the trained model once, maps decoded batches to predictions."""

    def __init__(self, model: str, top_k: int, amp: str, num_threads: int | None = None):
        import torch

        from cleaner.scoring.devices import autocast_dtype, select_device
        from training.saved_model import load_model

        if num_threads:
            torch.set_num_threads(num_threads)
        device = select_device()
        self.model = load_model(model, device)
        self.amp_dtype = autocast_dtype(device, amp)
        self.top_k = max(1, min(top_k, self.model.num_classes))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["key"])
        ok = np.flatnonzero(np.asarray(batch["status"]) == STATUS_OK)
        out = {name: batch[name] for name in PASSED_THROUGH}
        out["given_label"] = np.asarray(batch["label"], dtype=np.int64)
        out["predicted_label"] = np.full(n, MISSING_LABEL, dtype=np.int64)
        out["confidence"] = np.full(n, np.nan, dtype=np.float32)
        out["top_labels"] = np.full((n, self.top_k), MISSING_LABEL, dtype=np.int64)
        out["top_probs"] = np.full((n, self.top_k), np.nan, dtype=np.float32)
        if len(ok):
            found = self.model.predict(
                np.asarray(batch["image"])[ok],
                top_k=self.top_k,
                batch_size=len(ok),
                amp_dtype=self.amp_dtype,
            )
            out["predicted_label"][ok] = found.labels
            out["confidence"][ok] = found.confidence
            out["top_labels"][ok] = found.top_labels
            out["top_probs"][ok] = found.top_probs
        return out


def predictions_table(batch: dict[str, np.ndarray], class_names: list[str]) -> pa.Table:
    """The output rows of a predicted batch: key, shard, shard_pos, status, reason,
    given_label / given_name (-1 / null where the shard has no label), predicted_label,
    predicted_name, confidence, top_labels, top_probs (-1 / null / NaN where failed)."""

    def names(labels: np.ndarray) -> pa.Array:
        return pa.array(
            [class_names[i] if 0 <= i < len(class_names) else None for i in labels], pa.string()
        )

    given = np.asarray(batch["given_label"], dtype=np.int64)
    predicted = np.asarray(batch["predicted_label"], dtype=np.int64)
    return pa.table(
        {
            "key": pa.array([str(k) for k in batch["key"]], pa.string()),
            "shard": pa.array([str(s) for s in batch["shard"]], pa.string()),
            "shard_pos": pa.array(np.asarray(batch["shard_pos"], dtype=np.int64)),
            "status": pa.array([str(s) for s in batch["status"]], pa.string()),
            "reason": pa.array([str(r) for r in batch["reason"]], pa.string()),
            "given_label": pa.array(given),
            "given_name": names(given),
            "predicted_label": pa.array(predicted),
            "predicted_name": names(predicted),
            "confidence": pa.array(np.asarray(batch["confidence"], dtype=np.float32)),
            "top_labels": fixed_size_list_array(np.asarray(batch["top_labels"], dtype=np.int64)),
            "top_probs": fixed_size_list_array(np.asarray(batch["top_probs"], dtype=np.float32)),
        }
    )


class PredictionCounts:
    """Running counts over the written rows: samples, failures, accuracy vs given labels,
    and the shards whose rows are all written."""

    def __init__(self) -> None:
        self.samples = self.failed = self.labelled = self.correct = 0
        self.failed_reasons: list[str] = []
        self.seen: dict[str, int] = {}
        self.totals: dict[str, int] = {}

    def add(self, batch: dict[str, np.ndarray]) -> int:
        """Count a batch; returns how many shards it completed."""
        status = np.asarray(batch["status"])
        ok = status == STATUS_OK
        given = np.asarray(batch["given_label"], dtype=np.int64)
        labelled = ok & (given >= 0)
        self.samples += len(status)
        self.failed += int((~ok).sum())
        self.labelled += int(labelled.sum())
        self.correct += int(
            (np.asarray(batch["predicted_label"])[labelled] == given[labelled]).sum()
        )
        self.failed_reasons.extend(str(r) for r in np.asarray(batch["reason"])[~ok])
        names = np.asarray(batch["shard"]).astype(str)
        shards, inverse, rows = np.unique(names, return_inverse=True, return_counts=True)
        totals = np.full(len(shards), -1, dtype=np.int64)  # a shard's last row carries it
        np.maximum.at(totals, inverse, np.asarray(batch["shard_total"], dtype=np.int64))
        completed = 0
        for shard, count, total in zip(
            shards.tolist(), rows.tolist(), totals.tolist(), strict=True
        ):
            self.seen[shard] = self.seen.get(shard, 0) + count
            if total > 0:
                self.totals[shard] = total
            completed += int(self.seen[shard] == self.totals.get(shard))
        return completed

    def as_dict(self) -> dict:
        return {
            "samples": self.samples,
            "predicted": self.samples - self.failed,
            "failed": self.failed,
            "failed_by_reason": group_reasons(self.failed_reasons),
            "with_given_label": self.labelled,
            "accuracy_vs_given_labels": self.correct / self.labelled if self.labelled else None,
        }


def prediction_stage(ds, cfg, plan):
    """Append the ModelPredictor actor pool (resources and size from `plan`) to a dataset
    of decoded samples (cfg: PredictConfig)."""
    from ray.data import ActorPoolStrategy

    return ds.map_batches(
        ModelPredictor,
        batch_size=cfg.scoring.batch_size,
        compute=ActorPoolStrategy(min_size=plan.min_actors, max_size=plan.max_actors),
        fn_constructor_kwargs={
            "model": cfg.model,
            "top_k": cfg.top_k,
            "amp": cfg.amp,
            "num_threads": max(1, int(plan.num_cpus)),
        },
        **plan.remote_args(),
    )
