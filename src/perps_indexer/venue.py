"""The venue service: engine, event store, projections and subscribers, kept in step.

Every accepted command flows one way: the engine decides and produces events, the store commits
them durably, the projections fold them, and the hub pushes each changed stream's new state to
its subscribers. Only then is the command acknowledged. On start the service folds the stored
log (from the newest snapshot) so a restart, even after ``kill -9``, comes back where it stopped.

If the store cannot commit, the engine is ahead of the durable log: the service stops taking
commands (fail-stop) and the operator restarts it, which rebuilds state from the store.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping

from perps_indexer import commands
from perps_indexer.engine import Engine
from perps_indexer.errors import PerpsIndexerError
from perps_indexer.events import (
    AnyEvent,
    Fill,
    OrderCancelled,
    OrderPlaced,
    OrderRested,
    OrderState,
)
from perps_indexer.markets import MarketSpec
from perps_indexer.projections import Projections
from perps_indexer.session import Hub, Key, RequestError
from perps_indexer.store.base import EventStore
from perps_indexer.wire import (
    ORDER_HISTORY,
    OrderHistoryRow,
    TradeRow,
    encode_message,
    order_history_row,
    trade_row,
)

log = logging.getLogger(__name__)

REPLAY_BATCH = 10_000
HISTORY_PAGE = 2_000
MAX_RESUME_ROWS = 10_000
"""Rows one resume message may hold; a client further behind fetches history over REST."""


class VenueHalted(PerpsIndexerError):
    """The venue stopped taking commands because its store failed; restart it."""

    code = "venue_halted"


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class Venue:
    """Engine + store + projections + hub behind one ``execute``."""

    def __init__(
        self,
        markets: Mapping[int, MarketSpec],
        store: EventStore,
        *,
        history_limit: int = 100,
        clock: Callable[[], int] = wall_clock_ms,
        hub: Hub | None = None,
        max_resume_rows: int = MAX_RESUME_ROWS,
    ) -> None:
        self.markets = dict(markets)
        self.max_resume_rows = max_resume_rows
        """Rows one ``since`` answer may hold; further behind is answered ``since_too_old``."""
        self.store = store
        self.clock = clock
        self.hub = hub if hub is not None else Hub()
        self.engine = Engine(self.markets)
        self.projections = Projections(self.markets, history_limit=history_limit)
        self.halted: str | None = None
        self.events_applied = 0
        self.commands_accepted = 0
        self.commands_rejected = 0
        self.last_event_ms = 0
        self._replay()

    def _replay(self) -> None:
        last = self.store.last_seq()
        if not last:
            return
        log.info("replaying %d stored events", last)
        started = time.monotonic()
        batch: list[AnyEvent] = []
        for event in self.store.read():
            self.engine.apply(event)
            batch.append(event)
            if len(batch) >= REPLAY_BATCH:
                self.projections.apply_batch(batch)
                batch.clear()
                log.info("replayed %d of %d events", self.engine.seq, last)
        if batch:
            self.projections.apply_batch(batch)
        self.events_applied = self.engine.seq
        self.last_event_ms = self.engine.ts
        log.info("state rebuilt at seq %d in %.2f s", self.engine.seq, time.monotonic() - started)

    def execute(self, command: commands.AnyCommand) -> commands.Outcome:
        """Run a command and make its effects durable and visible; raises ``CommandRejected``
        (nothing changed) or :class:`VenueHalted`."""
        if self.halted is not None:
            raise VenueHalted(f"the venue is halted: {self.halted}")
        ts = max(self.clock(), self.engine.ts)  # timestamps never go backwards in the log
        try:
            outcome = commands.execute(self.engine, command, ts)
        except PerpsIndexerError:
            self.commands_rejected += 1
            raise
        self.commands_accepted += 1
        self.record(outcome.events)
        return outcome

    def record(self, events: list[AnyEvent]) -> None:
        """Commit, fold and publish events the engine has already applied."""
        if not events:
            return
        try:
            self.store.append(events)
        except Exception as exc:
            self.halted = f"the event store failed at seq {events[0].seq}: {exc}"
            log.critical("%s; refusing further commands", self.halted)
            raise VenueHalted(self.halted) from exc
        changed = self.projections.apply_batch(events)
        self.events_applied += len(events)
        self.last_event_ms = events[-1].ts
        hub = self.hub
        for stream in changed:
            if hub.watched(stream):
                hub.publish(stream, self.projections.message(*stream))

    # -- what sessions read (the MessageSource protocol)

    def message(self, topic: str, key: Key) -> bytes:
        """A stream's current state as one encoded data message."""
        return self.projections.message(topic, key)

    def resume(self, topic: str, key: Key, since: int) -> bytes:
        """The rows of a history stream that changed after ``since``, newest first."""
        newest = self.projections.seq
        if since > newest:
            # Not a seq this server ever sent (its log was replaced): no delta can be right.
            raise RequestError(
                "invalid_since",
                f"since {since} is ahead of the newest event (seq {newest}); "
                "subscribe without since for the newest rows",
            )
        oldest = self.store.first_seq()
        if oldest and since < oldest - 1:
            raise RequestError(
                "since_too_old",
                f"since {since} is older than the oldest event kept (seq {oldest}); "
                "subscribe without since for the newest rows",
            )
        assert isinstance(key, str)
        # Newest first, so the work is bounded by max_resume_rows, not by how old since is.
        rows: list[OrderHistoryRow | TradeRow] = []
        seen: set[int] = set()
        for event in self._newest_first(key, after=since):
            if topic == ORDER_HISTORY:
                for order in _orders_in(event, key):
                    if order.order_id not in seen:  # its newest change only
                        seen.add(order.order_id)
                        rows.append(order_history_row(order))
            elif isinstance(event, Fill):
                rows.extend(_trade_rows(event, key))
            if len(rows) > self.max_resume_rows:
                raise RequestError(
                    "since_too_old",
                    f"more than {self.max_resume_rows} rows (max_resume_rows) changed after "
                    f"since {since}; the oldest since answered is {event.seq} (or fetch "
                    "getOrderHistory / getTradeHistory with a limit and subscribe without since)",
                )
        seq = max(since, self.projections.changed_at(topic, key))
        return encode_message(topic, rows, seq)

    # -- histories deeper than the in-memory window come from the store

    def order_history(self, address: str, limit: int | None = None) -> list[OrderHistoryRow]:
        """The address's newest ``limit`` orders, newest change first (any depth)."""
        limit = limit or self.projections.history_limit
        if limit <= self.projections.history_limit:
            return self.projections.order_history(address, limit)
        rows: dict[int, OrderHistoryRow] = {}
        for event in self._newest_first(address):
            for order in _orders_in(event, address):
                if order.order_id not in rows:
                    rows[order.order_id] = order_history_row(order)
            if len(rows) >= limit:
                break
        return list(rows.values())[:limit]

    def trade_history(self, address: str, limit: int | None = None) -> list[TradeRow]:
        """The address's newest ``limit`` fills, newest first (any depth)."""
        limit = limit or self.projections.history_limit
        if limit <= self.projections.history_limit:
            return self.projections.trade_history(address, limit)
        rows: list[TradeRow] = []
        for event in self._newest_first(address):
            if isinstance(event, Fill):
                rows.extend(_trade_rows(event, address))
            if len(rows) >= limit:
                break
        return rows[:limit]

    def _newest_first(self, address: str, after: int = 0) -> Iterator[AnyEvent]:
        before: int | None = None
        while True:
            page = self.store.read_for_key(
                address, after=after, before=before, limit=HISTORY_PAGE, newest_first=True
            )
            yield from page
            if len(page) < HISTORY_PAGE:
                return
            before = page[-1].seq


def _trade_rows(event: Fill, address: str) -> list[TradeRow]:
    """The rows of ``address`` in a fill (taker's first), as trade_history shows them."""
    return [
        trade_row(side, event)
        for side in (event.taker, event.maker)
        if side.order.address == address
    ]


def _orders_in(event: AnyEvent, address: str) -> Iterator[OrderState]:
    """The order states of ``address`` that an event carries."""
    if isinstance(event, OrderPlaced | OrderRested | OrderCancelled):
        if event.order.address == address:
            yield event.order
    elif isinstance(event, Fill):
        for side in (event.taker, event.maker):
            if side.order.address == address:
                yield side.order
