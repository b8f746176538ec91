"""``kpy check --kubeconfig``: a real cluster's objects listed through the API, and the
checks a netshoot pod can run there."""

from __future__ import annotations

import copy
import ipaddress
import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import Any

from kpy.core.model import Plan
from kpy.tools.check.checks import Check, ClusterView, PodInfo, Result, catalog, plans_from_objects
from kpy.tools.check.probes import Shell, ShellExecutor, run_checks

NETSHOOT_POD: dict[str, Any] = {  # the same as deploy/netshoot.yaml (a test keeps them equal)
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {
        "name": "kpy-netshoot",
        "namespace": "default",
        "labels": {"app.kubernetes.io/name": "kpy-netshoot", "app.kubernetes.io/part-of": "kpy"},
    },
    "spec": {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": 0,
        "automountServiceAccountToken": False,
        "containers": [
            {
                "name": "netshoot",
                "image": "nicolaka/netshoot:v0.13",
                "command": ["sleep", "3600"],
                "resources": {
                    "requests": {"cpu": "10m", "memory": "32Mi"},
                    "limits": {"memory": "128Mi"},
                },
                "securityContext": {
                    "allowPrivilegeEscalation": False,
                    "runAsNonRoot": True,
                    "runAsUser": 65534,
                    "capabilities": {"drop": ["ALL"]},
                },
            }
        ],
    },
}

CLUSTER_CHECKS = {"cluster-ip", "udp", "no-endpoints", "headless", "external-name"}


def cluster_catalog(
    objects: Iterable[dict[str, Any]],
    netshoot: PodInfo,
    shell: Shell,
    *,
    cluster_domain: str = "cluster.local",
) -> list[Check]:
    """The checks one pod (netshoot) can make in a real cluster.

    Real backends do not say who they are, so only what a client can see is checked:
    answered, refused at once, or dropped — per the Plan of the pod's own node — and
    what DNS answers for headless and ExternalName Services (``dig``). Load spread,
    affinity, traffic policies seen from outside and source ranges need the lab.
    """
    node_plans = plans_from_objects(objects, [netshoot.node])
    view = ClusterView(nodes={}, pods=(netshoot,), client_ips=())
    checks = []
    for c in catalog(node_plans, view):
        if c.check not in CLUSTER_CHECKS:
            continue
        if c.probe is not None and c.expect is not None:
            checks.append(replace(c, expect=replace(c.expect, pods=None), source=netshoot.name))
        else:
            checks.append(_dns_check(c, node_plans[netshoot.node], shell, netshoot, cluster_domain))
    return checks


def _dns_check(c: Check, plan: Plan, shell: Shell, netshoot: PodInfo, cluster_domain: str) -> Check:
    state = next(st for key, st in plan.services.items() if str(key) == c.service)
    fqdn = f"{state.service.name.name}.{state.service.name.namespace}.svc.{cluster_domain}"
    if c.check == "external-name":
        command = f"dig +short CNAME {fqdn}"
        want = {str(state.service.external_name).rstrip(".")}
    else:
        command = f"dig +short {fqdn}"
        want = {str(ep.ip) for ep in state.endpoints if ep.ready}

    def verify() -> tuple[bool, str]:
        rc, out = shell(netshoot.name, command, 10.0)
        got = {line.strip().rstrip(".") for line in out.splitlines() if line.strip()}
        if rc != 0:
            return False, f"dig failed (exit status {rc})"
        if got != want:
            answered = ", ".join(sorted(got)) or "nothing"
            return False, f"DNS answered {answered}, expected {', '.join(sorted(want))}"
        return True, f"DNS answered {', '.join(sorted(got))}"

    return replace(c, command=command, source=netshoot.name, verify=verify)


def kube_client(kubeconfig: str | None, master: str | None = None) -> Any:
    """A kubernetes ApiClient from a kubeconfig (``None``: the default one)."""
    import importlib

    kubernetes: Any = importlib.import_module("kubernetes")
    configuration = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    if master:
        configuration.host = master
    return kubernetes.client.ApiClient(configuration)


def list_objects(api_client: Any) -> list[dict[str, Any]]:
    """Every Service, EndpointSlice and Node, as raw JSON (each item with its kind)."""
    import importlib

    k8s: Any = importlib.import_module("kubernetes.client")
    core, discovery = k8s.CoreV1Api(api_client), k8s.DiscoveryV1Api(api_client)
    objects = []
    for kind, call in (
        ("Node", core.list_node),
        ("Service", core.list_service_for_all_namespaces),
        ("EndpointSlice", discovery.list_endpoint_slice_for_all_namespaces),
    ):
        data = json.loads(call(_preload_content=False).data)
        for item in data.get("items") or ():
            item["kind"] = kind
            objects.append(item)
    return objects


class Netshoot:
    """The netshoot pod: created through the API, commands run through ``exec``, deleted."""

    def __init__(self, api_client: Any, namespace: str = "default", timeout: float = 120.0) -> None:
        import importlib

        self.k8s: Any = importlib.import_module("kubernetes")
        self.api = self.k8s.client.CoreV1Api(api_client)
        # exec upgrades the connection: it gets its own client (the stream helper patches it)
        self.exec_api = self.k8s.client.CoreV1Api(
            self.k8s.client.ApiClient(api_client.configuration)
        )
        self.namespace = namespace
        self.name = str(NETSHOOT_POD["metadata"]["name"])
        self.timeout = timeout
        self.info: PodInfo | None = None

    def __enter__(self) -> Netshoot:
        body = copy.deepcopy(NETSHOOT_POD)
        body["metadata"]["namespace"] = self.namespace
        self.api.create_namespaced_pod(self.namespace, body)
        try:
            deadline = time.monotonic() + self.timeout
            while True:
                pod = self.api.read_namespaced_pod(self.name, self.namespace)
                if pod.status.phase == "Running" and pod.status.pod_ip:
                    break
                if pod.status.phase in ("Failed", "Succeeded") or time.monotonic() > deadline:
                    raise RuntimeError(f"pod {self.name} is {pod.status.phase}, not Running")
                time.sleep(1)
            ips = tuple(ipaddress.ip_address(p.ip) for p in pod.status.pod_i_ps or ()) or (
                ipaddress.ip_address(pod.status.pod_ip),
            )
            self.info = PodInfo(self.name, str(pod.spec.node_name), ips)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.api.delete_namespaced_pod(self.name, self.namespace, grace_period_seconds=0)
        except self.k8s.client.ApiException as error:
            if error.status != 404:
                raise

    def shell(self, source: str, command: str, timeout: float) -> tuple[int, str]:
        ws = self.k8s.stream.stream(
            self.exec_api.connect_get_namespaced_pod_exec, self.name, self.namespace,
            command=["sh", "-c", command], stdin=False, stdout=True, stderr=True, tty=False,
            _preload_content=False,
        )  # fmt: skip
        try:
            ws.run_forever(timeout=timeout)
            out = ws.read_stdout() or ""
            rc = ws.returncode
        finally:
            ws.close()
        return (28 if rc is None else int(rc)), out


def check_cluster(
    kubeconfig: str | None,
    *,
    namespace: str = "default",
    master: str | None = None,
    only: Sequence[str] = (),
    on_result: Callable[[Result], None] | None = None,
) -> list[Result]:
    """Start the netshoot pod, run the cluster catalog in it, delete it."""
    api_client = kube_client(kubeconfig, master)
    objects = list_objects(api_client)
    with Netshoot(api_client, namespace) as pod:
        assert pod.info is not None
        checks = cluster_catalog(objects, pod.info, pod.shell)
        if only:
            checks = [c for c in checks if any(o in c.service for o in only)]
        return run_checks(checks, ShellExecutor(pod.shell), on_result)


def cluster_or_fail(kubeconfig: str, namespace: str, only: Sequence[str]) -> list[Result]:
    import click
    from kubernetes.client import ApiException

    try:
        return check_cluster(kubeconfig, namespace=namespace, only=only)
    except ApiException as exc:
        reason = f"{exc.status} {exc.reason}"
        raise click.ClickException(f"the API server refused a request: {reason}") from None
    except (OSError, RuntimeError) as exc:
        raise click.ClickException(f"cluster check failed: {exc}") from None
