"""The venue service: engine, event store, projections and subscribers, kept in step.

Every accepted command flows one way: the engine decides and produces events, the store commits
them durably, the projections fold them, and the hub pushes each changed stream's new state (and
each new row of the live streams, in order) to its subscribers. Only then is the command
acknowledged. Commands submitted in one turn of the event loop share one commit and one push per
changed stream (group commit), which keeps a burst of orders cheap for many subscribers. On start
the engine folds the stored log and the read models start from their newest snapshot (saved
periodically and at a clean stop) and fold only the events after it, so a restart, even after
``kill -9``, comes back where it stopped.

If the store cannot commit, the engine is ahead of the durable log: the service stops taking
commands (fail-stop) and the operator restarts it, which rebuilds state from the store.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TypeVar

from perps_indexer import commands
from perps_indexer.engine import Engine
from perps_indexer.errors import IntegrityError, PerpsIndexerError
from perps_indexer.events import (
    AnyEvent,
    Deposited,
    Fill,
    FundingSettled,
    OrderCancelled,
    OrderPlaced,
    OrderRested,
    OrderState,
    Withdrew,
)
from perps_indexer.markets import MarketSpec
from perps_indexer.projections import Projections
from perps_indexer.session import Hub, Key, RequestError
from perps_indexer.store.base import EventStore, market_key
from perps_indexer.wire import (
    DEPOSIT_WITHDRAW_HISTORY,
    LIVE_ORDER_HISTORY,
    ORDER_HISTORY,
    DepositWithdrawRow,
    FundingHistoryRow,
    OrderHistoryRow,
    RecentTradeRow,
    Row,
    TradeRow,
    deposit_withdraw_row,
    encode_message,
    funding_history_row,
    order_history_row,
    recent_trade_row,
    trade_row,
)

_R = TypeVar("_R")

log = logging.getLogger(__name__)

REPLAY_BATCH = 10_000
HISTORY_PAGE = 2_000
SNAPSHOT_NAME = "projections"
MAX_RESUME_ROWS = 10_000
"""Rows one resume message may hold; a client further behind fetches history over REST."""
COMMIT_BATCH = 8
"""Submitted commands committed together at most (see :meth:`Venue.submit`)."""


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
        commit_batch: int = COMMIT_BATCH,
    ) -> None:
        if commit_batch < 0:
            raise ValueError(f"commit_batch must be 0 (no limit) or positive, got {commit_batch}")
        self.markets = dict(markets)
        self.max_resume_rows = max_resume_rows
        """Rows one ``since`` answer may hold; further behind is answered ``since_too_old``."""
        self.commit_batch = commit_batch
        """Submitted commands committed, folded and published together at most (0: all of one
        event-loop turn)."""
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
        self.commits = 0
        self.snapshot_seq = 0
        self._pending: list[AnyEvent] = []
        self._waiters: list[tuple[asyncio.Future[commands.Outcome], commands.Outcome]] = []
        self._flush_scheduled = False
        self._replay()

    def _replay(self) -> None:
        last = self.store.last_seq()
        if not last:
            return
        self._restore_projections()
        log.info(
            "replaying %d stored events (read models from a snapshot at seq %d)",
            last,
            self.projections.seq,
        )
        started = time.monotonic()
        batch: list[AnyEvent] = []
        folded = self.projections.seq
        for event in self.store.read():
            self.engine.apply(event)
            if event.seq <= folded:
                continue  # already in the restored read models
            batch.append(event)
            if len(batch) >= REPLAY_BATCH:
                self.projections.fold(batch)
                batch.clear()
                log.info("replayed %d of %d events", self.engine.seq, last)
        if batch:
            self.projections.fold(batch)
        self.events_applied = self.engine.seq
        self.last_event_ms = self.engine.ts
        log.info("state rebuilt at seq %d in %.2f s", self.engine.seq, time.monotonic() - started)

    def _restore_projections(self) -> None:
        """Start the read models from their newest snapshot when it fits this configuration;
        otherwise (none, corrupt, other markets or history limit) they are folded from seq 1."""
        saved = self.store.load_snapshot(SNAPSHOT_NAME)
        if saved is None:
            return
        seq, data = saved
        try:
            restored = Projections.restore(self.markets, data)
        except IntegrityError as exc:
            log.warning("ignoring the read-model snapshot at seq %d: %s", seq, exc)
            return
        if restored.history_limit != self.projections.history_limit or restored.seq != seq:
            log.info("the read-model snapshot does not fit this configuration; rebuilding")
            return
        self.projections = restored

    def save_snapshot(self) -> int:
        """Persist the read models at their current seq (after committing what is pending), so
        that the next start folds only the events after it; returns that seq."""
        self.flush()
        seq = self.projections.seq
        if seq:
            self.store.save_snapshot(seq, SNAPSHOT_NAME, self.projections.snapshot())
            self.snapshot_seq = seq
        return seq

    def _run(self, command: commands.AnyCommand) -> commands.Outcome:
        if self.halted is not None:
            raise VenueHalted(f"the venue is halted: {self.halted}")
        ts = max(self.clock(), self.engine.ts)  # timestamps never go backwards in the log
        try:
            outcome = commands.execute(self.engine, command, ts)
        except PerpsIndexerError:
            self.commands_rejected += 1
            raise
        self.commands_accepted += 1
        self._pending.extend(outcome.events)
        return outcome

    def execute(self, command: commands.AnyCommand) -> commands.Outcome:
        """Run a command and make its effects durable and visible before returning; raises
        ``CommandRejected`` (nothing changed) or :class:`VenueHalted`."""
        outcome = self._run(command)
        self.flush()
        return outcome

    def submit(self, command: commands.AnyCommand) -> asyncio.Future[commands.Outcome]:
        """Run a command now and return a future that resolves once its effects are durable
        and published (group commit).

        The commands submitted in one turn of the event loop are committed in one store
        transaction, folded once and published once per changed stream, so a burst of orders
        costs one commit and one push per subscriber, not one per order; up to
        :attr:`commit_batch` of them: the rest go in the next turns, in order, so that the
        first commands of a large burst are not held until its last are folded and published
        (scenario 2 of BENCHMARKS.md: p99 about 35 -> 25 ms). A rejection raises here, at
        once, and changes nothing.
        """
        outcome = self._run(command)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[commands.Outcome] = loop.create_future()
        self._waiters.append((future, outcome))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush_turn)
        return future

    def flush_due(self) -> None:
        """Run the scheduled flush now, if one is scheduled (see :meth:`submit`).

        The fan-out calls this before each slice of pushes: what was submitted meanwhile is
        committed and published first, so the slice already carries it, instead of the flush
        waiting behind the slice for its turn of the loop."""
        if self._flush_scheduled:
            self._flush_turn()

    def _flush_turn(self) -> None:
        """The scheduled flush: up to :attr:`commit_batch` submissions, and another turn for
        the rest."""
        if not self._flush_scheduled:
            return  # flush_due() or flush() ran it already
        limit, waiters = self.commit_batch, self._waiters
        if not limit or len(waiters) <= limit:
            self.flush()
            return
        # Only submissions are pending (execute() flushes at once), in order: the first
        # ``count`` events are exactly the taken commands'.
        taken = waiters[:limit]
        count = sum(len(outcome.events) for _, outcome in taken)
        events = self._pending[:count]
        self._pending, self._waiters = self._pending[count:], waiters[limit:]
        asyncio.get_running_loop().call_soon(self._flush_turn)  # still scheduled: the rest
        self._commit(events, taken)

    def flush(self) -> None:
        """Commit, fold and publish everything the engine produced since the last flush, then
        resolve the waiting submissions."""
        self._flush_scheduled = False
        events, waiters = self._pending, self._waiters
        self._pending, self._waiters = [], []
        self._commit(events, waiters)

    def _commit(
        self,
        events: list[AnyEvent],
        waiters: list[tuple[asyncio.Future[commands.Outcome], commands.Outcome]],
    ) -> None:
        try:
            self.record(events)
        except VenueHalted as exc:
            for future, _ in waiters:
                if not future.done():
                    future.set_exception(exc)
            if not waiters:
                raise
            return
        self.commits += 1 if events else 0
        for future, outcome in waiters:
            if not future.done():
                future.set_result(outcome)

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
        changed = self.projections.fold(events)
        self.events_applied += len(events)
        self.last_event_ms = events[-1].ts
        hub = self.hub
        message = self.projections.push_message
        hub.hold()  # a connection's streams changed by this batch leave in one write
        try:
            watchers = hub.watchers
            for stream, seq in changed.items():
                watching = watchers(stream)
                if watching:
                    hub.publish_state(stream, message(stream[0], stream[1], seq), watching)
            # Live streams: every row its own message, in event order (sessions never
            # coalesce them).
            if hub.live_streams:
                for stream, live in self.projections.live_messages(hub.watched):
                    hub.publish(stream, live)
        finally:
            hub.release()

    # -- what sessions read (the MessageSource protocol)

    def message(self, topic: str, key: Key) -> bytes:
        """A stream's current state as one encoded data message."""
        return self.projections.message(topic, key)

    def resume(self, topic: str, key: Key, since: int) -> bytes:
        """The rows of a history or live stream that changed after ``since``, newest first."""
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
        rows: Sequence[Row]
        if topic == LIVE_ORDER_HISTORY:
            rows = self._order_changes(key, since)
        else:
            rows = self._changed_rows(topic, key, since)
        seq = max(since, self.projections.changed_at(topic, key))
        return encode_message(topic, rows, seq)

    def _changed_rows(self, topic: str, key: str, since: int) -> list[Row]:
        """The rows of an address stream changed after ``since``, newest first: an order's
        newest change (order_history), fills (trade_history, live_trade_history), deposits
        and withdrawals (deposit_withdraw_history)."""
        # Newest first, so the work is bounded by max_resume_rows, not by how old since is.
        rows: list[Row] = []
        seen: set[int] = set()
        for event in self._newest_first(key, after=since):
            if topic == ORDER_HISTORY:
                for order in _orders_in(event, key):
                    if order.order_id not in seen:  # its newest change only
                        seen.add(order.order_id)
                        rows.append(order_history_row(order))
            elif topic == DEPOSIT_WITHDRAW_HISTORY:
                if isinstance(event, Deposited | Withdrew):
                    rows.append(deposit_withdraw_row(event))
            elif isinstance(event, Fill):
                rows.extend(_trade_rows(event, key))
            self._check_resume_size(len(rows), since, event.seq)
        return rows

    def _order_changes(self, address: str, since: int) -> list[OrderHistoryRow]:
        """Every push live_order_history made after ``since``, newest first: one row per
        order event, except a row equal to that order's previous one (not a change, so it was
        not pushed: an order that rests after being placed, a second partial fill in one
        second)."""
        rows: list[OrderHistoryRow | None] = []
        oldest: dict[int, int] = {}  # order id -> index of its oldest row so far
        for event in self._newest_first(address, after=since):
            for order in _orders_in(event, address):
                row = order_history_row(order)
                index = oldest.get(order.order_id)
                if index is not None and rows[index] == row:
                    rows[index] = None  # the push was at this older event
                oldest[order.order_id] = len(rows)
                rows.append(row)
            self._check_resume_size(len(rows), since, event.seq)
        # An order's oldest row may equal its row at ``since`` (pushed then, so the client has
        # it). Equal rows share their last_updated second: only that second's events count.
        pending: dict[int, int] = dict(oldest)
        floor = min((_seconds(rows[i]) for i in pending.values()), default=0)
        for event in self._newest_first(address, before=since + 1) if pending and since else ():
            if event.ts // 1000 < floor:
                break
            for order in _orders_in(event, address):
                index = pending.pop(order.order_id, None)
                if index is not None and rows[index] == order_history_row(order):
                    rows[index] = None
            if not pending:
                break
        return [row for row in rows if row is not None]

    def _check_resume_size(self, count: int, since: int, seq: int) -> None:
        if count > self.max_resume_rows:
            raise RequestError(
                "since_too_old",
                f"more than {self.max_resume_rows} rows (max_resume_rows) changed after "
                f"since {since}; the oldest since answered is {seq} (or fetch the history "
                "over REST with a limit and subscribe without since)",
            )

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
        return self._history(
            address,
            limit,
            lambda n: self.projections.trade_history(address, n),
            lambda event: _trade_rows(event, address) if isinstance(event, Fill) else (),
        )

    def recent_trades(self, market_id: int, limit: int | None = None) -> list[RecentTradeRow]:
        """The market's newest ``limit`` public fills, newest first (any depth)."""
        return self._history(
            market_key(market_id),
            limit,
            lambda n: self.projections.recent_trades(market_id, n),
            lambda event: (recent_trade_row(event),) if isinstance(event, Fill) else (),
        )

    def deposit_withdraw_history(
        self, address: str, limit: int | None = None
    ) -> list[DepositWithdrawRow]:
        """The address's newest ``limit`` deposits and withdrawals, newest first (any depth)."""
        return self._history(
            address,
            limit,
            lambda n: self.projections.deposit_withdraw_history(address, n),
            lambda event: (
                (deposit_withdraw_row(event),) if isinstance(event, Deposited | Withdrew) else ()
            ),
        )

    def funding_history(self, address: str, limit: int | None = None) -> list[FundingHistoryRow]:
        """The address's newest ``limit`` funding payments, newest first (any depth)."""
        return self._history(
            address,
            limit,
            lambda n: self.projections.funding_history(address, n),
            lambda event: _funding_rows(event, address),
        )

    def order_status(self, market_id: int, order_id: int) -> OrderHistoryRow | None:
        """An order's newest history row, however old; None if the market never had it."""
        row = self.projections.order_status(market_id, order_id)
        if row is not None:
            return row
        counter = order_id >> 64
        if not 0 < counter <= self.engine.order_counter:
            return None
        for event in self._newest_first(market_key(market_id)):
            # Order counters grow with seq: past an older order's placement it cannot appear.
            if isinstance(event, OrderPlaced) and event.order.order_id >> 64 < counter:
                return None
            for order in _orders_in(event, None):
                if order.order_id == order_id:
                    return order_history_row(order)
        return None

    def _history(
        self,
        key: str,
        limit: int | None,
        in_memory: Callable[[int], list[_R]],
        rows_of: Callable[[AnyEvent], Iterable[_R]],
    ) -> list[_R]:
        """The newest ``limit`` rows of a history: from memory within its window, else from
        the events stored under ``key``, newest first."""
        limit = limit or self.projections.history_limit
        if limit <= self.projections.history_limit:
            return in_memory(limit)
        rows: list[_R] = []
        for event in self._newest_first(key):
            rows.extend(rows_of(event))
            if len(rows) >= limit:
                break
        return rows[:limit]

    def _newest_first(
        self, key: str, after: int = 0, before: int | None = None
    ) -> Iterator[AnyEvent]:
        """The events stored under ``key`` (an address or a market key) with
        ``after < seq < before``, newest first, read page by page."""
        while True:
            page = self.store.read_for_key(
                key, after=after, before=before, limit=HISTORY_PAGE, newest_first=True
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


def _funding_rows(event: AnyEvent, address: str) -> list[FundingHistoryRow]:
    """The funding rows of ``address``'s positions in a settlement."""
    if not isinstance(event, FundingSettled):
        return []
    return [
        funding_history_row(payment, event)
        for payment in event.payments
        if payment.position.address == address
    ]


def _seconds(row: OrderHistoryRow | None) -> int:
    assert row is not None
    return int(row.last_updated)


def _orders_in(event: AnyEvent, address: str | None) -> Iterator[OrderState]:
    """The order states of ``address`` (None: of anyone) that an event carries."""
    if isinstance(event, OrderPlaced | OrderRested | OrderCancelled):
        if address is None or event.order.address == address:
            yield event.order
    elif isinstance(event, Fill):
        for side in (event.taker, event.maker):
            if address is None or side.order.address == address:
                yield side.order
