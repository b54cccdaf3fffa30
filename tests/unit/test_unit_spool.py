"""The outage spool on a real disk: order, durability across a reopen, torn tails, limits."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from callpipe_testing import stalled_spool_disk, wait_for

import ingress.spool as spool_module
from ingress.spool import (
    Spool,
    SpooledMessage,
    SpoolLockedError,
    SpoolUnavailableError,
    read_records,
)


def message(n: int, size: int = 100) -> SpooledMessage:
    body = f'{{"id": "{n}", "city": "Москва", "pad": "{"x" * size}"}}'.encode()
    return SpooledMessage(
        "ns.webhooks",
        "roistat.call.start",
        f"acme:{n}:start",
        {"x-callpipe-project": "acme"},
        body,
        1_700_000_000.0 + n,
    )


def opened(directory: Path, max_bytes: int = 10 * 1024 * 1024) -> Spool:
    spool = Spool(directory, max_bytes)
    spool.open()
    return spool


def segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("segment-*.log"))


async def drain_all(spool: Spool) -> list[SpooledMessage]:
    drained = []
    while batch := await spool.read_batch(7):
        drained += [m for _, m in batch]
        await spool.commit(batch[-1][0], len(batch))
    return drained


async def test_messages_come_back_in_order_and_identical(tmp_path: Path) -> None:
    spool = opened(tmp_path)
    sent = [message(n) for n in range(20)]
    await asyncio.gather(*(spool.append(m) for m in sent))  # one group commit, in order
    assert spool.messages == 20 and spool.bytes > 0
    assert spool.oldest_age_s(now=1_700_000_010.0) == 10.0
    assert await drain_all(spool) == sent
    assert spool.messages == 0 and spool.bytes == 0 and spool.oldest_age_s() == 0.0
    spool.close()


async def test_a_reopened_spool_has_what_was_not_confirmed(tmp_path: Path) -> None:
    spool = opened(tmp_path)
    for n in range(10):
        await spool.append(message(n))
    batch = await spool.read_batch(4)
    await spool.commit(batch[-1][0], 4)
    spool.close()  # a crash here: nothing more is written
    again = opened(tmp_path)
    assert again.messages == 6
    assert again.appended.is_set()  # the drainer wakes for them without a new webhook
    assert [m.message_id for m in await drain_all(again)] == [
        f"acme:{n}:start" for n in range(4, 10)
    ]
    again.close()


async def test_a_crash_between_confirm_and_cursor_sends_again(tmp_path: Path) -> None:
    spool = opened(tmp_path)
    await spool.append(message(1))
    assert len(await spool.read_batch(10)) == 1  # published and confirmed, cursor not written
    spool.close()
    again = opened(tmp_path)
    assert [m.message_id for m in await drain_all(again)] == ["acme:1:start"]  # same id: deduped
    again.close()


@pytest.mark.parametrize("damage", ["torn", "flipped"])
async def test_a_torn_last_record_is_cut_off_with_a_log_line(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    spool = opened(tmp_path)
    for n in range(3):
        await spool.append(message(n))
    spool.close()
    (segment,) = segments(tmp_path)
    data = segment.read_bytes()
    if damage == "torn":  # the power went while the fourth record was being written
        data += message(3).encode()[:57]
    else:  # the last record's bytes are not what was written
        data = data[:-5] + b"?" + data[-4:]
    segment.write_bytes(data)
    again = opened(tmp_path)
    assert "torn or damaged record" in caplog.text
    assert again.messages == (3 if damage == "torn" else 2)
    await again.append(message(9))  # and the spool goes on working
    ids = [m.message_id for m in await drain_all(again)]
    kept = 3 if damage == "torn" else 2
    assert ids == [f"acme:{n}:start" for n in range(kept)] + ["acme:9:start"]
    again.close()


async def test_segments_roll_over_and_drained_ones_are_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(spool_module, "SEGMENT_BYTES", 1000)
    spool = opened(tmp_path)
    for n in range(30):
        await spool.append(message(n))
    assert len(segments(tmp_path)) > 3
    drained = await drain_all(spool)
    assert [m.message_id for m in drained] == [f"acme:{n}:start" for n in range(30)]
    assert len(segments(tmp_path)) <= 2
    spool.close()
    assert opened(tmp_path).messages == 0


async def test_records_larger_than_the_read_window_are_drained_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A record the drainer cannot read in one window is read whole, whether it sits in the
    segment being written (it would never be read) or an older one (skipped, and its segment
    removed with the next commit)."""
    monkeypatch.setattr(spool_module, "READ_WINDOW_BYTES", 1000)
    monkeypatch.setattr(spool_module, "SEGMENT_BYTES", 5000)
    spool = opened(tmp_path)
    sent = [message(n, size=3000 if n % 2 else 100) for n in range(9)]
    for one in sent:
        await spool.append(one)
    assert len(segments(tmp_path)) > 2
    assert await drain_all(spool) == sent
    spool.close()


async def test_a_segment_whose_directory_entry_failed_to_sync_is_synced_by_its_first_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A webhook is answered 200 only once it survives a power cut: in a new segment file,
    that needs the directory synced too, which may fail at the roll-over (a full disk)."""
    monkeypatch.setattr(spool_module, "SEGMENT_BYTES", 1000)
    directory_syncs: list[Path] = []
    sync = Spool._fsync_directory

    def fails_once(self: Spool) -> None:
        directory_syncs.append(self.directory)
        if len(directory_syncs) == 1:
            raise OSError(28, "No space left on device")
        sync(self)

    spool = opened(tmp_path)
    monkeypatch.setattr(Spool, "_fsync_directory", fails_once)
    await spool.append(message(1, size=1200))  # fills the segment: a new one begins

    async def roll_over_failed() -> bool:  # logged by the flush, after the append's answer
        return "new segment failed" in caplog.text

    await wait_for(roll_over_failed, what="the failed roll-over logged")
    assert len(directory_syncs) == 1
    await spool.append(message(2))  # the new segment's first record
    assert len(directory_syncs) == 2
    await spool.append(message(3))
    assert len(directory_syncs) == 2  # once is enough
    assert [m.message_id for m in await drain_all(spool)] == [f"acme:{n}:start" for n in (1, 2, 3)]
    spool.close()


async def test_a_stalled_disk_refuses_in_time_and_the_late_write_still_counts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk that does not answer (a hung network volume): the append gives up after
    WRITE_TIMEOUT_S, later appends are refused at once, and once the disk answers the
    late record is on disk and the spool takes webhooks again."""
    spool = opened(tmp_path)
    with stalled_spool_disk(monkeypatch, timeout_s=0.3):
        with pytest.raises(SpoolUnavailableError, match=r"did not answer within 0\.3s"):
            await spool.append(message(1))
        assert spool.stalled and spool.messages == 0
        with pytest.raises(SpoolUnavailableError, match="not answering"):
            await spool.append(message(2))

    async def written() -> bool:
        return spool.messages == 1 and not spool.stalled

    await wait_for(written, what="the late write on disk")
    await spool.append(message(3))
    assert [m.message_id for m in await drain_all(spool)] == ["acme:1:start", "acme:3:start"]
    spool.close()


async def test_a_full_spool_refuses(tmp_path: Path) -> None:
    spool = opened(tmp_path, max_bytes=1000)
    await spool.append(message(1, size=300))
    with pytest.raises(SpoolUnavailableError, match="full"):
        await spool.append(message(2, size=800))
    assert spool.messages == 1
    spool.close()


async def test_a_failing_disk_refuses(tmp_path: Path) -> None:
    spool = opened(tmp_path / "spool")
    for path in (tmp_path / "spool").iterdir():
        path.unlink()
    (tmp_path / "spool").rmdir()  # the volume went away
    with pytest.raises(SpoolUnavailableError, match="write failed"):
        await spool.append(message(1))
    assert spool.messages == 0
    spool.close()


def test_one_directory_one_process(tmp_path: Path) -> None:
    first = opened(tmp_path)
    with pytest.raises(SpoolLockedError, match="CALLPIPE_SPOOL_DIR"):
        opened(tmp_path)
    first.close()
    opened(tmp_path).close()


def test_read_records_stops_at_garbage() -> None:
    good = message(1).encode() + message(2).encode()
    records, end = read_records(good + b"garbage")
    assert len(records) == 2 and end == len(good)
    assert SpooledMessage.decode(records[1][1]) == message(2)
