"""The fan-out's batch writer: one frame to many connections in one call into C.

A round of a busy stream's fan-out is one ``send`` per subscriber. Made from Python, each
through its transport's ``write``, the interpreter adds about a microsecond to every one;
:func:`~perps_indexer.server._sendeach.send_each` (``_sendeach.c``, built when the package is
installed) makes them all from one C loop. Measured in BENCHMARKS.md ("batch writes").

It writes only to sockets whose transport holds nothing unsent (:class:`~perps_indexer.session.Hub`
checks), so its bytes never overtake the transport's; what a socket does not take goes to the
transport, which buffers it, or reports the error and closes, as for any other write. Without
the extension (no C compiler at install time) :data:`AVAILABLE` is False and the hub writes one
connection at a time, with the same bytes.
"""

from __future__ import annotations

from typing import Any

from perps_indexer.session import Sink

try:
    from perps_indexer.server._sendeach import send_each
except ImportError:  # pragma: no cover - built without a C compiler
    send_each = None  # type: ignore[assignment]

AVAILABLE = send_each is not None


class BatchWriter:
    """Writes one frame to many sinks, through their sockets when it knows them."""

    __slots__ = ("_fds", "batches", "short_writes")

    def __init__(self) -> None:
        self._fds: dict[Sink, int] = {}
        self.batches = 0
        """Calls, each one frame to one batch of connections."""
        self.short_writes = 0
        """Sockets that did not take a whole frame at once (the transport took the rest)."""

    def add(self, transport: Any) -> bool:
        """Know ``transport``'s socket; False (written through the transport) unless it is a
        plain TCP transport: bytes written to a TLS connection's socket would skip the TLS."""
        if not AVAILABLE:
            return False
        get = getattr(transport, "get_extra_info", None)
        if get is None or get("sslcontext") is not None or get("ssl_object") is not None:
            return False
        sock = get("socket")
        try:
            fd = sock.fileno() if sock is not None else -1
        except (OSError, ValueError):
            return False
        if not isinstance(fd, int) or fd < 0:
            return False
        self._fds[transport] = fd
        return True

    def discard(self, transport: Any) -> None:
        self._fds.pop(transport, None)

    def __len__(self) -> int:
        return len(self._fds)

    def __call__(self, sinks: list[Sink], frame: bytes) -> None:
        """Write ``frame`` to each of ``sinks``, whose transports must hold nothing unsent."""
        assert send_each is not None
        self.batches += 1
        fds = self._fds
        short = send_each([fds.get(sink, -1) for sink in sinks], frame)
        for index, taken in short:
            # The rest, or on an error the whole frame: the transport retries the send and
            # handles a broken connection as it does for its own writes. A sink it does not
            # know (fd -1: nothing was sent) is written whole, and is no short write.
            sink = sinks[index]
            sink.write(frame[taken:] if taken > 0 else frame)
            if sink in fds:
                self.short_writes += 1
