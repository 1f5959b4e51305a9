"""Account emails: one account whatever the case (non-ASCII too), and a valid address shape."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.emails import MAX_EMAIL, check_email, email_key
from common.errors import ErrorCode, SwitchError


@pytest.mark.parametrize("a,b", [
    ("Ops@Example.com", "ops@example.COM"),
    ("Zoë@Exämple.de", "ZOË@EXÄMPLE.DE"),
    ("zoe\u0308@example.com", "Zo\u00eb@example.com"),  # decomposed and composed ë
    ("strasse@example.com", "STRAẞE@example.com"),  # ß folds to ss
    ("ΣΊΣΥΦΟΣ@example.gr", "σίσυφος@example.gr"),  # final sigma
    ("ｏｐｓ@example.com", "ops@example.com"),  # full-width letters
    ("ПОЧТА@пример.рф", "почта@пример.рф"),
])
def test_addresses_differing_only_in_case_or_form_are_one_account(a: str, b: str) -> None:
    assert email_key(a) == email_key(b)


def test_different_addresses_stay_different() -> None:
    assert email_key("ops@example.com") != email_key("0ps@example.com")
    assert email_key("zoe@example.com") != email_key("zoë@example.com")


@given(st.text(max_size=30))
def test_the_key_is_stable(text: str) -> None:
    key = email_key(text)
    assert email_key(key) == key
    assert email_key(text.upper()) == email_key(text.lower()) or text.upper().lower() != text.lower()


@pytest.mark.parametrize("address", [
    "x@example.com", "first.last+tag@sub.example.co.uk", "zoë@exämple.de", "почта@пример.рф",
    "demo@realtime-switch.local", "a@b.c", "o'brien@example.ie", "a" * 64 + "@example.com",
])
def test_valid_addresses(address: str) -> None:
    assert check_email(address) == address


@pytest.mark.parametrize("address,fragment", [
    ("not-an-email", "exactly one @"), ("a@b@example.com", "exactly one @"), ("@example.com", "1 to 64"),
    ("a" * 65 + "@example.com", "1 to 64"), ("a b@example.com", "special"), ("a\x00@example.com", "special"),
    (" a@example.com", "special"), ('"a"@example.com', "special"), (".a@example.com", "dot"),
    ("a..b@example.com", "dot"),
    ("a.@example.com", "dot"), ("a@", "1 to 255"), ("a@localhost", "needs a dot"), ("a@example..com", "empty"),
    ("a@-example.com", "hyphens"), ("a@example.com-", "hyphens"), ("a@exa_mple.com", "hyphens"),
    ("a@example.com ", "hyphens"), ("a@" + "x" * 64 + ".com", "over-long"),
    ("a@" + ".".join(["x" * 60] * 5), f"at most {MAX_EMAIL}"),
])
def test_invalid_addresses_are_refused_saying_why(address: str, fragment: str) -> None:
    with pytest.raises(SwitchError) as exc:
        check_email(address)
    assert exc.value.code == ErrorCode.EXTERNAL_BAD_PARAMS and fragment in exc.value.message


def test_only_text_is_an_address() -> None:
    with pytest.raises(SwitchError):
        check_email(None)
