"""The scorer pool's size (cleaner.scoring.resources.size_pool), without Ray."""

from __future__ import annotations

from cleaner.scoring.resources import size_pool


def pool(gpus: float, cpus: float = 1.0, **kw) -> tuple[int, int]:
    args = dict(min_actors=1, max_actors=4, shards_to_score=100, cluster_cpus=2.0,
                cluster_gpus=0.0, can_launch_nodes=False)  # fmt: skip
    return size_pool(gpus, cpus, **{**args, **kw})


def test_gpu_scorers_on_a_cluster_that_launches_nodes_ask_for_every_actor_at_once():
    # one GPU node up (or none yet): all four actors are asked for, so that their pending
    # demand makes the autoscaler launch the nodes (Ray Data would not grow a GPU pool)
    assert pool(1.0, cluster_gpus=1.0, can_launch_nodes=True) == (4, 4)
    assert pool(1.0, cluster_gpus=0.0, can_launch_nodes=True) == (4, 4)


def test_gpu_scorers_on_a_ray_the_job_started_use_the_gpus_it_has():
    assert pool(1.0, cluster_gpus=2.0) == (2, 2)
    assert pool(0.5, cluster_gpus=1.0) == (2, 2)  # two scorers share one GPU
    assert pool(1.0, cluster_gpus=8.0) == (4, 4)  # max_actors still bounds it


def test_never_more_actors_than_shards():
    assert pool(1.0, cluster_gpus=8.0, shards_to_score=3) == (3, 3)
    assert pool(0.0, cpus=0.5, cluster_cpus=16.0, shards_to_score=1) == (1, 1)


def test_cpu_scorers_autoscale_and_leave_a_cpu_to_the_readers():
    assert pool(0.0, cluster_cpus=2.0) == (1, 1)
    assert pool(0.0, cluster_cpus=4.0) == (1, 3)
    assert pool(0.0, cpus=2.0, cluster_cpus=16.0, min_actors=2) == (2, 4)
