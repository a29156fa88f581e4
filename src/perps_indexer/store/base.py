"""The event store interface: an append-only, gap-free log of events plus small side tables.

The log is the source of truth; everything else (read models, engine state) is a fold over it.
A store keeps, besides the events, an index from *keys* to the events that touch them (see
:func:`event_keys`), the latest snapshot of serialised state per name, and a few settings.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import Final, Self, assert_never, get_args

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
    to_json,
)

MARKET_KEY_PREFIX: Final = "market:"

BODY_FORMAT: Final = "json"
"""How event bodies are stored: :func:`perps_indexer.events.to_json`, the canonical form.

Not msgpack: order and trade ids are 128-bit (counter << 64 | price) and msgpack integers stop
at 64 bits, so ``events.to_msgpack`` cannot encode most events."""

EVENT_TYPES: Final[dict[type, str]] = {
    cls: str(cls.__struct_config__.tag) for cls in get_args(AnyEvent)
}
"""Each event class and its tag, the ``type`` a store records next to the body."""


def market_key(market_id: int) -> str:
    """The index key of a market: ``"market:<id>"``."""
    return f"{MARKET_KEY_PREFIX}{market_id}"


def event_keys(event: AnyEvent) -> tuple[str, ...]:
    """The keys an event is indexed under: the (normalised) addresses it touches and its market.

    Events carry addresses already normalised by the engine, so they are used as they are.
    """
    match event:
        case Deposited() | Withdrew():
            return (event.address,)
        case MarkPriceSet() | IndexPriceSet():
            return (market_key(event.market_id),)
        case FundingSettled():
            addresses = dict.fromkeys(p.position.address for p in event.payments)
            return (*addresses, market_key(event.market_id))
        case OrderPlaced() | OrderRested() | OrderCancelled():
            return (event.order.address, market_key(event.order.market_id))
        case Fill():
            taker, maker = event.taker.order.address, event.maker.order.address
            market = market_key(event.market_id)
            # A self-trade never fills (it cancels the resting order), but the index must not
            # hold a key twice for one event, so do not rely on that here.
            return (taker, market) if taker == maker else (taker, maker, market)
        case PositionUpdated():
            return (event.position.address, market_key(event.position.market_id))
        case PositionReleased() | LiquidationSettled():
            return (event.address, market_key(event.market_id))
        case _:
            assert_never(event)


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


EventRow = tuple[int, int, str, bytes]
"""``(seq, ts, type, body)``: one row of the events table."""


def encode_rows(events: Sequence[AnyEvent]) -> tuple[list[EventRow], list[tuple[str, int]]]:
    """The event rows (body in :data:`BODY_FORMAT`) and ``(key, seq)`` index rows of a batch."""
    rows: list[EventRow] = []
    keys: list[tuple[str, int]] = []
    for event in events:
        rows.append((event.seq, event.ts, EVENT_TYPES[type(event)], to_json(event)))
        keys.extend((key, event.seq) for key in event_keys(event))
    return rows, keys


def decode_row(seq: int, body: bytes) -> AnyEvent:
    """Decode a stored body, checking it is the event its row says it is."""
    try:
        event = from_json(body)
    except msgspec.DecodeError as exc:
        raise errors.IntegrityError(f"stored event {seq} cannot be decoded: {exc}") from exc
    if event.seq != seq:
        raise errors.IntegrityError(f"the row of event {seq} holds event {event.seq}")
    return event


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
