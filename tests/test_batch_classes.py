"""The training loop counts the distinct labels of each batch (how well the stream mixes
the classes; the scale rehearsal reports it as batch_distinct_classes_mean)."""

from __future__ import annotations

import numpy as np
import torch

from training.loop import BatchClasses, epoch_batches


class Shard:
    """Stands in for a Ray Train dataset shard: fixed batches of the given targets."""

    def __init__(self, targets: list[list[int]]) -> None:
        self.targets = targets

    def iter_batches(self, **_options):
        for targets in self.targets:
            n = len(targets)
            yield {
                "image": np.zeros((n, 8, 8, 3), np.uint8),
                "target": np.asarray(targets),
                "sample_id": np.arange(n),
                "epoch": np.zeros(n, dtype=np.int64),
            }


def test_epoch_batches_count_the_distinct_labels_of_each_batch() -> None:
    classes = BatchClasses()
    mean, std = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)
    shard = Shard([[0, 0, 1, 1], [2, 3, 4, 4], [5, 5, 5, 5]])
    batches = list(
        epoch_batches(
            shard,
            0,
            4,
            torch.device("cpu"),
            mean,
            std,
            shuffle_buffer=0,
            shuffle_seed=0,
            classes=classes,
        )
    )
    assert len(batches) == 3
    assert classes.batches == 3 and classes.mean == (2 + 3 + 1) / 3
    assert BatchClasses().mean is None  # no batch: no figure
