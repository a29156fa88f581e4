"""What a fan-out round costs the server beside the kernel's send, per watcher, in instructions.

    python bench/round_cost.py [--watchers 1000] [--rounds 100] [--busy] [--src DIR]

The server's fan-out of a busy stream (``Hub.publish_state`` then ``Hub.drain`` in slices of
100, as ``Server._fanout_loop`` calls it) to ``--watchers`` real TCP connections of a uvloop
server, each written through the batch writer as in the server (``--busy``: a new state before
every slice, so the round is renewed and never ends, as in scenario 1's busy book; otherwise
each change reaches everyone before the next): what is measured is the Python
of the round (who gets the frame, ``Session`` and transport checks, the call into C), not the
sends, whose work is in the kernel. The clients never read: the messages are small (100
bytes), so every round fits in their sockets.

Seconds on this machine vary too much to tell a few percent apart (BENCHMARKS.md); counted
instructions do not. Run it under callgrind with ``--rounds 0`` and with ``--rounds N`` and
divide the difference by the frames the second run wrote (``written``; the setup, the same in
both, drops out):

    valgrind --tool=callgrind --callgrind-out-file=/tmp/r0 .venv/bin/python \\
        bench/round_cost.py --rounds 0
    valgrind --tool=callgrind --callgrind-out-file=/tmp/rN .venv/bin/python \\
        bench/round_cost.py --rounds 100

Works with the package of any commit since the batch writer (``--src``, e.g. an export made
with ``git archive COMMIT src``, built with ``setup.py build_ext --inplace``). Prints one JSON
object: the rounds, the watchers, the frames written and the wall-clock seconds of the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import time
from pathlib import Path
from typing import Any

MARKET = 396
SLICE = 100


class _Source:
    """The projections' side of a subscription: every stream's state is an empty book."""

    def message(self, topic: str, key: object) -> bytes:
        return b'{"data":[],"message":"%s","seq":0}' % topic.encode()

    def resume(self, topic: str, key: object, since: int) -> bytes:
        raise AssertionError("not used")


class _Accept(asyncio.Protocol):
    def __init__(self, into: list[Any]) -> None:
        self.into = into

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.into.append(transport)


def _message(seq: int) -> bytes:
    return b'{"data":[],"message":"orderbook","seq":%d}' % seq + b" " * 60


async def run(watchers: int, rounds: int, busy: bool) -> dict[str, Any]:
    from perps_indexer.server.app import text_frame_header
    from perps_indexer.server.batch_write import BatchWriter
    from perps_indexer.session import Hub, Session

    loop = asyncio.get_running_loop()
    transports: list[Any] = []
    server = await loop.create_server(lambda: _Accept(transports), "127.0.0.1", 0, backlog=4096)
    port = server.sockets[0].getsockname()[1]
    clients = []
    for _ in range(watchers):
        client = socket.socket()
        client.setblocking(False)
        await loop.sock_connect(client, ("127.0.0.1", port))
        clients.append(client)
    while len(transports) < watchers:
        await asyncio.sleep(0.001)

    hub = Hub()
    hub.sliced = True
    hub.small_stream = 0
    hub.frame_header = text_frame_header
    hub.write_limit = 256 * 1024
    writer = BatchWriter()
    hub.write_each = writer
    source = _Source()
    request = json.dumps({"topic": "orderbook", "market_id": MARKET})
    for transport in transports:
        session = Session(hub, source, frozenset({MARKET}), now=0.0)
        hub.connect(session)
        session.receive_text(request, 0.0)
        session.take()  # the snapshot
        session.sink = transport
        if hasattr(writer, "socket_of"):  # since 42b6526: the session knows its socket
            session.fd = writer.socket_of(transport)
        else:
            writer.add(transport)

    stream = ("orderbook", MARKET)
    start = time.perf_counter()
    if busy:  # a new state before every slice: the cycle goes on, renewed, as in scenario 1
        for seq in range(1, rounds * -(-watchers // SLICE) + 1):
            hub.publish_state(stream, _message(seq))
            hub.drain(SLICE)
        while hub.drain(SLICE):
            pass
    else:  # each change reaches everyone before the next
        for seq in range(1, rounds + 1):
            hub.publish_state(stream, _message(seq))
            while hub.drain(SLICE):
                pass
    seconds = time.perf_counter() - start
    written = hub.direct_writes
    for transport in transports:
        transport.close()
    for client in clients:
        client.close()
    server.close()
    await server.wait_closed()
    return {
        "watchers": watchers,
        "rounds": rounds,
        "busy": busy,
        "written": written,
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--watchers", type=int, default=1_000)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument(
        "--busy",
        action="store_true",
        help="a new state before every slice of 100 (the round renewed, never ending, as in "
        "scenario 1), not one change per round",
    )
    parser.add_argument("--src", help="import perps_indexer from this tree (another commit's)")
    args = parser.parse_args()
    if args.src:
        sys.path.insert(0, str(Path(args.src).resolve()))
    import uvloop

    result = uvloop.run(run(args.watchers, args.rounds, args.busy))
    if result["written"] < args.watchers * args.rounds:
        raise SystemExit(f"expected {args.watchers * args.rounds} frames written: {result}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
