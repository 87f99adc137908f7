"""Where the scorers run (cleaner/scoring/resources.py), on a real local Ray without GPUs:
`auto` falls back to CPUs, CPU scorers leave a CPU to the readers, and resources that do not
exist stop the job within the bounded probe time with an error naming them."""

from __future__ import annotations

import time

import pytest

from cleaner.scoring.resources import SchedulingError, plan_scorers
from tests.conftest import clean_config, own_ray

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def two_cpu_ray():
    ray = own_ray(num_cpus=2, num_gpus=0)
    yield ray
    ray.shutdown()


def test_auto_on_a_local_ray_without_gpus_uses_cpus_and_leaves_one_to_readers(two_cpu_ray):
    cfg = clean_config("unused", "unused", "scoring.max_actors=4")
    plan = plan_scorers(cfg, shards_to_score=10)
    assert plan.num_gpus == 0
    assert plan.reason.startswith("auto: no GPU")
    # 2 CPUs: one scorer with 1 CPU, one CPU left for a shard reader (not 2 scorers).
    assert plan.max_actors == 1 and plan.min_actors == 1


def test_the_pool_never_exceeds_the_shards_to_score(two_cpu_ray):
    cfg = clean_config("unused", "unused", "scoring.max_actors=4", "scoring.cpus_per_actor=0.5")
    assert plan_scorers(cfg, shards_to_score=1).max_actors == 1


def test_gpus_that_cannot_exist_stop_within_the_probe_time_naming_them(two_cpu_ray):
    cfg = clean_config(
        "unused", "unused", "scoring.gpus_per_actor=1", "scoring.gpu_probe_s=3",
        "scoring.schedule_timeout_s=600",
    )  # fmt: skip
    start = time.monotonic()
    with pytest.raises(SchedulingError) as err:
        plan_scorers(cfg, shards_to_score=4)
    waited = time.monotonic() - start
    assert waited < 60, f"waited {waited:.0f} s for GPUs that no node has"
    text = str(err.value)
    assert "1 GPU" in text and "1 CPU" in text  # what each scorer asked for
    assert "CPU 2" in text and "GPU 0" in text  # what the cluster has
