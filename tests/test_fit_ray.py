"""Tests for the selection engine over Ray Data (cleaner.selection.fit_ray), against in-memory.

Local Ray (2 CPUs) and a few thousand synthetic rows split into several blocks.
"""

from __future__ import annotations

import itertools

import numpy as np
import pyarrow as pa
import pytest

from cleaner.selection.em import combine_exact_sums, exact_group_sums, to_fixed_point
from cleaner.selection.fit_plan import (
    EMBEDDING_BYTES_PER_DIM,
    PROBABILITY_BYTES_PER_CLASS,
    SMALL_COLUMN_BYTES,
    choose_fit_mode,
    estimate_in_memory_bytes,
)
from cleaner.selection.fit_ray import distributed_select, fit_selection
from cleaner.selection.probe import fit_probe_probs
from cleaner.selection.probe_streaming import fit_probe_streaming, fold_ids, stable_hash
from cleaner.selection.rules import SourceScores
from cleaner.selection.select import select_clean, select_clean_result, select_from_scores

SOURCE_COLUMNS = {"zeroshot": ("p_zs", "max_zs"), "probe": ("p_pr", "max_pr")}
NUM_CLASSES = 12  # 0-7 realistic, 8 absent, 9 one sample, 10 all equal, 11 never consistent


@pytest.fixture(scope="module")
def ray_local(local_ray):
    """The suite's shared local Ray (tests/conftest.py)."""
    import ray.data  # noqa: F401  (ray_local.data below)

    return local_ray


def _probabilities(
    n: int, k: int, rng: np.random.Generator, noise: float = 0.4
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Noisy labels and the [N, K] probabilities of two sources that mostly favour the
    true class, each row divided by its sum (as the scorer's softmax rows)."""
    true = rng.integers(0, k, n)
    flip = rng.random(n) < noise
    labels = np.where(flip, (true + rng.integers(1, k, n)) % k, true)
    matrices = {}
    for name, strength in (("zeroshot", 3.0), ("probe", 4.0)):
        logits = rng.normal(0.0, 1.0, (n, k))
        logits[np.arange(n), true] += strength + rng.normal(0.0, 1.0, n)
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        matrices[name] = probs / probs.sum(axis=1, keepdims=True)
    return labels, matrices


def _realistic(
    n: int, k: int, rng: np.random.Generator, noise: float = 0.4
) -> tuple[np.ndarray, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Noisy labels and (p_label, max_p) of two sources that mostly favour the true class."""
    labels, matrices = _probabilities(n, k, rng, noise)
    columns = {
        name: (
            probs[np.arange(n), labels] / probs.sum(axis=1),
            probs.max(axis=1) / probs.sum(axis=1),
        )
        for name, probs in matrices.items()
    }
    return labels, columns


def _scores(seed: int = 0) -> tuple[np.ndarray, dict[str, SourceScores]]:
    """Realistic classes plus an absent, a single-sample, an all-equal and an empty class."""
    rng = np.random.default_rng(seed)
    labels, columns = _realistic(2400, 8, rng)
    special_labels = np.array([9] + [10] * 6 + [11] * 40)
    sources = {}
    order = rng.permutation(labels.shape[0] + special_labels.shape[0])
    for name, (p_label, max_p) in columns.items():
        never_max = rng.uniform(0.5, 0.9, 40)
        special_p = np.concatenate(([0.3], np.full(6, 0.25), never_max * rng.uniform(0.1, 0.6, 40)))
        special_max = np.concatenate(([0.3], np.full(6, 0.25), never_max))
        sources[name] = SourceScores(
            p_label=np.concatenate((p_label, special_p))[order],
            max_p=np.concatenate((max_p, special_max))[order],
        )
    return np.concatenate((labels, special_labels))[order], sources


def _rows(labels: np.ndarray, sources: dict[str, SourceScores], blob: int = 0) -> list[dict]:
    rows = []
    for i in range(labels.shape[0]):
        row = {"key": i, "label": int(labels[i])}
        for name, (p_column, max_column) in SOURCE_COLUMNS.items():
            row[p_column] = float(sources[name].p_label[i])
            row[max_column] = float(sources[name].max_p[i])
        if blob:
            row["blob"] = np.full(blob, i, dtype=np.float32)
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- no Ray


def test_exact_group_sums_do_not_depend_on_the_partition() -> None:
    rng = np.random.default_rng(0)
    values = rng.random((5000, 3))
    values[:, 2] = rng.normal(0.0, 300.0, 5000)
    bits = np.array([40, 40, 28])
    terms = to_fixed_point(values, bits)
    groups = rng.integers(0, 7, 5000)
    whole = exact_group_sums(groups, terms, 7)[None]
    cuts = [0, 1, 977, 2500, 4999, 5000]
    parts = np.stack(
        [exact_group_sums(groups[a:b], terms[a:b], 7) for a, b in itertools.pairwise(cuts)]
    )
    shuffled = rng.permutation(5000)
    reordered = exact_group_sums(groups[shuffled], terms[shuffled], 7)[None]
    expected = combine_exact_sums(whole, bits)
    assert np.array_equal(combine_exact_sums(parts, bits), expected)
    assert np.array_equal(combine_exact_sums(reordered, bits), expected)
    reference = np.stack([np.bincount(groups, weights=values[:, c], minlength=7) for c in range(3)])
    np.testing.assert_allclose(expected, reference.T, rtol=1e-9, atol=1e-6)


@pytest.mark.parametrize("gmm", ["per_class", "global"])
def test_the_library_runs_the_job_engine(gmm: str) -> None:
    """select_clean on [N, K] probability matrices is the clean job's in-memory fit over
    the scorer's columns (p(label), max p) with the probe the job fitted, bit for bit;
    parity with the official scikit-learn selection is in tests/test_selection_parity.py."""
    from cleaner.config import SelectionConfig
    from cleaner.scoring.writing import fixed_size_list_array
    from cleaner.selection.fit_in_memory import fit_in_memory
    from cleaner.selection.manifest import build_manifest
    from cleaner.selection.score_table import ScoreBatch
    from tests.test_fit import make_bank

    rng = np.random.default_rng(3)
    n, k = 3000, 8
    labels, matrices = _probabilities(n, k, rng)
    zeroshot = matrices["zeroshot"]
    sums = zeroshot.sum(axis=1)
    bank = make_bank(rng, classes=k)
    embeddings = (matrices["probe"] @ bank.features[:, 0]).astype(np.float16)
    order = np.argsort(-zeroshot, axis=1)[:, :3]
    scores = pa.table(  # the scorer's score-file columns
        {
            "key": [f"shard-{i // 500}/{i:06d}" for i in range(n)],  # sorted as the rows
            "shard": [f"shard-{i // 500}.tar" for i in range(n)],
            "shard_pos": np.arange(n) % 500,
            "label": labels,
            "true_label": labels,
            "status": ["ok"] * n,
            "reason": [""] * n,
            "p_label": zeroshot[np.arange(n), labels] / sums,
            "max_p": zeroshot.max(axis=1) / sums,
            "argmax": order[:, 0],
            "topk_labels": fixed_size_list_array(order),
            "topk_probs": fixed_size_list_array(np.take_along_axis(zeroshot, order, axis=1)),
            "embedding": fixed_size_list_array(embeddings),
        }
    )
    batch = ScoreBatch(scores)
    cfg = SelectionConfig(gmm=gmm, probe="insample")
    fitted, probe_probs = fit_in_memory(batch, cfg, k)
    names = [f"c{i}" for i in range(k)]
    manifest = build_manifest(batch, fitted, probe_probs, cfg, names, bank, 0.07).to_pydict()

    library = select_clean(labels, zeroshot, probe_probs, gmm=gmm)
    assert 0.3 < library.mean() < 0.9  # a real selection, neither everything nor nothing
    assert np.array_equal(manifest["is_clean"], library)
    result = select_clean_result(labels, zeroshot, probe_probs, gmm=gmm)
    assert np.array_equal(result.is_clean, library)
    for name in ("zeroshot", "probe"):
        for quantity in ("gmm_p_clean", "consistency", "loss_score"):
            ours = getattr(result.sources[name], quantity).astype(np.float32)
            theirs = np.asarray(manifest[f"{quantity}_{name}"])
            if (name, quantity) == ("probe", "gmm_p_clean"):
                # select_clean divides each probe row by its sum (1 to within 1e-16 from
                # scikit-learn); the job takes the rows as they are: a float32 ulp apart
                np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-7)
            else:
                assert np.array_equal(theirs, ours), (name, quantity)


def test_in_memory_em_does_not_depend_on_chunking() -> None:
    labels, sources = _scores(seed=5)
    whole = select_from_scores(labels, NUM_CLASSES, sources)
    chunked = select_from_scores(labels, NUM_CLASSES, sources, chunk_rows=97)
    assert np.array_equal(whole.is_clean, chunked.is_clean)
    for name in sources:
        assert np.array_equal(whole.sources[name].gmm_p_clean, chunked.sources[name].gmm_p_clean)


def test_degenerate_and_absent_classes_follow_selection_rules() -> None:
    labels, sources = _scores()
    result = select_from_scores(labels, NUM_CLASSES, sources)
    degenerate = np.isin(labels, [9, 10])
    for name, scores in sources.items():
        ours = result.sources[name]
        # the documented loss-score normalisation (docs/selection.md), computed here
        log_p = np.log(np.clip(scores.p_label, 1e-12, None))
        expected = np.ones(labels.shape[0])
        for k in np.unique(labels[~degenerate]):
            members = labels == k
            low, high = log_p[members].min(), log_p[members].max()
            expected[members] = (log_p[members] - low) / (high - low)
        np.testing.assert_allclose(ours.loss_score, expected, rtol=0, atol=1e-15)
        assert ours.loss_score[~degenerate].min() == 0.0  # each class's worst sample
        assert ours.loss_score.max() == 1.0
        assert (ours.loss_score[degenerate] == 1.0).all()
        assert (ours.gmm_p_clean[degenerate] == 1.0).all()
    counts = result.counts()
    assert counts["per_class"]["total"][8] == 0
    assert counts["per_class"]["clean"][8] == 0
    assert counts["per_class"]["clean"][9] == 1
    assert counts["per_class"]["clean"][10] == 6
    assert counts["num_present_classes"] == NUM_CLASSES - 1


def test_backfill_picks_the_best_samples_of_an_empty_class() -> None:
    labels, sources = _scores()
    result = select_from_scores(labels, NUM_CLASSES, sources)
    before = result.is_clean & ~result.backfilled
    clean_per_class = np.bincount(labels[before], minlength=NUM_CLASSES)
    assert clean_per_class[11] == 0
    nonzero = clean_per_class[clean_per_class > 0]
    m = max(int(nonzero.min()), labels.shape[0] // NUM_CLASSES**2, 1)
    assert result.backfill_size == m
    members = np.flatnonzero(labels == 11)
    rank = np.mean([s.loss_score for s in result.sources.values()], axis=0)
    best = members[np.argsort(-rank[members], kind="stable")[:m]]
    assert set(np.flatnonzero(result.backfilled)) == set(best)


def test_stable_hash_does_not_depend_on_batching() -> None:
    keys = np.array([f"shard-{i % 7:03d}/{'x' * (i % 13)}{i}" for i in range(2000)], dtype=object)
    whole = stable_hash(keys)
    parts = np.concatenate([stable_hash(keys[a : a + 333]) for a in range(0, 2000, 333)])
    assert np.array_equal(whole, parts)
    assert np.array_equal(stable_hash(keys.astype(str)), whole)
    assert not np.array_equal(stable_hash(keys, seed=1), whole)
    ints = np.arange(2000)
    assert np.array_equal(stable_hash(ints[::-1])[::-1], stable_hash(ints))
    for values in (keys, ints):
        folds = np.bincount(fold_ids(values, 5), minlength=5)
        assert folds.min() > 0.8 * 400 and folds.max() < 1.2 * 400


def test_choose_fit_mode_thresholds() -> None:
    per_sample = (
        SMALL_COLUMN_BYTES + EMBEDDING_BYTES_PER_DIM * 512 + PROBABILITY_BYTES_PER_CLASS * 50
    )
    assert estimate_in_memory_bytes(1000, 512, 50) == 1000 * per_sample
    assert choose_fit_mode(1000, 512, 1000 * per_sample, num_classes=50) == "in_memory"
    assert choose_fit_mode(1000, 512, 1000 * per_sample - 1, num_classes=50) == "distributed"
    assert choose_fit_mode(50_000, 768, 64 * 2**30) == "in_memory"  # CIFAR scale
    assert choose_fit_mode(2_000_000_000, 768, 512 * 2**30) == "distributed"  # LAION scale
    with pytest.raises(ValueError):
        choose_fit_mode(-1, 512, 2**30)
    with pytest.raises(ValueError):
        choose_fit_mode(10, 512, 0)


# --------------------------------------------------------------------------- local Ray


def _collect(ds, columns: list[str]) -> dict[str, np.ndarray]:
    frame = ds.select_columns(columns).to_pandas().sort_values("key")
    return {column: frame[column].to_numpy() for column in columns}


def test_distributed_equals_in_memory_per_class_and_reads_small_columns(ray_local) -> None:
    labels, sources = _scores()
    ds = ray_local.data.from_items(_rows(labels, sources, blob=256), override_num_blocks=7)
    fitted = fit_selection(
        ds, NUM_CLASSES, source_columns=SOURCE_COLUMNS, key_column="key", gmm="per_class"
    )
    # only the small columns reached the fit's block functions
    assert fitted.columns_read == ("key", "label", "max_pr", "max_zs", "p_pr", "p_zs")
    out = _collect(fitted.transform(ds), ["key", "blob", *fitted.output_columns()])
    assert out["blob"].shape[0] == labels.shape[0]  # other columns pass through the map

    reference = select_from_scores(labels, NUM_CLASSES, sources, gmm="per_class")
    assert np.array_equal(out["is_clean"], reference.is_clean)
    assert np.array_equal(out["backfilled"], reference.backfilled)
    assert reference.backfilled.any()
    assert np.array_equal(out["clean_score"], reference.clean_score)
    for name, ours in reference.sources.items():
        assert np.array_equal(out[f"loss_score_{name}"], ours.loss_score)
        assert np.array_equal(out[f"gmm_p_clean_{name}"], ours.gmm_p_clean)
        assert np.array_equal(out[f"consistency_{name}"], ours.consistency)
    assert fitted.counts() == reference.counts()


def test_distributed_equals_in_memory_global(ray_local) -> None:
    labels, sources = _scores(seed=1)
    ds = ray_local.data.from_items(_rows(labels, sources), override_num_blocks=5)
    out = _collect(
        distributed_select(
            ds, NUM_CLASSES, source_columns=SOURCE_COLUMNS, key_column="key", gmm="global"
        ),
        ["key", "is_clean", "backfilled", "gmm_p_clean_zeroshot", "gmm_p_clean_probe"],
    )
    reference = select_from_scores(labels, NUM_CLASSES, sources, gmm="global")
    assert np.array_equal(out["is_clean"], reference.is_clean)
    assert np.array_equal(out["backfilled"], reference.backfilled)
    for name in sources:
        assert np.array_equal(out[f"gmm_p_clean_{name}"], reference.sources[name].gmm_p_clean)


def test_backfill_ties_are_broken_by_key(ray_local) -> None:
    rng = np.random.default_rng(2)
    n0, n1 = 24, 60
    p0 = rng.uniform(0.05, 0.95, n0)
    labels = np.concatenate((np.zeros(n0, dtype=np.int64), np.ones(n1, dtype=np.int64)))
    p_label = np.concatenate((p0, np.full(n1, 0.2)))  # class 1: all tied, never consistent
    max_p = np.concatenate((p0, np.full(n1, 0.7)))
    keys = np.array([f"k{v:03d}" for v in rng.permutation(n0 + n1)])
    rows = [
        {"key": keys[i], "label": int(labels[i]), "p": p_label[i], "m": max_p[i]}
        for i in range(n0 + n1)
    ]
    ds = ray_local.data.from_items(rows, override_num_blocks=4)
    fitted = fit_selection(ds, 2, source_columns={"zs": ("p", "m")}, key_column="key")
    m = fitted.backfill.size
    assert 1 <= m < n1
    out = fitted.transform(ds).to_pandas()
    picked = sorted(out.key[out.backfilled])
    assert picked == sorted(keys[labels == 1])[:m]
    reference = select_from_scores(
        labels, 2, {"zs": SourceScores(p_label=p_label, max_p=max_p)}, keys=keys
    )
    assert sorted(keys[reference.backfilled]) == picked
    # without a key column every sample tied at the cut is taken
    untied = fit_selection(ds, 2, source_columns={"zs": ("p", "m")}).transform(ds).to_pandas()
    assert int(untied.backfilled.sum()) == n1


def test_invalid_input_raises(ray_local) -> None:
    rows = [{"label": i % 3, "p": 0.5, "m": 0.6} for i in range(30)]
    bad_label = ray_local.data.from_items([*rows, {"label": 3, "p": 0.5, "m": 0.6}])
    with pytest.raises(ValueError, match="label"):
        fit_selection(bad_label, 3, source_columns={"zs": ("p", "m")})
    bad_p = ray_local.data.from_items([*rows, {"label": 1, "p": float("nan"), "m": 0.6}])
    with pytest.raises(ValueError, match="zs"):
        fit_selection(bad_p, 3, source_columns={"zs": ("p", "m")})


def _embedding_table(
    n: int, k: int, dim: int, seed: int
) -> tuple[pa.Table, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    true = rng.integers(0, k, n)
    embeddings = (rng.normal(0.0, 1.0, (k, dim))[true] + rng.normal(0.0, 1.0, (n, dim))).astype(
        np.float16
    )
    flip = rng.random(n) < 0.3
    labels = np.where(flip, (true + rng.integers(1, k, n)) % k, true)
    table = pa.table(
        {
            "key": pa.array([f"img-{i:05d}" for i in range(n)]),
            "label": pa.array(labels),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(embeddings.ravel()), dim),
        }
    )
    return table, embeddings, labels, true


@pytest.mark.parametrize("mode", ["insample", "crossfit"])
def test_streaming_probe_agrees_with_sklearn(ray_local, mode: str) -> None:
    n, k = 2000, 6
    table, embeddings, labels, true = _embedding_table(n, k, 32, seed=4)
    ds = ray_local.data.from_arrow(table).repartition(4).materialize()
    probe = fit_probe_streaming(
        ds, "embedding", "label", k, mode=mode, epochs=4, lr=0.05, batch_size=128
    )
    assert probe.weights.shape == ((5 if mode == "crossfit" else 1), 32, k)
    out = probe.transform(ds).to_pandas().sort_values("key")
    ours_argmax = out.probe_argmax.to_numpy()
    reference = fit_probe_probs(embeddings, labels, k, mode=mode)
    assert abs((ours_argmax == true).mean() - (reference.argmax(axis=1) == true).mean()) <= 0.03
    assert (out.probe_p_label <= out.probe_max_p + 1e-12).all()

    rng = np.random.default_rng(9)
    zero_shot = rng.normal(0.0, 1.0, (n, k))
    zero_shot[np.arange(n), true] += 3.0
    zero_shot = np.exp(zero_shot) / np.exp(zero_shot).sum(axis=1, keepdims=True)
    zs = SourceScores.from_probs(labels, zero_shot)
    in_memory = select_from_scores(
        labels, k, {"zeroshot": zs, "probe": SourceScores.from_probs(labels, reference)}
    )
    streamed = select_from_scores(
        labels,
        k,
        {
            "zeroshot": zs,
            "probe": SourceScores(
                p_label=out.probe_p_label.to_numpy(), max_p=out.probe_max_p.to_numpy()
            ),
        },
    )
    assert (in_memory.is_clean == streamed.is_clean).mean() >= 0.95


def test_repeated_keys_found_by_hash_partitions_follow_shard_order(ray_local, tmp_path) -> None:
    """Every later occurrence of a key (within a file or across files) is a repeat of its
    first occurrence in shard order; keys seen once are not reported."""
    import pyarrow.parquet as pq

    from cleaner.selection.fit_ray import find_duplicate_rows

    layout = {"a": ["k1", "k2", "k3"], "b": ["k2", "k4", "k2"], "c": ["k1", "k5"], "d": []}
    files = []
    for name, keys in layout.items():
        path = tmp_path / f"{name}.parquet"
        table = pa.table(
            {
                "key": pa.array(keys, pa.string()),
                "shard_pos": pa.array(range(len(keys)), pa.int64()),
            }
        )
        pq.write_table(table, path)
        files.append(str(path))
    repeats = find_duplicate_rows(files, list(layout))
    assert {shard: sorted(items) for shard, items in repeats.items()} == {
        "b": [(0, "a"), (2, "a")],
        "c": [(0, "a")],
    }
