"""``perps-indexer subscribe``: stream one topic to the terminal, to a pipe, or to a file.

On a terminal: a live view refreshed in place. Otherwise (or with ``--json``): one JSON line
per message, exactly as the server sent it. ``--record FILE`` appends every message with its
receive time: ``{"received_at": <unix seconds>, "message": <the message>}``. Connection
changes go to stderr; Ctrl-C exits with 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from typing import IO, Any

import msgspec

from perps_indexer.client.aio import Client, ConnectionState, StateChange
from perps_indexer.client.errors import ConnectFailed, SubscriptionRejected
from perps_indexer.client.rows import Message
from perps_indexer.client.tui import TerminalView
from perps_indexer.wire import LIVE_TOPICS

RENDER_INTERVAL = 0.1
"""Seconds between redraws of the terminal view at most (a busy book changes faster)."""


def one_line(raw: str) -> str:
    """The message on one line: as sent when it already is (the usual compact JSON)."""
    if "\n" not in raw and "\r" not in raw:
        return raw
    return msgspec.json.encode(msgspec.json.decode(raw)).decode()


class Subscriber:
    """The command's state: the output mode, the record file, what stderr was told."""

    def __init__(self, args: argparse.Namespace, out: IO[str], err: IO[str]) -> None:
        self.args = args
        self.out = out
        self.err = err
        self.connected_once = False
        key = f"address={args.address}" if args.address else f"market_id={args.market_id}"
        self.title = f"{args.topic} {key}  <- {args.url}"
        self.view = TerminalView(out, self.title) if out.isatty() and not args.json else None
        self.dirty = asyncio.Event()

    def on_state(self, change: StateChange) -> None:
        text = None
        if change.state is ConnectionState.CONNECTED:
            text = "reconnected; subscribing again" if self.connected_once else "connected"
            self.connected_once = True
        elif change.state is ConnectionState.DISCONNECTED:
            text = f"{change.reason}; reconnecting in {change.delay or 0:.1f} s"
        elif change.state is ConnectionState.CONNECTING and change.attempt:
            text = f"connecting (attempt {change.attempt + 1})"
        if text is None:
            return
        self.err.write(f"perps-indexer: {self.args.url}: {text}\n")
        self.err.flush()
        if self.view is not None:
            self.view.status = text
            self.dirty.set()

    def deliver(self, message: Message[Any], record: IO[str] | None) -> None:
        line = one_line(message.raw)
        if record is not None:
            record.write(f'{{"received_at":{message.received_at:.6f},"message":{line}}}\n')
            record.flush()
        if self.view is not None:
            self.view.update(message)
            self.dirty.set()
        else:
            self.out.write(line + "\n")
            self.out.flush()

    async def redraw(self) -> None:
        assert self.view is not None
        while True:
            await self.dirty.wait()
            self.dirty.clear()
            self.view.draw()
            await asyncio.sleep(RENDER_INTERVAL)


async def subscribe_main(args: argparse.Namespace) -> int:
    out, err = sys.stdout, sys.stderr
    state = Subscriber(args, out, err)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    record = open(args.record, "a", encoding="utf-8") if args.record else None  # noqa: SIM115
    tasks: list[asyncio.Task[Any]] = []
    try:
        # resume=False: each line and each screen is a full state, also after a reconnect; a
        # live topic resumes, so that no event pushed during the outage is missing (its first
        # line after a reconnect is then the server's answer: every row missed, newest first).
        resume = args.topic in LIVE_TOPICS
        async with Client(args.url, on_state=state.on_state, resume=resume) as client:
            sub = client.subscribe(args.topic, address=args.address, market_id=args.market_id)

            async def consume() -> None:
                async for message in sub:
                    state.deliver(message, record)

            consumer = asyncio.create_task(consume())
            tasks = [consumer, asyncio.create_task(stop.wait())]
            if state.view is not None:
                tasks.append(asyncio.create_task(state.redraw()))
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if consumer.done():
                consumer.result()  # the subscription ended: raise its error, if any
        return 0
    except SubscriptionRejected as exc:
        err.write(f"perps-indexer: the server refused the subscription: {exc.message}\n")
        return 2
    except ConnectFailed as exc:
        err.write(f"perps-indexer: {exc.message}\n")
        return 1
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): not an error; keep Python's final flush quiet.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if state.view is not None:
            state.view.draw()
            state.view.close()
            out.write("\n")
        if record is not None:
            record.close()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
