"""The venue service: the in-memory window and the store-backed reads agree."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from perps_indexer import commands
from perps_indexer.markets import default_markets
from perps_indexer.session import Session
from perps_indexer.store import SQLiteStore
from perps_indexer.venue import Venue
from tests.sinks import ByteSink, framed_header, unframe

A = "0x" + "a" * 64


def test_order_history_order_is_the_same_from_memory_and_from_the_store(tmp_path: Path) -> None:
    clock = iter(range(1_000, 10_000_000, 1_000))
    with SQLiteStore(tmp_path / "v.db") as store:
        venue = Venue(default_markets(), store, clock=lambda: next(clock))
        venue.execute(commands.Deposit(address=A, amount=100_000_000))
        venue.execute(order(6000, size=1000))
        # An ask that crosses A's own bid: the bid is cancelled (self-trade prevention) after
        # the ask was placed, then the ask rests. The ask's last event is the newest.
        venue.execute(order(5990, size=800, long=False))
        window = venue.order_history(A)  # the in-memory window
        deep = venue.order_history(A, 1_000)  # beyond the window: read from the store
        assert [r.status for r in window] == ["Open", "Cancelled"]
        assert deep == window
        resumed = json.loads(venue.resume("order_history", A, 0))["data"]
        assert [r["order_id"] for r in resumed] == [r.order_id for r in window]


def order(price: int, *, size: int = 500, long: bool = True) -> commands.PlaceLimitOrder:
    """A 2x limit order of A opening a position in market 396."""
    return commands.PlaceLimitOrder(
        address=A,
        market_id=396,
        is_long=long,
        is_close=False,
        size=size,
        price=price,
        leverage=2,
    )


@contextmanager
def book_watched(path: Path, commit_batch: int) -> Iterator[tuple[SQLiteStore, Venue, Session]]:
    """A venue on a fresh store, A funded, and a session watching market 396's book."""
    with SQLiteStore(path) as store:
        venue = Venue(default_markets(), store, clock=lambda: 1_000, commit_batch=commit_batch)
        venue.execute(commands.Deposit(address=A, amount=100_000_000))
        watcher = Session(venue.hub, venue, venue.markets, now=0.0)
        watcher.subscribe("orderbook", 396)
        watcher.take()
        yield store, venue, watcher


async def test_one_loop_turn_is_one_commit_and_one_push_per_stream(tmp_path: Path) -> None:
    with book_watched(tmp_path / "g.db", commit_batch=0) as (store, venue, watcher):
        commits = venue.commits
        futures = [venue.submit(order(5000 + i)) for i in range(10)]
        # Not yet durable, so not yet visible: the read models still show the old book.
        assert venue.projections.orderbook(396) == []
        assert store.last_seq() == 1
        outcomes = [await f for f in futures]
        assert venue.commits == commits + 1
        assert store.last_seq() == venue.engine.seq == 1 + 10 * 2
        assert len({o.order.order_id for o in outcomes}) == 10
        # One push for the whole burst, holding all ten levels.
        (pushed,) = watcher.take()
        assert len(json.loads(pushed)["data"]) == 10


async def test_a_burst_is_committed_in_groups_of_commit_batch_in_order(tmp_path: Path) -> None:
    with book_watched(tmp_path / "b.db", commit_batch=4) as (store, venue, watcher):
        commits = venue.commits
        appended: list[tuple[int, int]] = []
        append = store.append

        def spy(events: list[object]) -> None:
            append(events)  # type: ignore[arg-type]
            appended.append((events[0].seq, events[-1].seq))  # type: ignore[attr-defined]

        store.append = spy  # type: ignore[method-assign]
        futures = [venue.submit(order(5000 + i)) for i in range(10)]
        await asyncio.sleep(0)  # one turn: the first group only
        assert [f.done() for f in futures] == [True] * 4 + [False] * 6
        assert store.last_seq() == 1 + 4 * 2
        late = venue.submit(order(4000))  # arrives while the burst is being committed
        outcomes = [await f for f in [*futures, late]]
        # Groups of 4 in submission order, the late one after the burst: 4 + 4 + 3.
        assert venue.commits == commits + 3
        assert appended == [(2, 9), (10, 17), (18, 23)]
        assert [o.events[0].seq for o in outcomes] == list(range(2, 24, 2))
        assert store.last_seq() == venue.engine.seq == venue.projections.seq == 23
        # The subscriber's pending state was replaced by each newer one: it holds all 11.
        (pushed,) = watcher.take()
        assert len(json.loads(pushed)["data"]) == 11


async def test_execute_commits_what_a_burst_left_pending_first(tmp_path: Path) -> None:
    with SQLiteStore(tmp_path / "e.db") as store:
        venue = Venue(default_markets(), store, clock=lambda: 1_000, commit_batch=2)
        venue.execute(commands.Deposit(address=A, amount=100_000_000))
        futures = [venue.submit(order(5000 + i)) for i in range(5)]
        await asyncio.sleep(0)
        assert sum(f.done() for f in futures) == 2
        venue.execute(order(4000))  # synchronous: everything before it is committed with it
        assert all(f.done() for f in futures)
        assert store.last_seq() == venue.engine.seq == 1 + 6 * 2
        await asyncio.sleep(0)  # the scheduled turn finds nothing left
        assert store.last_seq() == 13
        assert [e.seq for e in store.read()] == list(range(1, 14))


async def test_flush_due_commits_the_scheduled_group_at_once(tmp_path: Path) -> None:
    with book_watched(tmp_path / "d.db", commit_batch=2) as (store, venue, watcher):
        commits = venue.commits
        venue.flush_due()  # nothing scheduled: nothing happens
        assert venue.commits == commits
        futures = [venue.submit(order(5000 + i)) for i in range(3)]
        venue.flush_due()  # the fan-out's call, before its slice: the first group, now
        assert store.last_seq() == 1 + 2 * 2
        assert venue.commits == commits + 1
        assert len(json.loads(watcher.take()[0])["data"]) == 2  # published with it
        venue.flush_due()
        assert store.last_seq() == venue.engine.seq == 1 + 3 * 2
        assert len(json.loads(watcher.take()[0])["data"]) == 3
        outcomes = [await f for f in futures]
        assert [o.events[0].seq for o in outcomes] == [2, 4, 6]
        # The turns scheduled by submit() find nothing left: no empty commit, no new push.
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert venue.commits == commits + 2
        assert watcher.take() == []
        assert [e.seq for e in store.read()] == list(range(1, 8))


def test_commit_batch_must_not_be_negative(tmp_path: Path) -> None:
    with SQLiteStore(tmp_path / "n.db") as store, pytest.raises(ValueError, match="commit_batch"):
        Venue(default_markets(), store, commit_batch=-1)


async def test_a_failed_commit_halts_and_fails_every_waiting_submission(tmp_path: Path) -> None:
    from perps_indexer.venue import VenueHalted

    store = SQLiteStore(tmp_path / "h.db")
    venue = Venue(default_markets(), store, clock=lambda: 1_000)
    venue.execute(commands.Deposit(address=A, amount=100_000_000))
    first, second = venue.submit(order(5000)), venue.submit(order(5001))
    store.close()  # the disk goes away under the venue
    for future in (first, second):
        with pytest.raises(VenueHalted, match="event store failed"):
            await future
    with pytest.raises(VenueHalted):
        venue.submit(order(5002))


def every_message(venue: Venue) -> dict[tuple[str, object], bytes]:
    keys = [(t, A) for t in ("positions", "open_orders", "order_history", "trade_history")]
    keys += [("orderbook", 396), ("recent_trades", 396)]
    return {key: venue.message(*key) for key in keys}


def trade(venue: Venue, count: int, start: int) -> None:
    for i in range(count):
        venue.execute(order(5000 + start + i))


def test_read_models_restart_from_their_snapshot(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "s.db"
    with SQLiteStore(path) as store:
        venue = Venue(default_markets(), store, clock=lambda: 1_000)
        venue.execute(commands.Deposit(address=A, amount=100_000_000))
        trade(venue, 5, 0)
        saved = venue.save_snapshot()
        assert saved == venue.engine.seq == 11
        trade(venue, 3, 10)  # after the snapshot: folded from the log at the next start
        expected = every_message(venue)
        engine_state = venue.engine.state()
    caplog.set_level("INFO", logger="perps_indexer.venue")
    with SQLiteStore(path) as store:
        again = Venue(default_markets(), store, clock=lambda: 1_000)
        assert f"from a snapshot at seq {saved}" in caplog.text
        assert every_message(again) == expected
        assert again.engine.state() == engine_state
        trade(again, 1, 20)  # and it goes on from there
        assert again.projections.seq == again.engine.seq == 11 + 3 * 2 + 2


def test_a_snapshot_that_does_not_fit_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "bad.db"
    with SQLiteStore(path) as store:
        venue = Venue(default_markets(), store, clock=lambda: 1_000)
        venue.execute(commands.Deposit(address=A, amount=100_000_000))
        trade(venue, 4, 0)
        expected = every_message(venue)
        venue.save_snapshot()
    # Another history limit: the saved windows would be wrong, so the models are rebuilt.
    with SQLiteStore(path) as store:
        other = Venue(default_markets(), store, history_limit=2, clock=lambda: 1_000)
        assert len(other.projections.order_history(A)) == 2
        assert other.projections.seq == other.engine.seq
    # A corrupt snapshot is ignored too.
    with SQLiteStore(path) as store:
        store.save_snapshot(store.last_seq(), "projections", b"\x00garbage")
    with SQLiteStore(path) as store:
        assert every_message(Venue(default_markets(), store, clock=lambda: 1_000)) == expected


def test_a_command_reaches_each_connection_in_one_write(tmp_path: Path) -> None:
    B = "0x" + "b" * 64
    topics = ("positions", "open_orders", "order_history", "trade_history")
    with SQLiteStore(tmp_path / "w.db") as store:
        venue = Venue(default_markets(), store, clock=lambda: 1_000)
        venue.hub.frame_header = framed_header
        venue.hub.write_limit = 1 << 20
        sinks = {}
        for address in (A, B):
            venue.execute(commands.Deposit(address=address, amount=100_000_000))
            session = Session(venue.hub, venue, venue.markets, now=0.0)
            for topic in topics:
                session.subscribe(topic, address)
            session.take()
            session.sink = sinks[address] = ByteSink()
        venue.execute(order(6000, size=1000))  # A's bid rests
        venue.execute(
            commands.PlaceMarketOrder(
                address=B, market_id=396, is_long=False, is_close=False, size=500, leverage=2
            )
        )  # B sells into it: both accounts change on all four topics
        # The bid changed A's open_orders and order_history. The fill changed all four of
        # A's streams (its bid is half filled) and three of B's (a market order never
        # rests): one write per connection, holding every changed stream.
        assert [len(s.written) for s in sinks.values()] == [2, 1]
        changed = {A: set(topics), B: set(topics) - {"open_orders"}}
        # The subscribes' messages were dropped as their views changed, and the pushes
        # were not kept in their place (Projections.push_message).
        assert not [key for key in venue.projections._messages if isinstance(key[1], str)]
        for address, sink in sinks.items():
            messages = unframe(sink.written[-1])
            assert sorted(m["message"] for m in messages) == sorted(changed[address])
            assert all(m["seq"] == venue.engine.seq for m in messages)
            for m in messages:  # each is the stream's current state, byte for byte
                assert json.dumps(m) == json.dumps(json.loads(venue.message(m["message"], address)))
