"""Phone numbers as Roistat sends them, to E.164; and masking for logs."""

from __future__ import annotations

import phonenumbers
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from phonenumbers import carrier, geocoder

from infra.masking import mask_phone
from workers.phones import GEO_LANGUAGE, Phone, normalize_phone


@pytest.mark.parametrize(
    ("raw", "e164"),
    [
        pytest.param("79990009911", "+79990009911", id="ru-mobile-7"),
        pytest.param("89990009911", "+79990009911", id="ru-mobile-8"),
        pytest.param("9990009911", "+79990009911", id="ru-mobile-10-digits"),
        pytest.param("74951234567", "+74951234567", id="moscow-landline-7"),
        pytest.param("84951234567", "+74951234567", id="moscow-landline-8"),
        pytest.param("88002000600", "+78002000600", id="toll-free-8-800"),
        pytest.param("+7 (999) 000-99-11", "+79990009911", id="formatted-plus"),
        pytest.param("8 (495) 123-45-67", "+74951234567", id="formatted-8"),
        pytest.param("7 999 000 99 11", "+79990009911", id="spaces"),
        pytest.param("+7-999-000-99-11", "+79990009911", id="dashes"),
        pytest.param(" 79990009911\n", "+79990009911", id="padded"),
        pytest.param("+380501234567", "+380501234567", id="ukraine-plus"),
        pytest.param("380501234567", "+380501234567", id="ukraine-digits-only"),
        pytest.param("375291234567", "+375291234567", id="belarus-digits-only"),
        pytest.param("4915112345678", "+4915112345678", id="germany-digits-only"),
        pytest.param("12025550123", "+12025550123", id="usa-digits-only"),
        pytest.param("+1 202 555 0123", "+12025550123", id="usa-plus"),
        pytest.param("810380501234567", "+380501234567", id="ru-international-prefix-810"),
    ],
)
def test_normalize_phone_to_e164(raw: str, e164: str) -> None:
    phone = normalize_phone(raw, "RU")
    assert phone is not None
    assert phone.e164 == e164


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(None, id="none"),
        pytest.param("", id="empty"),
        pytest.param("   ", id="whitespace"),
        pytest.param("anonymous", id="anonymous"),
        pytest.param("Anonymous", id="anonymous-capital"),
        pytest.param("unknown", id="unknown"),
        pytest.param("скрыт", id="cyrillic-hidden"),
        pytest.param("101", id="emergency-short"),
        pytest.param("112", id="emergency-112"),
        pytest.param("0", id="zero"),
        pytest.param("+", id="plus-only"),
        pytest.param("12345", id="too-short"),
    ],
)
def test_normalize_phone_rejects_what_is_no_number(raw: str | None) -> None:
    assert normalize_phone(raw, "RU") is None


@pytest.mark.parametrize(
    ("raw", "region"),
    [
        ("79990009911", "Россия"),
        ("380501234567", "Украина"),
        ("4915112345678", "Германия"),
    ],
)
def test_region_is_named_in_russian(raw: str, region: str) -> None:
    phone = normalize_phone(raw, "RU")
    assert phone is not None
    assert phone.region == region


def test_region_and_carrier_are_none_rather_than_empty() -> None:
    phone = normalize_phone("78002000600", "RU")  # toll-free: no region, no carrier
    assert phone == Phone(e164="+78002000600", region=None, carrier=None)


def test_mobile_number_has_a_carrier() -> None:
    phone = normalize_phone("79990009911", "RU")
    assert phone is not None
    assert phone.carrier


def _described_by_phonenumbers(raw: str, region: str) -> tuple[bool, str, str]:
    """Validity, region and carrier as phonenumbers' own lookups give them, each checking
    the number again: what `normalize_phone` must give while checking it once."""
    number = phonenumbers.parse(raw, region)
    return (
        phonenumbers.is_valid_number(number),
        geocoder.description_for_number(number, GEO_LANGUAGE),
        carrier.name_for_number(number, GEO_LANGUAGE),
    )


# Mobiles and landlines of countries with one region and of +7 (Russia and Kazakhstan share
# it), toll-free, non-geographic (+800, +882), and numbers that are possible but not valid.
PREFIXES = [
    "+7999",
    "+7495",
    "+7727",
    "+7700",
    "+7800",
    "+380",
    "+375",
    "+49",
    "+1",
    "+44",
    "+800",
    "+882",
    "+7",
    "+86",
    "+61",
    "+9",
]


@settings(max_examples=600, deadline=None)
@given(st.sampled_from(PREFIXES), st.text(alphabet="0123456789", min_size=4, max_size=9))
def test_region_and_carrier_are_phonenumbers_own(prefix: str, digits: str) -> None:
    raw = prefix + digits
    try:
        valid, region, carrier_name = _described_by_phonenumbers(raw, "RU")
    except phonenumbers.NumberParseException:
        return
    phone = normalize_phone.__wrapped__(raw, "RU")
    if valid:
        assert phone is not None
        assert (phone.region, phone.carrier) == (region or None, carrier_name or None)
    elif phone is not None:  # possible, not valid: nothing to look up
        assert (phone.region, phone.carrier) == (None, None)


def test_default_region_decides_national_numbers() -> None:
    ua = normalize_phone("0501234567", "UA")
    assert ua is not None
    assert ua.e164 == "+380501234567"


@pytest.mark.parametrize(
    ("value", "masked"),
    [
        (None, "-"),
        ("", "-"),
        ("1", "*"),
        ("123456", "******"),
        ("1234567", "1234*67"),
        ("+79990009911", "+799******11"),
        ("+380501234567", "+380*******67"),
    ],
)
def test_mask_phone(value: str | None, masked: str) -> None:
    assert mask_phone(value) == masked


@settings(max_examples=100, deadline=None)
@given(st.text(min_size=1))
def test_mask_phone_shows_at_most_first_four_and_last_two(value: str) -> None:
    masked = mask_phone(value)
    assert len(masked) == len(value)
    visible = [i for i, ch in enumerate(masked) if ch != "*"]
    assert all(i < 4 or i >= len(value) - 2 for i in visible)
    assert all(masked[i] == value[i] for i in visible)
    if len(value) <= 6:
        assert masked == "*" * len(value)
