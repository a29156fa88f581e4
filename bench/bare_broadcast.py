"""Bare broadcast servers: the limit of a Python WebSocket transport on this machine (scenario 7).

    python bench/bare_broadcast.py picows|picows-asyncio|aiohttp|aiohttp-direct|aiohttp-batch
        --clients N
        [--message FILE | --size BYTES] [--port 0]

No routing, no state, no protocol: once ``--clients`` clients are connected (whatever they send
is ignored), one loop writes the same text message to every client, yields to the event loop
once per round (so the sockets are served) and starts again, until it is stopped. A client
whose socket is not taking data (more than 64 KiB waiting in the transport's buffer, the
default high-water mark) is skipped for that round, so one slow reader does not hold up the
others (the real server coalesces for such a reader in the same way). The message is the file
given (scenario 1's real orderbook message, captured by the suite), or ``--size`` bytes of
JSON-looking filler.

* ``picows``: picows on uvloop (the fastest transport available here);
* ``picows-asyncio``: picows on the standard asyncio loop;
* ``aiohttp``: aiohttp's WebSocket on the standard loop, with ``send_frame`` as a server
  written the usual way calls it;
* ``aiohttp-direct``: aiohttp on uvloop, the frame built once and written straight to every
  connection's transport (``transport.write``): the server's fast path without batches
  (``serve --no-batch-write``);
* ``aiohttp-batch``: the same, but a round's writes made by the server's batch writer
  (:class:`perps_indexer.server.batch_write.BatchWriter`: one call into C for the round, one
  ``send`` per client) to the clients whose transports hold nothing unsent, and
  ``transport.write`` for the others: the server's own write path (its sends through one
  io_uring submission a call where the kernel allows, as the server's; ``--no-io-uring``: one
  ``send`` each).

It prints ``ws://127.0.0.1:PORT/ws`` when it listens, and on SIGTERM the rounds and
messages written.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from perps_indexer.server.app import text_frame
from perps_indexer.server.batch_write import AVAILABLE as BATCH_WRITE
from perps_indexer.server.batch_write import BatchWriter

HIGH_WATER = 64 * 1024
KINDS = ("picows", "picows-asyncio", "aiohttp", "aiohttp-direct", "aiohttp-batch")


def message_of(args: argparse.Namespace) -> bytes:
    if args.message:
        with open(args.message, "rb") as f:
            return f.read().strip()
    filler = b'{"data":[' + b"x" * max(0, args.size - 40) + b'],"message":"orderbook","seq":1}'
    return filler[: max(args.size, 40)]


async def broadcast(
    stop: asyncio.Event, enough: asyncio.Event, one_round: Callable[[], Awaitable[int]]
) -> list[int]:
    """Once enough clients are in, run rounds until stopped; [rounds, messages written]."""
    counts = [0, 0]
    await enough.wait()
    while not stop.is_set():
        counts[1] += await one_round()
        counts[0] += 1
        await asyncio.sleep(0)
    return counts


async def run_picows(args: argparse.Namespace, message: bytes, stop: asyncio.Event) -> list[int]:
    from picows import WSListener, WSMsgType, WSTransport, ws_create_server

    peers: list[Any] = []
    enough = asyncio.Event()

    class Peer(WSListener):  # type: ignore[misc]
        def on_ws_connected(self, transport: WSTransport) -> None:
            self.transport = transport
            self.raw = transport.underlying_transport
            peers.append(self)
            if len(peers) >= args.clients:
                enough.set()

        def on_ws_frame(self, transport: WSTransport, frame: Any) -> None:
            pass

        def on_ws_disconnected(self, transport: WSTransport) -> None:
            if self in peers:
                peers.remove(self)

    server = await ws_create_server(lambda request: Peer(), "127.0.0.1", args.port, backlog=1024)
    port = server.sockets[0].getsockname()[1]
    print(f"bare {args.kind} ws://127.0.0.1:{port}/ws", flush=True)
    text = WSMsgType.TEXT

    async def one_round() -> int:
        sent = 0
        for peer in peers:
            if peer.raw.get_write_buffer_size() <= HIGH_WATER:
                peer.transport.send(text, message)
                sent += 1
        return sent

    counts = await broadcast(stop, enough, one_round)
    server.close()
    return counts


async def run_aiohttp(args: argparse.Namespace, message: bytes, stop: asyncio.Event) -> list[int]:
    from aiohttp import WSMsgType, web

    peers: dict[web.WebSocketResponse, asyncio.Transport] = {}
    fds: dict[asyncio.Transport, int] = {}  # aiohttp-batch: each transport's socket
    enough = asyncio.Event()

    frame = text_frame(message)  # the server's own framing, once for every client
    writer = BatchWriter(args.io_uring)  # aiohttp-batch: the server's batch writer

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=True, compress=False)
        await ws.prepare(request)
        transport = request.transport
        assert transport is not None  # uvloop's transports do not subclass asyncio.Transport
        peers[ws] = transport  # type: ignore[assignment]
        fds[transport] = writer.socket_of(transport)
        if len(peers) >= args.clients:
            enough.set()
        try:
            async for _ in ws:
                pass
        finally:
            peers.pop(ws, None)
            fds.pop(transport, None)
        return ws

    app = web.Application()
    app.router.add_get("/ws", handler)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", args.port, backlog=1024)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    print(f"bare {args.kind} ws://127.0.0.1:{port}/ws", flush=True)
    text = WSMsgType.TEXT

    async def send_frame_round() -> int:
        sent = 0
        for ws, transport in list(peers.items()):
            if transport.get_write_buffer_size() <= HIGH_WATER:
                try:
                    await ws.send_frame(message, text)
                except ConnectionError:
                    continue
                sent += 1
        return sent

    batched = args.kind == "aiohttp-batch"
    work = args.work_us / 1e6

    async def direct_round() -> int:
        """aiohttp-direct and aiohttp-batch: the frame straight to each transport, or (batched)
        to those holding nothing unsent in one call per slice, as the server's hub does."""
        sent = 0
        batch = []
        sockets = []
        for i, transport in enumerate(list(peers.values()), 1):
            if not transport.is_closing():
                buffered = transport.get_write_buffer_size()
                if buffered == 0 and batched:
                    batch.append(transport)
                    sockets.append(fds.get(transport, -1))  # -1: gone meanwhile
                    sent += 1
                elif buffered <= HIGH_WATER:
                    transport.write(frame)
                    sent += 1
            if args.slice and not i % args.slice:
                if batch:
                    writer(sockets, batch, frame)
                    batch, sockets = [], []
                if work:
                    busy(work)
                await asyncio.sleep(0)
        if batch:
            writer(sockets, batch, frame)
        return sent

    direct = args.kind in ("aiohttp-direct", "aiohttp-batch")
    counts = await broadcast(stop, enough, direct_round if direct else send_frame_round)
    await runner.cleanup()
    return counts


def busy(seconds: float) -> None:
    """Spin on the CPU for ``seconds``."""
    until = time.perf_counter() + seconds
    while time.perf_counter() < until:
        pass


def stop_on_signals() -> asyncio.Event:
    """An event the running loop sets on SIGINT or SIGTERM (how the suite stops a bare
    loop)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def main_async(args: argparse.Namespace) -> None:
    stop = stop_on_signals()
    message = message_of(args)
    if args.kind == "aiohttp-batch" and not BATCH_WRITE:
        sys.exit("aiohttp-batch needs the C extension perps_indexer.server._sendeach (not built)")
    run = run_aiohttp if args.kind.startswith("aiohttp") else run_picows
    task = asyncio.ensure_future(run(args, message, stop))
    await stop.wait()
    try:
        rounds, sent = await asyncio.wait_for(task, 10)
    except TimeoutError:
        return
    print(f"rounds {rounds} messages {sent} bytes {len(message)}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=list(KINDS))
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--message", help="file holding the message to broadcast")
    parser.add_argument("--size", type=int, default=3000, help="message size without --message")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument(
        "--slice",
        type=int,
        default=0,
        help="aiohttp-direct/-batch: yield to the loop after this many writes, as the server's "
        "fan-out does (0: once a round)",
    )
    parser.add_argument(
        "--work-us",
        type=float,
        default=0.0,
        help="aiohttp-direct/-batch with --slice: spin this many microseconds of CPU after each "
        "slice, as the server's order work comes between its slices (the sends' cost with gaps "
        "between them, without the orders' own effects on the caches)",
    )
    parser.add_argument(
        "--io-uring",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="aiohttp-batch: the batch writer's sends through io_uring where the kernel allows "
        "(default, as the server); --no-io-uring: one send(2) each",
    )
    args = parser.parse_args()
    if args.kind in ("picows", "aiohttp-direct", "aiohttp-batch"):
        try:
            import uvloop
        except ImportError:
            sys.exit(f"{args.kind} mode needs uvloop (pip install uvloop)")
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
