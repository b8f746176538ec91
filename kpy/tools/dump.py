"""What ``kpy dump`` shows: every Service port, its frontends and its endpoints.

Rows come from the desired state (a Plan); when a backend's ``observe()`` result is
given, each row also says what the kernel really holds and flags any difference —
the operator sees drift without reading rule text. Headless Services are listed with
their endpoints and ExternalName Services with their target; neither has a frontend.

With the backend's optional ``differences(plan)``, a last row names every kernel
object that is not as the backend renders it with the dump's node flags (``kpy dump
--service-cidr …``): flags other than the agent's, or drift in shared objects.

A backend that finds more than frontends and endpoints wrong (a rule missing from a
Service's chain, a set element gone) says so in the view's ``extra["drift"]``; a view
keyed ``(…)`` is about the backend's own objects rather than a Service (the nftables
backend's dispatch chains, say). Both are drift.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import yaml

from kpy.core.backend import Programmed, desired_view
from kpy.core.model import Endpoint, Plan, ServicePortState


def _endpoint_row(ep: Endpoint, state: ServicePortState, node: str) -> dict[str, Any]:
    conditions = [
        c
        for c, on in (("ready", ep.ready), ("serving", ep.serving), ("terminating", ep.terminating))
        if on
    ]
    used = []
    if ep in state.internal:
        used.append("internal")
    if ep in state.external:
        used.append("external")
    return {
        "address": str(ep),
        "node": ep.node_name or "",
        "local": ep.node_name == node,
        "conditions": conditions,
        "zone": ep.zone or "",
        "used_for": used,
    }


def _kind(state: ServicePortState) -> str:
    svc = state.service
    if svc.external_name is not None:
        return "ExternalName"
    if svc.headless:
        return "Headless"
    return str(svc.type)


OBJECTS_ROW = "(kernel objects)"
MAX_LISTED = 8  # objects named in the drift note; the rest are counted


def rows(
    plan: Plan,
    programmed: Programmed | None = None,
    differences: Iterable[str] = (),
) -> list[dict[str, Any]]:
    """One dict per service port, sorted by name; JSON-ready. ``differences`` (the
    backend's objects the kernel holds otherwise than it renders them for ``plan`` with
    the dump's node flags) make a last row."""
    result = []
    node = plan.node.name
    observed = dict(programmed.services) if programmed is not None else {}
    for name in sorted(plan.services):
        state = plan.services[name]
        svc = state.service
        view = desired_view(state)
        row: dict[str, Any] = {
            "service": str(name),
            "type": _kind(state),
            "frontends": list(view.frontends),
            "endpoints": [_endpoint_row(ep, state, node) for ep in state.endpoints],
            "policies": {
                "externalTrafficPolicy": str(svc.external_traffic_policy),
                "internalTrafficPolicy": str(svc.internal_traffic_policy),
                "sessionAffinity": str(svc.session_affinity)
                + (f" ({svc.affinity_timeout}s)" if svc.session_affinity == "ClientIP" else ""),
            },
        }
        if svc.external_name is not None:
            row["externalName"] = svc.external_name
        if svc.load_balancer_source_ranges:
            row["loadBalancerSourceRanges"] = [str(r) for r in svc.load_balancer_source_ranges]
        if svc.has_vip and not state.internal:
            row["note"] = "no usable endpoints: connections are rejected"
        conflicts = plan.conflicts.get(name, ())
        if conflicts:
            row["conflicts"] = [
                {
                    "frontend": c.frontend,
                    "claimedAs": c.claimed_as,
                    "heldBy": str(c.held_by),
                    "heldAs": c.held_as,
                }
                for c in conflicts
            ]
        reason = plan.refused.get(name)
        if reason is not None:
            row["refused"] = reason
        if programmed is not None:
            seen = observed.pop(str(name), None)
            if seen is None:
                row["programmed"] = None
                row["drift"] = bool(view.frontends)
            else:
                row["programmed"] = {
                    "frontends": sorted(seen.frontends),
                    "endpoints": sorted(seen.endpoints),
                    "extra": dict(seen.extra),
                }
                row["drift"] = (
                    sorted(seen.frontends) != list(view.frontends)
                    or sorted(seen.endpoints) != list(view.endpoints)
                    or "drift" in seen.extra
                )
        result.append(row)
    for key in sorted(observed):  # programmed but not desired: strays
        seen = observed[key]
        result.append(
            {
                "service": key,
                "type": "(backend)" if key.startswith("(") else "(stray)",
                "frontends": [],
                "endpoints": [],
                "programmed": {
                    "frontends": sorted(seen.frontends),
                    "endpoints": sorted(seen.endpoints),
                    "extra": dict(seen.extra),
                },
                "drift": True,
            }
        )
    differs = list(differences)
    if differs:
        result.append(_objects_row(differs))
    return result


def _objects_row(differs: list[str]) -> dict[str, Any]:
    note = "; ".join(differs[:MAX_LISTED])
    if len(differs) > MAX_LISTED:
        note += f"; and {len(differs) - MAX_LISTED} more"
    return {
        "service": OBJECTS_ROW,
        "type": "(backend)",
        "frontends": [],
        "endpoints": [],
        "note": "not as kpy renders them with these node flags: are they the agent's?",
        "programmed": {"frontends": [], "endpoints": [], "extra": {"drift": note}},
        "differs": differs,
        "drift": True,
    }


def render(data: list[dict[str, Any]], fmt: str) -> str:
    if fmt == "json":
        return json.dumps({"services": data}, indent=2, sort_keys=True)
    if fmt == "yaml":
        return yaml.safe_dump({"services": data}, sort_keys=True)
    return table(data)


def table(data: Iterable[dict[str, Any]]) -> str:
    """A cilium-style table: one line per frontend→endpoint pair group."""
    lines = [f"{'SERVICE':<44} {'TYPE':<13} {'FRONTEND':<28} ENDPOINTS"]
    for row in data:
        fronts = row["frontends"] or (
            [f"→ {row['externalName']} (CNAME)"] if "externalName" in row else ["(no VIP)"]
        )
        eps = [
            f"{e['address']} ({'/'.join(e['conditions']) or 'not ready'}"
            f"{', local' if e['local'] else ''}{', ' + e['node'] if e['node'] else ''})"
            for e in row["endpoints"]
        ] or ["(none)"]
        flag = ""
        if row.get("drift"):
            prog = row.get("programmed")
            flag = "  ! DRIFT: kernel holds " + (
                "nothing"
                if prog is None
                else f"{len(prog['frontends'])} frontends, {len(prog['endpoints'])} endpoints"
            )
            if prog is not None and prog["extra"].get("drift"):
                flag += f" ({prog['extra']['drift']})"
        for i in range(max(len(fronts), len(eps))):
            svc = row["service"] if i == 0 else ""
            kind = row["type"] if i == 0 else ""
            front = fronts[i] if i < len(fronts) else ""
            ep = eps[i] if i < len(eps) else ""
            lines.append(f"{svc:<44} {kind:<13} {front:<28} {ep}".rstrip())
        if row.get("note"):
            lines.append(f"{'':<44} {'':<13} {'':<28} {row['note']}")
        for c in row.get("conflicts", ()):
            lines.append(
                f"{'':<44}  ! CONFLICT: {c['frontend']} ({c['claimedAs']}) not served here:"
                f" held by {c['heldBy']} ({c['heldAs']})"
            )
        if row.get("refused"):
            lines.append(
                f"{'':<44}  ! REFUSED by the backend, last good state kept: {row['refused']}"
            )
        if flag:
            lines.append(f"{'':<44}{flag}")
    return "\n".join(lines)
