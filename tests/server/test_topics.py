"""The five topics over a real server and real WebSocket clients, exact messages.

The clients are ``websocket-client`` (the library the original examples use). Timestamps come
from the server's injected clock, so every byte of every message is known in advance.
"""

from __future__ import annotations

import json
from typing import Any

import websocket

from tests.server.conftest import T0, ThreadedServer, limit_order, market_order
from tests.test_wire import check_message_types

A = "0x4d6dc68e391e86991e58ab4d548b7e92872430d1f51bc666fe0c206bad7ff770"  # the reference's
B = "0x" + "b" * 64
TS = str(T0 // 1000)  # "1739788459"


def connect(server: ThreadedServer) -> websocket.WebSocket:
    ws = websocket.create_connection(server.ws_url, timeout=5)
    return ws


def recv_all(ws: websocket.WebSocket, quiet: float = 0.3) -> list[str]:
    """Every message that arrives until the connection is quiet for ``quiet`` seconds."""
    frames = []
    ws.settimeout(quiet)
    try:
        while True:
            frames.append(ws.recv())
    except websocket.WebSocketTimeoutException:
        pass
    ws.settimeout(5)
    return frames


def by_topic(frames: list[str]) -> dict[str, str]:
    """Frames keyed by topic; a topic must not arrive twice in one step."""
    out: dict[str, str] = {}
    for frame in frames:
        topic = json.loads(frame)["message"]
        assert topic not in out, f"two {topic} messages for one change: {frames}"
        out[topic] = frame
    return out


def check_types(frame: str) -> None:
    """A protocol-v2 push: the envelope with its seq, and every row as the reference table says."""
    assert list(json.loads(frame)) == ["data", "message", "seq"]
    check_message_types(json.loads(frame)["message"], frame.encode())


def j(obj: Any) -> str:
    """Compact JSON as the server writes it."""
    return json.dumps(obj, separators=(",", ":"))


def subscribe_all(ws: websocket.WebSocket, address: str) -> None:
    for topic in ("positions", "trade_history", "open_orders", "order_history"):
        ws.send(json.dumps({"topic": topic, "address": address}))
    ws.send(json.dumps({"topic": "orderbook", "market_id": "396"}))


def test_scripted_sequence_gives_exact_messages(server: ThreadedServer) -> None:
    rest = server.rest
    rest.ok("/deposit", {"userAddress": A, "amount": 10_000_000})
    rest.ok("/deposit", {"userAddress": B, "amount": "10000000"})

    ws = connect(server)
    subscribe_all(ws, A)
    first = by_topic(recv_all(ws))
    assert first == {
        "positions": '{"data":[],"message":"positions","seq":0}',
        "trade_history": '{"data":[],"message":"trade_history","seq":0}',
        "open_orders": '{"data":[],"message":"open_orders","seq":0}',
        "order_history": '{"data":[],"message":"order_history","seq":0}',
        "orderbook": '{"data":[],"message":"orderbook","seq":0}',
    }

    # B rests a long bid: 1000 lots at 6050, 2x. Only the book changes for A's subscriptions.
    placed = rest.ok("/placeLimitOrder", limit_order(B, long=True, size=1000, price=6050))
    bid_id = (1 << 64) | 6050  # first order in market 396, resting bid at 6050 (reference §3)
    assert placed["order_id"] == str(bid_id)
    assert placed["status"] == "Open"
    step = by_topic(recv_all(ws))
    assert step == {
        "orderbook": j(
            {
                "data": [
                    {
                        "is_ask": False,
                        "last_updated": TS,
                        "market_id": "396",
                        "price": "6050",
                        "size": "1000",
                    }
                ],
                "message": "orderbook",
                "seq": 4,
            }
        ),
    }

    # A sells 1000 at market, 2x short: the original example's position.
    server.clock.now = T0 + 5_000
    ts = str((T0 + 5_000) // 1000)
    done = rest.ok("/placeMarketOrder", market_order(A, long=False, size="1000", market="396"))
    market_id = 2 << 64  # second order of the market; filled on arrival, so key 0
    short_trade = (2 << 64) | 396  # the second position slot of market 396
    assert done["order_id"] == str(market_id)
    assert done["fills"] == [{"price": "6050", "size": "1000", "fee": "3025", "pnl": "0"}]
    step = by_topic(recv_all(ws))
    assert set(step) == {"positions", "trade_history", "order_history", "orderbook"}
    assert step["positions"] == j(
        {
            "data": [
                {
                    "address": A,
                    "entry_price": "6050",
                    "is_long": False,
                    "last_updated": ts,
                    "leverage": 2,
                    "liq_price": "8853.658536585366",
                    "margin": "3025000",
                    "market_id": "396",
                    "size": "1000",
                    "sl": None,
                    "tp": None,
                    "trade_id": str(short_trade),
                    "value": "6050000",
                }
            ],
            "message": "positions",
            "seq": 6,
        }
    )
    assert step["trade_history"] == j(
        {
            "data": [
                {
                    "address": A,
                    "fee": "3025",
                    "last_updated": ts,
                    "market_id": "396",
                    "order_type": 2,
                    "pnl": "0",
                    "price": "6050",
                    "size": "1000",
                    "timestamp": ts,
                    "trade_id": str(short_trade),
                }
            ],
            "message": "trade_history",
            "seq": 6,
        }
    )
    assert step["order_history"] == j(
        {
            "data": [
                {
                    "address": A,
                    "is_market_order": True,
                    "last_updated": ts,
                    "leverage": 2,
                    "market_id": "396",
                    "order_id": str(market_id),
                    "order_type": 2,
                    "order_value": "6050000",
                    "price": "6050",
                    "size": "1000",
                    "status": "Filled",
                    "timestamp": ts,
                    "trade_id": str(short_trade),
                }
            ],
            "message": "order_history",
            "seq": 6,
        }
    )
    assert step["orderbook"] == '{"data":[],"message":"orderbook","seq":6}'

    # A rests an ask increasing the short: 500 at 6100.
    server.clock.now = T0 + 9_000
    ts2 = str((T0 + 9_000) // 1000)
    placed = rest.ok("/placeLimitOrder", limit_order(A, long=False, size=500, price=6100))
    ask_id = (3 << 64) | 6100 | (1 << 32)
    assert placed["order_id"] == str(ask_id)
    open_row = {
        "address": A,
        "last_updated": ts2,
        "leverage": 2,
        "market_id": "396",
        "order_id": str(ask_id),
        "order_type": 4,
        "order_value": "3050000",
        "price": "6100",
        "remaining_size": "500",
        "timestamp": ts2,
        "total_size": "500",
        "trade_id": str(short_trade),
    }
    history_row = {
        "address": A,
        "is_market_order": False,
        "last_updated": ts2,
        "leverage": 2,
        "market_id": "396",
        "order_id": str(ask_id),
        "order_type": 4,
        "order_value": "3050000",
        "price": "6100",
        "size": "500",
        "status": "Open",
        "timestamp": ts2,
        "trade_id": str(short_trade),
    }
    older = json.loads(step["order_history"])["data"][0]
    step = by_topic(recv_all(ws))
    assert step == {
        "open_orders": j({"data": [open_row], "message": "open_orders", "seq": 8}),
        "order_history": j({"data": [history_row, older], "message": "order_history", "seq": 7}),
        "orderbook": j(
            {
                "data": [
                    {
                        "is_ask": True,
                        "last_updated": ts2,
                        "market_id": "396",
                        "price": "6100",
                        "size": "500",
                    }
                ],
                "message": "orderbook",
                "seq": 8,
            }
        ),
    }  # no positions push: a resting order does not change the position row

    # A cancels it.
    server.clock.now = T0 + 12_000
    ts3 = str((T0 + 12_000) // 1000)
    rest.ok(
        "/cancelMultipleOrders",
        {
            "userAddress": A,
            "marketId": 396,
            "cancelOrderIds": [str(ask_id)],
        },
    )
    step = by_topic(recv_all(ws))
    cancelled = dict(history_row, status="Cancelled", last_updated=ts3)
    assert step["open_orders"] == '{"data":[],"message":"open_orders","seq":9}'
    assert step["order_history"] == j(
        {"data": [cancelled, older], "message": "order_history", "seq": 9}
    )
    assert step["orderbook"] == '{"data":[],"message":"orderbook","seq":9}'
    for frame in step.values():
        check_types(frame)

    # REST reads return the same rows as the streams.
    status, reply = rest.get(f"/getOrderHistory?userAddress={A}")
    assert status == 200 and reply["data"] == [cancelled, older]
    status, reply = rest.get(f"/getPositions?userAddress={A.upper().replace('0X', '0x')}")
    assert (
        reply["data"]
        == json.loads(server.call(lambda: server.server.venue.projections.message("positions", A)))[
            "data"
        ]
    )
    ws.close()


def test_original_positions_example_over_the_wire(server: ThreadedServer) -> None:
    """Reference §2: the example message, byte for byte except the position counter."""
    rest = server.rest
    rest.ok("/deposit", {"userAddress": A, "amount": 10_000_000})
    rest.ok("/deposit", {"userAddress": B, "amount": 10_000_000})
    rest.ok("/placeLimitOrder", limit_order(B, long=True, size=1000, price=6050))
    rest.ok("/placeMarketOrder", market_order(A, long=False, size=1000))
    ws = connect(server)
    ws.send(json.dumps({"topic": "positions", "address": A}))
    got = ws.recv()
    original = (
        '{"data":[{"address":"0x4d6dc68e391e86991e58ab4d548b7e92872430d1f51bc666fe0c206bad7ff770",'
        '"entry_price":"6050","is_long":false,"last_updated":"1739788459","leverage":2,'
        '"liq_price":"8853.658536585366","margin":"3025000","market_id":"396","size":"1000",'
        '"sl":null,"tp":null,"trade_id":"16509835945970048696716","value":"6050000"}],'
        '"message":"positions"}'
    )
    # The venue's counter was at 895; ours starts at 1 (this is the 2nd position of market 396).
    # Protocol v2 appends the seq of the fill (deposits 1-2, bid 3-4, market order 5, fill 6).
    expected = original.replace("16509835945970048696716", str((2 << 64) | 396))
    assert got == expected[:-1] + ',"seq":6}'

    ws.close()


def test_subscriptions_share_connections_and_keys(server: ThreadedServer) -> None:
    rest = server.rest
    rest.ok("/deposit", {"userAddress": B, "amount": 10_000_000})
    one, two = connect(server), connect(server)
    for ws in (one, two):
        ws.send(json.dumps({"topic": "orderbook", "market_id": 396}))
        assert json.loads(ws.recv())["message"] == "orderbook"
        # Twice is harmless: answered with the current state again, no second stream.
        ws.send(json.dumps({"topic": "orderbook", "market_id": "396"}))
        assert json.loads(ws.recv())["message"] == "orderbook"
        ws.send(json.dumps({"topic": "open_orders", "address": "0x" + "B" * 64}))
        assert [json.loads(f)["message"] for f in recv_all(ws)] == ["open_orders"]
    assert server.call(lambda: server.server.venue.hub.subscription_count) == 4
    rest.ok("/placeLimitOrder", limit_order(B, long=True, size=700, price=6000, leverage=3))
    for ws in (one, two):
        step = by_topic(recv_all(ws))  # one message per stream, not two
        assert set(step) == {"orderbook", "open_orders"}
        assert json.loads(step["open_orders"])["data"][0]["remaining_size"] == "700"
        ws.close()
    assert server.call(lambda: server.server.venue.hub.subscription_count) == 0
