"""How a batch of webhooks is stored in one transaction without changing what one at a time
would store. Pure: no I/O.

Two rules make a batch safe to store with a few multi-row statements:

- *Rounds.* One multi-row upsert cannot touch a `calls` row twice, and its rows cannot see each
  other. So webhooks that share a call (its start and end) or a caller (repeat calls from one
  number) go to successive rounds, in arrival order: a later round sees the rows an earlier
  one wrote, exactly as if they had come one after the other.
- *Lock order.* Every call and caller the batch touches is locked up front, in one sorted
  order that all workers share, so two batches never wait for each other in a cycle.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def call_key(project: str, call_id: str) -> str:
    return f"{project}\x1fcall\x1f{call_id}"


def caller_key(project: str, caller: str) -> str:
    return f"{project}\x1fcaller\x1f{caller}"


def lock_id(key: str) -> int:
    """A signed 64-bit advisory lock id for a key, the same in every process."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big", signed=True)


def lock_ids(keys: Sequence[Sequence[str]]) -> list[int]:
    """The distinct lock ids of every item's keys, sorted: the order all workers lock in."""
    return sorted({lock_id(key) for item_keys in keys for key in item_keys})


def rounds(keys: Sequence[Sequence[str]]) -> list[list[int]]:
    """Split items (given by their keys) into rounds: no two items of a round share a key, and
    an item comes in a later round than every earlier item it shares a key with.

    Returns the indexes of each round, in order; within a round, in arrival order. Items that
    share nothing all land in the first round: the common case is one round.
    """
    last_round: dict[str, int] = {}
    result: list[list[int]] = []
    for index, item_keys in enumerate(keys):
        number = 1 + max((last_round.get(key, -1) for key in item_keys), default=-1)
        if number == len(result):
            result.append([])
        result[number].append(index)
        for key in item_keys:
            last_round[key] = number
    return result


def first_of_each(ids: Sequence[str]) -> list[int]:
    """Indexes of the first occurrence of each id: a webhook that comes twice in one batch (a
    Roistat resend) is claimed once; the later copies are duplicates."""
    seen: set[str] = set()
    firsts: list[int] = []
    for index, value in enumerate(ids):
        if value not in seen:
            seen.add(value)
            firsts.append(index)
    return firsts


def halves(items: Sequence[T]) -> tuple[list[T], list[T]]:
    """Split a failing batch to find the item that fails it (bisecting, so the healthy part is
    stored after a logarithmic number of tries, not retried with the poison forever)."""
    middle = (len(items) + 1) // 2
    return list(items[:middle]), list(items[middle:])
