"""The REST lane (server/lane.py): its pure head parser, and real servers with and without it.

The lane must answer exactly what aiohttp answers for the requests it takes, and leave every
other request to aiohttp, on the same connection, in order.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from hypothesis import given
from hypothesis import strategies as st

from perps_indexer.server import lane
from perps_indexer.server.lane import HANDOVER, MAX_HEAD, MAX_QUEUE, TURN, Head, Routes, parse_head
from tests.server.conftest import (
    API_KEY,
    ThreadedServer,
    limit_order,
    metrics_value,
    start_threaded,
)

PATHS = {b"/deposit", b"/placeLimitOrder"}
READS = {b"/getPositions", b"/getMarketInfo"}
A = "0x" + "a1" * 32
B = "0x" + "b2" * 32


def post(path: str, body: bytes, *extra: str, key: str = API_KEY) -> bytes:
    fields = ["Host: x", f"x-api-key: {key}", f"Content-Length: {len(body)}", *extra]
    return (
        f"POST {path} HTTP/1.1\r\n{''.join(f + chr(13) + chr(10) for f in fields)}\r\n".encode()
        + body
    )


def deposit(address: str = A, amount: int = 1_000, *extra: str, key: str = API_KEY) -> bytes:
    body = json.dumps({"userAddress": address, "amount": amount}).encode()
    return post("/deposit", body, *extra, key=key)


# -- the pure parser


def with_host(request: bytes) -> bytes:
    """``request`` with a ``Host`` field after its first line, unless it has one: a head
    without one is handed over whatever else it holds (HTTP/1.1 requires it)."""
    if b"\r\n" not in request or b"host:" in request.lower():
        return request
    line, _, rest = request.partition(b"\r\n")
    return line + b"\r\nHost: x\r\n" + rest


def test_a_plain_read_is_taken() -> None:
    for target, path, query in [
        (b"/getMarketInfo", b"/getMarketInfo", b""),
        (b"/getPositions?userAddress=0x1&x=%20+y", b"/getPositions", b"userAddress=0x1&x=%20+y"),
    ]:
        request = b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        head = parse_head(request + b"GET", PATHS, 65_536, READS)
        assert isinstance(head, Head)
        assert (head.method, head.path, head.query, head.close) == (b"GET", path, query, True)
        assert (head.body_start, head.length) == (len(request), 0)


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /getPositions#x HTTP/1.1\r\n\r\n",
        b"GET /getPositions?a=\xff HTTP/1.1\r\n\r\n",
        b"GET /getPositions HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
        b"GET /getPositions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        b"GET /health HTTP/1.1\r\n\r\n",
        b"HEAD /getPositions HTTP/1.1\r\n\r\n",
        b"OPTIONS /getPositions HTTP/1.1\r\n\r\n",
        b"GET /getPositions?x=1 HTTP/1.0\r\n\r\n",
        b"POST /getPositions HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
    ],
)
def test_reads_the_lane_leaves_to_aiohttp(request_bytes: bytes) -> None:
    assert parse_head(with_host(request_bytes), PATHS, 65_536, READS) is HANDOVER


def test_a_plain_write_is_taken() -> None:
    request = deposit() + b"next"
    head = parse_head(request, PATHS, 65_536)
    assert isinstance(head, Head)
    assert (head.method, head.path, head.query) == (b"POST", b"/deposit", b"")
    assert head.api_key == API_KEY.encode() and not head.close
    assert request[head.body_start + head.length :] == b"next"
    assert json.loads(request[head.body_start : head.body_start + head.length])["amount"] == 1000
    assert isinstance(parse_head(deposit(A, 1, "X-0: 0"), PATHS, 65_536, READS), Head)


@pytest.mark.parametrize(
    ("field", "close"),
    [
        ("Connection: close", True),
        ("connection: Keep-Alive, CLOSE", True),
        ("Connection: x", False),
    ],
)
def test_connection_close_is_seen(field: str, close: bool) -> None:
    head = parse_head(deposit(A, 1, field), PATHS, 65_536)
    assert isinstance(head, Head) and head.close is close


def test_an_incomplete_head_waits_and_a_huge_one_is_handed_over() -> None:
    request = deposit()
    for cut in range(request.index(b"\r\n\r\n") + 3):
        assert parse_head(request[:cut], PATHS, 65_536) is None
    assert parse_head(b"POST /deposit HTTP/1.1\r\nX: " + b"a" * MAX_HEAD, PATHS, 65_536) is HANDOVER


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /deposit HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
        b"POST /deposit HTTP/1.0\r\nContent-Length: 0\r\n\r\n",
        b"POST /getPositions HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
        b"POST /deposit?x=1 HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
        b"POST  /deposit HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
        b"\r\nPOST /deposit HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
        b"POST /deposit HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST /deposit HTTP/1.1\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n",
        b"POST /deposit HTTP/1.1\r\nContent-Length: 0\r\nUpgrade: websocket\r\n\r\n",
        b"POST /deposit HTTP/1.1\r\nContent-Length: 0\r\nConnection: Upgrade\r\n\r\n",
        b"POST /deposit HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
        b"POST /deposit HTTP/1.1\r\nContent-Length: 0\r\nx-api-key: a\r\nx-api-key: b\r\n\r\n",
        b"POST /deposit HTTP/1.1\r\nHost: x\r\n\r\n",  # no length
        b"POST /deposit HTTP/1.1\r\nContent-Length: +1\r\n\r\n",
        b"POST /deposit HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n",
        b"POST /deposit HTTP/1.1\r\nContent-Length: 70000\r\n\r\n",  # over max_body
        b"POST /deposit HTTP/1.1\nContent-Length: 0\r\n\r\n",  # a bare LF
        b"POST /deposit HTTP/1.1\r\nContent-Length: 0\r\n folded\r\n\r\n",
        b"POST /deposit HTTP/1.1\r\nContent-Length: 0\r\nX: a\x01b\r\n\r\n",
        b"POST /deposit HTTP/1.1\r\nContent-Length: 0\r\nX: a\rb\r\n\r\n",
        b"POST /deposit HTTP/1.1\r\nContent-Length : 0\r\n\r\n",
        b"POST /deposit HTTP/1.1\r\nno colon\r\n\r\n",
    ],
)
def test_anything_but_a_plain_write_is_handed_over(request_bytes: bytes) -> None:
    assert parse_head(with_host(request_bytes), PATHS, 65_536) is HANDOVER


def _spliced(base: bytes, at: int, junk: bytes) -> bytes:
    at %= len(base) + 1
    return base[:at] + junk + base[at:]


# Plain requests with a few odd bytes put anywhere: random bytes alone almost never make a head.
SPLICED = st.builds(
    _spliced,
    st.sampled_from(
        [
            deposit(A, 7),
            deposit(A, 7, "Connection: close"),
            b"GET /getPositions?userAddress=0x1 HTTP/1.1\r\nHost: x\r\n\r\n",
        ]
    ),
    st.integers(0, 400),
    st.one_of(st.binary(max_size=3), st.sampled_from([b"\n", b"\r", b" ", b"\x01", b""])),
)


@given(st.binary(max_size=300) | SPLICED)
def test_the_parser_never_raises_and_takes_only_plain_writes(data: bytes) -> None:
    head = parse_head(data, PATHS, 65_536, READS)
    if isinstance(head, Head) and head.method == b"GET":
        target = head.path + (b"?" + head.query if head.query else b"")
        assert data.startswith(b"GET " + target + b" HTTP/1.1\r\n") and head.path in READS
        assert head.length == 0
    elif isinstance(head, Head):
        assert data.startswith(b"POST " + head.path + b" HTTP/1.1\r\n")
        assert head.path in PATHS and head.body_start <= len(data)
        assert b"\n" not in data[: head.body_start].replace(b"\r\n", b"")


@given(st.integers(min_value=0, max_value=2_000), st.sampled_from(["", "Connection: close"]))
def test_a_write_parses_the_same_whatever_follows(amount: int, extra: str) -> None:
    request = deposit(A, amount, *([extra] if extra else []))
    alone = parse_head(request, PATHS, 65_536)
    followed = parse_head(request + deposit(B, 5), PATHS, 65_536)
    assert isinstance(alone, Head) and alone == followed


_HEAD_PARTS = st.sampled_from(
    [
        deposit(A, 7),
        deposit(B, 1_234, "Connection: close"),
        post("/placeLimitOrder", b"{}"),
        b"GET /getPositions?address=0x1 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /getMarketInfo HTTP/1.1\r\nHost: x\r\nUpgrade: h2c\r\n\r\n",
        b"POST /deposit HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n",  # incomplete
    ]
)


@given(st.lists(st.one_of(_HEAD_PARTS, st.binary(max_size=120)), max_size=30), st.integers(1, 4))
def test_remembered_heads_parse_as_the_parser_does(buffers: list[bytes], size: int) -> None:
    """Routes.head answers what parse_head answers, for heads seen before or not, whatever
    follows them, and when its memo is full and starts again."""
    routes = Routes(cast(Any, None), dict.fromkeys(PATHS), dict.fromkeys(READS), 65_536, {})
    saved, lane.HEADS = lane.HEADS, size  # type: ignore[misc]
    try:
        for data in buffers + buffers:
            for buffer in (data, data + deposit(B, 5)):
                expected = parse_head(buffer, PATHS, 65_536, READS)
                assert routes.head(bytearray(buffer)) == expected
                assert len(routes.heads) <= size
    finally:
        lane.HEADS = saved  # type: ignore[misc]


# -- real servers, raw sockets


class Conn:
    """A raw HTTP/1.1 connection that reads replies one at a time."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.buffer:
            self._more()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        lines = head.decode().split("\r\n")
        fields = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(fields["content-length"])
        while len(self.buffer) < length:
            self._more()
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return int(lines[0].split()[1]), fields, body

    def closed(self) -> bool:
        """True once the server closed the connection (and nothing else came)."""
        data = self.sock.recv(65_536)
        assert data == b"", data
        return True

    def _more(self) -> None:
        data = self.sock.recv(65_536)
        assert data, "the server closed the connection"
        self.buffer += data

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[ThreadedServer, ThreadedServer]]:
    """A server with the lane and one without, from the same start."""
    (tmp_path / "lane").mkdir()
    (tmp_path / "plain").mkdir()
    lane, stop_lane = start_threaded(tmp_path / "lane")
    plain, stop_plain = start_threaded(tmp_path / "plain", rest_lane=False)
    try:
        yield lane, plain
    finally:
        stop_lane()
        stop_plain()


SAME_ANSWERS = [
    deposit(A, 20_000_000),
    deposit(B, 20_000_000, "Connection: keep-alive"),
    post("/placeLimitOrder", json.dumps(limit_order(B, long=True, size=2000, price=6000)).encode()),
    post("/placeLimitOrder", json.dumps(limit_order(B, long=True, size=1000, price=5999)).encode()),
    deposit(A, 1, key="wrong"),
    post("/deposit", b"", "X-Other: 1").replace(b"x-api-key: " + API_KEY.encode() + b"\r\n", b""),
    post("/deposit", b"{"),
    post("/deposit", b"[1, 2]"),
    post("/deposit", b""),
    post("/withdraw", json.dumps({"userAddress": A, "amount": 10**12}).encode()),
    post("/withdraw", json.dumps({"userAddress": "nope", "amount": 1}).encode()),
    post("/setMarkPrice", json.dumps({"marketId": 1, "price": 1}).encode()),
    post("/cancelMultipleOrders", json.dumps({"userAddress": A, "marketId": 396}).encode()),
    post("/placeMarketOrder", json.dumps({"userAddress": A}).encode()),
    post("/deposit", b'{"userAddress": "' + A.encode() + b'", "amount": "12"}', "X-Y:  z  "),
]


def test_the_lane_answers_as_aiohttp_does(pair: tuple[ThreadedServer, ThreadedServer]) -> None:
    plain = pair[1]
    answers: list[list[tuple[int, str, Any]]] = []
    for server in pair:
        conn = Conn(server.server.port)
        got = []
        for request in SAME_ANSWERS:
            conn.send(request)
            status, fields, body = conn.reply()
            got.append((status, fields["content-type"], json.loads(body)))
            assert ("aiohttp" in fields.get("server", "")) is (server is plain)
        conn.close()
        answers.append(got)
    assert answers[0] == answers[1]
    codes = [(status, reply.get("code")) for status, _, reply in answers[0]]
    assert codes == [
        *[(200, None)] * 4,
        *[(401, "unauthorized")] * 2,
        (400, "invalid_json"),
        *[(400, "invalid_request")] * 2,
        (400, "insufficient_collateral"),
        (400, "invalid_address"),
        (400, "unknown_market"),
        (400, "invalid_request"),
        (400, "unknown_market"),
        (200, None),
    ]
    assert answers[0][3][2]["data"]["status"] == "Open"  # not a made-up success


def test_pipelined_writes_are_answered_in_order(server: ThreadedServer) -> None:
    commits = metrics_value(server, "store_commits_total")
    accepted = metrics_value(server, "commands_accepted_total")
    conn = Conn(server.server.port)
    conn.send(b"".join(deposit(A, i + 1) for i in range(20)) + deposit(A, 1, key="bad"))
    replies = [conn.reply() for _ in range(20)]
    # Read in one turn of the loop (up to TURN a connection), they share commits, and the
    # metrics tell an operator how many a commit carried.
    assert metrics_value(server, "commands_accepted_total") == accepted + 20
    assert 1 <= metrics_value(server, "store_commits_total") - commits <= 20 // TURN + 1
    assert {status for status, _, _ in replies} == {200}
    data = [json.loads(body)["data"] for _, _, body in replies]
    # Each reply tells the state its own command left, though they commit in groups: the
    # running sum of the deposits, at consecutive sequence numbers.
    assert [int(d["collateral"]) for d in data] == [sum(range(1, i + 2)) for i in range(20)]
    assert [d["seq"] for d in data] == list(range(data[0]["seq"], data[0]["seq"] + 20))
    assert conn.reply()[0] == 401
    conn.close()


@pytest.mark.parametrize("half_close", [False, True])
def test_more_pipelined_writes_than_the_queue_holds(
    server: ThreadedServer, half_close: bool
) -> None:
    conn = Conn(server.server.port)
    count = MAX_QUEUE * 3 + 5
    conn.send(b"".join(deposit(A, 1) for _ in range(count)))
    if half_close:  # the held-back requests are still answered, then the connection closed
        conn.sock.shutdown(socket.SHUT_WR)
    collaterals = [int(json.loads(conn.reply()[2])["data"]["collateral"]) for _ in range(count)]
    assert collaterals == list(range(1, count + 1))
    if half_close:
        assert conn.closed()
    conn.close()


def test_many_pipelined_refusals_in_one_read(server: ThreadedServer) -> None:
    conn = Conn(server.server.port)
    conn.send(deposit(A, 1, key="bad") * 3_000 + deposit(A, 1))
    assert {conn.reply()[0] for _ in range(3_000)} == {401}
    assert conn.reply()[0] == 200
    conn.close()


def test_other_requests_hand_the_connection_to_aiohttp_in_order(server: ThreadedServer) -> None:
    conn = Conn(server.server.port)
    conn.send(deposit(A, 5))
    status, fields, _ = conn.reply()
    assert status == 200 and "server" not in fields  # the lane
    # A write, /health and a write in one go: /health hands over; all three answered in order.
    health = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    conn.send(deposit(A, 6) + health + deposit(A, 7))
    first, second, third = conn.reply(), conn.reply(), conn.reply()
    assert json.loads(first[2])["data"]["collateral"] == "11" and "server" not in first[1]
    assert json.loads(second[2])["data"]["seq"] == 2
    assert "aiohttp" in second[1]["server"] and "aiohttp" in third[1]["server"]
    assert json.loads(third[2])["data"]["collateral"] == "18"
    conn.close()


CHUNK = json.dumps({"userAddress": A, "amount": 100}).encode()


@pytest.mark.parametrize(
    ("request_bytes", "status", "code"),
    [
        (
            b"POST /deposit HTTP/1.1\r\nHost: x\r\nx-api-key: test-key\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
            b"%x\r\n%s\r\n0\r\n\r\n" % (len(CHUNK), CHUNK),
            200,  # a well-formed write, taken by aiohttp
            None,
        ),
        (
            b"POST /deposit HTTP/1.1\r\nHost: x\r\nx-api-key: test-key\r\nContent-Length: 70000"
            b"\r\n\r\n" + b" " * 70_000,
            413,
            "body_too_large",
        ),
        (b"POST /nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 404, "not_found"),
    ],
)
def test_handed_over_requests_get_aiohttp_answers(
    server: ThreadedServer, request_bytes: bytes, status: int, code: str | None
) -> None:
    conn = Conn(server.server.port)
    conn.send(request_bytes)
    got, fields, body = conn.reply()
    assert "aiohttp" in fields["server"]
    reply = json.loads(body)
    assert (got, reply.get("code")) == (status, code)
    if status == 200:
        assert reply["data"]["collateral"] == "100"
    conn.close()


def test_connection_close_and_a_half_close_end_the_connection_after_the_reply(
    server: ThreadedServer,
) -> None:
    conn = Conn(server.server.port)
    conn.send(deposit(A, 1, "Connection: close") + deposit(A, 2))  # the second is never read
    status, fields, _ = conn.reply()
    assert status == 200 and fields["connection"] == "close"
    assert conn.closed()
    conn.close()
    conn = Conn(server.server.port)
    conn.send(deposit(A, 3) + deposit(A, 4))
    conn.sock.shutdown(socket.SHUT_WR)
    assert [json.loads(conn.reply()[2])["data"]["collateral"] for _ in range(2)] == ["4", "8"]
    assert conn.closed()
    conn.close()
    assert server.rest.get(f"/getPositions?userAddress={A}")[0] == 200  # still serving


def test_an_idle_connection_is_closed_and_stop_closes_the_rest(tmp_path: Path) -> None:
    running, stop = start_threaded(tmp_path, idle_timeout=0.3)
    try:
        started = time.monotonic()  # the idle timer starts when the connection opens
        idle, busy = Conn(running.server.port), Conn(running.server.port)
        busy.send(deposit(A, 1))
        assert busy.reply()[0] == 200
        assert idle.closed()
        assert 0.2 < time.monotonic() - started < 5
        assert busy.closed()  # idle too, once answered
        kept = Conn(running.server.port)
        kept.send(deposit(A, 1))
        assert kept.reply()[0] == 200
    finally:
        stop()
    assert kept.closed()
    for conn in (idle, busy, kept):
        conn.close()


def test_a_halted_venue_answers_503_through_the_lane(
    pair: tuple[ThreadedServer, ThreadedServer],
) -> None:
    for server in pair:
        assert server.rest.ok("/deposit", {"userAddress": A, "amount": 1})
        venue = server.server.venue
        assert venue is not None
        server.call(venue.store.close)  # the disk goes away under the venue
        conn = Conn(server.server.port)
        conn.send(deposit(A, 1))
        status, _, body = conn.reply()
        assert (status, json.loads(body)["code"]) == (503, "venue_halted")
        conn.send(deposit(A, 1))  # refused at once now, and the connection stays up
        status, _, body = conn.reply()
        assert (status, json.loads(body)["code"]) == (503, "venue_halted")
        conn.close()


def test_an_unexpected_failure_is_a_500_and_harms_no_one_else(
    server: ThreadedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    venue = server.server.venue
    assert venue is not None
    calls = []

    def broken(command: Any) -> Any:
        calls.append(command)
        raise RuntimeError("a bug")

    monkeypatch.setattr(venue, "submit", broken)  # a fault injected, on the real server
    conn = Conn(server.server.port)
    conn.send(deposit(A, 1) + deposit(A, 2))
    status, fields, body = conn.reply()
    assert (status, json.loads(body)["code"], fields["connection"]) == (
        500,
        "internal_error",
        "close",
    )
    assert conn.closed() and len(calls) == 1
    conn.close()
    monkeypatch.undo()
    assert server.rest.ok("/deposit", {"userAddress": A, "amount": 1})["collateral"] == "1"


def get(target: str, *extra: str) -> bytes:
    fields = "".join(f + "\r\n" for f in ["Host: x", *extra])
    return f"GET {target} HTTP/1.1\r\n{fields}\r\n".encode()


SAME_READS = [
    get("/getMarketInfo"),
    get("/getMarketInfo?marketId=396"),
    get("/getMarketInfo?marketId=abc"),
    get("/getMarketInfo?marketId=396&marketId=1"),
    get("/getMarketInfo?marketId=+396+"),
    get(f"/getPositions?userAddress={A}"),
    get("/getPositions?userAddress=" + A.replace("a1", "%61%31", 3)),
    get("/getPositions?userAddress=nope"),
    get("/getPositions"),
    get(f"/getOpenOrders?userAddress={B}"),
    get(f"/getOrderHistory?userAddress={B}&limit=1"),
    get(f"/getTradeHistory?userAddress={B}&limit=0"),
    get(f"/getDepositAndWithdrawHistory?userAddress={A}"),
    get("/getFundingHistory?userAddress=" + A),
    get("/getOrderBook?marketId=396"),
    get("/getMarketPrice?marketId=396"),
    get("/getAllTrades?marketId=396&limit=5"),
    get("/getOrderStatusById?marketId=396&orderId=1"),
    get("/getOrderStatusById?marketId=396&orderId=999"),
    get("/getOrderStatusById?marketId=396&orderId=x"),
    get("/getFundingRate?marketId=396"),
    get("/getMarketInfo?", "Connection: keep-alive"),
]


def test_the_lane_reads_as_aiohttp_does(pair: tuple[ThreadedServer, ThreadedServer]) -> None:
    answers = []
    for server in pair:
        server.rest.ok("/deposit", {"userAddress": A, "amount": 20_000_000})
        server.rest.ok("/deposit", {"userAddress": B, "amount": 20_000_000})
        server.rest.ok("/placeLimitOrder", limit_order(B, long=True, size=2000, price=6000))
        conn = Conn(server.server.port)
        got = []
        for request in SAME_READS:
            conn.send(request)
            status, fields, body = conn.reply()
            cors = fields["access-control-allow-origin"]
            got.append((status, fields["content-type"], cors, json.loads(body)))
            assert ("aiohttp" in fields.get("server", "")) is (server is pair[1])
        conn.close()
        answers.append(got)
    assert answers[0] == answers[1]
    codes = [(status, reply.get("code")) for status, _, _, reply in answers[0]]
    assert codes == [
        *[(200, None)] * 2,
        (400, "unknown_market"),
        *[(200, None)] * 4,  # the first of two marketIds; "+" a space, as aiohttp reads them
        (400, "invalid_address"),
        (400, "invalid_request"),
        *[(200, None)] * 2,
        (400, "invalid_request"),  # limit=0
        *[(200, None)] * 5,
        *[(404, "unknown_order")] * 2,
        (400, "invalid_request"),
        *[(200, None)] * 2,
    ]
    assert answers[0][10][3]["data"]  # real rows: B's resting order
    assert answers[0][6][3]["data"] == answers[0][5][3]["data"]  # escapes decoded alike


def test_a_pipelined_read_sees_the_writes_before_it(server: ThreadedServer) -> None:
    conn = Conn(server.server.port)
    history = get(f"/getDepositAndWithdrawHistory?userAddress={A}")
    conn.send(deposit(A, 5) + deposit(A, 6) + history + deposit(A, 7) + history)
    replies = [conn.reply() for _ in range(5)]
    assert all("server" not in fields for _, fields, _ in replies)  # all in the lane
    first, second = (json.loads(replies[i][2])["data"] for i in (2, 4))
    assert [row["amount"] for row in first] == ["6", "5"]
    assert [row["amount"] for row in second] == ["7", "6", "5"]
    conn.close()


@pytest.mark.parametrize(
    "extra",
    [
        "Host: y",  # a second Host
        "User-Agent: a\r\nUser-Agent: b",
        "Content-Type: a\r\nContent-Type: b",
        "Content-Encoding: gzip",
        "Proxy-Connection: close",
        "Sec-WebSocket-Key1: 1",
        "\r\n".join(f"X-{i}: {i}" for i in range(128)),
    ],
)
def test_heads_aiohttp_refuses_or_reads_otherwise_are_handed_over(extra: str) -> None:
    assert parse_head(deposit(A, 1, extra), PATHS, 65_536, READS) is HANDOVER


def test_a_head_without_host_is_handed_over() -> None:
    request = deposit().replace(b"Host: x\r\n", b"")
    assert parse_head(request, PATHS, 65_536, READS) is HANDOVER


ODD_REQUESTS = [
    deposit(A, 7).replace(b"Host: x\r\n", b""),
    deposit(A, 7, "Host: y"),
    deposit(A, 7, "User-Agent: a", "User-Agent: b"),
    deposit(A, 7, *(f"X-{i}: {i}" for i in range(128))),
    deposit(A, 7, "Sec-WebSocket-Key1: 1"),
    deposit(A, 7, "Proxy-Connection: close"),
    get("/getMarketInfo").replace(b"Host: x\r\n", b""),
]


def test_requests_aiohttp_refuses_are_answered_alike(
    pair: tuple[ThreadedServer, ThreadedServer],
) -> None:
    answers = []
    for server in pair:
        got = []
        for request in ODD_REQUESTS:
            conn = Conn(server.server.port)
            conn.send(request)
            status, fields, body = conn.reply()
            assert "aiohttp" in fields["server"]  # aiohttp's answer on both
            got.append((status, fields.get("connection"), body))
            conn.close()
        history = server.rest.get(f"/getDepositAndWithdrawHistory?userAddress={A}")[1]["data"]
        answers.append((got, len(history)))
    assert answers[0] == answers[1]
    assert [status for status, _, _ in answers[0][0]] == [400, 400, 400, 400, 400, 200, 400]
    assert answers[0][1] == 1  # only the deposit aiohttp took (Proxy-Connection) was made


def _book(server: ThreadedServer, levels: int) -> None:
    server.rest.ok("/deposit", {"userAddress": B, "amount": 10**12})
    for i in range(levels):
        server.rest.ok("/placeLimitOrder", limit_order(B, long=True, size=500, price=5000 + i))


def test_a_client_that_does_not_read_gets_no_more_than_the_socket_holds(
    server: ThreadedServer,
) -> None:
    _book(server, 100)  # a 10 KB book per reply
    flood = Conn(server.server.port)
    flood.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65_536)
    count = 3_000
    flood.send(get("/getOrderBook?marketId=396") * count)  # ~30 MB of replies asked for

    def paused() -> bool:
        return any(not lane.writing for lane in server.server.lanes)

    def buffered() -> int:
        return sum(lane.transport.get_write_buffer_size() for lane in server.server.lanes)  # type: ignore[union-attr]

    deadline = time.monotonic() + 10
    while not server.call(paused):  # the socket is full and the transport has paused
        assert time.monotonic() < deadline, "the flood never filled the socket"
        time.sleep(0.01)
    # The lane stops answering while the socket is paused: a turn of replies at most, not
    # the whole pipeline, waits in the server.
    assert server.call(buffered) < 2_000_000
    other = Conn(server.server.port)  # and others are served meanwhile
    other.send(get("/getMarketInfo"))
    assert other.reply()[0] == 200
    other.close()
    books = [flood.reply() for _ in range(count)]
    assert {status for status, _, _ in books} == {200}
    assert len({body for _, _, body in books}) == 1
    flood.close()


def test_the_idle_timeout_spares_a_request_in_progress(tmp_path: Path) -> None:
    running, stop = start_threaded(tmp_path, idle_timeout=0.3)
    try:
        _book(running, 100)
        slow_reader = Conn(running.server.port)
        slow_reader.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65_536)
        slow_reader.send(get("/getOrderBook?marketId=396") * 1_000)
        request = deposit(A, 3)
        slow_upload = Conn(running.server.port)
        slow_upload.send(request[:-5])
        time.sleep(1.2)  # four idle timeouts, with a request in progress on both
        slow_upload.send(request[-5:])
        assert json.loads(slow_upload.reply()[2])["data"]["collateral"] == "3"
        assert {slow_reader.reply()[0] for _ in range(1_000)} == {200}
        for conn in (slow_reader, slow_upload):
            assert conn.closed()  # idle once answered
            conn.close()
    finally:
        stop()
