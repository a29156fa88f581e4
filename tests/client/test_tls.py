"""wss:// through a small TLS-terminating relay in front of the real server."""

from __future__ import annotations

import asyncio
import contextlib
import ssl

import pytest
import trustme
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from perps_indexer.client import Client, ConnectFailed, ConnectionState, SyncClient
from tests.client.conftest import rest_rows, typed
from tests.server.conftest import ThreadedServer


async def test_wss_through_a_tls_relay(venue: ThreadedServer) -> None:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)

    async def relay(downstream: ServerConnection) -> None:
        async with connect(venue.ws_url) as upstream:

            async def pump(src: object, dst: object) -> None:
                async for frame in src:  # type: ignore[attr-defined]
                    await dst.send(frame)  # type: ignore[attr-defined]

            tasks = [
                asyncio.create_task(pump(downstream, upstream)),
                asyncio.create_task(pump(upstream, downstream)),
            ]
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in tasks:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task

    async with serve(relay, "localhost", 0, ssl=server_ctx) as tls:
        port = next(iter(tls.sockets)).getsockname()[1]
        url = f"wss://localhost:{port}/ws"
        want = typed("orderbook", rest_rows(venue.rest, "orderbook"))
        async with Client(url, ssl=client_ctx) as client:
            message = await asyncio.wait_for(anext(client.subscribe("orderbook", market_id=396)), 5)
            assert message.rows == want and client.protocol_version == 2

        def blocking() -> object:
            with SyncClient(url, ssl=client_ctx) as sync:
                return sync.subscribe("orderbook", market_id=396).get(timeout=5).rows

        assert await asyncio.to_thread(blocking) == want  # the relay runs on this loop

        # An untrusted certificate cannot be fixed by retrying: the client gives up at once.
        states = []
        async with Client(url, on_state=lambda c: states.append(c.state)) as untrusting:
            with pytest.raises(ConnectFailed, match="not trusted"):
                await asyncio.wait_for(anext(untrusting.subscribe("orderbook", market_id=1)), 5)
        assert ConnectionState.DISCONNECTED not in states


async def test_http_refusal_is_not_retried(venue: ThreadedServer) -> None:
    url = venue.ws_url.replace("/ws", "/no-such-path")
    async with Client(url) as client:
        with pytest.raises(ConnectFailed, match="HTTP 404"):
            await asyncio.wait_for(anext(client.subscribe("orderbook", market_id=396)), 5)
        with pytest.raises(ConnectFailed):  # later subscriptions learn it at once
            await anext(client.subscribe("orderbook", market_id=397))
