"""Property: any JSON object with a usable id is accepted and loses nothing."""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.roistat import CallEndPayload, parse_webhook

MODEL_FIELDS = sorted(CallEndPayload.model_fields)

# orjson writes integers of 64 bits at most; NaN and infinities are not JSON.
# U+0000 is replaced on purpose (PostgreSQL cannot store it): see test_unit_roistat.py.
text = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00"))
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | text
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(text, children, max_size=4),
    max_leaves=12,
)
# Model fields (with any JSON value in them), unknown keys, and names pydantic uses itself.
keys = (
    st.sampled_from(MODEL_FIELDS)
    | text
    | st.sampled_from(["model_config", "model_extra", "__class__", "_private", "__dict__"])
)
call_ids = st.integers(min_value=-(2**63), max_value=2**64 - 1) | text.filter(
    lambda s: bool(s.strip()) and len(s.strip().encode()) <= 128  # longer ids are refused
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fields=st.dictionaries(keys, json_values, max_size=8), call_id=call_ids)
def test_any_object_with_a_usable_id_is_accepted_and_kept(
    fields: dict[str, Any], call_id: int | str
) -> None:
    document = {**fields, "id": call_id}

    webhook = parse_webhook(orjson.dumps(document), "start")

    expected_id = call_id.strip() if isinstance(call_id, str) else str(call_id)
    assert webhook.payload.id == expected_id
    assert webhook.document == document
    extra = webhook.payload.model_extra
    assert extra is not None
    unknown = {key: value for key, value in document.items() if key not in MODEL_FIELDS}
    assert extra == unknown
    for key, value in unknown.items():
        assert type(extra[key]) is type(value)
