"""The embedded exchange engine: pure, exact and deterministic (no I/O, no clock reads)."""

from perps_indexer.engine.book import Book, Level
from perps_indexer.engine.engine import Engine, FillInfo, Ledger, OrderResult, order_type_code

__all__ = ["Book", "Engine", "FillInfo", "Ledger", "Level", "OrderResult", "order_type_code"]
