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


# Kinds of number with a carrier in the offline data (as `phonenumbers.carrier` decides).
_CARRIER_KINDS = frozenset(
    {
        phonenumbers.PhoneNumberType.MOBILE,
        phonenumbers.PhoneNumberType.FIXED_LINE_OR_MOBILE,
        phonenumbers.PhoneNumberType.PAGER,
    }
)
_UNKNOWN = phonenumbers.PhoneNumberType.UNKNOWN


def _parse(raw: str, default_region: str) -> tuple[phonenumbers.PhoneNumber, int] | None:
    """The number and its kind (`PhoneNumberType`; UNKNOWN: possible, but not valid).

    The kind is worked out once: a valid number is one of a known kind, and the region and
    carrier lookups below need the kind too (each of phonenumbers' own lookups would work it
    out again, a third of the cost of a new number)."""
    try:
        number = phonenumbers.parse(raw, default_region)
    except phonenumbers.NumberParseException:
        number = None
    if number is not None and (kind := phonenumbers.number_type(number)) != _UNKNOWN:
        return number, kind
    digits = "".join(ch for ch in raw if ch.isdigit())
    # Roistat sends international numbers as bare digits: 380501234567 is Ukraine, not RU.
    if len(digits) >= 8 and not raw.lstrip().startswith("+"):
        try:
            international = phonenumbers.parse("+" + digits, None)
        except phonenumbers.NumberParseException:
            international = None
        if (
            international is not None
            and (kind := phonenumbers.number_type(international)) != _UNKNOWN
        ):
            return international, kind
    if number is not None and phonenumbers.is_possible_number(number):
        return number, _UNKNOWN
    return None


def _region_name(number: phonenumbers.PhoneNumber, kind: int) -> str:
    """`geocoder.description_for_number`, given the kind."""
    if kind == _UNKNOWN:
        return ""
    country_code = number.country_code or 0  # set by every parse
    if phonenumbers.is_number_type_geographical(kind, country_code):
        return geocoder.description_for_valid_number(number, GEO_LANGUAGE)
    return geocoder.country_name_for_number(number, GEO_LANGUAGE)


def _carrier_name(number: phonenumbers.PhoneNumber, kind: int) -> str:
    """`carrier.name_for_number`, given the kind."""
    return carrier.name_for_valid_number(number, GEO_LANGUAGE) if kind in _CARRIER_KINDS else ""


@lru_cache(maxsize=65536)
def normalize_phone(raw: str | None, default_region: str) -> Phone | None:
    """E.164 and where it is from; None for a missing or impossible number (e.g. `anonymous`)."""
    if raw is None or not raw.strip():
        return None
    parsed = _parse(raw, default_region)
    if parsed is None:
        return None
    number, kind = parsed
    return Phone(
        e164=phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164),
        region=_region_name(number, kind) or None,
        carrier=_carrier_name(number, kind) or None,
    )
