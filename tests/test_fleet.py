"""bench/fleet.c, the C subscribers of scenario 6, against a real server: it answers the
server's pings, reads every push and logs each one's seq and arrival, as loadgen.py does."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server.conftest import API_KEY, spawn_server

ROOT = Path(__file__).resolve().parent.parent
COMPILER = os.environ.get("CC", "cc")

pytestmark = pytest.mark.skipif(shutil.which(COMPILER) is None, reason="no C compiler")


def post(port: int, path: str, body: dict[str, object]) -> dict[str, object]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=json.dumps(body).encode(),
        headers={"x-api-key": API_KEY, "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        answer: dict[str, object] = json.loads(response.read())["data"]
        return answer


def test_the_fleet_answers_pings_and_logs_every_push(tmp_path: Path) -> None:
    fleet = tmp_path / "fleet"
    subprocess.run([COMPILER, "-O2", "-o", str(fleet), str(ROOT / "bench" / "fleet.c")], check=True)
    # The server pings a silent client after 0.2 s and closes it 0.3 s later without a pong.
    server = spawn_server(tmp_path / "e.db", "--ping-interval", "0.2", "--ping-timeout", "0.3")
    out = tmp_path / "subs.json"
    cmd = [str(fleet), "--port", str(server.port), "--clients", "5", "--record", "5"]
    fleet_proc = subprocess.Popen(
        [*cmd, "--out", str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        with fleet_proc as proc:
            assert proc.stdin is not None and proc.stdout is not None
            ready = json.loads(proc.stdout.readline())
            assert ready["ready"] == 5 and ready["errors"] == 0
            maker = "0x" + "ab" * 32
            post(server.port, "/deposit", {"userAddress": maker, "amount": 10**12})
            proc.stdin.write("start\n")
            proc.stdin.flush()
            seqs = []
            for k in range(8):
                order = {"userAddress": maker, "marketId": 396, "tradeSide": True}
                order |= {"direction": False, "size": 500, "price": 5990 - k, "leverage": 10}
                seqs.append(int(str(post(server.port, "/placeLimitOrder", order)["seq"])))
                time.sleep(0.25)  # each one a ping interval apart: the pings come meanwhile
            time.sleep(0.5)
            proc.stdin.write("mark\nstop\n")
            proc.stdin.flush()
            assert json.loads(proc.stdout.readline()) == {"done": True}
            assert proc.wait(10) == 0
    finally:
        if fleet_proc.poll() is None:
            fleet_proc.kill()
        server.terminate()
    result = json.loads(out.read_text())
    assert result["disconnected"] == 0 and result["close_codes"] == {}
    assert result["messages_at_mark"] >= 5 * len(seqs)  # every client saw every order
    assert sorted(result["logs"]) == ["0", "1", "2", "3", "4"]
    for log in result["logs"].values():
        logged = [seq for seq, _ in log]
        assert logged == sorted(logged) and set(seqs) <= set(logged)
        times = [t for _, t in log]
        assert times == sorted(times) and times[0] >= result["t_start"]
    assert result["sample"].startswith('{"data":[') and result["sample"].endswith(f"{seqs[-1]}}}")


def ws_frame(opcode: int, payload: bytes) -> bytes:
    """An unmasked server frame (RFC 6455 5.2), with the 7-, 16- or 64-bit length."""
    n = len(payload)
    if n < 126:
        head = bytes([0x80 | opcode, n])
    elif n < 65536:
        head = bytes([0x80 | opcode, 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([0x80 | opcode, 127]) + n.to_bytes(8, "big")
    return head + payload


def push(seq: int, size: int) -> bytes:
    return b'{"data":[%b],"message":"orderbook","seq":%d}' % (b"1" * size, seq)


@contextlib.contextmanager
def one_client(tmp_path: Path, *args: str) -> Iterator[tuple[subprocess.Popen[str], socket.socket]]:
    """The fleet with one recorded client (and ``args``) against a fake server: the handshake
    answered, the snapshot sent, counting started. Yields the fleet and the server's end; the
    results go to ``tmp_path / "subs.json"``."""
    fleet = tmp_path / "fleet"
    subprocess.run([COMPILER, "-O2", "-o", str(fleet), str(ROOT / "bench" / "fleet.c")], check=True)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    out = tmp_path / "subs.json"
    cmd = [str(fleet), "--port", str(port), "--clients", "1", "--record", "1", "--out", str(out)]
    with (
        listener,
        subprocess.Popen(
            [*cmd, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        ) as proc,
    ):
        assert proc.stdin is not None and proc.stdout is not None
        conn, _ = listener.accept()
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                head += conn.recv(4096)
            assert head.startswith(b"GET /ws HTTP/1.1\r\n")
            upgraded = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n"
            conn.sendall(upgraded + ws_frame(1, push(0, 10)))  # the snapshot in the same send
            assert json.loads(proc.stdout.readline())["ready"] == 1
            proc.stdin.write("start\n")
            proc.stdin.flush()
            yield proc, conn


def stop(proc: subprocess.Popen[str]) -> None:
    """Mark, stop, and the fleet's last word."""
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("mark\nstop\n")
    proc.stdin.flush()
    assert json.loads(proc.stdout.readline()) == {"done": True}


@pytest.mark.parametrize("stamps", [False, True], ids=["reads", "rx-timestamps"])
def test_the_fleet_reads_split_frames_and_outlives_a_closed_connection(
    tmp_path: Path, stamps: bool
) -> None:
    """A fake server: frames of every length form split across sends, then pings the fleet
    answers into a connection the server has closed (SIGPIPE killed the first version); with
    ``--rx-timestamps`` the recorded client reads a frame at a time and stamps each."""
    with one_client(tmp_path, *(["--rx-timestamps"] if stamps else [])) as (proc, conn):
        with conn:
            time.sleep(0.1)
            sizes = [10, 200, 70_000, 65_400, 90]
            for seq, size in enumerate(sizes, 1):
                data = ws_frame(1, push(seq, size))
                for at in range(0, len(data), max(1, len(data) // 5)):  # in pieces
                    conn.sendall(data[at : at + max(1, len(data) // 5)])
                    time.sleep(0.005)
            time.sleep(0.2)
            conn.sendall(ws_frame(9, b"p") * 3)
        time.sleep(0.3)  # closed: the pongs meet a reset connection
        assert proc.poll() is None
        stop(proc)
    result = json.loads((tmp_path / "subs.json").read_text())
    assert [seq for seq, _ in result["logs"]["0"]] == [1, 2, 3, 4, 5]
    assert result["messages_at_mark"] == 5
    assert result["bytes_at_mark"] == sum(len(push(s, n)) for s, n in enumerate(sizes, 1))
    assert result["disconnected"] == 1 and result["connected"] == 1
    if stamps:  # the same messages, each reaching the socket before it was read
        rx = result["rx_logs"]["0"]
        assert [seq for seq, _ in rx] == [1, 2, 3, 4, 5]
        for (_, at), (_, read) in zip(rx, result["logs"]["0"], strict=True):
            assert result["t_start"] - 1_000_000 <= at <= read + 1_000_000  # clocks: see below
    else:
        assert "rx_logs" not in result


def test_rx_timestamps_tell_when_a_message_reached_the_socket_not_when_it_was_read(
    tmp_path: Path,
) -> None:
    """Two pushes 0.2 s apart reach a fleet that is stopped: both are read once it resumes,
    but stamped when they reached the socket. The first may carry the second's stamp (the
    kernel merges a segment into an unread one before it, keeping the later stamp): a stamp
    is never earlier than its message's arrival, only sometimes later."""
    with one_client(tmp_path, "--rx-timestamps") as (proc, conn):
        time.sleep(0.1)
        proc.send_signal(signal.SIGSTOP)
        sent = []
        for seq in (1, 2):
            sent.append(time.monotonic_ns())
            conn.sendall(ws_frame(1, push(seq, 3000)))
            time.sleep(0.2)
        resumed = time.monotonic_ns()
        proc.send_signal(signal.SIGCONT)
        time.sleep(0.2)
        stop(proc)
    result = json.loads((tmp_path / "subs.json").read_text())
    reads = [t for _, t in result["logs"]["0"]]
    stamps = [t for _, t in result["rx_logs"]["0"]]
    assert [seq for seq, _ in result["rx_logs"]["0"]] == [1, 2]
    assert all(t >= resumed for t in reads)  # read only once the fleet ran again
    # Stamps come on CLOCK_REALTIME and are moved by the clocks' offset at the read: allow a
    # millisecond for that (the suite's figures are in milliseconds).
    slack = 1_000_000
    assert sent[0] - slack <= stamps[0] <= stamps[1] + slack  # arrivals...
    assert sent[1] - slack <= stamps[1] < sent[1] + 100_000_000
    assert stamps[1] < resumed  # ...not reads
