"""Engine throughput on a realistic mixed order stream: order commands and events per second.

    .venv/bin/python bench/engine.py [--commands 200000] [--seed 1] [--quick] [--profile]

The stream (deterministic for a seed, built before the clock starts):

* makers (16) quote around a mid price that random-walks: a limit order 1-5 ticks off the
  mid on either side, closing the position it reduces (a bid closes a short, an ask a long)
  when they hold enough of it, else opening;
* makers cancel their oldest quote in a market (one id, or two at once one time in five);
  with fewer than two resting there, the id sent is stale and the cancel is rejected;
* takers (24) cross with market orders and immediate-or-cancel limit orders up to 3 ticks
  through the mid, closing (part of) a position about a third of the time when they hold one;
* the mark price follows the mid every 50 commands, so liquidation and TP/SL checks run;
* 80 % of the flow is market 396, 10 % each 397 and 398.

Timed: only the engine calls, plus the few dictionary look-ups that pick a cancel's order id or
a close's size from the live state. Rejected commands are counted and included in the rate.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import random
import time
from collections import deque
from dataclasses import dataclass, field

from perps_indexer.engine import Engine
from perps_indexer.errors import CommandRejected
from perps_indexer.events import IMMEDIATE_OR_CANCEL, NO_RESTRICTION
from perps_indexer.markets import default_markets

MAKERS = [f"0x{i:064x}" for i in range(1, 17)]
TAKERS = [f"0x{i:064x}" for i in range(101, 125)]
# Per market: starting mid (ticks), tick, lot range for quotes and takes.
MARKETS = {
    396: (6_000, 1, (500, 3_000)),
    397: (300_000, 10, (10, 60)),
    398: (200_000, 5, (10, 80)),
}
MAKER_LEVERAGE = 5
TAKER_LEVERAGE = 10
MIN_QUOTES = 2  # a maker pulls its oldest quote in a market only when it has this many

QUOTE, CANCEL, TAKE_MARKET, TAKE_IOC, MARK = range(5)
ORDER_KINDS = (QUOTE, CANCEL, TAKE_MARKET, TAKE_IOC)


def build_stream(count: int, seed: int) -> list[tuple[int, ...]]:
    """``count`` commands as tuples: (kind, market, trader index, buys, size, price, flag).

    ``buys`` is the direction of the trade (a bid or a buy); whether it opens or closes is
    decided when it runs, from the positions then held."""
    rng = random.Random(seed)
    mids = {m: spec[0] for m, spec in MARKETS.items()}
    stream: list[tuple[int, ...]] = []
    for i in range(count):
        m = 396 if rng.random() < 0.8 else rng.choice((397, 398))
        _, tick, (lo, hi) = MARKETS[m]
        if rng.random() < 0.05:  # the mid drifts a tick
            mids[m] += tick if rng.random() < 0.5 else -tick
        mid = mids[m]
        if i % 50 == 49:
            mm = rng.choice(tuple(MARKETS))
            stream.append((MARK, mm, 0, 0, 0, mids[mm], 0))
            continue
        roll = rng.random()
        buys = rng.random() < 0.5
        if roll < 0.5:
            maker = rng.randrange(len(MAKERS))
            away = rng.randint(1, 5) * tick
            price = mid - away if buys else mid + away
            stream.append((QUOTE, m, maker, buys, rng.randint(lo, hi), price, 0))
        elif roll < 0.75:
            stream.append((CANCEL, m, rng.randrange(len(MAKERS)), 0, 0, 0, rng.random() < 0.2))
        else:
            taker = rng.randrange(len(TAKERS))
            close = rng.random() < 0.35
            size = rng.randint(lo, hi)
            if roll < 0.9:
                stream.append((TAKE_MARKET, m, taker, buys, size, 0, close))
            else:
                through = rng.randint(0, 3) * tick
                price = mid + through if buys else mid - through
                stream.append((TAKE_IOC, m, taker, buys, size, price, close))
    return stream


@dataclass
class Result:
    commands: int = 0
    order_commands: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    events: int = 0
    fills: int = 0
    """Fills of the commands' own orders (liquidation and TP/SL fills are in ``events``)."""
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    """CPU time of this process: the figure for "one core" when other work shares the machine."""
    by_kind: dict[int, int] = field(default_factory=dict)


def run(stream: list[tuple[int, ...]]) -> tuple[Engine, Result]:
    engine = Engine(default_markets())
    for ts, addr in enumerate(MAKERS + TAKERS):
        engine.deposit(addr, 10**15, ts=ts)
    quotes = {(k, m): deque[int]() for k in range(len(MAKERS)) for m in MARKETS}
    positions = engine.positions
    orders = engine.orders
    result = Result()
    limit_order = engine.place_limit_order
    market_order = engine.place_market_order
    events = fills = 0
    rejected: dict[str, int] = {}
    ts = 1_000
    start, cpu_start = time.perf_counter(), time.process_time()
    for kind, m, who, buys, size, price, flag in stream:
        ts += 1
        try:
            if kind == CANCEL:
                queue = quotes[who, m]
                while queue and queue[0] not in orders:
                    queue.popleft()
                if len(queue) < MIN_QUOTES:
                    # Too few quotes to pull one: the maker sends a stale id (rejected).
                    ids = [7 << 64]
                else:
                    ids = [queue.popleft()]
                    if flag and queue and queue[0] in orders:
                        ids.append(queue.popleft())
                events += len(engine.cancel_orders(MAKERS[who], m, ids, ts=ts))
            elif kind == MARK:
                events += len(engine.set_mark_price(m, price, ts=ts))
            else:
                maker = kind == QUOTE
                addr = MAKERS[who] if maker else TAKERS[who]
                # Buying closes a short and selling a long: makers always do when they hold
                # enough, takers when the stream says so; otherwise the order opens.
                held = positions.get((addr, m, not buys))
                close = (
                    (maker or flag) and held is not None and held.size - held.pending_close >= size
                )
                is_long = (not buys) if close else buys
                if kind == TAKE_MARKET:
                    r = market_order(
                        addr,
                        m,
                        is_long=is_long,
                        is_close=close,
                        size=size,
                        leverage=TAKER_LEVERAGE,
                        ts=ts,
                    )
                else:
                    r = limit_order(
                        addr,
                        m,
                        is_long=is_long,
                        is_close=close,
                        size=size,
                        price=price,
                        leverage=MAKER_LEVERAGE if maker else TAKER_LEVERAGE,
                        restriction=NO_RESTRICTION if maker else IMMEDIATE_OR_CANCEL,
                        ts=ts,
                    )
                events += len(r.events)
                fills += len(r.fills)
                if maker and r.order.order_id in orders:
                    quotes[who, m].append(r.order.order_id)
        except CommandRejected as exc:
            rejected[exc.code] = rejected.get(exc.code, 0) + 1
    result.seconds = time.perf_counter() - start
    result.cpu_seconds = time.process_time() - cpu_start
    for command in stream:
        result.by_kind[command[0]] = result.by_kind.get(command[0], 0) + 1
    result.commands = len(stream)
    result.order_commands = sum(result.by_kind.get(k, 0) for k in ORDER_KINDS)
    result.rejected = rejected
    result.events = events
    result.fills = fills
    return engine, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commands", type=int, default=200_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="a tiny run (5,000 commands)")
    parser.add_argument("--profile", action="store_true", help="run under cProfile, print top 25")
    args = parser.parse_args()
    count = 5_000 if args.quick else args.commands
    stream = build_stream(count, args.seed)
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        engine, result = run(stream)
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    else:
        engine, result = run(stream)
    ledger = engine.ledger()
    names = {
        QUOTE: "quotes",
        CANCEL: "cancels",
        TAKE_MARKET: "market",
        TAKE_IOC: "ioc",
        MARK: "marks",
    }
    mix = ", ".join(f"{names[k]} {n}" for k, n in sorted(result.by_kind.items()))
    codes = ", ".join(f"{code} {n}" for code, n in sorted(result.rejected.items()))
    print(f"commands: {result.commands} ({mix})")
    print(f"rejected: {sum(result.rejected.values())} ({codes})")
    print(
        f"events:   {result.events}; fills {result.fills}; "
        f"resting orders at the end {len(engine.orders)}"
    )
    print(f"time:     {result.seconds:.3f} s wall, {result.cpu_seconds:.3f} s CPU")
    for what, n in (
        ("order commands/s", result.order_commands),
        ("all commands/s", result.commands),
        ("events/s", result.events),
    ):
        wall, cpu = n / result.seconds, n / result.cpu_seconds
        print(f"{what + ':':18} {wall:>10,.0f} (wall)  {cpu:>10,.0f} (CPU)")
    assert ledger.total == ledger.deposits - ledger.withdrawals, "money not conserved"


if __name__ == "__main__":
    main()
