"""The file sink: lines as sent, strftime paths from the event time, fsync, rotation, retention."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import time
from pathlib import Path

import aiohttp
import orjson
import pytest

from receiver.samples import encode_body, sample_wrappers
from sinks import file as file_sink
from sinks.base import Outcome
from sinks.file import FileSink
from sinks.retention import FilePattern, sweep
from sinks.testing.compliance import make_events
from sinks.testing.exact import EXACT_LITERALS, exact_event, same_json
from tests.conftest import TOKEN, StartService


class TestFileSink:
    async def test_one_compact_line_per_event_by_event_date(self, tmp_path: Path) -> None:
        sink = FileSink("f", FileSink.Config(path=str(tmp_path / "%Y" / "%m-%d.ndjson")))
        events = make_events(3)
        events[1].time = 1705314600.0  # 2024-01-15
        result = await sink.send(events)
        assert result.outcome is Outcome.SUCCESS
        old = (tmp_path / "2024" / "01-15.ndjson").read_bytes()
        assert old == events[1].raw + b"\n"
        others = [p for p in tmp_path.rglob("*.ndjson") if p.name != "01-15.ndjson"]
        assert len(others) == 1
        lines = others[0].read_bytes().splitlines()
        assert lines == [events[0].raw, events[2].raw]
        assert orjson.loads(lines[0]) == events[0].wrapper

    async def test_the_written_lines_are_the_wrappers_workos_sent(self, tmp_path: Path) -> None:
        sink = FileSink("f", FileSink.Config(path=str(tmp_path / "out.ndjson")))
        events = [make_events(1)[0], exact_event(2)]
        assert (await sink.send(events)).outcome is Outcome.SUCCESS
        lines = (tmp_path / "out.ndjson").read_bytes().splitlines()
        assert lines == [event.raw for event in events]
        assert all(same_json(line, event.raw) for line, event in zip(lines, events, strict=True))  # strict JSON
        assert all(literal in lines[1] for literal in EXACT_LITERALS)

    async def test_appends_across_batches(self, tmp_path: Path) -> None:
        sink = FileSink("f", FileSink.Config(path=str(tmp_path / "out.ndjson")))
        await sink.send(make_events(2))
        await sink.send(make_events(3))
        assert len((tmp_path / "out.ndjson").read_bytes().splitlines()) == 5

    async def test_a_line_a_crash_cut_short_is_replaced_by_the_whole_events(self, tmp_path: Path) -> None:
        path = tmp_path / "out.ndjson"
        sink = FileSink("f", FileSink.Config(path=str(path)))
        first, resent = make_events(2), make_events(3, start_seq=10)
        await sink.send(first)
        whole = path.read_bytes()
        for torn in (resent[0].raw[:7], b'{"event":{"pad":"' + b"x" * 200_000):  # within a read, and longer
            path.write_bytes(whole + torn)  # the process was killed inside a write
            assert (await sink.send(resent)).outcome is Outcome.SUCCESS
            assert path.read_bytes().splitlines() == [e.raw for e in first + resent]
        path.write_bytes(b"no newline at all")
        await sink.send(resent)
        assert path.read_bytes().splitlines() == [e.raw for e in resent]

    async def test_rotation_at_max_file_bytes(self, tmp_path: Path) -> None:
        sink = FileSink("f", FileSink.Config(path=str(tmp_path / "out.ndjson"), max_file_bytes="2KiB"))
        for _ in range(10):
            await sink.send(make_events(3))
        files = sorted(tmp_path.glob("out*.ndjson"))
        assert len(files) > 2 and tmp_path / "out.1.ndjson" in files
        assert all(f.stat().st_size <= 2048 for f in files)
        assert sum(len(f.read_bytes().splitlines()) for f in files) == 30

    async def test_a_batch_larger_than_the_room_left_is_split_across_files(self, tmp_path: Path) -> None:
        limit = 2048
        sink = FileSink("f", FileSink.Config(path=str(tmp_path / "out.ndjson"), max_file_bytes=limit))
        events = make_events(40)  # about 12 KiB in one batch: more than five files' worth
        assert (await sink.send(events)).outcome is Outcome.SUCCESS
        await sink.send(make_events(7))
        # rotated files in rotation order (out.1, out.2, ..., out.10), the current one last
        files = sorted(
            tmp_path.glob("out*.ndjson"), key=lambda f: int(f.suffixes[0][1:]) if len(f.suffixes) > 1 else 1e9
        )
        assert len(files) >= 6
        assert all(f.stat().st_size <= limit for f in files), [f.stat().st_size for f in files]
        lines = [line for f in files for line in f.read_bytes().splitlines()]
        assert len(lines) == 47 and lines[:40] == [e.raw for e in events]  # in order, none lost or doubled

    async def test_only_an_event_larger_than_the_limit_makes_a_file_exceed_it(self, tmp_path: Path) -> None:
        limit = 1000
        sink = FileSink("f", FileSink.Config(path=str(tmp_path / "out.ndjson"), max_file_bytes=limit))
        small = make_events(2)
        big = exact_event(3, event_raw=b'{"id":"big","action":"a","blob":"' + b"x" * 1500 + b'"}')
        assert (await sink.send([small[0], big, small[1]])).outcome is Outcome.SUCCESS
        files = sorted(tmp_path.glob("out*.ndjson"))
        sizes = {f: f.stat().st_size for f in files}
        oversized = [f for f, size in sizes.items() if size > limit]
        assert len(oversized) == 1 and oversized[0].read_bytes() == big.raw + b"\n"
        assert sum(len(f.read_bytes().splitlines()) for f in files) == 3

    async def test_unwritable_path_is_retry_with_reason(self, tmp_path: Path) -> None:
        (tmp_path / "blocked").write_text("a file, not a directory")
        sink = FileSink("f", FileSink.Config(path=str(tmp_path / "blocked" / "x.ndjson")))
        result = await sink.send(make_events(1))
        assert result.outcome is Outcome.RETRY and "cannot write" in result.reason
        health = await sink.healthcheck()
        assert not health.ok

    async def test_a_new_file_and_its_new_directories_are_fsynced_into_their_parents(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # A batch counts delivered once fsynced; a file (or directory) the batch created must survive a crash
        # too, which on POSIX takes an fsync of the directory holding its name, as the journal does.
        synced: list[Path] = []
        real = os.fsync

        def fsync(fd: int) -> None:
            synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
            real(fd)

        monkeypatch.setattr(os, "fsync", fsync)
        sink = FileSink("f", FileSink.Config(path=str(tmp_path / "a" / "b" / "%Y.ndjson")))
        events = make_events(2)
        assert (await sink.send(events)).outcome is Outcome.SUCCESS
        (written,) = (tmp_path / "a" / "b").iterdir()
        assert written in synced
        assert {tmp_path, tmp_path / "a", tmp_path / "a" / "b"} <= set(synced), synced  # every new name's directory
        assert tmp_path / "a" / "b" in synced[synced.index(written) :], synced  # the file's, once the file exists


DAY = 86400.0
MB = 1000**2


def aged(path: Path, days: float, size: int = 100) -> Path:
    """Make `path` (and its directories) holding `size` bytes, last written `days` ago."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * (size - 1) + b"\n")
    when = time.time() - days * DAY
    os.utime(path, (when, when))
    return path


def files_under(root: Path) -> set[str]:
    return {str(path.relative_to(root)) for path in root.rglob("*") if not path.is_dir()}


class TestRetention:
    async def test_without_a_limit_nothing_is_deleted(self, tmp_path: Path) -> None:
        old = [aged(tmp_path / name, 4000) for name in ("2015-01-01.ndjson", "2015-01-01.1.ndjson", "out.1.ndjson")]
        for path in (str(tmp_path / "%Y-%m-%d.ndjson"), str(tmp_path / "out.ndjson")):
            sink = FileSink("f", FileSink.Config(path=path, max_file_bytes="1MiB"))
            assert (await sink.send(make_events(2))).outcome is Outcome.SUCCESS
        assert all(path.exists() for path in old)

    async def test_files_last_written_before_max_age_go_and_nothing_else(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        events = tmp_path / "events"
        expired = [aged(events / "2020-01-01.ndjson", 40, 300), aged(events / "2020-01-01.1.ndjson", 40, 200)]
        recent = aged(events / "2020-02-01.ndjson", 10)
        strangers = [
            aged(events / name, 40)
            for name in (
                "README.txt",
                "2020-01-01.ndjson.bak",
                "2020-01-01-notes.ndjson",
                "2020-13-01.ndjson",  # no month 13
                "2020-01-01.01.ndjson",  # rotation numbers have no leading zero
                "2020-01-01.0.ndjson",
                "x2020-01-01.ndjson",
            )
        ]
        strangers.append(aged(tmp_path / "2020-01-01.ndjson", 40))  # beside the pattern's directory, not in it
        strangers.append(aged(events / "2020-01-04.ndjson" / "inside", 40))  # a directory of a file's name
        target = aged(tmp_path / "elsewhere.ndjson", 40)
        (events / "2020-01-05.ndjson").symlink_to(target)
        before = files_under(tmp_path)
        sink = FileSink("f", FileSink.Config(path=str(events / "%Y-%m-%d.ndjson"), max_age="30d"))
        with caplog.at_level(logging.INFO, logger="sinks.file"):
            assert (await sink.send(make_events(2))).outcome is Outcome.SUCCESS
        gone = before - files_under(tmp_path)
        assert gone == {str(path.relative_to(tmp_path)) for path in expired}
        assert recent.exists() and all(path.exists() for path in strangers) and target.exists()
        assert (events / "2020-01-05.ndjson").is_symlink()
        (line,) = [r.getMessage() for r in caplog.records if "retention" in r.getMessage()]
        assert line.startswith("sink f: retention removed 2 files (500 bytes) and 0 empty directories;"), line

    async def test_the_file_being_written_stays_however_old(self, tmp_path: Path) -> None:
        current = aged(tmp_path / "out.ndjson", 50)
        rotated = [aged(tmp_path / f"out.{number}.ndjson", 50) for number in (1, 2, 10)]
        sink = FileSink("f", FileSink.Config(path=str(current), max_file_bytes="1MiB", max_age="1d"))
        events = make_events(2)
        assert (await sink.send(events)).outcome is Outcome.SUCCESS
        assert not any(path.exists() for path in rotated)
        assert current.read_bytes().splitlines()[1:] == [event.raw for event in events]  # appended, kept

    async def test_max_total_bytes_deletes_the_oldest_first(self, tmp_path: Path) -> None:
        by_age = {days: aged(tmp_path / f"out.{days}.ndjson", days, MB) for days in (5, 4, 3, 2, 1)}
        current = aged(tmp_path / "out.ndjson", 9, MB // 2)  # counted, never deleted
        sink = FileSink("f", FileSink.Config(path=str(current), max_total_bytes="2.5MB"))
        assert (await sink.send(make_events(1))).outcome is Outcome.SUCCESS
        assert [days for days, path in by_age.items() if path.exists()] == [2, 1]  # 2 MB + 0.5 MB fit
        assert current.exists()

    async def test_both_limits_apply(self, tmp_path: Path) -> None:
        files = [aged(tmp_path / f"2020-01-0{day}.ndjson", 10 - day, MB) for day in range(1, 7)]  # 9 to 4 days
        sink = FileSink(
            "f", FileSink.Config(path=str(tmp_path / "%Y-%m-%d.ndjson"), max_age="7d", max_total_bytes="3MB")
        )
        assert (await sink.send(make_events(1))).outcome is Outcome.SUCCESS
        # 9, 8 days: too old; then 7 days: the 3 left and today's file come to more than 3 MB
        assert [path.exists() for path in files] == [False, False, False, True, True, True]

    async def test_emptied_date_directories_go_others_stay(self, tmp_path: Path) -> None:
        pattern = tmp_path / "%Y" / "%m" / "%d" / "events.ndjson"
        aged(tmp_path / "2019" / "12" / "31" / "events.ndjson", 40)
        aged(tmp_path / "2020" / "01" / "01" / "events.1.ndjson", 40)
        aged(tmp_path / "2020" / "01" / "02" / "events.ndjson", 40)
        notes = aged(tmp_path / "2020" / "01" / "02" / "notes.txt", 40)
        other = aged(tmp_path / "2020" / "backup" / "01" / "events.ndjson", 40)  # `backup` is no month
        sink = FileSink("f", FileSink.Config(path=str(pattern), max_age="30d"))
        assert (await sink.send(make_events(1))).outcome is Outcome.SUCCESS
        assert not (tmp_path / "2019").exists()  # year, month and day directories, all emptied
        assert not (tmp_path / "2020" / "01" / "01").exists()
        assert notes.exists() and not (tmp_path / "2020" / "01" / "02" / "events.ndjson").exists()
        assert other.exists() and tmp_path.is_dir()

    def test_a_leading_directory_with_a_literal_percent_stays_when_emptied(self, tmp_path: Path) -> None:
        # `%%` is a `%`, no field: `100%` is one of the leading directories, which a sweep never removes (it took
        # `100%%` for the first field, and removed `100%` with the last expired file in it).
        leading = tmp_path / "100%"
        aged(leading / "2020-01-01.ndjson", 40)
        path = str(tmp_path / "100%%" / "%Y-%m-%d.ndjson")
        # The sweep alone: the sink's write after it would make the directory again.
        result = sweep(FilePattern.of(path), now=time.time(), current="", max_age=30 * DAY, max_total_bytes=None)
        assert (result.removed, result.directories) == (1, 0)
        assert leading.is_dir()

    async def test_a_late_event_for_an_expired_date_starts_a_new_file(self, tmp_path: Path) -> None:
        sink = FileSink("f", FileSink.Config(path=str(tmp_path / "%Y-%m-%d.ndjson"), max_age="30d"))
        expired, kept = aged(tmp_path / "2020-01-01.ndjson", 40), aged(tmp_path / "2020-01-02.ndjson", 20)
        late = make_events(2)
        late[0].time, late[1].time = 1577880000.0, 1577966400.0  # 2020-01-01 and 2020-01-02, noon
        assert (await sink.send(late)).outcome is Outcome.SUCCESS
        # The sweep runs before the write: the expired file went, and the late event is in a file of its own,
        # whose age starts now; the file still kept has the late line appended, and its age starts again too.
        assert expired.read_bytes() == late[0].raw + b"\n"
        assert kept.read_bytes().splitlines()[1:] == [late[1].raw]
        assert time.time() - kept.stat().st_mtime < DAY

    async def test_a_sweep_runs_at_most_every_interval_and_after_a_full_disk(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        sink = FileSink("f", FileSink.Config(path=str(tmp_path / "out.ndjson"), max_age="1d"))
        assert (await sink.send(make_events(1))).outcome is Outcome.SUCCESS
        old = aged(tmp_path / "out.1.ndjson", 5)
        assert (await sink.send(make_events(1))).outcome is Outcome.SUCCESS
        assert old.exists()  # not swept on every batch

        def full(path: Path, data: bytes) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

        with monkeypatch.context() as patch:
            patch.setattr(file_sink, "_append", full)
            result = await sink.send(make_events(1))
        assert result.outcome is Outcome.RETRY and "No space left" in result.reason
        assert old.exists()
        assert (await sink.send(make_events(1))).outcome is Outcome.SUCCESS  # the retry sweeps first
        assert not old.exists()

    async def test_a_file_that_cannot_be_deleted_is_logged_once_a_sweep_and_delivery_goes_on(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
    ) -> None:
        stuck, other = aged(tmp_path / "out.1.ndjson", 5), aged(tmp_path / "out.2.ndjson", 5)
        real = os.unlink

        def unlink(path: str | os.PathLike[str], *, dir_fd: int | None = None) -> None:
            if Path(path) == stuck:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            real(path, dir_fd=dir_fd)

        monkeypatch.setattr(os, "unlink", unlink)
        sink = FileSink("f", FileSink.Config(path=str(tmp_path / "out.ndjson"), max_age="1d"))
        with caplog.at_level(logging.INFO, logger="sinks.file"):
            for _ in range(3):
                assert (await sink.send(make_events(1))).outcome is Outcome.SUCCESS
        assert stuck.exists() and not other.exists()
        (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert warning.getMessage() == (
            f"sink f: retention could not remove 1 files ({stuck}: Permission denied); tried again at the next sweep"
        )
        assert len((tmp_path / "out.ndjson").read_bytes().splitlines()) == 3

    async def test_a_directory_that_cannot_be_read_keeps_only_its_own_files(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
    ) -> None:
        # One unreadable year (a restored backup owned by another user, say) must not keep every file for ever.
        unlisted, unsearchable = aged(tmp_path / "2018" / "01.ndjson", 400), aged(tmp_path / "2019" / "01.ndjson", 400)
        expired = aged(tmp_path / "2020" / "01.ndjson", 400)
        scandir, stat = os.scandir, os.stat

        def scandir_but_2018(path: str) -> object:
            if path.endswith("/2018/"):  # as for a directory of mode 0 owned by another user
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
            return scandir(path)

        def stat_but_2019(path: str | os.PathLike[str], **options: bool) -> os.stat_result:
            if str(path).endswith("/2019/01.ndjson"):  # as in a directory of mode r--
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return stat(path, **options)

        monkeypatch.setattr(os, "scandir", scandir_but_2018)
        monkeypatch.setattr(os, "stat", stat_but_2019)
        sink = FileSink("f", FileSink.Config(path=str(tmp_path / "%Y" / "%m.ndjson"), max_age="30d"))
        with caplog.at_level(logging.INFO, logger="sinks.file"):
            assert (await sink.send(make_events(1))).outcome is Outcome.SUCCESS
        monkeypatch.undo()
        assert not expired.exists() and unlisted.exists() and unsearchable.exists()
        (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert warning.startswith("sink f: retention could not remove 2 files ("), warning  # one named
        assert any(f"{tmp_path}/{year}" in warning for year in ("2018/: ", "2019/01.ndjson: ")), warning

    async def test_a_file_another_program_holds_locked_is_left_and_delivery_goes_on(self, tmp_path: Path) -> None:
        # The sweep runs under the sink's lock: waiting for another program's lock would stop delivery with it.
        held, expired = aged(tmp_path / "out.1.ndjson", 5), aged(tmp_path / "out.2.ndjson", 5)
        sink = FileSink("f", FileSink.Config(path=str(tmp_path / "out.ndjson"), max_age="1d"))
        with held.open("rb") as reader:
            fcntl.flock(reader, fcntl.LOCK_SH)
            async with asyncio.timeout(20):  # a pass takes milliseconds; before, it waited for the lock
                assert (await sink.send(make_events(1))).outcome is Outcome.SUCCESS
        assert held.exists() and not expired.exists()
        assert len((tmp_path / "out.ndjson").read_bytes().splitlines()) == 1

    async def test_expired_files_go_under_nfs_locking_rules(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # On NFS flock is emulated with fcntl's byte-range locks: an exclusive one needs a descriptor open for
        # writing (EBADF otherwise). Retention opened files read-only, so on NFS (EFS volumes, say) it deleted
        # nothing, ever. The rule is emulated here, on the real flock.
        expired = aged(tmp_path / "out.1.ndjson", 5)
        real = fcntl.flock

        def flock(fd: int, operation: int) -> None:
            writable = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDONLY
            if operation & fcntl.LOCK_EX and not writable:
                raise OSError(errno.EBADF, os.strerror(errno.EBADF))
            real(fd, operation)

        monkeypatch.setattr(fcntl, "flock", flock)
        sink = FileSink("f", FileSink.Config(path=str(tmp_path / "out.ndjson"), max_age="1d"))
        assert (await sink.send(make_events(1))).outcome is Outcome.SUCCESS
        assert not expired.exists()

    async def test_a_file_deleted_while_a_writer_waits_for_its_lock_is_written_anew(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # Another sink's sweep may unlink a file between this writer's open and its lock: lines written to the
        # unlinked file would be fsynced, counted delivered and lost.
        path = aged(tmp_path / "out.ndjson", 5)
        real, calls = fcntl.flock, []

        def flock(fd: int, operation: int) -> None:
            calls.append(fd)
            if len(calls) == 1:
                os.unlink(path)  # the sweep wins the race
            real(fd, operation)

        monkeypatch.setattr(fcntl, "flock", flock)
        sink = FileSink("f", FileSink.Config(path=str(path)))
        events = make_events(2)
        assert (await sink.send(events)).outcome is Outcome.SUCCESS
        assert path.read_bytes().splitlines() == [event.raw for event in events]

    async def test_a_service_configured_with_retention_sweeps_as_it_delivers(
        self, tmp_path: Path, start_service: StartService, client: aiohttp.ClientSession
    ) -> None:
        events = tmp_path / "events"
        old, readme = aged(events / "2020-01-01.ndjson", 40), aged(events / "README.txt", 40)
        archive = {"type": "file", "path": str(events / "%Y-%m-%d.ndjson"), "max_age": "30d"}
        service = await start_service(
            {"streams": [{"name": "workos", "path": "/workos", "auth": {"values": [TOKEN]}, "sinks": ["archive"]}]}
            | {"sinks": {"archive": archive | {"batch": {"max_wait": "10ms"}}}}
        )
        wrappers = sample_wrappers(3)
        body, content_type = encode_body(wrappers, "ndjson")
        headers = {"Authorization": TOKEN, "Content-Type": content_type}
        async with client.post(f"{service.url}/workos", data=body, headers=headers) as response:
            assert response.status == 200
        deadline = time.monotonic() + 30
        while sum(len(p.read_bytes().splitlines()) for p in events.glob("20*.ndjson")) < 3:
            assert time.monotonic() < deadline, "the events were not delivered"
            await asyncio.sleep(0.02)
        assert not old.exists() and readme.exists()
