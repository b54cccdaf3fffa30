"""All configuration, read once from `CALLPIPE_*` environment variables."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from infra.logs import LEVELS
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
    # Workers' /healthz, /readyz, /metrics: one server per process (`run`: both kinds), on
    # http_host; 0: none. A port in use is logged and the worker runs without it.
    metrics_port: int = Field(default=8081, ge=0, le=65535)
    # At most 8 MiB: a spooled webhook must fit the spool's 16 MiB record (ingress/spool.py).
    max_body_bytes: int = Field(default=65536, ge=1024, le=8 * 1024 * 1024)
    roistat_tz: str = "Europe/Moscow"
    default_region: str = "RU"
    prefetch: int = Field(default=256, ge=1, le=10000)
    publish_timeout_s: float = Field(default=5.0, gt=0)
    shutdown_timeout_s: float = Field(default=20.0, gt=0)
    log_level: str = "INFO"
    sinks_file: Path | None = None  # TOML; no file: no sinks
    # Bounds of the queues kept for humans (0: no bound of that kind); README, "Dead letters".
    dead_max_messages: int = Field(default=50_000, ge=0)
    dead_max_bytes: int = Field(default=1024**3, ge=0)
    rejected_max_messages: int = Field(default=10_000, ge=0)
    rejected_max_bytes: int = Field(default=256 * 1024**2, ge=0)
    # Outage spool of the ingress: one directory per instance (default .spool/<namespace>).
    spool_dir: Path | None = None
    spool_max_bytes: int = Field(default=1024**3, ge=1024 * 1024)
    # A webhook whose confirm takes longer than this is spooled and answered 200.
    confirm_deadline_s: float = Field(default=0.5, gt=0, le=30)
    # On SIGTERM the ingress answers /readyz 503 but keeps serving this long, so that a load
    # balancer stops sending before the listener closes.
    drain_s: float = Field(default=5.0, ge=0, le=300)
    # A call start with no call end this long after it arrived gets one `call.stale` event; each
    # `worker start` looks for such calls every `stale_sweep_s` (workers/stale.py).
    stale_after_min: int = Field(default=30, ge=1)
    stale_sweep_s: float = Field(default=30.0, gt=0, le=3600)

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        if value.upper() not in LEVELS:
            raise ValueError(f"log level must be one of {', '.join(LEVELS)}")
        return value.upper()

    # A malformed URL would be retried forever as if the service were down: refuse it at start.
    @field_validator("amqp_url")
    @classmethod
    def _amqp_url(cls, value: str) -> str:
        check_service_url(value, ("amqp", "amqps"), "amqp://user:password@host:5672/vhost")
        return value

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        # No host is valid for PostgreSQL: the local socket (or PGHOST, or ?host=/run/postgresql).
        check_service_url(
            value,
            ("postgresql", "postgres"),
            "postgresql://user:password@host:5432/dbname",
            host_required=False,
        )
        return value

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


def check_service_url(
    url: str, schemes: tuple[str, ...], example: str, *, host_required: bool = True
) -> None:
    """ValueError saying what is wrong with a broker or database URL, never quoting it (it
    holds a password). Only the form is checked: a host that does not answer is waited for."""
    scheme, sep, _ = url.partition("://")
    if not sep or scheme.lower() not in schemes:
        starts = " or ".join(f"{name}://" for name in schemes)
        raise ValueError(f"not a URL such as {example} (it must start with {starts})")
    try:
        netloc = urlsplit(url).netloc
    except ValueError:  # an unclosed [ of an IPv6 address
        raise ValueError(f"is not a valid URL such as {example}") from None
    hosts = netloc.rpartition("@")[2].split(",")
    if host_required and len(hosts) > 1:
        raise ValueError("names several hosts: give one")
    if host_required and not _host_and_port(hosts[0])[0]:
        raise ValueError(f"has no host: expected a URL such as {example}")
    for host in hosts:
        port = _host_and_port(host)[1]
        if port is not None and not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
            raise ValueError(
                "has a port that is not a number from 1 to 65535"
                " (in a password, write / ? # @ : as %2F %3F %23 %40 %3A)"
            )


def _host_and_port(hostspec: str) -> tuple[str, str | None]:
    """`host`, `host:port`, `[v6]` or `[v6]:port` → (host, port or None)."""
    if hostspec.startswith("["):
        address, _, after = hostspec[1:].partition("]")
        return address, after[1:] if after.startswith(":") else None
    host, sep, port = hostspec.partition(":")
    return host, port if sep else None


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
