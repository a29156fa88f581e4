"""Market specifications: the bundled defaults (markets 396, 397, 398) or a user's file.

Units (reference README §2 and §5): a price is an integer number of price units of
``10**-price_decimals`` quote; a size is an integer number of lots of ``lot_size`` base
sub-units. The specs are chosen so that ``price * size`` is in quote sub-units, which the
loader checks: ``10**-price_decimals * lot_size * 10**-base_decimals == 10**-quote_decimals``.
``tick_size`` is the smallest price step: a price must be a multiple of it.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib import resources
from pathlib import Path

import msgspec

from perps_indexer.errors import InvalidMarketSpec
from perps_indexer.units import BPS, MAX_PRICE


class MarketSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One market's fixed parameters."""

    market_id: int
    base_name: str
    quote_name: str
    base_decimals: int
    quote_decimals: int
    price_decimals: int
    lot_size: int
    tick_size: int
    min_lots: int
    max_lots: int
    max_leverage: int
    maintenance_margin_bps: int
    taker_fee_bps: int
    maker_fee_bps: int
    funding_interval_s: int = 3600
    """Seconds between funding settlements (aligned to multiples of it since the epoch)."""
    funding_cap_bps: int = 75
    """The funding rate per interval is clamped to +/- this many basis points."""

    @property
    def pair(self) -> str:
        return f"{self.base_name}/{self.quote_name}"


def _check(spec: MarketSpec, where: str) -> None:
    def bad(field: str, why: str) -> InvalidMarketSpec:
        return InvalidMarketSpec(f"{where}: field `{field}` {why}")

    if not 0 < spec.market_id < (1 << 64):
        raise bad("market_id", "must be between 1 and 2**64 - 1")
    positive = ("lot_size", "tick_size", "min_lots", "max_lots", "max_leverage")
    for name in positive:
        if getattr(spec, name) <= 0:
            raise bad(name, f"must be positive, got {getattr(spec, name)}")
    for name in ("base_decimals", "quote_decimals", "price_decimals"):
        if not 0 <= getattr(spec, name) <= 30:
            raise bad(name, f"must be between 0 and 30, got {getattr(spec, name)}")
    if spec.tick_size > MAX_PRICE:
        raise bad("tick_size", f"must be at most {MAX_PRICE}")
    if spec.min_lots > spec.max_lots:
        raise bad("min_lots", f"({spec.min_lots}) must not exceed max_lots ({spec.max_lots})")
    if not 0 < spec.maintenance_margin_bps < BPS:
        raise bad("maintenance_margin_bps", "must be between 1 and 9999 basis points")
    if spec.maintenance_margin_bps * spec.max_leverage >= BPS:
        raise bad(
            "max_leverage",
            f"({spec.max_leverage}) leaves no room above the maintenance margin "
            f"({spec.maintenance_margin_bps} bps): positions would open already liquidatable",
        )
    if spec.funding_interval_s <= 0:
        raise bad("funding_interval_s", f"must be positive, got {spec.funding_interval_s}")
    if not 0 <= spec.funding_cap_bps < BPS:
        raise bad("funding_cap_bps", "must be between 0 and 9999 basis points")
    for name in ("taker_fee_bps", "maker_fee_bps"):
        if not 0 <= getattr(spec, name) < BPS:
            raise bad(name, "must be between 0 and 9999 basis points")
    # price unit * lot must be one quote sub-unit, so that price * size is in quote sub-units.
    lhs = spec.lot_size * 10**spec.quote_decimals
    rhs = 10 ** (spec.price_decimals + spec.base_decimals)
    if lhs != rhs:
        raise bad(
            "lot_size",
            f"({spec.lot_size}) does not make price x size a quote sub-unit: need "
            f"lot_size * 10**quote_decimals == 10**(price_decimals + base_decimals)",
        )


def parse_markets(data: bytes | str, source: str = "markets") -> dict[int, MarketSpec]:
    """Decode and validate a JSON list of market specs; errors name the field at fault."""
    try:
        specs = msgspec.json.decode(data, type=list[MarketSpec])
    except msgspec.ValidationError as exc:
        raise InvalidMarketSpec(f"{source}: {exc}") from None
    except msgspec.DecodeError as exc:
        raise InvalidMarketSpec(f"{source}: not valid JSON ({exc})") from None
    if not specs:
        raise InvalidMarketSpec(f"{source}: the list of markets is empty")
    markets: dict[int, MarketSpec] = {}
    for index, spec in enumerate(specs):
        _check(spec, f"{source}: market [{index}]")
        if spec.market_id in markets:
            raise InvalidMarketSpec(
                f"{source}: market [{index}]: field `market_id` {spec.market_id} appears twice"
            )
        markets[spec.market_id] = spec
    return markets


def load_markets(path: str | Path | None = None) -> dict[int, MarketSpec]:
    """Load market specs from ``path``, or the bundled defaults when ``path`` is None."""
    if path is None:
        data = resources.files("perps_indexer").joinpath("data/markets.json").read_bytes()
        return parse_markets(data, "bundled markets.json")
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidMarketSpec(f"cannot read market file {path}: {exc.strerror}") from None
    return parse_markets(data, str(path))


def default_markets() -> Mapping[int, MarketSpec]:
    """The bundled markets 396 (APT/USDC), 397 (BTC/USDC) and 398 (ETH/USDC)."""
    return load_markets(None)
