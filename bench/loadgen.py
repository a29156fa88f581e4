"""The benchmark suite's load generators (run by bench/suite.py, pinned to the load CPU).

    python bench/loadgen.py subscribe --url WS --clients N --subscribe SPEC --out FILE ...
    python bench/loadgen.py drive --url HTTP --mode book|fills --out FILE ...
    python bench/loadgen.py sublat --url WS --http HTTP --address ADDR --out FILE ...

``subscribe`` holds N picows WebSocket clients (on uvloop when installed). Each connects from
a loopback source address of its own range (:func:`benchlib.source_ip`, so the server's limit of
1,000 connections per client address is never hit), sends its subscriptions and waits for
their first messages (the snapshots); then the process prints ``ready``. It reads commands on
stdin: ``start`` (count messages and record arrival times from now), ``mark`` (the end of the
counting window; several marks split it into segments), ``stop`` (stop recording, write the
results to ``--out``, print ``done`` and exit). Recorded clients (``--record``) log
``(seq, time.monotonic_ns())`` for every message; ``seq`` is read from the end of the message
(``...,"seq":N}``). CLOCK_MONOTONIC is one clock for every process on the machine, so these
times compare with the driver's.

``drive`` posts commands over REST on raw HTTP/1.1 keep-alive connections and logs, for each
accepted command, ``time.monotonic_ns()`` taken just before the request was written and the
``seq`` of the command's last event (from the response), and the time its response was read.
``book`` mode keeps one market's book at a few dozen levels (each connection is a maker that
places a resting order 1-20 ticks off 6000 on either side, and cancels its oldest once it has
``--depth`` resting: every command changes the book); ``fills`` mode sends market buys that
each fill ``--sweep`` resting asks of the prefilled accounts (see :func:`benchlib.prefill`).
``--rate 0`` is closed loop (as fast as the server answers), else commands are scheduled at
that rate across the connections.

``sublat`` measures the time from sending a subscription to its first data message.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import random
import resource
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import msgspec
from picows import WSListener, WSMsgType, WSTransport, ws_connect

from benchlib import API_KEY, MARKET, address, source_ip

now_ns = time.monotonic_ns


def use_uvloop() -> str:
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


def stdin_lines(loop: asyncio.AbstractEventLoop) -> asyncio.Queue[str]:
    """Lines of stdin as an asyncio queue ("" at EOF)."""
    queue: asyncio.Queue[str] = asyncio.Queue()

    def pump() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(queue.put_nowait, line.strip())
        loop.call_soon_threadsafe(queue.put_nowait, "")

    threading.Thread(target=pump, daemon=True).start()
    return queue


def say(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


# ---------------------------------------------------------------------- subscribers


class Stats:
    __slots__ = (
        "bytes",
        "close_codes",
        "counting",
        "disconnected",
        "errors",
        "messages",
        "ready",
        "ready_event",
        "recording",
        "sample",
        "target",
    )

    def __init__(self, target: int) -> None:
        self.messages = 0
        self.bytes = 0
        self.ready = 0
        self.target = target
        self.ready_event = asyncio.Event()
        self.counting = False
        self.recording = False
        self.disconnected = 0
        self.errors = 0
        self.close_codes: dict[str, int] = {}
        self.sample: bytes = b""


class Subscriber(WSListener):  # type: ignore[misc]
    """One client: sends its requests, waits for ``expect`` first messages, then counts."""

    def __init__(self, requests: list[bytes], expect: int, stats: Stats, log: list[Any] | None):
        self.requests = requests
        self.expect = expect
        self.first = 0
        self.stats = stats
        self.log = log
        self.transport: WSTransport | None = None

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        for request in self.requests:
            transport.send(WSMsgType.TEXT, request)

    def on_ws_frame(self, transport: WSTransport, frame: Any) -> None:
        if frame.msg_type != WSMsgType.TEXT:
            if frame.msg_type == WSMsgType.CLOSE:
                code = str(frame.get_close_code())
                codes = self.stats.close_codes
                codes[code] = codes.get(code, 0) + 1
            return
        stats = self.stats
        if self.first < self.expect:
            payload = frame.get_payload_as_bytes()
            if payload.startswith(b'{"message":"error"'):
                stats.errors += 1
                sys.stderr.write(payload.decode()[:300] + "\n")
            self.first += 1
            if self.first == self.expect:
                stats.ready += 1
                if stats.ready >= stats.target:
                    stats.ready_event.set()
            return
        if stats.counting:
            stats.messages += 1
            stats.bytes += frame.payload_size
        log = self.log
        if log is not None and stats.recording:
            payload = frame.get_payload_as_bytes()
            i = payload.rfind(b'"seq":')
            if i >= 0:
                log.append((int(payload[i + 6 : -1]), now_ns()))
            stats.sample = payload  # the newest: the book at its working depth

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.stats.disconnected += 1


def requests_for(spec: str, i: int) -> tuple[list[bytes], int]:
    """The subscription requests of client ``i`` and how many first messages it waits for."""
    kind, _, arg = spec.partition(":")
    if kind == "orderbook":
        return [b'{"topic":"orderbook","market_id":"%s"}' % (arg or str(MARKET)).encode()], 1
    if kind == "account":  # its own address's four account topics
        addr = address(int(arg or 0) + i)
        topics = ("positions", "trade_history", "open_orders", "order_history")
        return [
            json.dumps({"topic": t, "address": addr}, separators=(",", ":")).encode()
            for t in topics
        ], 4
    if kind == "positions":
        addr = address(int(arg or 0) + i)
        return [b'{"topic":"positions","address":"%s"}' % addr.encode()], 1
    if kind == "none":  # a bare broadcast server: the first message is its first push
        return [], 1
    raise ValueError(spec)


async def subscribe_main(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    control = stdin_lines(loop)
    stats = Stats(args.clients)
    record_every = max(1, args.clients // args.record) if args.record else 0
    logs: dict[int, list[Any]] = {}
    listeners: list[Subscriber] = []
    failures: list[str] = []
    gate = asyncio.Semaphore(args.connect_concurrency)

    async def connect(i: int) -> None:
        requests, expect = requests_for(args.subscribe, i)
        log: list[Any] | None = None
        if record_every and i % record_every == 0 and len(logs) < args.record:
            log = logs[i] = []

        def factory() -> Subscriber:
            return Subscriber(requests, expect, stats, log)

        kwargs: dict[str, Any] = {}
        if args.source_ips:
            kwargs["local_addr"] = (source_ip(i), 0)
        async with gate:
            for attempt in range(5):
                try:
                    _, listener = await ws_connect(
                        factory, args.url, websocket_handshake_timeout=30, **kwargs
                    )
                    listeners.append(listener)
                    return
                except Exception as exc:
                    if attempt == 4:
                        failures.append(f"{type(exc).__name__}: {exc}")
                        return
                    await asyncio.sleep(0.2 * (attempt + 1))

    started = time.monotonic()
    await asyncio.gather(*(connect(i) for i in range(args.clients)))
    if failures:
        stats.target = args.clients - len(failures)
        if stats.ready >= stats.target:
            stats.ready_event.set()
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(stats.ready_event.wait(), args.ready_timeout)
    hold_collector(True)  # before "ready": a collection of 10,000 clients takes ~0.1 s
    say(
        {
            "ready": stats.ready,
            "clients": args.clients,
            "failures": len(failures),
            "failure": failures[:3],
            "connect_s": round(time.monotonic() - started, 2),
            "errors": stats.errors,
        }
    )
    result: dict[str, Any] = {}
    while True:
        line = await control.get()
        if line == "start":
            stats.messages = stats.bytes = 0
            stats.counting = stats.recording = True
            result["t_start"] = now_ns()
            result["cpu_start"] = cpu_seconds_self()
            result["sleeps_start"] = sleeps_self()
        elif line == "mark":  # the last mark ends the counting window; all are kept
            result["t_mark"] = now_ns()
            result["cpu_mark"] = cpu_seconds_self()
            result["messages_at_mark"] = stats.messages
            result["bytes_at_mark"] = stats.bytes
            result.setdefault("marks", []).append(
                [result["t_mark"], stats.messages, result["cpu_mark"], sleeps_self()]
            )
        elif line in ("stop", ""):
            stats.recording = False
            result["t_stop"] = now_ns()
            result["messages_total"] = stats.messages
            hold_collector(False)
            break
    result.update(
        clients=args.clients,
        connected=len(listeners),
        ready=stats.ready,
        disconnected=stats.disconnected,
        close_codes=stats.close_codes,
        errors=stats.errors,
        failures=len(failures),
        sample=stats.sample.decode(errors="replace"),
        logs={str(i): log for i, log in logs.items()},
    )
    with open(args.out, "w") as f:
        json.dump(result, f)
    for listener in listeners:
        if listener.transport is not None:
            listener.transport.disconnect(graceful=False)
    say({"done": True})


def hold_collector(held: bool) -> None:
    """Keep the collector out of a measured window (``held``) or let it run again.

    A load generator's own pauses would be charged to the server: with 10,000 clients, one
    full collection here takes tens of milliseconds, during which no arrival is timed. The
    window's allocations are logs and frames that live until the results are written, so
    nothing is lost by not collecting them; what exists before is frozen out of later scans.
    """
    if held:
        gc.collect()
        gc.freeze()
        gc.disable()
    else:
        gc.enable()


def sleeps_self() -> int:
    """Times this process went to sleep waiting (voluntary context switches; the stdin
    thread adds one per command): each time its loop ran out of messages to read, so each
    wake-up that followed was started by a server's send, on the server's core (on loopback,
    in a VM, not free)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw


def cpu_seconds_self() -> float:
    return time.process_time()


# ---------------------------------------------------------------------- REST driver


class Http:
    """A keep-alive HTTP/1.1 connection that posts JSON and reads the reply."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, url: str) -> Http:
        hostport = url.split("://", 1)[1].split("/", 1)[0]
        host, port = hostport.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        return cls(reader, writer)

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        self.writer.write(
            b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nx-api-key: %s\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (path.encode(), API_KEY.encode(), len(body), body)
        )
        return await self._reply()

    async def get(self, target: str) -> tuple[int, bytes]:
        self.writer.write(b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % target.encode())
        return await self._reply()

    async def _reply(self) -> tuple[int, bytes]:
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        data = await self.reader.readexactly(length) if length else b""
        return status, data

    def close(self) -> None:
        self.writer.close()


_decode = msgspec.json.decode


def _body(obj: dict[str, Any]) -> bytes:
    return msgspec.json.encode(obj)


async def drive_main(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    control = stdin_lines(loop)
    conns = [await Http.open(args.url) for _ in range(args.concurrency)]
    # (t_post_ns, seq of the command's last event, fills, t_reply_ns)
    log: list[tuple[int, int, int, int]] = []
    rejected: dict[str, int] = {}
    running = True
    schedule = {"next": 0, "t0": 0}
    interval = 1e9 / args.rate if args.rate else 0.0

    async def paced() -> bool:
        """Wait for this command's slot (open loop); False once stopped."""
        if not interval:
            return running
        j = schedule["next"]
        schedule["next"] = j + 1
        due = schedule["t0"] + j * interval
        delay = (due - now_ns()) / 1e9
        if delay > 0:
            await asyncio.sleep(delay)
        return running

    async def post(http: Http, path: str, body: bytes) -> dict[str, Any] | None:
        t = now_ns()
        status, raw = await http.post(path, body)
        reply = _decode(raw) if raw else {}
        if status != 200:
            code = reply.get("code", str(status)) if isinstance(reply, dict) else str(status)
            rejected[code] = rejected.get(code, 0) + 1
            return None
        data = reply["data"]
        log.append((t, data["seq"], len(data.get("fills") or ()), now_ns()))
        return data  # type: ignore[no-any-return]

    async def book_worker(k: int, http: Http) -> None:
        maker = address(900_000 + k)
        rng = random.Random(k)
        resting: deque[int] = deque()
        while await paced():
            if len(resting) >= args.depth:
                body = _body(
                    {
                        "userAddress": maker,
                        "marketId": MARKET,
                        "cancelOrderIds": [str(resting.popleft())],
                    }
                )
                await post(http, "/cancelMultipleOrders", body)
                continue
            ask = rng.random() < 0.5
            away = 1 + rng.randrange(args.levels // 2)
            body = _body(
                {
                    "userAddress": maker,
                    "marketId": MARKET,
                    "tradeSide": not ask,
                    "direction": False,
                    "size": 500 + 100 * rng.randrange(5),
                    "price": 6000 + away if ask else 6000 - away,
                    "leverage": 10,
                }
            )
            data = await post(http, "/placeLimitOrder", body)
            if data is not None and data.get("status") != "Filled":
                resting.append(int(data["order_id"]))

    fill_counter = [0]

    async def fills_worker(k: int, http: Http) -> None:
        n = args.accounts
        while await paced():
            j = fill_counter[0]
            fill_counter[0] = j + 1
            taker = address((j * args.sweep % n + n // 2) % n)
            body = _body(
                {
                    "userAddress": taker,
                    "marketId": MARKET,
                    "tradeSide": True,
                    "direction": False,
                    "size": 500 * args.sweep,
                    "leverage": 10,
                }
            )
            await post(http, "/placeMarketOrder", body)

    if args.mode == "book":
        for k, http in enumerate(conns):
            body = _body({"userAddress": address(900_000 + k), "amount": 10**13})
            status, raw = await http.post("/deposit", body)
            assert status == 200, raw
        worker: Callable[[int, Http], Any] = book_worker
    else:
        worker = fills_worker
    hold_collector(True)
    say({"ready": True, "concurrency": len(conns)})
    while await control.get() not in ("start", ""):
        pass
    schedule["t0"] = now_ns()
    cpu0 = time.process_time()
    tasks = [asyncio.ensure_future(worker(k, http)) for k, http in enumerate(conns)]
    while await control.get() not in ("stop", ""):
        pass
    running = False
    t_stop = now_ns()
    hold_collector(False)
    await asyncio.wait(tasks, timeout=30)
    for http in conns:
        http.close()
    result = {
        "t_start": schedule["t0"],
        "t_stop": t_stop,
        "cpu_s": time.process_time() - cpu0,
        "commands": len(log),
        "rejected": rejected,
        "log": log,
    }
    with open(args.out, "w") as f:
        json.dump(result, f)
    say({"done": True, "commands": len(log)})


# ---------------------------------------------------------------------- subscribe latency


class Prober(WSListener):  # type: ignore[misc]
    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue()
        self.transport: WSTransport | None = None

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: Any) -> None:
        if frame.msg_type == WSMsgType.TEXT:
            self.queue.put_nowait((now_ns(), frame.get_payload_as_bytes()))


async def sublat_main(args: argparse.Namespace) -> None:
    topics = args.topics.split(",")
    per_conn = 20  # requests per connection, within the server's burst of 50 messages
    samples_total = args.samples * len(topics) * 2
    probers: list[Prober] = []
    for _ in range(samples_total * 2 // per_conn + 1):
        _, p = await ws_connect(Prober, args.url)
        probers.append(p)
    http = await Http.open(args.http)
    results: dict[str, Any] = {}
    ident = 0
    turn = 0

    async def wait_for(p: Prober, marker: bytes, deadline: float = 10) -> tuple[int, bytes]:
        while True:
            t, payload = await asyncio.wait_for(p.queue.get(), deadline)
            if marker in payload:
                return t, payload

    for topic in topics:
        for state in ("cold", "warm"):
            times: list[int] = []
            rows = size = 0
            for _ in range(args.samples):
                if state == "cold":
                    # A new fill of the address: its views change, so the next subscription
                    # cannot be answered from the encoded-message cache.
                    body = _body(
                        {
                            "userAddress": args.address,
                            "marketId": MARKET,
                            "tradeSide": True,
                            "direction": False,
                            "size": 500,
                            "leverage": 10,
                        }
                    )
                    status, raw = await http.post("/placeMarketOrder", body)
                    assert status == 200, raw
                    if args.settle_ms:
                        await asyncio.sleep(args.settle_ms / 1000)
                p = probers[turn % len(probers)]
                turn += 1
                ident += 1
                assert p.transport is not None
                request = {"op": "subscribe", "topic": topic, "address": args.address, "id": ident}
                marker = b'"id":%d}' % ident
                t0 = now_ns()
                p.transport.send(WSMsgType.TEXT, msgspec.json.encode(request))
                while True:  # the ack comes first, then the data message carrying the id
                    t1, payload = await wait_for(p, marker)
                    if payload.startswith(b'{"data"'):
                        break
                times.append(t1 - t0)
                rows = len(_decode(payload)["data"])
                size = len(payload)
                request["op"] = "unsubscribe"
                p.transport.send(WSMsgType.TEXT, msgspec.json.encode(request))
                await wait_for(p, b'"unsubscribed"')
                await asyncio.sleep(0.002)
            results[f"{topic}/{state}"] = {"times_ns": times, "rows": rows, "bytes": size}
    http.close()
    for p in probers:
        if p.transport is not None:
            p.transport.disconnect(graceful=False)
    with open(args.out, "w") as f:
        json.dump(results, f)
    say({"done": True})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("subscribe")
    s.add_argument("--url", required=True)
    s.add_argument("--clients", type=int, required=True)
    s.add_argument("--subscribe", default="orderbook")
    s.add_argument("--record", type=int, default=0, help="clients that log arrival times")
    s.add_argument("--source-ips", action="store_true", help="spread over 127.0.0.x sources")
    s.add_argument("--connect-concurrency", type=int, default=100)
    s.add_argument("--ready-timeout", type=float, default=120)
    s.add_argument("--out", required=True)
    d = sub.add_parser("drive")
    d.add_argument("--url", required=True)
    d.add_argument("--mode", choices=["book", "fills"], default="book")
    d.add_argument("--concurrency", type=int, default=4)
    d.add_argument("--rate", type=float, default=0.0, help="commands/s; 0 = closed loop")
    d.add_argument("--depth", type=int, default=12, help="book: resting orders per connection")
    d.add_argument("--levels", type=int, default=40, help="book: price levels in use")
    d.add_argument("--accounts", type=int, default=10_000, help="fills: prefilled accounts")
    d.add_argument("--sweep", type=int, default=5, help="fills: resting orders per market buy")
    d.add_argument("--out", required=True)
    p = sub.add_parser("sublat")
    p.add_argument("--url", required=True)
    p.add_argument("--http", required=True)
    p.add_argument("--address", required=True)
    p.add_argument("--topics", default="trade_history,order_history")
    p.add_argument("--samples", type=int, default=100)
    p.add_argument("--settle-ms", type=float, default=0, help="wait after the change (cold)")
    p.add_argument("--out", required=True)
    args = parser.parse_args()
    use_uvloop()
    run = {"subscribe": subscribe_main, "drive": drive_main, "sublat": sublat_main}
    asyncio.run(run[args.command](args))


if __name__ == "__main__":
    main()
