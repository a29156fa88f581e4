"""The server killed and restarted on the same port while clients are subscribed."""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
from pathlib import Path
from typing import Any

from perps_indexer.client import Backoff, Client, ConnectionState, StateChange, SyncClient
from tests.client.conftest import (
    TOPICS,
    A,
    cli_command,
    key_of,
    limit,
    rest_rows,
    seed,
    typed,
    until,
)
from tests.server.conftest import Client as Rest
from tests.server.conftest import ServerProcess, spawn_server

HISTORY = ("trade_history", "order_history")


def quick() -> dict[str, Any]:
    return {"backoff": Backoff(base=0.05, cap=0.3), "ping_interval": 2, "ping_timeout": 2}


def drain(stream: Any, sink: list[str]) -> None:
    for line in stream:
        sink.append(line.rstrip("\n"))


async def test_restart_on_the_same_port_resubscribes_everyone(tmp_path: Path) -> None:
    db = tmp_path / "venue.db"
    servers: list[ServerProcess] = [await asyncio.to_thread(spawn_server, db)]
    first = servers[0]
    cli = subprocess.Popen(
        cli_command("order_history", first.ws_url),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out: list[str] = []
    err: list[str] = []
    readers = [
        threading.Thread(target=drain, args=(cli.stdout, out)),
        threading.Thread(target=drain, args=(cli.stderr, err)),
    ]
    for reader in readers:
        reader.start()
    changes: list[StateChange] = []
    try:
        await asyncio.to_thread(seed, Rest(first.url))
        async with Client(first.ws_url, on_state=changes.append, **quick()) as aclient:
            with SyncClient(first.ws_url, **quick()) as sclient:
                asubs = {t: aclient.subscribe(t, **key_of(t)) for t in TOPICS}
                ssubs = {t: sclient.subscribe(t, **key_of(t)) for t in TOPICS}
                before_json = rest_rows(Rest(first.url), "order_history")
                before = {t: typed(t, rest_rows(Rest(first.url), t)) for t in TOPICS}
                for t in TOPICS:
                    assert (await asyncio.wait_for(anext(asubs[t]), 5)).rows == before[t]
                    assert (await asyncio.to_thread(ssubs[t].get, 5)).rows == before[t]

                async with asyncio.timeout(10):
                    while not out:  # the command is subscribed too
                        await asyncio.sleep(0.02)
                printed = len(out)
                await asyncio.to_thread(first.kill)
                async with asyncio.timeout(5):
                    while aclient.state is not ConnectionState.DISCONNECTED:
                        await asyncio.sleep(0.01)
                second = await asyncio.to_thread(spawn_server, db, port=first.port)
                servers.append(second)
                rest = Rest(second.url)
                for t in TOPICS:
                    now = typed(t, rest_rows(rest, t))
                    assert now == before[t]
                    message = await asyncio.wait_for(anext(asubs[t]), 10)
                    assert message.snapshot and message.rows == now, t
                    synced = await asyncio.to_thread(ssubs[t].get, 10)
                    assert synced.snapshot and synced.rows == now, t
                    if t in HISTORY:
                        # Resumed with since: the server sent only what changed (nothing).
                        assert message.resumed == () and json.loads(message.raw)["data"] == []
                states = [c.state for c in changes]
                assert states.count(ConnectionState.CONNECTED) == 2
                assert ConnectionState.DISCONNECTED in states

                async with asyncio.timeout(10):  # the command's snapshot after the restart
                    while len(out) == printed:
                        await asyncio.sleep(0.02)
                assert json.loads(out[printed])["data"] == before_json

                # Live again: a change after the restart arrives as an ordinary update.
                await asyncio.to_thread(limit, rest, A, True, 500, 5980)
                want = typed("order_history", rest_rows(rest, "order_history"))
                update = await until(asubs["order_history"], lambda m: m.rows == want)
                assert not update.snapshot and update.resumed is None
                got = await asyncio.to_thread(ssubs["order_history"].get, 5)
                assert got.rows == want
                after_json = rest_rows(rest, "order_history")
                async with asyncio.timeout(10):
                    while json.loads(out[-1])["data"] != after_json:
                        await asyncio.sleep(0.02)
    finally:
        cli.send_signal(2)  # SIGINT: the command's Ctrl-C
        code = await asyncio.to_thread(cli.wait, 10)
        for reader in readers:
            reader.join(5)
        for pipe in (cli.stdout, cli.stderr):
            assert pipe is not None
            pipe.close()
        for server in servers:
            if server.proc.poll() is None:
                server.kill()
    assert code == 0, err
    text = "\n".join(err)
    assert "connected" in text and "reconnecting in" in text and "reconnected" in text, text
    # The command's lines are the server's messages: full states before and after the restart.
    lines = [json.loads(line) for line in out]
    assert lines[0]["data"] == before_json and lines[0]["message"] == "order_history"
    assert lines[-1]["data"] == after_json
