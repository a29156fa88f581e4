"""An in-memory transport for the hub's fast path, shared by the sans-I/O tests."""

from __future__ import annotations

import json
from typing import Any


class ByteSink:
    """An in-memory :class:`~perps_indexer.session.Sink`: it keeps what was written and
    reports as buffered whatever the test says the peer has not read yet."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.buffered = 0
        self.closing = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def is_closing(self) -> bool:
        return self.closing

    def seqs(self) -> list[int]:
        """The ``seq`` of each write, when each holds one :func:`framed` message."""
        return [json.loads(frame[4:])["seq"] for frame in self.written]


def framed(message: bytes) -> bytes:
    """A stand-in for a transport's framing: ``F``, a 3-byte length, the message."""
    return framed_header(len(message)) + message


def framed_header(n: int) -> bytes:
    """The header :func:`framed` puts before a message of ``n`` bytes."""
    return b"F" + n.to_bytes(3, "big")


def unframe(data: bytes) -> list[dict[str, Any]]:
    """The messages of one write holding any number of :func:`framed` ones."""
    out = []
    while data:
        size = int.from_bytes(data[1:4], "big")
        out.append(json.loads(data[4 : 4 + size]))
        data = data[4 + size :]
    return out
