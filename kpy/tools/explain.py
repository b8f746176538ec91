"""The ``kpy explain`` command: flags, the offline Plan, text or JSON output.

The answer itself is computed by :func:`kpy.core.trace.explain` and, when a backend is
named, that backend's tracer; the CLI registers this command with its own offline Plan
builder.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable
from dataclasses import replace

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
    @click.option(
        "--manifests",
        multiple=True,
        default=("examples",),
        show_default=True,
        help="Manifest directory or file (repeatable).",
    )
    @click.option("--node", default=DEMO_NODE, show_default=True, help="This node's name.")
    @click.option(
        "--node-ip",
        multiple=True,
        default=(DEMO_NODE_IP,),
        show_default=True,
        callback=merged,
        help="This node's IPs (repeatable and/or comma separated).",
    )
    @click.option(
        "--cluster-cidr",
        multiple=True,
        default=("10.244.0.0/16",),
        show_default=True,
        callback=merged,
        help="Pod CIDRs (repeatable and/or comma separated).",
    )
    @click.option(
        "--nodeport-addresses",
        multiple=True,
        callback=merged,
        help="CIDRs NodePorts answer on (repeatable and/or comma separated).",
    )
    @click.option("--masquerade-all", is_flag=True, default=False)
    @click.option(
        "--detect-local-mode",
        type=click.Choice(DETECT_LOCAL_MODES),
        default="ClusterCIDR",
        show_default=True,
        help="How traffic from this node's pods is told.",
    )
    @click.option("--pod-bridge-interface", default="", help="For BridgeInterface.")
    @click.option("--pod-interface-name-prefix", default="", help="For InterfaceNamePrefix.")
    @click.option(
        "--service-cidr",
        multiple=True,
        callback=merged,
        help="Service CIDRs (repeatable and/or comma separated).",
    )
    @click.option(
        "--iptables-localhost-nodeports/--no-iptables-localhost-nodeports",
        default=None,
        help="NodePorts on 127.0.0.1 (default: on with --backend iptables, as it programs).",
    )
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
        nodeport_addresses: tuple[str, ...],
        masquerade_all: bool,
        detect_local_mode: str,
        pod_bridge_interface: str,
        pod_interface_name_prefix: str,
        service_cidr: tuple[str, ...],
        iptables_localhost_nodeports: bool | None,
        backend: str | None,
        netns: str | None,
        output: str,
    ) -> None:
        """Why does this packet go there? Service, endpoints, policy, masquerade."""
        try:
            check_nodeport_addresses(nodeport_addresses, "--nodeport-addresses")
            address, port, protocol = parse_destination(dst)
            packet = Packet(
                src=ipaddress.ip_address(src),
                dst=address,
                port=port,
                protocol=protocol,
                origin=Origin(origin) if origin else None,
            )
            options = Options(
                cluster_cidrs=networks(cluster_cidr),
                nodeport_addresses=networks(tuple(a for a in nodeport_addresses if a != PRIMARY)),
                nodeport_primary=PRIMARY in nodeport_addresses,
                masquerade_all=masquerade_all,
                node_ips=tuple(ipaddress.ip_address(i) for i in node_ip),
                detect_local_mode=detect_local_mode,
                pod_bridge_interface=pod_bridge_interface,
                pod_interface_name_prefix=pod_interface_name_prefix,
                localhost_nodeports=backend == "iptables"
                if iptables_localhost_nodeports is None
                else iptables_localhost_nodeports,
                service_cidrs=networks(service_cidr),
                # the nftables backend's (kpy's default) checks of ClusterIPs
                clusterip_checks=backend in (None, "nftables"),
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
