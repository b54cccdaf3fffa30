"""schemas/asyncapi.yaml: valid for the official AsyncAPI parser, and true to the code.

The parser is the npm package in tests/asyncapi/ (`make install` installs it); the document's
payload is a $ref to the generated JSON Schema, so the file is never a stale copy.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from itertools import product
from pathlib import Path
from typing import Any, get_args

import pytest

from infra.settings import Settings
from schemas.events import CallEvent, EventType, Outcome
from schemas.jsonschema import JSON_DIR
from schemas.topology import Topology, event_routing_key

ROOT = Path(__file__).resolve().parents[2]
DOCUMENT = ROOT / "schemas" / "asyncapi.yaml"
EVENT_SCHEMA = JSON_DIR / "call-event.schema.json"
NODE_PROJECT = ROOT / "tests" / "asyncapi"
PARSER = NODE_PROJECT / "node_modules" / "@asyncapi" / "parser" / "package.json"
INSTALL = "run `make install` (it runs npm ci --prefix tests/asyncapi)"
PARSE_TIMEOUT_S = 60
PARAMETER = re.compile(r"\{([^{}]+)\}")


@pytest.fixture(scope="module")
def parsed() -> dict[str, Any]:
    """What tests/asyncapi/validate.mjs reports; fails (never skips) without node or the parser."""
    node = shutil.which("node")
    if node is None:
        pytest.fail(
            f"`node` is not on PATH: install Node.js 20 or later, then {INSTALL}", pytrace=False
        )
    if not PARSER.is_file():
        pytest.fail(
            f"the AsyncAPI parser is not installed in {NODE_PROJECT}: {INSTALL}", pytrace=False
        )
    try:
        result = subprocess.run(
            [node, "validate.mjs", str(DOCUMENT)],
            cwd=NODE_PROJECT,
            capture_output=True,
            text=True,
            timeout=PARSE_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"the AsyncAPI parser did not finish in {PARSE_TIMEOUT_S}s", pytrace=False)
    if result.returncode != 0:
        pytest.fail(
            f"the AsyncAPI parser rejected {DOCUMENT} (exit {result.returncode}):\n{result.stderr}",
            pytrace=False,
        )
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def _without_parser_annotations(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            key: _without_parser_annotations(item)
            for key, item in value.items()
            if not key.startswith("x-parser-")
        }
    if isinstance(value, list):
        return [_without_parser_annotations(item) for item in value]
    return value


def _dereferenced(value: Any, defs: dict[str, Any]) -> Any:
    """Inline `#/$defs/...` refs; keywords beside a $ref are dropped, as the parser does."""
    if isinstance(value, dict):
        ref = value.get("$ref")
        if isinstance(ref, str):
            assert ref.startswith("#/$defs/"), f"unexpected $ref {ref!r} in {EVENT_SCHEMA.name}"
            return _dereferenced(defs[ref.removeprefix("#/$defs/")], defs)
        return {key: _dereferenced(item, defs) for key, item in value.items()}
    if isinstance(value, list):
        return [_dereferenced(item, defs) for item in value]
    return value


def _generated_event_schema() -> dict[str, Any]:
    schema: dict[str, Any] = json.loads(EVENT_SCHEMA.read_text(encoding="utf-8"))
    resolved: dict[str, Any] = _dereferenced(schema, schema.get("$defs", {}))
    return resolved


def _routing_keys(channel: dict[str, Any]) -> set[str]:
    """Every routing key a channel's address stands for, one per value of its parameters."""
    address: str = channel["address"]
    names = PARAMETER.findall(address)
    choices = [channel["parameters"][name]["enum"] for name in names]
    keys = set()
    for values in product(*choices):
        key = address
        for name, value in zip(names, values, strict=True):
            key = key.replace(f"{{{name}}}", value)
        keys.add(key)
    return keys


def test_the_installed_parser_is_the_locked_one(parsed: dict[str, Any]) -> None:
    lock = json.loads((NODE_PROJECT / "package-lock.json").read_text(encoding="utf-8"))
    locked = lock["packages"]["node_modules/@asyncapi/parser"]["version"]
    assert parsed["parser_version"] == locked, f"stale tests/asyncapi/node_modules: {INSTALL}"
    assert parsed["asyncapi"] == "3.0.0"


def test_each_message_payload_is_the_generated_event_schema(parsed: dict[str, Any]) -> None:
    expected = _generated_event_schema()
    assert len(parsed["messages"]) == len(get_args(EventType))
    for message in parsed["messages"]:
        payload = _without_parser_annotations(message["payload"])
        call, expected_call = payload["properties"]["call"], expected["properties"]["call"]
        for part, got, want in (("envelope", payload, expected), ("call", call, expected_call)):
            assert sorted(got["properties"]) == sorted(want["properties"]), (message["id"], part)
            assert got["required"] == want["required"], (message["id"], part)
        assert payload == expected, message["id"]


def test_documented_routing_keys_are_those_the_workers_publish(parsed: dict[str, Any]) -> None:
    documented = [key for channel in parsed["channels"] for key in _routing_keys(channel)]
    published = [event_routing_key("call.started", None), event_routing_key("call.stale", None)]
    published += [event_routing_key("call.ended", outcome) for outcome in get_args(Outcome)]
    assert sorted(documented) == sorted(published)
    assert {message["name"] for message in parsed["messages"]} == set(get_args(EventType))


def test_outcome_parameter_lists_every_outcome(parsed: dict[str, Any]) -> None:
    (ended,) = [c for c in parsed["channels"] if "{outcome}" in c["address"]]
    assert ended["parameters"]["outcome"]["enum"] == list(get_args(Outcome))


def test_channels_are_routing_keys_on_the_durable_events_topic_exchange(
    parsed: dict[str, Any],
) -> None:
    default_namespace = Settings.model_fields["namespace"].default
    for channel in parsed["channels"]:
        amqp = channel["bindings"]["amqp"]
        assert amqp["is"] == "routingKey", channel["id"]
        assert amqp["exchange"] == {
            "name": Topology(default_namespace).events_exchange,
            "type": "topic",
            "durable": True,
            "autoDelete": False,
        }, channel["id"]


def test_namespace_and_bound_queues_follow_the_topology(parsed: dict[str, Any]) -> None:
    namespace = parsed["extensions"]["x-callpipe-namespace"]
    assert namespace["default"] == Settings.model_fields["namespace"].default
    topology = Topology("some_ns")
    assert namespace["exchange"].format(ns="some_ns") == topology.events_exchange
    assert [queue.format(ns="some_ns", name="crm") for queue in namespace["bound_queues"]] == [
        topology.subscription_queue("crm"),
        topology.sink_queue("crm"),
    ]


def test_subscribers_receive_acked_persistent_json_deduped_by_event_id(
    parsed: dict[str, Any],
) -> None:
    channels = {channel["id"] for channel in parsed["channels"]}
    assert {c for op in parsed["operations"] for c in op["channels"]} == channels
    for operation in parsed["operations"]:
        assert operation["action"] == "receive", operation["id"]
        amqp = operation["bindings"]["amqp"]
        assert (amqp["deliveryMode"], amqp["ack"]) == (2, True), operation["id"]
    for message in parsed["messages"]:
        assert message["content_type"] == "application/json", message["id"]
        assert message["correlation_id"] == "$message.payload#/event_id", message["id"]


def test_examples_are_valid_events_on_their_channel(parsed: dict[str, Any]) -> None:
    """The parser does not check AsyncAPI 3 examples against the payload: the model does."""
    keys_of_message = {
        message_id: _routing_keys(channel)
        for channel in parsed["channels"]
        for message_id in channel["messages"]
    }
    for message in parsed["messages"]:
        assert message["examples"], message["id"]
        for example in message["examples"]:
            event = CallEvent.model_validate(example["payload"])
            assert event.type == message["name"], example["name"]
            key = event_routing_key(event.type, event.call.outcome)
            assert key in keys_of_message[message["id"]], example["name"]
