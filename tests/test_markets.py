"""markets.py: the bundled markets and the loader's checks, whose errors name the field."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from perps_indexer.errors import InvalidMarketSpec
from perps_indexer.markets import default_markets, load_markets, parse_markets


def bundled() -> list[dict[str, Any]]:
    data = Path(__file__).parents[1] / "src" / "perps_indexer" / "data" / "markets.json"
    raw: list[dict[str, Any]] = json.loads(data.read_text())
    return raw


def test_the_bundled_markets_are_396_397_398_with_the_published_parameters() -> None:
    markets = default_markets()
    assert sorted(markets) == [396, 397, 398]
    apt = markets[396]
    # Reference §5: APT/USDC, lot 100000, tick 1, base 8 / quote 6 decimals, min 500 lots,
    # max 150,000,000 lots, max leverage 20, maintenance 250 bps; §2: taker 0.05 %, maker 0.
    assert apt.pair == "APT/USDC"
    assert (apt.lot_size, apt.tick_size, apt.base_decimals, apt.quote_decimals) == (
        100_000,
        1,
        8,
        6,
    )
    assert (apt.min_lots, apt.max_lots, apt.max_leverage) == (500, 150_000_000, 20)
    assert (apt.maintenance_margin_bps, apt.taker_fee_bps, apt.maker_fee_bps) == (250, 5, 0)
    assert markets[397].pair == "BTC/USDC" and markets[398].pair == "ETH/USDC"
    assert markets[397].tick_size == 10


@pytest.mark.parametrize("market_id", [396, 397, 398])
def test_price_times_size_is_in_quote_sub_units(market_id: int) -> None:
    spec = default_markets()[market_id]
    # One price unit (10^-price_decimals quote per base) times one lot (lot_size base
    # sub-units of 10^-base_decimals base) must be exactly one quote sub-unit.
    price_unit = Decimal(1).scaleb(-spec.price_decimals)
    lot = spec.lot_size * Decimal(1).scaleb(-spec.base_decimals)
    assert price_unit * lot == Decimal(1).scaleb(-spec.quote_decimals)


def test_the_reference_example_reads_as_dollars() -> None:
    spec = default_markets()[396]
    # 6050 ticks = $6.050; 1000 lots x 100,000 sub-units = 1 APT; value 6,050,000 = $6.05.
    price = 6050 * Decimal(1).scaleb(-spec.price_decimals)
    amount = 1000 * spec.lot_size * Decimal(1).scaleb(-spec.base_decimals)
    assert (price, amount) == (Decimal("6.050"), Decimal(1))
    assert 6050 * 1000 * Decimal(1).scaleb(-spec.quote_decimals) == price * amount


def test_load_markets_without_a_path_is_the_bundled_file(tmp_path: Path) -> None:
    assert load_markets() == default_markets()
    path = tmp_path / "m.json"
    path.write_text(json.dumps(bundled()[:1]))
    assert list(load_markets(path)) == [396]
    assert list(load_markets(str(path))) == [396]


def _broken(change: dict[str, Any], index: int = 0) -> str:
    specs = bundled()
    for key, value in change.items():
        if value is _DROP:
            del specs[index][key]
        else:
            specs[index][key] = value
    return json.dumps(specs)


_DROP = object()


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"market_id": 0}, "market_id"),
        ({"lot_size": 0}, "lot_size"),
        ({"tick_size": -1}, "tick_size"),
        ({"tick_size": 1 << 32}, "tick_size"),
        ({"min_lots": 0}, "min_lots"),
        ({"max_leverage": 0}, "max_leverage"),
        ({"min_lots": 200_000_000}, "min_lots"),  # above max_lots
        ({"price_decimals": 31}, "price_decimals"),
        ({"base_decimals": -1}, "base_decimals"),
        ({"maintenance_margin_bps": 0}, "maintenance_margin_bps"),
        ({"maintenance_margin_bps": 10_000}, "maintenance_margin_bps"),
        ({"max_leverage": 40}, "max_leverage"),  # 40 x 2.5 % = 100 %: opens liquidatable
        ({"taker_fee_bps": 10_000}, "taker_fee_bps"),
        ({"maker_fee_bps": -1}, "maker_fee_bps"),
        ({"lot_size": 1000}, "lot_size"),  # price x size no longer a quote sub-unit
        ({"tick_size": _DROP}, "tick_size"),  # missing
        ({"lot_size": "100000"}, "lot_size"),  # wrong type
        ({"colour": "red"}, "colour"),  # unknown field
    ],
)
def test_a_bad_spec_is_refused_and_the_message_names_the_field(
    change: dict[str, Any], field: str
) -> None:
    with pytest.raises(InvalidMarketSpec) as info:
        parse_markets(_broken(change), "my.json")
    message = info.value.message
    assert f"`{field}`" in message or f".{field}`" in message, message
    assert message.startswith("my.json")
    assert info.value.code == "invalid_market_spec"


def test_errors_say_which_market_in_the_list() -> None:
    with pytest.raises(InvalidMarketSpec, match=r"market \[2\]: field `lot_size`"):
        parse_markets(_broken({"lot_size": 0}, index=2))


@pytest.mark.parametrize(
    ("data", "says"),
    [
        ("[]", "empty"),
        ("[{", "not valid JSON"),
        ("{}", "array"),
        (json.dumps(bundled()[:1] * 2), "`market_id` 396 appears twice"),
    ],
)
def test_malformed_files_are_refused(data: str, says: str) -> None:
    with pytest.raises(InvalidMarketSpec) as info:
        parse_markets(data)
    assert says in info.value.message


def test_an_unreadable_file_is_an_invalid_spec_naming_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(InvalidMarketSpec, match=r"cannot read market file .*nope\.json"):
        load_markets(missing)
