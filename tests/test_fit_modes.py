"""The clean job's two global fits: in-memory on the driver, distributed over Ray Data."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cleaner.config import SelectionConfig
from cleaner.selection.fit_plan import choose_mode
from jobs.clean import run_clean
from tests.browser import loaded_images
from tests.conftest import clean_config, count_samples, write_tar

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def shards_with_repeats(demo_shards, tmp_path_factory):
    """The demo shards plus a copy of the first one (every key in it repeated)."""
    folder = tmp_path_factory.mktemp("repeats")
    tars = sorted(demo_shards.glob("*.tar"))
    for tar in tars:
        shutil.copy(tar, folder / tar.name)
    shutil.copy(tars[0], folder / "zz-copy.tar")
    return folder


def same_values(x: pa.ChunkedArray, y: pa.ChunkedArray) -> bool:
    """Equal, NaN included (Arrow's equals treats NaN as different from itself)."""
    x, y = x.combine_chunks(), y.combine_chunks()
    if x.equals(y):
        return True
    if pa.types.is_fixed_size_list(x.type):
        x, y = x.flatten(), y.flatten()
    if not pa.types.is_floating(x.type) or x.type != y.type:
        return False
    return bool(np.array_equal(x.to_numpy(), y.to_numpy(), equal_nan=True))


@pytest.fixture(scope="module")
def scored_run(local_ray, shards_with_repeats, tmp_path_factory):
    """One in-memory run (probe off): its summary and output folder, whose scores the
    other runs reuse."""
    out = tmp_path_factory.mktemp("fit") / "in_memory"
    summary = run_clean(
        clean_config(
            str(shards_with_repeats),
            str(out),
            "selection.fit_mode=in_memory",
            "selection.probe=none",
        )
    )
    return summary, out


def rerun(shards, scores_from, out, *extra):
    """The job on already computed scores (only the fit runs): (summary, manifest)."""
    shutil.copytree(scores_from / "scores", out / "scores")
    summary = run_clean(clean_config(str(shards), str(out), *extra))
    assert summary["scoring"]["shards_scored"] == 0
    return summary, pq.read_table(out / "manifest.parquet")


def test_distributed_fit_gives_the_in_memory_manifest(shards_with_repeats, scored_run, tmp_path):
    memory, memory_out = scored_run
    a = pq.read_table(memory_out / "manifest.parquet")
    distributed, b = rerun(
        shards_with_repeats,
        memory_out,
        tmp_path / "distributed",
        "selection.fit_mode=distributed",
        "selection.probe=none",
    )
    assert memory["fit"]["mode"] == "in_memory" and distributed["fit"]["mode"] == "distributed"
    assert a.num_rows == b.num_rows == count_samples(shards_with_repeats)
    repeated = sum(1 for r in b.column("reason").to_pylist() if r.startswith("duplicate key"))
    assert repeated == memory["counts"]["duplicate_keys"] > 0
    assert a.schema == b.schema
    for name in a.column_names:
        assert same_values(a.column(name), b.column(name)), name
    for part in ("counts", "selection", "detection", "suggestions", "mixtures"):
        assert memory[part] == distributed[part], part


def test_distributed_probe_agrees_with_the_in_memory_probe(
    shards_with_repeats, scored_run, tmp_path
):
    _, scores = scored_run
    runs = [
        rerun(shards_with_repeats, scores, tmp_path / mode, f"selection.fit_mode={mode}")
        for mode in ("in_memory", "distributed")
    ]
    (memory, a), (distributed, b) = runs
    assert memory["config"]["selection"]["probe"] == "insample"
    assert "probe_gmm" in distributed["selection"]["per_criterion"]
    clean_a = np.asarray(a.column("is_clean").to_pylist())
    clean_b = np.asarray(b.column("is_clean").to_pylist())
    # sklearn's lbfgs probe vs the streamed Adam probe: close, not bit-identical
    assert (clean_a == clean_b).mean() >= 0.95
    assert abs(memory["detection"]["f1"] - distributed["detection"]["f1"]) <= 0.03
    assert a.column("key").equals(b.column("key"))


def test_auto_mode_follows_the_memory_budget(shards_with_repeats, scored_run):
    _, out = scored_run
    scores = sorted(str(p) for p in (out / "scores").glob("*.parquet"))
    roomy = choose_mode(SelectionConfig(fit_memory_gb=4.0), scores, 10)
    tight = choose_mode(SelectionConfig(fit_memory_gb=1e-5), scores, 10)
    forced = choose_mode(SelectionConfig(fit_mode="distributed"), scores, 10)
    assert roomy.samples == count_samples(shards_with_repeats) and roomy.embed_dim > 0
    assert roomy.mode == "in_memory" and tight.mode == "distributed"
    assert forced.mode == "distributed" and forced.requested == "distributed"


def test_the_job_report_renders_in_chromium(scored_run, tmp_path):
    summary, out = scored_run
    assert "report_error" not in summary
    images = loaded_images(out / "report.html", tmp_path)
    plots = [im for im in images if im["cls"] == "plot"]
    thumbnails = [im for im in images if im["cls"] == "thumb"]
    assert len(plots) >= 4 and len(thumbnails) >= 1  # thumbnails read back from the shards
    assert all(im["complete"] and im["width"] > 0 for im in images)


@pytest.mark.parametrize("mode", ["in_memory", "distributed"])
def test_every_sample_failed_still_gives_a_manifest(local_ray, tmp_path, mode):
    """Nothing usable: no fit, but every sample is in the manifest as failed with its reason."""
    shards = tmp_path / "shards"
    shards.mkdir()
    for s in range(2):
        members = []
        for i in range(5):
            members += [(f"s{s}-k{i}.jpg", b"not an image"), (f"s{s}-k{i}.cls", b"1")]
        write_tar(shards / f"broken-{s}.tar", members)
    out = tmp_path / "run"
    summary = run_clean(clean_config(str(shards), str(out), f"selection.fit_mode={mode}"))
    manifest = pq.read_table(out / "manifest.parquet")
    assert manifest.num_rows == 10 == summary["counts"]["failed"] == summary["counts"]["samples"]
    assert set(manifest.column("status").to_pylist()) == {"failed"}
    assert all(r.startswith("image decode error") for r in manifest.column("reason").to_pylist())
    assert summary["fit"]["mode"] == mode and "mixtures" not in summary
    assert (out / "report.html").exists() and "report_error" not in summary
