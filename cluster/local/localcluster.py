"""A local autoscaling Ray cluster (Ray's fake multi-node provider) with token auth on.

    python cluster/local/localcluster.py up [--dir .cluster/local] [--config cluster/local/cluster.yaml]
    python cluster/local/localcluster.py status
    python cluster/local/localcluster.py down

`up` starts a head whose monitor launches and removes local "nodes" (real raylets, declared
GPUs) as the YAML's node types allow, and prints the address and where the token is. `down`
stops this cluster's processes only, found by its own temp dir: never `ray stop`, which kills
every Ray process on the machine. The tests and benchmarks.cluster_e2e use LocalCluster.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO_ROOT / "cluster" / "local" / "cluster.yaml"
DEFAULT_DIR = REPO_ROOT / ".cluster" / "local"
STATE_FILE = "cluster.json"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def node_ip() -> str:
    """The address Ray itself would pick for this machine (what fake nodes register with)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("10.255.255.255", 1))
            return sock.getsockname()[0]
        except OSError:
            return "127.0.0.1"


@dataclass
class ClusterInfo:
    """What a started cluster is: how to reach it, and what marks its processes."""

    address: str  # dashboard / job submission address (http://...)
    gcs_address: str
    token_path: str
    temp_dir: str
    config_path: str

    def env(self) -> dict[str, str]:
        """Environment variables that point Ray clients (ray CLI, ray.init) at this cluster."""
        return {
            "RAY_ADDRESS": self.address,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": self.token_path,
        }


def local_runtime_env(repo: Path = REPO_ROOT, env_vars: dict[str, str] | None = None) -> str:
    """`ray job submit --runtime-env-json` for this cluster: ray_config.yaml, but with the
    repo itself as the working dir (`local://`, used in place on every node), plus
    `env_vars` for the job's processes.

    The fake nodes share one session directory; with the uploaded working dir of
    ray_config.yaml, a node that starts or stops unpacks or drops the package under the
    other nodes' running workers, whose imports then fail ("No such file or directory" from
    os.getcwd()). Real clusters' nodes each have their own disk: use ray_config.yaml there.
    """
    runtime_env = yaml.safe_load((repo / "ray_config.yaml").read_text())
    runtime_env.pop("excludes", None)
    runtime_env["working_dir"] = f"local://{repo.resolve()}"
    runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), **(env_vars or {})}
    return json.dumps(runtime_env)


def _processes() -> list[tuple[int, str]]:
    """(pid, command line) of every process we can read."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        cmd = process_cmdline(int(entry.name))
        if cmd is not None:
            found.append((int(entry.name), cmd))
    return found


def process_cmdline(pid: int) -> str | None:
    """A process's command line as _processes reads it (None once it is gone)."""
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return None


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def _children() -> dict[int, list[int]]:
    """Parent pid -> child pids, from /proc/<pid>/stat."""
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def _with_descendants(roots: list[int], tree: dict[int, list[int]] | None = None) -> list[int]:
    tree, seen, todo = tree if tree is not None else _children(), set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.add(pid)
            todo.extend(tree.get(pid, []))
    return sorted(seen)


def cluster_pids(temp_dir: str) -> list[int]:
    """Processes of the cluster whose temp dir is `temp_dir`: the Ray processes of every node
    (GCS, monitor, dashboard, raylets, log monitors) name their session folder under it, and
    the rest (agents, dashboard modules, workers) are their descendants."""
    marker = str(Path(temp_dir).resolve())
    me = os.getpid()
    roots = [pid for pid, cmd in _processes() if marker in cmd and pid != me]
    return [pid for pid in _with_descendants(roots) if pid != me]


def _node_roots(temp_dir: str, processes: list[tuple[int, str]]) -> dict[str, list[int]]:
    """Node id -> the processes the fake provider started for that node (raylet, log
    monitor): they name the cluster's temp dir and carry RAY_OVERRIDE_NODE_ID_FOR_TESTING."""
    marker, roots = str(Path(temp_dir).resolve()), {}
    for pid, cmd in processes:
        node_id = _environ(pid).get("RAY_OVERRIDE_NODE_ID_FOR_TESTING") if marker in cmd else None
        if node_id:
            roots.setdefault(node_id, []).append(pid)
    return roots


def node_pids(temp_dir: str, node_id: str) -> list[int]:
    """Processes of one fake node: the provider starts each node's processes (raylet, log
    monitor) with RAY_OVERRIDE_NODE_ID_FOR_TESTING=<node id>; agents and workers descend
    from its raylet."""
    return _with_descendants(_node_roots(temp_dir, _processes()).get(node_id, []))


def node_processes(temp_dir: str) -> dict[str, list[tuple[int, str]]]:
    """Node id -> (pid, command line) of every process of that fake node (see node_pids),
    the head's included: what each node runs now, from one look at /proc."""
    processes = _processes()
    tree, command = _children(), dict(processes)
    return {
        node_id: [(pid, command.get(pid, "")) for pid in _with_descendants(roots, tree)]
        for node_id, roots in _node_roots(temp_dir, processes).items()
    }


def nodes_running(temp_dir: str, fragment: str, unless: str = "") -> set[str]:
    """Ids of the fake nodes (see node_pids) with a process whose command line holds
    `fragment` and not `unless`. Ray titles an actor's worker process after its class and
    the method it runs: `ray::MapWorker(MapBatches(ClipScorer)).__init__` while it starts."""
    return {
        node_id
        for node_id, processes in node_processes(temp_dir).items()
        if any(fragment in cmd and not (unless and unless in cmd) for _, cmd in processes)
    }


def kill_pids(pids: list[int], grace_s: float = 5.0, sig: int = signal.SIGTERM) -> None:
    """Signal `pids`, then SIGKILL whatever is still alive after grace_s."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    deadline = time.time() + grace_s
    alive = list(pids)
    while alive and time.time() < deadline:
        time.sleep(0.2)
        alive = [p for p in alive if Path(f"/proc/{p}").exists() and not _zombie(p)]
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


class LocalCluster:
    """Start, inspect and stop one local autoscaling cluster living in `directory`."""

    def __init__(
        self,
        directory: str | Path = DEFAULT_DIR,
        config: str | Path = DEFAULT_CONFIG,
        env: dict[str, str] | None = None,
        overrides: dict | None = None,
    ):
        self.directory = Path(directory).resolve()
        self.config = Path(config)
        self.extra_env = dict(env or {})
        self.overrides = overrides or {}

    @property
    def state_path(self) -> Path:
        return self.directory / STATE_FILE

    def info(self) -> ClusterInfo | None:
        if not self.state_path.exists():
            return None
        return ClusterInfo(**json.loads(self.state_path.read_text()))

    def up(self, timeout_s: float = 180.0, attempts: int = 3) -> ClusterInfo:
        """Start the head (token auth on); the autoscaler starts worker nodes as work asks.

        On a heavily loaded machine Ray's agents can miss the raylet's start-up deadline;
        the head is then stopped and started again, up to `attempts` times."""
        if self.info() and cluster_pids(self.info().temp_dir):
            raise RuntimeError(f"a cluster already runs from {self.directory}: run `down` first")
        for attempt in range(1, attempts + 1):
            try:
                return self._start_head(timeout_s)
            except RuntimeError as err:
                if attempt == attempts:
                    raise
                print(f"head start {attempt}/{attempts} failed ({str(err)[-300:]}); retrying")
        raise AssertionError("unreachable")

    def _start_head(self, timeout_s: float) -> ClusterInfo:
        self.directory.mkdir(parents=True, exist_ok=True)
        temp_dir = self.directory / "ray"
        temp_dir.mkdir(exist_ok=True)
        token_path = self.directory / "auth_token"
        token_path.write_text(secrets.token_hex(32))
        token_path.chmod(0o600)

        ip = node_ip()
        port, dash_port = free_port(), free_port()
        cfg = yaml.safe_load(self.config.read_text())
        _merge(cfg, self.overrides)
        cfg["provider"]["gcs_address"] = f"{ip}:{port}"
        head = dict(cfg["available_node_types"][cfg["head_node_type"]]["resources"])
        config_path = self.directory / "autoscaler.yaml"
        config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))

        info = ClusterInfo(
            address=f"http://127.0.0.1:{dash_port}",
            gcs_address=f"{ip}:{port}",
            token_path=str(token_path),
            temp_dir=str(temp_dir),
            config_path=str(config_path),
        )
        cmd = [
            str(Path(sys.executable).parent / "ray"),
            "start",
            "--head",
            f"--node-ip-address={ip}",
            f"--port={port}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash_port}",
            # Ray's fixed default (52365) clashes with any other Ray on the machine, and a job
            # agent that cannot bind leaves `ray job submit` with "No available agent".
            f"--dashboard-agent-listen-port={free_port()}",
            f"--num-cpus={int(head.pop('CPU', 1))}",
            f"--num-gpus={int(head.pop('GPU', 0))}",
            f"--temp-dir={temp_dir}",
            f"--autoscaling-config={config_path}",
            "--disable-usage-stats",
        ]
        if "object_store_memory" in head:
            cmd.append(f"--object-store-memory={int(head.pop('object_store_memory'))}")
        if head:
            cmd.append(f"--resources={json.dumps(head)}")
        self.state_path.write_text(json.dumps(asdict(info), indent=2))
        (temp_dir / "session_latest").unlink(missing_ok=True)  # a failed try's session
        proc = subprocess.Popen(
            cmd,
            env=self.head_env(info),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            preexec_fn=own_cpu_group,
        )
        deadline = time.monotonic() + timeout_s
        while proc.poll() is None:
            crashed = _raylet_crash(temp_dir)
            if crashed or time.monotonic() > deadline:
                proc.kill()
                self.down()
                raise RuntimeError(crashed or f"ray start did not finish in {timeout_s:.0f} s")
            time.sleep(1)
        output = proc.stdout.read() if proc.stdout else ""
        if proc.returncode != 0:
            self.down()
            raise RuntimeError(f"ray start failed:\n{output[-3000:]}")
        return info

    def head_env(self, info: ClusterInfo) -> dict[str, str]:
        """The head's environment: inherited by the monitor, which starts the fake nodes."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(self.extra_env)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env.update(
            RAY_FAKE_CLUSTER="1",
            AUTOSCALER_UPDATE_INTERVAL_S="1",
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN_PATH=info.token_path,
        )
        return env

    def client_env(self) -> dict[str, str]:
        """os.environ plus what `ray job submit` / ray.init need to reach this cluster."""
        info = self.info()
        if info is None:
            raise RuntimeError(f"no cluster in {self.directory}")
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(self.extra_env)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env.update(info.env())
        return env

    def down(self, grace_s: float = 10.0) -> int:
        """Stop every process of this cluster (and nothing else); returns how many."""
        info = self.info()
        if info is None:
            return 0
        pids = cluster_pids(info.temp_dir)
        kill_pids(pids, grace_s)
        return len(pids)

    def reprioritise(self) -> int:
        """Give LOCALCLUSTER_CPU_NICE to the autogroups of this cluster's processes that have
        another (job drivers run in their own session); returns how many were changed."""
        nice, info = os.environ.get("LOCALCLUSTER_CPU_NICE"), self.info()
        if not nice or info is None:
            return 0
        changed = 0
        for pid in cluster_pids(info.temp_dir):
            with contextlib.suppress(OSError):
                path = Path(f"/proc/{pid}/autogroup")
                if not path.read_text().strip().endswith(f"nice {int(nice)}"):
                    path.write_text(nice)
                    changed += 1
        return changed

    def nodes_running(self, fragment: str, unless: str = "") -> set[str]:
        """Ids of this cluster's fake nodes running a process whose command line holds
        `fragment` (e.g. an actor's class name) and not `unless`."""
        info = self.info()
        return set() if info is None else nodes_running(info.temp_dir, fragment, unless)

    def node_processes(self) -> dict[str, list[tuple[int, str]]]:
        """Node id -> (pid, command line) of the processes of each of this cluster's nodes."""
        info = self.info()
        return {} if info is None else node_processes(info.temp_dir)

    def node_pids(self, node_id: str) -> list[int]:
        """The processes of one of this cluster's nodes (see node_pids)."""
        info = self.info()
        if info is None:
            raise RuntimeError(f"no cluster in {self.directory}")
        return node_pids(info.temp_dir, node_id)

    def kill_node(self, node_id: str, known: list[tuple[int, str]] | None = None) -> list[int]:
        """SIGKILL one worker node: its raylet, object store, agents and workers at once.

        `known`: (pid, command line) of its processes from an earlier look (node_processes),
        killed first, those whose command line is still the same (a pid is never taken for
        another's): the look for the node's processes takes a while on a loaded machine.
        Whatever that look then finds (a worker started since) is killed too."""
        first = [pid for pid, cmd in known or [] if process_cmdline(pid) == cmd]
        kill_pids(first, grace_s=0, sig=signal.SIGKILL)
        rest = [pid for pid in self.node_pids(node_id) if pid not in first]
        if not first and not rest:
            raise RuntimeError(f"no process of node {node_id} found")
        kill_pids(rest, grace_s=0, sig=signal.SIGKILL)
        return first + rest


def weigh_like_the_cluster() -> None:
    """Give this process's CPU group LOCALCLUSTER_CPU_NICE when set, as own_cpu_group gives
    the cluster: a controller that must act at a moment of the cluster's work (a chaos
    run's kills) otherwise reacts seconds late on a loaded machine."""
    nice = os.environ.get("LOCALCLUSTER_CPU_NICE")
    if nice:
        with contextlib.suppress(OSError), open("/proc/self/autogroup", "w") as f:
            f.write(nice)


def own_cpu_group() -> None:
    """Start a process (the cluster's head; a rehearsal's S3 endpoint) in its own session,
    hence its own scheduler autogroup, weighted by LOCALCLUSTER_CPU_NICE (e.g. -10) when set. On a machine whose run queue is much longer
    than its cores, Ray's agents otherwise miss the raylet's fixed start-up deadline (about
    15 s) and every node start fails; a laptop needs none of this."""
    os.setsid()
    weigh_like_the_cluster()


def _raylet_crash(temp_dir: Path) -> str:
    """The fatal line of a head raylet that died while starting (e.g. its agents were too slow
    for its start-up deadline on a loaded machine), or ''."""
    log_file = temp_dir / "session_latest" / "logs" / "raylet.out"
    try:
        text = log_file.read_text(errors="replace")
    except OSError:
        return ""
    fatal = [line for line in text.splitlines() if "] (raylet)" in line and " C " in line[:40]]
    return f"the head raylet died: {fatal[0][-200:]}" if fatal else ""


def _merge(base: dict, extra: dict) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=["up", "down", "status"])
    parser.add_argument("--dir", default=str(DEFAULT_DIR), help="state, token and Ray temp dir")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="fake-provider cluster YAML")
    args = parser.parse_args(argv)
    cluster = LocalCluster(args.dir, args.config)
    if args.action == "up":
        info = cluster.up()
        print(f"local autoscaling cluster up (config {args.config})")
        print(f"  dashboard / jobs: {info.address}")
        print(f"  GCS:              {info.gcs_address}")
        print(f"  auth token:       {info.token_path}")
        print("to submit jobs from this shell:")
        for key, value in info.env().items():
            print(f"  export {key}={value}")
        print(
            f"  ray job submit --runtime-env-json '{local_runtime_env()}' -- python -m jobs.clean ..."
        )
        print(f"stop it with: make cluster-down  (or {Path(__file__).name} down --dir {args.dir})")
    elif args.action == "down":
        print(f"stopped {cluster.down()} processes of the cluster in {args.dir}")
    else:
        info = cluster.info()
        pids = cluster_pids(info.temp_dir) if info else []
        print(
            json.dumps(
                {"running": bool(pids), "processes": len(pids), **(asdict(info) if info else {})},
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
