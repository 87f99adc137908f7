"""How the local cluster finds a fake node's processes in /proc, with real processes: a
"raylet" that names the cluster's temp dir and carries its node id in its environment, and
a child titled like a Ray actor worker."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from cluster.local.localcluster import kill_pids, node_pids, nodes_running
from tests.test_training_integration import process_pids

# The "raylet": its command line names the temp dir; its child's names the actor and method.
RAYLET = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", sys.argv[2]])
print(child.pid, flush=True)
time.sleep(60)
"""


@pytest.fixture
def fake_node(tmp_path):
    """Starts a fake node; yields (temp dir, start) where start(node_id, title) -> pids."""
    started: list[int] = []

    def start(node_id: str, title: str) -> tuple[int, int]:
        env = {**os.environ, "RAY_OVERRIDE_NODE_ID_FOR_TESTING": node_id}
        raylet = subprocess.Popen(
            [sys.executable, "-c", RAYLET, str(tmp_path / "session"), title],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        child = int(raylet.stdout.readline())
        started.extend([raylet.pid, child])
        deadline = time.time() + 10  # the child's command line is readable once it has exec'd
        while time.time() < deadline and child not in process_pids(title.encode()):
            time.sleep(0.05)
        return raylet.pid, child

    yield str(tmp_path / "session"), start
    kill_pids(started, grace_s=0)


def test_nodes_running_finds_the_node_of_a_titled_worker_and_skips_the_excluded(fake_node):
    temp_dir, start = fake_node
    raylet_a, worker_a = start("node-a", "ray::MapWorker(MapBatches(ClipScorer)).submit")
    start("node-b", "ray::MapWorker(MapBatches(ClipScorer)).__init__")
    start("node-c", "ray::RayTrainWorker")

    assert nodes_running(temp_dir, "ClipScorer") == {"node-a", "node-b"}
    assert nodes_running(temp_dir, "ClipScorer", unless=".__init__") == {"node-a"}
    assert nodes_running(temp_dir, "NoSuchActor") == set()
    assert nodes_running(temp_dir + "-other", "ClipScorer") == set()  # another cluster's dir
    assert set(node_pids(temp_dir, "node-a")) == {raylet_a, worker_a}
