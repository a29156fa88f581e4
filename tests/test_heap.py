"""The garbage-collection policy: when it freezes and collects, and that it does, for real."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from perps_indexer.heap import (
    MALLOC_VARIABLES,
    OLD_THRESHOLD,
    HeapPolicy,
    full_collection,
    keep_heap,
    keep_large_blocks,
    on_glibc,
)


@pytest.fixture
def unfrozen() -> Iterator[None]:
    """These tests freeze this process's heap: give it back afterwards."""
    gc.unfreeze()
    yield
    gc.unfreeze()


def test_policy_freezes_on_its_period_and_collects_in_full_on_its_own() -> None:
    policy = HeapPolicy(freeze_every=10, full_every=35, now=100)
    assert policy.sleep_for(100) == 10
    assert [policy.due(t) for t in (105, 110, 115, 120, 130)] == [
        None,
        "freeze",
        None,
        "freeze",
        "freeze",
    ]
    assert policy.sleep_for(131) == 4  # the full collection at 135 comes first
    assert policy.due(135) == "full"
    assert policy.due(140) is None  # a full collection also froze: the next freeze is at 145
    assert policy.due(145) == "freeze"
    assert policy.due(170) == "full"


def test_policy_without_full_collections() -> None:
    policy = HeapPolicy(freeze_every=1, full_every=0, now=0)
    assert {policy.due(t) for t in range(1, 10_000)} == {"freeze"}


@pytest.mark.parametrize(("freeze", "full"), [(0, 10), (-1, 10), (1, -1)])
def test_policy_refuses_meaningless_periods(freeze: float, full: float) -> None:
    with pytest.raises(ValueError, match="must be"):
        HeapPolicy(freeze, full, now=0)


class Cycle:
    def __init__(self) -> None:
        self.me = self


def test_full_collection_frees_cycles_the_frozen_heap_held(unfrozen: None) -> None:
    gc.collect()
    garbage = [Cycle() for _ in range(100)]
    gc.freeze()  # the cycles are frozen while alive ...
    del garbage  # ... and become garbage: an ordinary collection cannot see them
    assert gc.collect() == 0
    freed, paused = full_collection()
    assert freed >= 100 and paused >= 0
    assert gc.get_freeze_count() > 0  # frozen again afterwards


def test_keep_heap_freezes_what_survives(unfrozen: None) -> None:
    async def run() -> int:
        task = asyncio.create_task(keep_heap(freeze_every=0.02, full_every=0))
        await asyncio.sleep(0.1)
        task.cancel()
        return gc.get_freeze_count()

    assert gc.get_freeze_count() == 0
    assert asyncio.run(run()) > 0


def test_keep_heap_makes_old_collections_rare_while_it_runs(unfrozen: None) -> None:
    """The oldest generation's automatic collections scan what survived since the last freeze
    and freed nothing there: the policy raises their threshold, and gives the process its own
    back when it stops."""
    before = gc.get_threshold()

    async def run() -> tuple[int, int, int]:
        task = asyncio.create_task(keep_heap(freeze_every=0.02, full_every=0))
        await asyncio.sleep(0.05)
        during = gc.get_threshold()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return during

    during = asyncio.run(run())
    assert during == (before[0], before[1], OLD_THRESHOLD)
    assert gc.get_threshold() == before


GLIBC = on_glibc()

# Two 400 KiB blocks alive at once, then both freed, 200 times: the pattern of a large
# history's message and its frame. Prints what keep_large_blocks returned and the minor page
# faults the loop took.
_LARGE_BLOCKS = """
import resource, sys
from perps_indexer.heap import keep_large_blocks
kept = keep_large_blocks(4) if sys.argv[1] == "keep" else None
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(200):
    message = b"m" * (400 * 1024)  # written, every page (bytes(n) may get untouched zeroes)
    frame = b"f" * (400 * 1024)
    del message, frame
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def large_blocks(mode: str, **env: str) -> tuple[str, int]:
    clean = {k: v for k, v in os.environ.items() if k not in MALLOC_VARIABLES}
    done = subprocess.run(
        [sys.executable, "-c", _LARGE_BLOCKS, mode],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env=clean | env,
    )
    kept, faults = done.stdout.split()
    return kept, int(faults)


@pytest.mark.skipif(not GLIBC, reason="tunes glibc's malloc")
def test_large_blocks_kept_in_the_heap_take_no_page_faults() -> None:
    _, default = large_blocks("default")
    kept, faults = large_blocks("keep")
    assert kept == "True"
    # By default every round maps (or regrows) and zeroes ~200 pages; kept, the heap serves
    # them again: a few hundred faults in all instead of thousands.
    assert default > 2_000
    assert faults < default / 5


@pytest.mark.skipif(not GLIBC, reason="tunes glibc's malloc")
def test_an_operators_malloc_setting_in_the_environment_rules() -> None:
    kept, faults = large_blocks("keep", MALLOC_TRIM_THRESHOLD_="131072")
    assert kept == "False"  # left alone: the operator's setting stays in force
    assert faults > 2_000


@pytest.mark.skipif(not GLIBC, reason="tunes glibc's malloc")
def test_glibc_tunables_of_malloc_rule_and_others_do_not() -> None:
    kept, _ = large_blocks("keep", GLIBC_TUNABLES="glibc.malloc.trim_threshold=131072")
    assert kept == "False"
    kept, faults = large_blocks("keep", GLIBC_TUNABLES="glibc.cpu.x86_shstk=permissive")
    assert kept == "True" and faults < 2_000


@pytest.mark.parametrize("mib", [0, -1, 33])
def test_keep_large_blocks_takes_a_size_glibc_allows(mib: int) -> None:
    with pytest.raises(ValueError, match="mib must be 1 to 32"):
        keep_large_blocks(mib)
