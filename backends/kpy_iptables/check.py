"""Would the kernel take these service ports? A dry run with ``iptables-restore --test``.

The agent asks this when a transaction was refused, to find the service ports to blame
(:mod:`kpy.agent.quarantine`). A check renders the plan's ports as a node's first sync would —
every chain and rule added — and hands each family's text to ``iptables-restore --test
--noflush`` in the node's namespace (in batches of a few thousand lines, see
:func:`texts`): the tool parses it and builds the transaction but commits nothing, so
nothing is changed and no scratch namespace (which would need CAP_SYS_ADMIN) is needed.
"""

from __future__ import annotations

from kpy.core import diff
from kpy.core.backend import BackendConfig
from kpy.core.model import Plan
from kpy.kernel import proc
from kpy_iptables import render
from kpy_iptables.apply import in_netns, tool

BATCH_LINES = 2_500  # iptables-nft-restore slows down more than linearly past a few thousand


def texts(plan: Plan, ctx: render.Context) -> list[dict[int, str]]:
    """Restore inputs that add every object of ``plan``'s ports: per batch, per family.

    A port's chains reference only each other and the fixed chains, so the ports are
    checked in batches of about :data:`BATCH_LINES` lines, each with the fixed part:
    ``iptables-nft-restore`` takes many small inputs far faster than one large one
    (10,000 Services in one input: ~20 s; in batches: linear).
    """
    fixed: render.Objects = {}
    for family in ctx.families:
        fixed.update(render.base(ctx, family))
    batches: list[render.Objects] = []
    batch: render.Objects = {}
    lines = 0
    for objs in render.render(plan, ctx).values():
        if batch and lines >= BATCH_LINES:
            batches.append(batch)
            batch, lines = {}, 0
        batch.update(objs)
        lines += sum(1 + len(rules) for rules in objs.values())
    if batch or not batches:
        batches.append(batch)
    result = []
    for objs in batches:
        inputs = render.restores(diff.compute({}, {**fixed, **objs}), None)
        result.append({f: "".join(r.text for r in restores) for f, restores in inputs.items()})
    return result


def argv(config: BackendConfig, mode: str, family: int) -> list[str]:
    return in_netns(config.netns, [tool(mode, family, "restore"), "--test", "--noflush"])


async def check(plan: Plan, config: BackendConfig, ctx: render.Context, mode: str) -> str | None:
    """None when ``iptables-restore`` would accept ``plan``'s ports, else why not."""
    ctx = render.with_node(ctx, config, plan.node)  # as a full sync renders
    for batch in texts(plan, ctx):
        for family, text in sorted(batch.items()):
            reason = await _test(config, mode, family, text)
            if reason is not None:
                return reason
    return None


async def _test(config: BackendConfig, mode: str, family: int, text: str) -> str | None:
    status, _, err = await proc.communicate(argv(config, mode, family), text.encode())
    if status == 0:
        return None
    return proc.failure(f"{tool(mode, family, 'restore')} --test", status, err)
