"""`callpipe send-sample`: post Roistat-shaped calls to an ingress, as Roistat would."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp

from schemas import codec

STATUSES = [
    ("ANSWER", 60),
    ("NOANSWER", 12),
    ("BUSY", 8),
    ("CANCEL", 8),
    ("CHANUNAVAIL", 3),
    ("CONGESTION", 2),
    ("DONTCALL", 1),
    ("VOICEMAIL", 1),  # not in Roistat's list: must be kept as-is
]
CITIES = ["Москва", "Санкт-Петербург", "Казань", "Новосибирск", "Екатеринбург", None]
SOURCES = [
    ("google", "cpc", "brand"),
    ("yandex", "cpc", "поиск_москва"),
    ("vk", "social", "autumn"),
    (None, None, None),
]


def sample_call(
    rng: random.Random, index: int, called_at: datetime, callers: list[str]
) -> dict[str, Any]:
    """One call-start payload, shaped like Roistat's (digits-only phones, local time)."""
    source, medium, campaign = rng.choice(SOURCES)
    return {
        "id": str(rng.randint(10**8, 10**9)) + f"{index:04d}",
        "caller": rng.choice(callers),
        "callee": "74951234567",
        "visit_id": str(rng.randint(100000, 999999)),
        "marker": f"{source}_{campaign}" if source else "direct",
        "order_id": rng.choice([None, rng.randint(1000, 9999)]),
        "date": called_at.strftime("%Y-%m-%d %H:%M:%S"),
        "google_client_id": f"{rng.randint(10**8, 10**9)}.{rng.randint(10**8, 10**9)}",
        "metrika_client_id": str(rng.randint(10**15, 10**16)),
        "custom_fields": rng.choice([[], {"manager": "Анна"}, [{"name": "form", "value": "cta"}]]),
        "landing_page": "https://shop.example/catalog?utm_source=" + (source or ""),
        "domain": "shop.example",
        "city": rng.choice(CITIES),
        "country": "Россия",
        "ip": f"95.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
        "first_visit": None,
        "referrer": rng.choice(["https://www.google.com/", "https://ya.ru/", ""]),
        "utm_source": source or "",
        "utm_medium": medium,
        "utm_campaign": campaign,
        "utm_term": None,
        "utm_content": None,
        "source_level_1": source or "direct",
        "source_level_2": campaign,
    }


def call_end(rng: random.Random, start: dict[str, Any]) -> dict[str, Any]:
    statuses, weights = zip(*STATUSES, strict=True)
    status = rng.choices(statuses, weights)[0]
    duration = rng.randint(15, 600) if status == "ANSWER" else 0
    file_id = str(rng.randint(10**6, 10**7)) if status == "ANSWER" else None
    return {
        **start,
        "status": status,
        "duration": str(duration) if rng.random() < 0.3 else duration,  # drift: numbers as text
        "file_id": file_id,
        "link": f"https://cloud.roistat.com/records/{file_id}.mp3" if file_id else None,
    }


@dataclass
class SampleReport:
    statuses: Counter[str] = field(default_factory=Counter)
    calls: int = 0
    webhooks: int = 0
    duplicates: int = 0

    def lines(self) -> list[str]:
        answers = ", ".join(f"{code}: {n}" for code, n in sorted(self.statuses.items()))
        return [
            f"sent {self.webhooks} webhooks for {self.calls} calls "
            f"({self.duplicates} deliberate duplicates)",
            f"answers: {answers}",
        ]


async def send_sample(
    url: str,
    calls: int,
    *,
    seed: int | None = None,
    duplicate_ratio: float = 0.1,
    tz: str = "Europe/Moscow",
    concurrency: int = 1,
) -> SampleReport:
    """Post `calls` calls: a start, then an end, some sent twice; retries 503s like Roistat.

    With `concurrency` 1 the calls go out in the order of their time, as Roistat would send
    them, so repeat callers are counted as they would be in production.
    """
    rng = random.Random(seed)
    now = datetime.now(ZoneInfo(tz)).replace(tzinfo=None)
    callers = [f"7999{rng.randint(1000000, 9999999)}" for _ in range(max(2, calls // 3))]
    report = SampleReport(calls=calls)
    base = url.rstrip("/")
    limit = asyncio.Semaphore(concurrency)

    async def post(session: aiohttp.ClientSession, path: str, body: dict[str, Any]) -> None:
        data = codec.dumps(body)
        for attempt in range(5):
            async with session.post(f"{base}/{path}", data=data) as response:
                report.statuses[str(response.status)] += 1
                if response.status != 503:
                    return
            await asyncio.sleep(0.5 * 2**attempt)

    async def one_call(session: aiohttp.ClientSession, index: int) -> None:
        async with limit:
            # Calls a few minutes apart, oldest first: callers from a small pool call again.
            called_at = now - timedelta(minutes=3 * (calls - index))
            start = sample_call(rng, index, called_at, callers)
            end = call_end(rng, start)
            webhooks = [("call-start", start), ("call-end", end)]
            if rng.random() < duplicate_ratio:
                webhooks.append(rng.choice(webhooks))
                report.duplicates += 1
            for path, body in webhooks:
                await post(session, path, body)
                report.webhooks += 1

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        await asyncio.gather(*(one_call(session, index) for index in range(calls)))
    return report
