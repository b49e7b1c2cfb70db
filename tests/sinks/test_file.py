"""The file sink: lines as sent, strftime paths from the event time, fsync, rotation."""

from __future__ import annotations

import os
from pathlib import Path

import orjson
import pytest

from sinks.base import Outcome
from sinks.file import FileSink
from sinks.testing.compliance import make_events
from sinks.testing.exact import EXACT_LITERALS, exact_event, same_json


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
