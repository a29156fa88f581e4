"""The pre-built text frames of the fan-out fast path (RFC 6455 §5.2)."""

from __future__ import annotations

import pytest
from websockets.frames import Frame, Opcode

from perps_indexer.server.app import text_frame, text_frame_header


def parse_one(data: bytes) -> tuple[Frame, bytes]:
    """The first frame in ``data`` by websockets' parser, and what follows it."""

    def read_exact(n: int):  # type: ignore[no-untyped-def]
        nonlocal data
        chunk, data = data[:n], data[n:]
        assert len(chunk) == n, "the frame claims more bytes than it holds"
        yield
        return chunk

    parser = Frame.parse(read_exact, mask=False)
    try:
        while True:
            next(parser)
    except StopIteration as done:
        return done.value, data


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536, 200_000])
def test_frames_parse_back_with_an_independent_parser(size: int) -> None:
    # The hub frames with the header alone (its held writes keep header and message apart);
    # text_frame is the whole frame for the bare loops. Each is checked on its own.
    payload = bytes(ord("a") + i % 26 for i in range(size))
    for data in (text_frame_header(size) + payload, text_frame(payload)):
        frame, rest = parse_one(data)
        assert frame.opcode is Opcode.TEXT and frame.fin
        assert frame.data == payload
        assert rest == b""
