"""The event store interface: an append-only, gap-free log of events plus small side tables.

The log is the source of truth; everything else (read models, engine state) is a fold over it.
A store keeps, besides the events, an index from *keys* to the events that touch them (see
:func:`event_keys`), the latest snapshot of serialised state per name, and a few settings.
"""

from __future__ import annotations

import abc
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from types import TracebackType
from typing import Any, Final, Self, get_args

import lz4.block
import msgspec

from perps_indexer import errors
from perps_indexer.events import (
    AnyEvent,
    Deposited,
    Fill,
    FundingSettled,
    IndexPriceSet,
    LiquidationSettled,
    MarkPriceSet,
    OrderCancelled,
    OrderPlaced,
    OrderRested,
    PositionReleased,
    PositionUpdated,
    Withdrew,
    from_json,
    to_json_into,
)

MARKET_KEY_PREFIX: Final = "market:"

BODY_FORMAT: Final = "json+lz4"
"""How a segment's body is stored: its events' :func:`perps_indexer.events.to_json` (the
canonical form) one after the other, compressed as one LZ4 block.

Not msgpack: order and trade ids are 128-bit (counter << 64 | price) and msgpack integers stop
at 64 bits, so msgpack cannot encode most events. LZ4 because an event carries the post-state
of every order and position it changes, about 1 KiB of JSON whose field names and addresses
repeat: a segment compresses 4-7 times, and the bytes not written to the WAL, then copied by
the checkpoints, cost more than LZ4 does (about 0.7 µs an event to compress, 0.3 to expand;
BENCHMARKS.md, "Compressed segments")."""

LZ4_MAX_RATIO: Final = 255
"""At most how many times its own length an LZ4 block expands to (a run of one byte: each
further 255 bytes of it cost one byte of the block)."""

PLAIN_BODY_FORMAT: Final = "json"
"""The body format before :data:`BODY_FORMAT`: the same JSON, uncompressed. A store of it is
converted when opened."""

SEGMENT_EVENTS: Final = 128
"""The most events one segment (one stored row) holds. A batch is stored as one segment per
this many events: one row per event cost more than encoding the event, and one row per batch
would make a random read (a key's history) fetch up to a whole batch's bytes."""


class _MarketKeys(dict[int, str]):
    """market_id -> ``"market:<id>"``, each made once. The key functions below index it
    directly (``_MARKET_KEYS[id]``, no Python call once made): they run for every event."""

    def __missing__(self, market_id: int) -> str:
        key = self[market_id] = f"{MARKET_KEY_PREFIX}{market_id}"
        return key


_MARKET_KEYS: Final = _MarketKeys()


def market_key(market_id: int) -> str:
    """The index key of a market: ``"market:<id>"``."""
    return _MARKET_KEYS[market_id]


def _funding_keys(event: FundingSettled) -> tuple[str, ...]:
    addresses = dict.fromkeys(p.position.address for p in event.payments)
    return (*addresses, _MARKET_KEYS[event.market_id])


def _fill_keys(event: Fill) -> tuple[str, ...]:
    taker, maker = event.taker.order.address, event.maker.order.address
    market = _MARKET_KEYS[event.market_id]
    # A self-trade never fills (it cancels the resting order), but the index must not hold a
    # key twice for one event, so do not rely on that here.
    return (taker, market) if taker == maker else (taker, maker, market)


def _order_keys(event: OrderPlaced | OrderRested | OrderCancelled) -> tuple[str, ...]:
    return (event.order.address, _MARKET_KEYS[event.order.market_id])


def _address_keys(event: Deposited | Withdrew) -> tuple[str, ...]:
    return (event.address,)


def _market_only_keys(event: MarkPriceSet | IndexPriceSet) -> tuple[str, ...]:
    return (_MARKET_KEYS[event.market_id],)


def _slot_keys(event: PositionReleased | LiquidationSettled) -> tuple[str, ...]:
    return (event.address, _MARKET_KEYS[event.market_id])


def _position_keys(event: PositionUpdated) -> tuple[str, ...]:
    return (event.position.address, _MARKET_KEYS[event.position.market_id])


# A lookup by class rather than a ``match``: this runs for every appended event, and the match
# statement's isinstance chain cost twice as much.
_KEYS_OF: Final[dict[type, Callable[[Any], tuple[str, ...]]]] = {
    Deposited: _address_keys,
    Withdrew: _address_keys,
    MarkPriceSet: _market_only_keys,
    IndexPriceSet: _market_only_keys,
    FundingSettled: _funding_keys,
    OrderPlaced: _order_keys,
    OrderRested: _order_keys,
    OrderCancelled: _order_keys,
    Fill: _fill_keys,
    PositionUpdated: _position_keys,
    PositionReleased: _slot_keys,
    LiquidationSettled: _slot_keys,
}
assert set(_KEYS_OF) == set(get_args(AnyEvent)), "every event type needs its keys"


def event_keys(event: AnyEvent) -> tuple[str, ...]:
    """The keys an event is indexed under: the (normalised) addresses it touches and its market.

    Events carry addresses already normalised by the engine, so they are used as they are.
    """
    return _KEYS_OF[type(event)](event)


def check_contiguous(events: Sequence[AnyEvent], expected: int) -> None:
    """Raise :class:`~perps_indexer.errors.SequenceGap` unless the seqs run ``expected, +1, …``."""
    for offset, event in enumerate(events):
        if event.seq != expected + offset:
            raise errors.SequenceGap(expected + offset, event.seq)


def check_bounds(after: int, limit: int | None) -> None:
    """Reject the arguments every backend would misread: a negative ``after`` or ``limit``."""
    if after < 0:
        raise ValueError(f"after must be >= 0, got {after}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")


# ---------------------------------------------------------------------- segments
#
# A segment is up to SEGMENT_EVENTS consecutive events in one row: ``(first_seq, last_seq,
# ends, body)``. ``body`` is the events' canonical JSON bodies one after the other, as one LZ4
# block (BODY_FORMAT), and ``ends`` the end offset of each body in the expanded block
# (little-endian uint32), so one event is decoded without decoding its neighbours. The key
# index has one row per key and segment: ``(key, last, first, offsets)``, ``last`` the newest
# seq of the key in the segment, ``first`` the segment's first_seq and ``offsets`` the
# positions (little-endian uint16) of the key's events in it.

SegmentRow = tuple[int, int, bytes, bytes]
"""``(first_seq, last_seq, ends, body)``: one stored segment."""

KeyRow = tuple[str, int, int, bytes]
"""``(key, last seq of the key in the segment, the segment's first_seq, offsets)``."""


def _unpack(code: str, width: int, data: bytes) -> tuple[int, ...]:
    """Little-endian unsigned integers of ``width`` bytes (``code``: their struct code)."""
    if len(data) % width:
        raise errors.IntegrityError(f"a stored offsets column of {len(data)} bytes is damaged")
    return struct.unpack(f"<{len(data) // width}{code}", data)


def encode_segments(
    events: Sequence[AnyEvent], size: int = SEGMENT_EVENTS
) -> tuple[list[SegmentRow], list[KeyRow]]:
    """The segment rows and key rows of a contiguous batch (see the comment above)."""
    segments: list[SegmentRow] = []
    key_rows: list[KeyRow] = []
    encode_into = to_json_into
    pack = struct.pack
    for start in range(0, len(events), size):
        chunk = events[start : start + size]
        body = bytearray()
        ends: list[int] = []
        for event in chunk:
            encode_into(event, body)
            ends.append(len(body))
        first = chunk[0].seq
        ends_data = pack(f"<{len(ends)}I", *ends)
        segments.append((first, chunk[-1].seq, ends_data, compress_body(body)))
        key_rows += segment_key_rows(first, chunk)
    return segments, key_rows


def segment_key_rows(first: int, events: Iterable[AnyEvent]) -> list[KeyRow]:
    """The key rows of the segment that starts at seq ``first`` and holds ``events``."""
    touched: dict[str, list[int]] = {}
    keys_of = _KEYS_OF
    for offset, event in enumerate(events):
        for key in keys_of[type(event)](event):
            offsets = touched.get(key)
            if offsets is None:
                touched[key] = [offset]
            else:
                offsets.append(offset)
    pack = struct.pack
    return [
        (key, first + offsets[-1], first, pack(f"<{len(offsets)}H", *offsets))
        for key, offsets in touched.items()
    ]


def decode_event(seq: int, body: bytes | memoryview) -> AnyEvent:
    """Decode a stored body, checking it is event ``seq``."""
    try:
        event = from_json(body)
    except msgspec.DecodeError as exc:
        raise errors.IntegrityError(f"stored event {seq} cannot be decoded: {exc}") from exc
    if event.seq != seq:
        raise errors.IntegrityError(f"the row of event {seq} holds event {event.seq}")
    return event


def segment_ends(first: int, last: int, ends_data: bytes) -> tuple[int, ...]:
    """The end offsets of a stored segment, checked: one per event. (Offsets that are wrong
    otherwise cut bodies that do not decode as their events: :func:`decode_event` says so.)"""
    ends = _unpack("I", 4, ends_data)
    if len(ends) != last - first + 1:
        raise errors.IntegrityError(f"the segment of events {first}..{last} is damaged")
    return ends


def compress_body(plain: bytes | bytearray) -> bytes:
    """A segment's events' JSON as it is stored (:data:`BODY_FORMAT`): one LZ4 block, its size
    left to the segment's ``ends`` (see :func:`expand_body`)."""
    block: bytes = lz4.block.compress(plain, store_size=False)
    return block


def expand_body(first: int, last: int, ends: Sequence[int], body: bytes) -> bytes:
    """A stored segment body, expanded (``ends`` from :func:`segment_ends`): exactly its
    events' JSON, or :class:`~perps_indexer.errors.IntegrityError`."""
    size = ends[-1] if ends else 0
    if size > LZ4_MAX_RATIO * len(body) + 16:
        # More than any LZ4 block of this length expands to: a damaged offset, which must not
        # make the reader allocate it (up to 4 GiB) before finding out.
        raise errors.IntegrityError(
            f"the segment of events {first}..{last} is damaged: {len(body)} stored bytes "
            f"cannot expand to {size}"
        )
    try:
        plain: bytes = lz4.block.decompress(body, uncompressed_size=size)
    except lz4.block.LZ4BlockError as exc:
        hint = ""
        if len(body) == size and body.startswith(b'{"type":'):
            # Plain JSON in a converted file: what a process of an older version appends when
            # it still had the file open at the conversion (it checks the format only once).
            hint = (
                f"; it holds {PLAIN_BODY_FORMAT!r}, not {BODY_FORMAT!r}: was it written by an "
                "older perps-indexer that still had this file open?"
            )
        raise errors.IntegrityError(
            f"the body of the segment of events {first}..{last} cannot be expanded: {exc}{hint}"
        ) from exc
    if len(plain) != size:  # the size given is a bound: a short body expands short
        raise errors.IntegrityError(
            f"the body of the segment of events {first}..{last} expands to {len(plain)} "
            f"bytes, not {size}"
        )
    return plain


def decode_segment(
    first: int, last: int, ends_data: bytes, body: bytes, offsets: Iterable[int] | None = None
) -> Iterator[AnyEvent]:
    """The events of a stored segment (those at ``offsets`` only, when given), checked."""
    ends = segment_ends(first, last, ends_data)
    plain = expand_body(first, last, ends, body)
    return decode_part(first, ends, plain, range(len(ends)) if offsets is None else offsets)


def decode_part(
    first: int, ends: Sequence[int], plain: bytes, offsets: Iterable[int]
) -> Iterator[AnyEvent]:
    """The events at ``offsets`` of a segment whose expanded body is ``plain``."""
    view = memoryview(plain)
    for offset in offsets:
        start = ends[offset - 1] if offset else 0
        yield decode_event(first + offset, view[start : ends[offset]])


def key_offsets(data: bytes) -> tuple[int, ...]:
    """The offsets column of a key row."""
    return _unpack("H", 2, data)


class EventStore(abc.ABC):
    """An append-only event log with a key index, snapshots and settings.

    A store is used from one thread at a time. Every write is one transaction: it happens
    completely or not at all. Usable as a context manager, which closes it.
    """

    @abc.abstractmethod
    def append(self, events: Sequence[AnyEvent]) -> None:
        """Durably append ``events`` in one transaction.

        The first seq must be ``last_seq() + 1`` and the seqs contiguous; otherwise raise
        :class:`~perps_indexer.errors.SequenceGap` and write nothing. An empty batch is a no-op.
        """

    @abc.abstractmethod
    def last_seq(self) -> int:
        """The seq of the newest event, 0 when the log is empty."""

    @abc.abstractmethod
    def first_seq(self) -> int:
        """The seq of the oldest event, 0 when the log is empty."""

    @abc.abstractmethod
    def read(self, after: int = 0, limit: int | None = None) -> Iterator[AnyEvent]:
        """The events with ``seq > after`` in seq order, at most ``limit`` of them.

        Rows are fetched in chunks, so the whole log is never held in memory at once.
        """

    @abc.abstractmethod
    def read_for_key(
        self,
        key: str,
        *,
        after: int = 0,
        before: int | None = None,
        limit: int | None = None,
        newest_first: bool = False,
    ) -> list[AnyEvent]:
        """The events indexed under ``key`` (a normalised address or ``market:<id>``) with
        ``after < seq < before``, oldest first (or newest first), at most ``limit``."""

    @abc.abstractmethod
    def save_snapshot(self, seq: int, name: str, data: bytes) -> None:
        """Store ``data``, the state after event ``seq``, as the snapshot ``name``, replacing
        the previous one of that name. ``seq`` must not be beyond ``last_seq()``."""

    @abc.abstractmethod
    def load_snapshot(self, name: str) -> tuple[int, bytes] | None:
        """The latest snapshot ``name`` as ``(seq, data)``, or None if there is none."""

    @abc.abstractmethod
    def get_meta(self, key: str) -> str | None:
        """A setting's value, or None when it is not set."""

    @abc.abstractmethod
    def set_meta(self, key: str, value: str) -> None:
        """Set (or replace) a setting."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the connection; closing twice is harmless."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
