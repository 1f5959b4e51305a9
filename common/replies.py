"""switchdb's replies as switchd reads them: one frozen record per reply type, decoded only here."""
from __future__ import annotations

from collections.abc import Sequence

import attrs

from common.errors import ErrorCode, SwitchError
from common.pricing import PriceBook, book_from_json

USD = "usd"


@attrs.frozen
class Pricing:
    """How a USD account pays: the book's rates and its markup (ten-thousandths: 1.3 is 13000)."""

    markup: int
    book: PriceBook


@attrs.frozen
class Validated:
    """VALIDATE_AND_LOAD: whose key, the balance in the account's unit, the session to restore."""

    account_id: str
    balance: int  # tokens, or nano-USD when `pricing` is set
    restore: str  # the stored session.update with the conversation, or ""
    pricing: Pricing | None = None  # None: a token account

    @classmethod
    def decode(cls, fields: Sequence[str]) -> Validated:
        try:
            if len(fields) == 3:
                return cls(fields[0], int(fields[1]), fields[2])
            if len(fields) == 6 and fields[3] == USD:
                return cls(fields[0], int(fields[1]), fields[2], Pricing(int(fields[4]), book_from_json(fields[5])))
        except ValueError:
            pass
        raise SwitchError(ErrorCode.INTERNAL_MALFORMED_MESSAGE, f"a VALIDATE_AND_LOAD reply of {len(fields)} fields")


@attrs.frozen
class Recorded:
    """RECORD_USAGE: the account's balance once the batch is in, in the account's unit."""

    balance: int

    @classmethod
    def decode(cls, fields: Sequence[str]) -> Recorded:
        try:
            return cls(int(fields[0]))
        except (IndexError, ValueError):
            raise SwitchError(ErrorCode.INTERNAL_MALFORMED_MESSAGE, "a RECORD_USAGE reply without a balance") from None
