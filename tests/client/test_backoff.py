"""Backoff timings, exact, with an injected clock and random source; and the client using them."""

from __future__ import annotations

import asyncio
import itertools
import socket

import pytest

from perps_indexer.client import Backoff, Client, ConnectFailed, ConnectionState, StateChange


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_full_jitter_grows_by_factor_up_to_the_cap() -> None:
    draws = itertools.cycle([0.5, 1.0 - 2**-53, 0.0])
    backoff = Backoff(base=0.5, factor=2, cap=30, random=lambda: next(draws), clock=Clock())
    delays = [backoff.next_delay() for _ in range(9)]
    ceilings = [0.5, 1, 2, 4, 8, 16, 30, 30, 30]
    factors = [0.5, 1.0 - 2**-53, 0.0] * 3
    assert delays == [c * f for c, f in zip(ceilings, factors, strict=True)]
    assert backoff.attempts == 9


def test_no_jitter_and_decorrelated_jitter() -> None:
    plain = Backoff(base=1, factor=3, cap=20, jitter="none")
    assert [plain.next_delay() for _ in range(5)] == [1, 3, 9, 20, 20]
    draws = iter([0.5, 0.5, 1.0, 0.0])
    deco = Backoff(base=1, cap=10, jitter="decorrelated", random=lambda: next(draws))
    # min(cap, base + u * (3 * previous - base)), previous starting at base
    assert [deco.next_delay() for _ in range(4)] == [2.0, 3.5, 10, 1.0]


def test_a_healthy_connection_resets_the_backoff() -> None:
    clock = Clock()
    backoff = Backoff(base=1, cap=60, jitter="none", healthy_after=10, clock=clock)
    assert [backoff.next_delay() for _ in range(3)] == [1, 2, 4]
    backoff.succeeded()
    clock.now += 9.9  # not healthy long enough: keeps growing
    assert backoff.next_delay() == 8
    backoff.succeeded()
    clock.now += 10
    assert backoff.next_delay() == 1
    assert backoff.next_delay() == 2
    backoff.reset()
    assert backoff.next_delay() == 1


def test_a_long_outage_does_not_overflow() -> None:
    backoff = Backoff(base=0.5, cap=30, jitter="none")
    for _ in range(5000):
        assert backoff.next_delay() <= 30


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        Backoff(base=0)
    with pytest.raises(ValueError):
        Backoff(base=2, cap=1)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_the_client_waits_exactly_the_backoff_delays_then_gives_up() -> None:
    changes: list[StateChange] = []
    draws = iter([0.5, 0.25, 1.0 - 2**-53, 0.1])
    backoff = Backoff(base=0.01, factor=2, cap=0.03, random=lambda: next(draws))
    url = f"ws://127.0.0.1:{closed_port()}/ws"
    async with Client(url, backoff=backoff, max_retries=3, on_state=changes.append) as client:
        sub = client.subscribe("positions", address="0x1")
        with pytest.raises(ConnectFailed, match="gave up after 4 attempts"):
            await asyncio.wait_for(anext(sub), 5)
    waits = [c.delay for c in changes if c.state is ConnectionState.DISCONNECTED]
    assert waits == [0.01 * 0.5, 0.02 * 0.25, 0.03 * (1.0 - 2**-53)]
    assert [c.attempt for c in changes if c.state is ConnectionState.DISCONNECTED] == [1, 2, 3]
    assert changes[-1].state is ConnectionState.CLOSED
