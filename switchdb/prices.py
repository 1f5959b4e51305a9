"""The price book in the store: one row per model, and the fallback models, so that every replica
and every switchd price usage alike (`switchdb price list|set|fallback`).

Rates are the integers of common/pricing.py (milli-USD per 1M tokens, i.e. nano-USD per token;
nano-USD per minute), NULL where the model has no such rate. The table is seeded from
`common.pricing.DEFAULT_PRICES` by its migration; afterwards only the operator changes it.

`load_book` reads the table on every call (a dozen rows) and rebuilds the `PriceBook` only when
the rows changed: a `price set` prices the very next usage batch, without a restart.
"""
from __future__ import annotations

import json
import logging
import threading
import uuid
from datetime import UTC, datetime

import attrs

from common.errors import ErrorCode, SwitchError
from common.pricing import (  # book_from_json: the wire format's reader, shared with switchd
    DEFAULT_PRICES,
    PRICE_TYPES,
    ModelPrices,
    PriceBook,
    book_from_json as book_from_json,
    check_model_name,
    default_book,
)
from switchdb.db import Connection, utc_now

log = logging.getLogger(__name__)

FALLBACK = "price_fallback"
TRANSCRIPTION_FALLBACK = "price_transcription_fallback"
_RATE_COLUMNS = ", ".join(PRICE_TYPES)
_COLUMNS = f"model, {_RATE_COLUMNS}, as_of, source, note"


def create_tables(conn: Connection) -> None:
    """The migration: the tables (SQL both stores take: BIGINT is an integer in SQLite) and the seed."""
    rates = ", ".join(f"{name} BIGINT" for name in PRICE_TYPES)
    conn.execute(
        f"CREATE TABLE IF NOT EXISTS prices (model TEXT PRIMARY KEY, {rates}, as_of TEXT NOT NULL,"
        " source TEXT NOT NULL, note TEXT NOT NULL, updated_at TEXT NOT NULL)"
    )
    conn.execute("CREATE TABLE IF NOT EXISTS ledger_settings (name TEXT PRIMARY KEY, value TEXT NOT NULL)")
    now = utc_now()
    marks = ", ".join(["?"] * (len(PRICE_TYPES) + 5))
    for model, prices in DEFAULT_PRICES.items():
        conn.execute(
            f"INSERT INTO prices ({_COLUMNS}, updated_at) VALUES ({marks}) ON CONFLICT (model) DO NOTHING",
            (model, *_rates(prices), prices.as_of, prices.source, prices.note, now),
        )
    book = default_book()
    for name, value in ((FALLBACK, book.fallback), (TRANSCRIPTION_FALLBACK, book.transcription_fallback)):
        conn.execute("INSERT INTO ledger_settings (name, value) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
                     (name, value))


def _rates(prices: ModelPrices) -> tuple[int | None, ...]:
    return tuple(getattr(prices, name) for name in PRICE_TYPES)


_lock = threading.Lock()
_cache: tuple[object, PriceBook] | None = None
_bad_book_logged = False


def _read(conn: Connection) -> tuple[tuple[tuple[object, ...], ...], tuple[tuple[str, str], ...]]:
    rows = tuple(tuple(row) for row in conn.execute(f"SELECT {_COLUMNS} FROM prices ORDER BY model"))
    settings = tuple(
        (str(name), str(value)) for name, value in conn.execute(
            "SELECT name, value FROM ledger_settings WHERE name IN (?, ?) ORDER BY name",
            (FALLBACK, TRANSCRIPTION_FALLBACK),
        )
    )
    return rows, settings


def _build(rows: tuple[tuple[object, ...], ...], settings: tuple[tuple[str, str], ...]) -> PriceBook:
    models = {}
    for model, *rest in rows:
        values = rest[: len(PRICE_TYPES)]
        rates = {name: None if v is None else int(v) for name, v in zip(PRICE_TYPES, values, strict=True)}  # type: ignore[call-overload]
        as_of, source, note = rest[len(PRICE_TYPES):]
        models[str(model)] = ModelPrices(**rates, as_of=str(as_of), source=str(source), note=str(note))
    named = dict(settings)
    book = default_book()
    return PriceBook(
        models,
        fallback=named.get(FALLBACK, book.fallback),
        transcription_fallback=named.get(TRANSCRIPTION_FALLBACK, book.transcription_fallback),
    )


# Every change to the book (`set_price`, `set_fallback`, `switchdb copy`) sets this setting to a
# new random value in the same transaction, so reading it tells whether the book a connection
# read before is still the store's: one small statement per transaction instead of the whole
# book (which was most of the cost of pricing a flood's usage). A store the book was never
# changed in has no such row: the seeded book, read once per connection. The book must not be
# changed any other way (by SQL by hand: then set a price again, or restart switchdb).
VERSION = "price_version"
# Per connection (by id, holding the connection so its id is not reused): (connection, version, book).
_books: dict[int, tuple[Connection, str | None, PriceBook]] = {}


def _version(conn: Connection) -> str | None:
    row = conn.execute("SELECT value FROM ledger_settings WHERE name = ?", (VERSION,)).fetchone()
    return None if row is None else str(row[0])


def bump_version(conn: Connection) -> None:
    """Mark the book changed (inside the caller's transaction, which changed it)."""
    conn.execute(
        "INSERT INTO ledger_settings (name, value) VALUES (?, ?)"
        " ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        (VERSION, uuid.uuid4().hex),
    )


def load_book(conn: Connection) -> PriceBook:
    """The store's price book, as this transaction sees it. Should it be unusable (a fallback
    without a rate, which `set_price` and `set_fallback` refuse to make), the shipped book prices
    usage and an error is logged once: billing never stops and never prices at zero."""
    version = _version(conn)
    known = _books.get(id(conn))
    if known is not None and known[0] is conn and known[1] == version:
        return known[2]
    book = _read_book(conn)
    if book is not None:
        with _lock:
            if len(_books) > 16:
                _books.clear()
            _books[id(conn)] = (conn, version, book)
        return book
    return default_book()


def _read_book(conn: Connection) -> PriceBook | None:
    """The stored book read in full, or None (logged once) when it is unusable."""
    global _cache, _bad_book_logged
    key = _read(conn)
    cached = _cache
    if cached is not None and cached[0] == key:
        return cached[1]
    try:
        book = _build(*key)
    except SwitchError as exc:
        if not _bad_book_logged:
            _bad_book_logged = True
            log.error("the stored price book is unusable (%s); pricing by the shipped book", exc.message)
        return None
    with _lock:
        _cache = (key, book)
    return book


def _today() -> str:
    return datetime.now(UTC).date().isoformat()


def set_price(
    conn: Connection, model: str, rates: dict[str, int], source: str | None = None, as_of: str | None = None
) -> PriceBook:
    """Change (or add) a model's rates; the rates not given keep their value (NULL for a new model).

    Inside the caller's transaction; raises EXTERNAL_BAD_PARAMS for a bad name, rate or date, or
    when the change would leave a fallback without a rate it needs (nothing is then changed).
    """
    check_model_name(model)
    unknown = set(rates) - set(PRICE_TYPES)
    if unknown:
        raise SwitchError(ErrorCode.EXTERNAL_BAD_PARAMS, f"unknown price types {sorted(unknown)}")
    current = load_book(conn).models.get(model)
    base = current if current is not None else ModelPrices()
    try:
        updated = attrs.evolve(
            base, **rates, as_of=as_of or _today(), source=source if source is not None else "set by the operator",
            note="" if current is None else base.note,
        )
    except SwitchError as exc:
        raise SwitchError(ErrorCode.EXTERNAL_BAD_PARAMS, exc.message) from None
    now = utc_now()
    marks = ", ".join(["?"] * (len(PRICE_TYPES) + 5))
    updates = ", ".join(f"{name} = excluded.{name}" for name in (*PRICE_TYPES, "as_of", "source", "note", "updated_at"))
    conn.execute(
        f"INSERT INTO prices ({_COLUMNS}, updated_at) VALUES ({marks}) ON CONFLICT (model) DO UPDATE SET {updates}",
        (model, *_rates(updated), updated.as_of, updated.source, updated.note, now),
    )
    bump_version(conn)
    return _checked(conn)


def set_fallback(conn: Connection, model: str, transcription: bool = False) -> PriceBook:
    """Make `model` (which must be in the book, with every rate it may be asked for) a fallback."""
    check_model_name(model)
    name = TRANSCRIPTION_FALLBACK if transcription else FALLBACK
    conn.execute(
        "INSERT INTO ledger_settings (name, value) VALUES (?, ?)"
        " ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        (name, model),
    )
    bump_version(conn)
    return _checked(conn)


def _checked(conn: Connection) -> PriceBook:
    try:
        return _build(*_read(conn))
    except SwitchError as exc:  # the caller's transaction is rolled back
        raise SwitchError(ErrorCode.EXTERNAL_BAD_PARAMS, exc.message) from None


def book_json(book: PriceBook) -> str:
    """The book as switchd gets it (VALIDATE_AND_LOAD of a USD account), in the integer units of
    common/pricing.py: {"fallback", "transcription_fallback", "models": {name: {rate: int|null}}}."""
    return _book_json_cached(book)


_json_cache: dict[int, tuple[PriceBook, str]] = {}


def _book_json_cached(book: PriceBook) -> str:
    found = _json_cache.get(id(book))
    if found is not None and found[0] is book:
        return found[1]
    text = json.dumps(
        {
            "fallback": book.fallback,
            "transcription_fallback": book.transcription_fallback,
            "models": {
                name: dict(zip(PRICE_TYPES, _rates(prices), strict=True))
                for name, prices in sorted(book.models.items())
            },
        },
        separators=(",", ":"),
    )
    if len(_json_cache) > 8:
        _json_cache.clear()
    _json_cache[id(book)] = (book, text)
    return text


def price_rows(book: PriceBook) -> list[dict[str, object]]:
    """The book as `price list --json` shows it: USD decimal strings, null where a rate is absent."""
    return [
        {
            "model": name,
            **prices.as_usd(),
            "as_of": prices.as_of,
            "source": prices.source,
            "note": prices.note,
            "fallback": name == book.fallback,
            "transcription_fallback": name == book.transcription_fallback,
        }
        for name, prices in sorted(book.models.items())
    ]

