"""Every sink kind, by the name of its table in the sinks file. A new kind is one line here."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import asyncpg

from sinks.alerts import AlertStore
from sinks.config import SinkConfig, load_sinks_file
from sinks.port import Sink
from sinks.telegram import BotApi, TelegramSink, TelegramSinkConfig
from sinks.webhook import WebhookSink, WebhookSinkConfig


@dataclass
class SinkResources:
    """What a sink may need besides its own config; the database pool opens on first use."""

    database: Callable[[], Awaitable[asyncpg.Pool]]
    time_zone: ZoneInfo


async def open_webhook(config: WebhookSinkConfig, resources: SinkResources) -> Sink:
    return WebhookSink.open(config)


async def open_telegram(config: TelegramSinkConfig, resources: SinkResources) -> Sink:
    store = AlertStore(await resources.database(), lease=config.lease)
    api = BotApi(config, aiohttp.ClientSession())
    return TelegramSink(config, api, store, resources.time_zone)


@dataclass(frozen=True)
class SinkKind:
    config: type[SinkConfig]
    open: Callable[[Any, SinkResources], Awaitable[Sink]]


KINDS: dict[str, SinkKind] = {
    "webhook": SinkKind(WebhookSinkConfig, open_webhook),
    "telegram": SinkKind(TelegramSinkConfig, open_telegram),
}


def load_sinks(path: Path | None) -> list[SinkConfig]:
    """The sinks of `CALLPIPE_SINKS_FILE`; none without a file."""
    if path is None:
        return []
    return load_sinks_file(path, {name: kind.config for name, kind in KINDS.items()})


async def open_sink(config: SinkConfig, resources: SinkResources) -> Sink:
    kind = next(kind for kind in KINDS.values() if isinstance(config, kind.config))
    return await kind.open(config, resources)
