"""Units, identifiers and the venue's formulas (reference README §2 and §3).

Prices are integer ticks, sizes integer lots and money integer quote sub-units, so that
``value = price * size`` is exact. The single float in the system is the liquidation price,
which follows the venue's formula on binary floats so that clients see the venue's digits.
"""

from __future__ import annotations

import re

from perps_indexer.errors import InvalidAddress

U64 = 1 << 64
U64_MASK = U64 - 1
ASK_BIT = 1 << 32
MAX_PRICE = ASK_BIT - 1
"""Largest price in ticks: the order-id key keeps the price in 32 bits (reference §3)."""

BPS = 10_000
_HEX = frozenset("0123456789abcdef")
# An address already in the normal form: most are (every client that copies one from a
# message), and matching it is a fifth of the full check.
_NORMAL = re.compile(r"0x[0-9a-f]{64}")


def normalize_address(address: object) -> str:
    """Return ``0x`` + 64 lowercase hex digits, or raise :class:`InvalidAddress`.

    Accepts any case and omitted leading zeros (``0x1`` is ``0x000…001``), as account
    addresses are 32-byte integers on the venue's chain.
    """
    if not isinstance(address, str):
        raise InvalidAddress(f"an address must be a string, not {type(address).__name__}")
    if type(address) is str and _NORMAL.fullmatch(address):
        return address  # not a subclass of str: what is returned is always a plain str
    text = address.strip().lower()
    if not text.startswith("0x"):
        raise InvalidAddress(f"address {address!r} must start with 0x")
    digits = text[2:]
    if not digits:
        raise InvalidAddress("address '0x' has no hex digits")
    if len(digits) > 64:
        raise InvalidAddress(f"address {address!r} has more than 64 hex digits")
    if not _HEX.issuperset(digits):
        raise InvalidAddress(f"address {address!r} contains characters that are not hex digits")
    return "0x" + digits.rjust(64, "0")


def ceil_div(a: int, b: int) -> int:
    """Integer division rounding towards +infinity (``b > 0``)."""
    return -((-a) // b)


def fee_for(value: int, bps: int) -> int:
    """Fee on a fill of ``value`` quote sub-units, rounded up (the venue never under-charges)."""
    return ceil_div(value * bps, BPS)


def position_trade_id(counter: int, market_id: int) -> int:
    """A position's ``trade_id``: ``counter << 64 | market_id`` (reference §3)."""
    return (counter << 64) | market_id


def order_id(counter: int, price: int, is_ask: bool, rests: bool) -> int:
    """An order's id: ``counter << 64 | key`` (reference §3).

    ``key`` is ``price | (1 << 32 if ask)`` for an order that rests on the book and 0 for an
    order that filled completely on arrival.
    """
    key = (price | (ASK_BIT if is_ask else 0)) if rests else 0
    return (counter << 64) | key


def split_id(value: int) -> tuple[int, int]:
    """Split a 128-bit id into ``(counter, low 64 bits)``."""
    return value >> 64, value & U64_MASK


def liquidation_price(
    entry_value: int,
    size: int,
    leverage: int,
    is_long: bool,
    maintenance_bps: int,
    added_margin: int = 0,
) -> float:
    """The venue's liquidation price on the entry price (reference §2), as a binary float.

    long ``entry * (1 - 1/leverage) / (1 - mm)``, short ``entry * (1 + 1/leverage) / (1 + mm)``.
    Margin added after opening (``added_margin``) moves the price away by ``added / value``,
    the same term the formula's ``1/leverage`` stands for.
    """
    entry = entry_value / size if entry_value % size else float(entry_value // size)
    mm = maintenance_bps / BPS
    cushion = 1 / leverage
    if added_margin:
        cushion += added_margin / entry_value
    if is_long:
        return entry * (1 - cushion) / (1 - mm)
    return entry * (1 + cushion) / (1 + mm)


def format_float(value: float) -> str:
    """Shortest round-trip text of a float, as the venue prints ``liq_price``."""
    if value == int(value) and abs(value) < 1e16:
        return str(int(value))
    return repr(value)


def format_ratio(numerator: int, denominator: int, places: int = 6) -> str:
    """Exact decimal text of ``numerator / denominator``.

    The quotient is exact when it terminates within ``places`` decimals (weighted entry prices
    usually do); otherwise it is rounded half-even to ``places`` decimals.
    """
    # In integers: the text of every open position is made with this on each of its changes,
    # and Decimal's division, quantize and normalize cost about three times as much.
    whole, rest = divmod(numerator, denominator)
    if not rest:
        return str(whole)
    negative = (numerator < 0) != (denominator < 0)
    numerator, denominator = abs(numerator), abs(denominator)
    scaled, rest = divmod(numerator * 10**places, denominator)
    exact = not rest
    if not exact and (2 * rest > denominator or (2 * rest == denominator and scaled & 1)):
        scaled += 1  # half-even, on the magnitude (the sign is put back below)
    text = str(scaled).rjust(places + 1, "0")
    integer, fraction = (text[:-places], text[-places:]) if places else (text, "")
    if exact:
        fraction = fraction.rstrip("0")  # terminates: as many decimals as it has
    sign = "-" if negative else ""
    return f"{sign}{integer}.{fraction}" if fraction else f"{sign}{integer}"
