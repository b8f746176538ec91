"""An in-memory backend: records every Plan and "programs" the desired views.

For tests of the runner, the agent and the CLI, injected where a real backend would be
(no monkeypatching). It can be told to fail the next applies.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from kpy.core import diff
from kpy.core.backend import (
    ApplyResult,
    BackendConfig,
    BackendError,
    Programmed,
    ServiceView,
    desired_view,
)
from kpy.core.model import Plan, ServicePortState


@dataclass
class FakeBackend:
    config: BackendConfig = field(default_factory=BackendConfig)
    name: str = "fake"
    fail_next: int = 0
    plans: list[Plan] = field(default_factory=list)
    programmed: dict[str, ServiceView] = field(default_factory=dict)
    unavailable: str | None = None
    # A poison pill: a port state this returns a reason for makes every transaction that
    # would write it fail (a full sync writes every port; a partial one the changed ones).
    refuse: Callable[[ServicePortState], str | None] | None = None

    def probe(self) -> str | None:
        return self.unavailable

    async def apply(self, plan: Plan) -> ApplyResult:
        if self.fail_next > 0:
            self.fail_next -= 1
            raise BackendError("injected failure")
        if self.refuse is not None:
            written = plan.services.keys() if plan.full_sync else plan.changed
            for name in written:
                state = plan.services.get(name)
                reason = self.refuse(state) if state is not None else None
                if reason is not None:
                    raise BackendError(f"transaction refused: {reason}")
        self.plans.append(plan)
        if plan.full_sync:
            desired = {str(k): desired_view(s) for k, s in plan.services.items()}
            change = diff.compute(self.programmed, desired)
            ops = len(change)
            for key, _ in change.removed:
                del self.programmed[key]
            self.programmed.update(desired)
        else:
            ops = 0
            for removed in plan.removed:
                ops += self.programmed.pop(str(removed), None) is not None
            for changed in plan.changed:
                state = plan.services.get(changed)
                if state is not None:
                    self.programmed[str(changed)] = desired_view(state)
                    ops += 1
        return ApplyResult(full_sync=plan.full_sync, ops=ops, size=ops, size_unit="views")

    async def observe(self) -> Programmed:
        return Programmed(
            backend=self.name, objects=dict(self.programmed), services=dict(self.programmed)
        )

    async def cleanup(self) -> None:
        self.programmed.clear()
