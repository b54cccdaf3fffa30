"""The outage spool: webhooks the broker could not confirm in time, on local disk, in order.

Append-only segment files of length-prefixed, CRC-checked records, fsynced before the
webhook is answered; a cursor file says how far the drainer has got. Only a crash can tear
a record, and only the last one: it is detected and cut off on open, never a crash loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import struct
import time
import zlib
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from schemas import codec

log = logging.getLogger(__name__)

MAGIC = b"CPS1"
HEADER = struct.Struct(">4sII")  # magic, payload length, CRC-32 of the payload
SEGMENT_BYTES = 64 * 1024 * 1024
MAX_RECORD_BYTES = 16 * 1024 * 1024  # over twice CALLPIPE_MAX_BODY_BYTES' limit, with headers
READ_WINDOW_BYTES = 4 * 1024 * 1024  # read at a time while draining (a larger record: whole)
# How long an append waits for the disk; a write that takes longer means the disk is stalled
# (a hung network volume, say): appends are refused (503) until it answers.
WRITE_TIMEOUT_S = 5.0


class SpoolUnavailableError(Exception):
    """The spool cannot take this webhook (full, or the disk failed): answer 503."""


class SpoolLockedError(Exception):
    """Another process uses this spool directory."""


@dataclass(frozen=True)
class SpooledMessage:
    """A publish that waits for the broker: where it goes, and exactly what."""

    exchange: str
    routing_key: str
    message_id: str
    headers: dict[str, str]
    body: bytes
    spooled_at: float  # Unix time

    def encode(self) -> bytes:
        meta = {
            "x": self.exchange,
            "k": self.routing_key,
            "id": self.message_id,
            "h": self.headers,
            "t": self.spooled_at,
        }
        payload = codec.dumps(meta) + b"\n" + self.body  # compact JSON has no raw newline
        return HEADER.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload

    @classmethod
    def decode(cls, payload: bytes) -> SpooledMessage:
        meta_bytes, _, body = payload.partition(b"\n")
        meta: dict[str, Any] = codec.loads(meta_bytes)
        return cls(meta["x"], meta["k"], meta["id"], meta["h"], body, float(meta["t"]))


@dataclass(frozen=True)
class Position:
    segment: int
    offset: int


def read_records(data: bytes, start: int = 0) -> tuple[list[tuple[int, bytes]], int]:
    """The whole records in `data` from `start`: (end offset, payload) each, and where the
    readable part ends (a torn or damaged record stops the reading there). Pure."""
    records: list[tuple[int, bytes]] = []
    offset = start
    while offset + HEADER.size <= len(data):
        magic, length, crc = HEADER.unpack_from(data, offset)
        end = offset + HEADER.size + length
        if magic != MAGIC or length > MAX_RECORD_BYTES or end > len(data):
            break
        payload = data[offset + HEADER.size : end]
        if zlib.crc32(payload) != crc:
            break
        records.append((end, payload))
        offset = end
    return records, offset


def _retrieve(future: asyncio.Future[None]) -> None:
    """Mark a future's exception as seen: it was given up on already."""
    if not future.cancelled():
        future.exception()


def _read_window(file: BinaryIO, offset: int, available: int) -> bytes:
    """Up to `READ_WINDOW_BYTES` of the `available` bytes at `offset`, and at least the whole
    record that starts there: one larger than the window is read in one piece, not skipped."""
    file.seek(offset)
    data = file.read(min(available, READ_WINDOW_BYTES))
    if len(data) >= HEADER.size:
        _, length, _ = HEADER.unpack_from(data)
        whole = HEADER.size + min(length, MAX_RECORD_BYTES)
        if len(data) < whole <= available:
            data += file.read(whole - len(data))
    return data


class Spool:
    """One directory per ingress instance; every method runs on the event loop's thread."""

    def __init__(self, directory: Path, max_bytes: int, headroom: int = 0) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self._headroom = headroom  # the largest record expected: "has room" means for it
        self._lock_fd = -1
        self._cursor = Position(0, 0)
        self._write_segment = 0
        self._write_size = 0  # durable bytes of the segment being written
        self._directory_unsynced = False  # the segment being written may vanish in a power cut
        self._writing_since: float | None = None  # monotonic time the current write began
        self._sizes: dict[int, int] = {}  # durable size of every segment still on disk
        self._pending: list[tuple[bytes, float, asyncio.Future[None]]] = []
        self._flushing: asyncio.Task[None] | None = None
        self._times: deque[float] = deque()  # spooled_at of every undrained record, in order
        self.appended = asyncio.Event()

    # ---- opening -------------------------------------------------------------------------

    def open(self) -> None:
        """Take the directory, cut a torn tail off, and count what waits. Synchronous."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise SpoolLockedError(
                f"spool directory {self.directory} is in use by another process: "
                "give each ingress its own CALLPIPE_SPOOL_DIR"
            ) from None
        self._cursor = self._read_cursor()
        segments = sorted(self._segment_numbers())
        for number in segments:
            if number < self._cursor.segment:
                self._path(number).unlink()  # drained before a crash, not yet removed
                continue
            self._sizes[number] = self._recover(number)
        self._write_segment = max([*self._sizes, self._cursor.segment])
        self._write_size = self._sizes.setdefault(self._write_segment, 0)
        if not self._path(self._write_segment).exists():
            self._path(self._write_segment).touch()
            self._fsync_directory()
        if self._times:
            log.warning(
                "spool %s holds %d webhooks from before the restart: they are sent first",
                self.directory,
                len(self._times),
            )
            self.appended.set()  # wake the drainer for them

    def _recover(self, number: int) -> int:
        path = self._path(number)
        data = path.read_bytes()
        start = self._cursor.offset if number == self._cursor.segment else 0
        records, end = read_records(data, start)
        for _, payload in records:
            self._times.append(SpooledMessage.decode(payload).spooled_at)
        if end < len(data):
            log.error(
                "spool %s: %d bytes at the end of %s are a torn or damaged record "
                "(a crash mid-write): cut off; that webhook was never answered 200",
                self.directory,
                len(data) - end,
                path.name,
            )
            with path.open("r+b") as file:
                file.truncate(end)
                os.fsync(file.fileno())
        return end

    # ---- appending -------------------------------------------------------------------------

    async def append(self, message: SpooledMessage) -> None:
        """Return once `message` is on disk (fsynced); `SpoolUnavailableError` if it cannot be,
        or not within `WRITE_TIMEOUT_S` (it may still be written, and then sent)."""
        if self.stalled:
            raise SpoolUnavailableError("the spool's disk is not answering")
        record = message.encode()
        if self.bytes + len(record) + self._pending_bytes() > self.max_bytes:
            raise SpoolUnavailableError(f"spool is full ({self.max_bytes} bytes)")
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((record, message.spooled_at, done))
        if self._flushing is None:
            self._flushing = asyncio.create_task(self._flush(), name="spool-flush")
        await asyncio.wait({done}, timeout=WRITE_TIMEOUT_S)
        if not done.done():
            done.add_done_callback(_retrieve)  # its outcome is nobody's now
            raise SpoolUnavailableError(
                f"the spool's disk did not answer within {WRITE_TIMEOUT_S:g}s"
            )
        done.result()

    def _pending_bytes(self) -> int:
        return sum(len(record) for record, _, _ in self._pending)

    async def _flush(self) -> None:
        """Group commit: everything that queued up while the last fsync ran, in one write."""
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                data = b"".join(record for record, _, _ in batch)
                self._writing_since = time.monotonic()
                try:
                    await asyncio.to_thread(self._write, data, self._directory_unsynced)
                except OSError as exc:
                    log.error("spool %s: write failed: %r", self.directory, exc)
                    for _, _, done in batch:
                        if not done.done():
                            done.set_exception(SpoolUnavailableError(f"spool write failed: {exc}"))
                    continue
                finally:
                    self._writing_since = None
                self._directory_unsynced = False  # synced with that write, if it was not
                self._write_size += len(data)
                self._sizes[self._write_segment] = self._write_size
                for _, spooled_at, done in batch:
                    self._times.append(spooled_at)
                    if not done.done():
                        done.set_result(None)
                self.appended.set()
                if self._write_size >= SEGMENT_BYTES:
                    self._write_segment += 1
                    self._write_size = 0
                    self._sizes[self._write_segment] = 0
                    try:
                        self._path(self._write_segment).touch()
                        await asyncio.to_thread(self._fsync_directory)
                    except OSError as exc:  # the first write to it syncs the directory
                        self._directory_unsynced = True
                        log.error("spool %s: new segment failed: %r", self.directory, exc)
        finally:
            self._flushing = None

    def _write(self, data: bytes, sync_directory: bool) -> None:
        """Runs in a worker thread: append and fsync (and the directory, if the segment's entry
        may not be on disk yet); a short or failed write is undone."""
        path = self._path(self._write_segment)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            written = os.write(fd, data)
            if written != len(data):
                os.ftruncate(fd, self._write_size)
                raise OSError(f"short write: {written} of {len(data)} bytes")
            os.fsync(fd)
            if sync_directory:
                self._fsync_directory()
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, self._write_size)
            raise
        finally:
            os.close(fd)

    # ---- draining --------------------------------------------------------------------------

    async def read_batch(self, limit: int) -> list[tuple[Position, SpooledMessage]]:
        """Up to `limit` of the oldest undrained messages, each with the position after it."""
        if not self._times:
            return []
        return await asyncio.to_thread(self._read_batch, limit)

    def _read_batch(self, limit: int) -> list[tuple[Position, SpooledMessage]]:
        batch: list[tuple[Position, SpooledMessage]] = []
        position = self._cursor
        while len(batch) < limit and position.segment <= self._write_segment:
            durable = self._sizes.get(position.segment, 0)
            if position.offset < durable:
                with self._path(position.segment).open("rb") as file:
                    data = _read_window(file, position.offset, durable - position.offset)
                records, _ = read_records(data)
                for end, payload in records[: limit - len(batch)]:
                    batch.append(
                        (
                            Position(position.segment, position.offset + end),
                            SpooledMessage.decode(payload),
                        )
                    )
                if records:
                    position = batch[-1][0]
                    continue
            if position.segment == self._write_segment:
                break
            position = Position(position.segment + 1, 0)
        return batch

    async def commit(self, position: Position, count: int) -> None:
        """The `count` messages up to `position` are confirmed by the broker: forget them."""
        await asyncio.to_thread(self._write_cursor, position)
        for _ in range(min(count, len(self._times))):
            self._times.popleft()
        for number in [n for n in self._sizes if n < position.segment]:
            del self._sizes[number]
            with contextlib.suppress(FileNotFoundError):
                self._path(number).unlink()
        self._cursor = position
        if not self._times:
            self.appended.clear()

    # ---- state -----------------------------------------------------------------------------

    @property
    def messages(self) -> int:
        """Messages on disk, not yet confirmed by the broker."""
        return len(self._times)

    @property
    def waiting(self) -> int:
        """Messages on disk or being written: a new one must queue up behind them."""
        return len(self._times) + len(self._pending)

    @property
    def stalled(self) -> bool:
        """A write has waited for the disk longer than an append may."""
        since = self._writing_since
        return since is not None and time.monotonic() - since > WRITE_TIMEOUT_S

    @property
    def has_room(self) -> bool:
        return self.bytes + self._headroom <= self.max_bytes

    @property
    def bytes(self) -> int:
        return sum(self._sizes.values()) - (
            self._cursor.offset if self._cursor.segment in self._sizes else 0
        )

    def oldest_age_s(self, now: float | None = None) -> float:
        if not self._times:
            return 0.0
        return max((now or time.time()) - self._times[0], 0.0)

    def close(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    # ---- files -----------------------------------------------------------------------------

    def _path(self, number: int) -> Path:
        return self.directory / f"segment-{number:012d}.log"

    def _segment_numbers(self) -> list[int]:
        numbers = []
        for path in self.directory.glob("segment-*.log"):
            with contextlib.suppress(ValueError):
                numbers.append(int(path.stem.removeprefix("segment-")))
        return numbers

    def _read_cursor(self) -> Position:
        path = self.directory / "cursor"
        try:
            value = codec.loads(path.read_bytes())
            return Position(int(value["segment"]), int(value["offset"]))
        except FileNotFoundError:
            return Position(min(self._segment_numbers(), default=0), 0)
        except (ValueError, KeyError, TypeError):
            log.error("spool %s: unreadable cursor file: draining from the start", self.directory)
            return Position(min(self._segment_numbers(), default=0), 0)

    def _write_cursor(self, position: Position) -> None:
        """Atomically: a crash leaves the old cursor or the new one, never half of one."""
        path = self.directory / "cursor"
        temporary = self.directory / "cursor.tmp"
        with temporary.open("wb") as file:
            file.write(codec.dumps({"segment": position.segment, "offset": position.offset}))
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
        self._fsync_directory()

    def _fsync_directory(self) -> None:
        """New and renamed files survive a power cut only once their directory is synced."""
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
