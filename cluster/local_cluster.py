#!/usr/bin/env python3
"""A two-node Ray cluster on this machine, with token authentication, for trying the cluster path locally.

    python cluster/local_cluster.py start [--dir DIR] [--head-cpus 0] [--worker-cpus 2] [--no-dashboard]
    python cluster/local_cluster.py status [--dir DIR]
    python cluster/local_cluster.py env [--dir DIR]        # shell exports for clients (eval "$(...)")
    python cluster/local_cluster.py kill-worker [--dir DIR] # SIGKILL the worker node: a node failure
    python cluster/local_cluster.py stop [--dir DIR] [--keep-dir]

`start` runs a head node and one worker node, each a `ray start --block` process in its own process
group, both started with `--node-ip-address 127.0.0.1` (Ray publishes them under the machine's own
address and listens on every interface), each with its own `--temp-dir` under DIR. Token authentication is on
(RAY_AUTH_MODE=token): a fresh token is written to DIR/auth_token (mode 0600) and handed to both nodes
through RAY_AUTH_TOKEN_PATH. Clients need the same two variables (`env` prints them); a client without
them cannot connect. `start` waits until both nodes are alive (checked by a separate client process),
prints the addresses and records the pids in DIR/cluster.json. `stop` ends only those recorded process
groups (and the processes they started, found through /proc), then removes DIR.

The head has no CPUs by default (like the cloud configs: trials go to workers) and the worker advertises
the custom resource `local_worker` so work can be pinned to it. `kill-worker` SIGKILLs the worker node's
recorded processes (a node failure, to test fault tolerance). Importable: `start()`, `load()`, `stop()`,
`kill_node()`, `wait_for_nodes()`, `LocalCluster.client_env()`.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

STATE_FILE = "cluster.json"
TOKEN_FILE = "auth_token"
WORKER_RESOURCE = "local_worker"
# Ray keeps unix sockets under TEMP_DIR/session_<date>_<pid>/sockets/; Linux limits their paths to 107
# bytes, and the session part takes about 70 of them.
_MAX_TEMP_DIR_LEN = 36


def default_dir() -> Path:
    """$DISTIL_SEARCH_LOCAL_CLUSTER, else /tmp/distil-search-cluster (short, unlike some platforms' TMPDIR)."""
    if os.environ.get("DISTIL_SEARCH_LOCAL_CLUSTER"):
        return Path(os.environ["DISTIL_SEARCH_LOCAL_CLUSTER"])
    return Path("/tmp" if Path("/tmp").is_dir() else tempfile.gettempdir()) / "distil-search-cluster"


class ClusterError(RuntimeError):
    pass


# ----------------------------------------------------------------------------------------------- processes
def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (index 0 = state), or None if PID is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return raw[raw.rindex(")") + 2:].split()


def _start_time(pid: int) -> int | None:
    st = _stat(pid)
    return int(st[19]) if st else None  # field 22 of stat: start time in clock ticks since boot


def _alive(pid: int, start_time: int | None = None) -> bool:
    """PID runs (not a zombie) and, when start_time is given, is still the same process (no pid reuse)."""
    st = _stat(pid)
    if st is None or st[0] in ("Z", "X"):
        return False
    return start_time is None or int(st[19]) == start_time


def _cmdline(pid: int) -> list[str]:
    try:
        return [a for a in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0") if a]
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return []


def _group_and_descendants(pid: int) -> dict[int, int]:
    """{pid: start_time} of PID, every process in its process group and every descendant of it."""
    parents: dict[int, int] = {}
    found: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        st = _stat(int(entry.name))
        if st is None or st[0] in ("Z", "X"):
            continue
        child = int(entry.name)
        parents[child] = int(st[1])
        if int(st[2]) == pid:  # same process group (pgid == leader pid)
            found[child] = int(st[19])
    changed = True
    while changed:  # descendants that left the group (setsid) still have a parent chain to PID
        changed = False
        for child, parent in parents.items():
            if child not in found and (parent == pid or parent in found):
                st = _stat(child)
                if st is not None:
                    found[child] = int(st[19])
                    changed = True
    if _alive(pid):
        found[pid] = _start_time(pid)
    return found


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


# ------------------------------------------------------------------------------------------------- cluster
@dataclass
class Node:
    role: str  # head | worker
    pid: int
    start_time: int | None
    temp_dir: str
    log: str
    command: list[str]


@dataclass
class LocalCluster:
    root: str
    address: str  # GCS address: ray.init(address=...), ray start --address, distil-search --address
    client_address: str  # ray://127.0.0.1:PORT (Ray client)
    dashboard_url: str | None  # ray job submit --address ...
    token_path: str
    nodes: list[Node] = field(default_factory=list)
    _procs: dict = field(default_factory=dict, repr=False, compare=False)  # Popen objects of this process

    # -- what clients need
    def auth_env(self) -> dict[str, str]:
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": self.token_path}

    def client_env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """A copy of BASE (default os.environ) that connects to this cluster: token auth on, this token,
        RAY_ADDRESS set. RAY_AUTH_TOKEN is dropped because it would take precedence over the token file."""
        env = dict(os.environ if base is None else base)
        env.pop("RAY_AUTH_TOKEN", None)
        env.update(self.auth_env())
        env["RAY_ADDRESS"] = self.address
        return env

    def alive_pids(self) -> list[int]:
        return [n.pid for n in self.nodes if _alive(n.pid, n.start_time)]

    # -- persistence
    def save(self) -> None:
        data = {"root": self.root, "address": self.address, "client_address": self.client_address,
                "dashboard_url": self.dashboard_url, "token_path": self.token_path,
                "nodes": [asdict(n) for n in self.nodes]}
        path = Path(self.root) / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(path)

    @classmethod
    def from_file(cls, path: Path) -> LocalCluster:
        data = json.loads(path.read_text())
        data["nodes"] = [Node(**n) for n in data.get("nodes", [])]
        return cls(**data)

    def stop(self, keep_dir: bool = False, grace_s: float = 15.0) -> list[int]:
        return _stop_cluster(self, keep_dir=keep_dir, grace_s=grace_s)

    def node(self, role: str) -> Node:
        found = [n for n in self.nodes if n.role == role]
        if not found:
            raise ClusterError(f"no {role} node recorded in {self.root}")
        return found[0]

    def kill_node(self, role: str = "worker") -> list[int]:
        return _kill_node(self, self.node(role))


def _ray_start_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--disable-usage-stats", *args]


def _spawn(cluster: LocalCluster, role: str, args: list[str], env: dict[str, str]) -> Node:
    temp_dir = str(Path(cluster.root) / role)
    log = str(Path(cluster.root) / f"{role}.log")
    cmd = _ray_start_cmd(*args, "--temp-dir", temp_dir)
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True, cwd=cluster.root)
    node = Node(role=role, pid=proc.pid, start_time=_start_time(proc.pid), temp_dir=temp_dir, log=log, command=cmd)
    cluster.nodes.append(node)
    cluster._procs[proc.pid] = proc
    cluster.save()  # record the pid at once: stop() must find it even if start() fails later
    return node


def _tail(path: str, n: int = 25) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except FileNotFoundError:
        return "(no log)"


def _wait_for_head(cluster: LocalCluster, node: Node, timeout: float) -> None:
    address_file = Path(node.temp_dir) / "ray_current_cluster"  # written once the head's processes are up
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(node.pid, node.start_time):
            raise ClusterError(f"the head node exited while starting; {node.log}:\n{_tail(node.log)}")
        if address_file.exists() and address_file.read_text().strip():
            return
        time.sleep(0.2)
    raise ClusterError(f"the head node did not come up within {timeout:.0f}s; {node.log}:\n{_tail(node.log)}")


_PROBE = textwrap.dedent("""
    import json, sys, time
    import ray
    address, want, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    ray.init(address=address, log_to_driver=False, logging_level="ERROR", configure_logging=False)
    deadline = time.monotonic() + timeout
    while True:
        alive = [n for n in ray.nodes() if n["Alive"]]
        if len(alive) >= want or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    print("NODES=" + json.dumps([{"node_id": n["NodeID"], "ip": n["NodeManagerAddress"],
                                  "resources": n["Resources"]} for n in alive]), flush=True)
    ray.shutdown()
""")


def wait_for_nodes(cluster: LocalCluster, count: int = 2, timeout: float = 60.0) -> list[dict]:
    """Connect as a client (in a child process, so this process never initialises Ray) and wait until
    COUNT nodes are alive. Returns [{node_id, ip, resources}] of the alive nodes."""
    try:
        res = subprocess.run([sys.executable, "-c", _PROBE, cluster.address, str(count), str(timeout)],
                             env=cluster.client_env(), capture_output=True, text=True, timeout=timeout + 60,
                             cwd=cluster.root, check=False)
    except subprocess.TimeoutExpired as e:
        raise ClusterError(f"no answer from the cluster within {timeout + 60:.0f}s") from e
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("NODES=")]
    if res.returncode != 0 or not lines:
        raise ClusterError(f"could not connect to {cluster.address} (exit {res.returncode}):\n"
                           f"{res.stdout[-2000:]}\n{res.stderr[-3000:]}")
    nodes = json.loads(lines[-1][len("NODES="):])
    if len(nodes) < count:
        raise ClusterError(f"only {len(nodes)} of {count} nodes alive after {timeout:.0f}s; logs: "
                           + ", ".join(n.log for n in cluster.nodes))
    return nodes


def dashboard_available() -> bool:
    """Whether ray[default] (the dashboard and job submission server) is installed."""
    from ray._private.utils import get_dashboard_dependency_error

    return get_dashboard_dependency_error() is None


def start(root: str | Path | None = None, *, head_cpus: int = 0, worker_cpus: int = 2, worker_gpus: int = 0,
          worker_resources: dict[str, float] | None = None, object_store_mb: int = 128,
          dashboard: bool | None = None, timeout: float = 90.0) -> LocalCluster:
    """Start the head and one worker node on 127.0.0.1 under ROOT (created; default default_dir()) and wait
    until both are alive. On failure everything started so far is stopped again. DASHBOARD None: on when
    Ray's dashboard packages (ray[default]) are installed; the dashboard also serves `ray job submit`."""
    root = Path(root or default_dir()).expanduser().resolve()
    if len(str(root)) > _MAX_TEMP_DIR_LEN:
        raise ClusterError(f"{root}: too long a path for Ray's unix sockets (at most {_MAX_TEMP_DIR_LEN} "
                           f"characters); pick a shorter --dir such as /tmp/dsc")
    if (root / STATE_FILE).exists():
        old = LocalCluster.from_file(root / STATE_FILE)
        if old.alive_pids():
            raise ClusterError(f"a cluster from {root} is running (pids {old.alive_pids()}): "
                               f"stop it first (python cluster/local_cluster.py stop --dir {root})")
        shutil.rmtree(root)
    elif root.exists() and any(root.iterdir()):
        raise ClusterError(f"{root} exists and is not empty: pick another --dir")
    root.mkdir(parents=True, exist_ok=True, mode=0o700)

    token_path = root / TOKEN_FILE
    fd = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))  # what `ray get-auth-token --generate` writes: 256 random bits

    if dashboard is None:
        dashboard = dashboard_available()
    gcs, dash, client, head_agent, worker_agent = _free_ports(5)
    cluster = LocalCluster(root=str(root), address=f"127.0.0.1:{gcs}", client_address=f"ray://127.0.0.1:{client}",
                           dashboard_url=f"http://127.0.0.1:{dash}" if dashboard else None,
                           token_path=str(token_path))
    env = cluster.client_env()
    env.pop("RAY_ADDRESS")
    # Ray drains a node for up to 30 s on SIGTERM (for Serve); there is nothing to drain here.
    env.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "0")
    worker_resources = {WORKER_RESOURCE: 1, **(worker_resources or {})}
    store = str(object_store_mb * 1024 * 1024)
    try:
        head = _spawn(cluster, "head", [
            "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
            "--num-cpus", str(head_cpus), "--num-gpus", "0", "--object-store-memory", store,
            "--include-dashboard", str(dashboard).lower(), "--dashboard-host", "127.0.0.1",
            "--dashboard-port", str(dash), "--dashboard-agent-listen-port", str(head_agent),
            "--ray-client-server-port", str(client),
        ], env)
        _wait_for_head(cluster, head, timeout)
        _spawn(cluster, "worker", [
            "--address", cluster.address, "--node-ip-address", "127.0.0.1",
            "--num-cpus", str(worker_cpus), "--num-gpus", str(worker_gpus),
            "--resources", json.dumps(worker_resources), "--object-store-memory", store,
            "--dashboard-agent-listen-port", str(worker_agent),
        ], env)
        wait_for_nodes(cluster, 2, timeout)
    except BaseException:
        _stop_cluster(cluster, keep_dir=True)
        raise
    return cluster


def load(root: str | Path | None = None) -> LocalCluster:
    root = Path(root or default_dir()).expanduser().resolve()
    path = root / STATE_FILE
    if not path.exists():
        raise ClusterError(f"no local cluster recorded in {root} ({STATE_FILE} missing)")
    return LocalCluster.from_file(path)


def _is_our_node(node: Node) -> bool:
    """The recorded pid still runs the `ray start` we launched (same start time, our temp dir)."""
    if not _alive(node.pid, node.start_time):
        return False
    cmd = _cmdline(node.pid)
    return "start" in cmd and node.temp_dir in cmd


def _stop_cluster(cluster: LocalCluster, keep_dir: bool = False, grace_s: float = 15.0) -> list[int]:
    """SIGTERM each recorded `ray start --block` (it shuts its node's processes down), worker first; then
    SIGKILL whatever of their process groups and descendants is left. Only recorded pids (and processes
    they started) are signalled. Returns the pids that were running."""
    targets: dict[int, int] = {}
    for node in reversed(cluster.nodes):
        if _is_our_node(node):
            targets.update(_group_and_descendants(node.pid))
    for node in reversed(cluster.nodes):
        if _is_our_node(node):
            try:
                os.kill(node.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    _wait_gone(cluster, targets, grace_s)
    leftovers = {p: t for p, t in targets.items() if _alive(p, t)}
    _sigkill(cluster, [n.pid for n in cluster.nodes if n.pid in leftovers], leftovers, 5.0, "processes")
    if not keep_dir:
        shutil.rmtree(cluster.root, ignore_errors=True)
    return sorted(targets)


def _kill_node(cluster: LocalCluster, node: Node, timeout: float = 10.0) -> list[int]:
    """A node failure, as when its machine goes away: SIGKILL at once to the recorded `ray start` of NODE,
    its process group and every process it started (raylet, agents, the workers running tasks and actors),
    with no shutdown. Nothing else is signalled; the other node and the GCS notice the loss themselves.
    Returns the pids that were killed."""
    if not _is_our_node(node):
        return []
    targets = _group_and_descendants(node.pid)  # collected first: killed children are re-parented to init
    _sigkill(cluster, [node.pid], targets, timeout, f"processes of the {node.role} node")
    return sorted(targets)


def _wait_gone(cluster: LocalCluster, targets: dict[int, int], timeout: float) -> None:
    """Wait up to TIMEOUT seconds for every target (pid -> start time) to exit, reaping our children."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(p, t) for p, t in targets.items()):
        _reap(cluster)
        time.sleep(0.1)


def _sigkill(cluster: LocalCluster, leaders: list[int], targets: dict[int, int], timeout: float, what: str) -> None:
    """SIGKILL the process groups the recorded leaders created, then any target still alive (pid -> start
    time, so a reused pid is never signalled); wait for them all, or raise naming them."""
    for leader in leaders:
        try:
            os.killpg(leader, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    for pid, t in targets.items():
        if _alive(pid, t):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    _wait_gone(cluster, targets, timeout)
    _reap(cluster)
    still = sorted(p for p, t in targets.items() if _alive(p, t))
    if still:
        raise ClusterError(f"{what} still running after SIGKILL: {still}")


def kill_node(root: str | Path | None = None, role: str = "worker") -> list[int]:
    return load(root).kill_node(role)


def _reap(cluster: LocalCluster) -> None:
    for proc in cluster._procs.values():  # children of this process: collect them so no zombie remains
        proc.poll()


def stop(root: str | Path | None = None, keep_dir: bool = False) -> list[int]:
    return load(root).stop(keep_dir=keep_dir)


# ----------------------------------------------------------------------------------------------------- CLI
def _exports(cluster: LocalCluster) -> str:
    env = {**cluster.auth_env(), "RAY_ADDRESS": cluster.address}
    return "\n".join(f"export {k}={v}" for k, v in env.items()) + "\nunset RAY_AUTH_TOKEN"


def _describe(cluster: LocalCluster) -> str:
    lines = [f"Ray cluster (head + worker on this machine, token auth on) in {cluster.root}",
             f"  address:        {cluster.address}",
             f"  Ray client:     {cluster.client_address}"]
    if cluster.dashboard_url:
        lines.append(f"  dashboard/jobs: {cluster.dashboard_url}")
    lines += [f"  token file:     {cluster.token_path}",
              "  pids:           " + ", ".join(f"{n.role} {n.pid}" for n in cluster.nodes),
              "Clients need the token; in a shell:",
              f"  eval \"$(python {Path(__file__).as_posix()} env --dir {cluster.root})\"",
              "  distil-search run quickstart --address $RAY_ADDRESS --storage /tmp/exp --cache-dir /tmp/cache",
              f"Stop it: python {Path(__file__).as_posix()} stop --dir {cluster.root}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="local_cluster.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_start = sub.add_parser("start", help="start the head and one worker node and wait until both are alive")
    p_start.add_argument("--head-cpus", type=int, default=0, help="CPUs the head offers to tasks (default 0)")
    p_start.add_argument("--worker-cpus", type=int, default=2, help="CPUs of the worker node (default 2)")
    p_start.add_argument("--worker-gpus", type=int, default=0)
    p_start.add_argument("--worker-resource", action="append", default=[], metavar="NAME=N",
                         help=f"extra custom resource of the worker (it always has {WORKER_RESOURCE}=1)")
    p_start.add_argument("--object-store-mb", type=int, default=128, help="object store per node (default 128)")
    dash = p_start.add_mutually_exclusive_group()
    dash.add_argument("--dashboard", dest="dashboard", action="store_true", default=None,
                      help="start the dashboard, which serves `ray job submit` (needs ray[default]; "
                           "default: when ray[default] is installed)")
    dash.add_argument("--no-dashboard", dest="dashboard", action="store_false")
    p_start.add_argument("--timeout", type=float, default=90.0, help="seconds to wait for the nodes")
    p_start.add_argument("--json", action="store_true", help="print the recorded state as JSON")
    for name, text in (("status", "show the recorded cluster and whether its pids run"),
                       ("env", "print shell exports that let a client connect"),
                       ("kill-worker", "SIGKILL the worker node's recorded processes (a node failure)"),
                       ("stop", "stop the recorded processes and remove the folder")):
        sub.add_parser(name, help=text)
    for p in sub.choices.values():
        p.add_argument("--dir", default=None, help=f"cluster folder (default {default_dir()}; "
                                                   f"at most {_MAX_TEMP_DIR_LEN} characters)")
    sub.choices["stop"].add_argument("--keep-dir", action="store_true", help="keep the folder (logs)")
    args = parser.parse_args(argv)
    try:
        if args.command == "start":
            extra = {}
            for item in args.worker_resource:
                name, _, value = item.partition("=")
                extra[name] = float(value or 1)
            cluster = start(args.dir, head_cpus=args.head_cpus, worker_cpus=args.worker_cpus,
                            worker_gpus=args.worker_gpus, worker_resources=extra,
                            object_store_mb=args.object_store_mb, dashboard=args.dashboard,
                            timeout=args.timeout)
            print(Path(cluster.root, STATE_FILE).read_text() if args.json else _describe(cluster))
        elif args.command == "status":
            cluster = load(args.dir)
            print(_describe(cluster))
            for node in cluster.nodes:
                print(f"  {node.role}: pid {node.pid} {'running' if _is_our_node(node) else 'gone'}")
        elif args.command == "env":
            print(_exports(load(args.dir)))
        elif args.command == "kill-worker":
            pids = kill_node(args.dir, "worker")
            print(f"killed {len(pids)} processes of the worker node: {' '.join(map(str, pids))}" if pids
                  else "the worker node was not running")
        elif args.command == "stop":
            pids = stop(args.dir, keep_dir=args.keep_dir)
            print(f"stopped {len(pids)} processes: {' '.join(map(str, pids))}" if pids else "nothing was running")
    except ClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
