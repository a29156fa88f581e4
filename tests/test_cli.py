"""The ``perps-indexer serve`` command line: flags reach the server, unsafe settings refused."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from perps_indexer.heap import on_glibc
from tests.server.conftest import Client, spawn_server


def refused_serve(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    """Run ``serve`` with settings it must refuse; the database must not be created."""
    command = [sys.executable, "-m", "perps_indexer", "serve", "--port", "0"]
    done = subprocess.run(
        [*command, "--db", str(tmp_path / "x.db"), *flags],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert not (tmp_path / "x.db").exists()  # refused before anything was opened
    return done


def test_refuses_writes_on_a_public_address_without_a_key(tmp_path: Path) -> None:
    done = refused_serve(tmp_path, "--host", "0.0.0.0")
    assert "refusing to accept writes on 0.0.0.0 without a key" in done.stderr
    assert "--read-only" in done.stderr


def test_read_only_and_limit_flags(tmp_path: Path) -> None:
    server = spawn_server(tmp_path / "ro.db", "--read-only", "--max-subscriptions", "2")
    try:
        assert any("read-only" in line for line in server.banner)
        rest = Client(server.url)
        status, reply = rest.post("/deposit", {"userAddress": "0x1", "amount": 5})
        assert status in (404, 405) and reply["success"] is False
        assert rest.get("/getOrderBook?marketId=396")[0] == 200

        from websockets.sync.client import connect

        with connect(server.ws_url) as ws:
            for market in (396, 397, 398):
                ws.send(f'{{"topic": "orderbook", "market_id": {market}, "id": {market}}}')
            replies = [ws.recv(timeout=5) for _ in range(5)]
        assert sum('"too_many_subscriptions"' in r for r in replies) == 1
        assert any("max_subscriptions = 2" in r for r in replies)
    finally:
        server.terminate()


@pytest.mark.parametrize(
    ("flag", "shown"),
    [
        ("--gc-full-every", "-1.0"),
        ("--gc-freeze-every", "-0.5"),
        ("--fanout-slice", "-3"),
        ("--fanout-slice-ms", "-0.5"),
        ("--fanout-share", "-0.5"),
        ("--commit-batch", "-1"),
        ("--checkpoint-every", "-0.25"),
        ("--malloc-keep-mib", "-2"),
    ],
)
def test_refuses_negative_settings(tmp_path: Path, flag: str, shown: str) -> None:
    value = shown.removesuffix(".0")
    done = refused_serve(tmp_path, flag, value)
    assert f"{flag} takes 0 or more, got {shown}" in done.stderr


def test_refuses_a_malloc_size_past_glibcs_cap(tmp_path: Path) -> None:
    done = refused_serve(tmp_path, "--malloc-keep-mib", "64")
    assert "--malloc-keep-mib takes 0 to 32 (glibc's cap), got 64" in done.stderr


def test_serve_says_how_it_set_malloc(tmp_path: Path) -> None:
    server = spawn_server(tmp_path / "m.db", "--log-level", "INFO", "--malloc-keep-mib", "2")
    try:
        deadline = time.monotonic() + 10
        while not any("malloc:" in line for line in server.banner):
            assert time.monotonic() < deadline, server.banner
            time.sleep(0.05)
        said = next(line for line in server.banner if "malloc:" in line)
        if on_glibc():
            assert "blocks up to 2 MiB from the heap, up to 4 MiB kept free" in said
        else:
            assert "left as it is" in said
    finally:
        server.terminate()


def test_serve_defaults_are_the_servers_own() -> None:
    """The flags' defaults and ServerConfig's (the documented ones) are the same values."""
    from perps_indexer.cli import build_parser
    from perps_indexer.server.app import ServerConfig

    args = build_parser().parse_args(["serve"])
    config = ServerConfig()
    names = ("fanout_slice", "fanout_slice_ms", "fanout_share", "commit_batch")
    names += ("checkpoint_every", "batch_write", "io_uring")
    for name in (*names, "sync"):
        assert getattr(args, name) == getattr(config, name), name
