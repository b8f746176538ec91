"""``kpy check``: connectivity checks the way people run them from a netshoot pod.

The catalog is derived from the manifests, not written per example: every Service is
converted and selected for every node exactly as the agents do it (source → convert →
tracker), and each semantic the resulting per-node Plans promise becomes a check —

========================  ============================================================
check                     expectation
========================  ============================================================
cluster-ip                from a pod on every node and from every node itself, each
                          cluster IP (each family) answers from one of the endpoints
                          that node's Plan uses (internalTrafficPolicy Local: only
                          local pods)
udp                       the same for UDP Services (``nc -u``)
no-endpoints              refused at once (TCP reset / ICMP), not left to time out
load-spread               many new connections reach every endpoint
session-affinity          every connection from one client reaches the same pod
node-port                 from outside, every node's address answers on the NodePort;
                          a node without a local endpoint under externalTrafficPolicy
                          Local does not answer (dropped)
source-ip-kept            externalTrafficPolicy Local: the pod sees the client's address
load-balancer             the LoadBalancer ingress IP answers from outside
source-ranges             an address outside loadBalancerSourceRanges is dropped
external-ip               an externalIP answers from outside
headless                  no virtual IP is programmed; DNS would list the endpoints
external-name             no virtual IP is programmed; DNS would answer the CNAME
========================  ============================================================

Every check is shown as the command it corresponds to (``curl``, ``nc -u``, ``dig``)
and run inside the right lab namespace — from this process through sockets opened in
that namespace, which is what the command would do. The result is a matrix
(Service x check x source) with pass/fail and the reason; ``-o json`` gives
``{"results": [{"service", "check", "source", "status", "reason"}]}``.

The package: :mod:`~kpy.tools.check.checks` (the Plans and the catalog),
:mod:`~kpy.tools.check.probes` (executors, judging, output), :mod:`~kpy.tools.check.lab`
(against the namespace lab), :mod:`~kpy.tools.check.cluster` (against a real cluster);
this module is the command and the public names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kpy.tools.check.checks import (
    Check,
    ClusterView,
    Expect,
    PodInfo,
    Probe,
    Reply,
    Result,
    catalog,
    plans,
)
from kpy.tools.check.cluster import (
    NETSHOOT_POD,
    Netshoot,
    check_cluster,
    cluster_catalog,
    cluster_or_fail,
    kube_client,
    list_objects,
)
from kpy.tools.check.lab import check_lab
from kpy.tools.check.probes import (
    LabExecutor,
    Shell,
    ShellExecutor,
    evaluate,
    lab_shell,
    parse_output,
    run_checks,
    table,
    to_json,
)


def command() -> Any:
    """The ``kpy check`` click command (added to the CLI by kpy.cli)."""
    import sys

    import click

    @click.command("check")
    @click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table")
    @click.option(
        "--service",
        "only",
        multiple=True,
        help="Only Services whose name contains this (repeatable).",
    )
    @click.option(
        "--manifests",
        multiple=True,
        type=click.Path(path_type=Path, exists=True),
        help="Derive the checks from these manifests (default: the lab's).",
    )
    @click.option(
        "--run-commands",
        is_flag=True,
        help="Run the shown curl/nc commands in the namespaces (slower) instead of sockets.",
    )
    @click.option(
        "--lab-state-dir",
        envvar="KPY_LAB_STATE_DIR",
        type=click.Path(path_type=Path),
        default=None,
        help="The lab to check (default /run/kpy-lab).",
    )
    @click.option(
        "--kubeconfig",
        default=None,
        help="Check a real cluster instead: run the commands in a netshoot pod through the API.",
    )
    @click.option(
        "--namespace",
        default="default",
        show_default=True,
        help="With --kubeconfig: where the netshoot pod runs (it is deleted afterwards).",
    )
    def check(
        output: str,
        only: tuple[str, ...],
        manifests: tuple[Path, ...],
        run_commands: bool,
        lab_state_dir: Path | None,
        kubeconfig: str | None,
        namespace: str,
    ) -> None:
        """Connectivity checks per Service (curl / nc -u / dig) in the lab's namespaces,
        or with --kubeconfig from a netshoot pod in a real cluster.

        Exit status 1 when any check fails.
        """
        from kpy.tools.lab import lab

        try:
            if kubeconfig is not None:
                results = cluster_or_fail(kubeconfig, namespace, only)
            else:
                results = check_lab(
                    list(manifests), only=only, state_dir=lab_state_dir, run_commands=run_commands
                )
        except lab.LabError as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(to_json(results) if output == "json" else table(results))
        if any(r.status == "fail" for r in results):
            sys.exit(1)

    return check


__all__ = [
    "NETSHOOT_POD",
    "Check",
    "ClusterView",
    "Expect",
    "LabExecutor",
    "Netshoot",
    "PodInfo",
    "Probe",
    "Reply",
    "Result",
    "Shell",
    "ShellExecutor",
    "catalog",
    "check_cluster",
    "check_lab",
    "cluster_catalog",
    "command",
    "evaluate",
    "kube_client",
    "lab_shell",
    "list_objects",
    "parse_output",
    "plans",
    "run_checks",
    "table",
    "to_json",
]
