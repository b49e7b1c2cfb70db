"""The file sink: one compact JSON line per event (the wrapper as WorkOS sent it), fsynced before a batch
counts as delivered, with the name of every file and directory it creates fsynced into its parent. `path` may
hold strftime fields, expanded with the event's time in UTC. A line a crash or a full disk left without its
newline is cut off before the next write (its events are written again whole). With `max_age` or
`max_total_bytes` set, the old files of `path` are deleted (sinks.retention), at most every SWEEP_INTERVAL."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import math
import os
import time
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from operator import attrgetter
from pathlib import Path

from pydantic import Field, field_validator, model_validator

from sinks.base import ByteSize, Event, Health, SendResult, SinkConfig
from sinks.errors import SinkError
from sinks.fields import FilePath, PositiveDuration
from sinks.retention import FilePattern, leading_directories, rotated_name, shared_name, sweep

log = logging.getLogger(__name__)

_TIME = attrgetter("time")
SWEEP_INTERVAL = 600.0
"""Least time between two retention sweeps: files are deleted days apart, listing them on every batch would
only cost."""
MIN_AGE = 3600.0
"""Shortest `max_age`: less is a slip (a bare number is seconds: `max_age: 90` would delete audit logs within
two minutes of their writing)."""
MIN_TOTAL_BYTES = 1024**2
"""Smallest `max_total_bytes`: less is a slip too (a bare number is bytes: `max_total_bytes: 40`, meant as 40GiB,
would delete every file but the current one at each sweep)."""


class FileSink:
    """Appends NDJSON lines to local files."""

    class Config(SinkConfig):
        """Options of the file sink."""

        path: FilePath
        max_file_bytes: ByteSize | None = Field(None, gt=0)
        """Rotate a file once it reaches this size: it is renamed `<name>.<n><suffix>`."""
        max_age: PositiveDuration | None = None
        """Retention: delete a file of `path` once it was last written this long ago. Off when unset."""
        max_total_bytes: ByteSize | None = Field(None, gt=0)
        """Retention: delete the oldest files of `path` while they add up to more than this. Off when unset."""

        @field_validator("max_age")
        @classmethod
        def _at_least_an_hour(cls, value: float | None) -> float | None:
            if value is not None and value < MIN_AGE:
                raise ValueError("must be at least 1h (a bare number is seconds: write 90d for 90 days)")
            return value

        @field_validator("max_total_bytes")
        @classmethod
        def _at_least_a_mebibyte(cls, value: int | None) -> int | None:
            if value is not None and value < MIN_TOTAL_BYTES:
                raise ValueError("must be at least 1MiB (a bare number is bytes: write 40GiB for 40 GiB)")
            return value

        @model_validator(mode="after")
        def _recognisable_files(self) -> FileSink.Config:
            if self.retains:
                FilePattern.of(self.path)  # its ValueError says which part of `path` retention cannot read
            return self

        @property
        def retains(self) -> bool:
            """Whether a retention limit is set."""
            return self.max_age is not None or self.max_total_bytes is not None

    def __init__(self, name: str, config: FileSink.Config) -> None:
        self.name = name
        self.config = config
        self._lock = asyncio.Lock()
        self._paths: dict[int, str] = {}
        """Expanded paths by whole second of event time: strftime fields are never finer than a second."""
        self._pattern = FilePattern.of(config.path) if config.retains else None
        self._next_sweep = 0.0
        """When (time.monotonic) the next send sweeps: the first send sweeps."""

    def _path_for(self, event: Event) -> str:
        return self._path_for_second(math.floor(event.time))

    def _path_for_second(self, second: int) -> str:
        path = self._paths.get(second)
        if path is None:
            if len(self._paths) > 4096:
                self._paths.clear()
            path = self._paths[second] = time.strftime(self.config.path, time.gmtime(second))
        return path

    async def send(self, batch: Sequence[Event]) -> SendResult:
        """Write and fsync the batch (after a retention sweep, when one is due)."""
        async with self._lock:
            # Before the write, and whether or not it succeeds: on a full disk the sweep is what makes room.
            if self._pattern is not None and time.monotonic() >= self._next_sweep:
                self._next_sweep = time.monotonic() + SWEEP_INTERVAL
                await self._sweep(self._pattern)
            try:
                await asyncio.to_thread(self._write, batch)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    self._next_sweep = 0.0  # the next send sweeps first: files come due since may make the room
                # A full disk, a missing mount or a permission problem is cured outside: retry.
                return SendResult.retry(f"cannot write {exc.filename or self.config.path}: {exc.strerror}")
        return SendResult.success()

    async def _sweep(self, pattern: FilePattern) -> None:
        """One retention sweep in a worker thread; a failure is logged (once a sweep) and never fails the send."""
        now = time.time()
        current = time.strftime(self.config.path, time.gmtime(now))
        config = self.config
        try:
            result = await asyncio.to_thread(
                sweep, pattern, now=now, current=current, max_age=config.max_age, max_total_bytes=config.max_total_bytes
            )
        except Exception as exc:  # a directory that cannot be listed, or a bug: delivery goes on all the same
            log.warning("sink %s: retention sweep failed: %s", self.name, f"{type(exc).__name__}: {exc}"[:300])
            return
        if result.removed or result.directories:
            log.info(
                "sink %s: retention removed %d files (%d bytes) and %d empty directories; %d files (%d bytes) kept",
                self.name,
                result.removed,
                result.removed_bytes,
                result.directories,
                result.kept,
                result.kept_bytes,
            )
        if result.failed:
            log.warning(
                "sink %s: retention could not remove %d files (%s); tried again at the next sweep",
                self.name,
                result.failed,
                result.failure,
            )

    def _write(self, batch: Sequence[Event]) -> None:
        groups: dict[str, list[bytes]] = {}
        seconds = set(map(math.floor, map(_TIME, batch)))  # C-level: a set comprehension costs 2x as much
        if len(seconds) == 1 or len({self._path_for_second(second) for second in seconds}) == 1:
            groups[self._path_for_second(seconds.pop())] = [event.raw for event in batch]  # one file (the usual)
        else:
            for event in batch:
                groups.setdefault(self._path_for(event), []).append(event.raw)
        limit = self.config.max_file_bytes
        for name, lines in groups.items():
            path = Path(name)
            _make_directories(path.parent)
            if limit is None:
                _append(path, b"\n".join(lines) + b"\n")
                continue
            size = _whole_lines(path)
            chunk: list[bytes] = []
            for line in lines:
                # Fill the file up to the limit, then rotate: only an event larger than the limit by itself
                # makes a file exceed it (alone in its file).
                if size and size + len(line) + 1 > limit:
                    if chunk:
                        _append(path, b"\n".join(chunk) + b"\n")
                        chunk = []
                    _rotate(path)
                    size = 0
                chunk.append(line)
                size += len(line) + 1
            if chunk:
                _append(path, b"\n".join(chunk) + b"\n")

    async def healthcheck(self) -> Health:
        """The directory of today's file exists (or can be made) and is writable."""
        path = Path(time.strftime(self.config.path, time.gmtime()))
        try:
            await asyncio.to_thread(path.parent.mkdir, parents=True, exist_ok=True)
        except OSError as exc:
            return Health(False, f"cannot create {path.parent}: {exc.strerror}")
        if not os.access(path.parent, os.W_OK):
            return Health(False, f"{path.parent} is not writable")
        return Health(True, f"writing to {path.parent}")

    async def close(self) -> None:
        """Nothing stays open between batches."""

    # --- whole files (sinks.objects.ObjectStore) ---

    @property
    def directory(self) -> Path:
        """Where stored files go: the directories of `path` before its first strftime field (`%%` is a `%`)."""
        return Path(leading_directories(self.config.path) or ".")

    async def store_object(self, name: str, data: bytes, *, moment: datetime) -> None:
        """Write `data` to `directory/name` through a temporary file, fsynced and renamed into place."""
        async with self._lock:
            try:
                await asyncio.to_thread(store_file, self.directory / name, data)
            except OSError as exc:
                raise SinkError(f"cannot write {exc.filename or name}: {exc.strerror or exc}") from None


def retention_clashes(configs: Mapping[str, FileSink.Config]) -> list[str]:
    """The problems (`sinks.NAME: …`) of file sinks whose retention would delete files another file sink writes:
    the names look alike, so a sweep of one cannot tell the other's apart. Two sinks of the same `path` share
    their files, and are no clash."""
    problems = []
    for name, config in configs.items():
        pattern = FilePattern.of(config.path) if config.retains else None
        for other, theirs in configs.items():
            if pattern is None or os.path.normpath(theirs.path) == os.path.normpath(config.path):
                continue
            shared = shared_name(pattern, theirs.path)
            if shared is not None:
                problems.append(
                    f"sinks.{name}: retention would delete files of sink {other!r}: {shared}, of its path "
                    f"{theirs.path}, is also a name of {config.path}; give the two sinks different directories"
                )
    return problems


def store_file(path: Path, data: bytes) -> None:
    """Write `data` at `path` durably: a temporary file beside it, fsynced, renamed into place, directory fsynced."""
    _make_directories(path.parent)
    partial = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)  # the new name must survive a crash too


TAIL_CHUNK = 64 * 1024


def _whole_lines(path: Path) -> int:
    """Cut a torn last line off the file (before its size decides a rotation); its size then (0: none)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return 0
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return _cut_torn_line(fd)
    finally:
        os.close(fd)


def _make_directories(directory: Path) -> None:
    """Create `directory` and its missing parents, each new one fsynced into its parent: a crash must not take
    away a directory holding lines counted delivered."""
    missing: list[Path] = []
    while not directory.is_dir():
        missing.append(directory)
        directory = directory.parent
    for new in reversed(missing):
        new.mkdir(exist_ok=True)  # another writer may make it meanwhile; its name is fsynced here all the same
        _fsync_directory(new.parent)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _append(path: Path, data: bytes) -> None:
    fd, created = _open_locked(path)
    try:
        _cut_torn_line(fd)
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:
        _fsync_directory(path.parent)  # the new file's name must survive a crash as its lines do


def _open_locked(path: Path) -> tuple[int, bool]:
    """Open `path` to append (made if missing) and lock it; the descriptor, and whether the file is new. The lock
    is held while the file is checked and written: another sink appending to the same file must not take a line
    it is still writing for a torn one."""
    while True:
        try:
            fd, created = os.open(path, os.O_RDWR | os.O_APPEND), False
        except FileNotFoundError:
            fd, created = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640), True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.fstat(fd).st_nlink:
                return fd, created
        except BaseException:
            os.close(fd)
            raise
        # Deleted between the open and the lock (by another sink's retention): lines written to it would be
        # fsynced and lost all the same. Open the name again.
        os.close(fd)


def _cut_torn_line(fd: int) -> int:
    """Cut off a last line without its newline: a write the process did not finish (killed, or a full disk).
    Its events were never counted delivered, so they are written again whole; the file keeps whole lines.
    The file's size after."""
    end = os.fstat(fd).st_size
    if not end or os.pread(fd, 1, end - 1) == b"\n":
        return end
    cut = end
    while cut > 0:
        start = max(0, cut - TAIL_CHUNK)
        newline = os.pread(fd, cut - start, start).rfind(b"\n")
        if newline >= 0:
            cut = start + newline + 1
            break
        cut = start
    os.ftruncate(fd, cut)
    return cut


def _rotate(path: Path) -> None:
    """Rename the full file to `<name>.<n><suffix>` (the first free n) and make the rename durable."""
    number = 1
    while (rotated := path.with_name(rotated_name(path.name, number))).exists():
        number += 1
    os.rename(path, rotated)
    _fsync_directory(path.parent)  # the rename itself must survive a crash
