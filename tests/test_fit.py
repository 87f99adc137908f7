"""The global fit on an in-memory score table: suggestions, explanations, duplicates."""

from __future__ import annotations

import math
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cleaner.config import SelectionConfig
from cleaner.scoring.prompts import PromptBank, pad_prompt_features
from cleaner.scoring.writing import fixed_size_list_array
from cleaner.selection.fit_in_memory import fit_and_build_manifest
from cleaner.selection.manifest import chunk_rows, suggest_labels


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_bank(rng, classes=4, prompts=3, dim=16):
    per_class = [unit(rng.normal(size=(prompts, dim))).astype(np.float32) for _ in range(classes)]
    features, mask = pad_prompt_features(per_class)
    texts = tuple(tuple(f"class {k} prompt {j}" for j in range(prompts)) for k in range(classes))
    return PromptBank(features, mask, texts)


def test_suggestions_and_explanations_point_at_the_matching_prompt():
    rng = np.random.default_rng(0)
    bank = make_bank(rng)
    # each image is exactly prompt j=1 of class 2 (plus a little noise)
    emb = bank.features[2, 1][None].repeat(5, 0) + 0.01 * rng.normal(size=(5, 16))
    labels = np.array([0, 1, 2, 3, 0])
    hints = suggest_labels(emb.astype(np.float16), labels, bank, 0.07, None)
    assert (hints.top_labels[:, 0] == 2).all()
    assert (hints.suggested_prompt == 1).all() and (hints.suggested_similarity > 0.95).all()
    assert hints.given_prompt[2] == 1  # the given label is right for sample 2
    assert (np.diff(hints.top_probs, axis=1) <= 0).all()
    assert chunk_rows(1000, 8, budget_bytes=32_000_000) == 1000


def score_table(rng, bank, n=60, duplicate=True):
    k = bank.num_classes
    true = np.arange(n) % k
    emb = unit(bank.features[true, 0] + 0.05 * rng.normal(size=(n, 16))).astype(np.float16)
    labels = true.copy()
    labels[::5] = (labels[::5] + 1) % k  # every 5th label is wrong
    probs = np.full((n, k), 0.05)
    probs[np.arange(n), true] = 0.85
    keys = [f"k{i}" for i in range(n)]
    if duplicate:
        keys[-1] = keys[0]
    return pa.table(
        {
            "key": keys,
            "shard": ["s.tar"] * n,
            "shard_pos": np.arange(n),
            "label": labels,
            "true_label": true,
            "status": ["ok"] * n,
            "reason": [""] * n,
            "p_label": probs[np.arange(n), labels].astype(np.float32),
            "max_p": probs.max(1).astype(np.float32),
            "argmax": probs.argmax(1),
            "topk_labels": fixed_size_list_array(np.argsort(-probs, 1)[:, :3]),
            "topk_probs": fixed_size_list_array(-np.sort(-probs, 1)[:, :3].astype(np.float32)),
            "embedding": fixed_size_list_array(emb),
        }
    )


def test_manifest_has_suggestions_explanations_and_fails_duplicates():
    rng = np.random.default_rng(1)
    bank = make_bank(rng)
    table = score_table(rng, bank)
    manifest, summary = fit_and_build_manifest(
        table, SelectionConfig(probe="none"), [f"c{i}" for i in range(4)], bank, 0.07
    )
    rows = manifest.to_pydict()
    assert rows["status"][-1] == "failed" and "duplicate key" in rows["reason"][-1]
    assert summary["counts"]["duplicate_keys"] == 1
    wrong = [i for i in range(59) if rows["label"][i] != rows["true_label"][i]]
    assert all(not rows["is_clean"][i] for i in wrong)
    assert all(rows["suggested_label"][i] == rows["true_label"][i] for i in wrong)
    assert all(rows["top_labels"][i][0] == rows["true_label"][i] for i in wrong)
    assert rows["explain_suggested_prompt"][wrong[0]].startswith(
        f"class {rows['true_label'][wrong[0]]}"
    )
    assert rows["explain_given_prompt"][-1] is None  # failed rows have no explanation
    assert summary["suggestions"]["wrong_labels_fixed_fraction"] == 1.0
    assert summary["detection"]["precision"] == 1.0


def test_suggestions_equal_a_float64_log_sum_exp_with_masked_prompts_and_several_chunks():
    """The chunked, shifted log-sum-exp over each class's prompts gives the zero-shot
    probabilities of a plain float64 computation; padded prompts are never picked."""
    from scipy.special import logsumexp, softmax

    rng = np.random.default_rng(3)
    per_class = [unit(rng.normal(size=(j, 8))).astype(np.float32) for j in (1, 4, 2, 4, 3, 1, 4)]
    features, mask = pad_prompt_features(per_class)
    bank = PromptBank(features, mask, tuple(("p",) * m.sum() for m in mask))
    n = 300
    emb = rng.normal(size=(n, 8)).astype(np.float32)
    labels = rng.integers(0, 7, n)
    probe = softmax(rng.normal(size=(n, 7)), axis=1).astype(np.float32)
    # 4 * 7 classes * 4 prompts * 100 rows: three chunks of 100 rows
    hints = suggest_labels(emb, labels, bank, 0.05, probe, budget_bytes=4 * 7 * 4 * 100)

    x = emb.astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sims = np.einsum("nd,kjd->nkj", x, features.astype(np.float64))
    sims[:, ~mask] = -np.inf
    zero_shot = softmax(logsumexp(sims / 0.05, axis=2), axis=1)
    expected = 0.5 * (zero_shot + probe)
    expected_top = np.argsort(-expected, axis=1, kind="stable")[:, :3]
    np.testing.assert_array_equal(hints.top_labels, expected_top)
    np.testing.assert_allclose(
        hints.top_probs, np.take_along_axis(expected, expected_top, axis=1), rtol=1e-5
    )
    rows = np.arange(n)
    given_best = sims[rows, labels].argmax(axis=1)
    np.testing.assert_array_equal(hints.given_prompt, given_best)
    np.testing.assert_allclose(hints.given_similarity, sims[rows, labels, given_best], atol=1e-6)
    assert mask[labels, hints.given_prompt].all()
    assert mask[hints.top_labels[:, 0], hints.suggested_prompt].all()


MANIFEST_COLUMNS = [
    "key", "shard", "shard_pos", "label", "label_name", "is_clean", "status", "reason",
    "suggested_label", "suggested_name", "suggested_confidence", "clean_score", "backfilled",
    "p_label_zeroshot", "max_p_zeroshot", "loss_score_zeroshot", "gmm_p_clean_zeroshot",
    "consistency_zeroshot", "argmax_zeroshot", "topk_labels_zeroshot", "topk_probs_zeroshot",
    "top_labels", "top_probs", "explain_given_prompt", "explain_given_similarity",
    "explain_suggested_prompt", "explain_suggested_similarity", "true_label",
]  # fmt: skip


def test_the_manifest_contract_row_by_row():
    """Every column by name and type, and each row's status, reason, names, suggestion
    and confidence as the contract says: failed rows (a decode error with label -1, a
    repeated key) are failed, not clean, with no suggestion; clean rows suggest their own
    label; a noisy row suggests its top class when its confidence reaches
    suggest_min_confidence (at it exactly, too), -1 below it."""
    rng = np.random.default_rng(1)
    bank = make_bank(rng)
    names = [f"c{i}" for i in range(4)]
    table = score_table(rng, bank)
    status, reason, label = table.column("status").to_pylist(), [""] * 60, table["label"]
    status[7], reason[7] = "failed", "decode error: truncated"
    labels = label.to_numpy().copy()
    labels[7] = -1
    table = table.set_column(table.schema.get_field_index("status"), "status", pa.array(status))
    table = table.set_column(table.schema.get_field_index("reason"), "reason", pa.array(reason))
    table = table.set_column(table.schema.get_field_index("label"), "label", pa.array(labels))
    cfg = SelectionConfig(probe="none")
    manifest, _ = fit_and_build_manifest(table, cfg, names, bank, 0.07)
    assert manifest.column_names == MANIFEST_COLUMNS
    for column in ("key", "shard", "label_name", "status", "reason", "suggested_name"):
        assert manifest.schema.field(column).type == pa.string(), column
    for column in ("label", "suggested_label", "argmax_zeroshot"):
        assert manifest.schema.field(column).type == pa.int64(), column
    assert manifest.schema.field("is_clean").type == pa.bool_()
    rows = manifest.to_pylist()
    failed = {7, 59}  # the decode error; the last key repeats the first
    for i, row in enumerate(rows):
        assert row["key"] == table["key"][i].as_py() and row["shard"] == "s.tar"
        assert row["label"] == labels[i]
        assert row["label_name"] == (names[labels[i]] if labels[i] >= 0 else None)
        if i in failed:
            assert row["status"] == "failed" and row["is_clean"] is False
            assert row["suggested_label"] == -1 and row["suggested_name"] is None
            assert math.isnan(row["suggested_confidence"]) and row["reason"]
            continue
        assert row["status"] == ("clean" if row["is_clean"] else "noisy") and row["reason"] == ""
        assert row["suggested_confidence"] == row["top_probs"][0]
        if row["is_clean"]:
            assert row["suggested_label"] == row["label"]
        elif row["suggested_confidence"] >= cfg.suggest_min_confidence:
            assert row["suggested_label"] == row["top_labels"][0]
        else:
            assert row["suggested_label"] == -1
        suggested = row["suggested_label"]
        assert row["suggested_name"] == (names[suggested] if suggested >= 0 else None)
    assert rows[7]["reason"] == "decode error: truncated"
    assert "duplicate key" in rows[59]["reason"]
    assert {r["status"] for r in rows} == {"clean", "noisy", "failed"}
    assert any(r["label"] == 0 and r["label_name"] == "c0" for r in rows)

    # the threshold is inclusive: a noisy row whose confidence equals it gets its top class
    noisy = next(r for r in rows if r["status"] == "noisy")
    at = SelectionConfig(probe="none", suggest_min_confidence=noisy["suggested_confidence"])
    again = fit_and_build_manifest(table, at, names, bank, 0.07)[0].to_pylist()
    same = next(r for r in again if r["key"] == noisy["key"])
    assert same["suggested_label"] == same["top_labels"][0] != -1
    above = SelectionConfig(probe="none", suggest_min_confidence=1.0)
    none_suggested = fit_and_build_manifest(table, above, names, bank, 0.07)[0].to_pylist()
    assert all(r["suggested_label"] == -1 for r in none_suggested if r["status"] == "noisy")


def test_the_probe_enters_the_suggestions():
    """With the probe on, the manifest's top probabilities are the mean of the zero-shot
    and the probe's: they differ from the zero-shot ones alone."""
    rng = np.random.default_rng(1)
    bank = make_bank(rng)
    table = score_table(rng, bank)
    names = [f"c{i}" for i in range(4)]
    with_probe, _ = fit_and_build_manifest(
        table, SelectionConfig(probe="insample"), names, bank, 0.07
    )
    usable = [r for r in with_probe.to_pylist() if r["status"] != "failed"]
    embeddings = np.array(table["embedding"].to_pylist(), dtype=np.float32)[: len(usable)]
    alone = suggest_labels(embeddings, np.zeros(len(usable), np.int64), bank, 0.07, None)
    got = np.array([r["top_probs"][0] for r in usable])
    assert np.abs(got - alone.top_probs[:, 0]).max() > 1e-3


def test_manifest_locations_and_the_writer_target(tmp_path):
    from cleaner.selection.manifest import MANIFEST_FILE, ManifestWriter, manifest_file

    assert manifest_file(str(tmp_path / "run")) == str(tmp_path / "run" / MANIFEST_FILE)
    assert manifest_file("s3://b/run/custom.parquet") == "s3://b/run/custom.parquet"
    assert (
        ManifestWriter("s3://bucket/run/manifest.parquet").target == "bucket/run/manifest.parquet"
    )
    path = tmp_path / "run" / "manifest.parquet"
    with ManifestWriter(str(path)) as writer:
        writer.write(pa.table({"key": ["a"]}))
        assert writer.target.endswith(f".tmp-{os.getpid()}")
        assert not path.exists()  # written under the temporary name until closed
    assert pq.read_table(path).column("key").to_pylist() == ["a"]


MANIFEST_SCHEMA = {
    "key": pa.string(), "shard": pa.string(), "shard_pos": pa.int64(), "label": pa.int64(),
    "label_name": pa.string(), "is_clean": pa.bool_(), "status": pa.string(),
    "reason": pa.string(), "suggested_label": pa.int64(), "suggested_name": pa.string(),
    "suggested_confidence": pa.float32(), "clean_score": pa.float32(),
    "backfilled": pa.bool_(), "p_label_zeroshot": pa.float32(),
    "max_p_zeroshot": pa.float32(), "loss_score_zeroshot": pa.float32(),
    "gmm_p_clean_zeroshot": pa.float32(), "consistency_zeroshot": pa.float32(),
    "argmax_zeroshot": pa.int64(), "topk_labels_zeroshot": pa.list_(pa.int64(), 3),
    "topk_probs_zeroshot": pa.list_(pa.float32(), 3), "top_labels": pa.list_(pa.int64(), 3),
    "top_probs": pa.list_(pa.float32(), 3), "explain_given_prompt": pa.string(),
    "explain_given_similarity": pa.float32(), "explain_suggested_prompt": pa.string(),
    "explain_suggested_similarity": pa.float32(), "true_label": pa.int64(),
}  # fmt: skip


def assert_manifest_schema(manifest: pa.Table) -> None:
    """The manifest's columns, in order, with exactly the contract's types."""
    assert manifest.column_names == list(MANIFEST_SCHEMA)
    for name, expected in MANIFEST_SCHEMA.items():
        assert manifest.schema.field(name).type == expected, name


def with_column(table: pa.Table, name: str, values) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, pa.array(values))


def varied_prompt_table(rng, bank, n=60):
    """score_table's rows, each image near prompt (row % 3) of its true class (so the best
    prompt is not always the first), every row labelled 3 mislabelled (class 3 keeps no
    clean sample and is backfilled), and three failed rows: a decode error (label -1), a
    label one past the last class, and the repeated last key."""
    table = score_table(rng, bank, n)
    true = np.asarray(table["true_label"])
    emb = unit(bank.features[true, np.arange(n) % 3] + 0.05 * rng.normal(size=(n, 16)))
    labels = np.asarray(table["label"]).copy()
    labels[(labels == 3) & (true == 3)] = 0
    labels[[4, 13, 22]] = 3  # true classes 0, 1, 2: mislabelled as 3
    probs = np.full((n, 4), 0.05)
    probs[np.arange(n), true] = 0.85
    status, reason = ["ok"] * n, [""] * n
    status[7], reason[7], labels[7] = "failed", "decode error: truncated", -1
    status[11], reason[11], labels[11] = "failed", "label 4 outside [0, 4)", 4
    table = with_column(table, "embedding", fixed_size_list_array(emb.astype(np.float16)))
    table = with_column(table, "label", labels)
    table = with_column(table, "status", status)
    table = with_column(table, "reason", reason)
    p_label = probs[np.arange(n), np.clip(labels, 0, 3)].astype(np.float32)
    return with_column(table, "p_label", p_label)


def test_manifest_columns_carry_the_fit_and_the_scores_row_by_row():
    """Each value column of the manifest, row by row, against its source: the score file's
    columns for usable rows, the fitted selection's evaluation (backfill included: class
    3 has no clean sample), the prompts and cosines recomputed in float64; failed rows
    (a label past the last class among them) get NaN, -1, False and no explanation."""
    from cleaner.selection.fit_in_memory import fit_in_memory
    from cleaner.selection.score_table import ScoreBatch, duplicate_rows_in_memory

    rng = np.random.default_rng(5)
    bank = make_bank(rng)
    names = [f"c{i}" for i in range(4)]
    table = varied_prompt_table(rng, bank)
    table = table.append_column("max_similarity", pa.array(rng.random(60).astype(np.float32)))
    cfg = SelectionConfig(probe="none")
    manifest, summary = fit_and_build_manifest(table, cfg, names, bank, 0.07)

    keys = np.asarray(table["key"].to_pylist(), dtype=object)
    batch = ScoreBatch(table, duplicate_rows_in_memory(keys, np.asarray(["s.tar"] * 60)))
    fitted, _ = fit_in_memory(batch, cfg, 4)
    ok = batch.ok_idx
    selection_rows = batch.selection_batch(None)
    spec = fitted.spec
    ((_, p_column, max_column),) = spec.sources
    values = fitted.evaluate(
        {
            spec.label_column: selection_rows["label"],
            spec.key_column: selection_rows["key"],
            p_column: selection_rows["p_label"],
            max_column: selection_rows["max_p"],
        }
    )
    failed = {7, 11, 59}
    assert set(range(60)) - set(ok.tolist()) == failed
    assert values["backfilled"].any() and summary["counts"]["clean"] > 0

    emb = np.asarray(table["embedding"].to_pylist(), dtype=np.float64)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    sims = np.einsum("nd,kjd->nkj", emb, bank.features.astype(np.float64))
    p_label, max_p = np.asarray(table["p_label"]), np.asarray(table["max_p"])
    argmax = np.asarray(table["argmax"])
    rows = manifest.to_pylist()
    assert rows[11]["label"] == 4 and rows[11]["label_name"] is None
    for position, i in enumerate(ok):
        row = rows[i]
        assert row["p_label_zeroshot"] == p_label[i] and row["max_p_zeroshot"] == max_p[i]
        assert row["clean_score"] == np.float32(values["clean_score"][position])
        assert row["clean_score"] == p_label[i]  # one source: the mean is its p_label
        assert row["backfilled"] == values["backfilled"][position]
        assert row["is_clean"] == values["is_clean"][position]
        for quantity in ("loss_score", "gmm_p_clean", "consistency"):
            expected = np.float32(values[f"{quantity}_zeroshot"][position])
            assert row[f"{quantity}_zeroshot"] == expected, quantity
        assert row["consistency_zeroshot"] == np.float32(min(p_label[i] / max_p[i], 1.0))
        assert row["argmax_zeroshot"] == argmax[i]
        assert row["max_similarity"] == table["max_similarity"][i].as_py()
        for which, klass in (("given", row["label"]), ("suggested", row["top_labels"][0])):
            best = int(sims[i, klass].argmax())
            assert row[f"explain_{which}_prompt"] == bank.prompts[klass][best], (i, which)
            assert abs(row[f"explain_{which}_similarity"] - sims[i, klass, best]) < 1e-6
    assert {int(sims[i, rows[i]["label"]].argmax()) for i in ok} == {0, 1, 2}
    for i in failed:
        row = rows[i]
        assert row["backfilled"] is False and row["is_clean"] is False
        assert row["argmax_zeroshot"] == -1 and row["top_labels"] == [-1, -1, -1]
        assert all(math.isnan(p) for p in row["top_probs"])
        for column in ("clean_score", "p_label_zeroshot", "max_p_zeroshot", "loss_score_zeroshot"):
            assert math.isnan(row[column]), column
        assert math.isnan(row["explain_given_similarity"])
        assert row["explain_given_prompt"] is None and row["explain_suggested_prompt"] is None
        assert row["max_similarity"] == table["max_similarity"][i].as_py()


def test_the_manifest_schema_holds_for_any_rows():
    """The same column types whether rows are usable, all failed (every name and prompt
    null) or absent: a manifest written shard by shard must have one schema."""
    rng = np.random.default_rng(6)
    bank = make_bank(rng)
    names = [f"c{i}" for i in range(4)]
    table = varied_prompt_table(rng, bank)
    cfg = SelectionConfig(probe="none")
    assert_manifest_schema(fit_and_build_manifest(table, cfg, names, bank, 0.07)[0])

    all_failed = with_column(table, "status", ["failed"] * 60)
    all_failed = with_column(all_failed, "reason", ["decode error"] * 60)
    all_failed = with_column(all_failed, "label", np.full(60, -1))
    manifest, _ = fit_and_build_manifest(all_failed, cfg, names, bank, 0.07)
    assert_manifest_schema(manifest)
    assert set(manifest["status"].to_pylist()) == {"failed"}
    assert manifest["reason"].to_pylist() == ["decode error"] * 59 + [
        manifest["reason"][59].as_py()
    ]

    empty, _ = fit_and_build_manifest(table.slice(0, 0), cfg, names, bank, 0.07)
    assert_manifest_schema(empty)
    assert empty.num_rows == 0


def test_suggestions_keep_their_types_chunks_and_precision():
    """The suggestions' dtypes; a partial last chunk; realistic temperatures (tau 0.01)
    with rows far apart in one chunk; embeddings of any norm; ties broken by class index."""
    rng = np.random.default_rng(7)
    bank = make_bank(rng, classes=5, prompts=3)
    n = 250  # chunks of 64 rows: the last one partial
    emb = rng.normal(size=(n, 16)).astype(np.float32)
    emb[0] = bank.features[1, 2]  # cosine 1 with one prompt
    emb[1] = -bank.features.reshape(-1, 16).sum(axis=0)  # far below every prompt
    emb *= rng.uniform(0.01, 0.5, size=(n, 1)).astype(np.float32)  # norms below 1
    labels = rng.integers(0, 5, n)
    hints = suggest_labels(emb, labels, bank, 0.01, None, budget_bytes=1)
    assert chunk_rows(5, 3, budget_bytes=1) == 64
    assert hints.top_labels.dtype == np.int64 and hints.given_prompt.dtype == np.int64
    assert hints.suggested_prompt.dtype == np.int64
    for name in ("top_probs", "given_similarity", "suggested_similarity"):
        assert getattr(hints, name).dtype == np.float32, name
    assert np.isfinite(hints.top_probs).all()
    x = emb.astype(np.float64) / np.linalg.norm(emb, axis=1, keepdims=True)
    sims = np.einsum("nd,kjd->nkj", x, bank.features.astype(np.float64))
    rows = np.arange(n)
    np.testing.assert_allclose(hints.given_similarity, sims[rows, labels].max(axis=1), atol=1e-5)
    from scipy.special import logsumexp, softmax

    expected = softmax(logsumexp(sims / 0.01, axis=2), axis=1)
    np.testing.assert_allclose(
        hints.top_probs, np.take_along_axis(expected, hints.top_labels, axis=1), atol=1e-5
    )
    assert hints.top_labels[0, 0] == 1 and hints.suggested_prompt[0] == 2

    # prompts in a narrow cone; one image on a prompt, one opposite the cone: at tau 0.01
    # their logits are 190 apart in one chunk (exp underflows float32 below -103)
    axis = unit(rng.normal(size=16))
    cone = unit(axis + 0.2 * rng.normal(size=(5, 3, 16))).astype(np.float32)
    narrow = PromptBank(cone, np.ones((5, 3), bool), (("a", "b", "c"),) * 5)
    apart = np.stack([cone[3, 1], -axis]).astype(np.float32)
    far = suggest_labels(apart, np.array([0, 0]), narrow, 0.01, None)
    cone_sims = np.einsum("nd,kjd->nkj", unit(apart.astype(np.float64)), cone.astype(np.float64))
    cone_expected = softmax(logsumexp(cone_sims / 0.01, axis=2), axis=1)
    assert cone_sims[0].max() - cone_sims[1].max() > 1.5
    np.testing.assert_allclose(
        far.top_probs, np.take_along_axis(cone_expected, far.top_labels, axis=1), atol=1e-5
    )

    # classes with the same prompt tie exactly: the lowest class indices come first
    basis = np.eye(16, dtype=np.float32)[np.arange(40) % 3][:, None]  # class k: axis k % 3
    tied = PromptBank(basis, np.ones((40, 1), bool), (("p",),) * 40)
    points = rng.normal(size=(30, 16)).astype(np.float32)
    ties = suggest_labels(points, np.zeros(30, np.int64), tied, 0.07, None)
    best_axis = points[:, :3].argmax(axis=1)
    expected_top = best_axis[:, None] + 3 * np.arange(3)[None]
    np.testing.assert_array_equal(ties.top_labels, expected_top)


def test_suggestions_hold_two_budget_sized_buffers():
    """The chunk is as large as the budget allows and the similarities and logits reuse two
    buffers of that size: peak memory between 1.5 and 3.3 budgets (2.73 measured: the two
    buffers and the chunk's small arrays; a fresh buffer per chunk adds 1, float64 buffers
    2, the whole table at once 15)."""
    import tracemalloc

    rng = np.random.default_rng(8)
    bank = make_bank(rng, classes=10, prompts=40, dim=16)
    budget = 4 * 10 * 40 * 500  # 500 rows per chunk: 800 kB per buffer
    emb = rng.normal(size=(4_500, 16)).astype(np.float32)
    labels = rng.integers(0, 10, 4_500)
    suggest_labels(emb[:100], labels[:100], bank, 0.07, None, budget_bytes=budget)  # warm up
    tracemalloc.start()
    try:
        suggest_labels(emb, labels, bank, 0.07, None, budget_bytes=budget)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert 1.5 * budget < peak < 3.3 * budget, peak / budget


def test_relative_shards_keep_a_string_column_when_empty():
    from cleaner.selection.manifest import with_relative_shards

    empty = pa.table({"shard": pa.array([], pa.string()), "key": pa.array([], pa.string())})
    moved = with_relative_shards(empty, "/data/shards")
    assert moved.schema.field("shard").type == pa.string() and moved.num_rows == 0
