"""The pre-built text frames of the fan-out fast path (RFC 6455 §5.2)."""

from __future__ import annotations

import pytest
from websockets.frames import Frame, Opcode

from perps_indexer.server.app import text_frame, text_frame_header


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536, 200_000])
def test_text_frame_parses_back_with_an_independent_parser(size: int) -> None:
    payload = bytes(ord("a") + i % 26 for i in range(size))
    data = text_frame(payload)

    def read_exact(n: int):  # type: ignore[no-untyped-def]
        nonlocal data
        chunk, data = data[:n], data[n:]
        yield
        return chunk

    parser = Frame.parse(read_exact, mask=False)
    try:
        while True:
            next(parser)
    except StopIteration as done:
        frame = done.value
    assert frame.opcode is Opcode.TEXT and frame.fin
    assert frame.data == payload
    assert data == b""


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536, 200_000])
def test_text_frame_header_is_what_text_frame_puts_before_the_payload(size: int) -> None:
    payload = b"x" * size
    assert text_frame_header(size) + payload == text_frame(payload)
    assert len(text_frame_header(size)) == (2 if size < 126 else 4 if size < 65536 else 10)
