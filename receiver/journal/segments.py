"""Append-only segment files: the journal's events.

Each accepted request is one record, appended to the newest segment; the writer thread appends the records of
a commit group with one write and makes them durable with one `fdatasync`, so a request costs no B-tree insert,
no second copy at a checkpoint and no delete once delivered: a segment every active sink is past is unlinked
whole. A new segment is fsynced into its directory before its first record is acknowledged.

A record is HEAD (magic, CRC-32 of the rest, first seq, meta length, data length), then its meta (JSON: stream,
target, received_at, actions, times, dedup scope, dedup keys; a zstd frame of its own, so it is read without
the events) and its data (the events' bytes, one a line, a zstd frame). A crash can leave only the last
records of the newest segment torn: at open a torn tail (a record's head as written, less than the whole record
after it) is cut off the newest segment (what was cut was never acknowledged). Any other bytes that are not a
whole record, between records or at a segment's end, are damage on the disk: skipped, the records around them
kept, and handed to the journal, which keeps them aside as dead letters; at the newest segment's end they stay,
and new records go after them. Every read checks each record again (head, CRC-32, meta): one changed, cut or
gone since it was indexed comes back as Damaged, never as altered events.

The index of every record (seqs, end offset, route) is kept in memory in arrays, ≈ 36 bytes a record: a read
at a cursor is a bisect and one `pread`. Writes come from the writer thread only; reads (the reader thread, the
event loop) see a record once it is durable.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import struct
import threading
import zlib
from array import array
from bisect import bisect_right
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson
import zstandard

from receiver.journal.schema import COMPRESSION_LEVEL, ZSTD_MAGIC

log = logging.getLogger("receiver.journal")

MAGIC = b"LBJ1"
HEAD = struct.Struct("<4sIQII")
"""magic, CRC-32 of everything after it, first seq, meta length, data length."""
_CHECKED = struct.Struct("<QII")
"""The part of HEAD the CRC covers, before the meta and the data."""

SEGMENT_BYTES = 4 * 1024 * 1024
"""A segment takes records until it holds this many bytes; the next group starts a new one. What a delivered
segment holds stays on disk until the segment is full and every sink is past it."""

_NAME = re.compile(r"^(\d{20})\.seg$")


@dataclass(slots=True)
class Record:
    """One request's events as stored."""

    first: int
    stream: str
    target: str | None
    """The one sink they were replayed for, or None: for every sink of the stream."""
    received_at: float
    actions: list[str]
    times: list[float]
    scope: str | None
    """The dedup scope of `keys`."""
    keys: list[str]
    data: bytes
    """The events' bytes, one a line, as stored (a zstd frame, or plain)."""

    @property
    def last(self) -> int:
        return self.first + len(self.actions) - 1


@dataclass(slots=True)
class Damaged:
    """Bytes of a segment that are not the record written there: one whose CRC-32 no longer matches, whose meta
    cannot be read, that the file no longer holds whole or at all (found by a read), or bytes between or
    after whole records that are not a torn write (found at open)."""

    segment: str
    offset: int
    raw: bytes
    why: str
    first: int = 0
    """The seqs it held, as far as they are known (0: not known)."""
    last: int = 0
    stream: str = ""
    known: bool = True
    """Whether `last` is the last seq it held for certain (else the last known: it held that one at least)."""

    @property
    def place(self) -> str:
        """Which bytes are damaged: the start of its dead letter's reason, the same whichever read or start finds
        them (other bytes at that offset later, or a longer run, are other damage)."""
        if not self.segment:  # no file is known to have held them (`missing`)
            return f"journal events missing from the segments (seqs {self.first}-{self.last})"
        size = f"{len(self.raw)} bytes, CRC-32 {zlib.crc32(self.raw):08x}" if self.raw else "no bytes left"
        return f"journal record damaged on disk ({self.segment} at byte {self.offset}, {size})"

    @property
    def reason(self) -> str:
        """The dead letter's reason: where the damage is, what it is, and what it cost."""
        if self.first and self.last and self.known:
            held = f"; its events (seqs {self.first}-{self.last}) cannot be delivered"
        elif self.first and self.last > self.first:
            held = f"; its events (seqs from {self.first}, to {self.last} at least) cannot be delivered"
        elif self.first:
            held = f"; its events (seqs from {self.first}) cannot be delivered"
        else:
            held = ""
        return f"{self.place}: {self.why}{held}"


MISSING = (
    "no segment file holds them (files removed, cut, or copied back from a backup older than the database; "
    "when the database is the one copied back, they may have been delivered)"
)
"""Why events the database counts as appended and not delivered yet are in no segment at open."""


def missing(mark: int, end: int, segments: Sequence[Segment], damaged: Sequence[Damaged]) -> list[Damaged]:
    """The seqs in (mark, end] that no segment's records hold and no damage found at open names, as Damaged
    without a segment (`place` names the seqs): `end` is the last seq the database knows was appended. Damage
    whose seqs are not known may hold any of them: none is named then."""
    if any(not item.first for item in damaged):
        return []
    spans = sorted(
        [(segment.firsts[0], segment.lasts[-1], True) for segment in segments if segment.lasts]
        + [(item.first, max(item.first, item.last), item.known) for item in damaged]
    )
    found: list[Damaged] = []
    position, open_ended = mark, False
    for first, last, known in spans:
        if first > position + 1 and position < end and not open_ended:
            found.append(Damaged("", 0, b"", MISSING, position + 1, min(first - 1, end)))
        if last > position:
            position, open_ended = last, not known  # damage that held these seqs at least, maybe more
    if position < end and not open_ended:
        found.append(Damaged("", 0, b"", MISSING, position + 1, end))
    return found


def record_meta(
    stream: str,
    target: str | None,
    received_at: float,
    actions: Sequence[str],
    times: Sequence[float],
    scope: str | None = None,
    keys: Sequence[str] = (),
) -> bytes:
    """A record's meta, as `Record` reads it back: JSON, as a zstd frame (its keys and times are as large as the
    compressed events, or larger at 100 events a request; a frame is a fifth to a tenth of that). Always a
    frame, even when the events are plain: a frame says where it ends, which lets `_seqs_held` count a damaged
    record's seqs from its meta when the disk changed its lengths."""
    return _codecs().compress(orjson.dumps([stream, target, received_at, actions, times, scope, keys]))


def _record(first: int, meta: bytes, data: bytes) -> Record:
    stream, target, received_at, actions, times, scope, keys = orjson.loads(_codecs().decompress(meta))
    return Record(first, stream, target, received_at, actions, times, scope, keys, data)


class _Codecs(threading.local):
    """A zstd compressor and decompressor for each thread (neither may be shared between threads)."""

    def __init__(self) -> None:
        self.compress = zstandard.ZstdCompressor(level=COMPRESSION_LEVEL).compress
        self.decompress = zstandard.ZstdDecompressor().decompress


_CODECS = _Codecs()


def _codecs() -> _Codecs:
    return _CODECS


ROOM_FILE = ".room"
"""The file a readiness probe allocates beside the segments, then removes (`SegmentLog.reserve`)."""

SPARE_FILE = ".spare"
"""Room the journal keeps allocated beside the segments for its progress commits on a full disk
(`SegmentLog.keep_spare`); kept across restarts, so a journal opened on a full disk still has it."""


class Segment:
    """One segment file and the index of its durable records."""

    __slots__ = ("base", "counts", "ends", "firsts", "lasts", "path", "routes", "size", "starts")

    def __init__(self, path: Path, base: int) -> None:
        self.path = path
        self.base = base
        """The first seq it may hold (its name)."""
        self.firsts = array("q")
        self.lasts = array("q")
        self.starts = array("q")
        self.ends = array("q")
        """Record i spans starts[i] to ends[i] (a damaged record between two is not indexed)."""
        self.routes = array("I")
        """Each record's (stream, target), as an id of SegmentLog.routes."""
        self.counts: dict[int, int] = {}
        """Events by route id."""
        self.size = 0
        """Bytes of whole, durable records."""

    def _add(self, first: int, last: int, start: int, end: int, route: int) -> None:
        self.firsts.append(first)
        self.lasts.append(last)
        self.starts.append(start)
        self.ends.append(end)
        self.routes.append(route)
        self.counts[route] = self.counts.get(route, 0) + last - first + 1
        self.size = end

    @property
    def last(self) -> int:
        """The last seq it holds (base - 1 when empty)."""
        return self.lasts[-1] if self.lasts else self.base - 1


def segment_name(base: int) -> str:
    return f"{base:020d}.seg"


class SegmentLog:
    """The segment files of one journal (`<journal>.segments/`)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.segments: list[Segment] = []
        self.routes: dict[tuple[str, str | None], int] = {}
        self.damaged: list[Damaged] = []
        """What `open` found damaged between whole records, for the journal to keep aside as dead letters."""
        self._fd = -1
        """The newest segment, open for writing (writer thread)."""
        self._lock = threading.Lock()
        """Held while the index changes, and while a reader takes what it will read."""

    # --- open and recovery -------------------------------------------------------------------------

    def open(self, floor: int) -> list[Record]:
        """Index the segments, cutting a torn tail off the newest, and open the newest for writing (a new one
        numbered after `floor` and every record when there is none). Returns every record's meta (data empty)
        for the caller to rebuild what it keeps in memory (dedup keys)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError, IsADirectoryError, PermissionError):
            (self.directory / ROOM_FILE).unlink()  # a probe's reservation a crash left allocated
        names = sorted(
            (int(match.group(1)), entry.name)
            for entry in os.scandir(self.directory)
            if (match := _NAME.match(entry.name)) and entry.is_file()
        )
        metas: list[Record] = []
        for position, (base, name) in enumerate(names):
            segment = Segment(self.directory / name, base)
            newest = position == len(names) - 1
            self._recover(segment, 0 if newest else names[position + 1][0] - 1, metas)
            self.segments.append(segment)
        last = max(floor, self.last_seq)
        if not self.segments or (self.segments[-1].size >= SEGMENT_BYTES):
            # Numbered past the newest's name too: a full one that holds only damage keeps its name (and bytes).
            self._start(max(last + 1, self.segments[-1].base + 1 if self.segments else 0))
        else:
            self._fd = os.open(self.segments[-1].path, os.O_WRONLY)
        return metas

    def _recover(self, segment: Segment, ceiling: int, metas: list[Record]) -> None:
        """Index a segment's whole records; what is between or after them is damage (kept in `damaged`),
        except the end of the newest (`ceiling` 0, else the last seq the segment may hold) when it is a write
        cut short, never acknowledged: that is cut off."""
        data = segment.path.read_bytes()
        offset, previous = 0, segment.base - 1
        while offset < len(data):
            found = _whole(data, offset, previous)
            if found is not None:
                end = offset + HEAD.size + len(found.data) + _data_size(data, offset)
                segment._add(found.first, found.last, offset, end, self.route(found.stream, found.target))
                found.data = b""
                metas.append(found)
                offset, previous = end, found.last
                continue
            resume = _resync(data, offset, previous)
            if resume is not None:
                # Bytes that whole records follow: not a torn write (one ends a file), but damage on the disk.
                # The events in them cannot be read; those after them can.
                log.error(
                    "journal: a damaged record is skipped",
                    extra={"segment": segment.path.name, "offset": offset, "bytes": resume - offset},
                )
                after = _whole(data, resume, previous)
                last = after.first - 1 if after is not None else 0
                why = "not a whole record"
                self.damaged.append(Damaged(segment.path.name, offset, data[offset:resume], why, previous + 1, last))
                offset = resume
                continue
            break
        if offset == len(data):
            return
        # The newest segment may end in a write a crash cut short (never acknowledged): cut it off. What is
        # before it, or an older segment's end, is damage: kept, and new records go after it.
        cut = _torn_from(data, offset, previous) if not ceiling else len(data)
        if cut < len(data):
            log.warning(
                "journal: cut a torn write off the newest segment",
                extra={"segment": segment.path.name, "bytes": len(data) - cut},
            )
            fd = os.open(segment.path, os.O_WRONLY)
            try:
                os.ftruncate(fd, cut)
                os.fsync(fd)
            finally:
                os.close(fd)
        if cut > offset:
            log.error(
                "journal: a segment is damaged at its end; what is there cannot be read",
                extra={"segment": segment.path.name, "offset": offset, "bytes": cut - offset},
            )
            first, last, known = _seqs_held(data, offset, cut, previous)
            if ceiling:  # an older segment: the next one starts after the last seq this one held
                last, known = ceiling, True
            why = "not a whole record"
            self.damaged.append(Damaged(segment.path.name, offset, data[offset:cut], why, first, last, known=known))
            segment.size = cut

    def _start(self, base: int) -> None:
        """Start a new newest segment, its name durable in the directory before anything is written to it."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        path = self.directory / segment_name(base)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        try:
            os.fsync(fd)
            _fsync_directory(self.directory)
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                path.unlink()
            raise
        self._fd = fd
        with self._lock:
            self.segments.append(Segment(path, base))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    # --- writing (the writer thread) ---------------------------------------------------------------

    def route(self, stream: str, target: str | None) -> int:
        """The id of a (stream, target) pair."""
        key = (stream, target)
        found = self.routes.get(key)
        if found is None:
            with self._lock:
                found = self.routes[key] = len(self.routes)
        return found

    def append(self, records: Sequence[tuple[int, int, int, bytes, bytes]]) -> list[int]:
        """Append (first, last, route, meta, data) records with one write and make them durable; each one's
        size on disk. On failure (a full disk) nothing of them stays and OSError is raised."""
        segment = self.segments[-1]
        if segment.size >= SEGMENT_BYTES:
            self._start(records[0][0])
            segment = self.segments[-1]
        pieces: list[bytes] = []
        sizes: list[int] = []
        for first, _, _, meta, data in records:
            checked = _CHECKED.pack(first, len(meta), len(data))
            crc = zlib.crc32(data, zlib.crc32(meta, zlib.crc32(checked)))
            pieces += (MAGIC, crc.to_bytes(4, "little"), checked, meta, data)
            sizes.append(HEAD.size + len(meta) + len(data))
        blob = b"".join(pieces)
        try:
            view = memoryview(blob)
            offset = segment.size
            while view:
                written = os.pwrite(self._fd, view, offset)
                view, offset = view[written:], offset + written
            os.fdatasync(self._fd)
        except OSError:
            with contextlib.suppress(OSError):  # leave no partial record for the next group to follow
                os.ftruncate(self._fd, segment.size)
            raise
        with self._lock:
            end = segment.size
            for (first, last, route, _, _), size in zip(records, sizes, strict=True):
                segment._add(first, last, end, end + size, route)
                end += size
        return sizes

    def reserve(self, size: int) -> None:
        """Check that the disk holds `size` more bytes beside the segments: they are allocated in a file of
        their own (`posix_fallocate`, no bytes written), then freed. OSError (ENOSPC) when it does not."""
        allocate = getattr(os, "posix_fallocate", None)
        if allocate is None:  # macOS: the probe proves what its own write does
            return
        path = self.directory / ROOM_FILE
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            allocate(fd, 0, size)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            # A filesystem that cannot allocate ahead: the probe proves what its own write does.
        finally:
            os.close(fd)
            path.unlink(missing_ok=True)

    def keep_spare(self, size: int) -> bool:
        """Allocate `size` bytes in SPARE_FILE (what it holds already stays): whether it holds them now. False
        when the disk lacks the room; what could be allocated stays allocated, for the next try."""
        path = self.directory / SPARE_FILE
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_blocks * 512 >= size:
                return True
            allocate = getattr(os, "posix_fallocate", None)
            try:
                if allocate is None:
                    raise OSError(errno.EOPNOTSUPP, "no posix_fallocate")
                allocate(fd, 0, size)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    return False
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                # A file system that cannot allocate ahead (or macOS): zeros written take the blocks instead.
                try:
                    os.pwrite(fd, b"\0" * size, 0)
                    os.fsync(fd)
                except OSError as failed:
                    if failed.errno in (errno.ENOSPC, errno.EDQUOT):
                        return False
                    raise
            return True
        finally:
            os.close(fd)

    def release_spare(self) -> bool:
        """Unlink SPARE_FILE, giving its room back to the file system: whether there was one."""
        try:
            (self.directory / SPARE_FILE).unlink()
        except FileNotFoundError:
            return False
        return True

    def passed(self, mark: int) -> list[Segment]:
        """The segments, the newest aside, whose every event is at or before `mark`."""
        return [segment for segment in self.segments[:-1] if segment.last <= mark]

    def drop(self, segments: Collection[Segment]) -> None:
        """Unlink segments (all passed). A crash before the unlink is durable brings one back: its events are
        behind every cursor, and it is dropped again."""
        with self._lock:
            self.segments = [segment for segment in self.segments if segment not in segments]
        for segment in segments:
            try:
                segment.path.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:  # its events are delivered: the file is only space, freed at the next start
                log.warning(
                    "journal: cannot remove a delivered segment",
                    extra={"segment": segment.path.name, "error": str(exc)},
                )

    # --- reading -----------------------------------------------------------------------------------

    @property
    def last_seq(self) -> int:
        return self.segments[-1].last if self.segments else 0

    def bytes_after(self, mark: int) -> int:
        """Bytes of the records holding an event after `mark`."""
        total = 0
        with self._lock:
            for segment in self.segments:
                index = bisect_right(segment.lasts, mark)
                if index < len(segment.lasts):
                    total += segment.size - segment.starts[index]
        return total

    def count_after(self, after: int, streams: Collection[str], sink: str, *, skip_to: int = 0) -> int:
        """Events after `after` that `sink` is given: those of `streams`, and those replayed for it; records
        whose every event is at or before `skip_to` are left out, as `read` leaves them out."""
        total = 0
        with self._lock:
            routes = {
                number
                for (stream, target), number in self.routes.items()
                if target == sink or (target is None and stream in streams)
            }
            start = max(after, skip_to)
            for segment in self.segments:
                if not segment.lasts or segment.lasts[-1] <= start:
                    continue
                if segment.firsts[0] > after and segment.lasts[0] > start:
                    total += sum(segment.counts.get(route, 0) for route in routes)
                    continue
                firsts, lasts, held = segment.firsts, segment.lasts, segment.routes
                for index in range(bisect_right(lasts, start), len(lasts)):
                    if held[index] in routes:
                        total += lasts[index] - max(firsts[index], after + 1) + 1
        return total

    def read(
        self, after: int, limit: int, *, skip_to: int = 0, upto: int | None = None, max_bytes: int | None = None
    ) -> list[Record | Damaged]:
        """Whole records holding events after `after`, in order, until they hold `limit` such events, or the
        first one past `upto`, or (at least one record) `max_bytes` bytes on disk; records whose every event is
        at or before `skip_to` are left out (delivered).
        Each record is checked again as at open (its head, its CRC-32, its meta): one the disk changed or cut
        since it was written, or whose file is gone, comes back as Damaged, never as altered events."""
        start = max(after, skip_to)
        plans: list[_Plan] = []
        count = size = 0
        room = max_bytes if max_bytes is not None else -1
        with self._lock:
            streams = self._streams()
            for segment in self.segments:
                lasts = segment.lasts
                index = bisect_right(lasts, start)
                if index == len(lasts):
                    continue
                firsts, stop = segment.firsts, index
                while stop < len(lasts) and count < limit and size != room and (upto is None or firsts[stop] <= upto):
                    count += lasts[stop] - max(firsts[stop], after + 1) + 1
                    if max_bytes is not None:
                        size = min(room, size + segment.ends[stop] - segment.starts[stop])
                    stop += 1
                if stop > index:
                    plans.append(self._plan(segment, index, stop, streams))
                if count >= limit or size == room or (upto is not None and stop < len(lasts)):
                    break
        return _load(plans, keep_data=True)

    def metas(self, after: int, upto: int) -> list[Record]:
        """The records whose last event is in (after, upto], without their data (their dedup keys). A record
        that fails its check is left out, logged: its keys are let go, never read altered."""
        plans: list[_Plan] = []
        with self._lock:
            streams = self._streams()
            for segment in self.segments:
                low, high = bisect_right(segment.lasts, after), bisect_right(segment.lasts, upto)
                if high > low:
                    plans.append(self._plan(segment, low, high, streams))
        records: list[Record] = []
        for found in _load(plans, keep_data=False):
            if isinstance(found, Record):
                records.append(found)
            else:
                log.error(
                    "journal: a damaged record's dedup keys cannot be read; a retry of its events is not caught",
                    extra={"segment": found.segment, "offset": found.offset, "first_seq": found.first},
                )
        return records

    def _streams(self) -> dict[int, str]:
        """Route id -> stream name (the lock held)."""
        return {number: stream for (stream, _), number in self.routes.items()}

    @staticmethod
    def _plan(segment: Segment, index: int, stop: int, streams: dict[int, str]) -> _Plan:
        """What reading records index..stop-1 of a segment takes (the lock held; `streams` from `_streams`)."""
        held = [
            (segment.starts[i], segment.ends[i], segment.firsts[i], segment.lasts[i], streams[segment.routes[i]])
            for i in range(index, stop)
        ]
        return segment.path, segment.starts[index], segment.ends[stop - 1], held


_Plan = tuple[Path, int, int, list[tuple[int, int, int, int, str]]]
"""A segment's path, the bytes to read (begin, end), and each record's (start, end, first, last, stream)."""


def _load(plans: Sequence[_Plan], *, keep_data: bool) -> list[Record | Damaged]:
    """The planned records, each checked (`_checked`)."""
    records: list[Record | Damaged] = []
    for path, begin, end, held in plans:
        try:
            data = _pread(path, begin, end - begin)
        except FileNotFoundError:  # unlinked once delivered, or removed by hand (the journal tells which)
            gone = "its segment file is gone"
            records += [Damaged(path.name, at, b"", gone, first, last, stream) for at, _, first, last, stream in held]
            continue
        records += [_checked(path.name, data, begin, *span, keep_data=keep_data) for span in held]
    return records


def _checked(
    name: str, data: bytes, begin: int, start: int, end: int, first: int, last: int, stream: str, *, keep_data: bool
) -> Record | Damaged:
    """The record the index puts at `start`..`end` of its segment (`data` read from `begin`), checked as at
    open: all of it there, its head where the index says, its CRC-32, its meta readable."""
    offset, stop = start - begin, end - begin
    if stop > len(data):
        why = "the segment file is shorter than it was written (cut)"
        return Damaged(name, start, data[offset:stop], why, first, last, stream)
    magic, crc, found, meta_size, data_size = HEAD.unpack_from(data, offset)
    meta_at = offset + HEAD.size
    if magic != MAGIC or found != first or meta_at + meta_size + data_size != stop:
        why = "its head changed"
    elif zlib.crc32(memoryview(data)[offset + 8 : stop]) != crc:
        why = "its CRC-32 does not match"
    else:
        try:
            events = data[meta_at + meta_size : stop] if keep_data else b""
            return _record(first, data[meta_at : meta_at + meta_size], events)
        except (orjson.JSONDecodeError, ValueError, TypeError, zstandard.ZstdError):
            why = "its meta cannot be read"
    return Damaged(name, start, data[offset:stop], why, first, last, stream)


def _data_size(data: bytes, offset: int) -> int:
    return int(HEAD.unpack_from(data, offset)[4])


def _whole(data: bytes, offset: int, previous: int) -> Record | None:
    """The record at `offset` when it is whole (its meta decoded, `data` its meta's bytes), else None."""
    if offset + HEAD.size > len(data):
        return None
    magic, crc, first, meta_size, data_size = HEAD.unpack_from(data, offset)
    end: int = offset + HEAD.size + meta_size + data_size
    if magic != MAGIC or end > len(data) or first <= previous:
        return None
    meta = data[offset + HEAD.size : offset + HEAD.size + meta_size]
    if zlib.crc32(memoryview(data)[offset + 8 : end]) != crc:
        return None
    try:
        record = _record(first, meta, meta)
    except (orjson.JSONDecodeError, ValueError, TypeError, zstandard.ZstdError):
        return None
    return record if record.actions else None


_HINT_BYTES = 16 << 20
"""The most of a damaged meta or events frame `_seqs_held` decompresses (a meta of 100,000 events is ≈ 8 MiB)."""

_SEQ_SPAN = 1 << 32
"""How far past the last seq known a damaged head's seq is believed (further: the disk changed it)."""


def _plausible(first: int, previous: int) -> bool:
    """Whether a head's first seq can be one this journal wrote after `previous`."""
    return previous < first <= previous + _SEQ_SPAN


def _span(data: bytes, at: int, previous: int, limit: int | None = None) -> int | None:
    """The end of the record whose head is at `at`, when its head is plausible and all its bytes are there:
    where its CRC-32 checks, by its lengths or with one length changed to end at a later record's magic or at
    the end (the disk changed the length: it claims more than there is, or more than the record held, which
    takes the next record's head inside it), else by its lengths when they fit. None: a head cut short, or not
    one. Only the bytes before `limit` (default: the end) count."""
    size = len(data) if limit is None else limit
    if at + HEAD.size > size:
        return None
    magic, crc, first, meta_size, data_size = HEAD.unpack_from(data, at)
    if magic != MAGIC or not _plausible(first, previous):
        return None
    end = int(at + HEAD.size + meta_size + data_size)
    view = memoryview(data)
    if end <= size and zlib.crc32(view[at + 8 : end]) == crc:
        return end
    stop = data.find(MAGIC, at + HEAD.size, min(end, size))
    for _ in range(_CANDIDATES):
        candidate = min(end, size) if stop < 0 else stop
        body = candidate - at - HEAD.size
        for sizes in ((meta_size, body - meta_size), (body - data_size, data_size)):  # one length changed
            if min(sizes) >= 0:
                checked = zlib.crc32(view[at + HEAD.size : candidate], zlib.crc32(_CHECKED.pack(first, *sizes)))
                if checked == crc:
                    return candidate
        if stop < 0:
            break
        stop = data.find(MAGIC, stop + 1, min(end, size))
    return end if end <= size else None


_CANDIDATES = 256
"""The most ends `_span` checks a damaged record's CRC-32 at (a magic inside its events is one too)."""


def _torn(data: bytes, at: int, previous: int) -> bool:
    """Whether the bytes from `at` to the end are the start of a record whose write was cut short: its head
    (what there is of it) as written, and less than the whole record there. A record all there that fails its
    check, all there under a length the disk changed, or bytes no record starts with, are damage."""
    rest = len(data) - at
    if rest < HEAD.size:
        return data[at : at + len(MAGIC)] == MAGIC[:rest]
    magic, _, first, _, _ = HEAD.unpack_from(data, at)
    if magic != MAGIC or not _plausible(first, previous) or _span(data, at, previous) is not None:
        return False
    # A write is cut short from its end: what follows a torn record's head is that record's bytes, never the
    # head of a later one. A later magic means the disk changed this one's lengths (and bytes): damage, even
    # when the disk changed that head's seq too. Taking damage for a torn write would cut acknowledged records
    # and give their seqs again; taking a torn write whose events hold the magic for damage keeps it aside.
    return data.find(MAGIC, at + 1) < 0


def _heads(data: bytes, offset: int, stop: int, previous: int) -> list[tuple[int, int | None]]:
    """(start, end or None) of what look like records' heads in `offset..stop`, skipping what lies inside the
    span of a record whose head and lengths hold (a magic inside its events is not a head)."""
    found: list[tuple[int, int | None]] = []
    at = offset if data.startswith(MAGIC, offset) else data.find(MAGIC, offset, stop)
    while 0 <= at < stop:
        end = _span(data, at, previous, stop)
        found.append((at, end))
        at = data.find(MAGIC, max(at + 1, end or 0), stop)
    return found


def _torn_from(data: bytes, offset: int, previous: int) -> int:
    """Where a write cut short starts in the bytes from `offset` on (the newest segment's end), else their end:
    a record's head as written with less than the whole record after it (1 byte of its magic or more), or only
    zeros (a power loss can leave a file's new size without its data). The bytes before it are damage. Zeros
    after a record's head are kept as damage: a record all there whose last bytes the disk zeroed looks the
    same, and was acknowledged."""
    if data.count(0, offset) == len(data) - offset:
        return offset
    after = offset  # where a head may start: not inside a record whose lengths hold
    for at, end in _heads(data, offset, len(data), previous):
        if end is None and _torn(data, at, previous):
            return at
        after = max(after, end or at + 1)
    for size in range(len(MAGIC) - 1, 0, -1):  # a head cut inside its magic (one holding all of it is a head above)
        if len(data) - size >= after and data.endswith(MAGIC[:size]):
            return len(data) - size
    return len(data)


def _seqs_held(data: bytes, offset: int, stop: int, previous: int) -> tuple[int, int, bool]:
    """The seqs damaged bytes `offset..stop` held after `previous`, as far as what is left of their records
    tells: (first, last, whether last is the last for certain; last 0: not known). Each record found holds
    as many seqs as its meta or its events say (bounded reads: a changed frame header may claim any size),
    else one, from the seq its head names when that is plausible, else from the one after the last found.
    They only name what the damage cost, and keep those seqs from being given again."""
    first, last, known = previous + 1, 0, False
    at, number = offset, 0
    while at + HEAD.size <= stop:  # from record to record by their lengths, else to the next magic
        _, _, found, meta_size, data_size = HEAD.unpack_from(data, at)
        start = found if _plausible(found, max(previous, last)) else max(previous, last) + 1
        meta_at = at + HEAD.size
        meta_end, end = meta_at + meta_size, meta_at + meta_size + data_size
        count = _count(data[meta_at : min(meta_end, stop)], meta=True)
        if not count and end <= stop:
            # The events count only when the lengths lead to the damage's end or to a head (its magic, or
            # its seq the one after them): a changed length would make them start inside the meta or end
            # inside the events, too few named for certain.
            count = _count(data[meta_end:end], meta=False)
            if end < stop and not data.startswith(MAGIC, end):
                after = HEAD.unpack_from(data, end)[2] if end + HEAD.size <= stop else None
                count = count if after == start + count else 0
        if number == 0:
            first = start
        last, known, number = start + max(count, 1) - 1, bool(count), number + 1
        if not end + HEAD.size <= stop:  # its lengths lead nowhere, or to the end
            end = data.find(MAGIC, at + 1, stop)
            if end < 0:
                break
        at = end
    return first, last, known


def _count(frame: bytes, *, meta: bool) -> int:
    """How many events a damaged record's meta (its actions) or events (their lines: a zstd frame, or plain) give;
    0: unreadable."""
    with contextlib.suppress(orjson.JSONDecodeError, ValueError, TypeError, IndexError, zstandard.ZstdError):
        if frame[:4] == ZSTD_MAGIC:
            with zstandard.ZstdDecompressor().stream_reader(frame) as reader:
                text = reader.read(_HINT_BYTES + 1)
        elif not meta:  # plain: as large as it is already
            text = frame[: _HINT_BYTES + 1]
        else:
            return 0
        if not text or len(text) > _HINT_BYTES:
            return 0
        if not meta:
            return text.count(b"\n") + 1
        actions = orjson.loads(text)[3]
        return len(actions) if isinstance(actions, list) else 0
    return 0


def _resync(data: bytes, offset: int, previous: int) -> int | None:
    """After a record at `offset` that is not whole: where the next whole record starts (its CRC checked, its
    seq after `previous`), else None (what is left is a torn write, or damage, to the end)."""
    at = data.find(MAGIC, offset + 1)
    while at >= 0:
        if _whole(data, at, previous) is not None:
            return at
        at = data.find(MAGIC, at + 1)
    return None


def _pread(path: Path, offset: int, size: int) -> bytes:
    """`size` bytes at `offset`, fewer where the file ends first."""
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks: list[bytes] = []
        while size > 0:
            chunk = os.pread(fd, size, offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
            size -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
