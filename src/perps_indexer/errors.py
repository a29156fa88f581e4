"""Every exception perps-indexer raises, in one module.

Each error has a stable machine-readable ``code`` (used in REST and WebSocket error replies) and
a message that says, in a sentence, what was wrong. A rejected command changes nothing.

Hierarchy::

    PerpsIndexerError
    ├── InvalidMarketSpec          bad market specification file
    ├── CommandRejected            the engine refused a command (state unchanged)
    │   ├── InvalidAddress
    │   ├── UnknownMarket
    │   ├── InvalidAmount
    │   ├── InvalidPrice
    │   ├── InvalidSize
    │   ├── InvalidLeverage
    │   ├── InvalidRestriction
    │   ├── InsufficientCollateral
    │   ├── LeverageMismatch
    │   ├── NoPosition
    │   ├── CloseTooLarge
    │   ├── InsufficientLiquidity
    │   ├── WouldCross
    │   ├── FillOrAbortUnfilled
    │   ├── UnknownOrder
    │   ├── InvalidTrigger
    │   └── CloseLossTooLarge
    └── IntegrityError             the event log or a store is inconsistent (a bug or corruption)
        └── SequenceGap
"""

from __future__ import annotations


class PerpsIndexerError(Exception):
    """Base class of every error raised by perps-indexer."""

    code = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidMarketSpec(PerpsIndexerError):
    """A market specification is malformed; the message names the field."""

    code = "invalid_market_spec"


class CommandRejected(PerpsIndexerError):
    """The engine rejected a command; its state is exactly as before."""

    code = "rejected"


class InvalidAddress(CommandRejected):
    code = "invalid_address"


class UnknownMarket(CommandRejected):
    code = "unknown_market"


class InvalidAmount(CommandRejected):
    code = "invalid_amount"


class InvalidPrice(CommandRejected):
    code = "invalid_price"


class InvalidSize(CommandRejected):
    code = "invalid_size"


class InvalidLeverage(CommandRejected):
    code = "invalid_leverage"


class InvalidRestriction(CommandRejected):
    code = "invalid_restriction"


class InsufficientCollateral(CommandRejected):
    code = "insufficient_collateral"


class LeverageMismatch(CommandRejected):
    code = "leverage_mismatch"


class NoPosition(CommandRejected):
    code = "no_position"


class CloseTooLarge(CommandRejected):
    code = "close_too_large"


class InsufficientLiquidity(CommandRejected):
    code = "insufficient_liquidity"


class WouldCross(CommandRejected):
    code = "post_or_abort_would_cross"


class FillOrAbortUnfilled(CommandRejected):
    code = "fill_or_abort_unfilled"


class UnknownOrder(CommandRejected):
    code = "unknown_order"


class InvalidTrigger(CommandRejected):
    code = "invalid_trigger"


class CloseLossTooLarge(CommandRejected):
    code = "close_loss_too_large"


class IntegrityError(PerpsIndexerError):
    """Stored or replayed events do not fit together: a bug or corrupted data, never user input."""

    code = "integrity_error"


class SequenceGap(IntegrityError):
    """An event's sequence number is not the one expected next."""

    code = "sequence_gap"

    def __init__(self, expected: int, got: int) -> None:
        super().__init__(f"expected event seq {expected}, got {got}")
        self.expected = expected
        self.got = got


class StoreError(PerpsIndexerError):
    """The event store cannot be opened or used: a bad URL or path, a database written by a newer
    version, or a failure of the database itself. The message says which."""

    code = "store_error"


class ConfigurationError(PerpsIndexerError):
    """The server was asked to start in an unsafe or impossible configuration."""

    code = "configuration_error"
