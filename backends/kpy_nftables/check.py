"""Would the kernel take these service ports? A dry run with ``nft --check``.

The agent asks this when a transaction was refused, to find the service ports to blame
(:mod:`kpy.agent.quarantine`). A check renders the plan's ports as a node's first sync would —
kpy's tables deleted and made anew, the fixed part, then every port's sets, chains,
rules and elements — and hands the script to ``nft --check`` in the node's namespace:
the kernel validates the whole batch against the live ruleset and then aborts it, so
nothing is changed, and no scratch namespace (which would need CAP_SYS_ADMIN) is needed.
"""

from __future__ import annotations

from kpy.core.backend import BackendConfig
from kpy.core.model import Plan
from kpy.kernel import proc
from kpy_nftables import render

NFT = "nft"


def script(plan: Plan, config: BackendConfig) -> str:
    """The first-sync script of ``plan``'s ports, preceded by the removal of kpy's tables."""
    config = config.for_plan(plan)  # as apply renders: with the Node's addresses
    want: dict[str, render.Obj] = dict(render.base_objects(config))
    for state in plan.services.values():
        want.update(render.port_objects(state, config))
    body = render.transaction(want, {}, want.keys(), group=True).script
    reset = []
    for nf in render.FAMILIES:
        for table in (render.TABLE, *render.shard_tables()):
            # "add" first makes the "delete" valid whether or not the table exists.
            reset.append(f"add table {nf} {table}\ndelete table {nf} {table}\n")
    return "".join(reset) + body


def argv(config: BackendConfig) -> list[str]:
    return proc.in_netns(config.netns, [NFT, "--check", "-f", "-"])


async def check(plan: Plan, config: BackendConfig) -> str | None:
    """None when ``nft`` and the kernel would accept ``plan``'s ports, else why not."""
    status, _, err = await proc.communicate(argv(config), script(plan, config).encode())
    return None if status == 0 else proc.failure("nft --check", status, err)
