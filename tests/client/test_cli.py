"""``perps-indexer subscribe``: JSON lines through a pipe, and the live view on a terminal."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import signal
import struct
import subprocess
import termios
import time
from pathlib import Path
from typing import Any

from websockets.sync.client import connect

from perps_indexer.cli import build_parser
from tests.client.conftest import MARKET, TOPICS, A, cli_command, limit, rest_rows
from tests.server.conftest import ThreadedServer


def server_frame(url: str, request: dict[str, Any]) -> str:
    """What the server sends for a request, read directly."""
    with connect(url) as ws:
        ws.send(json.dumps(request))
        while True:
            frame = str(ws.recv(timeout=5))
            if json.loads(frame).get("message") != "subscribed":
                return frame


def test_json_lines_are_the_servers_messages(venue: ThreadedServer, tmp_path: Path) -> None:
    record = tmp_path / "record.jsonl"
    procs = {
        topic: subprocess.Popen(
            cli_command(topic, venue.ws_url, "--record", str(record)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for topic in TOPICS
    }
    lines: dict[str, list[str]] = {}
    try:
        for topic, proc in procs.items():
            assert proc.stdout is not None
            lines[topic] = [proc.stdout.readline()]
        limit(venue.rest, A, True, 500, 5970)
        for topic in ("open_orders", "order_history", "orderbook"):
            stdout = procs[topic].stdout
            assert stdout is not None
            lines[topic].append(stdout.readline())
    finally:
        for proc in procs.values():
            proc.send_signal(signal.SIGINT)
        codes = {topic: proc.wait(10) for topic, proc in procs.items()}
        errors = {topic: proc.communicate()[1] for topic, proc in procs.items()}
    assert codes == dict.fromkeys(TOPICS, 0), errors
    for topic in TOPICS:
        first = json.loads(lines[topic][0])
        key = {"market_id": str(MARKET)} if topic == "orderbook" else {"address": A}
        # The CLI's client is request id 1: the same request gets byte-identical frames.
        frame = server_frame(venue.ws_url, {"topic": topic, **key, "op": "subscribe", "id": 1})
        if topic in ("positions", "trade_history"):  # unchanged since the first line
            assert lines[topic][0] == frame + "\n"
        assert first["message"] == topic and isinstance(first["seq"], int)
        assert lines[topic][-1].endswith("\n")
        assert json.loads(lines[topic][-1])["data"] == rest_rows(venue.rest, topic)
    recorded = [json.loads(line) for line in record.read_text().splitlines()]
    assert len(recorded) == sum(len(v) for v in lines.values())
    assert all(isinstance(r["received_at"], float) for r in recorded)
    printed = sorted(
        json.dumps(json.loads(line), sort_keys=True) for v in lines.values() for line in v
    )
    assert sorted(json.dumps(r["message"], sort_keys=True) for r in recorded) == printed


def read_until(fd: int, needles: list[str], timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    seen = b""
    while not all(n.encode() in seen for n in needles):
        left = deadline - time.monotonic()
        assert left > 0, f"never saw {needles}: {seen[-2000:]!r}"
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
    return seen.decode(errors="replace")


def run_on_a_terminal(args: list[str], needles: list[str]) -> tuple[int, str]:
    main, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 110, 0, 0))
    proc = subprocess.Popen(args, stdin=child, stdout=child, stderr=child, close_fds=True)
    os.close(child)
    try:
        screen = read_until(main, needles)
        proc.send_signal(signal.SIGINT)
        code = proc.wait(10)
        screen += read_until(main, [], timeout=0.2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(main)
    return code, screen


def test_terminal_view_renders_a_table_and_the_book(venue: ThreadedServer) -> None:
    code, screen = run_on_a_terminal(
        cli_command("orderbook", venue.ws_url), ["BID SIZE", "6002", "6050", "spread 48"]
    )
    assert code == 0 and "Traceback" not in screen
    assert "\x1b[H" in screen  # redrawn in place
    code, screen = run_on_a_terminal(
        cli_command("positions", venue.ws_url), ["entry", "LONG", "6050", "connected"]
    )
    assert code == 0 and "Traceback" not in screen


def test_the_parser_requires_one_key() -> None:
    parser = build_parser()
    args = parser.parse_args(["subscribe", "orderbook", "--market-id", "396"])
    assert (args.topic, args.market_id, args.url) == ("orderbook", "396", "ws://127.0.0.1:8080/ws")
    for bad in (
        ["subscribe", "positions"],
        ["subscribe", "x", "--address", "a", "--market-id", "1"],
    ):
        try:
            parser.parse_args(bad)
        except SystemExit as exc:
            assert exc.code == 2
        else:
            raise AssertionError(bad)


def test_a_refused_subscription_exits_2(venue: ThreadedServer) -> None:
    proc = subprocess.run(
        cli_command("positions", venue.ws_url, address="0xZZ"),
        check=False,
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert proc.returncode == 2
    assert "refused the subscription" in proc.stderr and "hex" in proc.stderr
