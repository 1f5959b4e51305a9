"""Account emails: a valid address shape, and the key that makes them unique whatever their case.

Uniqueness is by `email_key`: Unicode compatibility normalisation and case folding (NFKC, then
casefold, then NFKC again, since folding can undo the normal form), so `Zoë@Example.com`,
`ZOË@EXAMPLE.COM` and a decomposed `Zoe\u0308@example.com` are one account, and `ß` matches `ss`
as `str.casefold` has it. The address is kept as the operator typed it; only the key is compared.

The shape check is deliberately plain (what an operator would type, not all of RFC 5322): one
`@`, a local part of 1 to 64 characters without spaces, controls, `@` or quotes, not starting or
ending with a dot nor holding two in a row; a domain of dot-separated labels of letters (any
script), digits and inner hyphens, 1 to 63 characters each, at least two labels, 255 characters
at most; 254 characters in all.
"""
from __future__ import annotations

import unicodedata

from common.errors import ErrorCode, SwitchError

MAX_EMAIL = 254
MAX_LOCAL = 64
MAX_DOMAIN = 255
MAX_LABEL = 63
_LOCAL_FORBIDDEN = frozenset('@"\\(),:;<>[]')


def email_key(address: str) -> str:
    """The form two addresses are compared in: equal keys are the same account."""
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", address).casefold())


def check_email(address: object) -> str:
    """`address` when it has a valid shape (see the module docstring), else
    SwitchError(EXTERNAL_BAD_PARAMS) saying what is wrong."""
    if not isinstance(address, str):
        raise _bad("an email address must be text")
    if len(address) > MAX_EMAIL:
        raise _bad(f"an email address has at most {MAX_EMAIL} characters")
    if address.count("@") != 1:
        raise _bad(f"{address!r} is not an email address (it needs exactly one @)")
    local, domain = address.split("@")
    if not 0 < len(local) <= MAX_LOCAL:
        raise _bad(f"the part before @ in {address!r} must have 1 to {MAX_LOCAL} characters")
    if any(not c.isprintable() or c.isspace() or c in _LOCAL_FORBIDDEN for c in local):
        raise _bad(f"the part before @ in {address!r} has a space, control or special character")
    if local.startswith(".") or local.endswith(".") or ".." in local:
        raise _bad(f"the part before @ in {address!r} has a misplaced dot")
    if not 0 < len(domain) <= MAX_DOMAIN:
        raise _bad(f"the domain in {address!r} must have 1 to {MAX_DOMAIN} characters")
    labels = domain.split(".")
    if len(labels) < 2:
        raise _bad(f"the domain in {address!r} needs a dot (like example.com)")
    for label in labels:
        if not 0 < len(label) <= MAX_LABEL:
            raise _bad(f"the domain in {address!r} has an empty or over-long part")
        if label.startswith("-") or label.endswith("-") or not all(c.isalnum() or c == "-" for c in label):
            raise _bad(f"the domain in {address!r} may only hold letters, digits and inner hyphens")
    return address


def _bad(message: str) -> SwitchError:
    return SwitchError(ErrorCode.EXTERNAL_BAD_PARAMS, message)
