"""The fan-out's batch writer: one frame to many connections in one call into C.

A round of a busy stream's fan-out is one ``send`` per subscriber. Made from Python, each
through its transport's ``write``, the interpreter adds about a microsecond to every one;
:func:`~perps_indexer.server._sendeach.send_each` (``_sendeach.c``, built when the package is
installed) makes them all from one C loop. Measured in BENCHMARKS.md ("batch writes").

On Linux it goes further where the kernel allows: the batch's sends go through one io_uring
submission (one system call for the batch instead of one per socket; the kernel's work for
each socket is the same). On a virtual machine a system call's entry and exit can cost more
than a small send (BENCHMARKS.md, "io_uring"). Where io_uring is missing or refused (a kernel
before 5.7, ``kernel.io_uring_disabled``, a container's seccomp filter) the C loop of
``send`` calls is used; :attr:`BatchWriter.mode` says which, and the server logs it.

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
    from perps_indexer.server._sendeach import mode, send_each, set_io_uring
except ImportError:  # pragma: no cover - built without a C compiler
    send_each = None  # type: ignore[assignment]
    set_io_uring = None  # type: ignore[assignment]
    mode = None  # type: ignore[assignment]

AVAILABLE = send_each is not None


class BatchWriter:
    """Writes one frame to many connections' sockets in one call."""

    __slots__ = ("batches", "short_writes")

    def __init__(self, io_uring: bool = True) -> None:
        """``io_uring``: whether the sends go through io_uring where the kernel allows. The
        setting is the process's: the last writer made decides."""
        assert set_io_uring is not None, "the C extension is not built"
        set_io_uring(io_uring)
        self.batches = 0
        """Calls, each one frame to one batch of connections."""
        self.short_writes = 0
        """Sockets that did not take a whole frame at once (the transport took the rest)."""

    @property
    def mode(self) -> str:
        """How the sends are made now: ``io_uring``, or ``send`` (with why not io_uring, when
        it was wanted: refused at set-up, or failed since)."""
        assert mode is not None
        return mode()

    @staticmethod
    def socket_of(transport: Any) -> int:
        """``transport``'s socket, for :meth:`__call__`; -1 (written through the transport)
        unless it is a plain TCP transport: bytes written to a TLS connection's socket would
        skip the TLS."""
        if not AVAILABLE:
            return -1
        get = getattr(transport, "get_extra_info", None)
        if get is None or get("sslcontext") is not None or get("ssl_object") is not None:
            return -1
        sock = get("socket")
        try:
            fd = sock.fileno() if sock is not None else -1
        except (OSError, ValueError):
            return -1
        return fd if isinstance(fd, int) and fd >= 0 else -1

    def __call__(self, fds: list[int], sinks: list[Sink], frame: bytes) -> None:
        """Write ``frame`` to each of ``sinks`` through its socket in ``fds`` (from
        :meth:`socket_of`; -1: through the sink). The sinks must hold nothing unsent, and
        must not be closing: a closed transport's socket number may be another's by now."""
        assert send_each is not None
        self.batches += 1
        short = send_each(fds, frame)
        for index, taken in short:
            # The rest, or on an error the whole frame: the transport retries the send and
            # handles a broken connection as it does for its own writes. A sink without a
            # socket (fd -1: nothing was sent) is written whole, and is no short write.
            sinks[index].write(frame[taken:] if taken > 0 else frame)
            if fds[index] >= 0:
                self.short_writes += 1
