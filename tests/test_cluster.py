"""cluster/: the launcher configs pass Ray's own validation (and a broken copy does not), the KubeRay
manifests have what a GPU search with token authentication and experiments in a bucket (S3 / GCS) needs,
and cluster/local_cluster.py starts
and stops a real two-node Ray cluster with token authentication (slow). Nothing here initialises Ray in
the pytest process: the cluster test talks to Ray from child processes only."""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
LAUNCHER_CONFIGS = sorted(CLUSTER.glob("*.yaml"))
KUBERAY = CLUSTER / "kuberay"
LOCAL_CLUSTER = CLUSTER / "local_cluster.py"
SHARED = "/mnt/distil"  # where the optional shared file system for the cache is mounted
BUCKETS = ("s3://", "gs://")  # experiments (--storage) live on object storage
BUCKET_OF = {"aws": "s3://", "gcp": "gs://"}
TOKEN_SECRET = "distil-search-ray-token"
SERVICE_ACCOUNT = "distil-search"  # the KubeRay pods' identity for the bucket


def _load_local_cluster():
    spec = importlib.util.spec_from_file_location("local_cluster", LOCAL_CLUSTER)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("local_cluster", module)
    spec.loader.exec_module(module)
    return module


lc = _load_local_cluster()


# ------------------------------------------------------------------------------ cluster launcher configs
def ray_up_checks(config: dict) -> dict:
    """What `ray up` does to a config before it talks to the cloud: fill in the provider's defaults
    (prepare_config), then Ray's schema and consistency checks (validate_config)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_there_are_aws_and_gcp_configs():
    assert {p.name for p in LAUNCHER_CONFIGS} >= {"aws.yaml", "gcp.yaml"}


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_launcher_config_passes_ray_validation(path):
    raw = yaml.safe_load(path.read_text())
    cfg = ray_up_checks(raw)
    assert cfg["provider"]["type"] == path.stem

    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "the head offers no CPU: trials must land on workers"
    gpu_types = [t for name, t in types.items()
                 if name != cfg["head_node_type"] and t["resources"].get("GPU", 0) >= 1 and t["max_workers"] > 0]
    assert gpu_types, "a worker node type with a GPU"

    # token authentication: the token file reaches every node and every `ray start` runs in token mode
    assert cfg["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in cfg[key] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token" in c for c in starts), key
    # every node installs this package (setup_commands are merged into head and worker setup)
    for key in ("head_setup_commands", "worker_setup_commands"):
        assert any("pip install" in c and "distil-search" in c for c in cfg[key]), key
        # experiments in the cloud's bucket by default (DISTIL_SEARCH_STORAGE, every distil-search command)
        assert any(f"DISTIL_SEARCH_STORAGE={BUCKET_OF[path.stem]}" in c for c in cfg[key]), key
    # every node reaches the bucket with a cloud identity of its own: the driver uploads the caches, trials
    # write checkpoints and download the caches (on GCP the head gets Ray's default service account)
    for name, node in types.items():
        config = node["node_config"]
        if path.stem == "aws":
            assert config.get("IamInstanceProfile", {}).get("Arn"), f"{name}: an instance profile for S3"
        elif name != cfg["head_node_type"]:
            scopes = [s for account in config.get("serviceAccounts", []) for s in account.get("scopes", [])]
            assert any(s.endswith("/cloud-platform") for s in scopes), f"{name}: a service account for GCS"
    # file mounts with a local path relative to the repository root (where `ray up` runs) exist
    for remote, local in cfg["file_mounts"].items():
        if not local.startswith("~"):
            assert (ROOT / local).exists(), f"file mount {remote}: {local} missing"
    assert (ROOT / "spaces").is_dir() and any(v.rstrip("/").endswith("spaces") for v in cfg["file_mounts"].values())


def _drop_gpu_resources(cfg):
    worker = next(n for n in cfg["available_node_types"] if n != cfg["head_node_type"])
    del cfg["available_node_types"][worker]["resources"]


def _drop_provider(cfg):
    del cfg["provider"]


def _drop_node_config(cfg):
    del cfg["available_node_types"][cfg["head_node_type"]]["node_config"]


def _typo_key(cfg):
    cfg["setup_comands"] = cfg.pop("setup_commands")


def _unknown_head_type(cfg):
    cfg["head_node_type"] = "no-such-type"


def _min_workers_over_max(cfg):
    worker = next(n for n in cfg["available_node_types"] if n != cfg["head_node_type"])
    cfg["available_node_types"][worker]["min_workers"] = cfg["max_workers"] + 1


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
@pytest.mark.parametrize("breakage, error, match", [
    (_drop_gpu_resources, jsonschema.ValidationError, "'resources' is a required property"),
    (_drop_node_config, jsonschema.ValidationError, "'node_config' is a required property"),
    (_typo_key, jsonschema.ValidationError, "'setup_comands' was unexpected"),
    (_unknown_head_type, ValueError, "must be one of `available_node_types`"),
    (_min_workers_over_max, ValueError, "smaller than the sum of `min_workers`"),
], ids=["no-worker-resources", "no-node-config", "typo-key", "unknown-head-type", "min-over-max"])
def test_launcher_validation_rejects_a_broken_copy(path, breakage, error, match):
    cfg = yaml.safe_load(path.read_text())
    breakage(cfg)
    with pytest.raises(error, match=re.escape(match)):
        ray_up_checks(cfg)


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_launcher_schema_requires_provider(path):
    from ray.autoscaler._private.util import validate_config

    cfg = yaml.safe_load(path.read_text())
    _drop_provider(cfg)
    with pytest.raises(jsonschema.ValidationError, match="'provider' is a required property"):
        validate_config(cfg)


# ------------------------------------------------------------------------------------ KubeRay manifests
def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((KUBERAY / name).read_text()) if d]


def _one(name: str, kind: str) -> dict:
    found = [d for d in _docs(name) if d.get("kind") == kind]
    assert len(found) == 1, f"{name}: one {kind}"
    return found[0]


def _pvc_name() -> str:
    """The optional shared volume for the cache."""
    pvc = _one("storage.yaml", "PersistentVolumeClaim")
    assert pvc["apiVersion"] == "v1" and "ReadWriteMany" in pvc["spec"]["accessModes"]
    return pvc["metadata"]["name"]


def test_kuberay_service_account_binds_a_cloud_identity():
    sa = _one("serviceaccount.yaml", "ServiceAccount")
    assert sa["apiVersion"] == "v1" and sa["metadata"]["name"] == SERVICE_ACCOUNT
    assert {"eks.amazonaws.com/role-arn", "iam.gke.io/gcp-service-account"} & set(sa["metadata"]["annotations"])


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def _assert_token_auth(env: dict[str, dict], where: str):
    assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{where}: RAY_AUTH_MODE=token"
    ref = env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef", {})
    assert ref == {"name": TOKEN_SECRET, "key": "auth_token"}, f"{where}: RAY_AUTH_TOKEN from the Secret"


def _assert_ray_pod(template: dict, where: str, pvc: str) -> dict:
    """Token auth on every container; /tmp/ray on a volume; the bucket: the pod's identity and the default
    --storage; the shared volume, if mounted, is the claim. Returns the Ray container."""
    spec = template["spec"]
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    assert spec["containers"], where
    for c in spec["containers"]:
        _assert_token_auth(_env(c), f"{where}/{c['name']}")
    ray = spec["containers"][0]
    mounts = {m["mountPath"]: m["name"] for m in ray.get("volumeMounts", [])}
    assert "/tmp/ray" in mounts, f"{where}: /tmp/ray on a volume"
    tmp = volumes[mounts["/tmp/ray"]]
    assert "emptyDir" in tmp or "persistentVolumeClaim" in tmp, where
    assert spec.get("serviceAccountName") == SERVICE_ACCOUNT, f"{where}: runs as {SERVICE_ACCOUNT} (the bucket)"
    storage = _env(ray).get("DISTIL_SEARCH_STORAGE", {}).get("value", "")
    assert storage.startswith(BUCKETS), f"{where}: DISTIL_SEARCH_STORAGE {storage!r} is not a bucket"
    if SHARED in mounts:  # optional: a shared cache
        assert volumes[mounts[SHARED]].get("persistentVolumeClaim", {}).get("claimName") == pvc, where
    return ray


def _assert_cluster_spec(spec: dict, where: str, pvc: str):
    assert re.fullmatch(r"\d+\.\d+\.\d+", spec["rayVersion"]), f"{where}: rayVersion"
    head = spec["headGroupSpec"]
    assert str(head["rayStartParams"].get("num-cpus")) == "0", f"{where}: head offers no CPU"
    _assert_ray_pod(head["template"], f"{where}/head", pvc)
    if spec.get("enableInTreeAutoscaling"):
        autoscaler_env = spec.get("autoscalerOptions", {}).get("env", [])
        _assert_token_auth({e["name"]: e for e in autoscaler_env}, f"{where}/autoscaler")
    groups = spec["workerGroupSpecs"]
    assert groups, where
    gpu_groups = 0
    for g in groups:
        assert g["groupName"] and g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]
        ray = _assert_ray_pod(g["template"], f"{where}/{g['groupName']}", pvc)
        limits = ray.get("resources", {}).get("limits", {})
        gpu_groups += int(limits.get("nvidia.com/gpu", 0)) >= 1
    assert gpu_groups, f"{where}: a worker group with an nvidia.com/gpu limit"


def test_kuberay_raycluster():
    rc = _one("raycluster.yaml", "RayCluster")
    assert rc["apiVersion"] == "ray.io/v1"
    _assert_cluster_spec(rc["spec"], "RayCluster", _pvc_name())


def test_kuberay_rayjob_runs_a_search_on_a_bucket():
    job = _one("rayjob.yaml", "RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    _assert_cluster_spec(spec["rayClusterSpec"], "RayJob", _pvc_name())
    for c in spec["submitterPodTemplate"]["spec"]["containers"]:
        _assert_token_auth(_env(c), f"submitter/{c['name']}")
    auth = spec["rayClusterSpec"].get("authOptions")
    if auth:  # the operator follows the job through the job server: it must use the same token
        assert auth["mode"] == "token" and auth.get("secretName", TOKEN_SECRET) == TOKEN_SECRET

    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["distil-search", "run"]
    from search.cli import build_parser  # light: no Ray, no torch

    args = build_parser().parse_args(argv[1:])
    assert args.storage.startswith(BUCKETS) and (args.cache_dir is None or args.cache_dir.startswith(SHARED))
    assert Path(args.space).exists() or (ROOT / "spaces" / f"{args.space}.yaml").is_file()


def _no_auth_mode_on_worker(m):
    group = m["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    group["env"] = [e for e in group["env"] if e["name"] != "RAY_AUTH_MODE"]


def _token_literal_on_head(m):
    env = m["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    next(e for e in env if e["name"] == "RAY_AUTH_TOKEN").update(value="hard-coded", valueFrom={})


def _no_gpu_limit(m):
    m["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"].pop("nvidia.com/gpu")


def _no_tmp_ray_volume(m):
    c = m["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    c["volumeMounts"] = [v for v in c["volumeMounts"] if v["mountPath"] != "/tmp/ray"]


def _head_offers_cpus(m):
    m["spec"]["headGroupSpec"]["rayStartParams"].pop("num-cpus")


def _autoscaler_without_token(m):
    m["spec"]["autoscalerOptions"].pop("env")


def _worker_without_service_account(m):
    m["spec"]["workerGroupSpecs"][0]["template"]["spec"].pop("serviceAccountName")


def _storage_on_a_local_path(m):
    env = m["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    next(e for e in env if e["name"] == "DISTIL_SEARCH_STORAGE")["value"] = "/tmp/experiments"


@pytest.mark.parametrize("breakage", [_no_auth_mode_on_worker, _token_literal_on_head, _no_gpu_limit,
                                      _no_tmp_ray_volume, _head_offers_cpus, _autoscaler_without_token,
                                      _worker_without_service_account, _storage_on_a_local_path],
                         ids=lambda f: f.__name__.lstrip("_"))
def test_kuberay_checks_catch_a_broken_copy(breakage):
    rc = copy.deepcopy(_one("raycluster.yaml", "RayCluster"))
    breakage(rc)
    with pytest.raises(AssertionError):
        _assert_cluster_spec(rc["spec"], "RayCluster", _pvc_name())


def test_one_ray_version_everywhere():
    versions = {_one("raycluster.yaml", "RayCluster")["spec"]["rayVersion"],
                _one("rayjob.yaml", "RayJob")["spec"]["rayClusterSpec"]["rayVersion"]}
    versions |= set(re.findall(r"^FROM rayproject/ray:(\d+\.\d+\.\d+)", (CLUSTER / "Dockerfile").read_text(), re.MULTILINE))
    for path in LAUNCHER_CONFIGS:
        versions |= set(re.findall(r"ray\[default\]==(\d+\.\d+\.\d+)", path.read_text()))
    assert len(versions) == 1, versions


# ------------------------------------------------------------------------ the documented commands parse
_SUBCOMMANDS = "run|resume|status|tensorboard|export|report|train"


def _documented_commands() -> list[tuple[str, str]]:
    """(file, command) for every `distil-search SUBCOMMAND ...` in the README's shell blocks and in the
    configs' comments, continuation lines joined and shell comments dropped."""
    found = []
    readme = (CLUSTER / "README.md").read_text()
    texts = [("README.md", block) for block in re.findall(r"```bash\n(.*?)```", readme, re.DOTALL)]
    texts += [(p.name, "\n".join(ln.lstrip("# ") for ln in p.read_text().splitlines() if ln.startswith("#")))
              for p in [*LAUNCHER_CONFIGS, *sorted(KUBERAY.glob("*.yaml"))]]
    for name, text in texts:
        text = re.sub(r"\\\n\s*", " ", text)
        for line in text.splitlines():
            line = re.sub(r"\s#.*$", "", line)
            for m in re.finditer(rf"(?<![\w/.-])distil-search (?:{_SUBCOMMANDS})\b[^'&|;]*", line):
                found.append((name, m.group(0).strip()))
    return found


def test_documented_commands_parse():
    from search.cli import build_parser

    commands = _documented_commands()
    assert {c.split()[1] for _, c in commands} >= {"run", "status", "tensorboard", "export"}
    for name, command in commands:
        argv = shlex.split(command)[1:]
        try:
            args = build_parser().parse_args(argv)
        except SystemExit:
            pytest.fail(f"{name}: `{command}` does not parse")
        if "$RAY_ADDRESS" in command:  # the local cluster: every node sees this machine's disk
            continue
        assert (args.storage or "").startswith(BUCKETS), f"{name}: `{command}`: --storage in a bucket"
        if getattr(args, "cache_dir", None):  # optional: a cache on the shared file system
            assert args.cache_dir.startswith(SHARED), f"{name}: `{command}`: --cache-dir on shared storage"


# ------------------------------------------------------------------------------ local_cluster.py (no Ray)
def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(LOCAL_CLUSTER), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, check=False)


def test_local_cluster_refuses_a_dir_too_long_for_rays_sockets(tmp_path):
    long_dir = tmp_path / ("x" * 40)
    res = _cli("start", "--dir", str(long_dir))
    assert res.returncode == 1 and "too long" in res.stderr
    assert not long_dir.exists()


def test_local_cluster_env_and_stop_of_a_recorded_cluster_that_is_gone(tmp_path):
    root = tmp_path / "c"
    root.mkdir()
    state = lc.LocalCluster(root=str(root), address="127.0.0.1:1", client_address="ray://127.0.0.1:2",
                            dashboard_url=None, token_path=str(root / "auth_token"),
                            nodes=[lc.Node(role="head", pid=2 ** 22 + 1, start_time=1, temp_dir=str(root / "head"),
                                           log=str(root / "head.log"), command=["ray", "start"])])
    state.save()
    env = _cli("env", "--dir", str(root))
    assert env.returncode == 0
    assert "export RAY_AUTH_MODE=token" in env.stdout and f"export RAY_AUTH_TOKEN_PATH={root}/auth_token" in env.stdout
    stop = _cli("stop", "--dir", str(root))
    assert stop.returncode == 0 and "nothing was running" in stop.stdout
    assert not root.exists()


# --------------------------------------------------------------------------- local_cluster.py (real Ray)
PROBE = textwrap.dedent("""
    import json, sys
    import ray
    ray.init(address=sys.argv[1], log_to_driver=False, logging_level="ERROR")

    @ray.remote(num_cpus=1, resources={"local_worker": 1})
    def where():
        return ray.get_runtime_context().get_node_id()

    nodes = [n for n in ray.nodes() if n["Alive"]]
    print("RESULT=" + json.dumps({"nodes": [{"id": n["NodeID"], "resources": n["Resources"]} for n in nodes],
                                  "task_node": ray.get(where.remote(), timeout=60)}))
    ray.shutdown()
""")


def _client_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(extra)
    return env


@pytest.mark.slow
def test_local_two_node_cluster_with_token_auth():
    """About 20 s on an idle 2-core machine (start ~9 s, two client probes, stop ~2 s)."""
    root = Path(tempfile.mkdtemp(prefix="dsc-", dir="/tmp"))  # short: Ray's unix socket paths are limited
    state = None
    try:
        res = _cli("start", "--dir", str(root), "--head-cpus", "0", "--worker-cpus", "1", "--no-dashboard",
                   "--timeout", "60")
        assert res.returncode == 0, res.stdout + res.stderr
        state = json.loads((root / lc.STATE_FILE).read_text())
        assert state["address"] in res.stdout
        assert [n["role"] for n in state["nodes"]] == ["head", "worker"]
        token = Path(state["token_path"])
        assert token.parent == root and oct(token.stat().st_mode & 0o777) == "0o600" and len(token.read_text()) == 64
        started = {}
        for n in state["nodes"]:
            assert lc._alive(n["pid"], n["start_time"])
            started.update(lc._group_and_descendants(n["pid"]))

        # a client with the token: two alive nodes; the head offers no CPU; work pinned to the worker runs there
        ok = subprocess.run([sys.executable, "-c", PROBE, state["address"]], capture_output=True, text=True,
                            timeout=120, cwd=root, check=False,
                            env=_client_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=state["token_path"]))
        lines = [ln for ln in ok.stdout.splitlines() if ln.startswith("RESULT=")]
        assert ok.returncode == 0 and lines, ok.stdout + ok.stderr
        result = json.loads(lines[-1][len("RESULT="):])
        assert len(result["nodes"]) == 2
        worker = [n for n in result["nodes"] if n["resources"].get("local_worker")]
        head = [n for n in result["nodes"] if not n["resources"].get("local_worker")]
        assert len(worker) == 1 and len(head) == 1
        assert head[0]["resources"].get("CPU", 0) == 0 and worker[0]["resources"]["CPU"] == 1
        assert result["task_node"] == worker[0]["id"]

        # a client with a wrong token is turned away (2 connection attempts instead of 20)
        bad = subprocess.run([sys.executable, "-c", PROBE, state["address"]], capture_output=True, text=True,
                             timeout=120, cwd=root, check=False,
                             env=_client_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64,
                                             RAY_NUM_REDIS_GET_RETRIES="2"))
        assert bad.returncode != 0 and "RESULT=" not in bad.stdout
        assert re.search(r"Unauthenticated|InvalidAuthToken|[Aa]uthentication", bad.stdout + bad.stderr)

        for n in state["nodes"]:  # again: the probes made Ray start worker processes
            started.update(lc._group_and_descendants(n["pid"]))
        stop = _cli("stop", "--dir", str(root))
        assert stop.returncode == 0, stop.stdout + stop.stderr
        assert not [p for p, t in started.items() if lc._alive(p, t)], "processes left after stop"
        assert not root.exists()
        state = None
    finally:
        if state is not None and root.exists():  # a failed assertion above: stop what was recorded
            with contextlib.suppress(lc.ClusterError, OSError):
                lc.stop(root)
        shutil.rmtree(root, ignore_errors=True)
