"""The ``kpy explain`` command: flags, the offline Plan, text or JSON output.

The answer itself is computed by :func:`kpy.core.trace.explain` and, when a backend is
named, that backend's tracer; the CLI registers this command with its own offline Plan
builder.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import click

from kpy.core.backend import DETECT_LOCAL_MODES, BackendConfig, split_values
from kpy.core.model import Plan
from kpy.core.trace import (
    DEMO_NODE,
    DEMO_NODE_IP,
    PRIMARY,
    Options,
    Origin,
    Packet,
    Trace,
    check_nodeport_addresses,
    explain,
    networks,
    options_config,
    parse_destination,
    render_text,
    with_trace,
)

OfflinePlan = Callable[[tuple[str, ...], str, tuple[str, ...]], Plan]


def merged(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> tuple[str, ...]:
    """A list option's values, given repeatedly and/or comma separated, merged."""
    del ctx, param
    return split_values(value)


class RefuseRepeats(click.Command):
    """A command whose single-valued options may be given once: a second value is an
    error naming the option, never the last one silently (list options are
    ``multiple`` and merge their values)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        single: dict[str, str] = {}
        for param in self.params:
            if isinstance(param, click.Option) and not (
                param.multiple or param.is_flag or param.count
            ):
                for opt in param.opts:
                    single[opt] = param.opts[0]
        seen: dict[str, int] = {}
        for arg in args:
            if arg == "--":
                break
            name = single.get(arg.split("=", 1)[0] if arg.startswith("--") else arg)
            if name is not None:
                seen[name] = seen.get(name, 0) + 1
        repeated = sorted(name for name, count in seen.items() if count > 1)
        if repeated:
            raise click.UsageError(
                f"{', '.join(repeated)} given more than once; give it once", ctx=ctx
            )
        return super().parse_args(ctx, args)


def list_option(name: str, help: str, default: tuple[str, ...] = ()) -> Callable[[Any], Any]:
    """A repeatable option whose values may also be comma separated (:func:`merged`)."""
    defaults: dict[str, Any] = {"default": default, "show_default": True} if default else {}
    return click.option(name, multiple=True, callback=merged, help=help, **defaults)


def offline_options(f: Any) -> Any:
    """The manifests to read and the node to compute the Plan for (``--manifests``,
    ``--node``, ``--node-ip``, ``--cluster-cidr``), as the offline commands take them."""
    f = list_option(
        "--cluster-cidr", "Pod CIDRs (repeatable and/or comma separated).", ("10.244.0.0/16",)
    )(f)
    f = list_option(
        "--node-ip", "This node's IPs (repeatable and/or comma separated).", (DEMO_NODE_IP,)
    )(f)
    f = click.option("--node", default=DEMO_NODE, show_default=True, help="This node's name.")(f)
    f = click.option(
        "--manifests",
        multiple=True,
        default=("examples",),
        show_default=True,
        help="Manifest directory or file (repeatable).",
    )(f)
    return f


def node_flags(f: Any) -> Any:
    """The node flags that change what a backend renders and where a packet goes, as
    ``kpy run`` takes them (``kpy explain``; ``kpy plan`` and ``kpy dump`` with a
    backend). The command gets them as keyword arguments; :func:`node_options` reads
    them."""
    f = click.option(
        "--iptables-localhost-nodeports/--no-iptables-localhost-nodeports",
        default=None,
        help="NodePorts on 127.0.0.1 (default: on with --backend iptables, as kpy run).",
    )(f)
    f = list_option(
        "--service-cidr",
        "Service CIDRs (repeatable and/or comma separated; beside the manifests' "
        "ServiceCIDR objects).",
    )(f)
    f = click.option("--pod-interface-name-prefix", default="", help="For InterfaceNamePrefix.")(f)
    f = click.option("--pod-bridge-interface", default="", help="For BridgeInterface.")(f)
    f = click.option(
        "--detect-local-mode",
        type=click.Choice(DETECT_LOCAL_MODES),
        default="ClusterCIDR",
        show_default=True,
        help="How traffic from this node's pods is told.",
    )(f)
    f = click.option("--masquerade-all", is_flag=True, default=False)(f)
    f = list_option(
        "--nodeport-addresses",
        "CIDRs NodePorts answer on, or 'primary' (repeatable and/or comma separated).",
    )(f)
    return f


NODE_FLAG_DEFAULTS: dict[str, Any] = {
    "nodeport_addresses": (),
    "masquerade_all": False,
    "detect_local_mode": "ClusterCIDR",
    "pod_bridge_interface": "",
    "pod_interface_name_prefix": "",
    "service_cidr": (),
    "iptables_localhost_nodeports": None,
}


def node_options(
    flags: Mapping[str, Any],
    node_ips: tuple[str, ...],
    cluster_cidr: tuple[str, ...],
    backend: str | None,
    *,
    clusterip_checks: bool = False,
) -> Options:
    """The trace options of the :func:`node_flags` ``flags`` (a missing one at its
    default) for ``backend``; ValueError names a bad value."""
    flags = {**NODE_FLAG_DEFAULTS, **flags}
    nodeport = tuple(flags["nodeport_addresses"])
    localhost = flags["iptables_localhost_nodeports"]
    check_nodeport_addresses(nodeport, "--nodeport-addresses")
    return Options(
        cluster_cidrs=networks(cluster_cidr),
        nodeport_addresses=networks(tuple(a for a in nodeport if a != PRIMARY)),
        nodeport_primary=PRIMARY in nodeport,
        masquerade_all=flags["masquerade_all"],
        node_ips=tuple(ipaddress.ip_address(i) for i in node_ips),
        detect_local_mode=flags["detect_local_mode"],
        pod_bridge_interface=flags["pod_bridge_interface"],
        pod_interface_name_prefix=flags["pod_interface_name_prefix"],
        localhost_nodeports=backend == "iptables" if localhost is None else localhost,
        service_cidrs=networks(tuple(flags["service_cidr"])),
        clusterip_checks=clusterip_checks,
    )


TracerLoader = Callable[[str, BackendConfig], Callable[[Plan, Packet, Origin], Trace] | None]


def command(offline_plan: OfflinePlan, load_tracer: TracerLoader | None = None) -> click.Command:
    """The ``kpy explain`` command; ``offline_plan(manifests, node, node_ips)`` → Plan;
    ``load_tracer(backend, config)`` → that backend's bound ``trace`` (None: it has none)."""

    @click.command("explain", cls=RefuseRepeats)
    @click.option("--from", "src", required=True, help="Source IP of the packet.")
    @click.option("--to", "dst", required=True, help="Destination IP:PORT[/PROTO].")
    @click.option(
        "--origin",
        type=click.Choice([o.value for o in Origin]),
        default=None,
        help="Where the packet comes from (default: inferred from --from).",
    )
    @offline_options
    @node_flags
    @click.option(
        "--backend",
        default=None,
        help="Trace the packet through this backend's rendered kernel objects.",
    )
    @click.option(
        "--netns",
        default=None,
        help="A live node's namespace: compare the objects traced with what its kernel "
        "holds (nftables; the node flags must be the agent's).",
    )
    @click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text")
    def explain_cmd(
        src: str,
        dst: str,
        origin: str | None,
        manifests: tuple[str, ...],
        node: str,
        node_ip: tuple[str, ...],
        cluster_cidr: tuple[str, ...],
        backend: str | None,
        netns: str | None,
        output: str,
        **flags: Any,
    ) -> None:
        """Why does this packet go there? Service, endpoints, policy, masquerade."""
        try:
            # the nftables backend's (kpy's default) checks of ClusterIPs
            checks = backend in (None, "nftables")
            options = node_options(flags, node_ip, cluster_cidr, backend, clusterip_checks=checks)
            address, port, protocol = parse_destination(dst)
            packet = Packet(
                src=ipaddress.ip_address(src),
                dst=address,
                port=port,
                protocol=protocol,
                origin=Origin(origin) if origin else None,
            )
            options_config(node, options)  # the detect-local settings are valid
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
        plan = offline_plan(manifests, node, node_ip)
        result = explain(plan, packet, options)
        if backend is not None:
            config = replace(options_config(node, options), netns=netns)
            tracer = load_tracer(backend, config) if load_tracer else None
            if tracer is None:
                raise click.UsageError(f"backend {backend!r} cannot trace packets")
            result = with_trace(result, tracer(plan, packet, result.origin), backend)
        elif netns is not None:
            raise click.UsageError("--netns needs --backend")
        if output == "json":
            click.echo(json.dumps(result.to_json(), indent=2, sort_keys=True))
        else:
            click.echo(render_text(packet, result))

    return explain_cmd
