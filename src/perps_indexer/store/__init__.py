"""Event storage: the :class:`EventStore` interface, its SQLite backend and :func:`open_store`."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

from perps_indexer.errors import StoreError
from perps_indexer.store.base import EventStore, event_keys, market_key
from perps_indexer.store.sqlite import SQLiteStore

__all__ = ["EventStore", "SQLiteStore", "event_keys", "market_key", "open_store"]

_SQLITE_PREFIX = "sqlite://"
_PLANNED = ("postgresql", "postgres")


def open_store(url_or_path: str) -> EventStore:
    """Open the event store named by a URL or a path.

    Accepts ``sqlite:///relative/path.db``, ``sqlite:////absolute/path.db`` (the path is what
    follows ``sqlite:///``), ``sqlite://`` or ``:memory:`` for an in-memory store, and a plain
    file path. A SQLite URL may end in ``?synchronous=NORMAL`` (see :class:`SQLiteStore`).
    """
    if url_or_path == ":memory:":
        return SQLiteStore(":memory:")
    if "://" not in url_or_path:
        if not url_or_path:
            raise StoreError("empty store path: give a file path, sqlite:///path or :memory:")
        return SQLiteStore(url_or_path)
    scheme = url_or_path.split("://", 1)[0].lower()
    if scheme in _PLANNED:
        raise StoreError(
            f"store URL scheme {scheme}:// is not supported yet (PostgreSQL support is planned); "
            "use sqlite:///path, a file path or :memory:"
        )
    if scheme != "sqlite":
        raise StoreError(
            f"unknown store URL scheme {scheme!r} in {url_or_path!r}: use sqlite:///path, a file "
            "path or :memory: (postgresql:// is planned)"
        )
    parts = urlsplit(url_or_path)
    if parts.netloc:
        raise StoreError(
            f"{url_or_path!r}: a SQLite URL has no host; write sqlite:///relative.db or "
            "sqlite:////absolute/path.db"
        )
    # urlsplit keeps the leading "/" of the path: sqlite:///x.db -> "/x.db" -> "x.db".
    path = parts.path[1:] if parts.path.startswith("/") else parts.path
    options = parse_qs(parts.query, keep_blank_values=True, strict_parsing=False)
    synchronous = "FULL"
    for name, values in options.items():
        if name != "synchronous" or len(values) != 1:
            raise StoreError(
                f"{url_or_path!r}: unknown or repeated option {name!r} (only synchronous=...)"
            )
        synchronous = values[0]
    return SQLiteStore(path or ":memory:", synchronous=synchronous)
