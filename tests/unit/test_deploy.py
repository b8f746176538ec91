"""The deployment artifacts are correct before anyone applies them to a cluster.

No API server runs here, so what a cluster would reject or get wrong is checked
offline: every manifest against the Kubernetes OpenAPI schema (strict: unknown
fields fail); the ClusterRole against the API calls the agent really makes; the
DaemonSet's wiring (host network, xtables lock, probes on the health port the
configuration sets, tolerations, service account) and its command line and
configuration through kpy's own CLI and config loader; the kind configuration; and
the Vagrant lab's Ruby and shell scripts through ``ruby -c`` and shellcheck.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from click.testing import CliRunner

from kpy.agent import config as cfg
from kpy.agent import events
from kpy.cli import main

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DAEMONSET_FILE = DEPLOY / "daemonset.yaml"

# The oldest Kubernetes release kpy supports, and the newest the validator ships.
MIN_KUBERNETES = "1.30"
KUBERNETES_VERSIONS = tuple(dict.fromkeys((MIN_KUBERNETES, kubernetes_validate.latest_version())))

# Files that are not Kubernetes objects although they are YAML.
NOT_KUBERNETES_OBJECTS = {DEPLOY / "kind-config.yaml"}


def _load_all(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def _objects(path: Path) -> Iterator[dict[str, Any]]:
    """Every Kubernetes object in a file; a List's items one by one."""
    for doc in _load_all(path):
        if doc.get("kind") == "List" and doc.get("apiVersion") == "v1":
            yield from doc.get("items") or ()
        else:
            yield doc


def _manifest_files() -> list[Path]:
    """deploy/, examples/ and the Vagrant lab's manifests: whatever of them exists."""
    found: list[Path] = []
    for folder in (DEPLOY, ROOT / "examples", ROOT / "vagrant" / "manifests"):
        if folder.is_dir():
            found += sorted(p for p in folder.rglob("*") if p.suffix in {".yaml", ".yml"})
    return [p for p in found if p not in NOT_KUBERNETES_OBJECTS]


def _manifest_cases() -> list[Any]:
    cases = []
    for path in _manifest_files():
        for index, obj in enumerate(_objects(path)):
            name = (obj.get("metadata") or {}).get("name", index)
            for version in KUBERNETES_VERSIONS:
                case_id = f"{path.relative_to(ROOT)}:{obj.get('kind')}/{name}@{version}"
                cases.append(pytest.param(obj, version, id=case_id))
    return cases


def _by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d.get("kind") == kind]


def _one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    matching = _by_kind(docs, kind)
    assert len(matching) == 1, f"expected one {kind} in {DAEMONSET_FILE.name}, got {len(matching)}"
    return matching[0]


@pytest.fixture(scope="module")
def docs() -> list[dict[str, Any]]:
    return _load_all(DAEMONSET_FILE)


@pytest.fixture(scope="module")
def pod(docs: list[dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = _one(docs, "DaemonSet")["spec"]["template"]["spec"]
    return spec


@pytest.fixture(scope="module")
def container(pod: dict[str, Any]) -> dict[str, Any]:
    containers = pod["containers"]
    assert [c["name"] for c in containers] == ["kpy"]
    first: dict[str, Any] = containers[0]
    return first


@pytest.fixture(scope="module")
def agent_config_text(docs: list[dict[str, Any]]) -> str:
    text: str = _one(docs, "ConfigMap")["data"]["config.yaml"]
    return text


# --------------------------------------------------------------------------- schema


def test_deploy_has_the_manifests() -> None:
    files = _manifest_files()
    assert DAEMONSET_FILE in files
    kinds = sorted(o["kind"] for o in _objects(DAEMONSET_FILE))
    assert kinds == sorted(
        ["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet"]
    )


@pytest.mark.parametrize(("obj", "version"), _manifest_cases())
def test_manifest_validates_against_the_kubernetes_schema(
    obj: dict[str, Any], version: str
) -> None:
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = "/".join(str(p) for p in exc.absolute_path)
        pytest.fail(f"Kubernetes {exc.version} rejects {path or 'the object'}: {exc.message}")


@pytest.mark.parametrize(
    ("where", "value", "message"),
    [
        pytest.param(("hostNetwork",), "yes", "is not of type 'boolean'", id="wrong-type"),
        pytest.param(("hostNetwrok",), True, "'hostNetwrok' was unexpected", id="misspelt-field"),
        pytest.param(
            ("containers", 0), {"image": "kpy"}, "'name' is a required property", id="no-name"
        ),
    ],
)
def test_schema_validation_catches_mistakes(
    docs: list[dict[str, Any]], where: tuple[str | int, ...], value: object, message: str
) -> None:
    """The validation above is strict enough to catch a typo or a wrong type."""
    daemonset = yaml.safe_load(yaml.safe_dump(_one(docs, "DaemonSet")))  # a deep copy
    target: Any = daemonset["spec"]["template"]["spec"]
    for step in where[:-1]:
        target = target[step]
    target[where[-1]] = value
    with pytest.raises(kubernetes_validate.ValidationError, match=re.escape(message)):
        kubernetes_validate.validate(daemonset, MIN_KUBERNETES, strict=True)


# --------------------------------------------------------------------------- RBAC


Permission = tuple[str, str, str]  # (apiGroup, resource, verb)


def _group_of(api_path: str) -> str:
    """The API group of a request path: /api/v1/... is core, /apis/GROUP/VERSION/..."""
    parts = api_path.strip("/").split("/")
    if parts[0] == "api":
        return ""
    assert parts[0] == "apis", api_path
    return parts[1]


def _permissions_used_by_the_agent() -> set[Permission]:
    kube = importlib.import_module("kpy.sources.kube")
    used: set[Permission] = set()
    for group, resource, verbs in kube.REQUIRED_PERMISSIONS:
        for verb in (verbs,) if isinstance(verbs, str) else verbs:
            used.add((group, resource, verb))
    # Node events (kpy.agent.events) go through the same client: created, and patched when
    # a repeated event is aggregated, in the API group of the path they are posted to.
    events_group = _group_of(events.EVENTS_PATH)
    used |= {(events_group, "events", "create"), (events_group, "events", "patch")}
    return used


def _granted(role: Mapping[str, Any]) -> set[Permission]:
    granted: set[Permission] = set()
    for rule in role["rules"]:
        assert "resourceNames" not in rule and "nonResourceURLs" not in rule, rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    assert "*" not in (group, resource, verb), f"wildcard in {rule}"
                    granted.add((group, resource, verb))
    return granted


def test_cluster_role_grants_exactly_what_the_agent_uses(docs: list[dict[str, Any]]) -> None:
    granted = _granted(_one(docs, "ClusterRole"))
    used = _permissions_used_by_the_agent()
    assert granted - used == set(), "granted but never used: remove from the ClusterRole"
    assert used - granted == set(), "used but not granted: the agent would get 403 Forbidden"


def test_agent_reads_only_and_writes_only_events() -> None:
    used = _permissions_used_by_the_agent()
    writes = {(g, r, v) for g, r, v in used if v not in {"get", "list", "watch"}}
    assert {r for _, r, _ in writes} == {"events"}
    assert {(g, r) for g, r, _ in used} >= {
        ("", "services"),
        ("discovery.k8s.io", "endpointslices"),
        ("", "nodes"),
        ("networking.k8s.io", "servicecidrs"),
    }


def test_service_account_is_bound_to_the_role(
    docs: list[dict[str, Any]], pod: dict[str, Any]
) -> None:
    account = _one(docs, "ServiceAccount")["metadata"]
    role = _one(docs, "ClusterRole")["metadata"]["name"]
    binding = _one(docs, "ClusterRoleBinding")
    daemonset = _one(docs, "DaemonSet")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": role,
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["name"], "namespace": account["namespace"]}
    ]
    assert pod["serviceAccountName"] == account["name"]
    assert daemonset["metadata"]["namespace"] == account["namespace"] == "kube-system"
    assert pod.get("automountServiceAccountToken", True) is True


# --------------------------------------------------------------------------- DaemonSet


def _mount(container: Mapping[str, Any], path: str) -> dict[str, Any]:
    mounts = [m for m in container.get("volumeMounts", ()) if m["mountPath"] == path]
    assert len(mounts) == 1, f"expected one mount at {path}"
    mount: dict[str, Any] = mounts[0]
    return mount


def _volume(pod: Mapping[str, Any], name: str) -> dict[str, Any]:
    volumes = [v for v in pod["volumes"] if v["name"] == name]
    assert len(volumes) == 1, f"expected one volume {name}"
    volume: dict[str, Any] = volumes[0]
    return volume


def test_daemonset_runs_on_every_node_in_the_host_network(
    docs: list[dict[str, Any]], pod: dict[str, Any]
) -> None:
    spec = _one(docs, "DaemonSet")["spec"]
    assert pod["hostNetwork"] is True
    # Cluster DNS is a Service kpy itself serves: the agent must not depend on it.
    assert pod["dnsPolicy"] == "Default"
    assert pod["priorityClassName"] == "system-node-critical"
    # One toleration without key or effect tolerates every taint.
    assert pod["tolerations"] == [{"operator": "Exists"}]
    assert pod.get("nodeSelector") is None and pod.get("affinity") is None
    assert spec["updateStrategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 1},
    }
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    assert pod["terminationGracePeriodSeconds"] > 0


def test_daemonset_shares_the_hosts_xtables_lock(
    pod: dict[str, Any], container: dict[str, Any]
) -> None:
    mount = _mount(container, "/run/xtables.lock")
    assert not mount.get("readOnly", False)  # iptables takes the lock for writing
    host_path = _volume(pod, mount["name"])["hostPath"]
    assert host_path == {"path": "/run/xtables.lock", "type": "FileOrCreate"}


def test_daemonset_sees_kernel_modules_read_only(
    pod: dict[str, Any], container: dict[str, Any]
) -> None:
    mount = _mount(container, "/lib/modules")
    assert mount["readOnly"] is True
    assert _volume(pod, mount["name"])["hostPath"]["path"] == "/lib/modules"


def test_probes_ask_the_health_server_the_configuration_starts(
    container: dict[str, Any], agent_config_text: str
) -> None:
    agent = cfg.from_mapping(yaml.safe_load(agent_config_text), cfg.AgentConfig(), "kpy-config")
    health_port = int(agent.healthz_bind_address.rsplit(":", 1)[1])
    assert health_port == 10256  # kube-proxy's, so existing load-balancer checks work
    assert agent.healthz_bind_address.startswith("0.0.0.0:")  # the kubelet probes the node IP
    liveness = container["livenessProbe"]["httpGet"]
    readiness = container["readinessProbe"]["httpGet"]
    assert (liveness["path"], liveness["port"]) == ("/livez", health_port)
    assert (readiness["path"], readiness["port"]) == ("/readyz", health_port)
    assert [p["containerPort"] for p in container["ports"]] == [health_port]


def test_container_gets_only_the_capabilities_it_needs(container: dict[str, Any]) -> None:
    security = container["securityContext"]
    assert security["privileged"] is False
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]}
    # A read-only root needs a writable /tmp.
    if security.get("readOnlyRootFilesystem"):
        assert _mount(container, "/tmp")["name"]


def test_pod_runs_under_the_runtimes_default_seccomp_profile(pod: dict[str, Any]) -> None:
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}


def _bytes(quantity: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return int(quantity[: -len(suffix)]) * factor
    return int(quantity)


def test_memory_request_covers_what_the_agent_was_measured_to_use(
    container: dict[str, Any],
) -> None:
    # docs/benchmarks.md: about 142 MB resident at 1,000 Services, 316 MB peak at 10,000.
    resources = container["resources"]
    assert _bytes(resources["requests"]["memory"]) >= 142 * 10**6
    assert _bytes(resources["limits"]["memory"]) >= 316 * 10**6 * 2  # headroom for a relist


def test_api_server_override_is_optional_and_from_a_config_map(container: dict[str, Any]) -> None:
    env = {e["name"]: e for e in container["env"]}
    for name in ("KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"):
        ref = env[name]["valueFrom"]["configMapKeyRef"]
        assert ref == {"name": "kpy-apiserver", "key": name, "optional": True}
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}


def _kubelet_expand(args: list[str], env: Mapping[str, str]) -> list[str]:
    """$(VAR) expansion as the kubelet does it for command and args ($$ escapes)."""

    def one(arg: str) -> str:
        return re.sub(
            r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
            lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)),
            arg,
        )

    return [one(a) for a in args]


def test_command_and_configuration_are_accepted_by_the_agent(
    pod: dict[str, Any], container: dict[str, Any], agent_config_text: str, tmp_path: Path
) -> None:
    """The container's command line, with the mounted config, through kpy's real CLI."""
    command = container["command"]
    assert command[:2] == ["kpy", "run"]
    assert "args" not in container
    node_name = "worker-7"
    literal_env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    argv = _kubelet_expand(command[1:], {**literal_env, "NODE_NAME": node_name})

    # The --config path is where the ConfigMap's key is mounted.
    config_path = argv[argv.index("--config") + 1]
    mount = _mount(container, str(Path(config_path).parent))
    config_map = _volume(pod, mount["name"])["configMap"]["name"]
    assert config_map == "kpy-config" and Path(config_path).name == "config.yaml"
    local = tmp_path / "config.yaml"
    local.write_text(agent_config_text, encoding="utf-8")
    argv[argv.index("--config") + 1] = str(local)

    # The pod's environment has no KPY_* variables; neither may this test's.
    unset: dict[str, str | None] = {k: None for k in os.environ if k.startswith("KPY_")}
    result = CliRunner().invoke(main, [*argv, "--write-config-to", "-"], env=unset)
    assert result.exit_code == 0, result.output
    effective = yaml.safe_load(result.output)
    assert effective["source"] == "kube"
    assert effective["hostnameOverride"] == node_name
    assert effective["mode"] == "nftables"
    assert effective["healthzBindAddress"] == "0.0.0.0:10256"
    assert effective["metricsBindAddress"] == "127.0.0.1:10249"
    assert effective["kubeconfig"] == ""  # in-cluster: the service account token
    assert effective["conntrackCleanup"] is True


def test_configuration_typo_would_stop_the_agent(agent_config_text: str) -> None:
    broken = agent_config_text.replace("masqueradeAll:", "masqueradAll:")
    assert broken != agent_config_text
    with pytest.raises(cfg.ConfigError, match="masqueradAll"):
        cfg.from_mapping(yaml.safe_load(broken), cfg.AgentConfig(), "kpy-config")


# --------------------------------------------------------------------------- image, kind


def test_dockerfile_copies_what_the_wheel_is_built_from() -> None:
    text = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    copied = set()
    for line in text.splitlines():
        parts = line.split()
        if parts[:1] == ["COPY"] and not any(p.startswith("--from") for p in parts):
            copied |= {p.rstrip("/") for p in parts[1:-1]}
    assert copied, "no COPY from the build context"
    for source in copied:
        assert (ROOT / source).exists(), f"Dockerfile copies {source}, which does not exist"
    with (ROOT / "pyproject.toml").open("rb") as f:
        import tomllib

        project = tomllib.load(f)
    packages = project["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]
    assert {p.split("/")[0] for p in packages} <= copied
    assert project["project"]["readme"] in copied
    for tool in ("iptables", "nftables", "conntrack", "ipset", "iproute2"):
        assert re.search(rf"\b{tool}\b", text), f"the image lacks {tool}"
    assert 'ENTRYPOINT ["kpy"]' in text


def test_kind_cluster_has_no_kube_proxy_and_matches_the_pod_cidr(agent_config_text: str) -> None:
    (kind,) = _load_all(DEPLOY / "kind-config.yaml")
    assert (kind["kind"], kind["apiVersion"]) == ("Cluster", "kind.x-k8s.io/v1alpha4")
    assert kind["networking"]["kubeProxyMode"] == "none"
    assert sorted(n["role"] for n in kind["nodes"]) == ["control-plane", "worker", "worker"]
    agent = cfg.from_mapping(yaml.safe_load(agent_config_text), cfg.AgentConfig(), "kpy-config")
    assert agent.cluster_cidr == (kind["networking"]["podSubnet"],)


# --------------------------------------------------------------------------- scripts


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:  # not a skip: scripts/setup.sh installs it (apt)
        pytest.fail(f"{name} is not installed; run scripts/setup.sh (apt package {name})")
    return path


def _shell_scripts() -> list[Path]:
    scripts = sorted((ROOT / "vagrant" / "provision").glob("*.sh"))
    scripts += sorted((ROOT / "scripts").glob("*.sh"))
    scripts += [p for p in [ROOT / ".ci" / "run"] if p.exists()]
    return scripts


def test_vagrantfile_parses() -> None:
    vagrantfile = ROOT / "vagrant" / "Vagrantfile"
    result = subprocess.run(
        [_tool("ruby"), "-wc", str(vagrantfile)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "Syntax OK" and result.stderr == "", result.stderr


def test_there_are_provisioning_scripts() -> None:
    names = {p.name for p in _shell_scripts()}
    assert {"common.sh", "control-plane.sh", "worker.sh"} <= names


@pytest.mark.parametrize("script", _shell_scripts(), ids=lambda p: str(p.relative_to(ROOT)))
def test_shell_script_passes_shellcheck(script: Path) -> None:
    result = subprocess.run(
        [
            _tool("shellcheck"),
            "--shell=bash",
            "--severity=style",
            "--external-sources",
            str(script),
        ],
        capture_output=True,
        text=True,
        check=False,
        cwd=script.parent,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_shellcheck_would_catch_a_mistake(tmp_path: Path) -> None:
    bad = tmp_path / "bad.sh"
    bad.write_text("#!/usr/bin/env bash\nrm -rf $DIR/*\n", encoding="utf-8")
    result = subprocess.run(
        [_tool("shellcheck"), "--shell=bash", str(bad)], capture_output=True, check=False
    )
    assert result.returncode != 0


def test_ruby_syntax_check_would_catch_a_mistake(tmp_path: Path) -> None:
    bad = tmp_path / "Vagrantfile"
    bad.write_text("Vagrant.configure('2') do |config|\n  config.vm.box = 'x'\n", encoding="utf-8")
    result = subprocess.run([_tool("ruby"), "-wc", str(bad)], capture_output=True, check=False)
    assert result.returncode != 0


def test_vagrantfile_provisions_with_scripts_that_exist() -> None:
    text = (ROOT / "vagrant" / "Vagrantfile").read_text(encoding="utf-8")
    literal = re.findall(r"path: '(provision/[\w.-]+\.sh)'", text)
    roles = re.findall(r"role: '([\w-]+)'", text)
    assert "provision/#{node[:role]}.sh" in text
    assert sorted(roles) == ["control-plane", "worker", "worker"]
    wanted = {*literal, *(f"provision/{role}.sh" for role in roles)}
    assert len(wanted) >= 4
    for script in sorted(wanted):
        assert (ROOT / "vagrant" / script).is_file(), f"the Vagrantfile runs missing {script}"
    # The control plane skips kube-proxy and installs kpy from deploy/.
    control_plane = (ROOT / "vagrant" / "provision" / "control-plane.sh").read_text(
        encoding="utf-8"
    )
    assert "--skip-phases=addon/kube-proxy" in control_plane
    assert "/kpy/deploy/daemonset.yaml" in control_plane
    assert "KUBERNETES_SERVICE_HOST" in control_plane
