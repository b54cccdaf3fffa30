"""The SQL the storage adapter generates agrees with the event's model of a call row."""

from __future__ import annotations

from schemas.events import CallFields
from workers.storage import MERGED_COLUMNS, RETURNED_COLUMNS, UPSERT_CALLS


def test_the_upsert_returns_exactly_the_fields_of_the_event_call() -> None:
    assert sorted(RETURNED_COLUMNS) == sorted(CallFields.model_fields)
    assert len(set(RETURNED_COLUMNS)) == len(RETURNED_COLUMNS)
    assert f"RETURNING project, {', '.join(RETURNED_COLUMNS)}" in UPSERT_CALLS


def test_every_merged_column_is_a_public_field_and_merged_once() -> None:
    assert set(MERGED_COLUMNS) <= set(CallFields.model_fields)
    for name in MERGED_COLUMNS:
        assert UPSERT_CALLS.count(f"\n    {name} = CASE WHEN EXCLUDED.end_received_at") == 1, name
        assert f" {name} {MERGED_COLUMNS[name]}" in UPSERT_CALLS, name


def test_the_new_roistat_columns_are_merged() -> None:
    new = {"first_visit", *(f"roistat_param_{n}" for n in range(1, 6))}
    assert new <= set(MERGED_COLUMNS)
    assert all(MERGED_COLUMNS[name] == "text" for name in new)
