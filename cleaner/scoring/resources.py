"""Where the scorer actors run: GPUs or CPUs, how many, and a bounded wait for them.

The rule for `scoring.gpus_per_actor: auto`, made for autoscaling clusters whose GPU worker
groups start at zero nodes (and for laptops without GPUs):

1. GPUs in the cluster now -> one GPU per scorer.
2. Ray's published cluster config (KubeRay, autoscaler v2) declares a node group with GPUs
   -> one GPU per scorer: the autoscaler will launch them.
3. The job joined a running cluster (RAY_ADDRESS, `ray job submit`): ask its autoscaler.
   A probe actor asks for one scorer's GPU and CPUs. If it starts, or the autoscaler
   starts launching a node for it within `scoring.gpu_probe_s`, the scorers use GPUs;
   if nothing happens in that time, no node type has GPUs and the scorers use CPUs.
4. The job started its own local Ray: GPUs only if this machine has them (rule 1).

Whatever was resolved, a probe with exactly one scorer's resources must start within
`scoring.schedule_timeout_s`, or the job stops with an error that names what it asked for
and what the cluster has: it never waits silently for resources that cannot come.

The pool: GPU scorers are a fixed pool (min = max) from the start, so that every actor is
asked for at once. On an autoscaling cluster the pending actors are the demand that makes the
autoscaler launch one node per actor; an autoscaling pool would stay at one GPU actor there
(Ray issue #59144: Ray Data budgets new actors by the GPUs that exist now). Ray Data starts
the pool's actors asynchronously, so the job runs on those that start while the others wait
for nodes. On a local Ray the job started itself, the pool is capped at the GPUs it has.
CPU scorers autoscale within [min_actors, max_actors] and leave at least one CPU to the
shard readers, so they cannot starve them.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from typing import Protocol

from cleaner.config import ActorPoolConfig, RayConfig

log = logging.getLogger(__name__)
READER_CPUS = 1.0  # one shard-reader task (decoding) must always find a CPU


class PooledJobConfig(Protocol):
    """A job config with a model-actor stage: the clean job's scorers, the predict job's."""

    scoring: ActorPoolConfig
    ray: RayConfig


class SchedulingError(RuntimeError):
    """The scorers' resources do not exist in the cluster and cannot be launched in time."""


@dataclass
class ScorerPlan:
    """Resolved scorer resources and pool size, with how they were decided."""

    num_gpus: float
    num_cpus: float
    min_actors: int
    max_actors: int
    reason: str

    def remote_args(self) -> dict[str, float]:
        return {"num_gpus": self.num_gpus, "num_cpus": self.num_cpus}

    def as_dict(self) -> dict:
        return asdict(self)


def joined_existing_cluster(cfg: PooledJobConfig) -> bool:
    """True when the job runs on a cluster it did not start (as under `ray job submit`)."""
    return bool(cfg.ray.address or os.environ.get("RAY_ADDRESS"))


def cluster_summary() -> str:
    """What the cluster has now, per node, plus the node groups Ray knows it can launch."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    parts = []
    for node in nodes:
        res = node.get("Resources", {})
        parts.append(
            f"{node.get('NodeManagerAddress', '?')}: CPU {res.get('CPU', 0):g}, "
            f"GPU {res.get('GPU', 0):g}"
        )
    groups = launchable_node_groups()
    text = f"{len(nodes)} node(s) [{'; '.join(parts)}]"
    if groups:
        text += "; launchable node groups: " + "; ".join(
            f"{g['name']} {g['resources']} x{g['max_count']}" for g in groups
        )
    return text


def launchable_node_groups() -> list[dict]:
    """Node groups from Ray's published cluster config (KubeRay / autoscaler v2); [] if none."""
    try:
        import ray._private.state as state

        config = state.state.get_cluster_config()
    except Exception as err:  # older Ray, or no GCS access: the probe decides instead
        log.debug("no cluster config from the GCS: %s", err)
        return []
    if config is None:
        return []
    return [
        {"name": g.name, "resources": dict(g.resources), "max_count": g.max_count}
        for g in config.node_group_configs
        if g.max_count != 0
    ]


def autoscaler_launching() -> bool:
    """Whether the autoscaler has nodes pending launch (autoscaler v1's published status, or
    v2's cluster status)."""
    try:
        from ray.experimental.internal_kv import _internal_kv_get

        raw = _internal_kv_get("__autoscaling_status")
        if raw:
            report = json.loads(raw).get("autoscaler_report") or {}
            if report.get("pending_launches") or report.get("pending_nodes"):
                return True
    except Exception as err:
        log.debug("autoscaler v1 status unreadable: %s", err)
    try:
        import ray
        from ray.autoscaler.v2.sdk import get_cluster_status

        status = get_cluster_status(ray.get_runtime_context().gcs_address)
        return bool(status.pending_launches or status.pending_nodes)
    except Exception as err:
        log.debug("autoscaler v2 status unreadable: %s", err)
    return False


def _probe_actor(num_gpus: float, num_cpus: float):
    import ray

    @ray.remote(num_gpus=num_gpus, num_cpus=num_cpus, max_restarts=0)
    class ScorerResourceProbe:
        """Holds one scorer's resources until killed; ready() answers once it is placed."""

        def ready(self) -> str:
            return ray.get_runtime_context().get_node_id()

    return ScorerResourceProbe.remote()


def wait_for_probe(
    num_gpus: float,
    num_cpus: float,
    timeout_s: float,
    *,
    give_up_without_launch_s: float | None = None,
    poll_s: float = 1.0,
) -> str | None:
    """Start a probe actor with these resources and wait for it to be placed.

    Returns the node id it landed on, or None if it was not placed within timeout_s, or
    within give_up_without_launch_s while the autoscaler launched nothing for it.
    """
    import ray

    probe = _probe_actor(num_gpus, num_cpus)
    ref = probe.ready.remote()
    start = time.monotonic()
    launching = False
    try:
        while True:
            done, _ = ray.wait([ref], timeout=poll_s)
            if done:
                try:
                    return ray.get(ref)
                except ray.exceptions.RayActorError:
                    # Its node went away (a launch that failed, a node lost): ask again.
                    probe = _probe_actor(num_gpus, num_cpus)
                    ref = probe.ready.remote()
                    continue
            elapsed = time.monotonic() - start
            launching = launching or autoscaler_launching()
            if (
                give_up_without_launch_s is not None
                and not launching
                and elapsed >= give_up_without_launch_s
            ):
                return None
            if elapsed >= timeout_s:
                return None
    finally:
        ray.kill(probe)


def plan_scorers(cfg: PooledJobConfig, shards_to_score: int) -> ScorerPlan:
    """Resolve the scorers' resources and pool size for this cluster; bounded in time.
    (The predict job plans its classifier actors with the same rules.)

    Raises SchedulingError when the scorers' resources cannot be had within
    scoring.schedule_timeout_s.
    """
    import ray

    sc = cfg.scoring
    cpus = float(sc.cpus_per_actor)
    gpus_now = ray.cluster_resources().get("GPU", 0)
    if sc.gpus_per_actor != "auto":
        gpus = float(sc.gpus_per_actor)
        reason = f"gpus_per_actor={gpus:g} (set)"
    elif gpus_now > 0:
        gpus, reason = 1.0, f"auto: the cluster has {gpus_now:g} GPU(s)"
    elif any(g["resources"].get("GPU", 0) > 0 for g in launchable_node_groups()):
        gpus, reason = 1.0, "auto: a node group with GPUs can be launched"
    elif joined_existing_cluster(cfg):
        print(
            f"[score] no GPU in the cluster now: asking its autoscaler for one "
            f"(up to {sc.gpu_probe_s:g} s to start a launch)",
            flush=True,
        )
        node = wait_for_probe(
            1.0, cpus, sc.schedule_timeout_s, give_up_without_launch_s=sc.gpu_probe_s
        )
        if node is not None:
            gpus, reason = 1.0, "auto: the autoscaler launched a GPU node"
        else:
            gpus, reason = (
                0.0,
                (f"auto: no GPU in the cluster and none launched within {sc.gpu_probe_s:g} s"),
            )
    else:
        gpus, reason = 0.0, "auto: no GPU on this machine (local Ray)"

    resources = ray.cluster_resources()  # after the probe: with any node it launched
    min_actors, max_actors = size_pool(
        gpus,
        cpus,
        min_actors=sc.min_actors,
        max_actors=sc.max_actors,
        shards_to_score=shards_to_score,
        cluster_cpus=resources.get("CPU", 0),
        cluster_gpus=resources.get("GPU", 0),
        can_launch_nodes=joined_existing_cluster(cfg),
    )
    plan = ScorerPlan(gpus, cpus, min_actors, max_actors, reason)
    check_schedulable(plan, sc.schedule_timeout_s, sc.gpu_probe_s)
    return plan


def size_pool(
    num_gpus: float,
    num_cpus: float,
    *,
    min_actors: int,
    max_actors: int,
    shards_to_score: int,
    cluster_cpus: float,
    cluster_gpus: float,
    can_launch_nodes: bool,
) -> tuple[int, int]:
    """(min, max) scorer actors; see the module docstring. Never more actors than shards."""
    max_actors = max(1, min(max_actors, shards_to_score))
    if num_gpus > 0:
        if not can_launch_nodes:  # a Ray this job started: only the GPUs it has
            max_actors = max(1, min(max_actors, int(cluster_gpus // num_gpus)))
        return max_actors, max_actors
    if num_cpus + READER_CPUS > cluster_cpus:
        log.warning(
            "the cluster has %g CPU(s): one CPU scorer (%g CPUs) leaves none to the readers",
            cluster_cpus,
            num_cpus,
        )
    # CPU scorers: leave a CPU to the readers, or neither makes progress on a small node.
    fit = int((cluster_cpus - READER_CPUS) // num_cpus) if cluster_cpus > num_cpus else 1
    max_actors = max(1, min(max_actors, fit))
    return min(min_actors, max_actors), max_actors


def fits_some_node(num_gpus: float, num_cpus: float) -> bool:
    """Whether any alive node has at least these resources in total (busy or not)."""
    import ray

    for node in ray.nodes():
        res = node.get("Resources", {}) if node.get("Alive") else {}
        if res.get("GPU", 0) >= num_gpus and res.get("CPU", 0) >= num_cpus:
            return True
    return False


def check_schedulable(plan: ScorerPlan, timeout_s: float, launch_s: float) -> None:
    """One scorer's resources must be placeable within timeout_s, else SchedulingError.

    When no node has them at all, the autoscaler must start a launch within launch_s."""
    t0 = time.monotonic()
    exists = fits_some_node(plan.num_gpus, plan.num_cpus)
    node = wait_for_probe(
        plan.num_gpus,
        plan.num_cpus,
        timeout_s,
        give_up_without_launch_s=None if exists else launch_s,
    )
    if node is None:
        waited = time.monotonic() - t0
        raise SchedulingError(
            f"no scorer could start (waited {waited:.0f} s): each asks for "
            f"{plan.num_gpus:g} GPU and {plan.num_cpus:g} CPU ({plan.reason}); the cluster has "
            f"{cluster_summary()}. Set scoring.gpus_per_actor / scoring.cpus_per_actor to what "
            f"the cluster can provide, or raise scoring.schedule_timeout_s if nodes start slowly."
        )
    log.info("scorer resources placeable (node %s, %.1f s)", node, time.monotonic() - t0)
