"""The synchronous client, for scripts and notebooks.

It runs the asyncio :class:`~perps_indexer.client.aio.Client` in one background thread with its
own event loop, so it has the same keepalive, reconnect, resubscribe and error handling::

    with SyncClient("ws://127.0.0.1:8080/ws") as client:
        for message in client.subscribe("orderbook", market_id=396):
            print(message.rows)

A subscription is either a blocking iterator (the default) or, with ``on_message=``, a callback.
Callbacks (and ``on_state``) run on the client's thread: keep them short, and do not call the
client's blocking methods from them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

from perps_indexer.client.aio import Client, ConnectionState, Mailbox, StateChange, Subscription
from perps_indexer.client.errors import ClientClosed
from perps_indexer.client.rows import Message, R

log = logging.getLogger(__name__)

T = TypeVar("T")


def _owned(message: Message[Any], owner: Any) -> Message[Any]:
    """``message`` as delivered to ``owner`` (the :class:`SyncSubscription`), once set."""
    return message if owner is None else dataclasses.replace(message, subscription=owner)


class ThreadMailbox(Mailbox):
    """A mailbox read from another thread (blocking ``get``)."""

    def __init__(self, maxsize: int) -> None:
        super().__init__(maxsize)
        self.owner: Any = None
        self._cond = threading.Condition()

    def put(self, message: Message[Any]) -> None:
        message = _owned(message, self.owner)
        with self._cond:
            self._push(message)
            self._cond.notify_all()

    def end(self, error: BaseException | None) -> None:
        with self._cond:
            if self._finish(error):
                self._cond.notify_all()

    def get(self, timeout: float | None) -> Message[Any]:
        """The next message; raises TimeoutError, the subscription's error, or StopIteration
        once it has ended."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                message = self._take(StopIteration)
                if message is not None:
                    return message
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError("no message within the timeout")
                self._cond.wait(remaining)


class CallbackSink:
    """Delivers each message to a callback on the client's thread."""

    def __init__(
        self,
        on_message: Callable[[Message[Any]], None],
        on_error: Callable[[BaseException], None] | None,
    ) -> None:
        self.on_message = on_message
        self.on_error = on_error
        self.owner: Any = None

    def put(self, message: Message[Any]) -> None:
        message = _owned(message, self.owner)
        try:
            self.on_message(message)
        except Exception:
            log.exception("on_message callback failed")

    def end(self, error: BaseException | None) -> None:
        if error is not None and self.on_error is not None:
            try:
                self.on_error(error)
            except Exception:
                log.exception("on_error callback failed")


class SyncSubscription(Generic[R]):
    """One subscription of a :class:`SyncClient`: a blocking iterator of messages (unless it
    was made with a callback). Iteration stops when it is unsubscribed or the client closes,
    and raises its error if the server refused it for good."""

    def __init__(
        self,
        client: SyncClient,
        box: ThreadMailbox | None,
        topic: str,
        address: str | None,
        market_id: str | int | None,
    ) -> None:
        self._client = client
        self._box = box
        self._inner: Subscription[R] | None = None
        self.topic = topic
        self.address = address
        self.market_id = market_id

    @property
    def inner(self) -> Subscription[R]:
        """The asyncio subscription underneath (``id``, ``closed``, ``error``, ``last_seq``)."""
        assert self._inner is not None
        return self._inner

    @property
    def id(self) -> int:
        return self.inner.id

    @property
    def closed(self) -> bool:
        return self.inner.closed

    def _mailbox(self) -> ThreadMailbox:
        if self._box is None:
            raise TypeError("this subscription delivers to a callback")
        return self._box

    def get(self, timeout: float | None = None) -> Message[R]:
        """The next message, waiting at most ``timeout`` seconds (TimeoutError after that);
        :class:`ClientClosed` once the subscription has ended."""
        box = self._mailbox()
        try:
            return box.get(timeout)
        except StopIteration:
            raise ClientClosed("the subscription has ended") from None

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> Message[R]:
        return self._mailbox().get(None)

    def unsubscribe(self) -> None:
        """Stop this subscription (see :meth:`Client.unsubscribe`)."""
        self._client.unsubscribe(self)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unsubscribe()

    def __repr__(self) -> str:
        return "<Sync" + repr(self._inner)[1:]


class SyncClient:
    """A blocking client: the asyncio :class:`Client` in one background thread.

    Takes the same keyword options as :class:`Client`. Close it (or use ``with``) to stop the
    thread.
    """

    def __init__(self, url: str, **options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._client = Client(url, **options)
        self._closed = False
        self._thread = threading.Thread(target=self._main, name="perps-indexer-client", daemon=True)
        self._thread.start()
        self._call(self._client.start())

    def _main(self) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float | None = 30.0) -> T:
        if self._closed or threading.current_thread() is self._thread:
            coro.close()
            if self._closed:
                raise ClientClosed("the client is closed")
            # Waiting here for the loop that runs this very callback would never end.
            raise RuntimeError("SyncClient methods cannot be called from its callbacks")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    @property
    def url(self) -> str:
        return self._client.url

    @property
    def state(self) -> ConnectionState:
        return self._client.state

    @property
    def protocol_version(self) -> int | None:
        return self._client.protocol_version

    def subscribe(
        self,
        topic: str,
        *,
        address: str | None = None,
        market_id: int | str | None = None,
        since: int | None = None,
        on_message: Callable[[Message[Any]], None] | None = None,
        on_error: Callable[[BaseException], None] | None = None,
    ) -> SyncSubscription[Any]:
        """Subscribe like :meth:`Client.subscribe`. With ``on_message`` the messages go to that
        callback (and a fatal error to ``on_error``) instead of the iterator."""
        box: ThreadMailbox | None = None
        sink: ThreadMailbox | CallbackSink
        if on_message is None:
            box = sink = ThreadMailbox(self._client.max_queue)
        else:
            sink = CallbackSink(on_message, on_error)
        sub: SyncSubscription[Any] = SyncSubscription(self, box, topic, address, market_id)
        sink.owner = sub

        async def add() -> Subscription[Any]:
            return self._client.add_subscription(topic, address, market_id, since, sink)

        sub._inner = self._call(add())
        return sub

    def unsubscribe(self, sub: SyncSubscription[Any]) -> None:
        """Stop ``sub`` (see :meth:`Client.unsubscribe`)."""
        if self._closed:
            return

        async def remove() -> None:
            self._client.unsubscribe(sub.inner)

        self._call(remove())

    def close(self) -> None:
        """Close the connection, end every subscription and join the thread."""
        if self._closed:
            return
        try:
            self._call(self._client.close())
        finally:
            self._closed = True
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


__all__ = ["CallbackSink", "StateChange", "SyncClient", "SyncSubscription", "ThreadMailbox"]
