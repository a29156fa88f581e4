"""The server process's memory policy: garbage collection, and glibc's malloc.

CPython's full collections scan every tracked object. A server holding 10,000 connections
tracks a few million objects, and a full collection of them paused it for 0.5-0.9 s, several
times a minute under load (BENCHMARKS.md, scenario 2): every stream stalled meanwhile. Almost
all of that heap is long-lived (the replayed state, the connections), and a scan of it finds
nothing to free.

The policy: every ``freeze_every`` seconds, move what survived so far into the permanent
generation (:func:`gc.freeze`, a constant-time splice), so automatic collections scan only what
was allocated since. Cyclic garbage among frozen objects (a few objects per closed connection)
is not freed until the next scheduled full collection: every ``full_every`` seconds the heap is
unfrozen, collected in full and frozen again, one pause (logged with its length) instead of
many. ``full_every = 0`` never does that (memory held by such garbage then grows with the
connections closed).

The serve command freezes every second: connections made in a burst are out of the scans
before an automatic full collection finds them (at 10 s, the first such collection after
10,000 connections still paused the server for 0.5 s; at 1 s none did; BENCHMARKS.md).
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import os
import platform
import time
from typing import Final, Literal

log = logging.getLogger(__name__)

Action = Literal["freeze", "full"]

OLD_THRESHOLD: Final = 1_000
"""Collections of the middle generation between two automatic collections of the oldest while
the policy runs (CPython's default: 10). With the heap frozen every second, the oldest
generation holds only what survived since the last freeze; its automatic collections freed
nothing there (``collected: 0``) and paused the server 9-27 ms at scenario 6's order rate and
44-105 ms with scenario 2's 10,000 connections, several times a minute (BENCHMARKS.md). The
freeze and the scheduled full collection do their work."""


class HeapPolicy:
    """When to freeze and when to collect in full (no I/O; the caller passes the time)."""

    def __init__(self, freeze_every: float, full_every: float, now: float) -> None:
        if freeze_every <= 0:
            raise ValueError(f"freeze_every must be positive, got {freeze_every}")
        if full_every < 0:
            raise ValueError(f"full_every must be 0 (never) or positive, got {full_every}")
        self.freeze_every = freeze_every
        self.full_every = full_every
        self._next_freeze = now + freeze_every
        self._next_full = now + full_every if full_every else None

    def due(self, now: float) -> Action | None:
        """The action due at ``now``, if any; a full collection also freezes afterwards."""
        if self._next_full is not None and now >= self._next_full:
            self._next_full = now + self.full_every
            self._next_freeze = now + self.freeze_every
            return "full"
        if now >= self._next_freeze:
            self._next_freeze = now + self.freeze_every
            return "freeze"
        return None

    def sleep_for(self, now: float) -> float:
        """Seconds until the next action."""
        nxt = self._next_freeze
        if self._next_full is not None:
            nxt = min(nxt, self._next_full)
        return max(0.0, nxt - now)


def full_collection() -> tuple[int, float]:
    """Unfreeze, collect everything, freeze again; returns (objects freed, seconds paused)."""
    started = time.perf_counter()
    gc.unfreeze()
    freed = gc.collect()
    gc.freeze()
    return freed, time.perf_counter() - started


async def keep_heap(freeze_every: float, full_every: float) -> None:
    """Apply :class:`HeapPolicy` to this process until cancelled, with the oldest generation's
    automatic collections made rare (:data:`OLD_THRESHOLD`; restored when cancelled)."""
    clock = time.monotonic
    policy = HeapPolicy(freeze_every, full_every, clock())
    young, middle, old = gc.get_threshold()
    gc.set_threshold(young, middle, OLD_THRESHOLD)
    try:
        while True:
            await asyncio.sleep(policy.sleep_for(clock()))
            action = policy.due(clock())
            if action == "freeze":
                gc.freeze()
            elif action == "full":
                freed, paused = full_collection()
                log.info(
                    "scheduled full garbage collection: %d objects freed, %.0f ms paused, "
                    "%d objects frozen",
                    freed,
                    paused * 1000,
                    gc.get_freeze_count(),
                )
    finally:
        gc.set_threshold(young, middle, old)


# mallopt(3) parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD: Final = -1
_M_MMAP_THRESHOLD: Final = -3
MAX_KEEP_MIB: Final = 32
"""glibc's cap on its mmap threshold on 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX)."""


MALLOC_VARIABLES: Final = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")
"""The environment variables through which an operator sets glibc's malloc (the last only
for its ``glibc.malloc.`` tunables)."""


def on_glibc() -> bool:
    """True when this process runs on Linux with glibc, whose malloc :func:`keep_large_blocks`
    tunes."""
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def malloc_environment() -> str | None:
    """The operator's setting of glibc's malloc in the environment, if there is one."""
    *thresholds, tunables = MALLOC_VARIABLES
    for name in thresholds:
        if os.environ.get(name):
            return name
    if "glibc.malloc." in os.environ.get(tunables, ""):
        return tunables
    return None


def keep_large_blocks(mib: int) -> bool:
    """Have glibc's malloc serve blocks of up to ``mib`` MiB from its heap, and keep up to
    twice that free at the heap's top, instead of mapping fresh zeroed pages for every large
    block and returning them when it is freed. Logs what it did; False where it did nothing:
    not glibc, or an operator's setting in the environment (:func:`malloc_environment`).

    Why: by default glibc maps a block of 128 KiB or more on its own and unmaps it when it is
    freed, and trims its heap once 128 KiB lie free at the top (thresholds that it raises
    when a mapped block is freed, but not past two such blocks alive at once). A message
    of a large history (1,000 rows, 345 KB), its id spliced in and its frame are such blocks,
    made and freed on every push: each paid a page fault and a page zeroed per 4 KiB. Building
    a 1,000-row message took 351-429 µs so, and 35-40 µs from the heap (BENCHMARKS.md).
    What this costs: up to ``2 * mib`` MiB freed at the heap's top stays with the process.
    """
    if not 0 < mib <= MAX_KEEP_MIB:
        raise ValueError(f"mib must be 1 to {MAX_KEEP_MIB}, got {mib}")
    if not on_glibc():
        log.info("malloc: left as it is (the C library is not glibc)")
        return False
    setting = malloc_environment()
    if setting is not None:
        log.info("malloc: left as %s sets it", setting)
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    if mallopt(_M_MMAP_THRESHOLD, mib << 20) != 1 or mallopt(_M_TRIM_THRESHOLD, mib << 21) != 1:
        log.warning("malloc: glibc refused the thresholds for %d MiB", mib)
        return False
    log.info("malloc: blocks up to %d MiB from the heap, up to %d MiB kept free", mib, 2 * mib)
    return True
