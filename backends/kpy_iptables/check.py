"""Would the kernel take these service ports? A dry run with ``iptables-restore --test``.

The agent asks this when a transaction was refused, to find the service ports to blame
(:mod:`kpy.quarantine`). A check renders the plan's ports as a node's first sync would —
every chain and rule added — and hands each family's text to ``iptables-restore --test
--noflush`` in the node's namespace: the tool parses it and builds the transaction but
commits nothing, so nothing is changed and no scratch namespace (which would need
CAP_SYS_ADMIN) is needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses

from kpy import diff
from kpy.backend import BackendConfig
from kpy.model import Plan
from kpy_iptables import render
from kpy_iptables.apply import tool


def texts(plan: Plan, ctx: render.Context) -> dict[int, str]:
    """Per family, the restore input that adds every object of ``plan``'s ports."""
    want = render.desired(ctx, render.render(plan, ctx))
    inputs = render.restores(diff.compute({}, want), None)
    return {family: "".join(r.text for r in restores) for family, restores in inputs.items()}


def argv(config: BackendConfig, mode: str, family: int) -> list[str]:
    command = [tool(mode, family, "restore"), "--test", "--noflush"]
    if config.netns:
        return ["nsenter", f"--net=/run/netns/{config.netns}", "--", *command]
    return command


async def check(plan: Plan, config: BackendConfig, ctx: render.Context, mode: str) -> str | None:
    """None when ``iptables-restore`` would accept ``plan``'s ports, else why not."""
    ctx = dataclasses.replace(ctx, pod_cidrs=plan.node.pod_cidrs)
    for family, text in sorted(texts(plan, ctx).items()):
        proc = await asyncio.create_subprocess_exec(
            *argv(config, mode, family),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            _, err = await proc.communicate(text.encode())
        except asyncio.CancelledError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise
        if proc.returncode != 0:
            detail = err.decode(errors="replace").strip().splitlines()
            name = tool(mode, family, "restore")
            return f"{name} --test exited {proc.returncode}: {' / '.join(detail[:3])[:500]}"
    return None
