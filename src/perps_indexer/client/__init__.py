"""A client for perps-indexer and any server speaking the same WebSocket protocol.

- :class:`Client`: asyncio; ``async for message in client.subscribe(...)``.
- :class:`SyncClient`: the same in one background thread; blocking iterators or callbacks.
- Typed rows (:class:`Position`, :class:`Trade`, :class:`OpenOrder`, :class:`OrderHistory`,
  :class:`BookLevel`, :class:`RecentTrade`, :class:`BestPrice`, :class:`DepositWithdraw`,
  :class:`FundingRate`) in every :class:`Message`; :class:`OrderBook` keeps a local book.
"""

from perps_indexer.client.aio import (
    Client,
    ConnectionState,
    StateChange,
    Subscription,
)
from perps_indexer.client.backoff import Backoff
from perps_indexer.client.book import OrderBook, OrderBooks
from perps_indexer.client.errors import (
    ClientClosed,
    ClientError,
    ConnectFailed,
    ServerError,
    SubscriptionRejected,
)
from perps_indexer.client.rows import (
    BestPrice,
    BookLevel,
    DepositWithdraw,
    FundingRate,
    Message,
    OpenOrder,
    OrderHistory,
    Position,
    RecentTrade,
    Trade,
)
from perps_indexer.client.sync import SyncClient, SyncSubscription

__all__ = [
    "Backoff",
    "BestPrice",
    "BookLevel",
    "Client",
    "ClientClosed",
    "ClientError",
    "ConnectFailed",
    "ConnectionState",
    "DepositWithdraw",
    "FundingRate",
    "Message",
    "OpenOrder",
    "OrderBook",
    "OrderBooks",
    "OrderHistory",
    "Position",
    "RecentTrade",
    "ServerError",
    "StateChange",
    "Subscription",
    "SubscriptionRejected",
    "SyncClient",
    "SyncSubscription",
    "Trade",
]
