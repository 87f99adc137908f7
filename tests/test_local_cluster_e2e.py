"""End to end on the local autoscaling cluster (cluster/local/cluster.yaml): a GPU-less head,
GPU worker nodes from zero. A smaller run of benchmarks.cluster_e2e: `ray job submit` of the
clean job with the DEFAULT scoring settings on S3 data, during which the node of a running
scorer is killed whole; then, on the same cluster, the training job on its manifest, during
which the node of a random training worker is killed at a random moment (the seed is
printed). Every figure is observed, none read from a config."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.e2e


def test_default_config_scales_gpu_nodes_from_zero_and_survives_node_kills(tmp_path):
    # In its own process: the run points Ray's client at the cluster's token, which Ray
    # keeps for the life of the process (a later local ray.init here would be refused).
    out = tmp_path / "cluster_e2e.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.cluster_e2e",
            f"--out={out}",
            "--samples=200",
            "--samples-per-shard=25",
            "--batch-size=32",
            "--no-train",
            "--train-kill-run",
            "--epochs=2",
            "--job-timeout=480",
            "--idle-timeout=150",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    print(done.stdout[-6000:], done.stderr[-6000:])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    # The default config (gpus_per_actor: auto) asked for GPUs: the autoscaler launched GPU
    # nodes, and every scorer ran on one of them.
    assert result["gpu_nodes_launched"] >= 1
    assert result["default_config_used_gpu_nodes"] is True
    # Every input sample once in the manifest.
    assert result["manifest_rows"] == result["input_samples"] == 200
    assert result["duplicate_keys"] == 0
    # A whole GPU node was killed mid-scoring in that run: still every sample once.
    kill = result["node_kill"]
    assert kill["killed_node"]
    assert kill["manifest_rows"] == kill["input_samples"] == 200
    assert kill["duplicate_keys"] == 0
    # Training on that manifest lost the node of a random training worker (rank 0's, which
    # published the epoch state, or another) at a random batch of a random epoch, and still
    # trained every epoch: the job's state lives on the driver's node.
    train = result["train_kill"]
    print(f"training-node kill: seed {train['seed']}, {train['kills']}")
    assert train["outcome"] == "SUCCEEDED", train.get("log_tail")
    assert train["epochs_completed"] == 2
    (killed,) = train["kills"]
    assert "RayTrainWorker" in killed["role"]
    assert killed["progress"]["partial"] is True  # it hit unfinished training
    assert train["recovery"]["worker_group_restarts"] >= 1, train["recovery"]
    assert train["job_state_off_driver_node"] == []
    assert train["passed"] is True, train["checks"]
    # Idle GPU nodes are removed (idle_timeout_minutes: 0.5).
    assert result["gpu_nodes_after_idle"] == 0
