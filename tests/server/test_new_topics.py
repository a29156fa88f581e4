"""The later generations' topics (reference §6) over a real server and real connections.

recent_trades, best_price, live_trade_history, live_order_history, deposit_withdraw_history and
live_funding_rate: exact messages (every byte, with ``seq``) after scripted REST activity, live
streams that never coalesce, resume with ``since``, and the REST reads of the same data.
Timestamps come from the server's injected clock.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import signal
import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

from websockets.sync.client import ClientConnection

from perps_indexer import commands
from perps_indexer.client import (
    Backoff,
    BestPrice,
    Client,
    ConnectionState,
    DepositWithdraw,
    FundingRate,
    Message,
    OrderHistory,
    RecentTrade,
    StateChange,
)
from perps_indexer.client.tui import TerminalView, render
from tests.client.conftest import until
from tests.server.conftest import T0, ThreadedServer
from tests.server.test_protocol_v2 import (
    cancel,
    connect,
    deposit,
    limit,
    market,
    recv,
    recv_closed,
    rest_rows,
    running,
    send,
)

A = "0x4d6dc68e391e86991e58ab4d548b7e92872430d1f51bc666fe0c206bad7ff770"  # the reference's
B = "0x" + "b" * 64
C = "0x" + "c" * 64
TS = str(T0 // 1000)  # "1739788459"
NEXT_HOUR = "1739790000"  # the first multiple of 3600 s after T0: the next funding time


def j(obj: Any) -> str:
    """Compact JSON as the server writes it (keys in the order given)."""
    return json.dumps(obj, separators=(",", ":"))


def frames(ws: ClientConnection, quiet: float = 0.3) -> list[str]:
    """Every text frame that arrives until the connection is quiet for ``quiet`` seconds."""
    got = []
    while True:
        try:
            got.append(str(ws.recv(timeout=quiet)))
        except TimeoutError:
            return got


def by_topic(texts: list[str]) -> dict[str, list[str]]:
    """Frames grouped by topic, each topic's in the order they arrived."""
    out: dict[str, list[str]] = {}
    for text in texts:
        out.setdefault(json.loads(text)["message"], []).append(text)
    return out


def push(topic: str, rows: list[dict[str, Any]], seq: int) -> str:
    return j({"data": rows, "message": topic, "seq": seq})


def order_row(address: str, order_id: int, trade_id: int, ts: str, **fields: Any) -> dict[str, Any]:
    """An order_history row of a 2x order in market 396, fields in wire order."""
    row = {
        "address": address,
        "is_market_order": False,
        "last_updated": ts,
        "leverage": 2,
        "market_id": "396",
        "order_id": str(order_id),
        "order_type": 1,
        "order_value": "0",
        "price": "0",
        "size": "500",
        "status": "Open",
        "timestamp": ts,
        "trade_id": str(trade_id),
    }
    row.update(fields)
    return row


def trade_row(address: str, trade_id: int, ts: str, **fields: Any) -> dict[str, Any]:
    row = {
        "address": address,
        "fee": "0",
        "last_updated": ts,
        "market_id": "396",
        "order_type": 1,
        "pnl": "0",
        "price": "0",
        "size": "500",
        "timestamp": ts,
        "trade_id": str(trade_id),
    }
    row.update(fields)
    return row


def test_scripted_session_gives_exact_messages(server: ThreadedServer) -> None:
    rest = server.rest
    with connect(server) as ws:
        for topic in ("live_trade_history", "live_order_history", "deposit_withdraw_history"):
            send(ws, topic=topic, address=A)
        for topic in ("recent_trades", "best_price", "live_funding_rate"):
            send(ws, topic=topic, market_id="396")
        assert frames(ws) == [
            '{"data":[],"message":"live_trade_history","seq":0}',
            '{"data":[],"message":"live_order_history","seq":0}',
            '{"data":[],"message":"deposit_withdraw_history","seq":0}',
            '{"data":[],"message":"recent_trades","seq":0}',
            '{"data":[],"message":"best_price","seq":0}',
            '{"data":[],"message":"live_funding_rate","seq":0}',
        ]

        rest.ok("/deposit", {"userAddress": A, "amount": 10_000_000})  # seq 1
        deposit_row = {
            "address": A,
            "amount": "10000000",
            "is_deposit": True,
            "last_updated": TS,
            "timestamp": TS,
            "transaction_version": "1",
        }
        assert frames(ws) == [push("deposit_withdraw_history", [deposit_row], 1)]
        rest.ok("/deposit", {"userAddress": B, "amount": 10_000_000})  # seq 2: not A's
        assert frames(ws) == []

        # B rests a bid, 1000 @ 6050 (placed 3, rested 4): the best bid.
        limit(server.rest, B, 6050, long=True, size=1000)
        best = {
            "best_ask_price": None,
            "best_ask_size": None,
            "best_bid_price": "6050",
            "best_bid_size": "1000",
            "last_updated": TS,
            "market_id": "396",
        }
        assert frames(ws) == [push("best_price", [best], 4)]

        # A sells 1000 at market, 2x (placed 5, filled 6): the reference's example trade.
        server.clock.now = T0 + 5_000
        ts = str((T0 + 5_000) // 1000)
        market(rest, A, long=False, size=1000)
        order_id, trade_id = 2 << 64, (2 << 64) | 396
        placed = order_row(
            A, order_id, trade_id, ts, is_market_order=True, order_type=2, size="1000"
        )
        filled = {**placed, "order_value": "6050000", "price": "6050", "status": "Filled"}
        step = by_topic(frames(ws))
        assert step == {
            # Each change of the order is its own push: placed, then filled.
            "live_order_history": [
                push("live_order_history", [placed], 5),
                push("live_order_history", [filled], 6),
            ],
            "live_trade_history": [
                push(
                    "live_trade_history",
                    [
                        trade_row(
                            A, trade_id, ts, fee="3025", order_type=2, price="6050", size="1000"
                        )
                    ],
                    6,
                )
            ],
            "recent_trades": [
                push(
                    "recent_trades",
                    [
                        {
                            "is_buy": False,
                            "last_updated": ts,
                            "market_id": "396",
                            "price": "6050",
                            "size": "1000",
                            "timestamp": ts,
                            "transaction_version": "6",
                        }
                    ],
                    6,
                )
            ],
            "best_price": [
                push(
                    "best_price",
                    [
                        {
                            **best,
                            "best_bid_price": None,
                            "best_bid_size": None,
                            "last_updated": ts,
                        }
                    ],
                    6,
                )
            ],
        }

        # The mark price (seq 7): no index yet, so no premium; the next hour is the next payment.
        server.clock.now = T0 + 9_000
        ts3 = str((T0 + 9_000) // 1000)
        rest.ok("/setMarkPrice", {"marketId": 396, "price": 6100})
        assert frames(ws) == [
            '{"data":[{"funding_rate":"0","index_price":null,"last_updated":"' + ts3 + '",'
            '"mark_price":"6100","market_id":"396","next_funding_time":"' + NEXT_HOUR + '"}],'
            '"message":"live_funding_rate","seq":7}'
        ]
        rest.ok("/setMarkPrice", {"marketId": 396, "price": 6100})  # seq 8: nothing new shown
        assert frames(ws) == []

        # A withdraws (seq 9): the newest first.
        rest.ok("/withdraw", {"userAddress": A, "amount": 2500})
        withdrawal = {
            **deposit_row,
            "amount": "2500",
            "is_deposit": False,
            "last_updated": ts3,
            "timestamp": ts3,
            "transaction_version": "9",
        }
        assert frames(ws) == [push("deposit_withdraw_history", [withdrawal, deposit_row], 9)]

    # A late subscriber to a live topic gets the newest single row, then the stream.
    with connect(server) as late:
        send(late, topic="live_order_history", address=A, id=1)
        send(late, topic="live_trade_history", address="0x" + A[2:].upper(), id=2)
        send(late, topic="best_price", market_id=396, id=3)
        got = frames(late)
        assert got[1] == j({"data": [filled], "message": "live_order_history", "seq": 6, "id": 1})
        assert json.loads(got[3]) == {
            "data": [
                trade_row(A, trade_id, ts, fee="3025", order_type=2, price="6050", size="1000")
            ],
            "message": "live_trade_history",
            "seq": 6,
            "id": 2,
        }
        assert json.loads(got[5])["seq"] == 6

    # The REST reads give the same rows.
    assert (
        rest_rows(rest, "/getAllTrades?marketId=396")
        == json.loads(step["recent_trades"][0])["data"]
    )
    assert rest_rows(rest, f"/getDepositAndWithdrawHistory?userAddress={A}") == [
        withdrawal,
        deposit_row,
    ]
    status, reply = rest.get("/getFundingRate?marketId=396")
    assert status == 200 and reply["data"] == {
        "funding_rate": "0",
        "index_price": None,
        "last_updated": ts3,
        "mark_price": "6100",
        "market_id": "396",
        "next_funding_time": NEXT_HOUR,
    }
    assert rest.get("/getFundingRate?marketId=397")[1]["data"] is None
    assert rest_rows(rest, f"/getFundingHistory?userAddress={A}") == []
    status, reply = rest.get(f"/getOrderStatusById?marketId=396&orderId={order_id}")
    assert (status, reply["data"]) == (200, filled)


def test_live_funding_rate_with_index_mark_and_settlement(server: ThreadedServer) -> None:
    rest = server.rest
    deposit(rest, A, B)  # 1, 2
    limit(rest, B, 6050, long=True, size=1000)  # 3, 4
    market(rest, A, long=False, size=1000)  # 5, 6: A short 1000 @ 6050, B long
    trade_id = (2 << 64) | 396
    with connect(server) as ws:
        send(ws, topic="live_funding_rate", market_id=396)
        send(ws, topic="positions", address=A)
        assert json.loads(frames(ws)[0]) == {"data": [], "message": "live_funding_rate", "seq": 0}

        server.clock.now = T0 + 10_000
        rest.ok("/setIndexPrice", {"marketId": 396, "price": 6000})  # 7
        row = {
            "funding_rate": "0",
            "index_price": "6000",
            "last_updated": str((T0 + 10_000) // 1000),
            "mark_price": None,
            "market_id": "396",
            "next_funding_time": NEXT_HOUR,  # the first boundary after the market's first price
        }
        assert frames(ws) == [push("live_funding_rate", [row], 7)]
        rest.ok("/setMarkPrice", {"marketId": 396, "price": 6030})  # 8: premium 0.5 %
        row = {**row, "funding_rate": "0.005", "mark_price": "6030"}
        assert frames(ws) == [push("live_funding_rate", [row], 8)]
        rest.ok("/settleFunding", {"marketId": 396})  # not due: nothing happens
        assert frames(ws) == []

        # At the boundary (the server's own funding loop may settle first: the same event).
        server.clock.now = int(NEXT_HOUR) * 1000
        rest.ok("/settleFunding", {"marketId": 396})  # 9
        # B (long) pays ceil(1000 * 6030 * 0.005) = 30150 to A (short), into A's margin.
        row = {**row, "last_updated": NEXT_HOUR, "next_funding_time": str(int(NEXT_HOUR) + 3600)}
        position = {
            "address": A,
            "entry_price": "6050",
            "is_long": False,
            "last_updated": NEXT_HOUR,
            "leverage": 2,
            "liq_price": repr(6050.0 * (1 + (1 / 2 + 30150 / 6050000)) / (1 + 0.025)),
            "margin": str(3_025_000 + 30_150),
            "market_id": "396",
            "size": "1000",
            "sl": None,
            "tp": None,
            "trade_id": str(trade_id),
            "value": "6050000",
        }
        assert sorted(frames(ws)) == sorted(
            [push("live_funding_rate", [row], 9), push("positions", [position], 9)]
        )
        rest.ok("/settleFunding", {"marketId": 396})  # settled already: nothing
        assert frames(ws) == []
    payment = {
        "address": A,
        "amount": "30150",
        "funding_rate": "0.005",
        "is_long": False,
        "market_id": "396",
        "size": "1000",
        "timestamp": NEXT_HOUR,
        "trade_id": str(trade_id),
        "transaction_version": "9",
    }
    assert rest_rows(rest, f"/getFundingHistory?userAddress={A}") == [payment]
    assert rest_rows(rest, f"/getFundingHistory?userAddress={B}&limit=500") == [
        {
            **payment,
            "address": B,
            "amount": "-30150",
            "is_long": True,
            "trade_id": str(1 << 64 | 396),
        }
    ]
    status, reply = rest.get("/getFundingRate?marketId=396")
    assert (status, reply["data"]) == (200, row)


def test_live_streams_push_every_change_of_one_batch(server: ThreadedServer) -> None:
    """A market order that sweeps three makers changes the taker's order four times and makes
    three fills in one batch: every one is pushed, in order, with its own seq."""
    rest = server.rest
    deposit(rest, A, B)  # seqs 1, 2
    bids = [limit(rest, B, price, long=True) for price in (6002, 6001, 6000)]  # 3..8
    assert [b["seq"] for b in bids] == [4, 6, 8]
    with connect(server) as ws:
        send(ws, topic="live_order_history", address=A, id="o")
        send(ws, topic="live_trade_history", address=A, id="t")
        send(ws, topic="live_order_history", address=B, id="b")
        got = frames(ws)
        assert [json.loads(f)["message"] for f in got] == [
            "subscribed",
            "live_order_history",
            "subscribed",
            "live_trade_history",
            "subscribed",
            "live_order_history",
        ]
        assert json.loads(got[5])["data"][0]["price"] == "6000"  # B's newest order

        server.clock.now = T0 + 1_000
        ts = str((T0 + 1_000) // 1000)
        done = market(rest, A, long=False, size=1500)  # placed 9, fills 10, 11, 12
        assert done["seq"] == 12
        taker_id, taker_trade = 4 << 64, (2 << 64) | 396
        taker = order_row(A, taker_id, taker_trade, ts, is_market_order=True, order_type=2)
        taker["size"] = "1500"
        sweep = [
            (9, "0", "0", "Open"),
            (10, "6002", "3001000", "Partially Filled"),
            (11, "6001", "6001500", "Partially Filled"),
            (12, "6000", "9001500", "Filled"),
        ]
        expected_orders = [
            j(
                {
                    "data": [{**taker, "order_value": value, "price": price, "status": status}],
                    "message": "live_order_history",
                    "seq": seq,
                    "id": "o",
                }
            )
            for seq, price, value, status in sweep
        ]
        expected_trades = [
            j(
                {
                    "data": [trade_row(A, taker_trade, ts, fee=fee, order_type=2, price=price)],
                    "message": "live_trade_history",
                    "seq": seq,
                    "id": "t",
                }
            )
            for (seq, price, _, _), fee in zip(sweep[1:], ("1501", "1501", "1500"), strict=True)
        ]
        # B's three bids filled, one push each (maker fee 0, their own timestamps).
        maker_rows = [
            order_row(
                B,
                (n << 64) | price,
                (1 << 64) | 396,
                TS,
                last_updated=ts,
                order_value=str(price * 500),
                price=str(price),
                status="Filled",
            )
            for n, price in ((1, 6002), (2, 6001), (3, 6000))
        ]
        expected_b = [
            j({"data": [row], "message": "live_order_history", "seq": seq, "id": "b"})
            for row, seq in zip(maker_rows, (10, 11, 12), strict=True)
        ]
        got = frames(ws)
        assert [f for f in got if '"id":"o"' in f] == expected_orders
        assert [f for f in got if '"id":"t"' in f] == expected_trades
        assert [f for f in got if '"id":"b"' in f] == expected_b
        assert len(got) == 10
        # Taker fee: 5 bps of each fill's value, rounded up: 1500.5 and 1500.25 -> 1501.
        assert [json.loads(f)["data"][0]["fee"] for f in expected_trades] == [
            "1501",
            "1501",
            "1500",
        ]


def test_resume_live_and_deposit_streams_with_since(server: ThreadedServer) -> None:
    """A client that reconnects with ``since`` gets exactly the pushes a connected client got
    while it was away, newest first."""
    rest = server.rest
    deposit(rest, A, B, C)
    with connect(server) as ws:
        for topic in ("live_order_history", "live_trade_history", "deposit_withdraw_history"):
            send(ws, topic=topic, address=A)
        last = {json.loads(f)["message"]: json.loads(f)["seq"] for f in frames(ws)}
    assert last == {
        "live_order_history": 0,
        "live_trade_history": 0,
        "deposit_withdraw_history": 1,
    }
    # Seen: A's first resting bid (its placement is the push; resting shows nothing new).
    with connect(server) as ws:
        send(ws, topic="live_order_history", address=A)
        assert frames(ws) == ['{"data":[],"message":"live_order_history","seq":0}']
        limit(rest, A, 5990, long=True)
        (seen,) = frames(ws)
    since_orders = json.loads(seen)["seq"]
    assert since_orders == 4

    with connect(server) as watcher:  # stays connected through the "outage"
        for topic in ("live_order_history", "live_trade_history", "deposit_withdraw_history"):
            send(watcher, topic=topic, address=A)
        frames(watcher)
        server.clock.now = T0 + 2_000
        limit(rest, B, 6010, long=False, size=500)  # B's ask, not A's
        bid = limit(rest, A, 6000, long=True)["order_id"]  # placed + rested: one push
        server.clock.now = T0 + 3_000
        market(rest, C, long=False, size=500)  # fills A's 6000 bid
        market(rest, A, long=True, size=500)  # A takes B's ask
        cancel(rest, A, str((1 << 64) | 5990))  # A's first bid
        rest.ok("/withdraw", {"userAddress": A, "amount": 7})
        live = by_topic(frames(watcher))
    assert bid == str((3 << 64) | 6000)
    live_orders = [json.loads(f) for f in live["live_order_history"]]
    live_trades = [json.loads(f) for f in live["live_trade_history"]]
    moves = [json.loads(f) for f in live["deposit_withdraw_history"]]
    # A's changes: the 6000 bid placed, then filled; its market buy placed, then filled; the
    # 5990 bid cancelled.
    assert [(m["data"][0]["price"], m["data"][0]["status"]) for m in live_orders] == [
        ("6000", "Open"),
        ("6000", "Filled"),
        ("0", "Open"),
        ("6010", "Filled"),
        ("5990", "Cancelled"),
    ]
    assert len(live_trades) == 2 and len(moves) == 1

    with connect(server) as ws:
        send(ws, topic="live_order_history", address=A, since=since_orders, id=1)
        send(ws, topic="live_trade_history", address=A, since=0, id=2)
        send(ws, topic="deposit_withdraw_history", address=A, since=1, id=3)
        got = [json.loads(f) for f in frames(ws)]
    assert [m["message"] for m in got[::2]] == ["subscribed"] * 3
    orders, trades, deposits = got[1], got[3], got[5]
    # Exactly the missed pushes, newest first, and the seq of the newest.
    assert orders == {
        "data": [m["data"][0] for m in reversed(live_orders)],
        "message": "live_order_history",
        "seq": live_orders[-1]["seq"],
        "id": 1,
    }
    assert trades == {
        "data": [m["data"][0] for m in reversed(live_trades)],
        "message": "live_trade_history",
        "seq": live_trades[-1]["seq"],
        "id": 2,
    }
    # A state topic's push is its window; since=1 asks only for what came after the deposit.
    assert len(moves[0]["data"]) == 2
    assert deposits == {**moves[0], "data": moves[0]["data"][:1], "id": 3}
    # since = the very first push: its placement row is not sent again.
    with connect(server) as ws:
        send(ws, topic="live_order_history", address=A, since=live_orders[0]["seq"])
        (again,) = frames(ws)
    assert json.loads(again)["data"] == [m["data"][0] for m in reversed(live_orders[1:])]


def test_slow_reader_of_live_streams_is_closed_then_resumes(tmp_path: Path) -> None:
    """Live messages are never coalesced: three fills in one batch are six messages for B's two
    live streams, more than the outbox bound (one per stream would fit), so the reader is
    closed with 1013; resuming each stream with since gets every row it missed."""
    # Without the direct-write fast path, so the batch meets the outbox bound.
    with running(tmp_path, max_outbox_bytes=1500, direct_write_limit=0) as server:
        rest = server.rest
        deposit(rest, A, B)  # 1, 2
        for price in (6001, 6002, 6003):
            limit(rest, B, price, long=True)  # orders 1-3, seqs 3-8
        with connect(server) as ws:
            send(ws, topic="live_order_history", address=B)
            send(ws, topic="live_trade_history", address=B)
            orders_since, trades_since = (json.loads(f)["seq"] for f in frames(ws))
            assert (orders_since, trades_since) == (7, 0)
            market(rest, A, long=False, size=1500)  # placed 9, fills 10-12
            got = recv_closed(ws)
            assert ws.close_code == 1013
        assert got == []  # the batch did not fit: none of it was sent
        with connect(server) as ws:
            send(ws, topic="live_order_history", address=B, since=orders_since)
            orders = recv(ws)
            send(ws, topic="live_trade_history", address=B, since=trades_since)
            trades = recv(ws)
        assert [(r["price"], r["status"]) for r in orders["data"]] == [
            ("6001", "Filled"),
            ("6002", "Filled"),
            ("6003", "Filled"),
        ]
        assert [r["price"] for r in trades["data"]] == ["6001", "6002", "6003"]
        assert orders["seq"] == trades["seq"] == 12
    # With the default bound the same batch arrives as six messages, each with its own seq.
    (tmp_path / "big").mkdir()
    with running(tmp_path / "big") as server:
        rest = server.rest
        deposit(rest, A, B)
        for price in (6001, 6002, 6003):
            limit(rest, B, price, long=True)
        with connect(server) as ws:
            send(ws, topic="live_order_history", address=B)
            send(ws, topic="live_trade_history", address=B)
            frames(ws)
            market(rest, A, long=False, size=1500)
            pushed = [json.loads(f) for f in frames(ws)]
        assert [(m["message"], m["seq"], m["data"][0]["price"]) for m in pushed] == [
            ("live_order_history", 10, "6003"),
            ("live_trade_history", 10, "6003"),
            ("live_order_history", 11, "6002"),
            ("live_trade_history", 11, "6002"),
            ("live_order_history", 12, "6001"),
            ("live_trade_history", 12, "6001"),
        ]
    # The same script on both servers: the resumed rows are the pushed ones, newest first.
    assert orders["data"] == [m["data"][0] for m in pushed[-2::-2]]
    assert trades["data"] == [m["data"][0] for m in pushed[::-2]]


def test_order_status_by_id_any_age(tmp_path: Path) -> None:
    with running(tmp_path, history_limit=2) as server:
        rest = server.rest
        deposit(rest, A, B)
        ids = [limit(rest, A, 5990 + n, long=True)["order_id"] for n in range(3)]
        cancel(rest, A, ids[1])
        # The first order left A's in-memory window (2 orders): it comes from the store.
        memory = server.call(lambda: server.server.venue.projections.order_status(396, int(ids[0])))
        assert memory is None
        status, reply = rest.get(f"/getOrderStatusById?marketId=396&orderId={ids[0]}")
        assert status == 200
        assert reply["data"] == order_row(
            A,
            int(ids[0]),
            (1 << 64) | 396,
            TS,
            order_value="2995000",
            price="5990",
        )
        status, reply = rest.get(f"/getOrderStatusById?marketId=396&orderId={ids[1]}")
        assert reply["data"]["status"] == "Cancelled"
        for query, code in (
            (f"marketId=397&orderId={ids[0]}", "unknown_order"),  # another market's id
            (f"marketId=396&orderId={(99 << 64) | 5990}", "unknown_order"),  # never issued
            (f"marketId=396&orderId={1 << 64}", "unknown_order"),  # the counter, wrong key
            ("marketId=396&orderId=-1", "unknown_order"),
            ("marketId=396&orderId=x", "invalid_request"),
            ("marketId=396", "invalid_request"),
            (f"marketId=999&orderId={ids[0]}", "unknown_market"),
        ):
            status, reply = rest.get(f"/getOrderStatusById?{query}")
            assert (status, reply["code"]) == (404 if code == "unknown_order" else 400, code)
            assert reply["success"] is False
        # Histories deeper than the window come from the store too.
        limit(rest, B, 5992, long=False)  # fills A's 5992 bid
        market(rest, B, long=False)  # fills A's 5990 bid
        trades = rest_rows(rest, "/getAllTrades?marketId=396&limit=10")
        assert [(t["price"], t["is_buy"]) for t in trades] == [("5990", False), ("5992", False)]
        assert rest_rows(rest, "/getAllTrades?marketId=396&limit=1") == trades[:1]
        moves = rest_rows(rest, f"/getDepositAndWithdrawHistory?userAddress={A}&limit=5")
        assert [m["transaction_version"] for m in moves] == ["1"]
        assert rest_rows(rest, f"/getFundingHistory?userAddress={A}&limit=5") == []


# ---------------------------------------------------------------------------- the client


async def test_client_types_every_new_topic(server: ThreadedServer) -> None:
    rest = server.rest
    async with Client(server.ws_url) as client:
        subs = {
            "recent_trades": client.subscribe("recent_trades", market_id=396),
            "best_price": client.subscribe("best_price", market_id="396"),
            "live_funding_rate": client.subscribe("live_funding_rate", market_id=396),
            "live_trade_history": client.subscribe("live_trade_history", address=A),
            "live_order_history": client.subscribe("live_order_history", address=A),
            "deposit_withdraw_history": client.subscribe("deposit_withdraw_history", address=A),
        }
        for topic, sub in subs.items():
            first = await asyncio.wait_for(anext(sub), 5)
            assert (first.topic, first.rows, first.seq, first.snapshot) == (topic, (), 0, True)
        await asyncio.to_thread(deposit, rest, A, B)  # 1, 2
        await asyncio.to_thread(limit, rest, B, 6050, long=True, size=1000)  # 3, 4
        await asyncio.to_thread(market, rest, A, long=False, size=1000)  # 5, 6
        await asyncio.to_thread(rest.ok, "/setMarkPrice", {"marketId": 396, "price": 6100})  # 7
        trade_id = (2 << 64) | 396
        got = await until(subs["recent_trades"], lambda m: m.seq == 6)
        assert got.rows == (
            RecentTrade(
                is_buy=False,
                last_updated=T0 // 1000,
                market_id=396,
                price=6050,
                size=1000,
                timestamp=T0 // 1000,
                transaction_version=6,
            ),
        )
        got = await until(subs["best_price"], lambda m: m.seq == 6)
        assert got.rows == (BestPrice(last_updated=T0 // 1000, market_id=396),)
        got = await until(subs["live_funding_rate"], lambda m: m.seq == 7)
        assert got.rows == (
            FundingRate(
                funding_rate=Decimal(0),
                last_updated=T0 // 1000,
                mark_price=6100,
                market_id=396,
                next_funding_time=int(NEXT_HOUR),
            ),
        )
        (trade,) = (await until(subs["live_trade_history"], lambda m: m.seq == 6)).rows
        assert (trade.fee, trade.price, trade.trade_id) == (3025, 6050, trade_id)
        placed = await until(subs["live_order_history"], lambda m: m.seq == 5)
        filled = await asyncio.wait_for(anext(subs["live_order_history"]), 5)
        assert [m.rows[0].status for m in (placed, filled)] == ["Open", "Filled"]
        assert filled.seq == 6 and not filled.snapshot
        got = await until(subs["deposit_withdraw_history"], lambda m: m.seq == 1)
        assert got.rows == (
            DepositWithdraw(
                address=A,
                amount=10**12,
                is_deposit=True,
                last_updated=T0 // 1000,
                timestamp=T0 // 1000,
                transaction_version=1,
            ),
        )


async def test_client_resumes_a_live_stream_after_a_1013_close(server: ThreadedServer) -> None:
    """The server closes the client as too slow and, before it is back, B's three bids are
    filled: the client resumes with since and hands over every row it missed."""
    rest = server.rest
    await asyncio.to_thread(deposit, rest, A, B)
    for price in (6001, 6002, 6003):
        await asyncio.to_thread(limit, rest, B, price, long=True)  # seqs 3-8
    changes: list[StateChange] = []
    quick = Backoff(base=0.05, cap=0.2)
    async with Client(server.ws_url, backoff=quick, on_state=changes.append) as client:
        sub = client.subscribe("live_order_history", address=B)
        first = await asyncio.wait_for(anext(sub), 5)
        assert (first.seq, first.rows[0].price) == (7, 6003)

        def close_then_trade() -> None:
            venue = server.server.venue
            (session,) = venue.hub.sessions
            session.slow("test: too slow")
            venue.execute(
                commands.PlaceMarketOrder(
                    address=A, market_id=396, is_long=False, is_close=False, size=1500, leverage=2
                )
            )

        server.call(close_then_trade)  # on the server's loop: nothing in between
        resumed = await asyncio.wait_for(anext(sub), 10)
        assert resumed.snapshot and resumed.seq == 12
        assert resumed.resumed is not None
        assert [(r.price, r.status) for r in resumed.resumed] == [
            (6001, "Filled"),
            (6002, "Filled"),
            (6003, "Filled"),
        ]
        assert resumed.rows == resumed.resumed[:1]
        assert json.loads(resumed.raw)["data"][0]["order_id"] == str((1 << 64) | 6001)
        # The next change is an ordinary push; no re-read of the state came in between.
        await asyncio.to_thread(limit, rest, B, 5990, long=True)
        after = await asyncio.wait_for(anext(sub), 5)
        assert (after.seq, after.rows[0].price, after.snapshot) == (13, 5990, False)
    assert [c.state for c in changes].count(ConnectionState.CONNECTED) == 2
    assert any("1013" in c.reason for c in changes if c.state is ConnectionState.DISCONNECTED)


def test_subscribe_command_prints_every_live_push(server: ThreadedServer) -> None:
    rest = server.rest
    deposit(rest, A, B)
    for price in (6001, 6002):
        limit(rest, B, price, long=True)
    cmd = [
        sys.executable,
        "-m",
        "perps_indexer",
        "subscribe",
        "live_trade_history",
        "--address",
        B,
        "--url",
        server.ws_url,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        market(rest, A, long=False, size=1000)  # fills both bids: two pushes for B
        lines = [proc.stdout.readline() for _ in range(2)]
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(10)
        _, err = proc.communicate()
    assert code == 0, err
    assert first == '{"data":[],"message":"live_trade_history","seq":0,"id":1}\n'
    assert [json.loads(line)["seq"] for line in lines] == [8, 9]
    assert [json.loads(line)["data"][0]["price"] for line in lines] == ["6002", "6001"]
    assert json.loads(lines[1])["data"] == rest_rows(
        rest, f"/getTradeHistory?userAddress={B}&limit=1"
    )


def test_terminal_view_piles_up_live_rows_and_shows_the_new_tables() -> None:
    out = io.StringIO()
    view = TerminalView(out, "live_order_history")
    sub: Any = None

    def message(seq: int, rows: tuple[Any, ...], **kw: Any) -> Message[Any]:
        return Message("live_order_history", rows, "{}", seq, False, sub, 0.0, **kw)

    def order(n: int, status: str) -> OrderHistory:
        return OrderHistory(
            address=A,
            is_market_order=False,
            last_updated=T0 // 1000,
            leverage=2,
            market_id=396,
            order_id=n,
            order_type=1,
            order_value=6000,
            price=6000,
            size=1,
            status=status,
            timestamp=T0 // 1000,
            trade_id=1,
        )

    first = dataclasses.replace(message(3, (order(1, "Open"),)), snapshot=True)
    view.update(first)
    view.update(message(4, (order(2, "Open"),)))
    view.update(message(5, (order(1, "Filled"),)))
    assert [(r.order_id, r.status) for r in view.live_rows] == [
        (1, "Filled"),
        (2, "Open"),
        (1, "Open"),
    ]
    assert view.message is not None and len(view.message.rows) == 3
    # After a reconnect: the rows missed, then what was shown before.
    missed = (order(3, "Cancelled"), order(2, "Filled"))
    view.update(dataclasses.replace(message(8, missed[:1], resumed=missed), snapshot=True))
    assert [r.order_id for r in view.live_rows] == [3, 2, 1, 2, 1]
    # A fresh subscription (a snapshot without resume) starts again.
    view.update(dataclasses.replace(message(9, (order(3, "Cancelled"),)), snapshot=True))
    assert [r.order_id for r in view.live_rows] == [3]
    lines = render("t", "s", view.message, 200, 20)
    assert lines[3].split() == [
        "updated",
        "market",
        "type",
        "status",
        "price",
        "size",
        "lev",
        "order_id",
    ]
    funding = FundingRate(
        funding_rate=Decimal("-0.0075"),
        last_updated=0,
        market_id=396,
        mark_price=6100,
        next_funding_time=3600,
    )
    rate = Message("live_funding_rate", (funding,), "{}", 7, True, sub, 0.0)
    assert render("t", "s", rate, 200, 20)[4].split() == [
        "-0.0075",
        "6100",
        "-",
        "01-01",
        "01:00:00",
        "01-01",
        "00:00:00",
    ]
    best = Message("best_price", (BestPrice(last_updated=0, market_id=396),), "{}", 1, True, sub, 0)
    assert render("t", "s", best, 200, 20)[4].split()[:4] == ["-", "-", "-", "-"]
