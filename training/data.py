"""Training data at scale: Ray Data streams the shards, joined to the manifest by position.

Every sample has an integer id: its manifest row, i.e. the offset of its shard plus its
position in the shard (the clean job writes the manifest in shard order, positions
ascending). The MixFix selection and current labels are compact arrays indexed by that
id, published once per epoch to a small actor; the data pipeline's CPU tasks read them
to repeat each selected sample (class balance) and attach its current label, then crop
and flip it. No Python set of keys, no per-sample objects, ever.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq

from cleaner.reading import uri as uri_lib
from cleaner.reading.shards import STATUS_OK
from cleaner.scoring.pipeline import decoded_samples
from training.transforms import random_crop_flip

TRAIN_COLUMNS = ("image", "target", "sample_id", "epoch")


@dataclass(frozen=True)
class SampleIndex:
    """The manifest in compact arrays, indexed by sample id."""

    shards: list[str]
    offsets: dict[str, int]
    labels: np.ndarray  # int64[N], given labels (-1 where unusable)
    is_clean: np.ndarray  # bool[N], the clean job's selection
    trainable: np.ndarray  # bool[N], status clean or noisy (not failed, not off_topic)
    true_labels: np.ndarray | None  # int64[N] (-1 unknown) when the shards carried them
    # int32[N, k]: CLIP's zero-shot top-k classes (-1 unknown), loaded only when asked for
    zeroshot_topk: np.ndarray | None = None
    # float32[N]: per-sample loss weights (mixfix.sample_weights), loaded only when asked for
    weights: np.ndarray | None = None

    @property
    def num_samples(self) -> int:
        return int(self.labels.shape[0])


def fixed_width_rows(column, width: int) -> np.ndarray:
    """int32[N, width]: the first `width` entries of a fixed-size-list column (-1 for nulls)."""
    arr = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    size = arr.type.list_size
    if width > size:
        raise ValueError(f"asked for the first {width} entries of a column holding {size}")
    values = np.asarray(arr.values.to_numpy(zero_copy_only=False))
    rows = values[arr.offset * size : (arr.offset + len(arr)) * size].reshape(len(arr), size)
    out = rows[:, :width].astype(np.int32)
    if arr.null_count:
        out[np.asarray(arr.is_null().to_numpy(zero_copy_only=False), dtype=bool)] = -1
    return out


def load_sample_index(
    manifest_uri: str, zeroshot_topk: int = 0, sample_weights: str = "none"
) -> SampleIndex:
    """Read the manifest's small columns; check that ids are offset + position.

    zeroshot_topk > 0 also reads the first that many of CLIP's zero-shot top-k classes per
    sample (`topk_labels_zeroshot`, for the CLIP guard of MixFix). sample_weights
    "cleannet" reads CleanNet's relevance as weights, max(0, relevance) (CleanNet's w_soft).
    """
    fs, path = uri_lib.resolve(manifest_uri)
    with fs.open_input_file(path) as f:
        schema_names = pq.read_schema(f).names
    columns = ["shard", "shard_pos", "label", "is_clean", "status"]
    if "true_label" in schema_names:
        columns.append("true_label")
    if zeroshot_topk > 0:
        if "topk_labels_zeroshot" not in schema_names:
            raise ValueError(
                f"manifest {manifest_uri} has no topk_labels_zeroshot column "
                "(written by the clean job; the CLIP guard needs it)"
            )
        columns.append("topk_labels_zeroshot")
    if sample_weights == "cleannet":
        if "cleannet_relevance" not in schema_names:
            raise ValueError(
                f"manifest {manifest_uri} has no cleannet_relevance column (written by the "
                "clean job with selection.detector=cleannet, or ensemble with a verified set)"
            )
        columns.append("cleannet_relevance")
    with fs.open_input_file(path) as f:
        table = pq.read_table(f, columns=columns)
    shard_col = np.asarray(table.column("shard").to_pylist(), dtype=object)
    positions = table.column("shard_pos").to_numpy()
    starts = np.flatnonzero(np.r_[True, shard_col[1:] != shard_col[:-1]])
    shards = [str(shard_col[i]) for i in starts]
    if len(set(shards)) != len(shards):
        raise ValueError(f"manifest {manifest_uri}: rows of a shard are not contiguous")
    offsets = {shard: int(start) for shard, start in zip(shards, starts, strict=True)}
    expected = np.arange(len(positions)) - np.repeat(starts, np.diff(np.r_[starts, len(positions)]))
    if not np.array_equal(positions, expected):
        raise ValueError(f"manifest {manifest_uri}: positions within a shard are not 0, 1, 2, ...")
    status = np.asarray(table.column("status").to_pylist(), dtype=object)
    true_labels = table.column("true_label").to_numpy() if "true_label" in columns else None
    return SampleIndex(
        shards=shards,
        offsets=offsets,
        labels=table.column("label").to_numpy().astype(np.int64),
        is_clean=table.column("is_clean").to_numpy(zero_copy_only=False).astype(bool),
        # off-topic images fit no class: never trained on nor relabelled (docs/checks.md)
        trainable=(status != "failed") & (status != "off_topic"),
        true_labels=None if true_labels is None else true_labels.astype(np.int64),
        zeroshot_topk=fixed_width_rows(table.column("topk_labels_zeroshot"), zeroshot_topk)
        if zeroshot_topk > 0
        else None,
        weights=relevance_weights(table.column("cleannet_relevance"))
        if sample_weights == "cleannet"
        else None,
    )


def relevance_weights(column) -> np.ndarray:
    """CleanNet's w_soft = max(0, relevance); 0 where there is none (failed rows)."""
    values = np.asarray(column.to_numpy(zero_copy_only=False), dtype=np.float32)
    return np.clip(np.nan_to_num(values, nan=0.0), 0.0, None)


def with_sample_ids(batch: dict[str, np.ndarray], offsets: dict[str, int]) -> dict[str, np.ndarray]:
    """Usable rows only, with their sample id; the image and id are all training needs."""
    keep = np.asarray(batch["status"]) == STATUS_OK
    shards = np.asarray(batch["shard"])[keep]
    base = np.fromiter((offsets[s] for s in shards), dtype=np.int64, count=len(shards))
    return {
        "image": np.asarray(batch["image"])[keep],
        "sample_id": base + np.asarray(batch["shard_pos"], dtype=np.int64)[keep],
        "label": np.asarray(batch["label"], dtype=np.int64)[keep],
    }


class EpochStateStore:
    """Owns the current epoch's (repeat, labels) arrays, for the data pipeline's tasks.

    Run as an actor on the driver's node (`start_epoch_state_store`): rank 0 sends the
    arrays by value and the actor puts them into the object store itself, so the object
    is owned by the actor and held on the driver's node. Neither dies with a training
    worker or its node; readers get the reference in a list (not resolved in transit).
    """

    def __init__(self) -> None:
        self.epoch = -1
        self.ref: list = []

    def publish(self, epoch: int, arrays: dict[str, np.ndarray]) -> int:
        import ray

        self.epoch, self.ref = epoch, [ray.put(arrays)]
        return epoch

    def current(self) -> tuple[int, list]:
        return self.epoch, self.ref


def start_epoch_state_store():
    """An EpochStateStore actor pinned to this process's node (the driver's: it lives as
    long as the job's driver, whichever worker node is lost)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(EpochStateStore).options(num_cpus=0, scheduling_strategy=here).remote()


def repetition_factors(selected: np.ndarray, labels: np.ndarray, balanced: bool) -> np.ndarray:
    """Expected copies of each sample per epoch, summing to N (the epoch length).

    balanced: every present class gets N / K_present draws, spread evenly over its
    selected samples (class-balanced sampling by repetition, docs/method.md, "MixFix");
    otherwise each selected sample is drawn N / |selected| times.
    """
    n = labels.shape[0]
    factors = np.zeros(n, dtype=np.float64)
    chosen = np.flatnonzero(selected)
    if chosen.size == 0:
        return factors
    if not balanced:
        factors[chosen] = n / chosen.size
        return factors
    counts = np.bincount(labels[chosen])
    present = int((counts > 0).sum())
    factors[chosen] = n / (present * counts[labels[chosen]])
    return factors


def shuffle_buffer_rows(distinct: int, repetition: float, row_bytes: int, max_mb: float) -> int:
    """Rows of a local shuffle buffer that holds about `distinct` different samples when
    each sample arrives as `repetition` consecutive copies (`expand_for_epoch`), at most
    `max_mb` of rows of `row_bytes` each but never fewer than `distinct` rows.

    A buffer counted in rows would hold distinct / repetition samples: at K = 1,000
    classes, a selection of 3.7% (repetition 27) left 76 samples in 2,048 rows and
    55 classes in a batch of 128."""
    if distinct <= 0:
        return 0
    wanted = int(np.ceil(distinct * max(1.0, repetition)))
    cap = int(max_mb * 2**20) // max(1, row_bytes)
    return max(distinct, min(wanted, cap))


def _uniform_hash(seed: int, epoch: int, ids: np.ndarray) -> np.ndarray:
    """A deterministic U[0, 1) per (seed, epoch, id), independent of block boundaries."""
    x = ids.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    x ^= np.uint64((seed * 1_000_003 + epoch * 7_919 + 1) & 0xFFFFFFFFFFFFFFFF)
    x ^= x >> np.uint64(33)
    x *= np.uint64(0xFF51AFD7ED558CCD)
    x ^= x >> np.uint64(33)
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def expand_for_epoch(batch: dict[str, np.ndarray], store, seed: int) -> dict[str, np.ndarray]:
    """Repeat each row by its epoch repetition factor (stochastic rounding); attach its label."""
    import ray

    epoch, ref = ray.get(store.current.remote())
    state = ray.get(ref[0])
    ids = batch["sample_id"]
    factors = state["repeat"][ids]
    whole = np.floor(factors)
    copies = (whole + (_uniform_hash(seed, epoch, ids) < factors - whole)).astype(np.int64)
    rows = np.repeat(np.arange(len(ids)), copies)
    out = {
        "image": batch["image"][rows],
        "target": state["labels"][ids][rows],
        "sample_id": ids[rows],
        "epoch": np.full(len(rows), epoch, dtype=np.int64),
    }
    if "weights" in state:  # mixfix.sample_weights
        out["weight"] = state["weights"][ids][rows]
    return out


def augment(
    batch: dict[str, np.ndarray], crop_padding: int, flip: bool, seed: int
) -> dict[str, np.ndarray]:
    """Random crop (after zero padding) and horizontal flip, on the CPU task, uint8 out."""
    if len(batch["sample_id"]) == 0:
        return batch
    rng = np.random.default_rng([seed, int(batch["epoch"][0]), int(batch["sample_id"][0])])
    return {**batch, "image": random_crop_flip(batch["image"], rng, crop_padding, flip)}


def decoded_with_ids(shards: list[str], offsets: dict[str, int], cfg, class_names: list[str]):
    """Decoded usable samples of `shards` with their sample ids (CPU tasks)."""
    return decoded_samples(
        shards,
        class_names=class_names,
        image_size=cfg.data.image_size,
        extensions=cfg.data.image_extensions,
        read_batch_size=cfg.data.read_batch_size,
    ).map_batches(with_sample_ids, fn_kwargs={"offsets": offsets})


def epoch_order(seed: int, epoch: int, count: int) -> np.ndarray:
    """The order in which an epoch reads its `count` shards (or cached blocks): a
    permutation seeded by (seed, epoch), different every epoch, the same on a resumed run."""
    return np.random.default_rng([seed, max(epoch, 0), count]).permutation(count)


def _slots(count: int):
    """A Ray Dataset of `count` rows, one block each: the epoch's reading slots."""
    import ray

    return ray.data.from_items([{"slot": i} for i in range(count)], override_num_blocks=count)


def shard_for_slot(batch: dict[str, np.ndarray], shards: list[str], store, seed: int) -> dict:
    """Ray Data UDF: reading slots in, the shards the current epoch reads at those slots."""
    import ray

    epoch, _ = ray.get(store.current.remote())
    order = epoch_order(seed, epoch, len(shards))
    return {"shard": np.asarray([shards[order[int(s)]] for s in batch["slot"]], dtype=object)}


def cached_block_for_slot(batch: dict[str, np.ndarray], blocks: list, store, seed: int):
    """Ray Data UDF: one reading slot in, the cached block the current epoch reads there."""
    import ray

    epoch, _ = ray.get(store.current.remote())
    order = epoch_order(seed, epoch, len(blocks))
    return ray.get(blocks[order[int(batch["slot"][0])]])


def epoch_ordered_samples(index: SampleIndex, cfg, class_names: list[str], store):
    """Decoded usable samples with ids, their shards (or, with data.cache_decoded, their
    cached blocks) read in epoch_order: a different seeded order each epoch, so that a
    batch mixes classes even where shards do not."""
    if cfg.data.cache_decoded:  # decoded once; each epoch reads the blocks in its order
        cached = decoded_with_ids(index.shards, index.offsets, cfg, class_names).materialize()
        blocks = cached.to_arrow_refs()
        return _slots(len(blocks)).map_batches(
            cached_block_for_slot,
            batch_size=1,
            fn_kwargs={"blocks": blocks, "store": store, "seed": cfg.seed},
        )
    shards = _slots(len(index.shards)).map_batches(
        shard_for_slot,
        batch_size=1,
        fn_kwargs={"shards": list(index.shards), "store": store, "seed": cfg.seed},
    )
    return decoded_samples(
        index.shards,
        class_names=class_names,
        image_size=cfg.data.image_size,
        extensions=cfg.data.image_extensions,
        read_batch_size=cfg.data.read_batch_size,
        source=shards,
    ).map_batches(with_sample_ids, fn_kwargs={"offsets": index.offsets})


def training_stream(index: SampleIndex, cfg, class_names: list[str], store):
    """The epoch stream for Ray Train: read, join ids, expand by the epoch's state, augment.

    With data.shuffle_shards (the default) each epoch reads the shards in its own seeded
    order (epoch_ordered_samples); otherwise in the manifest's order every epoch. With
    data.cache_decoded the decoded images are materialised once in the object store
    and each epoch only expands and augments them.
    """
    if cfg.data.shuffle_shards:
        base = epoch_ordered_samples(index, cfg, class_names, store)
    else:
        base = decoded_with_ids(index.shards, index.offsets, cfg, class_names)
        if cfg.data.cache_decoded:
            base = base.materialize()
    stream = base.map_batches(
        expand_for_epoch, fn_kwargs={"store": store, "seed": cfg.seed}
    ).map_batches(
        augment,
        fn_kwargs={
            "crop_padding": cfg.data.crop_padding,
            "flip": cfg.data.flip,
            "seed": cfg.seed,
        },
    )
    without_downstream_capacity_backpressure(stream)
    return stream


def without_downstream_capacity_backpressure(ds) -> None:
    """Turn off Ray Data's downstream-capacity backpressure for `ds` (its own context,
    which travels with it to Ray Train's split coordinator); the object-store budget
    still bounds it.

    Ray Train splits the stream with `streaming_split(equal=True)`: the splitter hands a
    block to the rank with the fewest rows only if the blocks left in its buffer can even
    the ranks out again. Blocks of `expand_for_epoch` vary widely in rows (a shard's
    selected samples times their repetition), and in DDP the ranks advance in lockstep.
    With this policy on, the 1M-sample rehearsal deadlocked after 297 batches: rank 1
    waited for a block the splitter could not safely hand over, rank 0 waited for rank 1
    in DDP, so no rank pulled, and the policy held the expansion back because nobody
    pulled (docs/benchmarks.md, the WebVision-scale rehearsal)."""
    ds.context.downstream_capacity_backpressure_ratio = None


def split_shards_by_samples(
    shards: list[str], offsets: dict[str, int], num_samples: int, world: int
) -> list[list[str]]:
    """Whole shards dealt to `world` workers so each gets about the same number of samples.

    Largest shard first to the worker with the fewest samples so far (ties: lower rank);
    each worker's shards keep their manifest order. Deterministic: every rank computes
    the same split. Splitting by shard count instead would leave a worker with the big
    shards predicting long after the others.
    """
    starts = [offsets[s] for s in shards]
    sizes = np.diff(np.r_[starts, num_samples]).astype(np.int64)
    loads = np.zeros(world, dtype=np.int64)
    owner = np.zeros(len(shards), dtype=np.int64)
    for i in sorted(range(len(shards)), key=lambda i: (-sizes[i], i)):
        rank = int(np.argmin(loads))
        owner[i] = rank
        loads[rank] += sizes[i]
    return [[s for s, o in zip(shards, owner, strict=True) if o == rank] for rank in range(world)]
