"""units.py: addresses, rounding, identifiers and the venue's formulas (reference §2, §3).

Expected values come from the reference examples or are worked out by hand in comments.
"""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from perps_indexer.errors import InvalidAddress
from perps_indexer.units import (
    ASK_BIT,
    MAX_PRICE,
    U64_MASK,
    ceil_div,
    fee_for,
    format_float,
    format_ratio,
    liquidation_price,
    normalize_address,
    order_id,
    position_trade_id,
    split_id,
)

FULL = "0x4d6dc68e391e86991e58ab4d548b7e92872430d1f51bc666fe0c206bad7ff770"


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (FULL, FULL),
        (FULL.upper().replace("0X", "0x"), FULL),
        ("0X" + FULL[2:].upper(), FULL),
        ("0x1", "0x" + "0" * 63 + "1"),
        ("0xAbC", "0x" + "0" * 61 + "abc"),
        ("  0xab \n", "0x" + "0" * 62 + "ab"),
        ("0x" + "0" * 64, "0x" + "0" * 64),
        (FULL + "\n", FULL),  # the normal form with a trailing newline is not taken as is
        (" " + FULL, FULL),
    ],
)
def test_addresses_normalise_to_0x_and_64_lowercase_digits(given: str, expected: str) -> None:
    assert normalize_address(given) == expected


ADDRESS_TEXT = st.builds(
    lambda lead, prefix, digits, trail: lead + prefix + digits + trail,
    st.sampled_from(["", " ", "\n "]),
    st.sampled_from(["0x", "0X", "x", ""]),
    st.text("0123456789abcdefABCDEF\u0661 ", max_size=66),
    st.sampled_from(["", "\n"]),
)


@given(ADDRESS_TEXT | st.text(alphabet="0123456789abcdefABCDEFxX \n\u0661", max_size=70))
def test_an_address_is_its_number_in_normal_form_or_refused(text: str) -> None:
    digits = text.strip()[2:]
    try:
        got = normalize_address(text)
    except InvalidAddress:
        ok = text.strip()[:2] in ("0x", "0X") and 0 < len(digits) <= 64
        assert not ok or not all(c in "0123456789abcdefABCDEF" for c in digits)
        return
    assert got == f"0x{int(digits, 16):064x}"


def test_an_address_comes_back_as_a_plain_str() -> None:
    class Text(str):
        pass

    assert type(normalize_address(Text(FULL))) is str


@pytest.mark.parametrize(
    ("given", "says"),
    [
        (1234, "must be a string"),
        (None, "must be a string"),
        ("1234", "must start with 0x"),
        ("0x", "no hex digits"),
        ("0xg1", "not hex digits"),
        ("0x12 34", "not hex digits"),
        ("0x" + "1" * 65, "more than 64"),
        ("0x" + "\u0661" * 64, "not hex digits"),  # digits, but not ASCII hex digits
    ],
)
def test_bad_addresses_are_refused_with_a_reason(given: object, says: str) -> None:
    with pytest.raises(InvalidAddress) as info:
        normalize_address(given)
    assert says in info.value.message
    assert info.value.code == "invalid_address"


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [(7, 2, 4), (6, 2, 3), (0, 5, 0), (1, 10**30, 1), (-7, 2, -3), (6_050_000, 2, 3_025_000)],
)
def test_ceil_div_rounds_towards_plus_infinity(a: int, b: int, expected: int) -> None:
    assert ceil_div(a, b) == expected


@pytest.mark.parametrize(
    ("value", "bps", "expected"),
    [
        (6_050_000, 5, 3_025),  # the reference example's fee: 0.05 % of 6,050,000
        (1, 5, 1),  # 0.0005 rounds up to 1: the venue never under-charges
        (19_999, 5, 10),  # 9.9995 -> 10
        (20_000, 5, 10),  # exactly 10
        (0, 5, 0),
        (123_456, 0, 0),  # maker fee 0
    ],
)
def test_fees_round_up(value: int, bps: int, expected: int) -> None:
    assert fee_for(value, bps) == expected


def test_trade_ids_match_the_reference_example() -> None:
    assert position_trade_id(895, 396) == 16509835945970048696716
    assert position_trade_id(896, 396) == 16528282690043758248332  # the next, also in the log
    assert position_trade_id(896, 396) - position_trade_id(895, 396) == 1 << 64
    assert position_trade_id(895, 396) & U64_MASK == 396


def test_order_ids_match_the_reference_example() -> None:
    # The venue's resting bid at 6002 (kana-perps-websocket-api.txt, open_orders): counter
    # 699693 in the high 64 bits and the price in the low 32, bit 32 (ask) clear. Its bits
    # 33-63 are not zero (0x3000d): the venue's book keeps more there than the price and
    # side, which this project does not reproduce, so only the documented parts are compared.
    venue = 12907057702855018828273522
    counter, key = split_id(venue)
    assert (counter, key & 0xFFFF_FFFF, key & ASK_BIT) == (699693, 6002, 0)
    oid = order_id(699693, 6002, is_ask=False, rests=True)
    assert split_id(oid) == (699693, 6002)
    # The venue's filled order in the same example has key 0, as ours do.
    assert split_id(12906965467445688751095808) == (699688, 0)
    # An ask carries bit 32 in its key; an order filled on arrival has key 0.
    assert split_id(order_id(5, 6002, is_ask=True, rests=True)) == (5, 6002 | ASK_BIT)
    assert split_id(order_id(5, 6002, is_ask=True, rests=False)) == (5, 0)
    # The largest price still fits below the ask bit.
    assert split_id(order_id(1, MAX_PRICE, is_ask=False, rests=True))[1] == ASK_BIT - 1


def test_liquidation_prices_match_the_reference_digits() -> None:
    short = liquidation_price(6050 * 1000, 1000, 2, is_long=False, maintenance_bps=250)
    long = liquidation_price(6050 * 1000, 1000, 2, is_long=True, maintenance_bps=250)
    assert format_float(short) == "8853.658536585366"
    assert format_float(long) == "3102.5641025641025"


def test_liquidation_price_uses_the_exact_entry_and_added_margin() -> None:
    # Entry 9,150,500 / 1500 = 6100.333...: the float of the quotient, not a rounded price.
    got = liquidation_price(9_150_500, 1500, 2, is_long=True, maintenance_bps=250)
    assert got == (9_150_500 / 1500) * (1 - 1 / 2) / (1 - 0.025)
    # 300,000 added to a 6,000,000 position at 10x widens the cushion by 0.05:
    # long 6000 x (1 - 0.1 - 0.05) / 0.975 = 5230.77; short 6000 x 1.15 / 1.025 = 6731.71.
    long = liquidation_price(6_000_000, 1000, 10, True, 250, added_margin=300_000)
    short = liquidation_price(6_000_000, 1000, 10, False, 250, added_margin=300_000)
    assert long == pytest.approx(6000 * 0.85 / 0.975, rel=1e-12)
    assert short == pytest.approx(6000 * 1.15 / 1.025, rel=1e-12)


@pytest.mark.parametrize(
    ("value", "text"),
    [(3.0, "3"), (8853.658536585366, "8853.658536585366"), (0.1, "0.1"), (1e20, "1e+20")],
)
def test_format_float_is_shortest_round_trip(value: float, text: str) -> None:
    assert format_float(value) == text
    assert float(text) == value


@pytest.mark.parametrize(
    ("num", "den", "places", "text"),
    [
        (12, 4, 6, "3"),
        (1, 8, 6, "0.125"),  # terminates: exact
        (9_150_500, 1500, 6, "6100.333333"),
        (2, 3, 6, "0.666667"),  # rounded half-even at 6 places
        (1, 3, 2, "0.33"),
        (-1, 8, 6, "-0.125"),
        (6_050_000, 1000, 6, "6050"),
    ],
)
def test_format_ratio_is_exact_when_it_can_be(num: int, den: int, places: int, text: str) -> None:
    assert format_ratio(num, den, places) == text


def test_format_ratio_keeps_the_sign_of_a_quotient_rounded_to_zero() -> None:
    # As Decimal prints it: the digits are rounded, the sign is the quotient's.
    assert format_ratio(-1, 10**7) == "-0.000000"
    assert format_ratio(1, -(10**7)) == "-0.000000"
    assert format_ratio(1, 10**7) == "0.000000"
    assert format_ratio(5, 2, 0) == "2"  # half-even: 2.5 -> 2
    assert format_ratio(7, 2, 0) == "4"  # 3.5 -> 4
    assert format_ratio(-5, 2, 0) == "-2"


def _decimal_ratio(numerator: int, denominator: int, places: int) -> str:
    """The Decimal arithmetic format_ratio replaced (exact while the quotient has at most
    28 significant digits, Decimal's default precision)."""
    if numerator % denominator == 0:
        return str(numerator // denominator)
    q = Decimal(numerator) / Decimal(denominator)
    exact = q.quantize(Decimal(1).scaleb(-places))
    if exact * denominator == numerator:
        return format(exact.normalize(), "f")
    return format(exact, "f")


@given(
    st.integers(min_value=-(10**18), max_value=10**18),
    st.integers(min_value=1, max_value=10**9) | st.integers(min_value=-(10**9), max_value=-1),
    st.integers(min_value=0, max_value=8),
)
def test_format_ratio_is_the_quotient_rounded_half_even(num: int, den: int, places: int) -> None:
    text = format_ratio(num, den, places)
    exact = Fraction(num, den)
    shown = Fraction(text)
    scale = 10**places
    # Within half a unit of the last place, a tie going to the even digit; exact when the
    # quotient terminates within the places, and then with no trailing zeros.
    assert abs(shown - exact) * scale <= Fraction(1, 2)
    if abs(shown - exact) * scale == Fraction(1, 2):
        assert (shown * scale).numerator % 2 == 0
    if (exact * scale).denominator == 1:
        assert shown == exact
        assert "." not in text or not text.endswith("0")
    elif places:
        assert len(text.split(".")[1]) == places
    assert text.startswith("-") == (exact < 0)
    assert text == _decimal_ratio(num, den, places)  # byte for byte what Decimal printed
