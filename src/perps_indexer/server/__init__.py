"""The I/O shell: aiohttp WebSocket and REST server around the pure core."""

from perps_indexer.server.app import Server, ServerConfig

__all__ = ["Server", "ServerConfig"]
