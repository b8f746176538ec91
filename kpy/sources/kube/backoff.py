"""Jittered exponential backoff between retries (client-go's reflector uses 800 ms → 30 s)."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class BackoffPolicy:
    """Jittered exponential backoff (client-go's reflector uses 800 ms → 30 s)."""

    initial: float = 0.8
    maximum: float = 30.0
    factor: float = 2.0
    jitter: float = 0.5  # ± this fraction
    max_retry_after: float = 300.0  # a Retry-After above this is capped


class Backoff:
    def __init__(self, policy: BackoffPolicy, rng: random.Random | None = None) -> None:
        self.policy = policy
        self._attempt = 0
        self._rng = rng or random.Random()

    def reset(self) -> None:
        self._attempt = 0

    def next(self, retry_after: float | None = None) -> float:
        p = self.policy
        base = min(p.maximum, p.initial * p.factor**self._attempt)
        self._attempt = min(self._attempt + 1, 64)
        delay = base * (1 + self._rng.uniform(-p.jitter, p.jitter))
        if retry_after is not None:
            # The server said when: wait that long (plus a little jitter, so a fleet of
            # agents throttled together does not come back together).
            delay = min(retry_after, p.max_retry_after) + self._rng.uniform(0, p.initial / 4)
        return delay
