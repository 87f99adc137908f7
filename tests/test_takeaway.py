"""What a user takes away from a run, on one clean run and one short training run (shared
by the module): a model loadable with one call (local and s3://), the predict job, clean
shards exported byte for byte, portable manifests (the shards moved after cleaning), and
`cleaner.label_issues` agreeing with the job's manifest."""

from __future__ import annotations

import json
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import cleaner
from cleaner.config import ConfigError, ExportShardsConfig, load_config
from cleaner.demo.dataset import write_demo_shards
from cleaner.reading.shards import iter_tar_samples
from jobs.clean import run_clean
from jobs.export_shards import run_export
from jobs.predict import run_predict, summary_uri
from jobs.train import train_in_process
from tests.conftest import clean_config, decoded_split, jpeg, make_bucket, upload_folder, write_tar
from training import load_model
from training.config import PredictConfig, TrainJobConfig

pytestmark = pytest.mark.integration
RUN_NAME = "takeaway"


@dataclass
class Run:
    root: Path
    clean: dict  # the clean job's summary
    history: list[dict]  # the training run's per-epoch metrics

    @property
    def shards(self) -> Path:  # where the shards are now (moved after cleaning)
        return self.root / "moved"

    @property
    def model(self) -> Path:
        return self.root / "runs" / RUN_NAME


def train_config(root: Path, shards: Path) -> TrainJobConfig:
    return load_config(
        "configs/train-demo.yaml",
        [
            f"data.input={shards}",
            f"data.manifest={root / 'clean'}",
            f"data.test_input={root / 'test'}",
            f"run.storage={root / 'runs'}",
            f"run.name={RUN_NAME}",
            "optim.epochs=2",
            "optim.batch_size=32",
            "mixfix.mode=clean_only",
        ],
        TrainJobConfig,
    )


@pytest.fixture(scope="module")
def run(local_ray, demo_shards, tmp_path_factory) -> Run:
    """The demo shards cleaned in one folder, then moved to another, and a 2-epoch
    in-process training run from the new folder with a clean test split."""
    root = tmp_path_factory.mktemp("takeaway")
    shutil.copytree(demo_shards, root / "shards")
    write_demo_shards(root / "test", 100, samples_per_shard=50, noise="none", seed=11)
    summary = run_clean(clean_config(str(root / "shards"), str(root / "clean")))
    (root / "shards").rename(root / "moved")
    history = train_in_process(train_config(root, root / "moved"))
    return Run(root, summary, history)


def test_moved_shards_train_and_the_model_loads_with_one_call(run, s3_endpoint):
    manifest = pq.read_table(run.root / "clean" / "manifest.parquet")
    shards = set(manifest.column("shard").to_pylist())
    assert shards == {p.name for p in run.shards.glob("*.tar")}  # relative to the input root
    assert run.clean["shard_root"] == str(run.root / "shards")  # gone: trained from "moved"
    assert [h["epoch"] for h in run.history] == [1, 2]

    model = load_model(str(run.model))  # the run folder; its model/ folder works too
    assert model.info["run"]["test_accuracy"] == run.history[-1]["test_accuracy"]
    assert model.class_names == run.clean["class_names"]
    images, labels = decoded_split(
        run.root / "test", model.class_names, model.preprocessing.image_size
    )
    found = model.predict(images)
    accuracy = float((found.labels == labels).mean())
    assert abs(accuracy - run.history[-1]["test_accuracy"]) <= 0.005
    assert np.array_equal(found.top_labels[:, 0], found.labels)
    assert found.names[0] == model.class_names[found.labels[0]]
    one = model.predict([jpeg(size=(50, 40))])  # encoded bytes of another size
    assert one.labels.shape == (1,) and 0.0 < one.confidence[0] <= 1.0

    client = make_bucket("takeaway-models")
    upload_folder(client, run.model / "model", "takeaway-models", "runs/demo/model")
    from_s3 = load_model("s3://takeaway-models/runs/demo")
    np.testing.assert_array_equal(from_s3.predict(images[:20]).labels, found.labels[:20])

    # data.input without one of the manifest's shards: one line naming it
    partial = run.root / "partial"
    partial.mkdir()
    for shard in sorted(run.shards.glob("*.tar"))[1:]:
        (partial / shard.name).symlink_to(shard)
    with pytest.raises(ConfigError, match=r"not found: shapes-000000\.tar"):
        train_in_process(train_config(run.root, partial))


def test_predict_job_reproduces_the_reported_test_accuracy(run):
    extra = write_tar(
        run.root / "extra.tar",
        [("unlabelled.jpg", jpeg()), ("broken.jpg", b"not a jpeg"), ("broken.cls", b"1")],
    )
    output = run.root / "predictions" / "test.parquet"
    cfg = load_config(
        None,
        [
            f"model={run.model}",
            f"input=[{run.root / 'test'}, {extra}]",
            f"output={output}",
            "scoring.max_actors=1",
            "scoring.batch_size=64",
        ],
        PredictConfig,
    )
    summary = run_predict(cfg)
    table = pq.read_table(output).to_pydict()
    assert len(table["key"]) == 102 == summary["counts"]["samples"]
    assert summary["counts"]["with_given_label"] == 100
    reported = run.history[-1]["test_accuracy"]
    assert abs(summary["counts"]["accuracy_vs_given_labels"] - reported) <= 0.005
    rows = {key: i for i, key in enumerate(table["key"])}
    unlabelled, broken = rows["unlabelled"], rows["broken"]
    assert table["status"][unlabelled] == "ok" and table["given_label"][unlabelled] == -1
    assert table["predicted_name"][unlabelled] in run.clean["class_names"]
    assert table["status"][broken] == "failed" and "decode" in table["reason"][broken]
    assert table["predicted_label"][broken] == -1
    ok = [i for i, s in enumerate(table["status"]) if s == "ok"]
    assert all(table["top_labels"][i][0] == table["predicted_label"][i] for i in ok)
    assert all(len(table["top_probs"][i]) == 5 for i in ok)
    np.testing.assert_allclose(
        [table["confidence"][i] for i in ok], [table["top_probs"][i][0] for i in ok]
    )
    assert table["key"][:2] == ["shapes-000000-000000", "shapes-000000-000001"]  # shard order
    assert json.loads(Path(summary_uri(str(output))).read_text())["counts"] == summary["counts"]


def tar_members(shard: Path) -> dict[str, bytes]:
    with tarfile.open(shard) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


def test_export_writes_exactly_the_clean_samples_and_reruns_safely(run):
    manifest = pq.read_table(run.root / "clean" / "manifest.parquet").to_pydict()
    status, keys = manifest["status"], manifest["key"]
    clean = {k for k, s in zip(keys, status, strict=True) if s == "clean"}
    relabel = {
        k: (given, suggested)
        for k, s, given, suggested in zip(
            keys, status, manifest["label"], manifest["suggested_label"], strict=True
        )
        if s == "noisy" and suggested >= 0
    }
    assert clean and relabel
    out = run.root / "export"

    def export(*extra: str) -> dict:
        return run_export(
            load_config(
                None,
                [f"manifest={run.root / 'clean'}", f"output={out}", *extra],
                ExportShardsConfig,
            )
        )

    summary = export(f"input={run.shards}", "relabel=true")
    check = summary["count_check"]
    assert check["passed"] and check["written"] == len(clean) + len(relabel)
    assert (
        check["written"]
        == run.clean["counts"]["clean"] + (run.clean["counts"]["noisy_with_suggestion"])
    )
    originals: dict[str, bytes] = {}
    for shard in sorted(run.shards.glob("*.tar")):
        originals.update(tar_members(shard))
    exported: dict[str, bytes] = {}
    for shard in sorted(out.glob("clean-*.tar")):
        exported.update(tar_members(shard))
    assert {name.split(".")[0] for name in exported} == clean | set(relabel)
    for name, data in exported.items():
        key, ext = name.split(".")
        if key in clean:
            assert data == originals[name], name  # byte for byte, same member names
        elif ext == "cls":
            assert data == str(relabel[key][1]).encode()
        elif ext == "json":
            meta = json.loads(data)
            assert (meta["given_label"], meta["label"]) == relabel[key]
        else:
            assert data == originals[name]
    assert (out / "classes.yaml").exists() and (out / "summary.json").exists()

    # rerun: every shard already written alike is skipped, its bytes unchanged
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    again = export(f"input={run.shards}", "relabel=true")
    assert again["shards_skipped"] == len(before) and again["shards_written"] == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == before

    # clean samples only, 64 per shard, into the same folder: the older shards are replaced
    packed = export(f"input={run.shards}", "shard_size=64")
    assert packed["count_check"]["passed"] and packed["count_check"]["written"] == len(clean)
    sizes = [s["samples"] for s in packed["shards"]]
    assert sizes[:-1] == [64] * (len(sizes) - 1) and 0 < sizes[-1] <= 64
    names = sorted(p.name for p in out.glob("*.tar"))
    assert names == [f"clean-{i:06d}.tar" for i in range(len(sizes))]
    with open(out / names[0], "rb") as f:
        first = [sample.key for sample in iter_tar_samples(f)]
    assert first == [k for k in keys if k in clean][:64]  # manifest order

    # the shards are no longer where the clean job read them: the error says what to give
    with pytest.raises(ConfigError, match="give input="):
        export()


def probs_from_columns(labels: np.ndarray, p_label: np.ndarray, max_p: np.ndarray, k: int):
    """A [N, K] probability matrix with these p(label) and max p (the rest spread evenly)."""
    n = len(labels)
    probs = np.zeros((n, k))
    rows = np.arange(n)
    other = (labels + 1) % k
    top_is_label = max_p <= p_label
    probs[rows, labels] = p_label
    probs[rows[~top_is_label], other[~top_is_label]] = max_p[~top_is_label]
    rest = 1.0 - probs.sum(axis=1)
    free = probs == 0
    probs[free] = np.repeat(rest / free.sum(axis=1), free.sum(axis=1))
    return probs


def test_label_issues_agrees_with_the_clean_jobs_manifest(run):
    manifest = pq.read_table(run.root / "clean" / "manifest.parquet").to_pydict()
    usable = np.array([s != "failed" for s in manifest["status"]])
    labels = np.array(manifest["label"])[usable]
    k = len(run.clean["class_names"])

    def source(name: str) -> np.ndarray:
        return probs_from_columns(
            labels,
            np.array(manifest[f"p_label_{name}"], dtype=np.float64)[usable],
            np.array(manifest[f"max_p_{name}"], dtype=np.float64)[usable],
            k,
        )

    issues = cleaner.label_issues(labels, source("zeroshot"), source("probe"))
    in_input_order = issues.sort_index()
    is_clean = np.array(manifest["is_clean"])[usable]
    assert np.array_equal(~in_input_order["is_label_issue"].to_numpy(), is_clean)
    np.testing.assert_allclose(
        in_input_order["label_quality"], np.array(manifest["clean_score"])[usable], rtol=1e-6
    )
    assert issues["is_label_issue"].iloc[: int((~is_clean).sum())].all()  # issues first
    flagged = issues[issues["is_label_issue"]]
    assert flagged["label_quality"].is_monotonic_increasing
