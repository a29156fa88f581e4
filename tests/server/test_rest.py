"""The REST trading calls over a real server: every write, its effect and its errors."""

from __future__ import annotations

import time
from pathlib import Path

from tests.server.conftest import (
    ThreadedServer,
    limit_order,
    market_order,
    metrics_value,
    start_threaded,
)

A = "0x" + "a1" * 32
B = "0x" + "b2" * 32


def test_position_lifecycle_through_every_write(server: ThreadedServer) -> None:
    rest = server.rest
    assert rest.ok("/deposit", {"userAddress": A, "amount": "20000000"})["collateral"] == (
        "20000000"
    )
    rest.ok("/deposit", {"userAddress": B, "amount": 20_000_000})
    assert rest.ok("/withdraw", {"userAddress": B, "amount": 1})["collateral"] == "19999999"
    # B bids 2000 at 6000; A sells 1000 at market, 2x: A is short 1000 at 6000.
    rest.ok("/placeLimitOrder", limit_order(B, long=True, size=2000, price=6000))
    done = rest.ok("/placeMarketOrder", market_order(A, long=False, size=1000))
    assert done["status"] == "Filled" and done["order_type"] == 2
    rest.ok("/setMarkPrice", {"marketId": 396, "price": 6000})

    rest.ok(
        "/updateTakeProfit", {"userAddress": A, "marketId": 396, "tradeSide": False, "price": 5500}
    )
    rest.ok(
        "/updateStopLoss", {"userAddress": A, "marketId": 396, "tradeSide": False, "price": "6200"}
    )
    (short,) = rest.get(f"/getPositions?userAddress={A}")[1]["data"]
    assert (short["tp"], short["sl"], short["margin"]) == ("5500", "6200", "3000000")
    # Short 2x at 6000: liq = 6000 * 1.5 / 1.025 = 8780.48...; 300000 more margin moves it by
    # 6000 * (300000 / 6000000) / 1.025 = 292.68... up.
    assert short["liq_price"].startswith("8780.48")
    rest.ok(
        "/addMargin", {"userAddress": A, "marketId": 396, "tradeSide": False, "amount": 300_000}
    )
    (short,) = rest.get(f"/getPositions?userAddress={A}")[1]["data"]
    assert short["margin"] == "3300000"
    assert short["liq_price"].startswith("9073.17")

    # An ask for the stop to fill against, then the mark reaches the stop-loss price.
    rest.ok("/placeLimitOrder", limit_order(B, long=False, size=1000, price=6210))
    rest.ok("/setMarkPrice", {"marketId": 396, "price": 6200})
    assert rest.get(f"/getPositions?userAddress={A}")[1]["data"] == []
    newest = rest.get(f"/getTradeHistory?userAddress={A}")[1]["data"][0]
    assert (newest["order_type"], newest["price"], newest["size"]) == (10, "6210", "1000")
    # Bought back 1000 at 6210 after selling at 6000: pnl -210000.
    assert newest["pnl"] == "-210000"
    price = rest.get("/getMarketPrice?marketId=396")[1]["data"]
    assert (price["best_bid_price"], price["best_ask_price"], price["mark_price"]) == (
        "6000",
        None,
        "6200",
    )


def test_write_errors_are_clear_and_change_nothing(server: ThreadedServer) -> None:
    rest = server.rest
    rest.ok("/deposit", {"userAddress": A, "amount": 1_000_000})
    before = rest.get("/health")[1]["data"]["seq"]
    cases = [
        ("/deposit", {"userAddress": A}, 400, "invalid_request", 'missing field "amount"'),
        ("/deposit", {"userAddress": A, "amount": 1.5}, 400, "invalid_request", "integer"),
        ("/deposit", {"userAddress": "nope", "amount": 1}, 400, "invalid_address", "0x"),
        (
            "/withdraw",
            {"userAddress": A, "amount": 2_000_000},
            400,
            "insufficient_collateral",
            "only 1000000",
        ),
        (
            "/placeLimitOrder",
            limit_order(A, long="maybe", size=500, price=6000),
            400,
            "invalid_request",
            "tradeSide",
        ),
        (
            "/placeLimitOrder",
            limit_order(A, long=True, size=500, price=6000, market=999),
            400,
            "unknown_market",
            "999",
        ),
        (
            "/placeLimitOrder",
            limit_order(A, long=True, size=10, price=600_005, market=397),
            400,
            "invalid_price",
            "tick",
        ),
        (
            "/placeMarketOrder",
            market_order(A, long=True, size=500),
            400,
            "insufficient_liquidity",
            "liquidity",
        ),
        (
            "/updateStopLoss",
            {"userAddress": A, "marketId": 396, "tradeSide": True, "price": 5000},
            400,
            "no_position",
            "no long position",
        ),
        (
            "/cancelMultipleOrders",
            {"userAddress": A, "marketId": 396, "cancelOrderIds": []},
            400,
            "invalid_request",
            "non-empty list",
        ),
    ]
    for path, body, status, code, needle in cases:
        got_status, reply = rest.post(path, body)
        assert (got_status, reply["success"], reply["code"]) == (status, False, code), path
        assert needle in reply["message"], (path, reply["message"])
    status, reply = rest.post("/deposit", None, raw=b"{not json")
    assert (status, reply["code"]) == (400, "invalid_json")
    status, reply = rest.post("/deposit", {"userAddress": A, "amount": 1}, key="wrong")
    assert (status, reply["code"]) == (401, "unauthorized")
    status, reply = rest.get("/nowhere")
    assert (status, reply["code"]) == (404, "not_found")
    assert rest.get("/health")[1]["data"]["seq"] == before  # nothing changed


def test_the_store_is_checkpointed_in_the_background(tmp_path: Path) -> None:
    running, stop = start_threaded(tmp_path, checkpoint_every=0.02)
    try:
        running.rest.ok("/deposit", {"userAddress": A, "amount": 1_000})
        deadline = time.monotonic() + 10
        while metrics_value(running, "store_checkpoints_total") < 2:
            assert time.monotonic() < deadline, "no background checkpoint in 10 s"
            time.sleep(0.02)
        # The deposit's commit is in the WAL until a restart: a page or a few, far below the
        # bound.
        assert 0 < metrics_value(running, "store_wal_frames") < 64
    finally:
        stop()
    (tmp_path / "off").mkdir()
    off, stop = start_threaded(tmp_path / "off", checkpoint_every=0)
    try:
        off.rest.ok("/deposit", {"userAddress": A, "amount": 1_000})
        assert metrics_value(off, "store_checkpoints_total") == 0
        assert metrics_value(off, "store_wal_frames") == 0  # no checkpointer, no reading
    finally:
        stop()
