"""Fixtures that run a real server on port 0 (in a thread, or as a subprocess)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from perps_indexer.server.app import Server, ServerConfig

API_KEY = "test-key"
T0 = 1_739_788_459_000  # the reference example's time, in ms


class FakeClock:
    """A settable clock (unix ms) so that timestamps in messages are exact."""

    def __init__(self, now: int = T0) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


def market_order(
    user: str, *, long: Any, size: Any, leverage: Any = 2, market: Any = 396
) -> dict[str, Any]:
    """A ``/placeMarketOrder`` body that opens or increases (``direction`` false).

    Values go out as given, so a test can send strings or a wrong type on purpose.
    """
    return {
        "userAddress": user,
        "marketId": market,
        "tradeSide": long,
        "direction": False,
        "size": size,
        "leverage": leverage,
    }


def limit_order(
    user: str, *, long: Any, size: Any, price: Any, leverage: Any = 2, market: Any = 396
) -> dict[str, Any]:
    """A ``/placeLimitOrder`` body: a market order's fields and a ``price``."""
    return {
        **market_order(user, long=long, size=size, leverage=leverage, market=market),
        "price": price,
    }


@dataclass
class Client:
    """REST helper for a running server."""

    url: str
    api_key: str = API_KEY

    def get(self, path: str) -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=10) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def post(
        self, path: str, body: Any, *, key: str | None = None, raw: bytes | None = None
    ) -> tuple[int, Any]:
        data = raw if raw is not None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method="POST")
        req.add_header("content-type", "application/json")
        req.add_header("x-api-key", self.api_key if key is None else key)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def ok(self, path: str, body: Any) -> Any:
        status, reply = self.post(path, body)
        assert status == 200, (path, body, reply)
        assert reply["success"] is True
        return reply["data"]


@dataclass
class ThreadedServer:
    server: Server
    thread: threading.Thread
    loop: asyncio.AbstractEventLoop
    clock: FakeClock
    rest: Client = field(init=False)

    def __post_init__(self) -> None:
        self.rest = Client(self.server.url)

    @property
    def ws_url(self) -> str:
        return self.server.ws_url

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the server's loop thread and return its result."""

        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)


def metrics_value(server: ThreadedServer, name: str) -> float:
    """One sample of ``GET /metrics`` (the Prometheus text format), by name with or without
    the ``perps_indexer_`` prefix."""
    with urllib.request.urlopen(server.rest.url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    for line in text.splitlines():
        if line.split(" ")[0] in (name, f"perps_indexer_{name}"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics:\n{text}")


def start_threaded(tmp_path: Path, **overrides: Any) -> tuple[ThreadedServer, Callable[[], None]]:
    clock = overrides.pop("clock", None) or FakeClock()
    config = ServerConfig(
        port=0, db=str(tmp_path / "perps.db"), api_key=API_KEY, sync="NORMAL", **overrides
    )
    server = Server(config, clock=clock)
    started = threading.Event()
    stop_holder: dict[str, Any] = {}
    error: list[BaseException] = []

    async def main() -> None:
        stop = asyncio.Event()
        stop_holder["stop"] = stop
        stop_holder["loop"] = asyncio.get_running_loop()
        try:
            await server.start()
        except BaseException as exc:
            error.append(exc)
            started.set()
            raise
        started.set()
        await stop.wait()
        await server.stop()

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    started.wait(20)
    if error:
        raise error[0]

    def stop() -> None:
        loop = stop_holder["loop"]
        loop.call_soon_threadsafe(stop_holder["stop"].set)
        thread.join(20)

    return ThreadedServer(server, thread, stop_holder["loop"], clock), stop


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ThreadedServer]:
    running, stop = start_threaded(tmp_path)
    try:
        yield running
    finally:
        stop()


@dataclass
class ServerProcess:
    """``perps-indexer serve`` as a real subprocess."""

    proc: subprocess.Popen[str]
    port: int
    banner: list[str]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.close_pipes()

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(20)
        self.close_pipes()
        return code

    def close_pipes(self) -> None:
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


def spawn_server(db: Path, *args: str, port: int = 0) -> ServerProcess:
    """Start ``python -m perps_indexer serve`` and wait for its banner."""
    cmd = [
        sys.executable,
        "-m",
        "perps_indexer",
        "serve",
        "--port",
        str(port),
        "--db",
        str(db),
        "--api-key",
        API_KEY,
        "--log-level",
        "WARNING",
        *args,
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    banner: list[str] = []
    port_found = None
    while port_found is None:
        line = proc.stdout.readline()
        if not line:
            err = proc.stderr.read() if proc.stderr else ""
            raise RuntimeError(f"server exited before its banner: {err}")
        banner.append(line.rstrip("\n"))
        match = re.search(r"ws://[\d.]+:(\d+)/ws", line)
        if match:
            port_found = int(match.group(1))
    # Read the rest of the banner so the pipe never fills up.
    threading.Thread(target=_drain, args=(proc.stdout, banner), daemon=True).start()
    threading.Thread(target=_drain, args=(proc.stderr, banner), daemon=True).start()
    return ServerProcess(proc, port_found, banner)


def _drain(stream: Any, sink: list[str]) -> None:
    for line in stream:
        sink.append(line.rstrip("\n"))
