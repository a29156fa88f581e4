"""perps-indexer: a perpetual-futures indexer with a real-time WebSocket API."""

__version__ = "0.1.0"
