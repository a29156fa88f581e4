"""Ingest: events per second through engine, projections and the SQLite store (scenario 3).

    python bench/ingest.py [--commands 60000] [--sync NORMAL,FULL] [--batches 1,100,1000]

In one process (the suite pins it to the server's CPU), a deterministic order stream runs
through the same path as the server's, without the network: ``commands.execute`` on the
engine, then :meth:`Venue.record`, which appends the events to the SQLite store in one
transaction (``SQLiteStore.append``: one ``BEGIN IMMEDIATE`` ... ``COMMIT``; the events go in
segment rows of up to 128, the key index with every ~2,048 events), folds them into the
projections and publishes the changed streams (to a hub with no subscribers, so the messages
themselves are not encoded). ``batch`` is how many commands share one append; batch 1 is
exactly what the server does for each REST command (``Venue.execute``). Checkpoints run on the
store's own thread, as in the server; ``--checkpoints inline`` leaves them to SQLite, inside
the append that fills the WAL, and ``both`` runs each figure both ways.

Durable means: when ``record`` returns, the batch is committed in SQLite's WAL. With
``synchronous=FULL`` the WAL is fsynced at every commit (survives power loss); with
``NORMAL`` it is fsynced only at checkpoints (survives a crash of the process, not of the OS).

The stream: 16 makers quote 1-5 ticks around a mid that random-walks (opening positions),
24 takers send market orders (opening), makers cancel their oldest quote still resting, a mark
price every 50 commands; market 396 only. (Until 2026-12-07 a cancel took the oldest quote
placed, filled or not, and 86 % of the cancels were rejected as unknown orders.) Each figure
is one run into a fresh database in a temporary directory on the working disk (not a tmpfs).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from collections import deque
from collections.abc import Container
from pathlib import Path
from typing import Any

from perps_indexer import commands
from perps_indexer.errors import CommandRejected
from perps_indexer.markets import default_markets
from perps_indexer.store.sqlite import SQLiteStore
from perps_indexer.venue import Venue

MARKET = 396
MAKERS = [f"0x{0xA11CE000 + i:064x}" for i in range(16)]
TAKERS = [f"0x{0xB0B00000 + i:064x}" for i in range(24)]


def stream(count: int, seed: int = 1) -> list[tuple[Any, ...]]:
    """(kind, who, is_buy, size, price) tuples; cancels pick their id when they run."""
    rng = random.Random(seed)
    mid = 6000
    out: list[tuple[Any, ...]] = []
    for i in range(count):
        if rng.random() < 0.05:
            mid += 1 if rng.random() < 0.5 else -1
        if i % 50 == 49:
            out.append(("mark", 0, False, 0, mid))
            continue
        roll = rng.random()
        buy = rng.random() < 0.5
        if roll < 0.5:
            away = rng.randint(1, 5)
            price = mid - away if buy else mid + away
            out.append(("quote", rng.randrange(16), buy, rng.randint(500, 3000), price))
        elif roll < 0.75:
            out.append(("cancel", rng.randrange(16), False, 0, 0))
        else:
            out.append(("take", rng.randrange(24), buy, rng.randint(500, 3000), 0))
    return out


def build(
    item: tuple[Any, ...], quotes: dict[int, deque[int]], resting: Container[int]
) -> commands.AnyCommand:
    """The command of one stream item. A cancel takes the maker's oldest quote still resting
    (``resting``: the engine's resting order ids); a maker with none sends a cancel of an
    unknown id, which the engine rejects."""
    kind, who, buy, size, price = item
    if kind == "quote":
        return commands.PlaceLimitOrder(
            address=MAKERS[who],
            market_id=MARKET,
            is_long=buy,
            is_close=False,
            size=size,
            price=price,
            leverage=5,
        )
    if kind == "take":
        return commands.PlaceMarketOrder(
            address=TAKERS[who],
            market_id=MARKET,
            is_long=buy,
            is_close=False,
            size=size,
            leverage=10,
        )
    if kind == "cancel":
        queue = quotes[who]
        while queue and queue[0] not in resting:
            queue.popleft()  # filled by a taker since it rested
        ids = (queue.popleft(),) if queue else (7 << 64,)
        return commands.CancelOrders(address=MAKERS[who], market_id=MARKET, order_ids=ids)
    return commands.SetMarkPrice(market_id=MARKET, price=price)


class NullStore:
    """A store that keeps nothing: to time the engine and projections without SQLite."""

    def last_seq(self) -> int:
        return 0

    def first_seq(self) -> int:
        return 0

    def append(self, events: Any) -> None:
        pass

    def close(self) -> None:
        pass


def run(
    items: list[tuple[Any, ...]],
    sync: str,
    batch: int,
    directory: Path,
    part: str = "all",
    checkpoints: str = "background",
) -> dict[str, Any]:
    """One run; ``part`` "engine" runs the engine only, "projections" engine and projections
    (no store), "all" the whole path. ``checkpoints`` "background" checkpoints the SQLite
    file on a thread of the store's own, as the server does; "inline" leaves them to SQLite,
    inside the append that fills the WAL."""
    path = directory / f"ingest-{sync}-{batch}-{part}-{checkpoints}.db"
    store: Any = SQLiteStore(path, synchronous=sync) if part == "all" else NullStore()
    if part == "all" and checkpoints == "background":
        store.checkpoint_in_background()
    venue = Venue(default_markets(), store)
    engine = venue.engine
    ts = venue.clock()
    for who in MAKERS + TAKERS:
        venue.execute(commands.Deposit(address=who, amount=10**15))
    quotes: dict[int, deque[int]] = {i: deque() for i in range(16)}
    orders = engine.orders
    events = rejected = commits = 0
    pending: list[Any] = []
    start = time.perf_counter()
    cpu = time.process_time()
    for n, item in enumerate(items, 1):
        command = build(item, quotes, orders)
        ts += 1
        try:
            if part == "engine":
                outcome = commands.execute(engine, command, ts)
            elif batch == 1:
                outcome = venue.execute(command)
                commits += 1
            else:
                outcome = commands.execute(engine, command, ts)
                pending += outcome.events
        except CommandRejected:
            rejected += 1
            continue
        events += len(outcome.events)
        order = outcome.order
        if order is not None and item[0] == "quote" and order.order.order_id in orders:
            quotes[item[1]].append(order.order.order_id)
        if part != "engine" and batch > 1 and (n % batch == 0 or n == len(items)) and pending:
            venue.record(pending)
            commits += 1
            pending = []
    seconds = time.perf_counter() - start
    cpu_s = time.process_time() - cpu
    store.close()
    size = path.stat().st_size if part == "all" else 0
    return {
        "part": part,
        "sync": sync,
        "checkpoints": checkpoints if part == "all" else "-",
        "batch": batch,
        "commands": len(items),
        "rejected": rejected,
        "events": events,
        "commits": commits,
        "seconds": seconds,
        "cpu_s": cpu_s,
        "events_per_s": events / seconds,
        "commands_per_s": len(items) / seconds,
        "db_bytes": size,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commands", type=int, default=60_000)
    parser.add_argument("--sync", default="NORMAL,FULL")
    parser.add_argument("--batches", default="1,100,1000")
    parser.add_argument("--dir", default=None, help="where the temporary databases go")
    parser.add_argument(
        "--checkpoints",
        default="background",
        help="background (as the server), inline (SQLite's own, in the append), or both",
    )
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="also time the engine alone and engine + projections (batch 100, no store)",
    )
    args = parser.parse_args()
    items = stream(args.commands)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-ingest-", dir=args.dir) as tmp:
        modes = ["background", "inline"] if args.checkpoints == "both" else [args.checkpoints]
        for sync in args.sync.split(","):
            for batch in (int(b) for b in args.batches.split(",")):
                for mode in modes:
                    results.append(run(items, sync, batch, Path(tmp), checkpoints=mode))
        if args.breakdown:
            for part in ("engine", "projections"):
                results.append(run(items, "-", 100, Path(tmp), part))
    print(json.dumps({"ingest": results}))


if __name__ == "__main__":
    main()
