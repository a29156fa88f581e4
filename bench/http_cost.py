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
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchlib import API_KEY, cpu_seconds

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


def real_server(kind: str, db: str) -> subprocess.Popen[str]:
    """The real server, on PORT, ready to serve."""
    lane = "--rest-lane" if kind.startswith("server-lane") else "--no-rest-lane"
    args = ["--port", str(PORT), "--db", db, "--api-key", API_KEY, "--sync", "NORMAL", lane]
    server = subprocess.Popen(
        [sys.executable, "-m", "perps_indexer", "serve", *args, "--log-level", "WARNING"],
        stdout=subprocess.DEVNULL,
        text=True,
        preexec_fn=lambda: os.sched_setaffinity(0, {0}),  # noqa: PLW1509
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", PORT), timeout=1).close()
            return server
        except OSError:
            time.sleep(0.1)
    server.kill()
    raise SystemExit("the server did not start")


def client(connections: int, seconds: float, real: bool, read: bool) -> None:
    import uvloop

    from loadgen import Http  # the suite's REST driver

    done = [0]
    path, body = "/placeLimitOrder", BODY_IN
    if real:
        path, body = "/deposit", b'{"userAddress": "0x' + b"a1" * 32 + b'", "amount": 1}'

    async def one() -> None:
        http = await Http.open(f"http://127.0.0.1:{PORT}")
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
    parser.add_argument(
        "--kinds",
        default="app,lowlevel,raw,server,server-lane,server-read,server-lane-read",
        help="which servers to measure, in this order (default all)",
    )
    parser.add_argument(
        "--role", choices=["app", "lowlevel", "raw", "client", "real-client", "read-client"]
    )
    args = parser.parse_args()
    if args.role in ("client", "real-client", "read-client"):
        client(args.connections, args.seconds, args.role != "client", args.role == "read-client")
        return
    if args.role is not None:
        serve(args.role, args.seconds + 3.0)
        return
    me = [sys.executable, str(Path(__file__).resolve())]
    print("| server | requests/s | server CPU | CPU µs per request |")
    print("| --- | ---: | ---: | ---: |")
    for kind in args.kinds.split(","):
        real = kind.startswith("server")
        role = ("read-client" if kind.endswith("-read") else "real-client") if real else "client"
        tmp = tempfile.mkdtemp()
        if real:
            server = real_server(kind, os.path.join(tmp, "perps.db"))
        else:
            server = subprocess.Popen(
                [*me, "--role", kind, "--seconds", str(args.seconds)],
                stdout=subprocess.PIPE,
                text=True,
                preexec_fn=lambda: os.sched_setaffinity(0, {0}),  # noqa: PLW1509
            )
            assert server.stdout is not None
            assert server.stdout.readline().strip() == "ready"
        load = subprocess.Popen(
            [*me, "--role", role, "--seconds", str(args.seconds)],
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=lambda: os.sched_setaffinity(0, {1}),  # noqa: PLW1509
        )
        assert load.stdout is not None
        assert load.stdout.readline().strip() == "start"
        cpu, started = cpu_seconds(server.pid), time.monotonic()
        rate = float(load.stdout.readline().split()[-1])
        share = (cpu_seconds(server.pid) - cpu) / (time.monotonic() - started)
        load.wait(30)
        if real:
            server.terminate()
        server.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"| {kind} | {rate:,.0f} | {share:.0%} | {share / rate * 1e6:.1f} |")


if __name__ == "__main__":
    main()
