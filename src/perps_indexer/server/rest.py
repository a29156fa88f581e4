"""The REST API: the venue's read and trading calls (reference §6), as aiohttp handlers.

Responses are ``{"success": true, "message": ..., "data": ...}``; errors are HTTP 4xx with
``{"success": false, "message": <sentence>, "code": <stable code>}``. Integers may be sent as
JSON numbers or decimal strings; ids and money are returned as strings.
"""

from __future__ import annotations

import asyncio
import hmac
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import msgspec
from aiohttp import web

from perps_indexer import commands
from perps_indexer.errors import CommandRejected, InvalidAddress, PerpsIndexerError
from perps_indexer.markets import MarketSpec
from perps_indexer.session import RequestError, parse_market_id
from perps_indexer.units import normalize_address
from perps_indexer.venue import Venue, VenueHalted

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Parser = Callable[[dict[str, Any]], commands.AnyCommand]
Query = Mapping[str, str]
Answer = tuple[int, bytes]
"""An HTTP status and a JSON body."""
Read = Callable[[Query], Answer]

_encoder = msgspec.json.Encoder()
_INT = re.compile(r"-?\d{1,40}")


class BadRequest(PerpsIndexerError):
    """A REST request is malformed (missing field, wrong type); ``code`` as on the WebSocket."""

    code = "invalid_request"
    status = 400

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class Unauthorized(BadRequest):
    """A write without the server's API key."""

    code = "unauthorized"
    status = 401


def ok_body(message: str, data: Any) -> bytes:
    return _encoder.encode({"success": True, "message": message, "data": data})


def fail_body(code: str, message: str) -> bytes:
    return _encoder.encode({"success": False, "message": message, "code": code})


def answer(message: str, data: Any) -> Answer:
    return 200, ok_body(message, data)


def json_response(body: bytes, status: int = 200) -> web.Response:
    return web.Response(status=status, body=body, content_type="application/json")


def ok(message: str, data: Any) -> web.Response:
    return json_response(ok_body(message, data))


def fail(status: int, code: str, message: str) -> web.Response:
    return json_response(fail_body(code, message), status)


REFUSED = (BadRequest, CommandRejected, VenueHalted)
"""What a request can be refused with (an answer, not a failure of the server)."""


def refusal(exc: BadRequest | CommandRejected | VenueHalted) -> Answer:
    """The HTTP status and JSON body that refuse a request with ``exc``."""
    if isinstance(exc, BadRequest):
        status = exc.status
    else:
        status = 503 if isinstance(exc, VenueHalted) else 400
    return status, fail_body(exc.code, exc.message)


def field_int(body: Mapping[str, Any], name: str, *, optional: bool = False) -> Any:
    """An integer given as a JSON number or a decimal string (None if optional and absent)."""
    value = body.get(name)
    if value is None:
        if optional:
            return None
        raise BadRequest(f'missing field "{name}"')
    if type(value) is int:
        return value
    if isinstance(value, str) and _INT.fullmatch(value.strip()):
        return int(value.strip())
    raise BadRequest(
        f'field "{name}" must be an integer (a JSON number or a decimal string), got {value!r}'
    )


def field_bool(body: Mapping[str, Any], name: str, meaning: str) -> bool:
    value = body.get(name)
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if value is None:
        raise BadRequest(f'missing field "{name}" ({meaning})')
    raise BadRequest(f'field "{name}" must be true or false ({meaning}), got {value!r}')


def field_address(source: Mapping[str, Any], name: str = "userAddress") -> str:
    value = source.get(name)
    if value is None:
        raise BadRequest(f'missing field "{name}"')
    try:
        return normalize_address(value)
    except InvalidAddress as exc:
        raise BadRequest(f'field "{name}": {exc}', exc.code) from None


def field_market(source: Mapping[str, Any], markets: Mapping[int, MarketSpec]) -> int:
    try:
        return parse_market_id(source.get("marketId"), markets, "marketId")
    except RequestError as exc:
        raise BadRequest(exc.text, exc.code) from None


TRADE_SIDE = "tradeSide: true for long, false for short"
DIRECTION = "direction: false to open or increase, true to decrease or close"


def market_info(spec: MarketSpec) -> dict[str, Any]:
    return {
        "market_id": str(spec.market_id),
        "base_name": spec.base_name,
        "quote_name": spec.quote_name,
        "base_decimals": spec.base_decimals,
        "quote_decimals": spec.quote_decimals,
        "price_decimals": spec.price_decimals,
        "lot_size": str(spec.lot_size),
        "tick_size": str(spec.tick_size),
        "min_lots": str(spec.min_lots),
        "max_lots": str(spec.max_lots),
        "max_leverage": str(spec.max_leverage),
        "maintenance_margin": str(spec.maintenance_margin_bps),
        "taker_fee": str(spec.taker_fee_bps),
        "maker_fee": str(spec.maker_fee_bps),
    }


class RestApi:
    """Handlers bound to one venue."""

    def __init__(self, venue: Venue, api_key: str | None) -> None:
        """``api_key`` None serves the reads only (no write endpoints)."""
        self.venue = venue
        self.markets = venue.markets
        self.api_key = api_key.encode() if api_key is not None else None
        self.reads: dict[str, Read] = {
            "/getMarketInfo": self.get_market_info,
            "/getPositions": self.get_positions,
            "/getOpenOrders": self.get_open_orders,
            "/getOrderHistory": self._history("order history", self.venue.order_history),
            "/getTradeHistory": self._history("trade history", self.venue.trade_history),
            "/getOrderBook": self.get_order_book,
            "/getMarketPrice": self.get_market_price,
            "/getAllTrades": self.get_all_trades,
            "/getOrderStatusById": self.get_order_status,
            "/getDepositAndWithdrawHistory": self._history(
                "deposit and withdraw history", self.venue.deposit_withdraw_history
            ),
            "/getFundingHistory": self._history("funding history", self.venue.funding_history),
            "/getFundingRate": self.get_funding_rate,
        }
        """The read endpoints (GET, open to all): path -> the read of its query."""
        self.writes: dict[str, Parser] = {
            "/deposit": self.cmd_deposit,
            "/withdraw": self.cmd_withdraw,
            "/placeLimitOrder": self.cmd_limit,
            "/placeMarketOrder": self.cmd_market,
            "/cancelMultipleOrders": self.cmd_cancel,
            "/updateTakeProfit": self.cmd_take_profit,
            "/updateStopLoss": self.cmd_stop_loss,
            "/addMargin": self.cmd_add_margin,
            "/setMarkPrice": self.cmd_mark,
            "/setIndexPrice": self.cmd_index,
            "/settleFunding": self.cmd_settle_funding,
        }
        """The write endpoints (POST, with the API key): path -> the body's parser."""

    def routes(self) -> list[web.RouteDef]:
        routes = [web.get(path, self._read(read)) for path, read in self.reads.items()]
        # CORS: a browser page on another origin may read; writes get no CORS headers, so
        # browsers refuse cross-origin writes (their preflight finds no OPTIONS route).
        routes += [web.options(path, preflight) for path in self.reads]
        if self.api_key is not None:
            routes += [web.post(path, self._write(parse)) for path, parse in self.writes.items()]
        return routes

    # -- reads

    @staticmethod
    def _read(read: Read) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            status, body = read(request.query)
            return json_response(body, status)

        return handler

    def get_market_info(self, query: Query) -> Answer:
        if "marketId" in query:
            spec = self.markets[field_market(query, self.markets)]
            return answer("market info", [market_info(spec)])
        return answer("market info", [market_info(s) for s in self.markets.values()])

    def get_positions(self, query: Query) -> Answer:
        address = field_address(query)
        return answer("positions", self.venue.projections.positions(address))

    def get_open_orders(self, query: Query) -> Answer:
        address = field_address(query)
        return answer("open orders", self.venue.projections.open_orders(address))

    @staticmethod
    def _limit(query: Query) -> int | None:
        limit = field_int(query, "limit", optional=True)
        if limit is not None and limit <= 0:
            raise BadRequest('field "limit" must be positive')
        return limit  # type: ignore[no-any-return]

    def _history(self, message: str, read: Callable[[str, int | None], Sequence[Any]]) -> Read:
        """A read of an address's history: ``userAddress`` and an optional ``limit`` (any
        depth: beyond the in-memory window it comes from the store)."""

        def history(query: Query) -> Answer:
            return answer(message, read(field_address(query), self._limit(query)))

        return history

    def get_order_book(self, query: Query) -> Answer:
        market = field_market(query, self.markets)
        return answer("order book", self.venue.projections.orderbook(market))

    def get_market_price(self, query: Query) -> Answer:
        market = field_market(query, self.markets)
        rows = self.venue.projections.orderbook(market)
        ask = next((r for r in rows if r.is_ask), None)
        bid = next((r for r in rows if not r.is_ask), None)
        mark = self.venue.engine.marks.get(market)
        return answer(
            "market price",
            {
                "market_id": str(market),
                "best_bid_price": bid.price if bid else None,
                "best_bid_size": bid.size if bid else None,
                "best_ask_price": ask.price if ask else None,
                "best_ask_size": ask.size if ask else None,
                "mark_price": str(mark) if mark is not None else None,
            },
        )

    def get_all_trades(self, query: Query) -> Answer:
        market = field_market(query, self.markets)
        return answer("all trades", self.venue.recent_trades(market, self._limit(query)))

    def get_order_status(self, query: Query) -> Answer:
        market = field_market(query, self.markets)
        order_id = field_int(query, "orderId")
        row = self.venue.order_status(market, order_id) if order_id >= 0 else None
        if row is None:
            return 404, fail_body("unknown_order", f"market {market} has no order {order_id}")
        return answer("order status", row)

    def get_funding_rate(self, query: Query) -> Answer:
        market = field_market(query, self.markets)
        rows = self.venue.projections.live_funding_rate(market)
        return answer("funding rate", rows[0] if rows else None)

    # -- writes

    def _write(self, parse: Parser) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            # aiohttp keeps undecodable header bytes as surrogates: encode them back, not fail.
            given = request.headers.get("x-api-key", "").encode("utf-8", "surrogateescape")
            future, reply = self.submit(parse, given, await request.read())
            return json_response(reply(await future))  # acknowledged once durable

        return handler

    def submit(
        self, parse: Parser, given: bytes, raw: bytes
    ) -> tuple[asyncio.Future[commands.Outcome], Callable[[commands.Outcome], bytes]]:
        """Run the write ``raw`` asks for, with API key ``given``: the future that resolves
        once it is durable, and the maker of its reply's body (:meth:`_reply`). Raises what
        :data:`REFUSED` names, having changed nothing, if the write is refused."""
        self._authorize(given)
        command = self._command(parse, raw)
        future = self.venue.submit(command)
        return future, self._reply(command)  # now: the state this command left

    def _authorize(self, given: bytes) -> None:
        """Raise :class:`Unauthorized` unless ``given`` is the API key (compared in constant
        time)."""
        assert self.api_key is not None
        if not hmac.compare_digest(given, self.api_key):
            raise Unauthorized("writes need the header x-api-key with the server's API key")

    @staticmethod
    def _command(parse: Parser, raw: bytes) -> commands.AnyCommand:
        """The command a write's body asks for; :class:`BadRequest` if it is not one."""
        try:
            body = msgspec.json.decode(raw) if raw else None
        except msgspec.DecodeError as exc:
            raise BadRequest(
                f"the request body is not valid JSON ({exc})", "invalid_json"
            ) from None
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        return parse(body)

    def _reply(self, command: commands.AnyCommand) -> Callable[[commands.Outcome], bytes]:
        """The body of a write's reply, made once the command is durable from the state it
        left, read here: right after :meth:`Venue.submit` (as :meth:`submit` does). Read
        later, the engine may already hold the commands submitted after it (the same group
        commit, or pipelined on the same connection), and the reply would tell of them."""
        seq = self.venue.engine.seq
        address = getattr(command, "address", None)  # normalized by field_address
        collateral = None
        if address is not None:
            collateral = str(self.venue.engine.collateral.get(address, 0))
        done = _done(command)

        def body(outcome: commands.Outcome) -> bytes:
            return ok_body(done, _result(outcome, seq, collateral))

        return body

    def cmd_deposit(self, body: dict[str, Any]) -> commands.AnyCommand:
        return commands.Deposit(address=field_address(body), amount=field_int(body, "amount"))

    def cmd_withdraw(self, body: dict[str, Any]) -> commands.AnyCommand:
        return commands.Withdraw(address=field_address(body), amount=field_int(body, "amount"))

    def _order_fields(self, body: dict[str, Any]) -> dict[str, Any]:
        """The fields limit and market orders share."""
        return {
            "address": field_address(body),
            "market_id": field_market(body, self.markets),
            "is_long": field_bool(body, "tradeSide", TRADE_SIDE),
            "is_close": field_bool(body, "direction", DIRECTION),
            "size": field_int(body, "size"),
            "leverage": field_int(body, "leverage"),
            "take_profit": field_int(body, "takeProfit", optional=True),
            "stop_loss": field_int(body, "stopLoss", optional=True),
        }

    def cmd_limit(self, body: dict[str, Any]) -> commands.AnyCommand:
        return commands.PlaceLimitOrder(
            **self._order_fields(body),
            price=field_int(body, "price"),
            restriction=field_int(body, "restriction", optional=True) or 0,
        )

    def cmd_market(self, body: dict[str, Any]) -> commands.AnyCommand:
        return commands.PlaceMarketOrder(**self._order_fields(body))

    def cmd_cancel(self, body: dict[str, Any]) -> commands.AnyCommand:
        ids = body.get("cancelOrderIds")
        if not isinstance(ids, list) or not ids:
            raise BadRequest('field "cancelOrderIds" must be a non-empty list of order ids')
        order_ids = tuple(field_int({"id": i}, "id") for i in ids)
        return commands.CancelOrders(
            address=field_address(body),
            market_id=field_market(body, self.markets),
            order_ids=order_ids,
        )

    def cmd_take_profit(self, body: dict[str, Any]) -> commands.AnyCommand:
        return self._trigger(commands.UpdateTakeProfit, body)

    def cmd_stop_loss(self, body: dict[str, Any]) -> commands.AnyCommand:
        return self._trigger(commands.UpdateStopLoss, body)

    def _trigger(
        self,
        kind: type[commands.UpdateTakeProfit] | type[commands.UpdateStopLoss],
        body: dict[str, Any],
    ) -> commands.AnyCommand:
        """A take-profit or stop-loss update: the same fields, ``price`` null to clear."""
        return kind(
            address=field_address(body),
            market_id=field_market(body, self.markets),
            is_long=field_bool(body, "tradeSide", TRADE_SIDE),
            price=field_int(body, "price", optional=True),
        )

    def cmd_add_margin(self, body: dict[str, Any]) -> commands.AnyCommand:
        return commands.AddMargin(
            address=field_address(body),
            market_id=field_market(body, self.markets),
            is_long=field_bool(body, "tradeSide", TRADE_SIDE),
            amount=field_int(body, "amount"),
        )

    def cmd_mark(self, body: dict[str, Any]) -> commands.AnyCommand:
        return commands.SetMarkPrice(
            market_id=field_market(body, self.markets), price=field_int(body, "price")
        )

    def cmd_index(self, body: dict[str, Any]) -> commands.AnyCommand:
        return commands.SetIndexPrice(
            market_id=field_market(body, self.markets), price=field_int(body, "price")
        )

    def cmd_settle_funding(self, body: dict[str, Any]) -> commands.AnyCommand:
        """Settles the market's funding if it is due; otherwise accepted with no events."""
        return commands.SettleFunding(market_id=field_market(body, self.markets))


def _result(outcome: commands.Outcome, seq: int, collateral: str | None) -> Any:
    if outcome.order is not None:
        order = outcome.order.order
        return {
            "order_id": str(order.order_id),
            "status": order.status,
            "order_type": order.order_type,
            "trade_id": str(order.trade_id),
            "size": str(order.size),
            "remaining_size": str(order.remaining),
            "fills": [
                {"price": str(f.price), "size": str(f.size), "fee": str(f.fee), "pnl": str(f.pnl)}
                for f in outcome.order.fills
            ],
            "seq": seq,
        }
    data: dict[str, Any] = {"seq": seq}
    if collateral is not None:
        data["collateral"] = collateral
    return data


CORS_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET, OPTIONS",
    "Access-Control-Max-Age": "86400",
}


async def preflight(request: web.Request) -> web.Response:
    return web.Response(status=204, headers=CORS_HEADERS)


@web.middleware
async def cors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Reads (GET) are open to every origin, as on the venue."""
    response = await handler(request)
    if request.method == "GET" and request.path != "/ws":
        response.headers["Access-Control-Allow-Origin"] = "*"
    return response


def _done(command: commands.AnyCommand) -> str:
    return type(command).__name__ + " accepted"


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error as the JSON envelope, with a stable code."""
    try:
        return await handler(request)
    except REFUSED as exc:
        status, body = refusal(exc)
        return json_response(body, status)
    except web.HTTPRequestEntityTooLarge:
        return fail(413, "body_too_large", "the request body is larger than the server accepts")
    except web.HTTPNotFound:
        return fail(404, "not_found", f"no such endpoint: {request.method} {request.path}")
    except web.HTTPMethodNotAllowed as exc:
        return fail(
            405,
            "method_not_allowed",
            f"{request.method} is not allowed on {request.path}; use "
            f"{', '.join(sorted(exc.allowed_methods))}",
        )
