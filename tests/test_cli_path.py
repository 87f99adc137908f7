"""The README's path with `clipcleaner` commands, on generated data: an ImageFolder -> shards
-> inspect -> clean -> train -> predict -> export-shards, each step's output checked against
the others'. And Ctrl-C: a real SIGINT ends a job with one line and exit status 130."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from cleaner.classes import DEMO_CLASS_SPEC, ClassSpec
from cleaner.demo.dataset import write_demo_shards
from jobs.cli import main
from jobs.command import EXIT_INTERRUPTED
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.integration
CLI = Path(sys.executable).parent / "clipcleaner"


def clipcleaner(command_line: str) -> int:
    """`clipcleaner <command_line>` by the console script's main, in this process (one Ray
    for every step); its exit status."""
    with pytest.raises(SystemExit) as done:
        main(shlex.split(command_line))
    return done.value.code


def image_folder(root: Path, num_samples: int, *, noise: str, seed: int) -> dict[str, str]:
    """Demo images as an ImageFolder (root/<class name>/<name>.jpg), filed under their
    (noisy) label as a badly labelled dataset is; returns {file stem: folder}."""
    shards = root.parent / f".{root.name}-shards"
    write_demo_shards(shards, num_samples, samples_per_shard=num_samples, noise=noise, seed=seed)
    names = ClassSpec.load(DEMO_CLASS_SPEC).names
    filed: dict[str, str] = {}
    for shard in sorted(shards.glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
        for name, data in members.items():
            key, ext = name.rsplit(".", 1)
            if ext != "jpg":
                continue
            folder = names[int(members[f"{key}.cls"])]
            (root / folder).mkdir(parents=True, exist_ok=True)
            (root / folder / f"{key}.jpg").write_bytes(data)
            filed[key] = folder
    return filed


def tar_samples(folder: Path) -> dict[str, dict[str, bytes]]:
    """{key: {extension: bytes}} over the tar shards of a folder."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.isfile():
                    key, ext = member.name.split("/")[-1].split(".", 1)
                    samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def test_the_readme_path_from_an_image_folder_to_a_model_and_clean_shards(local_ray, tmp_path):
    start = time.perf_counter()
    train_images = image_folder(tmp_path / "images" / "train", 200, noise="symmetric", seed=3)
    test_images = image_folder(tmp_path / "images" / "test", 40, noise="none", seed=4)
    shards, runs = tmp_path / "shards", tmp_path / "runs"
    classes = shards / "train" / "classes.yaml"

    # 1. make-shards: every image in a shard, the class spec from the folder names
    for split, count in (("train", len(train_images)), ("test", len(test_images))):
        images = tmp_path / "images" / split
        make = f"make-shards --layout imagefolder --input {images} --output {shards / split}"
        assert clipcleaner(f"{make} split={split} shard_size=50") == 0
        report = json.loads((shards / split / "make_shards_report.json").read_text())
        assert report["counts"]["written"] == count
    names = ClassSpec.from_yaml_text(classes.read_text()).names
    assert names == sorted(set(train_images.values()))
    assert len(list((shards / "train").glob("*.tar"))) == 4

    # 2. inspect: every sample usable, labels within the spec
    assert clipcleaner(f"inspect {shards / 'train'} --json {tmp_path / 'inspect.json'}") == 0
    totals = json.loads((tmp_path / "inspect.json").read_text())["totals"]
    assert totals["samples"] == totals["usable"] == len(train_images)

    # 3. clean: one manifest row per image, labels as filed
    clean = f"clean --input {shards / 'train'} --classes {classes} --output {runs / 'clean'}"
    assert clipcleaner(f"{clean} --model tiny-clip-shapes scoring.batch_size=64") == 0
    manifest = pq.read_table(runs / "clean" / "manifest.parquet").to_pandas()
    assert len(manifest) == len(train_images)
    assert (runs / "clean" / "report.html").stat().st_size > 0
    filed = {Path(k).name: v for k, v in train_images.items()}
    assert all(names[row.label] == filed[Path(row.key).name] for row in manifest.itertuples())
    clean_keys = {Path(k).name for k in manifest.loc[manifest.status == "clean", "key"]}
    assert 0 < len(clean_keys) < len(train_images)

    # 4. train: one epoch of the tiny CNN on one worker; a model folder comes out
    train = (
        f"train --config {REPO_ROOT / 'configs' / 'train-demo.yaml'} --input {shards / 'train'} "
        f"--manifest {runs / 'clean'} --classes {classes} --test-input {shards / 'test'} "
        f"--storage {runs / 'train'} --name path mixfix.mode=mixfix_clip"
    )
    tiny = "optim.epochs=1 optim.milestones=[1] optim.batch_size=32 scaling.num_workers=1"
    assert clipcleaner(f"{train} {tiny} ray.num_cpus=null") == 0
    summary = json.loads((runs / "train" / "path" / "summary.json").read_text())
    assert summary["epochs_completed"] == 1
    assert (runs / "train" / "path" / "model").is_dir()

    # 5. predict: one row per test image, a class of the spec each
    predictions_file = runs / "test-predictions.parquet"
    predict = f"predict --model {runs / 'train' / 'path'} --input {shards / 'test'}"
    assert clipcleaner(f"{predict} --output {predictions_file} scoring.max_actors=1") == 0
    predictions = pq.read_table(predictions_file).to_pandas()
    assert sorted(Path(k).name for k in predictions.key) == sorted(
        Path(k).name for k in test_images
    )
    assert predictions.predicted_label.between(0, len(names) - 1).all()
    assert set(predictions.predicted_name) <= set(names)
    assert predictions.confidence.between(0, 1).all()

    # 6. export-shards: exactly the clean samples, their images byte for byte
    export = f"export-shards --manifest {runs / 'clean'} --output {shards / 'clean'}"
    assert clipcleaner(export) == 0
    exported = tar_samples(shards / "clean")
    assert {Path(k).name for k in exported} == clean_keys
    originals = tar_samples(shards / "train")
    assert all(exported[k]["jpg"] == originals[k]["jpg"] for k in exported)
    print(f"\n[the README path: {time.perf_counter() - start:.1f} s]")


def test_ctrl_c_keeps_the_scores_and_says_how_to_resume(demo_shards, tmp_path):
    """SIGINT to the job's process group (what a terminal's Ctrl-C sends) while it scores:
    exit status 130, one line naming the score files kept and the rerun, no traceback; and
    until then, no notice in the log that asks nothing of the user."""
    output = tmp_path / "run"
    scores = output / "scores"
    command = (
        f"clean --input {demo_shards} --output {output} data.classes=demo "
        "--model tiny-clip-shapes scoring.max_actors=1 scoring.batch_size=16 "
        "scoring.read_batch_size=16 ray.num_cpus=2"
    )
    out_file, err_file = tmp_path / "stdout", tmp_path / "stderr"
    with out_file.open("w") as stdout, err_file.open("w") as stderr:
        job = subprocess.Popen(
            [str(CLI), *shlex.split(command)],
            cwd=REPO_ROOT,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,  # its own process group, as a shell gives a foreground job
        )
    try:
        deadline = time.monotonic() + 900
        while not list(scores.glob("*.parquet")) and job.poll() is None:
            assert time.monotonic() < deadline, "no score file after 900 s"
            time.sleep(0.05)
        assert job.poll() is None, "the job ended before it could be interrupted"
        os.killpg(job.pid, signal.SIGINT)
        job.wait(timeout=120)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    out, err = out_file.read_text(), err_file.read_text()
    print(f"\n[stderr tail]\n{err[-2000:]}")
    assert job.returncode == EXIT_INTERRUPTED
    assert "Traceback" not in out + err
    # notices that ask nothing of the user: Ray's token auth on its own local instance (on,
    # as wanted), Ray Data's bars off (the job prints its own progress lines),
    assert "Token authentication is enabled" not in err
    assert "Progress bars disabled" not in err
    # and Ray's restart warning for its own scorer pool (jobs/ray_noise.py: a false alarm)
    assert "has constructor arguments in the object store" not in err
    last = err.strip().splitlines()[-1]
    said = re.fullmatch(
        rf"interrupted: (\d+) shard score file\(s\) kept in {re.escape(str(scores))}; rerun "
        r"the same command to reuse them and score the rest \(resume=true\)",
        last,
    )
    assert said, last
    # a merge task already running may still finish while the job shuts down
    assert 1 <= int(said.group(1)) <= len(list(scores.glob("*.parquet")))
