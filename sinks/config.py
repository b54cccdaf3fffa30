"""The sinks file (`CALLPIPE_SINKS_FILE`, TOML): one table array per sink kind. Parsing only."""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from schemas.topology import topic_matches, validate_endpoint_name
from sinks.retry import DEFAULT_DELAYS_S, DEFAULT_MAX_ATTEMPTS, RetrySchedule, delay_label

MAX_DELAY_S = 24 * 3600.0


class SinksFileError(ValueError):
    """The sinks file cannot be used; the message names the file, the sink and the key."""


class SinkConfig(BaseModel):
    """What every sink has: a name (its queue), filters, a retry schedule and limits."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    projects: tuple[str, ...] | None = Field(default=None, min_length=1)  # None: every project
    max_attempts: int = Field(default=DEFAULT_MAX_ATTEMPTS, ge=1, le=1000)
    retry_delays_s: tuple[float, ...] = DEFAULT_DELAYS_S
    timeout_s: float = Field(default=10.0, gt=0, le=300)
    max_in_flight: int = Field(default=4, ge=1, le=256)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return validate_endpoint_name(value)

    @field_validator("retry_delays_s")
    @classmethod
    def _delays(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not value:
            raise ValueError("needs at least one delay")
        if any(not 0.05 <= delay <= MAX_DELAY_S for delay in value):
            raise ValueError(f"each delay must lie between 0.05 and {MAX_DELAY_S:g} seconds")
        # Each delay has a queue named by it (`.retry.30s`): two delays that name the same
        # queue would ask RabbitMQ for it with two message TTLs, which it refuses.
        named: dict[str, float] = {}
        for delay in value:
            label = delay_label(delay)
            other = named.setdefault(label, delay)
            if other != delay:
                raise ValueError(
                    f"delays {other!r} and {delay!r} would share one delay queue (.retry.{label})"
                )
        return value

    @property
    def binding_keys(self) -> tuple[str, ...]:
        """The routing keys on `{ns}.events` this sink's queue is bound with."""
        raise NotImplementedError

    @property
    def schedule(self) -> RetrySchedule:
        return RetrySchedule(self.retry_delays_s, self.max_attempts)

    def wants(self, project: str, routing_key: str) -> bool:
        """Whether this sink takes an event of `project` with `routing_key`: its queue's
        bindings choose already, but a replay or a requeue sends straight to the queue."""
        if self.projects is not None and project not in self.projects:
            return False
        return any(topic_matches(key, routing_key) for key in self.binding_keys)


def load_sinks_file(path: Path, kinds: Mapping[str, type[SinkConfig]]) -> list[SinkConfig]:
    """Read and check every sink in `path`; `SinksFileError` says exactly what is wrong."""
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SinksFileError(f"sinks file {path}: cannot read it: {exc.strerror}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SinksFileError(f"sinks file {path}: not valid TOML: {exc}") from exc
    return parse_sinks(document, kinds, source=str(path))


def parse_sinks(
    document: Mapping[str, Any], kinds: Mapping[str, type[SinkConfig]], *, source: str
) -> list[SinkConfig]:
    unknown = sorted(set(document) - set(kinds))
    if unknown:
        raise SinksFileError(
            f"sinks file {source}: unknown sink kind {unknown[0]!r} "
            f"(known: {', '.join(sorted(kinds))})"
        )
    sinks: list[SinkConfig] = []
    for kind, model in kinds.items():
        tables = document.get(kind, [])
        if not isinstance(tables, list):
            raise SinksFileError(f"sinks file {source}: write [[{kind}]], a list of tables")
        for number, table in enumerate(tables, start=1):
            where = f"sinks file {source}, [[{kind}]] #{number}"
            try:
                sinks.append(model.model_validate(table))
            except ValidationError as exc:
                raise SinksFileError(f"{where}: {_explain(exc)}") from None
    names = [sink.name for sink in sinks]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise SinksFileError(f"sinks file {source}: sink name {duplicates[0]!r} is used twice")
    return sinks


def _explain(error: ValidationError) -> str:
    """Each problem as `key: message`, without the input (it may hold a secret)."""
    problems = []
    for item in error.errors(include_input=False, include_url=False):
        where = ".".join(str(part) for part in item["loc"]) or "(table)"
        problems.append(f"{where}: {item['msg']}")
    return "; ".join(problems)
