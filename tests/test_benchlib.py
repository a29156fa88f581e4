"""bench/benchlib.py's readings of the host, which the suite prints beside its figures."""

from __future__ import annotations

import sys

import pytest

from benchlib import cpu_ticks, steal_share  # bench/, on pytest's pythonpath


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/stat")
def test_cpu_ticks_reads_the_cpus_own_line() -> None:
    stolen, total = cpu_ticks(0)
    assert 0 <= stolen <= total and total > 0
    later = cpu_ticks(0)
    assert later[1] >= total and later[0] >= stolen  # counters since boot
    assert cpu_ticks(10_000) == (0, 0)  # no such CPU


def test_steal_share_is_the_stolen_part_of_the_ticks_between_readings() -> None:
    assert steal_share((5, 1_000), (15, 1_100)) == pytest.approx(0.1)
    assert steal_share((5, 1_000), (5, 1_000)) == 0.0  # no tick passed: nothing to divide
