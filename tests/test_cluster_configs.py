"""Static checks of cluster/: the AWS launcher config, the KubeRay manifests and the image.

Fast and offline: no cloud, no Kubernetes, no Ray cluster. The launcher config is validated with
Ray's own schema (and Ray's own config preparation), the rest against the conventions that keep
the clusters safe (token auth, no secrets, loopback dashboard, GPU types scaling from zero) and in
step with the project (pinned versions equal the committed uv.lock, entrypoints name real modules).
"""

from __future__ import annotations

import copy
import importlib.resources
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
CLUSTER = REPO_ROOT / "cluster"
AWS_YAML = CLUSTER / "aws.yaml"
KUBERAY = CLUSTER / "kuberay"
DOCKERFILE = KUBERAY / "Dockerfile"
RAYJOBS = {"rayjob-clean.yaml": "jobs.clean", "rayjob-train.yaml": "jobs.train"}

# Packages whose versions the cluster must pin to what the project is tested with.
REQUIRED_PINS = {
    "ray",
    "torch",
    "torchvision",
    "open-clip-torch",
    "webdataset",
    "scikit-learn",
    "boto3",
    "pyarrow",
}
GPU_INSTANCE = re.compile(r"^(g\d|p\d)")  # g4dn, g5, g6, p3, p4d, p5, ...
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}

# Secret-looking text that must never appear under cluster/.
SECRET_PATTERNS = {
    "AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "AWS key variable": re.compile(r"(?i)aws_(secret_access_key|access_key_id|session_token)"),
    "private key block": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    # A literal token: RAY_AUTH_TOKEN=<value> or RAY_AUTH_TOKEN: <value>, unless the value is a
    # shell expansion ($(...), ${...}, $VAR), quoted or not.
    "literal Ray token": re.compile(r"RAY_AUTH_TOKEN[ \t]*[=:][ \t]*(?![\"']?\$)[\"']?[^\s\"'$]+"),
}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins_in(text: str) -> dict[str, str]:
    """`name[extras]==version` requirements in shell text -> {normalized name: version}."""
    pins = {}
    for word in shlex.split(text, comments=False, posix=True):
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==([^\s;]+)", word)
        if match:
            pins[normalize(match.group(1))] = match.group(3)
    return pins


@pytest.fixture(scope="module")
def aws() -> dict:
    return yaml.safe_load(AWS_YAML.read_text())


@pytest.fixture(scope="module")
def manifests() -> dict[str, list[dict]]:
    out = {}
    for path in sorted(KUBERAY.glob("*.yaml")):
        out[path.name] = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    return out


def one(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def start_commands(aws: dict) -> list[str]:
    return aws["head_start_ray_commands"] + aws["worker_start_ray_commands"]


# --------------------------------------------------------------------------------------------
# cluster/aws.yaml: Ray's schema and config preparation
# --------------------------------------------------------------------------------------------


def ray_launcher_schema() -> dict:
    """The JSON schema `ray up` validates against, from the installed Ray package."""
    return json.loads((importlib.resources.files("ray.autoscaler") / "ray-schema.json").read_text())


def test_aws_yaml_validates_against_rays_launcher_schema(aws):
    jsonschema.validate(aws, ray_launcher_schema())


def test_schema_check_is_not_vacuous(aws):
    """The schema rejects a misspelt top-level key and a fractional resource count."""
    schema = ray_launcher_schema()
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**aws, "max_worker": 3}, schema)
    fractional = copy.deepcopy(aws)
    for node_type in fractional["available_node_types"].values():
        node_type["resources"]["CPU"] = 0.5
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(fractional, schema)


def test_aws_yaml_passes_rays_config_preparation(aws):
    """What `ray up` does before touching AWS: merge the AWS defaults, validate, fill limits."""
    # A private API of the pinned Ray: if a Ray upgrade moves it, this test says so.
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(aws))
    validate_config(prepared)
    types = prepared["available_node_types"]
    assert prepared["head_node_type"] in types
    assert sum(t["min_workers"] for t in types.values()) <= prepared["max_workers"]
    # Setup commands are merged into the head/worker lists, in order.
    assert prepared["head_setup_commands"][: len(aws["setup_commands"])] == aws["setup_commands"]
    assert prepared["provider"]["cache_stopped_nodes"] is False


def test_head_is_cpu_only_and_takes_no_workers(aws):
    head = aws["available_node_types"][aws["head_node_type"]]
    assert head["min_workers"] == 0 and head["max_workers"] == 0
    assert "CPU" in head["resources"], "declare the head's CPU resource explicitly"
    assert head["resources"].get("GPU", 0) == 0
    assert not GPU_INSTANCE.match(head["node_config"]["InstanceType"])


def test_gpu_worker_types_scale_from_zero_and_declare_gpus(aws):
    workers = {
        name: t for name, t in aws["available_node_types"].items() if name != aws["head_node_type"]
    }
    gpu_types = {
        name: t
        for name, t in workers.items()
        if GPU_INSTANCE.match(t["node_config"]["InstanceType"])
    }
    assert len(gpu_types) >= 2, "expected A10G and A100-class GPU worker types"
    for name, node_type in workers.items():
        assert node_type.get("min_workers") == 0, f"{name}: min_workers must be 0"
        assert 0 < node_type.get("max_workers", 0) <= aws["max_workers"], name
    for name, node_type in gpu_types.items():
        # Declared, so the autoscaler can plan GPU nodes while none is running.
        assert node_type["resources"].get("GPU", 0) >= 1, f"{name}: declare resources.GPU"
        assert node_type["resources"].get("CPU", 0) >= 1, f"{name}: declare resources.CPU"


def test_every_node_type_has_an_instance_profile_and_a_real_ami(aws):
    arn = re.compile(r"^arn:aws:iam::[^:]+:instance-profile/[\w+=,.@/-]+$")
    for name, node_type in aws["available_node_types"].items():
        config = node_type["node_config"]
        profile = config.get("IamInstanceProfile")
        assert isinstance(profile, dict) and arn.match(profile.get("Arn", "")), (
            f"{name}: node_config.IamInstanceProfile.Arn (S3 through the instance role)"
        )
        # Empty or "latest_dlami" makes Ray substitute its 2021 Ubuntu 18.04 DLAMI.
        assert config.get("ImageId", "") not in ("", "latest_dlami"), f"{name}: set ImageId"


def test_auth_has_user_and_no_key_material(aws):
    assert aws["auth"]["ssh_user"] == "ubuntu"
    assert "ssh_private_key" not in aws["auth"] and "ssh_public_key" not in aws["auth"]


def test_file_mounts_exist_and_carry_the_installable_project(aws):
    mounts = aws["file_mounts"]
    for remote, local in mounts.items():
        assert (REPO_ROOT / local).exists(), f"file_mounts {remote}: {local} does not exist"
        assert Path(local).parts[:1] not in ((".venv",), ("data",), ("runs",)), local
    assert "." not in {str(Path(v)) for v in mounts.values()}, (
        "Ray hashes every file under a mounted directory on each `ray up`; do not mount the repo root"
    )
    targets = {str(Path(remote).parent) for remote in mounts} | set(mounts)
    assert "~/clipcleaner" in targets
    text = (REPO_ROOT / "pyproject.toml").read_text()
    include = re.search(r"include\s*=\s*\[([^\]]*)\]", text)
    assert include, "pyproject.toml: [tool.setuptools.packages.find] include"
    packages = {
        p.strip().strip("\"'").rstrip("*") for p in include.group(1).split(",") if p.strip()
    }
    mounted = {Path(remote).name for remote in mounts}
    assert {"pyproject.toml", "README.md"} <= mounted
    assert packages <= mounted, f"packages not mounted: {packages - mounted}"
    assert any("pip install" in c and "~/clipcleaner" in c for c in aws["setup_commands"])


# --------------------------------------------------------------------------------------------
# Token auth, dashboard, usage stats
# --------------------------------------------------------------------------------------------


def test_every_ray_start_enables_token_auth_from_ssm(aws):
    region = aws["provider"]["region"]
    starts = [c for c in start_commands(aws) if "ray start" in c]
    assert len(starts) == 2, "one head and one worker `ray start`"
    parameters = set()
    for command in starts:
        # Each list item runs in its own shell: mode, token and `ray start` share one item.
        assert "export RAY_AUTH_MODE=token" in command, command
        token = re.search(r'export RAY_AUTH_TOKEN="\$\((aws ssm get-parameter[^)]*)\)"', command)
        assert token, f"RAY_AUTH_TOKEN must come from SSM at start time: {command}"
        ssm = token.group(1)
        assert "--with-decryption" in ssm
        assert f"--region {region}" in ssm, "the SSM region must be provider.region"
        parameters.add(re.search(r"--name (\S+)", ssm).group(1))
        assert 'test -n "$RAY_AUTH_TOKEN"' in command, "fail the start when no token was read"
        assert command.index("RAY_AUTH_TOKEN") < command.index("ray start")
        assert "--disable-usage-stats" in command
    assert len(parameters) == 1, f"head and workers read different parameters: {parameters}"
    assert parameters.pop() in (CLUSTER / "README.md").read_text()


def test_dashboard_binds_to_loopback(aws):
    head = [c for c in aws["head_start_ray_commands"] if "ray start" in c]
    assert len(head) == 1 and "--head" in head[0]
    assert re.search(r"--dashboard-host[= ]127\.0\.0\.1\b", head[0])
    for command in start_commands(aws):
        assert "0.0.0.0" not in command


def test_no_secrets_anywhere_in_cluster_folder():
    offenders = []
    for path in sorted(p for p in CLUSTER.rglob("*") if p.is_file()):
        text = path.read_text(errors="replace")
        for what, pattern in SECRET_PATTERNS.items():
            for match in pattern.finditer(text):
                offenders.append(f"{path.relative_to(REPO_ROOT)}: {what}: {match.group(0)!r}")
    assert not offenders, "\n".join(offenders)


@pytest.mark.parametrize(
    "text",
    [
        "aws_access_key_id = AKIAIOSFODNN7EXAMPLE",
        "AWS_SECRET_ACCESS_KEY=abc",
        "export RAY_AUTH_TOKEN=3f2a9c",
        'RAY_AUTH_TOKEN="3f2a9c"',
        "- RAY_AUTH_TOKEN: 3f2a9c",
        "-----BEGIN RSA PRIVATE KEY-----",
    ],
)
def test_secret_patterns_catch_secrets(text):
    assert any(p.search(text) for p in SECRET_PATTERNS.values()), text


@pytest.mark.parametrize(
    "text",
    [
        'export RAY_AUTH_TOKEN="$(aws ssm get-parameter --name x)"',
        "RAY_AUTH_TOKEN=$(cat ~/.ray/auth_token)",
        "- name: RAY_AUTH_TOKEN\n  valueFrom:",
    ],
)
def test_secret_patterns_allow_indirection(text):
    assert not any(p.search(text) for p in SECRET_PATTERNS.values()), text


# --------------------------------------------------------------------------------------------
# Pinned versions == the committed lock (uv.lock), never whatever happens to be installed
# --------------------------------------------------------------------------------------------

UV_LOCK = REPO_ROOT / "uv.lock"
CLUSTER_REQUIREMENTS = CLUSTER / "requirements.txt"
# Packages of the test and bench extras only: the cluster does not need them.
NOT_ON_THE_CLUSTER = {"pytest", "moto", "ruff", "cleanlab"}


@pytest.fixture(scope="module")
def lock() -> dict[str, str]:
    """uv.lock -> {normalized name: version}; one version per package (one resolution)."""
    import tomllib

    data = tomllib.loads(UV_LOCK.read_text())
    versions: dict[str, set[str]] = {}
    for package in data["package"]:
        versions.setdefault(normalize(package["name"]), set()).add(package["version"])
    forked = {name: sorted(v) for name, v in versions.items() if len(v) > 1}
    assert not forked, f"uv.lock holds several versions of: {forked} (see [tool.uv] environments)"
    return {name: v.pop() for name, v in versions.items()}


def locked_python() -> str:
    return (REPO_ROOT / ".python-version").read_text().strip()


def requirement_pins(text: str) -> dict[str, str]:
    """Pins of a requirements file (`name==version ; markers \\ --hash=...`)."""
    pins = {}
    for line in text.splitlines():
        match = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==([^\s;\\]+)", line)
        if match:
            pins[normalize(match.group(1))] = match.group(3)
    return pins


def check_against_lock(pins: dict[str, str], lock: dict[str, str], where: str) -> None:
    """Every pin equals the lock; the message names each package that drifted."""
    drift = [
        f"{name}: {where} pins {version}, uv.lock has {lock.get(name, 'nothing')}"
        for name, version in sorted(pins.items())
        if lock.get(name) != version
    ]
    assert not drift, "\n".join(drift)


def test_lock_is_resolved_for_the_locked_python(lock):
    import tomllib

    data = tomllib.loads(UV_LOCK.read_text())
    assert locked_python() == "3.11"
    assert all(
        f"python_version == '{locked_python()}'" in env
        for env in tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["uv"][
            "environments"
        ]
    )
    assert data["requires-python"].startswith(">=3.11")
    assert "clipcleaner" in lock


def test_cluster_requirements_equal_the_lock(lock):
    pins = requirement_pins(CLUSTER_REQUIREMENTS.read_text())
    check_against_lock(pins, lock, "cluster/requirements.txt")
    missing = (REQUIRED_PINS | project_dependencies()) - set(pins)
    assert not missing, f"cluster/requirements.txt: not pinned: {sorted(missing)} (run make lock)"
    assert not NOT_ON_THE_CLUSTER & set(pins), "test/bench extras do not belong on the cluster"
    assert "clipcleaner" not in pins, "the project is installed from its own folder"
    hashed = CLUSTER_REQUIREMENTS.read_text().count("--hash=sha256:")
    assert hashed >= len(pins), "every pin carries its hashes"


def test_lock_check_names_the_drifting_package(lock):
    drifted = {"boto3": "0.0.1", "torch": lock["torch"]}
    with pytest.raises(AssertionError, match=r"boto3: here pins 0\.0\.1, uv\.lock has"):
        check_against_lock(drifted, lock, "here")


def test_setup_commands_install_the_lock(aws, lock):
    text = " ".join(aws["setup_commands"])
    assert "--require-hashes" in text and "~/clipcleaner/cluster/requirements.txt" in text
    assert (
        aws["file_mounts"]["~/clipcleaner/cluster/requirements.txt"] == "./cluster/requirements.txt"
    )
    assert f"--python {locked_python()}" in text, "the node venv uses the lock's Python"
    pins = pins_in(text)
    assert pins.pop("uv") == makefile_uv_version(), "nodes run the uv version the Makefile pins"
    check_against_lock(pins, lock, "cluster/aws.yaml setup_commands")


def makefile_uv_version() -> str:
    match = re.search(r"^UV_VERSION := (\S+)", (REPO_ROOT / "Makefile").read_text(), re.M)
    assert match, "Makefile: UV_VERSION"
    return match.group(1)


def dockerfile_pins() -> dict[str, str]:
    """Pins of the Dockerfile's RUN instructions (continuation lines joined)."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    return pins_in(" ".join(line for line in text.splitlines() if line.startswith("RUN")))


def test_dockerfile_installs_the_lock(lock):
    text = DOCKERFILE.read_text()
    assert re.search(r"^COPY .*cluster/requirements\.txt", text, re.M)
    assert "--require-hashes" in text
    check_against_lock(dockerfile_pins(), lock, "cluster/kuberay/Dockerfile")
    base = re.search(r"^FROM rayproject/ray:(\S+)", text, re.M)
    assert base, "FROM rayproject/ray:<version>-py<python>-..."
    ray_version, python_tag = base.group(1).split("-")[:2]
    assert ray_version == lock["ray"], f"base image Ray {ray_version} != uv.lock's {lock['ray']}"
    assert python_tag == "py" + locked_python().replace(".", ""), "base image Python != the lock's"


def test_ray_config_installs_nothing_beside_the_lock(lock):
    """Jobs run on nodes that carry the lock: a per-job install could only drift from it."""
    runtime_env = yaml.safe_load((REPO_ROOT / "ray_config.yaml").read_text())
    for key in ("pip", "uv", "conda", "py_executable"):
        assert key not in runtime_env, f"ray_config.yaml: {key} would install beside the lock"
    assert ".tools/" in runtime_env["excludes"] and ".venv/" in runtime_env["excludes"]


def project_dependencies() -> set[str]:
    import tomllib

    deps = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {normalize(re.match(r"[A-Za-z0-9._-]+", d).group(0)) for d in deps}


def test_kuberay_ray_version_and_image_follow_the_locked_ray(manifests, lock):
    ray_version = lock["ray"]
    for name, docs in manifests.items():
        for spec in cluster_specs(docs):
            assert spec["rayVersion"] == ray_version, f"{name}: rayVersion"
            images = {c["image"] for c in ray_containers(spec)}
            assert len(images) == 1, f"{name}: one image for every Ray container: {images}"
            assert f"ray{ray_version}" in images.pop(), (
                f"{name}: tag the image with the Ray version"
            )


# --------------------------------------------------------------------------------------------
# KubeRay manifests
# --------------------------------------------------------------------------------------------


def cluster_specs(docs: list[dict]) -> list[dict]:
    """RayCluster specs: of RayClusters, and embedded in RayJobs."""
    specs = []
    for doc in docs:
        if doc.get("kind") == "RayCluster":
            specs.append(doc["spec"])
        elif doc.get("kind") == "RayJob" and "rayClusterSpec" in doc["spec"]:
            specs.append(doc["spec"]["rayClusterSpec"])
    return specs


def pod_templates(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    return [g["template"]["spec"] for g in groups]


def ray_containers(spec: dict) -> list[dict]:
    # KubeRay runs Ray in the first container of each pod.
    return [pod["containers"][0] for pod in pod_templates(spec)]


def check_token_env(env: list[dict], secret: str, where: str) -> None:
    by_name = {e["name"]: e for e in env}
    assert by_name.get("RAY_AUTH_MODE", {}).get("value") == "token", f"{where}: RAY_AUTH_MODE"
    token = by_name.get("RAY_AUTH_TOKEN")
    assert token is not None, f"{where}: RAY_AUTH_TOKEN"
    assert "value" not in token, f"{where}: RAY_AUTH_TOKEN must not be a literal value"
    ref = token.get("valueFrom", {}).get("secretKeyRef", {})
    assert ref.get("name") == secret and ref.get("key") == "auth_token", (
        f"{where}: RAY_AUTH_TOKEN from secretKeyRef {{name: {secret}, key: auth_token}}"
    )


def check_cluster_spec(spec: dict, where: str, service_account: str) -> None:
    assert spec.get("enableInTreeAutoscaling") is True, f"{where}: autoscaling off"
    auth = spec.get("authOptions", {})
    assert auth.get("mode") == "token" and auth.get("secretName"), f"{where}: authOptions"
    secret = auth["secretName"]
    check_token_env(spec.get("autoscalerOptions", {}).get("env", []), secret, f"{where} autoscaler")
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for group in groups:
        params = group.get("rayStartParams", {})
        # map[string]string in the CRD: unquoted numbers or booleans are rejected.
        assert all(isinstance(v, str) for v in params.values()), f"{where}: {params}"
        assert params.get("disable-usage-stats") == "true", f"{where}: usage stats"
    for pod, container in zip(pod_templates(spec), ray_containers(spec), strict=True):
        assert pod.get("serviceAccountName") == service_account, f"{where}: serviceAccountName"
        check_token_env(container.get("env", []), secret, f"{where} {container['name']}")
    gpu_groups = []
    for group in spec["workerGroupSpecs"]:
        name = f"{where} {group['groupName']}"
        assert group["minReplicas"] == 0, f"{name}: minReplicas must be 0"
        assert group["maxReplicas"] >= 1, name
        assert 0 <= group.get("replicas", 0) <= group["maxReplicas"], name
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        if "nvidia.com/gpu" in limits:
            assert int(limits["nvidia.com/gpu"]) >= 1, name
            gpu_groups.append(group["groupName"])
    assert gpu_groups, f"{where}: no worker group with nvidia.com/gpu limits"


def service_account(manifests) -> str:
    account = one(manifests["serviceaccount.yaml"], "ServiceAccount")
    role = account["metadata"].get("annotations", {}).get("eks.amazonaws.com/role-arn", "")
    assert re.match(r"^arn:aws:iam::[^:]+:role/.+", role), "IRSA role annotation"
    return account["metadata"]["name"]


def test_manifests_parse_with_api_version_and_kind(manifests):
    assert {"raycluster.yaml", "serviceaccount.yaml", *RAYJOBS} <= set(manifests)
    for name, docs in manifests.items():
        assert docs, f"{name}: empty"
        for doc in docs:
            assert doc.get("apiVersion") and doc.get("kind"), name
            assert doc["kind"] != "Secret", f"{name}: no Secrets in the repository"
            if doc["kind"] in ("RayCluster", "RayJob"):
                assert doc["apiVersion"] == "ray.io/v1", name


def test_raycluster(manifests):
    cluster = one(manifests["raycluster.yaml"], "RayCluster")
    check_cluster_spec(cluster["spec"], "raycluster.yaml", service_account(manifests))
    params = cluster["spec"]["headGroupSpec"]["rayStartParams"]
    assert params.get("dashboard-host") in LOOPBACK, "long-lived cluster: loopback dashboard"
    assert params.get("num-cpus") == "0", "keep tasks off the head"


@pytest.mark.parametrize("filename", sorted(RAYJOBS))
def test_rayjob(manifests, filename):
    job = one(manifests[filename], "RayJob")
    spec = job["spec"]
    assert ("rayClusterSpec" in spec) != ("clusterSelector" in spec), "exactly one of the two"
    assert "rayClusterSpec" in spec, "documented choice: a cluster per job"
    check_cluster_spec(spec["rayClusterSpec"], filename, service_account(manifests))
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    mode = spec.get("submissionMode", "K8sJobMode")
    assert mode in SUBMISSION_MODES
    if mode in ("HTTPMode", "K8sJobMode"):
        # The operator (or the submitter pod) reaches the dashboard through the head Service.
        host = spec["rayClusterSpec"]["headGroupSpec"]["rayStartParams"].get("dashboard-host")
        assert host not in LOOPBACK, f"{filename}: {mode} cannot reach a loopback dashboard"


@pytest.mark.parametrize("filename,module", sorted(RAYJOBS.items()))
def test_rayjob_entrypoint(manifests, filename, module):
    entrypoint = one(manifests[filename], "RayJob")["spec"]["entrypoint"]
    match = re.fullmatch(
        r"python -m (?P<module>[a-z_]+(\.[a-z_]+)+) --config (?P<config>\S+\.ya?ml)"
        r"(?: [\w.]+=\S+)*",
        entrypoint.strip(),
    )
    assert match, f"{filename}: `python -m jobs.<name> --config <yaml> [key=value ...]`"
    assert match["module"] == module
    module_file = REPO_ROOT.joinpath(*module.split(".")).with_suffix(".py")
    if module == "jobs.clean" or module_file.exists():
        assert module_file.exists(), f"{filename}: {module_file} missing"
    # The code is baked into the image at the Dockerfile's WORKDIR.
    workdir = re.search(r"^WORKDIR (\S+)", DOCKERFILE.read_text(), re.M).group(1)
    config = match["config"]
    assert config.startswith(workdir + "/"), f"{filename}: config outside the image's code"
    if module == "jobs.clean":
        assert (REPO_ROOT / config.removeprefix(workdir + "/")).is_file(), config


@pytest.mark.parametrize("filename", sorted(RAYJOBS))
def test_rayjob_runtime_env_matches_ray_config(manifests, filename):
    runtime_env = yaml.safe_load(one(manifests[filename], "RayJob")["spec"]["runtimeEnvYAML"])
    assert isinstance(runtime_env, dict)
    submitted = yaml.safe_load((REPO_ROOT / "ray_config.yaml").read_text())
    for key, value in submitted.get("env_vars", {}).items():
        assert runtime_env.get("env_vars", {}).get(key) == value, f"{filename}: env_vars.{key}"
    working_dir = runtime_env.get("working_dir")
    if working_dir is not None:  # an operator-side submission cannot upload a local folder
        assert re.match(r"^[a-z0-9]+://", working_dir), f"{filename}: working_dir must be a URI"


def test_dockerfile_copies_what_the_jobs_need():
    text = DOCKERFILE.read_text()
    for path in ("pyproject.toml", "README.md", "cleaner", "jobs", "training", "configs"):
        assert re.search(rf"^COPY .*\b{re.escape(path)}\b", text, re.M), path
        assert (REPO_ROOT / path).exists(), path


def test_the_local_cluster_runs_the_repo_in_place_with_ray_configs_env(tmp_path):
    """The fake nodes share one session dir: jobs there use the repo as a `local://`
    working dir (never unpacked or dropped by a node's agent), with ray_config.yaml's env."""
    from cluster.local.localcluster import local_runtime_env

    (tmp_path / "ray_config.yaml").write_text(
        "working_dir: .\nexcludes: ['.git/']\nenv_vars:\n  PYTHONUNBUFFERED: '1'\n"
    )
    runtime_env = json.loads(local_runtime_env(tmp_path))
    assert runtime_env == {
        "working_dir": f"local://{tmp_path.resolve()}",
        "env_vars": {"PYTHONUNBUFFERED": "1"},
    }
    # the repo's own file keeps the env the production clusters get
    shipped = yaml.safe_load((REPO_ROOT / "ray_config.yaml").read_text())
    assert json.loads(local_runtime_env())["env_vars"] == shipped["env_vars"]
