"""Phone numbers to E.164, with the caller's region and carrier from offline data."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import phonenumbers
from phonenumbers import carrier, geocoder

# Roistat's users are mostly Russian-speaking; region names read as they would locally.
GEO_LANGUAGE = "ru"


@dataclass(frozen=True)
class Phone:
    e164: str
    region: str | None
    carrier: str | None


def _parse(raw: str, default_region: str) -> phonenumbers.PhoneNumber | None:
    try:
        number = phonenumbers.parse(raw, default_region)
    except phonenumbers.NumberParseException:
        number = None
    if number is not None and phonenumbers.is_valid_number(number):
        return number
    digits = "".join(ch for ch in raw if ch.isdigit())
    # Roistat sends international numbers as bare digits: 380501234567 is Ukraine, not RU.
    if len(digits) >= 8 and not raw.lstrip().startswith("+"):
        try:
            international = phonenumbers.parse("+" + digits, None)
        except phonenumbers.NumberParseException:
            international = None
        if international is not None and phonenumbers.is_valid_number(international):
            return international
    if number is not None and phonenumbers.is_possible_number(number):
        return number
    return None


@lru_cache(maxsize=65536)
def normalize_phone(raw: str | None, default_region: str) -> Phone | None:
    """E.164 and where it is from; None for a missing or impossible number (e.g. `anonymous`)."""
    if raw is None or not raw.strip():
        return None
    number = _parse(raw, default_region)
    if number is None:
        return None
    return Phone(
        e164=phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164),
        region=geocoder.description_for_number(number, GEO_LANGUAGE) or None,
        carrier=carrier.name_for_number(number, GEO_LANGUAGE) or None,
    )


def mask_phone(value: str | None) -> str:
    """A phone number safe for logs: country prefix and last two digits, e.g. `+7999*****11`."""
    if not value:
        return "-"
    if len(value) <= 6:
        return "*" * len(value)
    return value[:4] + "*" * (len(value) - 6) + value[-2:]
