"""The actors of the Ray instance this process is connected to, and their processes.

Fault tests kill only their own Ray's workers: other Ray instances on the machine (other
test runs, other users) run actors of the same classes. An actor is taken from this
instance's GCS actor table, and its process must descend from a Ray process that names
this instance's session directory (cluster.local.localcluster.cluster_pids).
"""

from __future__ import annotations

from pathlib import Path

from cluster.local.localcluster import cluster_pids


def session_dir() -> str:
    """The connected Ray instance's session directory (unique to the instance)."""
    import ray

    return ray._private.worker._global_node.get_session_dir_path()


def actors(class_fragment: str) -> list[dict]:
    """This instance's actors (GCS actor table rows) whose class name holds the fragment;
    Ray Data names an actor pool's workers `MapWorker(MapBatches(<class>))`."""
    import ray

    table = ray._private.state.actors()  # the GCS table: no dashboard needed
    return [a for a in table.values() if class_fragment in a["ActorClassName"]]


def process_title(pid: int) -> str:
    """A process's command line: Ray titles an actor's process `ray::<class>.<method>`
    after the method it runs (`__init__` while it starts)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def live_actor_processes(class_fragment: str) -> list[tuple[int, str]]:
    """(pid, actor id) of this instance's ALIVE actors of a class whose process runs here,
    as a descendant of this instance's own Ray processes."""
    own = set(cluster_pids(session_dir()))
    return [
        (a["Pid"], a["ActorID"])
        for a in actors(class_fragment)
        if a["State"] == "ALIVE" and a["Pid"] in own
    ]
