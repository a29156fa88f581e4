"""The fan-out's batch writer: ``send_each`` on real sockets (through io_uring and through its
``send`` loop), :class:`BatchWriter` on real transports (asyncio's and uvloop's, plain and TLS),
and a real server with it on and off."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
import uvloop
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.sync.client import connect as ws_connect

from perps_indexer.server import _sendeach
from perps_indexer.server.batch_write import AVAILABLE, BatchWriter
from perps_indexer.server.batch_write import send_each as maybe_send_each
from tests.server.conftest import limit_order, metrics_value, start_threaded

# The extension is part of the package: a build that lost it must fail here, not skip.
assert AVAILABLE and maybe_send_each is not None, "perps_indexer.server._sendeach is not built"
send_each = maybe_send_each

REFUSED_BY_KERNEL = ("Operation not permitted", "Function not implemented")
"""Why io_uring may be missing for reasons outside the package (seccomp, io_uring_disabled,
an old kernel): only these skip the io_uring runs; any other reason fails them."""


def use(mode: str) -> None:
    """Make ``send_each`` send the ``mode`` way (``io_uring`` or ``send``), or skip."""
    got = _sendeach.set_io_uring(mode == "io_uring")
    if mode == "send":
        assert got == "send"
    elif got != "io_uring":
        if any(reason in got for reason in REFUSED_BY_KERNEL):
            pytest.skip(f"this kernel refuses io_uring: {got}")
        raise AssertionError(f"io_uring is not used: {got}")


@pytest.fixture(params=["io_uring", "send"])
def mode(request: pytest.FixtureRequest) -> Iterator[str]:
    use(request.param)
    yield request.param
    _sendeach.set_io_uring(True)  # the default


def pairs(n: int) -> list[tuple[socket.socket, socket.socket]]:
    return [socket.socketpair() for _ in range(n)]


def test_send_each_writes_the_whole_frame_to_every_socket(mode: str) -> None:
    socks = pairs(3)
    try:
        assert send_each([a.fileno() for a, _ in socks], b"frame") == []
        assert [b.recv(100) for _, b in socks] == [b"frame"] * 3
    finally:
        for a, b in socks:
            a.close()
            b.close()


def test_send_each_reports_a_full_socket_a_gone_peer_and_what_is_not_a_socket(mode: str) -> None:
    (full, reader), (orphan, gone) = pairs(2)
    gone.close()
    read_end, write_end = os.pipe()
    full.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    full.setblocking(False)
    data = bytes(range(256)) * 64  # 16 KiB
    try:
        taken: list[int] = []
        for _ in range(1000):  # until the socket stops taking whole frames
            short = send_each([full.fileno()], data)
            if short:
                assert short[0][0] == 0
                taken.append(short[0][1])
                break
        assert taken and 0 <= taken[0] < len(data)
        result = send_each([full.fileno(), -1, orphan.fileno(), write_end], b"x")
        assert result == [
            (0, 0),  # would block: nothing taken
            (1, 0),  # not a socket of ours: nothing taken
            (2, -errno.EPIPE),
            (3, -errno.ENOTSOCK),
        ]
    finally:
        for s in (full, reader, orphan):
            s.close()
        os.close(read_end)
        os.close(write_end)


def test_a_batch_larger_than_the_ring_reaches_every_socket(mode: str) -> None:
    """600 sockets in one call: more than one io_uring submission (the ring holds 256)."""
    socks = pairs(600)
    frame = bytes(range(256)) * 16
    try:
        assert send_each([a.fileno() for a, _ in socks], frame) == []
        assert all(b.recv(len(frame), socket.MSG_WAITALL) == frame for _, b in socks)
    finally:
        for a, b in socks:
            a.close()
            b.close()


KINDS = ("open", "full", "gone", "ours_not", "pipe", "closed")
NOT_OPEN = 999_999
"""A file descriptor number no test opens (the limit here is 20,000 descriptors at most)."""


@settings(deadline=None, max_examples=40)
@given(kinds=st.lists(st.sampled_from(KINDS), min_size=0, max_size=300))
def test_io_uring_and_the_send_loop_report_the_same(kinds: list[str]) -> None:
    """Any mix of sockets that take the frame, sockets that are full, peers gone, fds that are
    not ours (-1), fds that are not sockets and fds not open: both ways give the same report
    (an io_uring request that fails does not stop the others behind it), and every
    socket that took the frame whole holds exactly it."""
    frame = b"0123456789" * 100
    try:
        reports = [report_of(kinds, frame, way) for way in ("io_uring", "send")]
    finally:
        _sendeach.set_io_uring(True)  # the default
    assert reports[0] == reports[1]


def report_of(kinds: list[str], frame: bytes, way: str) -> list[tuple[int, int]]:
    """``send_each``'s report, made the ``way`` given, to sockets of the ``kinds`` given,
    checked against what each kind must report and what each reader got."""
    use(way)
    fds: list[int] = []
    readers: list[socket.socket | None] = []
    closers: list[Callable[[], None]] = []
    try:
        for kind in kinds:
            if kind in ("ours_not", "closed"):
                fds.append(-1 if kind == "ours_not" else NOT_OPEN)
                readers.append(None)
                continue
            if kind == "pipe":
                r, w = os.pipe()
                closers += [lambda r=r: os.close(r), lambda w=w: os.close(w)]
                fds.append(w)
                readers.append(None)
                continue
            a, b = socket.socketpair()
            closers += [a.close, b.close]
            a.setblocking(False)
            if kind == "full":
                a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
                with contextlib.suppress(BlockingIOError):
                    while True:
                        a.send(b"x" * 65536)
            if kind == "gone":
                b.close()
            fds.append(a.fileno())
            readers.append(b if kind == "open" else None)
        report = send_each(fds, frame)
        short = {index for index, _ in report}
        for i, reader in enumerate(readers):
            if reader is not None:
                assert i not in short
                assert reader.recv(len(frame) + 1) == frame
        expected = {
            "full": 0,
            "gone": -errno.EPIPE,
            "ours_not": 0,
            "pipe": -errno.ENOTSOCK,
            "closed": -errno.EBADF,
        }
        assert report == [(i, expected[k]) for i, k in enumerate(kinds) if k != "open"]
        return report
    finally:
        for close in closers:
            close()


def ring_counts() -> dict[str, int]:
    """This process's io_uring rings, by descriptor: how many submissions each has taken
    (``SqTail`` in the kernel's fdinfo)."""
    counts = {}
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if "io_uring" in os.readlink(f"/proc/self/fd/{fd}"):
                with open(f"/proc/self/fdinfo/{fd}") as info:
                    fields = dict(line.split(":", 1) for line in info if ":" in line)
                counts[fd] = int(fields.get("SqTail", "-1"))
    return counts


def test_a_forked_child_sends_through_a_ring_of_its_own() -> None:
    """The ring's queues are memory shared with the process that set it up: a child of a fork
    must not submit into its parent's. The child's sends go through a ring of its own (one
    that has taken only the child's submissions), and the parent's ring still works after."""
    use("io_uring")
    socks = pairs(4)
    try:
        fds = [a.fileno() for a, _ in socks]
        for _ in range(3):  # the parent's ring takes 12 submissions
            assert send_each(fds, b"p") == []
        parent = ring_counts()
        assert list(parent.values()) == [12], parent
        pid = os.fork()
        if pid == 0:  # the child: any failure is its exit status
            status = 1
            try:
                ok = send_each(fds[:2], b"c") == [] and _sendeach.mode() == "io_uring"
                status = 0 if ok and list(ring_counts().values()) == [2] else 3
            finally:
                os._exit(status)
        assert os.waitpid(pid, 0)[1] == 0
        assert send_each(fds, b"p") == []
        assert list(ring_counts().values()) == [16]  # the parent's, untouched by the child
        for i, (_, reader) in enumerate(socks):  # every send made once, in order
            want = b"pppcp" if i < 2 else b"pppp"
            assert reader.recv(len(want), socket.MSG_WAITALL) == want
    finally:
        for a, b in socks:
            a.close()
            b.close()


def test_the_writer_says_how_it_sends() -> None:
    assert BatchWriter(io_uring=False).mode == "send"
    wanted = BatchWriter().mode
    assert wanted == "io_uring" or any(reason in wanted for reason in REFUSED_BY_KERNEL), wanted


def test_send_each_says_what_is_wrong_with_its_arguments() -> None:
    with pytest.raises(TypeError, match="list of ints"):
        send_each((1, 2), b"x")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        send_each(["3"], b"x")  # type: ignore[list-item]
    with pytest.raises(ValueError, match="not a file descriptor"):
        send_each([2**40], b"x")
    with pytest.raises(TypeError):
        send_each([1], "text")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="exactly 2 arguments"):
        send_each([1])  # type: ignore[call-arg]
    assert send_each([], b"x") == []


LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


def run_on(loop: str, main: Coroutine[Any, Any, None]) -> None:
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        runner.run(main)


class Accepting(asyncio.Protocol):
    def __init__(self, accepted: asyncio.Future[asyncio.BaseTransport]) -> None:
        self.accepted = accepted

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self.accepted.done():
            self.accepted.set_result(transport)


async def read_all(client: socket.socket, size: int, exact: bool = True) -> bytes:
    """``size`` bytes from ``client`` (``exact=False``: what has arrived, up to ``size``,
    at least one byte)."""
    loop = asyncio.get_running_loop()
    got = bytearray()
    while len(got) < size:
        chunk = await asyncio.wait_for(loop.sock_recv(client, size - len(got)), 10)
        assert chunk, "the connection closed early"
        got += chunk
        if not exact:
            break
    return bytes(got)


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_every_byte_arrives_in_order_when_sockets_fill_up(loop: str) -> None:
    """The hub's rule (a batch only to a transport holding nothing unsent, a transport write
    otherwise) on a reader that does not read: the short writes go to the transport, and the
    stream that finally arrives is every frame, whole, in order."""

    async def main() -> None:
        ev = asyncio.get_running_loop()
        accepted: asyncio.Future[asyncio.BaseTransport] = ev.create_future()
        server = await ev.create_server(lambda: Accepting(accepted), "127.0.0.1", 0)
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.setblocking(False)
        await ev.sock_connect(client, server.sockets[0].getsockname())
        transport: Any = await accepted
        transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        writer = BatchWriter()
        fd = writer.socket_of(transport)
        assert fd == transport.get_extra_info("socket").fileno()
        frames = [b"%06d" % i * 1024 for i in range(120)]  # 6 KiB each, told apart by number
        batched = 0
        for frame in frames:
            if transport.get_write_buffer_size() == 0:
                writer([fd], [transport], frame)
                batched += 1
            else:
                transport.write(frame)
        assert writer.short_writes > 0, "the socket should have filled up"
        assert batched > 1 and writer.batches == batched
        assert await read_all(client, sum(map(len, frames))) == b"".join(frames)
        transport.close()
        client.close()
        server.close()
        await server.wait_closed()

    run_on(loop, main())


@settings(deadline=None, max_examples=25)
@given(
    steps=st.lists(
        st.tuples(st.integers(1, 40_000), st.integers(0, 60_000), st.booleans()),
        min_size=1,
        max_size=30,
    ),
    loop=st.sampled_from(sorted(LOOPS)),
)
def test_any_mix_of_batches_transport_writes_and_reads_keeps_the_stream_exact(
    steps: list[tuple[int, int, bool]], loop: str
) -> None:
    """Frames of any size to two connections, each step a batch or (the hub's rule when the
    transport holds bytes) a transport write, with the readers reading any amount between
    steps: each reader gets exactly its frames, in order."""

    async def main() -> None:
        ev = asyncio.get_running_loop()
        transports: list[Any] = []
        clients: list[socket.socket] = []
        server = await ev.create_server(lambda: Collect(transports), "127.0.0.1", 0)
        for _ in range(2):
            client = socket.socket()
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
            client.setblocking(False)
            await ev.sock_connect(client, server.sockets[0].getsockname())
            clients.append(client)
        while len(transports) < 2:
            await asyncio.sleep(0.001)
        for transport in transports:
            transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        # Which client is which transport: the transports' peer ports are the clients' ports.
        by_port = {t.get_extra_info("peername")[1]: t for t in transports}
        ordered = [by_port[c.getsockname()[1]] for c in clients]
        writer = BatchWriter()
        fds = [writer.socket_of(transport) for transport in ordered]
        assert min(fds) >= 0
        sent: list[bytearray] = [bytearray(), bytearray()]
        got: list[bytearray] = [bytearray(), bytearray()]
        for i, (size, read, second_only) in enumerate(steps):
            frame = bytes([i % 251]) * size
            targets = [1] if second_only else [0, 1]
            idle = [k for k in targets if ordered[k].get_write_buffer_size() == 0]
            if idle:
                writer([fds[k] for k in idle], [ordered[k] for k in idle], frame)
            for k in targets:
                if k not in idle:
                    ordered[k].write(frame)
                sent[k] += frame
            for k, client in enumerate(clients):
                want = min(read, len(sent[k]) - len(got[k]))
                if want:
                    got[k] += await read_all(client, want, exact=False)
        for k, client in enumerate(clients):
            rest = len(sent[k]) - len(got[k])
            if rest:
                got[k] += await read_all(client, rest)
            assert got[k] == sent[k]
        for transport in ordered:
            transport.close()
        for client in clients:
            client.close()
        server.close()
        await server.wait_closed()

    run_on(loop, main())


class Collect(asyncio.Protocol):
    def __init__(self, into: list[Any]) -> None:
        self.into = into

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.into.append(transport)


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_a_tls_connection_is_never_written_behind_its_back(loop: str) -> None:
    """Its socket carries TLS records: the writer refuses it and writes through the transport."""
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)

    async def main() -> None:
        ev = asyncio.get_running_loop()
        accepted: asyncio.Future[asyncio.BaseTransport] = ev.create_future()
        server = await ev.create_server(lambda: Accepting(accepted), "127.0.0.1", 0, ssl=server_ctx)
        port = server.sockets[0].getsockname()[1]
        reader, client = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx)
        transport: Any = await accepted
        writer = BatchWriter()
        assert writer.socket_of(transport) == -1
        writer([-1], [transport], b"through the TLS layer")
        assert await asyncio.wait_for(reader.readexactly(21), 10) == b"through the TLS layer"
        assert writer.short_writes == 0  # never sent to its socket: nothing was cut short
        client.close()
        transport.close()
        server.close()
        await server.wait_closed()

    run_on(loop, main())


def watch_book(url: str, until: Callable[[], bool], out: list[list[Any]]) -> None:
    with ws_connect(url) as ws:
        ws.send(json.dumps({"topic": "orderbook", "market_id": 396}))
        while True:
            try:
                raw = ws.recv(timeout=0.5)
            except TimeoutError:
                if until():
                    return
                continue
            out.append(json.loads(raw)["data"])  # every frame whole: it parses


def busy_book(running: Any, watchers: int, orders: int = 40) -> None:
    """``watchers`` subscribers of market 396's book while ``orders`` orders change it; each
    must end at the book REST shows."""
    rest = running.rest
    trader = "0x" + "ab" * 32
    rest.ok("/deposit", {"userAddress": trader, "amount": 10_000_000_000})
    done = threading.Event()
    books: list[list[list[Any]]] = [[] for _ in range(watchers)]
    threads = [
        threading.Thread(target=watch_book, args=(running.ws_url, done.is_set, out))
        for out in books
    ]
    for thread in threads:
        thread.start()
    while running.call(lambda: running.server.venue.hub.subscription_count) < len(books):
        time.sleep(0.01)
    for i in range(orders):
        rest.ok(
            "/placeLimitOrder",
            limit_order(trader, long=i % 2 == 0, size=500, price=5900 + 5 * i, leverage=2),
        )
    final = rest.get("/getOrderBook?marketId=396")[1]["data"]
    done.set()
    for thread in threads:
        thread.join(20)
    assert all(out and out[-1] == final for out in books), "a subscriber ended stale"


@pytest.mark.parametrize(
    ("batch_write", "share", "io_uring"),
    [(True, 0.0, True), (True, 0.0, False), (False, 0.0, True), (True, 0.2, True)],
)
def test_a_server_fans_a_busy_book_out_with_and_without_batches(
    tmp_path: Path, batch_write: bool, share: float, io_uring: bool
) -> None:
    # Slices of 5 (not sized in time) for 12 watchers, more than a small stream: every round
    # has turns of the loop between its slices (with a share above 0, more than one while
    # orders come).
    running, stop = start_threaded(
        tmp_path,
        batch_write=batch_write,
        fanout_share=share,
        fanout_slice=5,
        fanout_slice_ms=0,
        io_uring=io_uring,
    )
    if batch_write:
        mode = running.call(lambda: running.server.batch_writer.mode)
        if io_uring:
            assert mode == "io_uring" or any(r in mode for r in REFUSED_BY_KERNEL), mode
        else:
            assert mode == "send"
        assert metrics_value(running, "fanout_io_uring") == (mode == "io_uring")
    try:
        busy_book(running, 12)
        assert (metrics_value(running, "fanout_batches_total") > 0) is batch_write
        assert metrics_value(running, "fanout_slice_pushes") == 5
    finally:
        stop()


def test_slices_sized_in_time_grow_past_their_least_and_deliver_every_book(
    tmp_path: Path,
) -> None:
    # 20 watchers, slices of at least 16 that should last 50 ms: a push costs far less than
    # 50 / 16 ms, so once a slice is measured the next ones take every watcher at once.
    running, stop = start_threaded(tmp_path, fanout_slice=16, fanout_slice_ms=50)
    try:
        assert metrics_value(running, "fanout_slice_pushes") == 16  # nothing measured yet
        busy_book(running, 20)
        assert metrics_value(running, "fanout_slice_pushes") > 16
        # And the fan-out uses that size: one change now reaches 20 idle watchers in one
        # slice, one batch write, where slices of 16 would take two.
        batches = metrics_value(running, "fanout_batches_total")
        busy_book(running, 20, orders=1)
        assert metrics_value(running, "fanout_batches_total") == batches + 1
    finally:
        stop()
