"""Cost per command of the server's in-process path, deterministically (scenario 2's shape).

    python bench/command_cost.py [--commands 2000] [--accounts 10000] [--group 5] [--db FILE]

The path is what the server runs for every REST order: the engine, then :meth:`Venue.flush`
every ``--group`` commands (the server's group commit): ``store.append`` into SQLite
(``synchronous=NORMAL``), ``projections.fold`` and, for every changed stream that has a
subscriber, ``projections.message``. Every address is taken as subscribed to its four account
topics (positions, trade_history, open_orders, order_history), as in scenario 2; the hub here
only counts the messages and their bytes (no sessions, no transport), so what is measured is
the venue's own work. With ``--sessions`` the hub is the server's (:class:`Hub`), with one
:class:`Session` an account subscribed to the four topics as a client would and written to
through the fast path, as the server writes to a connection that keeps up, into a sink that
takes every write and keeps only its count and bytes: the venue's work and the fan-out's,
without the sockets and the event loop.

Commands: market buys of 2,500 lots (leverage 10), each filling 5 resting asks of 500 lots of
5 consecutive accounts (:func:`benchlib.prefill`), the taker an account half the range away, as
``loadgen.py --mode fills --sweep 5`` sends them; each command changes the 4 account streams of
6 addresses. Before the commands, every account's four streams are read as a subscription
reads them (their rows' JSON is made then and kept, as it is for scenario 2's subscribers);
``--cold`` skips that. Timestamps come from a counter, not the clock. The heap rebuilt at
start is frozen (``gc.freeze``), as the server freezes its surviving heap every second.

The prefilled log holds enough asks for ``max(--commands, --prefill-for)`` market buys. It is
written once to ``--db`` (default: a file of that size in the system's temporary directory,
reused when it exists) and copied for each run, so runs start from the same file.

Instructions per command, repeatable on a busy machine: run under callgrind with ``--commands
0`` and with ``--commands N`` and divide the difference by N (opening the venue replays the
prefilled log, which the difference removes). Both runs must open the same log: for N above
2,000, give both ``--prefill-for N``.

    valgrind --tool=callgrind --callgrind-out-file=/tmp/cg0 .venv/bin/python \\
        bench/command_cost.py --commands 0
    valgrind --tool=callgrind --callgrind-out-file=/tmp/cgN .venv/bin/python \\
        bench/command_cost.py --commands 2000

``--parts`` also times, with ``time.perf_counter`` around each call (about 0.1 us a call
added), the store's appends, the projections' folds and the building of each topic's
messages; the engine and the rest of the venue's glue are what is left. Leave it out when
measuring the total.

Prints one JSON object: wall-clock and CPU seconds of the commands, the messages and bytes
made, with ``--parts`` the microseconds a command of each part (``messages`` by topic too),
and with ``--check`` a digest of every message and of the stored events, to check that a
change kept every byte (hashing and reading back cost more than the commands: leave it out
when measuring).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import benchlib as b
from perps_indexer import commands
from perps_indexer.events import to_json
from perps_indexer.markets import default_markets
from perps_indexer.server import app
from perps_indexer.session import Hub, Session
from perps_indexer.store.sqlite import SQLiteStore
from perps_indexer.venue import Venue

ACCOUNT_TOPICS = frozenset({"positions", "trade_history", "open_orders", "order_history"})
SWEEP = 5
START_MS = 1_800_000_000_000
PREFILL_MS = START_MS - 60_000
"""The prefilled log's events' time, before the venue's clock starts: a fixed one, not the
real one, so that every build is the same log and runs started together get the same log
whichever build they copy (and ``--check`` digests compare across machines)."""


_ONE: dict[None, None] = {None: None}


class CountingHub:
    """A hub on which every address watches its 4 account topics; it counts what it is given
    and hashes it (no sessions). Each batch's messages are hashed sorted, so digests compare
    across builds that publish a batch's streams in different orders (in set order, which
    changes with the process's string hashing, before 146b991)."""

    live_streams = 0  # no live topic is watched

    def __init__(self, check: bool) -> None:
        self.check = check
        self.messages = 0
        self.bytes = 0
        self.digest = hashlib.sha256()
        self._batch: list[bytes] = []

    def hold(self) -> None:
        pass

    def release(self) -> None:
        for message in sorted(self._batch):
            self.digest.update(message)
        self._batch.clear()

    def watched(self, stream: tuple[str, Any]) -> bool:
        return stream[0] in ACCOUNT_TOPICS

    def watchers(self, stream: tuple[str, Any]) -> dict[None, None] | None:
        """As :meth:`Hub.watchers`: one watcher for each stream :meth:`watched` says is."""
        return _ONE if self.watched(stream) else None

    def publish_state(
        self, stream: tuple[str, Any], message: bytes, watchers: object = None
    ) -> None:
        self.messages += 1
        self.bytes += len(message)
        if self.check:
            self._batch.append(message)

    def publish(self, stream: tuple[str, Any], message: bytes) -> int:
        self.publish_state(stream, message)
        return 1


class NullSink:
    """A connection's transport that takes every write at once (nothing is ever buffered)."""

    def __init__(self) -> None:
        self.writes = 0
        self.bytes = 0
        self.digest: Any = None

    def write(self, data: bytes) -> None:
        self.writes += 1
        self.bytes += len(data)
        if self.digest is not None:
            self.digest.update(data)

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0


def subscribed_sessions(venue: Venue, hub: Hub, accounts: int, check: bool) -> list[NullSink]:
    """One session an account on ``hub``, subscribed to its four account topics by request
    (each subscribe reads the stream, as :func:`subscribe_all` does), then given a sink."""
    # As the server sets it up: a frame header; an older src/ took whole frames (framer).
    if hasattr(app, "text_frame_header"):
        hub.frame_header = app.text_frame_header
    if "framer" in Hub.__slots__:
        hub.framer = app.text_frame
    hub.write_limit = 256 * 1024  # the server's default (--direct-write-limit)
    sinks = []
    for i in range(accounts):
        session = Session(hub, venue, venue.markets, now=0.0)
        hub.connect(session)
        address = b.address(i)
        for topic in sorted(ACCOUNT_TOPICS):
            session.receive_text(json.dumps({"topic": topic, "address": address}), 0.0)
        session.take()  # the subscriptions' replies and first messages
        session.sink = sink = NullSink()
        if check:
            sink.digest = hashlib.sha256()
        sinks.append(sink)
    return sinks


def prefill_rounds(accounts: int, commands_: int) -> int:
    """Resting asks an account needs for ``commands_`` market buys."""
    return max(1, math.ceil(commands_ * SWEEP / accounts))


def default_db(accounts: int, rounds: int) -> Path:
    """Where the prefilled log of ``rounds`` asks an account is kept when ``--db`` is not
    given: one file per size, so runs of different sizes do not rebuild each other's."""
    return Path(tempfile.gettempdir()) / f"perps-command-cost-{accounts}x{rounds}.db"


def prefilled(db: Path, accounts: int, commands_: int) -> Path:
    """A prefilled log with enough asks for ``commands_`` (kept at ``db``; rebuilt when it
    was made for another size).

    It is built under a name of its own and moved into place whole, so that runs started
    together (say, the two callgrind runs of the module's recipe) never read a half-built
    log: each builds its own and the last move wins. The builds are the same byte for byte
    (their events are stamped by a fixed clock), so which one wins does not matter."""
    rounds = prefill_rounds(accounts, commands_)
    meta = db.with_suffix(".json")
    # The stamp too: a log kept from before it was fixed (stamped by the real clock) is rebuilt.
    want = {"accounts": accounts, "rounds": rounds, "ts_ms": PREFILL_MS}
    if db.exists() and meta.exists() and json.loads(meta.read_text()) == want:
        return db
    building = db.with_name(f"{db.name}.building-{os.getpid()}")
    parts = [building.with_name(building.name + s) for s in ("", "-wal", "-shm")]
    for stale in parts:
        stale.unlink(missing_ok=True)
    print(f"building the prefilled log {db} ({accounts:,} accounts x {rounds})", file=sys.stderr)
    try:
        b.prefill(building, accounts=accounts, asks_per_account=rounds, ts_ms=PREFILL_MS)
        with SQLiteStore(building) as store:  # folds the WAL into the file: one file to move
            store.last_seq()
        for stale in (db.with_name(db.name + s) for s in ("-wal", "-shm")):
            stale.unlink(missing_ok=True)  # a crashed run's, which SQLite would apply to it
        building.replace(db)
        written = meta.with_name(f"{meta.name}.{os.getpid()}")
        written.write_text(json.dumps(want))
        written.replace(meta)
    finally:
        for stale in parts:
            stale.unlink(missing_ok=True)
    return db


def counting_venue(store: SQLiteStore, hub: CountingHub) -> Venue:
    """A venue on ``store`` whose clock counts up from :data:`START_MS` (runs repeat exactly)
    and whose hub only counts."""
    ticks = iter(range(START_MS, START_MS + 10**9))
    return Venue(default_markets(), store, clock=lambda: next(ticks), hub=hub)  # type: ignore[arg-type]


def market_buys(count: int, accounts: int) -> list[commands.PlaceMarketOrder]:
    """``count`` market buys as ``loadgen.py --mode fills --sweep 5`` sends them, each filling
    the 5 resting asks of 5 consecutive accounts, the taker an account half the range away."""
    return [
        commands.PlaceMarketOrder(
            address=b.address((j * SWEEP % accounts + accounts // 2) % accounts),
            market_id=b.MARKET,
            is_long=True,
            is_close=False,
            size=500 * SWEEP,
            leverage=10,
        )
        for j in range(count)
    ]


class Parts:
    """Seconds spent in the store's appends, the projections' folds and each topic's
    messages, timed by wrapping those three calls of one venue."""

    def __init__(self, venue: Venue) -> None:
        self.seconds: dict[str, float] = {"store": 0.0, "projections": 0.0}
        self.messages: dict[str, float] = {}
        self.count: dict[str, int] = {}
        clock = time.perf_counter
        store, projections = venue.store, venue.projections
        # The venue folds with Projections.fold from 2026-12-07 on, apply_batch before it.
        folder = "fold" if hasattr(projections, "fold") else "apply_batch"
        append, fold, message = store.append, getattr(projections, folder), projections.push_message
        seconds, by_topic, count = self.seconds, self.messages, self.count

        def timed(call: Callable[[Any], Any], part: str) -> Callable[[Any], Any]:
            def run(events: Any) -> Any:
                t = clock()
                result = call(events)
                seconds[part] += clock() - t
                return result

            return run

        def timed_message(topic: str, *key: Any) -> bytes:  # key, or key and seq
            t = clock()
            data = message(topic, *key)
            by_topic[topic] = by_topic.get(topic, 0.0) + clock() - t
            count[topic] = count.get(topic, 0) + 1
            return data

        store.append = timed(append, "store")  # type: ignore[method-assign]
        setattr(projections, folder, timed(fold, "projections"))
        projections.push_message = timed_message  # type: ignore[method-assign,assignment]

    def report(self, commands_: int, wall: float) -> dict[str, Any]:
        """Microseconds a command of each part; ``other`` is the engine and the glue."""
        per = 1e6 / max(commands_, 1)
        messages = sum(self.messages.values())
        out = {name: s * per for name, s in self.seconds.items()}
        out["messages"] = messages * per
        out["other"] = (wall - messages - sum(self.seconds.values())) * per
        out["messages_by_topic"] = {
            topic: {"us_a_command": s * per, "us_a_message": s * 1e6 / self.count[topic]}
            for topic, s in sorted(self.messages.items())
        }
        return out


def subscribe_all(venue: Venue, accounts: int) -> None:
    """Read every account's four streams as a subscription does (``Venue.message``), as
    scenario 2's 10,000 subscribers do before its orders come: a row's JSON is made on its
    first read and kept, so without this the first push of each address would encode all
    its replayed rows (about 18 an address with 9 asks each, doubling the messages' cost)."""
    for i in range(accounts):
        address = b.address(i)
        for topic in sorted(ACCOUNT_TOPICS):
            venue.message(topic, address)


def run(db: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One run of ``args.commands`` commands on a copy of the prefilled log ``db``."""
    accounts, count, group, check = args.accounts, args.commands, args.group, args.check
    path = work / "run.db"
    shutil.copyfile(db, path)
    hub: Any = Hub() if args.sessions else CountingHub(check)
    venue = counting_venue(SQLiteStore(path, synchronous="NORMAL"), hub)
    sinks = subscribed_sessions(venue, hub, accounts, check) if args.sessions else []
    if not args.cold and not args.sessions:
        subscribe_all(venue, accounts)
    timing = Parts(venue) if args.parts else None
    # As the server does (every second): the state rebuilt at start is left out of the
    # collector's scans, so a full collection during the run costs what the run allocated.
    gc.freeze()
    first_seq = venue.engine.seq + 1
    orders = market_buys(count, accounts)
    wall = time.perf_counter()
    cpu = time.process_time()
    for n, order in enumerate(orders, 1):
        venue._run(order)
        if n % group == 0 or n == count:
            venue.flush()
    wall = time.perf_counter() - wall
    cpu = time.process_time() - cpu
    events = hashlib.sha256()
    for event in venue.store.read(after=first_seq - 1) if check else ():
        events.update(to_json(event))
    venue.store.close()
    if sinks:
        written = hashlib.sha256()
        for sink in sinks if check else ():
            written.update(sink.digest.digest())
        messages, message_bytes, digest = hub.messages_queued, sum(s.bytes for s in sinks), written
    else:
        messages, message_bytes, digest = hub.messages, hub.bytes, hub.digest
    digests = {
        "messages_sha256": digest.hexdigest()[:16],
        "events_sha256": events.hexdigest()[:16],
    }
    return {
        "commands": count,
        "events": venue.engine.seq - first_seq + 1,
        "messages": messages,
        "message_bytes": message_bytes,
        **({"writes": sum(s.writes for s in sinks)} if sinks else {}),
        "seconds": wall,
        "cpu_s": cpu,
        "us_per_command": cpu / count * 1e6 if count else 0.0,
        **(digests if check else {}),
        **({"parts_us": timing.report(count, wall)} if timing else {}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commands", type=int, default=2_000)
    parser.add_argument("--accounts", type=int, default=10_000)
    parser.add_argument("--group", type=int, default=5, help="commands per flush")
    parser.add_argument("--db", default=None, help="the prefilled log (kept between runs)")
    parser.add_argument(
        "--prefill-for", type=int, default=2_000, help="commands the prefilled log must supply"
    )
    parser.add_argument(
        "--check", action="store_true", help="print digests of the messages and events"
    )
    parser.add_argument(
        "--parts", action="store_true", help="also time the store, projections and messages"
    )
    parser.add_argument(
        "--cold",
        action="store_true",
        help="skip reading every account's streams first (their rows' JSON is then made on "
        "the first push)",
    )
    parser.add_argument(
        "--sessions",
        action="store_true",
        help="the server's hub, with a session an account writing to a sink that takes all "
        "(--cold does not apply: the subscriptions read every stream)",
    )
    args = parser.parse_args()
    size = max(args.commands, args.prefill_for)
    rounds = prefill_rounds(args.accounts, size)
    db = Path(args.db) if args.db else default_db(args.accounts, rounds)
    prefilled(db, args.accounts, size)
    with tempfile.TemporaryDirectory(prefix="bench-command-cost-") as tmp:
        result = run(db, Path(tmp), args)
    # Which log the run opened: two runs' instructions subtract only over the same one.
    result["prefill_rounds"] = rounds
    print(json.dumps(result))


if __name__ == "__main__":
    main()
