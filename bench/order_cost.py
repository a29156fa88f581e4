"""Cost per order of the server's in-process path for scenarios 1 and 6's book orders.

    python bench/order_cost.py [--orders 6000] [--warmup 2000] [--makers 32]

The path is what the REST lane runs for each of the book driver's requests (``loadgen.py
drive --mode book``): :meth:`RestApi.submit` (the body parsed into a command, the engine),
:meth:`Venue.flush` (the commit into SQLite at ``synchronous=NORMAL``, the projections, the
order book's push encoded for its watchers) and the reply's body. Each maker places limit
orders 1-20 ticks off 6000 on either side and cancels its oldest once it has 12 resting, so
every order changes the book, as in the benchmark; one commit per order, as at scenario 6's
paced rate. The hub only counts the order book's messages (no sessions, no transport, no
HTTP): what is measured is the venue's own work. Timestamps come from a counter. SQLite
checkpoints run inside the appends, as by default (deterministic), or with ``--background``
on a thread, as the server runs them.

Instructions per order, repeatable on a busy machine: run under callgrind with ``--orders 0``
and with ``--orders N`` and divide the difference by N; ``PYTHONPATH=DIR/src`` measures
another tree (an export made with ``git archive COMMIT src setup.py pyproject.toml``, built
with ``setup.py build_ext --inplace``):

    valgrind --tool=callgrind --callgrind-out-file=/tmp/o0 .venv/bin/python \\
        bench/order_cost.py --orders 0
    valgrind --tool=callgrind --callgrind-out-file=/tmp/oN .venv/bin/python \\
        bench/order_cost.py --orders 2000

Prints one JSON object: the orders (and how many of them were cancels), their wall-clock and
CPU microseconds each, the book messages made and their mean size.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any

import msgspec

import benchlib as b
from command_cost import CountingHub, counting_venue
from perps_indexer.server.rest import RestApi
from perps_indexer.store.sqlite import SQLiteStore

DEPTH = 12  # resting orders per maker, as loadgen.py's --depth
LEVELS = 40  # price levels in use, as loadgen.py's --levels


class BookHub(CountingHub):
    """command_cost.py's counting hub, on which the market's order book is the one stream
    watched."""

    def watched(self, stream: tuple[str, Any]) -> bool:
        return stream == ("orderbook", b.MARKET)


async def run(
    path: Path, orders: int, warmup: int, makers: int, background: bool
) -> dict[str, Any]:
    hub = BookHub(check=False)
    store = SQLiteStore(path, synchronous="NORMAL")
    if background:
        store.checkpoint_in_background()
    venue = counting_venue(store, hub)
    api = RestApi(venue, b.API_KEY)
    key = b.API_KEY.encode()
    encode = msgspec.json.encode

    def write(path: str, body: dict[str, Any]) -> dict[str, Any]:
        future, reply = api.submit(api.writes[path], key, encode(body))
        venue.flush()  # one commit per order
        answer: dict[str, Any] = msgspec.json.decode(reply(future.result()))["data"]
        return answer

    owners = [b.address(900_000 + k) for k in range(makers)]
    for owner in owners:
        write("/deposit", {"userAddress": owner, "amount": 10**13})
    rngs = [random.Random(k) for k in range(makers)]
    resting: list[deque[int]] = [deque() for _ in range(makers)]
    cancels = [0]

    def order(i: int) -> None:
        k = i % makers
        owner, rng, mine = owners[k], rngs[k], resting[k]
        if len(mine) >= DEPTH:
            oldest = str(mine.popleft())
            cancel = {"userAddress": owner, "marketId": b.MARKET, "cancelOrderIds": [oldest]}
            write("/cancelMultipleOrders", cancel)
            cancels[0] += 1
            return
        ask = rng.random() < 0.5
        away = 1 + rng.randrange(LEVELS // 2)
        body = {
            "userAddress": owner,
            "marketId": b.MARKET,
            "tradeSide": not ask,
            "direction": False,
            "size": 500 + 100 * rng.randrange(5),
            "price": 6000 + away if ask else 6000 - away,
            "leverage": 10,
        }
        data = write("/placeLimitOrder", body)
        if data.get("status") != "Filled":
            mine.append(int(data["order_id"]))

    for i in range(warmup):  # the book at its working depth
        order(i)
    messages, size, cancels[0] = hub.messages, hub.bytes, 0
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(warmup, warmup + orders):
        order(i)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    store.close()
    return {
        "orders": orders,
        "cancels": cancels[0],
        "us_per_order": round(wall / orders * 1e6, 1) if orders else 0.0,
        "cpu_us_per_order": round(cpu / orders * 1e6, 1) if orders else 0.0,
        "book_messages": hub.messages - messages,
        "book_message_bytes": (hub.bytes - size) // max(1, hub.messages - messages),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--orders", type=int, default=6_000)
    parser.add_argument("--warmup", type=int, default=2_000, help="orders before the count")
    parser.add_argument("--makers", type=int, default=32, help="as scenario 6's posters")
    parser.add_argument(
        "--background", action="store_true", help="checkpoints on a thread, as the server"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-order-cost-") as tmp:
        path = Path(tmp) / "run.db"
        result = asyncio.run(run(path, args.orders, args.warmup, args.makers, args.background))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
