"""A naive server of the same protocol, as a developer would write it in a day (scenario 6).

    python bench/naive_server.py [--port 0] [--api-key k]

aiohttp, ``json.dumps``, and one awaited send per subscriber: after every accepted command the
handler rebuilds the order book message of the market and awaits ``send_str`` to each of its
``orderbook`` subscribers in turn, then answers the REST call. Matching is the project's own
engine (``perps_indexer.engine.Engine``), so the book is the same as the real server's for the
same commands. There is no store: nothing is written to disk (the real server commits every
command to SQLite first), which only makes this server faster.

It serves what scenario 6 uses: the WebSocket ``orderbook`` topic (``{"topic": "orderbook",
"market_id": ...}``: the current book at once, then every change; messages carry ``seq``, the
engine's newest event, as the real server's do) and ``POST /deposit``, ``/placeLimitOrder`` and
``/cancelMultipleOrders`` with the real server's request fields and reply shape
(``{"success": true, "data": {"order_id", "status", "seq", ...}}``). It prints
``ws://127.0.0.1:PORT/ws`` when it listens.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import time

from aiohttp import WSMsgType, web

from perps_indexer.engine import Engine
from perps_indexer.errors import PerpsIndexerError
from perps_indexer.markets import default_markets


class NaiveServer:
    def __init__(self, api_key: str) -> None:
        self.engine = Engine(default_markets())
        self.api_key = api_key
        self.subscribers: dict[str, list[web.WebSocketResponse]] = {}

    def book_message(self, market_id: int) -> str:
        book = self.engine.books[market_id]
        asks, bids = book.levels()
        ts = str(self.engine.ts // 1000)
        rows = [
            {
                "is_ask": True,
                "last_updated": ts,
                "market_id": str(market_id),
                "price": str(p),
                "size": str(s),
            }
            for p, s in asks
        ] + [
            {
                "is_ask": False,
                "last_updated": ts,
                "market_id": str(market_id),
                "price": str(p),
                "size": str(s),
            }
            for p, s in bids
        ]
        return json.dumps({"data": rows, "message": "orderbook", "seq": self.engine.seq})

    async def publish(self, market_id: int) -> None:
        message = self.book_message(market_id)
        for ws in list(self.subscribers.get(str(market_id), [])):
            with contextlib.suppress(ConnectionError):
                await ws.send_str(message)

    async def ws_handler(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        subscribed: list[str] = []
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                try:
                    req = json.loads(msg.data)
                    market = str(req["market_id"])
                    assert req["topic"] == "orderbook"
                    int(market)
                except Exception:
                    await ws.send_str(json.dumps({"message": "error", "error": "bad request"}))
                    continue
                self.subscribers.setdefault(market, []).append(ws)
                subscribed.append(market)
                await ws.send_str(self.book_message(int(market)))
        finally:
            for market in subscribed:
                self.subscribers[market].remove(ws)
        return ws

    def now(self) -> int:
        return max(time.time_ns() // 1_000_000, self.engine.ts)

    async def command(self, request: web.Request) -> web.Response:
        if request.headers.get("x-api-key") != self.api_key:
            return web.json_response({"success": False, "message": "unauthorized"}, status=401)
        body = await request.json()
        path = request.path
        market_id = int(body.get("marketId", 0))
        result: dict[str, object] = {}
        try:
            if path == "/deposit":
                self.engine.deposit(body["userAddress"], int(body["amount"]), ts=self.now())
            elif path == "/placeLimitOrder":
                r = self.engine.place_limit_order(
                    body["userAddress"],
                    market_id,
                    is_long=body["tradeSide"],
                    is_close=body["direction"],
                    size=int(body["size"]),
                    price=int(body["price"]),
                    leverage=int(body["leverage"]),
                    ts=self.now(),
                )
                result = {"order_id": str(r.order.order_id), "status": r.order.status}
            elif path == "/cancelMultipleOrders":
                ids = [int(i) for i in body["cancelOrderIds"]]
                self.engine.cancel_orders(body["userAddress"], market_id, ids, ts=self.now())
        except PerpsIndexerError as exc:
            return web.json_response({"success": False, "message": str(exc)}, status=400)
        if market_id:
            await self.publish(market_id)
        result["seq"] = self.engine.seq
        return web.json_response({"success": True, "message": "ok", "data": result})


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--api-key", default="k")
    args = parser.parse_args()
    server = NaiveServer(args.api_key)
    app = web.Application()
    app.router.add_get("/ws", server.ws_handler)
    for path in ("/deposit", "/placeLimitOrder", "/cancelMultipleOrders"):
        app.router.add_post(path, server.command)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", args.port, backlog=1024)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    print(f"naive server ws://127.0.0.1:{port}/ws", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
