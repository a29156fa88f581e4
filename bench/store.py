"""Event store throughput: appends committed per second by batch size and durability setting,
and read throughput.

    .venv/bin/python bench/store.py [--events 100000] [--single-events 5000] [--dir DIR]

The events are real: a session of the engine where makers rest orders and takers fill them,
opening and closing positions, so the bodies have the sizes of a live log (mostly orders and
fills). The databases go to a temporary directory under ``--dir`` (the working directory by
default): put it on the disk you want to measure, not on a tmpfs, where fsync costs nothing.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from perps_indexer.engine import Engine
from perps_indexer.events import AnyEvent
from perps_indexer.markets import default_markets
from perps_indexer.store.sqlite import SQLiteStore

MARKET = 396
MAKERS = [f"0x{i:064x}" for i in range(1, 9)]
TAKERS = [f"0x{i:064x}" for i in range(101, 133)]


def workload(count: int) -> list[AnyEvent]:
    """At least ``count`` events: rounds of a maker resting an order and a taker filling it;
    each pair opens positions, and the next round on the same pair closes them."""
    engine = Engine(default_markets())
    events: list[AnyEvent] = []
    ts = 0
    for address in MAKERS + TAKERS:
        events += engine.deposit(address, 10**12, ts=ts)
    round_no = 0
    while len(events) < count:
        ts += 1
        maker = MAKERS[round_no % len(MAKERS)]
        taker = TAKERS[round_no % len(TAKERS)]
        # Rounds alternate per pair: even rounds open (maker long, taker short), odd close.
        closing = (round_no // len(TAKERS)) % 2 == 1
        size = 500 + round_no % 7 * 100
        price = 6000 + round_no % 50
        if closing:
            long = engine.positions[(maker, MARKET, True)]
            short = engine.positions[(taker, MARKET, False)]
            size = min(long.size, short.size)
        # The maker's bid (open long) or ask (close long) rests; the taker's market order,
        # opening or closing a short, fills it.
        events += engine.place_limit_order(
            maker,
            MARKET,
            is_long=True,
            is_close=closing,
            size=size,
            price=price,
            leverage=5,
            ts=ts,
        ).events
        events += engine.place_market_order(
            taker, MARKET, is_long=False, is_close=closing, size=size, leverage=5, ts=ts
        ).events
        if round_no % 100 == 0:
            events += engine.set_mark_price(MARKET, price, ts=ts)
        round_no += 1
    return events


def timed(action: Callable[[], object], repeat: int) -> float:
    """The median wall time of ``action`` over ``repeat`` runs, in seconds."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def append_all(
    path: Path, events: list[AnyEvent], batch: int, synchronous: str
) -> tuple[float, float]:
    """Wall and CPU seconds (this process, user + system) to append ``events`` in batches of
    ``batch`` into a fresh database. CPU time is the steadier figure on a shared machine."""
    path.unlink(missing_ok=True)
    with SQLiteStore(path, synchronous=synchronous) as store:
        start, cpu = time.perf_counter(), time.process_time()
        for i in range(0, len(events), batch):
            store.append(events[i : i + batch])
        return time.perf_counter() - start, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=100_000, help="events for batches > 1")
    parser.add_argument("--single-events", type=int, default=5_000, help="events for batch 1")
    parser.add_argument("--repeat", type=int, default=5, help="runs per figure (median)")
    parser.add_argument("--dir", default=".", help="where the temporary databases go")
    args = parser.parse_args()

    start = time.perf_counter()
    events = workload(args.events)[: args.events]
    print(f"workload: {len(events)} engine events in {time.perf_counter() - start:.1f} s")

    with tempfile.TemporaryDirectory(prefix="bench-store-", dir=args.dir) as tmp:
        path = Path(tmp) / "events.db"
        print(f"\nmedian (min-max) of {args.repeat} runs, each into a fresh database\n")
        print("| synchronous | batch | events | events/s | commits/s | CPU µs/event |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for synchronous in ("FULL", "NORMAL"):
            for batch in (1, 100, 1_000):
                chunk = events[: args.single_events] if batch == 1 else events
                runs = [append_all(path, chunk, batch, synchronous) for _ in range(args.repeat)]
                rates = [len(chunk) / wall for wall, _ in runs]
                rate = statistics.median(rates)
                cpu_us = statistics.median(cpu for _, cpu in runs) / len(chunk) * 1e6
                print(
                    f"| {synchronous} | {batch:,} | {len(chunk):,} "
                    f"| {rate:,.0f} ({min(rates):,.0f}-{max(rates):,.0f}) | {rate / batch:,.0f} "
                    f"| {cpu_us:.1f} |"
                )

        # The last database holds every event (NORMAL, batches of 1,000).
        with SQLiteStore(path) as store:
            size_mb = path.stat().st_size / 1e6
            seconds = timed(lambda: sum(1 for _ in store.read()), args.repeat)
            print(
                f"\nread(): {len(events):,} events in {seconds:.2f} s = "
                f"{len(events) / seconds:,.0f} events/s (database {size_mb:.1f} MB)"
            )
        # A key's events from its segments: each picked segment's body is read and expanded
        # whole, so the segments' size matters: the server's group commits make segments of a
        # few commands' events (batches of 10 here), a batch writer's are up to 128.
        queries = [(TAKERS[i % len(TAKERS)], i % 2 == 0) for i in range(1_000)]
        for batch in (10, 1_000):
            append_all(path, events, batch, "NORMAL")
            with SQLiteStore(path) as store:

                def by_key(store: SQLiteStore = store) -> None:
                    for key, newest in queries:
                        store.read_for_key(key, limit=100, newest_first=newest)

                seconds = timed(by_key, args.repeat)
            print(
                f"read_for_key(address, limit=100), appended in batches of {batch:,}: "
                f"{len(queries) / seconds:,.0f} queries/s ({seconds / len(queries) * 1e3:.2f} ms "
                "each)"
            )


if __name__ == "__main__":
    main()
