"""All configuration, read once from `CALLPIPE_*` environment variables."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from callpipe.logs import LEVELS
from schemas.topology import Topology, validate_namespace


class Settings(BaseSettings):
    """Defaults suit a development machine with RabbitMQ and PostgreSQL on their standard ports."""

    # hide_input_in_errors: a bad CALLPIPE_TOKENS must not print every token to the log.
    model_config = SettingsConfigDict(
        env_prefix="CALLPIPE_", frozen=True, hide_input_in_errors=True
    )

    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    database_url: str = "postgresql://postgres@127.0.0.1:5432/postgres"
    namespace: str = "callpipe"
    tokens: str = Field(default="", description="project:token,... (a token maps to a project)")
    http_host: str = "0.0.0.0"
    http_port: int = Field(default=8080, ge=0, le=65535)
    max_body_bytes: int = Field(default=65536, ge=1024)
    roistat_tz: str = "Europe/Moscow"
    default_region: str = "RU"
    prefetch: int = Field(default=32, ge=1, le=10000)
    publish_timeout_s: float = Field(default=5.0, gt=0)
    shutdown_timeout_s: float = Field(default=20.0, gt=0)
    log_level: str = "INFO"
    sinks_file: Path | None = None  # TOML; no file: no sinks
    # Outage spool of the ingress: one directory per instance (default .spool/<namespace>).
    spool_dir: Path | None = None
    spool_max_bytes: int = Field(default=1024**3, ge=1024 * 1024)
    # A webhook whose confirm takes longer than this is spooled and answered 200.
    confirm_deadline_s: float = Field(default=0.5, gt=0, le=30)

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        if value.upper() not in LEVELS:
            raise ValueError(f"log level must be one of {', '.join(LEVELS)}")
        return value.upper()

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, value: str) -> str:
        return validate_namespace(value)

    @field_validator("roistat_tz")
    @classmethod
    def _time_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {value!r} (use an IANA name)") from exc
        return value

    @field_validator("default_region")
    @classmethod
    def _region(cls, value: str) -> str:
        if len(value) != 2 or not value.isalpha():
            raise ValueError(f"{value!r} is not a two-letter region code such as RU")
        return value.upper()

    @field_validator("tokens")
    @classmethod
    def _tokens(cls, value: str) -> str:
        parse_tokens(value)
        return value

    @cached_property
    def topology(self) -> Topology:
        return Topology(self.namespace)

    @cached_property
    def spool_path(self) -> Path:
        return self.spool_dir or Path(".spool") / self.namespace

    @cached_property
    def time_zone(self) -> ZoneInfo:
        return ZoneInfo(self.roistat_tz)

    @cached_property
    def project_by_token(self) -> dict[str, str]:
        return parse_tokens(self.tokens)


# A project name is part of every event id, and so of the AMQP message id (255 bytes at most).
MAX_PROJECT_BYTES = 64


def parse_tokens(spec: str) -> dict[str, str]:
    """`project:token,...` → {token: project}; raises ValueError naming the bad entry."""
    projects: dict[str, str] = {}
    for entry in filter(None, (part.strip() for part in spec.split(","))):
        project, sep, token = entry.partition(":")
        project, token = project.strip(), token.strip()
        if not sep or not project or not token:
            raise ValueError(f"token entry #{len(projects) + 1} must look like project:token")
        if len(project.encode()) > MAX_PROJECT_BYTES:
            raise ValueError(
                f"project #{len(projects) + 1} is longer than {MAX_PROJECT_BYTES} bytes"
            )
        if token in projects:
            raise ValueError(f"a token is given twice (projects {projects[token]!r}, {project!r})")
        projects[token] = project
    return projects


def configuration_errors(error: ValidationError) -> list[str]:
    """One line per invalid setting, naming its environment variable, never its value."""
    lines = []
    for item in error.errors(include_url=False, include_input=False, include_context=False):
        message = item["msg"].removeprefix("Value error, ")
        lines.append(f"{env_variable(str(item['loc'][0]))}: {message}" if item["loc"] else message)
    return lines


def env_variable(field: str) -> str:
    """The environment variable a setting is read from: `tokens` → `CALLPIPE_TOKENS`."""
    info = Settings.model_fields.get(field)
    if info is not None and isinstance(info.validation_alias, str):
        return info.validation_alias.upper()
    return f"{Settings.model_config.get('env_prefix', '')}{field}".upper()
