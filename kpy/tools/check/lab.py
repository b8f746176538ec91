"""``kpy check`` against the namespace lab: the lab's Plans, executors and agents."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kpy.core import backend as backends
from kpy.tools.check.checks import ClusterView, Result, catalog, plans, plans_from_objects
from kpy.tools.check.probes import Executor, LabExecutor, ShellExecutor, lab_shell, run_checks


def lab_observer(state: Any) -> Callable[[str, str], bool]:
    """``observed(node, service_port)`` from each lab node's backend (read from the kernel)."""
    cache: dict[str, backends.Programmed] = {}
    cluster = state.cluster()

    def observed(node: str, key: str) -> bool:
        if node not in cache:
            info = cluster.node(node)
            config = backends.BackendConfig(
                node_name=node, node_ips=(info.ip, info.ip6), netns=info.netns.name
            )
            cache[node] = asyncio.run(backends.create(state.backend, config).observe())
        view = cache[node].services.get(key)
        return view is not None and bool(view.frontends)

    return observed


def check_lab(
    manifests: Sequence[Path] | None = None,
    *,
    on_result: Callable[[Result], None] | None = None,
    only: Sequence[str] = (),
    state_dir: Path | None = None,
    run_commands: bool = False,
) -> list[Result]:
    """Run the whole catalog against the running lab (``kpy lab up``).

    ``run_commands`` runs the shown commands themselves (curl, nc) in the namespaces
    instead of opening the same connections from this process: slower, and proof that
    the commands a reader would copy do what the checks say.
    """
    from kpy.tools.lab import lab  # the lab module pulls in process management only when used

    state = lab.load(state_dir or lab.STATE_DIR)
    if state is None:
        raise lab.LabError("no lab is up (kpy lab up)")
    cluster = state.cluster()
    view = ClusterView.of(cluster)
    if state.real and not manifests:  # the objects as the real API server has them now
        node_plans = plans_from_objects(lab.api_objects(state), view.nodes)
    else:
        node_plans = plans(list(manifests) if manifests else [Path(state.manifests)], view)
    checks = catalog(node_plans, view, observed=lab_observer(state))
    if only:
        checks = [c for c in checks if any(o in c.service for o in only)]
    executor: Executor = ShellExecutor(lab_shell(cluster)) if run_commands else LabExecutor(cluster)
    return run_checks(checks, executor, on_result)


# --------------------------------------------------------------------------- a real cluster
