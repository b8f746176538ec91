"""The ``kpy`` command line: validates flags and hands off; no logic lives here."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import ipaddress
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import click
import structlog

from kpy import __version__
from kpy.agent import config as cfg
from kpy.agent import log as logsetup
from kpy.agent import observers as operations
from kpy.agent.agent import Agent, tune_gc
from kpy.agent.quarantine import Attempt, ScratchNamespaces
from kpy.core import backend as backends
from kpy.core import trace
from kpy.core.backend import DETECT_LOCAL_MODES
from kpy.core.model import NodeInfo, Plan
from kpy.sources import Source
from kpy.sources.manifests import ManifestSource
from kpy.tools import dump, explain, offline

DEMO_NODE, DEMO_NODE_IP = trace.DEMO_NODE, trace.DEMO_NODE_IP


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


def _node_override(name: str, node_ips: tuple[str, ...], pod_cidrs: tuple[str, ...] = ()) -> Any:
    """A function filling in node addresses given by flags (the Node may lack them)."""
    ips = tuple(ipaddress.ip_address(i) for i in node_ips)
    cidrs = tuple(ipaddress.ip_network(c, strict=False) for c in pod_cidrs)

    def override(node: NodeInfo) -> NodeInfo:
        return replace(
            node,
            name=name,
            addresses=ips or node.addresses,
            pod_cidrs=cidrs or node.pod_cidrs,
        )

    return override


class _LazyGroup(click.Group):
    """A group whose ``lazy`` subcommands are made (their modules imported) only when run or
    listed in help: ``kpy run`` does not import the lab, ``check`` (the kubernetes client,
    jsonschema) or the fake API server."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy: dict[str, Callable[[], click.Command]] = {}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        make = self.lazy.pop(cmd_name, None)
        if make is not None:
            self.add_command(make(), cmd_name)
        return super().get_command(ctx, cmd_name)


def _command_of(module: str, attribute: str = "command") -> Callable[[], click.Command]:
    """``module.command()`` (or the command ``module.attribute``), imported when called."""

    def make() -> click.Command:
        found = getattr(importlib.import_module(module), attribute)
        return cast(click.Command, found() if attribute == "command" else found)

    return make


@click.group(
    cls=_LazyGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, prog_name="kpy")
def main() -> None:
    """kpy: a kube-proxy replacement. Makes Service virtual IPs work on this node."""
    logsetup.ensure_configured()  # logs on stderr before any command runs


# a single-valued option given twice is an error, never the last one silently
main.command_class = explain.RefuseRepeats


# --------------------------------------------------------------------------- run

_RUN_FLAGS = {
    "backend": "mode",
    "source": "source",
    "manifests": "manifests",
    "node": "hostname_override",
    "node_ip": "node_ips",
    "cluster_cidr": "cluster_cidr",
    "nodeport_addresses": "node_port_addresses",
    "masquerade_all": "masquerade_all",
    "sync_period": "sync_period",
    "min_sync_period": "min_sync_period",
    "kubeconfig": "kubeconfig",
    "master": "master",
    "log_format": "log_format",
    "log_level": "log_level",
    "netns": "netns",
    "backend_option": "backend_options",
    "healthz_bind_address": "healthz_bind_address",
    "metrics_bind_address": "metrics_bind_address",
    "healthz_stale_after": "healthz_stale_after",
    "conntrack_cleanup": "conntrack_cleanup",
    "detect_local_mode": "detect_local_mode",
    "pod_bridge_interface": "pod_bridge_interface",
    "pod_interface_name_prefix": "pod_interface_name_prefix",
    "iptables_localhost_nodeports": "iptables_localhost_nodeports",
    "service_cidr": "service_cidrs",
}


def _given_flags(ctx: click.Context, params: Mapping[str, Any]) -> dict[str, Any]:
    """Only the flags the user actually typed (so file and environment are not overridden)."""
    given: dict[str, Any] = {}
    for flag, field_name in _RUN_FLAGS.items():
        source = ctx.get_parameter_source(flag)
        if source is None or source.name == "DEFAULT":
            continue
        value = params[flag]
        if isinstance(value, tuple) and flag == "backend_option":
            value = ",".join(value)
        given[field_name] = value
    return given


@main.command()
@click.option(
    "--config",
    "config_file",
    type=click.Path(path_type=Path, exists=True),
    help="YAML configuration file (KubeProxyConfiguration-style field names).",
)
@click.option("--backend", "--mode", "backend", help="nftables, iptables, ipvs or userspace.")
@click.option("--source", type=click.Choice(["manifests", "kube"]), help="Where objects come from.")
@click.option("--manifests", multiple=True, help="Manifest directory or file (repeatable).")
@click.option("--node", help="This node's name (default: the host name).")
@explain.list_option(
    "--node-ip", "This node's IPs (repeatable and/or comma separated; default: from the Node)."
)
@explain.list_option(
    "--cluster-cidr",
    "Pod CIDRs (repeatable and/or comma separated; masquerade traffic from outside).",
)
@explain.list_option(
    "--nodeport-addresses",
    "CIDRs NodePorts answer on (repeatable and/or comma separated; default: all local addresses).",
)
@explain.list_option(
    "--service-cidr",
    "Service CIDRs (repeatable and/or comma separated; nftables: addresses in them that "
    "no Service has are dropped).",
)
@click.option(
    "--masquerade-all", is_flag=True, default=None, help="Masquerade all Service traffic."
)
@click.option("--sync-period", help="Periodic full sync (drift repair), e.g. 300s.")
@click.option("--min-sync-period", help="Minimum time between syncs, e.g. 1s.")
@click.option("--kubeconfig", help="Kubeconfig for --source kube (default: in-cluster).")
@click.option("--master", help="API server address, overriding the kubeconfig/in-cluster one.")
@click.option("--log-format", type=click.Choice(["auto", "console", "json"]))
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--netns", help="Program the rules inside this named network namespace.")
@click.option("--backend-option", multiple=True, help="Backend option key=value (repeatable).")
@click.option(
    "--iptables-mode",
    type=click.Choice(["auto", "nft", "legacy"]),
    help="iptables flavour for --backend iptables (same as --backend-option iptables_mode=).",
)
@click.option("--healthz-bind-address", help="Health server address (default 0.0.0.0:10256).")
@click.option("--metrics-bind-address", help="Metrics address (default 127.0.0.1:10249).")
@click.option("--healthz-stale-after", help="API unreachable this long → health says stale.")
@click.option(
    "--conntrack-cleanup/--no-conntrack-cleanup",
    default=None,
    help="Delete stale UDP conntrack entries after each sync (default on).",
)
@click.option(
    "--detect-local-mode",
    type=click.Choice(DETECT_LOCAL_MODES),
    help="How traffic from this node's pods is told (default ClusterCIDR; as kube-proxy).",
)
@click.option(
    "--pod-bridge-interface",
    help="The pods' bridge (--detect-local-mode BridgeInterface).",
)
@click.option(
    "--pod-interface-name-prefix",
    help="The pods' interface name prefix (--detect-local-mode InterfaceNamePrefix).",
)
@click.option(
    "--iptables-localhost-nodeports/--no-iptables-localhost-nodeports",
    default=None,
    help="iptables backend: NodePorts also on 127.0.0.1 (IPv4; sets route_localnet in the "
    "node's network namespace; default on, as kube-proxy).",
)
@click.option(
    "--write-config-to",
    type=click.Path(path_type=Path),
    help="Write the effective configuration here ('-' for stdout) and exit.",
)
@click.pass_context
def run(
    ctx: click.Context, /, config_file: Path | None, write_config_to: Path | None, **params: Any
) -> None:
    """Run the agent: watch the source and keep the backend programmed."""
    try:
        config = cfg.resolve(config_file, os.environ, _given_flags(ctx, params))
    except cfg.ConfigError as exc:
        _fail(str(exc))
        return
    if params["iptables_mode"] is not None:  # over the other backend options, from anywhere
        options = dict(config.backend_options) | {"iptables_mode": params["iptables_mode"]}
        config = replace(config, backend_options=tuple(sorted(options.items())))
    if write_config_to is not None:
        text = config.to_yaml()
        if str(write_config_to) == "-":
            click.echo(text, nl=False)
        else:
            write_config_to.write_text(text, encoding="utf-8")
        return
    logsetup.configure(config.log_format, config.log_level)
    tune_gc()
    try:
        backend = backends.create(config.mode, config.backend_config())
    except (KeyError, backends.BackendError) as exc:
        _fail(str(exc))
        return
    reason = backend.probe()
    if reason is not None:
        _fail(f"backend {config.mode} cannot run here: {reason}")
    try:
        source = _make_source(config)
    except cfg.ConfigError as exc:  # e.g. no usable kubeconfig for --source kube
        _fail(str(exc))
        return
    node_ips = config.node_ips
    agent = Agent(
        node_name=config.node_name(),
        source=source,
        backend=backend,
        times=config.runner_times(),
        node_override=_node_override(config.node_name(), node_ips)
        if node_ips or config.source == "manifests"
        else None,
        isolate=_isolation(backend, config),
    )
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_run_agent(agent, config))


def _isolation(backend: backends.Backend, config: cfg.AgentConfig) -> Attempt | None:
    """How a refused transaction is narrowed down to the service ports to blame.

    A backend's own dry run (``nft --check``, ``iptables-restore --test``) where it has
    one; else real applies in throwaway network namespaces, which needs CAP_SYS_ADMIN
    (root on a host; not the DaemonSet, whose container has NET_ADMIN and NET_RAW only).
    """
    check = getattr(backend, "check", None)
    if check is not None:
        return cast(Attempt, check)
    if os.geteuid() == 0:
        return ScratchNamespaces(lambda c: backends.create(config.mode, c), config.backend_config())
    return None


def _make_source(config: cfg.AgentConfig) -> Source:
    if config.source == "kube":
        kube: Any = importlib.import_module("kpy.sources.kube")
        source: Source = kube.KubeSource.from_config(config)
        return source
    return ManifestSource([Path(p) for p in config.manifests])


async def _run_agent(agent: Agent, config: cfg.AgentConfig) -> None:
    import signal

    log = structlog.get_logger("kpy.cli")
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    poster = getattr(agent.source, "post", None)
    ops = operations.attach(agent, config, poster=poster)
    try:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(ops.run(), name="operations")
            await agent.run()
    except asyncio.CancelledError:
        log.info("agent_stopped", note="programmed rules are kept; `kpy cleanup` removes them")


# --------------------------------------------------------------------------- offline views


def _offline_plan(
    manifests: tuple[str, ...],
    node: str,
    node_ips: tuple[str, ...],
    pod_cidrs: tuple[str, ...] = (),
) -> Plan:
    """Read manifests once and compute the Plan this node would apply."""
    override = _node_override(node, node_ips, pod_cidrs)
    return offline.manifest_plan([Path(p) for p in manifests], node, override)


@dataclass(frozen=True)
class _Offline:
    """The node an offline command computes for: its manifests, name, IPs, pod CIDRs,
    namespace and node flags (:func:`kpy.tools.explain.node_flags`)."""

    manifests: tuple[str, ...]
    node: str
    node_ips: tuple[str, ...]
    cluster_cidr: tuple[str, ...]
    netns: str | None
    flags: Mapping[str, Any]

    def plan(self) -> Plan:
        return _offline_plan(self.manifests, self.node, self.node_ips)

    def backend(self, name: str) -> backends.Backend:
        return _backend_for(
            name, self.node, self.node_ips, self.cluster_cidr, self.netns, self.flags
        )


def _offline_command(f: Callable[..., None]) -> Callable[..., None]:
    """The offline options, ``--netns`` and the node flags, given to ``f`` as one
    :class:`_Offline` (its first argument); ``f``'s own options follow as keywords."""

    @functools.wraps(f)
    def command(
        manifests: tuple[str, ...],
        node: str,
        node_ip: tuple[str, ...],
        cluster_cidr: tuple[str, ...],
        netns: str | None,
        **rest: Any,
    ) -> None:
        flags = {k: rest.pop(k) for k in explain.NODE_FLAG_DEFAULTS}
        f(_Offline(manifests, node, node_ip, cluster_cidr, netns, flags), **rest)

    opts = click.option("--netns", default=None, help="Observe the backend inside this namespace.")
    return cast(Callable[..., None], explain.offline_options(opts(explain.node_flags(command))))


def _backend_for(
    name: str,
    node: str,
    node_ips: tuple[str, ...],
    cluster_cidr: tuple[str, ...],
    netns: str | None,
    given: Mapping[str, Any] | None = None,
) -> backends.Backend:
    """The named backend with the node flags (a usage error names a bad one)."""
    try:
        options = explain.node_options(given or {}, node_ips, cluster_cidr, name)
        config = replace(trace.options_config(node, options), netns=netns)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    try:
        return backends.create(name, config)
    except (KeyError, backends.BackendError) as exc:
        raise click.UsageError(str(exc)) from None


@main.command("plan")
@_offline_command
@click.option("--backend", default=None, help="Render this backend's transaction (dry run).")
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text")
def plan_cmd(at: _Offline, backend: str | None, output: str) -> None:
    """Dry run: the next sync's Plan (and a backend's transaction) without applying it."""
    plan = at.plan()
    summary = {
        "node": at.node,
        "full_sync": plan.full_sync,
        "services": len(plan.services),
        "changed": sorted(str(k) for k in plan.changed),
        "stale_udp_flows": len(plan.stale_flows),
    }
    transaction = None
    if backend is not None:
        dry = getattr(at.backend(backend), "dry_run", None)
        if dry is None:
            _fail(f"backend {backend} cannot render a dry run")
            return
        transaction = asyncio.run(dry(plan))
    if output == "json":
        import json

        click.echo(json.dumps({**summary, "transaction": transaction}, indent=2))
        return
    click.echo(f"node {at.node}: {summary['services']} service ports, full sync: {plan.full_sync}")
    for key in sorted(str(k) for k in plan.changed):
        click.echo(f"  + {key}")
    if transaction is not None:
        click.echo(f"--- {backend} transaction ---")
        click.echo(transaction)


@main.command("dump")
@_offline_command
@click.option(
    "--backend",
    default=None,
    help="Also read back what this backend programmed (observe) and flag differences "
    "(its kernel objects: from what it renders with the node flags).",
)
@click.option("-o", "--output", type=click.Choice(["table", "json", "yaml"]), default="table")
def dump_cmd(at: _Offline, backend: str | None, output: str) -> None:
    """Every Service: type, frontends → endpoints with their state."""
    plan = at.plan()
    programmed = None
    differences: tuple[str, ...] = ()
    if backend is not None:
        b = at.backend(backend)
        programmed = asyncio.run(b.observe())
        compare = getattr(b, "differences", None)
        if compare is not None:
            differences = asyncio.run(compare(plan))
    data = dump.rows(plan, programmed, differences)
    click.echo(dump.render(data, output))
    if programmed is not None and any(r.get("drift") for r in data):
        sys.exit(1)


# --------------------------------------------------------------------------- backends, cleanup


@main.command("backends")
def backends_cmd() -> None:
    """List installed backends and whether each can run on this host."""
    for name, entry in backends.load_backends().items():
        if entry.factory is None:
            click.echo(f"{name:<12} broken: {entry.error}")
            continue
        try:
            reason = entry.factory(backends.BackendConfig()).probe()
        except Exception as exc:
            reason = f"probe failed: {exc}"
        click.echo(f"{name:<12} {'available' if reason is None else 'unavailable: ' + reason}")


@main.command("cleanup")
@click.option(
    "--backend",
    "names",
    multiple=True,
    help="Backend to clean up (repeatable; default: every installed backend).",
)
@click.option("--netns", default=None, help="Clean up inside this named network namespace.")
def cleanup_cmd(names: tuple[str, ...], netns: str | None) -> None:
    """Remove everything kpy programmed (its own tables, chains, services), nothing else.

    Exits 0 only when every backend cleaned up (or had nothing of kpy's: its kernel
    facility or tools are not there at all); a backend that could not clean — the
    kernel refused, did not answer, the namespace is missing — is named on stderr and
    the exit status is 1. There is no probe first: a backend's cleanup decides itself
    whether anything of kpy's can be there (a slow or failing probe never turns into
    a silent skip)."""
    entries = backends.load_backends()
    selected = names or tuple(entries)
    failed = []
    for name in selected:
        try:
            b = backends.create(name, backends.BackendConfig(netns=netns))
        except (KeyError, backends.BackendError) as exc:
            # not installed (unknown, or a plugin that does not load): nothing of it can
            # have been programmed by this kpy — an error only when asked for by name
            click.echo(f"{name}: not cleaned: {exc}", err=True)
            if names:
                failed.append(name)
            continue
        try:
            asyncio.run(b.cleanup())
        except Exception as exc:  # BackendError, or a backend's unexpected failure
            click.echo(f"{name}: cleanup failed: {exc}", err=True)
            failed.append(name)
            continue
        click.echo(f"{name}: cleaned up")
    if failed:
        click.echo(
            f"error: not cleaned up: {', '.join(failed)} (kpy's objects may remain)", err=True
        )
        sys.exit(1)


@main.command("version")
def version_cmd() -> None:
    """Print kpy's version."""
    click.echo(f"kpy {__version__}")


def _load_tracer(
    name: str, config: backends.BackendConfig
) -> Callable[[Plan, trace.Packet, trace.Origin], trace.Trace] | None:
    """The named backend's ``trace`` method, if it has one (creating a backend object
    touches no kernel state)."""
    try:
        instance = backends.create(name, config)
    except (KeyError, backends.BackendError) as exc:
        raise click.UsageError(str(exc)) from None
    tracer = getattr(instance, "trace", None)
    return tracer if callable(tracer) else None


main.add_command(explain.command(_offline_plan, _load_tracer))
main.lazy.update(lab=_command_of("kpy.tools.lab.lab"), check=_command_of("kpy.tools.check"))


@main.group("testing", cls=_LazyGroup)
def testing_cmd() -> None:
    """Development tools (a fake Kubernetes API server serving manifests)."""


# the fake API server lives with the test helpers (kpy.testing): imported only when run
cast(_LazyGroup, testing_cmd).lazy["apiserver"] = _command_of("kpy.testing.apiserver", "apiserver")


if __name__ == "__main__":  # pragma: no cover
    main()
