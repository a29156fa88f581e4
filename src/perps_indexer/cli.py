"""The ``perps-indexer`` command line."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import sys
from collections.abc import Coroutine, Sequence
from typing import Any

from perps_indexer import __version__
from perps_indexer.errors import ConfigurationError, PerpsIndexerError
from perps_indexer.heap import MAX_KEEP_MIB, keep_heap, keep_large_blocks

log = logging.getLogger("perps_indexer")


def _serve_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "serve",
        help="run the indexer: WebSocket streams and REST API",
        description="Run the indexer: WebSocket streams on /ws and the REST API on one port.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    p.add_argument("--port", type=int, default=8080, help="port (default %(default)s; 0 = any)")
    p.add_argument("--db", default="perps.db", help="SQLite file (default %(default)s)")
    p.add_argument("--api-key", help="key for write calls (default: a random one, printed)")
    p.add_argument("--demo", action="store_true", help="run the market simulator (demo venue)")
    p.add_argument("--demo-seed", type=int, default=1, help="simulator seed (default 1)")
    p.add_argument("--markets", help="market spec JSON file (default: bundled 396, 397, 398)")
    p.add_argument(
        "--history-limit",
        type=int,
        default=100,
        help="rows in trade_history and order_history pushes (default %(default)s)",
    )
    p.add_argument(
        "--ping-interval",
        type=float,
        default=20.0,
        help="seconds of client silence before the server pings (default 20)",
    )
    p.add_argument(
        "--ping-timeout",
        type=float,
        default=20.0,
        help="seconds to wait for a pong before closing (default 20)",
    )
    p.add_argument(
        "--sync",
        choices=["FULL", "NORMAL"],
        default="FULL",
        help="SQLite synchronous mode: FULL survives power loss, NORMAL a process "
        "crash (default FULL)",
    )
    p.add_argument(
        "--read-only", action="store_true", help="serve the streams and REST reads, no writes"
    )
    limits = p.add_argument_group("limits (see docs/protocol.md)")
    limits.add_argument(
        "--max-subscriptions",
        type=int,
        default=256,
        help="subscriptions per connection (default 256)",
    )
    limits.add_argument(
        "--rate",
        type=float,
        default=20.0,
        help="inbound messages per second per connection (default 20)",
    )
    limits.add_argument(
        "--burst", type=int, default=50, help="inbound burst per connection (default 50)"
    )
    limits.add_argument(
        "--max-connections-per-ip",
        type=int,
        default=1000,
        help="WebSocket connections per client address (default 1000)",
    )
    limits.add_argument(
        "--slow-reader-timeout",
        type=float,
        default=10.0,
        help="seconds a send may wait on a peer that does not read (default 10)",
    )
    p.add_argument(
        "--fanout-slice",
        type=int,
        default=100,
        help="writes of a fan-out's first slice before other work gets a turn, and the fewest "
        "a slice makes (default 100; 0: a whole round at once)",
    )
    p.add_argument(
        "--fanout-slice-ms",
        type=float,
        default=1.5,
        help="milliseconds a fan-out slice should last, its writes counted from what the slices "
        "before it cost: shorter lets new orders in sooner, longer delivers more messages per "
        "second (default 1.5; 0: every slice makes --fanout-slice writes)",
    )
    p.add_argument(
        "--fanout-share",
        type=float,
        default=0.0,
        help="between two fan-out slices, other work (orders first) gets more turns while it has "
        "taken less than this share of the slice's time (default 0: one turn, enough for a "
        "request through the REST lane; 0.2 answers requests through aiohttp sooner, as with "
        "--no-rest-lane)",
    )
    p.add_argument(
        "--rest-lane",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="answer plain HTTP/1.1 REST reads and writes without aiohttp, which takes every "
        "other request (default on; --no-rest-lane: aiohttp answers everything)",
    )
    p.add_argument(
        "--batch-write",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write a fan-out round's frame to many connections in one call into C (the "
        "_sendeach extension, built at install; default on; --no-batch-write: one "
        "transport write per connection)",
    )
    p.add_argument(
        "--io-uring",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="make a batch's sends with one io_uring system call where the kernel allows it "
        "(default on; the log says which is used; --no-io-uring: one send(2) per connection)",
    )
    p.add_argument(
        "--commit-batch",
        type=int,
        default=8,
        help="submitted commands committed and published together at most; a burst beyond it "
        "takes several event-loop turns, in order (default 8; 0: all of one turn)",
    )
    p.add_argument(
        "--checkpoint-every",
        type=float,
        default=0.05,
        help="seconds between checkpoints of the SQLite file, made on a thread of their own "
        "(default 0.05; 0: inside the append that fills the WAL, pausing the server)",
    )
    p.add_argument(
        "--gc-freeze-every",
        type=float,
        default=1.0,
        help="seconds between moves of the surviving heap out of the garbage collector's scans; "
        "while on, the oldest generation's automatic collections are rare "
        "(default 1; 0: the interpreter's default collector)",
    )
    p.add_argument(
        "--gc-full-every",
        type=float,
        default=3600.0,
        help="seconds between full garbage collections, which free what the frozen heap holds "
        "in cycles and pause the server (about 0.1 s per 1,000 connections; default 3600; "
        "0: never)",
    )
    p.add_argument(
        "--malloc-keep-mib",
        type=int,
        default=4,
        help="glibc's malloc serves blocks up to this many MiB from its heap and keeps twice "
        "that free, instead of mapping and zeroing fresh pages for every large message "
        "(default 4, at most 32; 0: glibc's defaults; ignored where MALLOC_MMAP_THRESHOLD_, "
        "MALLOC_TRIM_THRESHOLD_ or a glibc.malloc tunable in GLIBC_TUNABLES is set)",
    )
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default INFO)")


def _subscribe_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "subscribe",
        help="stream one topic from a running indexer (or any server speaking its protocol)",
        description="Stream one topic: a live view on a terminal, one JSON line per message "
        "otherwise. Reconnects and resubscribes by itself; Ctrl-C to stop.",
    )
    p.add_argument(
        "topic",
        help="positions, trade_history, open_orders, order_history, live_trade_history, "
        "live_order_history or deposit_withdraw_history (with --address); orderbook, "
        "recent_trades, best_price or live_funding_rate (with --market-id)",
    )
    key = p.add_mutually_exclusive_group(required=True)
    key.add_argument("--address", help="the account address (address topics)")
    key.add_argument(
        "--market-id",
        help="the market id (orderbook, recent_trades, best_price, live_funding_rate)",
    )
    p.add_argument(
        "--url",
        default="ws://127.0.0.1:8080/ws",
        help="WebSocket URL, ws:// or wss:// (default %(default)s)",
    )
    p.add_argument(
        "--json", action="store_true", help="one JSON line per message even on a terminal"
    )
    p.add_argument(
        "--record",
        metavar="FILE",
        help='append every message to FILE as {"received_at": ..., "message": ...} lines',
    )
    p.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING (default WARNING)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="perps-indexer",
        description="A perpetual-futures indexer with a real-time WebSocket API.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    _subscribe_parser(sub)
    return parser


def _banner(server: object) -> str:
    from perps_indexer.server.app import Server  # noqa: PLC0415

    assert isinstance(server, Server)
    lines = [
        f"perps-indexer {__version__} serving",
        f"  WebSocket  {server.ws_url}",
        f"  REST       {server.url}  (e.g. {server.url}/getOrderBook?marketId=396)",
        f"  database   {server.config.db}",
    ]
    if server.config.read_only:
        lines.append("  read-only  no write endpoints")
    elif server.config.api_key is None:
        lines.append(f"  API key    {server.api_key}   (generated; pass --api-key to fix it)")
    sim = server.simulator
    featured = getattr(sim, "featured_address", None)
    if featured:
        lines += [
            f"  demo venue running; a trading address: {featured}",
            f"  paste into a WebSocket client (e.g. `python -m websockets {server.ws_url}`):",
            f'    {{"topic": "positions", "address": "{featured}"}}',
            '    {"topic": "orderbook", "market_id": "396"}',
            "  or watch it live in another terminal:",
            f"    perps-indexer subscribe positions --address {featured} --url {server.ws_url}",
        ]
    return "\n".join(lines)


async def _serve(args: argparse.Namespace) -> int:
    from perps_indexer.server.app import Server, ServerConfig  # noqa: PLC0415

    config = ServerConfig(
        host=args.host,
        port=args.port,
        db=args.db,
        api_key=args.api_key,
        demo=args.demo,
        demo_seed=args.demo_seed,
        markets_file=args.markets,
        history_limit=args.history_limit,
        ping_interval=args.ping_interval,
        ping_timeout=args.ping_timeout,
        sync=args.sync,
        read_only=args.read_only,
        max_subscriptions=args.max_subscriptions,
        rate=args.rate,
        burst=args.burst,
        max_connections_per_ip=args.max_connections_per_ip,
        slow_reader_timeout=args.slow_reader_timeout,
        fanout_slice=args.fanout_slice,
        fanout_slice_ms=args.fanout_slice_ms,
        fanout_share=args.fanout_share,
        checkpoint_every=args.checkpoint_every,
        commit_batch=args.commit_batch,
        batch_write=args.batch_write,
        io_uring=args.io_uring,
        rest_lane=args.rest_lane,
    )
    for flag in (
        "fanout_slice",
        "fanout_slice_ms",
        "fanout_share",
        "commit_batch",
        "checkpoint_every",
        "gc_freeze_every",
        "gc_full_every",
        "malloc_keep_mib",
    ):
        if getattr(args, flag) < 0:
            option = "--" + flag.replace("_", "-")
            raise ConfigurationError(f"{option} takes 0 or more, got {getattr(args, flag)}")
    if args.malloc_keep_mib > 0:
        try:
            keep_large_blocks(args.malloc_keep_mib)  # logs what it did
        except ValueError:  # past glibc's cap: keep_large_blocks checks the range
            raise ConfigurationError(
                f"--malloc-keep-mib takes 0 to {MAX_KEEP_MIB} (glibc's cap), "
                f"got {args.malloc_keep_mib}"
            ) from None
    server = Server(config)
    await server.start()
    # The replayed state is long-lived: move it out of the collector's reach so that full
    # collections do not rescan it (they paused a large venue for up to 0.9 s), and keep doing
    # so for what survives later (connections): see perps_indexer.heap. The young and middle
    # thresholds stay (a larger young generation made young collections the new tail); the
    # policy makes the oldest generation's automatic collections rare (heap.OLD_THRESHOLD).
    gc.collect()
    gc.freeze()
    heap = None
    if args.gc_freeze_every > 0:
        heap = asyncio.create_task(keep_heap(args.gc_freeze_every, args.gc_full_every))
    sys.stdout.write(_banner(server) + "\n")
    sys.stdout.flush()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    if heap is not None:
        heap.cancel()
    await server.stop()
    return 0


def _run_fast(main: Coroutine[Any, Any, int]) -> int:
    """Run the server on uvloop where it is installed (a faster event loop), else asyncio's."""
    try:
        import uvloop  # noqa: PLC0415
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(args, "log_level", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command == "serve":
            return _run_fast(_serve(args))
        if args.command == "subscribe":
            from perps_indexer.client.command import subscribe_main  # noqa: PLC0415

            return asyncio.run(subscribe_main(args))
    except PerpsIndexerError as exc:
        sys.stderr.write(f"perps-indexer: {exc}\n")
        return 2
    except OSError as exc:
        sys.stderr.write(f"perps-indexer: {exc}\n")
        return 1
    return 2
