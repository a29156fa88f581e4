"""bench/bare_fresh.py's feed, without sockets: the limit scenario 6 compares the server with
must coalesce as the server does, or its figures say nothing."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

import bare_fresh  # bench/, on pytest's pythonpath

TEMPLATE = b'{"data":[],"message":"orderbook","seq":0}'


class Transport:
    def __init__(self) -> None:
        self.seqs: list[int] = []

    def write(self, frame: bytes) -> None:
        self.seqs.append(int(frame[frame.rfind(b":") + 1 : -1]))

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return False


class Subscriber:
    def __init__(self) -> None:
        self.transport = Transport()
        self.fd = -1  # no socket: written through the transport

    def subscribe(self, feed: Any) -> None:
        self.transport.write(feed.frame)  # the current state, as the real subscribe answers
        feed.join(self)


OPS = st.lists(
    st.tuples(st.sampled_from(["join", "leave", "change", "slice"]), st.integers(0, 7)),
    max_size=80,
)


@settings(max_examples=300)
@given(ops=OPS, size=st.integers(1, 4))
def test_every_subscriber_gets_each_state_at_most_once_and_ends_on_the_newest(
    ops: list[tuple[str, int]], size: int
) -> None:
    feed = bare_fresh.Feed(TEMPLATE, size)
    inside: list[Subscriber] = []
    for op, arg in ops:
        if op == "join":
            subscriber = Subscriber()
            subscriber.subscribe(feed)
            inside.append(subscriber)
        elif op == "leave" and inside:
            feed.leave(inside.pop(arg % len(inside)))
        elif op == "change":
            feed.change()
        elif op == "slice" and feed.remaining > 0:
            feed.one_slice()
        assert 0 <= feed.remaining <= len(feed.peers)
        assert feed.cursor < len(feed.peers) or feed.cursor == 0
    while feed.remaining > 0:
        feed.one_slice()
    for subscriber in inside:
        seqs = subscriber.transport.seqs
        assert seqs == sorted(set(seqs)), "a state twice, or out of order"
        assert seqs[-1] == feed.seq, "a subscriber ended stale"


def test_a_newcomer_mid_round_does_not_take_the_turn_of_one_still_owed() -> None:
    feed = bare_fresh.Feed(TEMPLATE, 1)
    a, b, c = (Subscriber() for _ in range(3))
    for subscriber in (a, b, c):
        subscriber.subscribe(feed)
    feed.change()
    feed.one_slice()  # a has seq 1
    feed.change()  # the cycle goes on from b: b, c, then a are owed seq 2
    feed.one_slice()  # b
    late = Subscriber()
    late.subscribe(feed)  # seq 2 with its subscription
    while feed.remaining > 0:
        feed.one_slice()
    assert [s.transport.seqs for s in (a, b, c, late)] == [[0, 1, 2], [0, 2], [0, 2], [2]]


def test_client_frames_split_anywhere_are_read_whole() -> None:
    feed = bare_fresh.Feed(TEMPLATE, 100)
    peer = bare_fresh.Peer(feed)
    written: list[bytes] = []

    class Sink:
        def write(self, data: bytes) -> None:
            written.append(data)

        def get_extra_info(self, name: str) -> None:
            return None

    peer.connection_made(Sink())
    peer.data_received(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in written[0]  # RFC 6455 §1.3
    masked = bytes(b ^ m for b, m in zip(b"hi", b"\x01\x02", strict=True))
    ping = b"\x89\x82\x01\x02\x03\x04" + masked
    empty_ping = b"\x89\x80\x01\x02\x03\x04"
    text = b"\x81\x82\x00\x00\x00\x00{}"
    stream = ping + empty_ping + text
    for cut in range(1, len(stream)):
        del written[1:]
        peer.data_received(stream[:cut])
        peer.data_received(stream[cut:])
        assert written[1:] == [b"\x8a\x02hi", b"\x8a\x00", feed.frame], cut
    assert feed.peers == [peer]  # joined once, however often it subscribed
