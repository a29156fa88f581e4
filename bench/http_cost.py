"""What one REST request costs the server in aiohttp, beside a bare HTTP/1.1 protocol.

    python bench/http_cost.py [--seconds 5] [--connections 8] [--kinds app,...,server-lane]

The server's REST writes go through aiohttp (the transport of its WebSocket API too). This
measures what that costs per request, to decide whether a leaner HTTP path for the writes would
pay: three servers in turn, each pinned to CPU 0, answer the same keep-alive POST (a 120-byte
JSON body, a 48-byte JSON answer) from a closed-loop client of ``--connections`` connections
pinned to CPU 1:

- ``app``: an aiohttp ``Application`` with a route and two pass-through middlewares (the
  server's shape: ``error_middleware`` and ``cors_middleware``);
- ``lowlevel``: aiohttp's low-level ``web.Server`` (no router, no middlewares);
- ``raw``: an ``asyncio.Protocol`` that finds the headers' end and ``Content-Length`` and
  writes a fixed answer (no parser worth the name: the floor, not a server);
- ``server``, ``server-lane``: the real server (``perps-indexer serve --sync NORMAL``) taking
  ``POST /deposit`` commands, through aiohttp (``--no-rest-lane``) and through its REST lane
  (``server/lane.py``): what the lane saves on a real write, engine, commit and fold included;
- ``server-read``, ``server-lane-read``: the same two answering ``GET
  /getMarketPrice?marketId=396``, a small read.

Prints one line per server: requests/s, its CPU share, and CPU microseconds per request. When
the client's core is full (``raw``), the per-request figure is still right; the rate is the
client's.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchlib import LOAD_CPU, PYTHON, SERVER_CPU, SRC, cpu_seconds, spawn, start_server, stop

PORT = 18_123
BODY = b'{"success":true,"message":"ok","data":{"seq":1}}'
BODY_IN = b"{" + b" " * 118 + b"}"


def serve(kind: str, seconds: float) -> None:
    import uvloop
    from aiohttp import web

    async def handle(request: web.BaseRequest) -> web.Response:
        await request.read()
        return web.Response(body=BODY, content_type="application/json")

    @web.middleware
    async def first(request: web.Request, handler: web.RequestHandler) -> web.StreamResponse:
        return await handler(request)

    @web.middleware
    async def second(request: web.Request, handler: web.RequestHandler) -> web.StreamResponse:
        return await handler(request)

    class Raw(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport: Any = transport  # uvloop's is not an asyncio.Transport subclass
            self.buffer = b""

        def data_received(self, data: bytes) -> None:
            self.buffer += data
            while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
                head = self.buffer[:end].lower()
                at = head.find(b"content-length:")
                length = int(head[at + 15 :].split(b"\r\n", 1)[0]) if at >= 0 else 0
                if len(self.buffer) < end + 4 + length:
                    return
                self.buffer = self.buffer[end + 4 + length :]
                self.transport.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(BODY), BODY)
                )

    async def main() -> None:
        loop = asyncio.get_running_loop()
        if kind == "app":
            app = web.Application(middlewares=[first, second])
            app.router.add_post("/placeLimitOrder", handle)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", PORT).start()
        elif kind == "lowlevel":
            await loop.create_server(web.Server(handle, access_log=None), "127.0.0.1", PORT)
        else:
            await loop.create_server(Raw, "127.0.0.1", PORT)
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        await asyncio.sleep(seconds)

    uvloop.run(main())


def client(port: int, connections: int, seconds: float, real: bool, read: bool) -> None:
    import uvloop

    from loadgen import Http  # the suite's REST driver

    done = [0]
    path, body = "/placeLimitOrder", BODY_IN
    if real:
        path, body = "/deposit", b'{"userAddress": "0x' + b"a1" * 32 + b'", "amount": 1}'

    async def one() -> None:
        http = await Http.open(f"http://127.0.0.1:{port}")
        while True:
            if read:
                status, _ = await http.get("/getMarketPrice?marketId=396")
            else:
                status, _ = await http.post(path, body)
            assert status == 200, status
            done[0] += 1

    async def main() -> None:
        tasks = [asyncio.ensure_future(one()) for _ in range(connections)]
        await asyncio.sleep(0.5)  # warm up
        sys.stdout.write("start\n")
        sys.stdout.flush()
        start, count = time.monotonic(), done[0]
        await asyncio.sleep(seconds)
        sys.stdout.write(f"rate {(done[0] - count) / (time.monotonic() - start)}\n")
        sys.stdout.flush()
        for task in tasks:
            task.cancel()

    uvloop.run(main())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--port", type=int, default=PORT, help=argparse.SUPPRESS)
    parser.add_argument(
        "--kinds",
        default="app,lowlevel,raw,server,server-lane,server-read,server-lane-read",
        help="which servers to measure, in this order (default all)",
    )
    parser.add_argument(
        "--role", choices=["app", "lowlevel", "raw", "client", "real-client", "read-client"]
    )
    parser.add_argument(
        "--src",
        help="the perps_indexer source tree the real server runs (default the repository's "
        "src/), e.g. another commit's: git archive COMMIT src | tar -x -C DIR",
    )
    args = parser.parse_args()
    if args.src:
        SRC[0] = Path(args.src).resolve()
    if args.role in ("client", "real-client", "read-client"):
        read = args.role == "read-client"
        client(args.port, args.connections, args.seconds, args.role != "client", read)
        return
    if args.role is not None:
        serve(args.role, args.seconds + 3.0)
        return
    me = [PYTHON, str(Path(__file__).resolve())]
    print("| server | requests/s | server CPU | CPU µs per request |")
    print("| --- | ---: | ---: | ---: |")
    for kind in args.kinds.split(","):
        real = kind.startswith("server")
        role = ("read-client" if kind.endswith("-read") else "real-client") if real else "client"
        with tempfile.TemporaryDirectory() as tmp:
            if real:
                lane = "--rest-lane" if kind.startswith("server-lane") else "--no-rest-lane"
                server = start_server("ours", Path(tmp) / "perps.db", lane)
                proc, port = server.proc, server.port
            else:
                port = PORT
                cmd = [*me, "--role", kind, "--seconds", str(args.seconds)]
                proc = spawn(kind, cmd, SERVER_CPU)
                proc.wait_line("^ready$", 30)
            try:
                load = spawn(
                    "client",
                    [*me, "--role", role, "--port", str(port), "--seconds", str(args.seconds)],
                    LOAD_CPU,
                )
                load.wait_line("^start$", 30)
                cpu, started = cpu_seconds(proc.pid), time.monotonic()
                rate = float(load.wait_line(r"^rate (\S+)$", args.seconds + 30).group(1))
                share = (cpu_seconds(proc.pid) - cpu) / (time.monotonic() - started)
                stop(load)
            finally:
                stop(proc)
        print(f"| {kind} | {rate:,.0f} | {share:.0%} | {share / rate * 1e6:.1f} |")


if __name__ == "__main__":
    main()
