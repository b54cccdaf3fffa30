"""Phone numbers out of logs and out of what the dead-letter commands print: pure.

`mask_phone` masks one number, for a log line. In a document, the fields that hold phones
(`caller`, `callee`, anywhere in a webhook or an event) are masked whatever their form; any
other text is masked where it has a run of 10 to 15 digits, which is how Roistat writes a
phone number. Ids (`id`, `visit_id`, ...) are left as they are.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

PHONE_KEYS = frozenset({"caller", "callee", "phone"})
ID_KEYS = frozenset(
    {
        "id",
        "call_id",
        "event_id",
        "visit_id",
        "order_id",
        "file_id",
        "google_client_id",
        "metrika_client_id",
    }
)
_PHONE_RUN = re.compile(r"(?<!\d)\+?\d{10,15}(?!\d)")


def mask_phone(value: str | None) -> str:
    """A phone number safe for logs: country prefix and last two digits, e.g. `+7999*****11`."""
    if not value:
        return "-"
    if len(value) <= 6:
        return "*" * len(value)
    return value[:4] + "*" * (len(value) - 6) + value[-2:]


def mask_text(text: str) -> str:
    """Every phone-like run of digits in `text` masked."""
    return _PHONE_RUN.sub(lambda found: mask_phone(found.group()), text)


def masked(value: Any, key: str | None = None) -> Any:
    """A JSON value with phones masked (see the module's docstring)."""
    if isinstance(value, dict):
        return {name: masked(item, str(name)) for name, item in value.items()}
    if isinstance(value, list):
        return [masked(item, key) for item in value]
    if value is None or isinstance(value, bool):
        return value
    if key in PHONE_KEYS:
        return mask_phone(str(value))
    if key in ID_KEYS:
        return value
    if isinstance(value, str):
        return mask_text(value)
    if isinstance(value, int) and _PHONE_RUN.fullmatch(str(value)):
        return mask_phone(str(value))
    return value


def _phone_values(value: Any, key: str | None = None) -> Iterator[str]:
    if isinstance(value, dict):
        for name, item in value.items():
            yield from _phone_values(item, str(name))
    elif isinstance(value, list):
        for item in value:
            yield from _phone_values(item, key)
    elif key in PHONE_KEYS and value is not None and not isinstance(value, bool):
        text = str(value).strip()
        if text:
            yield text


def phones_in(document: Any, body: bytes) -> list[str]:
    """The phones a message carries, each once: from its phone fields when the body is a JSON
    object or array, else from phone-like runs of digits in its text."""
    if isinstance(document, dict | list):
        found = list(_phone_values(document))
    else:
        found = _PHONE_RUN.findall(body.decode("utf-8", "replace"))
    # One number written two ways (`+7999...` in an event, `7999...` in its raw webhook).
    first: dict[str, str] = {}
    for phone in found:
        first.setdefault("".join(filter(str.isdigit, phone)) or phone, phone)
    return list(first.values())


def masked_phones(document: Any, body: bytes) -> list[str]:
    return list(dict.fromkeys(mask_phone(phone) for phone in phones_in(document, body)))
