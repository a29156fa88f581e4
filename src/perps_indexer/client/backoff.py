"""Reconnect delays: exponential backoff with jitter and a cap, reset after a healthy period.

Pure: the clock and the random source are injected, so timings can be tested exactly.
"""

from __future__ import annotations

import random as _random
import time
from collections.abc import Callable
from typing import Literal

Jitter = Literal["full", "decorrelated", "none"]


class Backoff:
    """Delays between connection attempts.

    ``next_delay()`` after each failure; ``succeeded()`` when a connection is up. Once a
    connection has stayed up for ``healthy_after`` seconds, the next failure starts again
    from ``base``.

    Jitter (``u`` is a draw from ``random()`` in [0, 1)):

    - ``"full"``: ``u * min(cap, base * factor^n)`` for the n-th consecutive failure;
    - ``"decorrelated"``: ``min(cap, base + u * (3 * previous - base))``;
    - ``"none"``: ``min(cap, base * factor^n)``.
    """

    def __init__(
        self,
        base: float = 0.5,
        factor: float = 2.0,
        cap: float = 30.0,
        *,
        jitter: Jitter = "full",
        healthy_after: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        random: Callable[[], float] = _random.random,
    ) -> None:
        if base <= 0 or cap < base or factor < 1:
            raise ValueError("backoff needs 0 < base <= cap and factor >= 1")
        self.base = base
        self.factor = factor
        self.cap = cap
        self.jitter = jitter
        self.healthy_after = healthy_after
        self.clock = clock
        self.random = random
        self.attempts = 0
        """Consecutive failures since the last reset."""
        self._previous = base
        self._up_since: float | None = None

    def clone(self) -> Backoff:
        """A fresh backoff with the same settings, clock and random source."""
        return Backoff(
            self.base,
            self.factor,
            self.cap,
            jitter=self.jitter,
            healthy_after=self.healthy_after,
            clock=self.clock,
            random=self.random,
        )

    def reset(self) -> None:
        """Start again from ``base``."""
        self.attempts = 0
        self._previous = self.base
        self._up_since = None

    def succeeded(self) -> None:
        """A connection is up: start timing its healthy period."""
        self._up_since = self.clock()

    def next_delay(self) -> float:
        """Seconds to wait before the next attempt (call once per failure)."""
        if self._up_since is not None and self.clock() - self._up_since >= self.healthy_after:
            self.reset()
        self._up_since = None
        # The exponent is bounded so that a long outage cannot overflow a float.
        ceiling = min(self.cap, self.base * self.factor ** min(self.attempts, 64))
        self.attempts += 1
        if self.jitter == "full":
            return self.random() * ceiling
        if self.jitter == "decorrelated":
            delay = min(self.cap, self.base + self.random() * (3 * self._previous - self.base))
            self._previous = delay
            return delay
        return ceiling
