"""The client's exceptions.

Hierarchy (all under :class:`perps_indexer.errors.PerpsIndexerError`)::

    ClientError
    ├── ClientClosed            the client was closed; no new subscriptions
    ├── ConnectFailed           the server cannot be reached and retrying will not help
    └── ServerError             an error reply {"message": "error", ...} from the server
        └── SubscriptionRejected    a request the server will never accept as given
"""

from __future__ import annotations

from typing import Any

from perps_indexer.errors import PerpsIndexerError


class ClientError(PerpsIndexerError):
    """Base class of every error the client raises."""

    code = "client_error"


class ClientClosed(ClientError):
    """The client is closed (or closing)."""

    code = "client_closed"


class ConnectFailed(ClientError):
    """Connecting failed in a way retrying cannot fix (bad URL, HTTP 4xx, untrusted
    certificate), or the configured number of retries ran out."""

    code = "connect_failed"


class ServerError(ClientError):
    """An error reply from the server.

    ``code`` is the server's stable code (protocol v2) or one inferred from the sentence
    (protocol v1); ``subscription`` is the subscription the reply belongs to, when known.
    """

    def __init__(
        self, message: str, *, code: str = "error", subscription: Any = None, raw: str = ""
    ) -> None:
        super().__init__(message)
        self.code = code
        self.subscription = subscription
        self.raw = raw

    def __str__(self) -> str:
        sub = self.subscription
        return f"{self.message} [{self.code}]" + (f" ({sub})" if sub is not None else "")


class SubscriptionRejected(ServerError):
    """The server refused a subscription for good (bad address, unknown topic or market):
    it ends that subscription; the connection and the other subscriptions go on."""
