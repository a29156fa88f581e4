"""The sans-I/O protocol core: requests, acks, unsubscribe, ids, seq, limits, keepalive, outbox.

No event loop and no socket: a :class:`Session` is fed frames with an explicit ``now`` and asked
what it would send. The message source is a small in-memory stand-in for the venue (the
injected dependency of the core), so every byte a session queues is known in advance.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from perps_indexer.session import (
    ALL_TOPICS,
    CLOSE_KEEPALIVE_TIMEOUT,
    CLOSE_POLICY_VIOLATION,
    CLOSE_TRY_AGAIN_LATER,
    MARKET_TOPICS,
    MAX_ID_LENGTH,
    Hub,
    Key,
    Limits,
    Request,
    RequestError,
    Session,
    SliceSizer,
    _with_id,
    error_message,
    parse_request,
)
from tests.sinks import ByteSink, framed, framed_header, unframe

A = "0x" + "a" * 64
B = "0x" + "b" * 64
MARKETS = frozenset({396, 397})
CODES = {
    "invalid_json",
    "invalid_request",
    "invalid_op",
    "unknown_topic",
    "invalid_since",
    "unknown_market",
    "invalid_address",
    "invalid_id",
}


def data(topic: str, rows: list[Any], seq: int) -> bytes:
    """A data message as the projections encode it."""
    return msgspec.json.encode({"data": rows, "message": topic, "seq": seq})


class Source:
    """Current state per stream, and resume answers, as the venue would give them."""

    def __init__(self) -> None:
        self.state: dict[tuple[str, Key], bytes] = {}
        self.oldest = 0
        self.resumed: list[tuple[str, Key, int]] = []

    def message(self, topic: str, key: Key) -> bytes:
        return self.state.get((topic, key), data(topic, [], 0))

    def resume(self, topic: str, key: Key, since: int) -> bytes:
        if since < self.oldest:
            raise RequestError("since_too_old", f"since {since} is older than seq {self.oldest}")
        self.resumed.append((topic, key, since))
        return data(topic, [{"resumed_after": since}], since + 1)


class World:
    """A hub, a source and sessions on them."""

    def __init__(self, **limits: Any) -> None:
        self.hub = Hub()
        self.source = Source()
        self.limits = Limits(**limits)

    def session(self, now: float = 0.0) -> Session:
        session = Session(self.hub, self.source, MARKETS, now=now, limits=self.limits)
        self.hub.connect(session)
        return session

    def publish(self, topic: str, key: Key, rows: list[Any], seq: int) -> bytes:
        message = self.source.state[(topic, key)] = data(topic, rows, seq)
        self.hub.publish((topic, key), message)
        return message


def send(session: Session, request: dict[str, Any], now: float = 0.0) -> None:
    session.receive_text(json.dumps(request), now)


def replies(session: Session) -> list[dict[str, Any]]:
    return [json.loads(frame) for frame in session.take()]


def check_consistent(session: Session, hub: Hub) -> None:
    """The session's view and the hub's agree; the outbox accounting is exact."""
    for stream in session.subscriptions:
        assert session in hub.streams[stream]
    for stream, watchers in hub.streams.items():
        assert watchers, stream
        if session in watchers:
            assert stream in session.subscriptions
    assert session.outbox_bytes == sum(len(f) for f in session.outbox.values())
    assert len(session.subscriptions) <= session.limits.max_subscriptions
    for frame in session.outbox.values():
        assert isinstance(json.loads(frame), dict)


# ---------------------------------------------------------------------------- parse_request


SUB, UNSUB, HIST, BOOK = "subscribe", "unsubscribe", "trade_history", "orderbook"
X128 = "x" * MAX_ID_LENGTH


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"topic": "positions", "address": A}, (SUB, "positions", A)),
        ({"topic": HIST, "address": "0xA"}, (SUB, HIST, "0x" + "0" * 63 + "a")),
        ({"topic": "open_orders", "address": "0x" + "A" * 64}, (SUB, "open_orders", A)),
        ({"topic": "order_history", "address": f" {A} "}, (SUB, "order_history", A)),
        ({"topic": BOOK, "market_id": "396"}, (SUB, BOOK, 396)),
        ({"topic": BOOK, "market_id": 397}, (SUB, BOOK, 397)),
        ({"topic": BOOK, "market_id": " 396 "}, (SUB, BOOK, 396)),
        ({"op": SUB, "topic": "positions", "address": A}, (SUB, "positions", A)),
        ({"op": UNSUB, "topic": "positions", "address": A}, (UNSUB, "positions", A)),
        ({"topic": "positions", "address": A, "id": 7}, (SUB, "positions", A, 7)),
        ({"topic": "positions", "address": A, "id": -7}, (SUB, "positions", A, -7)),
        ({"topic": "positions", "address": A, "id": X128}, (SUB, "positions", A, X128)),
        ({"topic": HIST, "address": A, "since": 0}, (SUB, HIST, A, None, 0)),
        ({"topic": BOOK, "market_id": 396, "id": "r", "since": 12}, (SUB, BOOK, 396, "r", 12)),
        # Unknown fields are ignored, as the original server does; the other kind of key too.
        ({"topic": "positions", "address": A, "market_id": "x", "x": [1]}, (SUB, "positions", A)),
        ({"topic": BOOK, "market_id": 396, "address": 5}, (SUB, BOOK, 396)),
        ({"topic": "positions", "address": A, "since": None}, (SUB, "positions", A)),
    ],
)
def test_parse_accepts(fields: dict[str, Any], expected: tuple[Any, ...]) -> None:
    assert parse_request(json.dumps(fields), MARKETS) == Request(*expected)
    assert parse_request(json.dumps(fields).encode(), MARKETS) == Request(*expected)


def positions(**extra: Any) -> str:
    """A positions request for 0x1 with ``extra`` fields, as JSON text."""
    return json.dumps({"topic": "positions", "address": "0x1", **extra})


def book(market_id: Any, **extra: Any) -> str:
    return json.dumps({"topic": BOOK, "market_id": market_id, **extra})


@pytest.mark.parametrize(
    ("frame", "code", "needle", "request_id"),
    [
        ("nope", "invalid_json", "not valid JSON", None),
        (b"\xff\xfe{}", "invalid_json", "not valid JSON", None),
        ("[" * 5000, "invalid_json", "", None),  # truncated: a JSON error
        ("[" * 5000 + "]" * 5000, "invalid_json", "nested too deeply", None),
        ('{"topic": "positions", "address": "\ud800"}', "invalid_json", "UTF-8", None),
        ("1e999", "invalid_json", "not valid JSON", None),
        ('{"id": ' + "9" * 5000 + "}", "invalid_json", "not valid JSON", None),
        ("[]", "invalid_request", "must be a JSON object", None),
        ('"positions"', "invalid_request", "must be a JSON object", None),
        ("null", "invalid_request", "must be a JSON object", None),
        ("{}", "invalid_request", 'no "topic"', None),
        ('{"id": 3}', "invalid_request", 'no "topic"', 3),
        ('{"topic": null, "id": "a"}', "invalid_request", 'no "topic"', "a"),
        (positions(op="watch", id=1), "invalid_op", "unknown op 'watch'", 1),
        (positions(op=None), "invalid_op", "unknown op None", None),
        (positions(op=1), "invalid_op", "unknown op 1", None),
        ('{"topic": "fills", "id": 2}', "unknown_topic", "unknown topic 'fills'", 2),
        ('{"topic": ["positions"]}', "unknown_topic", "unknown topic ['positions']", None),
        ('{"topic": "Positions"}', "unknown_topic", "topics are positions, trade_history", None),
        (positions(since=-1, id=4), "invalid_since", "non-negative", 4),
        (positions(since=1.5), "invalid_since", "1.5", None),
        (positions(since="3"), "invalid_since", "'3'", None),
        (positions(since=True), "invalid_since", "True", None),
        ('{"topic": "orderbook", "id": 5}', "unknown_market", 'needs a "market_id"', 5),
        (book("999"), "unknown_market", "markets are 396, 397", None),
        (book(39.6), "unknown_market", "39.6", None),
        (book(True), "unknown_market", "True", None),
        (book("-396"), "unknown_market", "'-396'", None),
        (book("\u00b2"), "unknown_market", "unknown market_id", None),  # isdigit, not int
        (book("\u0663\u0669\u0666"), "unknown_market", "unknown", None),  # Arabic-Indic 396
        (book("1" * 5000), "unknown_market", "unknown", None),  # past int's digit limit
        ('{"topic": "positions", "id": 6}', "invalid_address", 'needs an "address"', 6),
        (positions(address=None), "invalid_address", "must be a string", None),
        (positions(address="0xZZ"), "invalid_address", "not hex digits", None),
        (positions(address="0x"), "invalid_address", "no hex digits", None),
        (positions(address=12), "invalid_address", "must be a string", None),
        (positions(address="0x" + "1" * 65), "invalid_address", "more than 64", None),
        (positions(id=True), "invalid_id", '"id" must be', None),
        (positions(id=None), "invalid_id", '"id" must be', None),
        (positions(id=1.0), "invalid_id", '"id" must be', None),
        (positions(id=""), "invalid_id", '"id" must be', None),
        (positions(id=[1]), "invalid_id", '"id" must be', None),
        (positions(id=X128 + "x"), "invalid_id", "1 to 128", None),
        ('{"topic": "nope", "id": false}', "invalid_id", '"id" must be', None),  # id first
    ],
)
def test_parse_refuses_with_a_code(
    frame: str | bytes, code: str, needle: str, request_id: int | str | None
) -> None:
    with pytest.raises(RequestError) as caught:
        parse_request(frame, MARKETS)
    assert caught.value.code == code
    assert needle in caught.value.text
    assert caught.value.request_id == request_id


def test_error_message_shapes() -> None:
    """Without an id exactly the original two keys; with one, also "id" and "code"."""
    assert error_message("no") == b'{"message":"error","error":"no"}'
    assert json.loads(error_message("no", 5, "unknown_topic")) == {
        "message": "error",
        "error": "no",
        "id": 5,
        "code": "unknown_topic",
    }
    assert json.loads(error_message("no", "r-1", "x"))["id"] == "r-1"


# ---------------------------------------------------------------------------- subscribe and ack


def test_original_request_gets_only_the_data_message() -> None:
    world = World()
    world.source.state[("positions", A)] = data("positions", [{"size": "5"}], 3)
    session = world.session()
    send(session, {"topic": "positions", "address": A})
    assert session.take() == [b'{"data":[{"size":"5"}],"message":"positions","seq":3}']
    send(session, {"topic": "nope", "address": A})
    assert session.take() == [
        b'{"message":"error","error":"unknown topic \'nope\'; topics are '
        + ", ".join(ALL_TOPICS).encode()
        + b'"}'
    ]


def test_ack_comes_before_the_snapshot_and_data_carry_the_id() -> None:
    world = World()
    world.source.state[("orderbook", 396)] = data("orderbook", [{"price": "1"}], 9)
    session = world.session()
    send(session, {"topic": "orderbook", "market_id": 396, "id": "book"})
    send(session, {"topic": "positions", "address": A.upper().replace("0X", "0x"), "id": 2})
    assert replies(session) == [
        {"message": "subscribed", "id": "book", "topic": "orderbook", "market_id": "396"},
        {"data": [{"price": "1"}], "message": "orderbook", "seq": 9, "id": "book"},
        {"message": "subscribed", "id": 2, "topic": "positions", "address": A},
        {"data": [], "message": "positions", "seq": 0, "id": 2},
    ]
    world.publish("orderbook", 396, [{"price": "2"}], 11)
    assert replies(session) == [
        {"data": [{"price": "2"}], "message": "orderbook", "seq": 11, "id": "book"}
    ]


def test_resubscribing_while_a_push_is_pending_keeps_acks_first() -> None:
    world = World()
    session = world.session()
    send(session, {"topic": "orderbook", "market_id": "396", "id": 1})
    world.publish("orderbook", 396, [{"price": "2"}], 5)  # replaces the pending snapshot
    send(session, {"topic": "orderbook", "market_id": "396", "id": 2})
    world.publish("orderbook", 396, [{"price": "3"}], 6)
    assert replies(session) == [
        {"message": "subscribed", "id": 1, "topic": "orderbook", "market_id": "396"},
        {"message": "subscribed", "id": 2, "topic": "orderbook", "market_id": "396"},
        {"data": [{"price": "3"}], "message": "orderbook", "seq": 6, "id": 2},
    ]
    assert world.hub.subscription_count == 1
    # Re-subscribing without an id turns the stream back into an original one (no id).
    send(session, {"topic": "orderbook", "market_id": "396"})
    assert replies(session) == [{"data": [{"price": "3"}], "message": "orderbook", "seq": 6}]


def test_an_error_reply_carries_the_id_and_code() -> None:
    world = World()
    session = world.session()
    send(session, {"topic": "orderbook", "market_id": "1", "id": "q"})
    (reply,) = replies(session)
    assert reply["id"] == "q" and reply["code"] == "unknown_market"
    assert reply["message"] == "error" and "unknown market_id '1'" in reply["error"]
    assert not session.subscriptions and not world.hub.streams


def test_seq_passes_through_unchanged() -> None:
    world = World()
    session = world.session()
    send(session, {"topic": "trade_history", "address": A})
    session.take()
    for seq in (4, 17, 2**53 + 1):
        world.publish("trade_history", A, [], seq)
        assert [m["seq"] for m in replies(session)] == [seq]


# ---------------------------------------------------------------------------- unsubscribe


def two_watchers(world: World) -> tuple[Session, Session]:
    """A session on the book (with an id) and A's positions, another on the book alone."""
    session, other = world.session(), world.session()
    send(session, {"topic": "orderbook", "market_id": 396, "id": 1})
    send(session, {"topic": "positions", "address": A})
    send(other, {"topic": "orderbook", "market_id": 396})
    return session, other


def test_unsubscribe_acks_and_removes_the_stream() -> None:
    world = World()
    session, other = two_watchers(world)
    session.take(), other.take()
    world.publish("orderbook", 396, [{"price": "1"}], 3)  # pending for both
    send(session, {"op": "unsubscribe", "topic": "orderbook", "market_id": "396", "id": "u"})
    # The pending frame is dropped; the ack has the key as the subscribe ack has it.
    assert replies(session) == [
        {"message": "unsubscribed", "id": "u", "topic": "orderbook", "market_id": "396"}
    ]
    assert set(session.subscriptions) == {("positions", A)}
    assert set(world.hub.streams[("orderbook", 396)]) == {other}
    world.publish("orderbook", 396, [{"price": "2"}], 4)
    world.publish("positions", A, [], 4)
    assert replies(session) == [{"data": [], "message": "positions", "seq": 4}]
    assert [m["seq"] for m in replies(other)] == [4]
    # Without an id: no ack, as quiet as the original protocol.
    send(session, {"op": "unsubscribe", "topic": "positions", "address": A})
    assert session.take() == []
    assert not session.subscriptions and world.hub.subscription_count == 1
    check_consistent(session, world.hub)


def test_unsubscribing_what_is_not_subscribed_is_an_error() -> None:
    world = World()
    session = world.session()
    send(session, {"op": "unsubscribe", "topic": "positions", "address": A, "id": 9})
    send(session, {"op": "unsubscribe", "topic": "orderbook", "market_id": 396})
    first, second = replies(session)
    assert first["code"] == "not_subscribed" and first["id"] == 9
    assert "not subscribed to positions" in first["error"]
    assert set(second) == {"message", "error"} and "not subscribed" in second["error"]
    send(session, {"op": "unsubscribe", "topic": "orderbook", "market_id": 999, "id": 1})
    assert replies(session)[0]["code"] == "unknown_market"


# ---------------------------------------------------------------------------- ids in data


JSON_SCALARS = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text()
JSON = st.recursive(
    JSON_SCALARS | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)
IDS = st.integers(-(2**63), 2**64 - 1) | st.text(min_size=1, max_size=MAX_ID_LENGTH)


@settings(deadline=None)
@given(fields=st.dictionaries(st.text(), JSON, min_size=1), request_id=IDS)
def test_with_id_is_the_message_plus_the_id(fields: dict[str, Any], request_id: int | str) -> None:
    fields.pop("id", None)
    if not fields:
        fields = {"data": []}
    message = msgspec.json.encode(fields)
    spliced = _with_id(message, request_id)
    assert json.loads(spliced) == {**json.loads(message), "id": request_id}
    assert msgspec.json.decode(spliced) == {**fields, "id": request_id}


# ---------------------------------------------------------------------------- resume


def test_since_resumes_histories_and_refreshes_state_topics() -> None:
    world = World()
    world.source.state[("positions", A)] = data("positions", [{"size": "1"}], 8)
    session = world.session()
    send(session, {"topic": "trade_history", "address": A, "since": 5, "id": 1})
    send(session, {"topic": "order_history", "address": A, "since": 0})
    send(session, {"topic": "positions", "address": A, "since": 5})
    assert world.source.resumed == [("trade_history", A, 5), ("order_history", A, 0)]
    assert replies(session) == [
        {"message": "subscribed", "id": 1, "topic": "trade_history", "address": A},
        {"data": [{"resumed_after": 5}], "message": "trade_history", "seq": 6, "id": 1},
        {"data": [{"resumed_after": 0}], "message": "order_history", "seq": 1},
        {"data": [{"size": "1"}], "message": "positions", "seq": 8},
    ]


def test_a_push_does_not_replace_the_pending_resume_rows() -> None:
    """The answer to since holds rows older than the window a push carries: both go out."""
    world = World()
    session = world.session()
    send(session, {"topic": "trade_history", "address": A, "since": 2, "id": 1})
    world.publish("trade_history", A, [{"newest": True}], 7)
    world.publish("trade_history", A, [{"newest": True}, {"newer": True}], 8)
    assert replies(session) == [
        {"message": "subscribed", "id": 1, "topic": "trade_history", "address": A},
        {"data": [{"resumed_after": 2}], "message": "trade_history", "seq": 3, "id": 1},
        {"data": [{"newest": True}, {"newer": True}], "message": HIST, "seq": 8, "id": 1},
    ]
    # Unsubscribing drops a pending resume answer with the rest of the stream.
    send(session, {"topic": "order_history", "address": A, "since": 2})
    send(session, {"op": "unsubscribe", "topic": "order_history", "address": A})
    assert session.take() == [] and session.outbox_bytes == 0


def test_since_too_old_is_an_error_and_subscribes_nothing() -> None:
    world = World()
    world.source.oldest = 100
    session = world.session()
    send(session, {"topic": "order_history", "address": A, "since": 3, "id": "r"})
    (reply,) = replies(session)
    assert reply["code"] == "since_too_old" and reply["id"] == "r"
    assert "older than seq 100" in reply["error"]
    assert not session.subscriptions and not world.hub.streams


# ---------------------------------------------------------------------------- limits


def test_max_subscriptions() -> None:
    world = World(max_subscriptions=3)
    session = world.session()
    for market in (396, 397):
        send(session, {"topic": "orderbook", "market_id": market})
    send(session, {"topic": "positions", "address": A})
    session.take()
    send(session, {"topic": "positions", "address": B, "id": 4})
    (reply,) = replies(session)
    assert reply["code"] == "too_many_subscriptions" and reply["id"] == 4
    assert "max_subscriptions = 3" in reply["error"]
    assert len(session.subscriptions) == 3 and world.hub.subscription_count == 3
    # Subscribing again to a held stream is not a new subscription.
    send(session, {"topic": "positions", "address": A})
    assert replies(session)[0]["message"] == "positions"
    send(session, {"op": "unsubscribe", "topic": "orderbook", "market_id": 397})
    send(session, {"topic": "positions", "address": B})
    assert [m["message"] for m in replies(session)] == ["positions"]
    assert len(session.subscriptions) == 3
    check_consistent(session, world.hub)


def garbage(session: Session, now: float, count: int = 1) -> list[dict[str, Any]]:
    """Send ``count`` frames that are each answered with an error; return the replies."""
    for _ in range(count):
        session.receive_text("{}", now)
    return replies(session)


def is_rate_error(reply: dict[str, Any]) -> bool:
    return "rate limit" in reply["error"]


def test_rate_limit_token_bucket_exact() -> None:
    world = World(rate=20.0, burst=50)
    session = world.session(now=0.0)
    # A burst of 50 at once is admitted (each gets its own reply).
    got = garbage(session, 0.0, 50)
    assert len(got) == 50 and not any(is_rate_error(r) for r in got)
    # The 51st is refused: one error naming the limit, then silence for the rest of the run.
    got = garbage(session, 0.0, 10)
    assert got == [
        {
            "message": "error",
            "error": "rate limit: at most 20 messages per second, in bursts of up to 50 "
            "(rate = 20, burst = 50); this message was dropped",
        }
    ]
    # Refill at 20 per second: after 0.5 s exactly 10 more are admitted.
    got = garbage(session, 0.5, 11)
    assert len(got) == 11 and not any(is_rate_error(r) for r in got[:10])
    assert is_rate_error(got[10])  # a new run of refusals: a new error
    # A long pause refills to the burst, never beyond.
    got = garbage(session, 100.0, 51)
    assert [is_rate_error(r) for r in got] == [False] * 50 + [True]
    assert session.close_code is None


def test_rate_limit_closes_a_client_that_keeps_exceeding_it() -> None:
    world = World(rate=20.0, burst=50)
    session = world.session(now=0.0)
    garbage(session, 0.0, 50)
    # 50 refusals in a row are tolerated...
    got = garbage(session, 0.0, 50)
    assert len(got) == 1 and is_rate_error(got[0])
    assert session.close_code is None
    # ...the 51st closes with 1008 and a reason.
    session.receive_text("{}", 0.0)
    assert session.close_code == CLOSE_POLICY_VIOLATION
    assert "rate limit of 20/s exceeded repeatedly" in session.close_reason
    assert session.take() == []


def test_an_admitted_message_resets_the_refusal_run() -> None:
    world = World(rate=20.0, burst=2)
    session = world.session(now=0.0)
    now = 0.0
    for _ in range(20):
        garbage(session, now, 2)  # the burst
        garbage(session, now, 2)  # two refusals, fewer than burst + 1
        now += 0.125  # 2.5 tokens back, 2 kept
    assert session.close_code is None
    session.receive_binary(now)
    (reply,) = replies(session)
    assert "binary frames are not supported" in reply["error"]


# ---------------------------------------------------------------------------- keepalive


def test_keepalive_decisions() -> None:
    world = World(ping_interval=20.0, ping_timeout=10.0)
    session = world.session(now=0.0)
    assert session.keepalive(19.9) is None
    assert session.keepalive(20.0) == "ping"
    assert session.keepalive(25.0) is None  # a ping is out: no second one
    session.receive_pong(26.0)
    assert session.keepalive(45.9) is None
    session.receive_text("{}", 46.0)  # any frame counts as a sign of life
    assert session.keepalive(65.9) is None
    assert session.keepalive(66.0) == "ping"
    session.receive_ping(67.0)  # a ping from the client does not answer ours
    assert session.keepalive(75.9) is None
    assert session.close_code is None
    assert session.keepalive(76.0) == "timeout"
    assert session.close_code == CLOSE_KEEPALIVE_TIMEOUT
    assert session.close_reason == "keepalive ping timeout"


# ---------------------------------------------------------------------------- outbox


def test_outbox_keeps_only_the_newest_state_per_stream() -> None:
    world = World()
    session = world.session()
    woken: list[None] = []
    session.notify = lambda: woken.append(None)
    send(session, {"topic": "orderbook", "market_id": 396})
    send(session, {"topic": "orderbook", "market_id": 397})
    assert len(woken) == 1  # woken once, when the outbox stopped being empty
    for seq in range(1, 50):
        world.publish("orderbook", 396, [{"n": seq}], seq)
    world.publish("orderbook", 397, [], 60)
    frames = session.take()
    assert [json.loads(f)["seq"] for f in frames] == [49, 60]  # first-queued stream first
    assert session.outbox_bytes == 0 and session.take() == []
    world.publish("orderbook", 397, [], 61)
    assert len(woken) == 2


def test_outbox_over_its_bound_closes_with_1013() -> None:
    world = World(max_outbox_bytes=1000)
    session = world.session()
    rows = [{"pad": "x" * 320}]
    for market in (396, 397):
        send(session, {"topic": "orderbook", "market_id": market})
    send(session, {"topic": "positions", "address": A})
    # Coalescing keeps one stream within the bound however many updates come.
    for seq in range(100):
        world.publish("orderbook", 396, rows, seq)
    assert session.close_code is None and session.outbox_bytes < 1000
    world.publish("orderbook", 397, rows, 100)
    assert session.close_code is None
    world.publish("positions", A, rows, 101)  # three pending states: over the bound
    assert session.close_code == CLOSE_TRY_AGAIN_LATER
    assert "resume with since" in session.close_reason
    # Nothing more is kept for a connection being closed.
    assert session.take() == [] and session.outbox_bytes == 0
    world.publish("positions", A, rows, 102)
    session.receive_text("{}", 1.0)
    assert session.outbox == {} and session.outbox_bytes == 0


def test_replies_count_toward_the_outbox_bound() -> None:
    """A client that sends and never reads cannot grow its outbox with error replies."""
    world = World(max_outbox_bytes=2000, rate=1e9, burst=10**9)
    session = world.session()
    for i in range(100):
        session.receive_text("{}", i * 0.001)
    assert session.close_code == CLOSE_TRY_AGAIN_LATER
    assert session.outbox_bytes <= 2000


def test_closed_forgets_every_subscription() -> None:
    world = World()
    session, other = two_watchers(world)
    session.closed()
    assert session.subscriptions == {} and session.outbox == {} and session.notify is None
    assert world.hub.streams == {("orderbook", 396): {other: None}}
    assert set(world.hub.sessions) == {other}
    assert world.publish("positions", A, [], 1) and world.hub.subscription_count == 1
    other.closed()
    assert world.hub.streams == {} and world.hub.sessions == {}


# ---------------------------------------------------------------------------- fuzzing


def check_parsed(frame: str | bytes) -> None:
    try:
        request = parse_request(frame, MARKETS)
    except RequestError as exc:
        assert exc.code in CODES, exc.code
        assert exc.text
        assert exc.request_id is None or type(exc.request_id) in (int, str)
        error_message(exc.text, exc.request_id, exc.code)  # always encodable
        return
    assert request.op in ("subscribe", "unsubscribe")
    assert request.topic in ALL_TOPICS
    if request.topic in MARKET_TOPICS:
        assert request.key in MARKETS
    else:
        assert isinstance(request.key, str) and len(request.key) == 66
    assert request.since is None or (type(request.since) is int and request.since >= 0)


@settings(deadline=None)
@given(st.binary(max_size=300))
def test_parse_request_any_bytes(frame: bytes) -> None:
    check_parsed(frame)


@settings(deadline=None)
@given(st.text(max_size=300))
def test_parse_request_any_text(frame: str) -> None:
    check_parsed(frame)


FIELD_VALUES = (
    JSON
    | st.sampled_from(["positions", "orderbook", "trade_history", "subscribe", "unsubscribe"])
    | st.sampled_from(["396", "397", " 396", "\u00b2", "\u0663", A, "0x1", "0X1", "0x"])
)
# Strings of digits of every kind (ASCII, other scripts, superscripts) and spaces, any length.
DIGITS = st.text(st.characters(categories=("Nd", "No", "Zs")), max_size=30)
REQUESTS = st.fixed_dictionaries(
    {"topic": st.sampled_from(ALL_TOPICS) | FIELD_VALUES},
    optional={
        "op": FIELD_VALUES,
        "address": FIELD_VALUES,
        "market_id": DIGITS | FIELD_VALUES | st.just("1" * 5000),
        "id": FIELD_VALUES,
        "since": FIELD_VALUES,
    },
)


@settings(max_examples=500, deadline=None)
@given(REQUESTS)
def test_parse_request_structured(request_: dict[str, Any]) -> None:
    check_parsed(msgspec.json.encode(request_))


def valid_requests() -> st.SearchStrategy[dict[str, Any]]:
    keys = st.sampled_from([{"address": A}, {"address": B}, {"market_id": 396}])
    return st.builds(
        lambda key, topic, op, rid, since: {
            "topic": "orderbook" if "market_id" in key else topic,
            **key,
            **({"op": op} if op else {}),
            **({"id": rid} if rid is not None else {}),
            **({"since": since} if since is not None else {}),
        },
        keys,
        st.sampled_from(["positions", "trade_history", "open_orders", "order_history"]),
        st.sampled_from([None, "subscribe", "unsubscribe"]),
        st.none() | st.integers(0, 3) | st.sampled_from(["a", "b"]),
        st.none() | st.integers(0, 10),
    )


FRAMES = (
    st.text(max_size=100)
    | st.binary(max_size=100)
    | REQUESTS.map(msgspec.json.encode)
    | valid_requests().map(msgspec.json.encode)
    | valid_requests().map(msgspec.json.encode)
)


@settings(max_examples=300, deadline=None)
@given(
    frames=st.lists(st.tuples(FRAMES, st.floats(0, 0.2), st.booleans()), max_size=40),
    max_subscriptions=st.integers(1, 4),
    max_outbox_bytes=st.integers(200, 5000),
)
def test_session_survives_any_frames(
    frames: list[tuple[str | bytes, float, bool]], max_subscriptions: int, max_outbox_bytes: int
) -> None:
    world = World(
        max_subscriptions=max_subscriptions, max_outbox_bytes=max_outbox_bytes, rate=20, burst=5
    )
    world.source.oldest = 3
    session, watcher = world.session(), world.session()
    send(watcher, {"topic": "orderbook", "market_id": 396})
    now = 0.0
    seq = 0
    last_seq: dict[object, int] = {}
    for frame, dt, publish in frames:
        now += dt
        session.receive_text(frame, now)
        if publish:  # every stream the requests can name changes
            seq += 1
            world.publish("orderbook", 396, [{"n": seq}], seq)
            for topic in ("positions", "trade_history", "open_orders", "order_history"):
                for address in (A, B):
                    world.publish(topic, address, [{"n": seq}], seq)
        check_consistent(session, world.hub)
        if session.close_code is not None:
            assert session.close_code in (CLOSE_POLICY_VIOLATION, CLOSE_TRY_AGAIN_LATER)
            assert session.outbox_bytes <= max_outbox_bytes
        if dt > 0.1:  # the transport writes now and then
            for raw in session.take():
                reply = json.loads(raw)
                if reply["message"] in ALL_TOPICS and "resumed_after" not in str(reply):
                    stream = reply["message"]
                    assert reply["seq"] >= last_seq.get(stream, 0)
                    last_seq[stream] = reply["seq"]
    session.closed()
    assert set(world.hub.sessions) == {watcher}
    assert world.hub.streams == {("orderbook", 396): {watcher: None}}


# ---------------------------------------------------------------------- sliced fan-out


def sliced_world(watchers: int) -> tuple[World, list[Session], list[int]]:
    world = World()
    world.hub.sliced = True
    world.hub.small_stream = 0  # every stream in rounds, however few watch it
    wakes: list[int] = []
    world.hub.wake = lambda: wakes.append(1)
    sessions = [world.session() for _ in range(watchers)]
    for s in sessions:
        send(s, {"topic": "orderbook", "market_id": 396})
        s.take()  # the snapshot
    return world, sessions, wakes


def seqs(session: Session) -> list[int]:
    return [json.loads(frame)["seq"] for frame in session.take()]


def test_sliced_fan_out_serves_a_budget_at_a_time_with_the_newest_state() -> None:
    world, sessions, wakes = sliced_world(5)
    stream = ("orderbook", 396)
    world.hub.publish_state(stream, data("orderbook", [], 1))
    assert wakes == [1]
    assert all(s.outbox == {} for s in sessions)  # deferred: nothing pushed yet
    assert world.hub.drain(2) is True
    assert [seqs(s) for s in sessions] == [[1], [1], [], [], []]
    # A newer state arrives mid-round: the three still waiting get it at their turn, and the
    # two already served are queued again behind them.
    world.hub.publish_state(stream, data("orderbook", [], 2))
    assert world.hub.drain(3) is True
    assert [seqs(s) for s in sessions] == [[], [], [2], [2], [2]]
    assert world.hub.drain(10) is False
    assert [seqs(s) for s in sessions] == [[2], [2], [], [], []]
    assert world.hub.messages_queued == 7


def test_sliced_fan_out_skips_who_unsubscribed_or_left() -> None:
    world, sessions, _ = sliced_world(3)
    world.hub.publish_state(("orderbook", 396), data("orderbook", [], 1))
    send(sessions[0], {"op": "unsubscribe", "topic": "orderbook", "market_id": 396})
    sessions[1].closed()
    assert world.hub.drain(10) is False
    assert [seqs(s) for s in sessions] == [[], [], [1]]


def test_who_comes_or_goes_mid_round_leaves_those_owed_first_and_nobody_served_twice() -> None:
    world, sessions, _ = sliced_world(5)
    stream = ("orderbook", 396)
    world.hub.publish_state(stream, data("orderbook", [], 1))
    world.hub.drain(2)  # sessions 0 and 1 served; 2, 3 and 4 still owed seq 1
    assert [seqs(s) for s in sessions] == [[1], [1], [], [], []]
    send(sessions[3], {"op": "unsubscribe", "topic": "orderbook", "market_id": 396})
    sessions[3].take()  # its ack
    late = world.session()
    send(late, {"topic": "orderbook", "market_id": 396})
    late.take()  # its snapshot: seq 1 already
    assert world.hub.drain(1) is True
    # Those owed come first, then those served, then the newcomer; only the owed are due.
    order = [s for s, _ in world.hub._rounds[stream].order]
    assert order == [sessions[2], sessions[4], sessions[0], sessions[1], late]
    assert world.hub.drain(10) is False  # the round ends with the last one owed
    assert [seqs(s) for s in [*sessions, late]] == [[], [], [1], [], [1], []]
    world.hub.publish_state(stream, data("orderbook", [], 2))  # then everyone, once
    assert world.hub.drain(10) is False
    assert [seqs(s) for s in order] == [[2]] * 5


def test_a_never_ending_round_stays_bounded() -> None:
    world, sessions, _ = sliced_world(50)
    stream = ("orderbook", 396)
    for seq in range(1, 2_000):
        world.hub.publish_state(stream, data("orderbook", [], seq))
        world.hub.drain(7)
        pending = world.hub._rounds.get(stream)
        assert pending is None or len(pending.order) <= 2 * len(sessions)
    world.hub.drain(10_000)
    for s in sessions:
        got = seqs(s)
        assert got == sorted(got) and got[-1] == 1_999  # everyone ends on the newest


# ---------------------------------------------------------------------- the sink fast path


def sink_world(watchers: int, limit: int = 1_000) -> tuple[World, list[Session], list[ByteSink]]:
    world, sessions, _ = sliced_world(watchers)
    world.hub.frame_header = framed_header
    world.hub.write_limit = limit
    sinks = []
    for i, s in enumerate(sessions):
        s.sink = sink = ByteSink()
        s.fd = i  # the socket number a batch writer would know it by
        sinks.append(sink)
    return world, sessions, sinks


def batch_writer(world: World, sinks: list[ByteSink]) -> list[tuple[list[ByteSink], bytes]]:
    """Give the hub a batch writer that writes to the sinks (checking that each comes with
    its socket, as sink_world numbers them) and records its calls."""
    calls: list[tuple[list[ByteSink], bytes]] = []

    def write_each(fds: list[int], batch: list[Any], frame: bytes) -> None:
        assert fds == [sinks.index(sink) for sink in batch]  # each sink with its socket
        calls.append((list(batch), frame))
        for sink in batch:
            sink.write(frame)

    world.hub.write_each = write_each
    return calls


def test_a_round_writes_one_shared_frame_to_every_sink_that_keeps_up() -> None:
    world, sessions, sinks = sink_world(4)
    sinks[1].buffered = 1_001  # over the limit: coalesced in its outbox instead
    sinks[2].closing = True
    send(sessions[3], {"op": "subscribe", "topic": "orderbook", "market_id": 396, "id": 7})
    sessions[3].take()  # a v2 subscription now: its pushes carry the id: a frame of its own
    message = data("orderbook", [], 1)
    world.hub.publish_state(("orderbook", 396), message)
    assert world.hub.drain(10) is False
    assert sinks[0].written == [framed(message)]
    assert sinks[1].written == sinks[2].written == []
    assert json.loads(sinks[3].written[0][4:]) == {
        "data": [],
        "message": "orderbook",
        "seq": 1,
        "id": 7,
    }
    assert [len(s.outbox) for s in sessions] == [0, 1, 1, 0]
    assert seqs(sessions[2]) == [1]
    assert world.hub.direct_writes == 2 and world.hub.messages_queued == 4
    world.hub.publish_state(("orderbook", 396), data("orderbook", [], 2))
    sinks[1].buffered = 0
    world.hub.drain(10)
    assert sinks[0].seqs() == [1, 2]
    assert sinks[1].written == []  # its outbox still holds seq 1: the frame would overtake it
    assert seqs(sessions[1]) == [2]  # the newest state replaced the pending one


def test_a_round_gives_write_each_the_sinks_holding_nothing_in_one_call_per_slice() -> None:
    world, sessions, sinks = sink_world(5)
    calls = batch_writer(world, sinks)
    sinks[1].buffered = 10  # under the limit but holding bytes: a write behind them, not a batch
    sinks[2].buffered = 1_001  # over the limit: coalesced in its outbox
    message = data("orderbook", [], 1)
    world.hub.publish_state(("orderbook", 396), message)
    assert world.hub.drain(3) is True  # a slice of three: one call for it
    assert calls == [([sinks[0]], framed(message))]
    assert world.hub.drain(10) is False
    assert calls[1] == ([sinks[3], sinks[4]], framed(message))
    assert sinks[1].written == [framed(message)]
    assert sinks[2].written == [] and seqs(sessions[2]) == [1]
    assert [s.seqs() for s in (sinks[0], sinks[3], sinks[4])] == [[1], [1], [1]]
    assert world.hub.direct_writes == 4 and world.hub.messages_queued == 5
    sinks[1].buffered = 0  # drained: from now on in the batch
    world.hub.publish_state(("orderbook", 396), data("orderbook", [], 2))
    world.hub.drain(10)
    assert calls[2][0] == [sinks[0], sinks[1], sinks[3], sinks[4]]
    assert sinks[1].seqs() == [1, 2]


def test_a_session_with_something_queued_never_gets_a_frame_ahead_of_it() -> None:
    world, sessions, sinks = sink_world(1)
    session, sink = sessions[0], sinks[0]
    send(session, {"topic": "nonsense"})  # an error reply waits in the outbox
    world.hub.publish_state(("orderbook", 396), data("orderbook", [], 1))
    world.hub.drain(10)
    assert sink.written == []
    frames = session.take()
    assert json.loads(frames[0]).get("message") != "orderbook" and json.loads(frames[1])["seq"] == 1
    world.hub.publish_state(("orderbook", 396), data("orderbook", [], 2))
    world.hub.drain(10)
    assert sink.seqs() == [2]  # the outbox is empty again: straight to the sink


def test_closing_turns_the_fast_path_off() -> None:
    world, sessions, sinks = sink_world(1, limit=0)
    session = sessions[0]
    world.hub.publish_state(("orderbook", 396), data("orderbook", [], 1))
    world.hub.drain(10)
    session.slow("too slow")
    assert session.sink is None and session.close_code == 1013
    world.hub.publish_state(("orderbook", 396), data("orderbook", [], 2))
    world.hub.drain(10)
    assert sinks[0].seqs() == [1] and session.take() == []


ROUND_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("publish"), st.just(0), st.just(0)),
        st.tuples(st.just("drain"), st.integers(1, 5), st.just(0)),
        st.tuples(st.just("subscribe"), st.integers(0, 5), st.sampled_from([None, 7, 8])),
        st.tuples(st.just("unsubscribe"), st.integers(0, 5), st.just(0)),
        st.tuples(st.just("buffered"), st.integers(0, 5), st.sampled_from([0, 10, 2_000])),
        st.tuples(st.just("write"), st.integers(0, 5), st.just(0)),
        st.tuples(st.just("close"), st.integers(0, 5), st.just(0)),
    ),
    max_size=60,
)


@settings(max_examples=300)
@given(ops=ROUND_OPS, batching=st.booleans(), watchers=st.integers(1, 6))
@example(  # the review's find: back after changes nobody watched (992e847)
    ops=[
        ("publish", 0, 0),
        ("unsubscribe", 0, 0),
        ("publish", 0, 0),
        ("subscribe", 0, None),
        ("drain", 5, 0),
    ],
    batching=False,
    watchers=1,
)
@example(  # a resubscribe with an id mid-round: the pushes after it carry the id
    ops=[
        ("publish", 0, 0),
        ("drain", 5, 0),
        ("subscribe", 0, 7),
        ("write", 0, 0),
        ("publish", 0, 0),
        ("drain", 5, 0),
    ],
    batching=False,
    watchers=1,
)
def test_rounds_deliver_the_newest_state_to_exactly_who_watches_it_as_they_watch(
    ops: list[tuple[str, int, Any]], batching: bool, watchers: int
) -> None:
    """Any mix of changes (published only while watched, as the venue does), slices,
    (re)subscriptions with and without ids, unsubscriptions, closes and readers falling
    behind: a watcher gets the book only while it watches it, with the id it subscribed
    with, in order, and ends on the newest state."""
    world, sessions, sinks = sink_world(watchers)
    stream = ("orderbook", 396)
    if batching:
        batch_writer(world, sinks)
    got: list[list[dict[str, Any]]] = [[] for _ in sessions]
    seen = [0] * len(sessions)  # sink writes collected so far
    closed: set[int] = set()
    newest = 0

    def collect(i: int, messages: list[dict[str, Any]]) -> None:
        session = sessions[i]
        for message in messages:
            if message.get("message") != "orderbook" or "seq" not in message:
                continue  # an ack
            assert i not in closed and stream in session.subscriptions
            assert message.get("id") == session.subscriptions[stream]
            if got[i]:
                assert message["seq"] >= got[i][-1]["seq"]
            got[i].append(message)

    def delivered() -> None:
        for i, sink in enumerate(sinks):
            for write in sink.written[seen[i] :]:
                collect(i, unframe(write))
            seen[i] = len(sink.written)

    for op, index, arg in ops:
        i = index % watchers if op != "drain" else index
        if op == "publish":  # as the venue does: a change nobody watches is not published
            newest += 1
            message = world.source.state[stream] = data("orderbook", [], newest)
            if world.hub.watched(stream):
                world.hub.publish_state(stream, message)
        elif op == "drain":
            world.hub.drain(i)
        elif i in closed:
            continue
        elif op == "subscribe":
            request: dict[str, Any] = {"topic": "orderbook", "market_id": 396}
            if arg is not None:
                request |= {"op": "subscribe", "id": arg}
            send(sessions[i], request)
        elif op == "unsubscribe" and stream in sessions[i].subscriptions:
            send(sessions[i], {"op": "unsubscribe", "topic": "orderbook", "market_id": 396})
        elif op == "buffered":
            sinks[i].buffered = arg
        elif op == "write":
            collect(i, replies(sessions[i]))
        elif op == "close":
            delivered()
            sinks[i].closing = True
            sessions[i].closed()
            closed.add(i)
        delivered()
    for sink in sinks:
        sink.buffered = 0
    while world.hub.drain(100):
        pass
    delivered()
    for i, session in enumerate(sessions):
        if i not in closed:
            collect(i, replies(session))
            if stream in session.subscriptions:
                last = got[i][-1]["seq"] if got[i] else 0  # sink_world took seq 0's snapshot
                assert last == newest


def test_held_writes_leave_in_one_write_per_sink_with_the_same_bytes_in_order() -> None:
    world = World()
    world.hub.frame_header = framed_header
    world.hub.write_limit = 1_000
    a, b = world.session(), world.session()
    for session in (a, b):
        for topic in ("positions", "open_orders", "trade_history"):
            send(session, {"topic": topic, "address": A})
        session.take()
    sink_a, sink_b = ByteSink(), ByteSink()
    a.sink, b.sink = sink_a, sink_b
    pushes = [("positions", 1), ("open_orders", 2), ("trade_history", 3)]
    world.hub.hold()
    for topic, seq in pushes:
        world.hub.publish_state((topic, A), data(topic, [], seq))
    assert sink_a.written == sink_b.written == []  # held until released
    sink_b.closing = True  # gone meanwhile: what was held for it is dropped
    world.hub.release()
    expected = b"".join(framed(data(topic, [], seq)) for topic, seq in pushes)
    assert sink_a.written == [expected]
    assert sink_b.written == []
    assert world.hub.direct_writes == 3  # what was written: not the frames dropped for b
    # Released: the next push is written at once again, and one push is not joined.
    world.hub.publish_state(("positions", A), data("positions", [], 4))
    assert sink_a.written[1:] == [framed(data("positions", [], 4))]
    world.hub.hold()
    world.hub.publish_state(("positions", A), data("positions", [], 5))
    world.hub.release()
    world.hub.release()  # releasing twice writes nothing more
    assert sink_a.written[2:] == [framed(data("positions", [], 5))]


def test_a_held_sink_is_checked_once_and_a_sink_behind_gets_the_batch_through_its_outbox() -> None:
    world = World()
    world.hub.frame_header = framed_header
    world.hub.write_limit = 1_000
    (behind, sink_behind), (ok, sink_ok) = [(world.session(), ByteSink()) for _ in range(2)]
    for session, sink in ((behind, sink_behind), (ok, sink_ok)):
        for topic in ("positions", "open_orders"):
            send(session, {"topic": topic, "address": A})
        session.take()
        session.sink = sink
    sink_behind.buffered = 1_001  # its peer stopped reading: the fast path is off for it
    world.hub.hold()
    world.hub.publish_state(("positions", A), data("positions", [], 1))
    sink_ok.closing = True  # checked at its first frame of the hold, and again at release
    world.hub.publish_state(("open_orders", A), data("open_orders", [], 2))
    world.hub.release()
    # Both of the batch's pushes to the sink behind are queued, in order; none is written.
    assert sink_behind.written == []
    assert seqs(behind) == [1, 2]
    assert sink_ok.written == [] and ok.outbox == {}  # held for it, then dropped: it closed


def test_the_hub_counts_the_live_streams_watched() -> None:
    world = World()
    a, b = world.session(), world.session()
    assert world.hub.live_streams == 0
    for session in (a, b):
        send(session, {"topic": "live_trade_history", "address": A})
        send(session, {"topic": "positions", "address": A})
    assert world.hub.live_streams == 1  # one stream, however many watch it
    send(a, {"topic": "live_order_history", "address": A})
    assert world.hub.live_streams == 2
    send(a, {"op": "unsubscribe", "topic": "live_trade_history", "address": A})
    assert world.hub.live_streams == 2  # b still watches it
    world.hub.drop(b)
    assert world.hub.live_streams == 1
    world.hub.drop(a)
    assert world.hub.live_streams == 0 and world.hub.streams == {}


def test_the_fast_path_is_off_without_a_frame_header() -> None:
    world, sessions, sinks = sink_world(2)
    world.hub.frame_header = None
    world.hub.publish_state(("orderbook", 396), data("orderbook", [], 1))
    world.hub.drain(10)
    assert [s.written for s in sinks] == [[], []]
    assert [seqs(s) for s in sessions] == [[1], [1]]
    assert world.hub.direct_writes == 0


def test_a_stream_that_never_stops_changing_does_not_starve_the_others() -> None:
    world, sessions, _ = sliced_world(30)
    for s in sessions:
        send(s, {"topic": "best_price", "market_id": 396})
        s.take()
    book, best = ("orderbook", 396), ("best_price", 396)
    world.hub.publish_state(book, data("orderbook", [], 1))
    world.hub.publish_state(best, data("best_price", [], 1))
    slices: list[set[str]] = []
    for seq in range(2, 8):
        world.hub.drain(10)
        slices.append({json.loads(frame)["message"] for s in sessions for frame in s.take()})
        world.hub.publish_state(book, data("orderbook", [], seq))  # the book never rests
    # The slices alternate between the streams; best_price's round of 30 is complete.
    assert slices == [{"orderbook"}, {"best_price"}] * 3
    assert best not in world.hub._rounds and book in world.hub._rounds


def test_renewing_a_round_costs_no_pass_over_the_watchers() -> None:
    """A change mid-cycle restarts the count, not the list: every watcher still gets the
    newest message exactly once more, starting where the cycle stands."""
    world, sessions, _ = sliced_world(6)
    stream = ("orderbook", 396)
    world.hub.publish_state(stream, data("orderbook", [], 1))
    world.hub.drain(4)
    first = [seqs(s) for s in sessions]
    world.hub.publish_state(stream, data("orderbook", [], 2))
    assert world.hub.drain(4) is True
    second = [seqs(s) for s in sessions]  # sessions 4, 5, 0, 1
    assert world.hub.drain(4) is False  # sessions 2, 3: the cycle is complete
    third = [seqs(s) for s in sessions]
    assert first == [[1]] * 4 + [[]] * 2
    assert second == [[2], [2], [], [], [2], [2]]
    assert third == [[], [], [2], [2], [], []]


@pytest.mark.parametrize("with_sink", [True, False])
def test_who_comes_back_to_a_stream_nobody_watched_ends_on_its_newest_state(
    with_sink: bool,
) -> None:
    """Changes made while nobody watches are not published: a round left pending from before
    would give the returning watcher an older state after the newest its subscription
    brought (found by a review; the book went backwards, or stayed stale in the outbox)."""
    world, sessions, sinks = sink_world(1) if with_sink else (*sliced_world(1)[:2], [])
    session, stream = sessions[0], ("orderbook", 396)
    world.source.state[stream] = first = data("orderbook", [], 1)
    world.hub.publish_state(stream, first)  # a round, the watcher still owed it
    send(session, {"op": "unsubscribe", "topic": "orderbook", "market_id": 396})
    session.take()
    world.source.state[stream] = data("orderbook", [], 2)  # unwatched: not published
    send(session, {"topic": "orderbook", "market_id": 396})  # back: seq 2 as its snapshot
    world.hub.drain(100)
    assert (sinks[0].seqs() if with_sink else seqs(session)) == [2]


def test_the_next_round_reuses_the_order_until_someone_comes_or_goes() -> None:
    world, sessions, _ = sliced_world(3)
    stream = ("orderbook", 396)
    world.hub.publish_state(stream, data("orderbook", [], 1))
    order = world.hub._rounds[stream].order
    world.hub.drain(10)  # the round is over
    world.hub.publish_state(stream, data("orderbook", [], 2))
    assert world.hub._rounds[stream].order is order  # nobody came or went: no pass over them
    world.hub.drain(10)
    sessions[0].closed()
    assert all(s is not sessions[0] for orders in world.hub._orders.values() for s, _ in orders[1])
    world.hub.publish_state(stream, data("orderbook", [], 3))
    assert [s for s, _ in world.hub._rounds[stream].order] == sessions[1:]
    world.hub.drain(10)
    assert [seqs(s) for s in sessions] == [[], [3], [3]]  # the outbox keeps the newest


def test_a_stream_few_watch_is_pushed_at_once_unless_a_round_is_under_way() -> None:
    world, sessions, wakes = sliced_world(3)
    stream = ("orderbook", 396)
    world.hub.small_stream = 3
    world.hub.publish_state(stream, data("orderbook", [], 1))
    assert wakes == [] and [seqs(s) for s in sessions] == [[1], [1], [1]]
    world.hub.small_stream = 0
    world.hub.publish_state(stream, data("orderbook", [], 2))  # a round: one push so far
    world.hub.drain(1)
    world.hub.small_stream = 3
    world.hub.publish_state(stream, data("orderbook", [], 3))  # joins the round
    assert [seqs(s) for s in sessions] == [[2], [], []]
    world.hub.drain(10)
    assert [seqs(s) for s in sessions] == [[3], [3], [3]]


def test_a_renewed_round_copies_its_watchers_only_when_they_changed() -> None:
    world, sessions, _ = sliced_world(4)
    stream = ("orderbook", 396)
    world.hub.publish_state(stream, data("orderbook", [], 1))
    world.hub.drain(2)
    order = world.hub._rounds[stream].order
    world.hub.publish_state(stream, data("orderbook", [], 2))
    assert world.hub._rounds[stream].order is order  # no one (un)subscribed: no copy
    late = world.session()
    send(late, {"topic": "orderbook", "market_id": 396})
    late.take()  # its snapshot
    send(sessions[0], {"op": "unsubscribe", "topic": "orderbook", "market_id": 396})
    world.hub.publish_state(stream, data("orderbook", [], 3))
    # The cycle stood at session 2 with everyone owed seq 3: those owed first, in turn, then
    # the newcomer (session 0 unsubscribed).
    assert [s for s, _ in world.hub._rounds[stream].order] == [*sessions[2:], sessions[1], late]
    world.hub.drain(100)
    assert [seqs(s)[-1:] for s in [*sessions[1:], late]] == [[3]] * 4
    assert all(json.loads(f).get("seq") != 3 for f in sessions[0].take())


# ---------------------------------------------------------------- the fan-out's slice sizes


def test_a_slice_sizer_starts_at_its_least_and_learns_the_pushes_that_fill_its_time() -> None:
    sizer = SliceSizer(100, 0.001)
    assert sizer.budget == 100  # nothing measured yet
    sizer.observe(100, 100 * 3e-6)  # 3 us a push: a millisecond holds 333
    assert sizer.budget == 333
    for _ in range(40):  # the host slows to 6 us a push: the size follows, not at once
        before = sizer.budget
        sizer.observe(before, before * 6e-6)
        assert 166 <= sizer.budget <= before
    assert sizer.budget in (166, 167)


def test_a_slice_sizer_keeps_within_its_bounds_and_ignores_what_teaches_nothing() -> None:
    sizer = SliceSizer(100, 0.001)
    sizer.observe(SliceSizer.SAMPLE - 1, 1.0)  # a round's tail: too few pushes
    sizer.observe(500, 0.0)  # a clock that did not move
    assert sizer.cost is None and sizer.budget == 100
    sizer.observe(100, 100 * 50e-6)  # 50 us a push: 20 would fill the time, but never < 100
    assert sizer.budget == 100
    cheap = SliceSizer(100, 0.001)
    cheap.observe(1000, 1000 * 1e-9)  # pushes into outboxes can be nearly free
    assert cheap.budget == SliceSizer.MOST


def test_a_slice_sizer_without_a_target_makes_every_slice_its_least() -> None:
    sizer = SliceSizer(5, 0.0)
    sizer.observe(100, 100 * 3e-6)
    assert sizer.budget == 5


@given(
    least=st.integers(1, 1000),
    target=st.floats(0, 0.1),
    slices=st.lists(st.tuples(st.integers(0, 5000), st.floats(0, 1)), max_size=30),
)
def test_a_slice_sizer_budget_is_always_within_its_bounds(
    least: int, target: float, slices: list[tuple[int, float]]
) -> None:
    sizer = SliceSizer(least, target)
    for pushes, seconds in slices:
        sizer.observe(pushes, seconds)
        assert least <= sizer.budget <= max(least, SliceSizer.MOST)
