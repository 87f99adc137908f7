"""The training loop counts the distinct labels of each batch (how well the stream mixes
the classes; the scale rehearsal reports it as batch_distinct_classes_mean)."""

from __future__ import annotations

import numpy as np
import torch

from training.data import shuffle_buffer_rows
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


def test_the_shuffle_buffer_counts_distinct_samples_up_to_its_memory_cap() -> None:
    assert shuffle_buffer_rows(2048, 27.0, 3 * 32 * 32, 512) == 2048 * 27
    assert shuffle_buffer_rows(2048, 0.5, 3 * 32 * 32, 512) == 2048  # no copies: as given
    # 1 MiB of 224-pixel rows holds 6: never fewer rows than distinct samples asked for
    assert shuffle_buffer_rows(100, 27.0, 3 * 224 * 224, 1) == 100
    assert shuffle_buffer_rows(2048, 27.0, 3 * 224 * 224, 512) == 512 * 2**20 // (3 * 224**2)
    assert shuffle_buffer_rows(0, 27.0, 3 * 32 * 32, 512) == 0  # 0: no shuffle


def test_a_low_selection_repeated_in_a_row_still_mixes_the_classes_of_a_batch(local_ray):
    """MixFix's epoch repeats each selected sample N / selected times, the copies next to
    each other (training.data.expand_for_epoch): here blocks of 10 samples x 25 copies, as
    a 256-row read batch gives with a 4% selection. Through Ray Data's local shuffle, a
    buffer of 256 rows holds a few such blocks (under 40 classes a batch); sized by
    `shuffle_buffer_rows` it holds about 256 samples, and a batch of 128 sees most of their
    classes (the rehearsal at K = 1,000 measured 55 a batch before the change)."""
    rng = np.random.default_rng(0)
    selected, copies, distinct = 800, 25, 256
    labels = rng.integers(0, 200, selected)
    rows = np.repeat(np.arange(selected), copies)

    def expanded(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = rows[batch["id"]]
        return {
            "image": np.zeros((len(ids), 8, 8, 3), np.uint8),
            "target": labels[ids],
            "sample_id": ids,
            "epoch": np.zeros(len(ids), dtype=np.int64),
        }

    stream = local_ray.data.range(rows.size, override_num_blocks=selected // 10).map_batches(
        expanded
    )
    mean, std = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)

    def classes_per_batch(buffer_rows: int) -> float:
        classes = BatchClasses()
        for _ in epoch_batches(
            stream,
            0,
            128,
            torch.device("cpu"),
            mean,
            std,
            shuffle_buffer=buffer_rows,
            shuffle_seed=0,
            classes=classes,
        ):
            pass
        return classes.mean

    rows_counted = classes_per_batch(distinct)
    samples_counted = classes_per_batch(
        shuffle_buffer_rows(distinct, rows.size / selected, 3 * 8 * 8, 512)
    )
    # measured: 28.7 and 85.0 classes per batch
    assert rows_counted < 40
    assert samples_counted > 60 and samples_counted > 2.5 * rows_counted
