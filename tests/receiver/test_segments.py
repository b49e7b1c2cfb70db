"""The segment files: what a crash leaves is cut back to whole records, damage is reported, a failed write
leaves nothing behind, and a journal of an earlier version (events in SQLite) is moved in under its seqs."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import sqlite3
import struct
import time
from pathlib import Path

import orjson
import pytest
import zstandard

from receiver.errors import JournalError
from receiver.journal import Journal, facade
from receiver.journal.segments import HEAD, MAGIC
from tests.receiver.test_journal import batch, opened
from tests.receiver.test_unattended import small_disk


@pytest.fixture(autouse=True)
def compressed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Records as zstd frames, as a backlog past PLAIN_BELOW has them: most damage here is made inside a frame.
    `TestPlainRecords` and the fuzz test run with plain records too."""
    monkeypatch.setattr(facade, "PLAIN_BELOW", 0)


def plain(monkeypatch: pytest.MonkeyPatch) -> None:
    """Records' events written plain, as while the backlog is small."""
    monkeypatch.setattr(facade, "PLAIN_BELOW", 1 << 62)


def segment_files(journal: Journal) -> list[Path]:
    return sorted(journal.segments.directory.glob("*.seg"))


async def three_requests(path: Path, delivered: int = 0) -> Path:
    """A journal at `path` holding requests "a", "b" and "c" (seqs 1–3), a sink past `delivered`, closed; its
    one segment file."""
    journal = await opened(path)
    for key in ("a", "b", "c"):
        await journal.append("s", batch(key), time.time())
    if delivered:
        await journal.commit_progress("sink", delivered, [], ["sink"])
    await journal.close()
    (segment,) = segment_files(journal)
    return segment


class TestRecovery:
    async def test_a_torn_write_is_cut_off_and_what_was_acknowledged_stays(self, tmp_path: Path) -> None:
        journal = await opened(tmp_path / "j.db")
        await journal.append("s", batch("a", "b"), time.time())
        await journal.append("s", batch("c"), time.time())
        await journal.close()
        (segment,) = segment_files(journal)
        whole = segment.read_bytes()
        database = {file: file.read_bytes() for file in tmp_path.glob("j.db*") if file.is_file()}
        third = await opened(tmp_path / "other.db")  # a record as the writer makes it (seqs 4-5), to tear
        await third.append("s", batch("x", "y", "z"), time.time())
        await third.append("s", batch("d", "e"), time.time())
        start = third.segments.segments[0].starts[1]
        await third.close()
        record = segment_files(third)[0].read_bytes()[start:]
        for torn in (record[:10], record[: HEAD.size + 5], record[:-1]):
            segment.write_bytes(whole + torn)  # killed inside the write of a group
            again = await opened(tmp_path / "j.db")
            try:
                assert [e.raw for e, _ in await again.read(0, 10)] == batch("a", "b", "c").raws
                assert segment.stat().st_size == len(whole)
                assert (await again.append("s", batch("c", "d"), time.time())).accepted == 1  # c: a duplicate
                assert [e.seq for e, _ in await again.read(0, 10)] == [1, 2, 3, 4]
            finally:
                await again.close()
            segment.write_bytes(whole)  # back to before "d" was acknowledged, the database too
            for file, data in database.items():
                file.write_bytes(data)

    @pytest.mark.parametrize("where", [-3, HEAD.size + 2], ids=["events", "meta"])
    async def test_a_damaged_record_in_an_older_segment_is_reported(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, where: int
    ) -> None:
        monkeypatch.setattr("receiver.journal.segments.SEGMENT_BYTES", 1)  # a segment per request
        journal = await opened(tmp_path / "j.db")
        for key in ("a", "b", "c"):
            await journal.append("s", batch(key), time.time())
        await journal.close()
        oldest = segment_files(journal)[0]
        damaged = bytearray(oldest.read_bytes())
        damaged[where] ^= 0xFF  # a flipped byte in its events or its meta: the CRC says so
        oldest.write_bytes(bytes(damaged))
        with caplog.at_level(logging.ERROR, logger="receiver.journal"):
            again = await opened(tmp_path / "j.db")
        try:
            assert [e.raw for e, _ in await again.read(0, 10)] == batch("b", "c").raws
            assert "a segment is damaged" in caplog.text
            assert oldest.stat().st_size == len(damaged)  # not cut: it is not where a crash writes
            ((_, _, reason),) = await damage_letters(again)
            assert "(seqs 1-1) cannot be delivered" in reason  # the next segment starts at seq 2
        finally:
            await again.close()

    @pytest.mark.parametrize("where", [0, 16, HEAD.size + 5], ids=["magic", "meta length", "meta"])
    async def test_a_damaged_record_in_the_newest_segment_keeps_those_after_it(
        self, tmp_path: Path, where: int
    ) -> None:
        segment = await three_requests(tmp_path / "j.db")
        damaged = bytearray(segment.read_bytes())
        damaged[where] ^= 0xFF  # in the first record: whole records follow it
        segment.write_bytes(bytes(damaged))
        again = await opened(tmp_path / "j.db")
        try:
            assert [e.raw for e, _ in await again.read(0, 10)] == batch("b", "c").raws
            assert segment.stat().st_size == len(damaged)  # not taken for a torn write: nothing cut
            await again.append("s", batch("new"), time.time())
            assert [e.seq for e, _ in await again.read(3, 10)] == [4]
        finally:
            await again.close()

    async def test_damage_then_a_torn_write_keeps_the_whole_records_between(self, tmp_path: Path) -> None:
        segment = await three_requests(tmp_path / "j.db")
        whole = bytearray(segment.read_bytes())
        whole[HEAD.size + 5] ^= 0xFF  # the first record damaged
        segment.write_bytes(bytes(whole) + MAGIC + b"\0" * 9)  # and a later group's write cut short
        again = await opened(tmp_path / "j.db")
        try:
            assert [e.raw for e, _ in await again.read(0, 10)] == batch("b", "c").raws
            assert segment.stat().st_size == len(whole)  # only the torn write is cut
        finally:
            await again.close()

    async def test_numbers_never_go_back_below_the_cursors(self, tmp_path: Path) -> None:
        segment = await three_requests(tmp_path / "j.db", delivered=3)
        segment.write_bytes(segment.read_bytes()[:10])  # the disk lost every record
        again = await opened(tmp_path / "j.db")
        try:
            await again.append("s", batch("new"), time.time())
            cursor = (await again.cursors(["sink"]))["sink"]
            assert [e.raw for e, _ in await again.read(cursor, 10)] == batch("new").raws
        finally:
            await again.close()

    async def test_keys_of_delivered_records_survive_a_restart(self, tmp_path: Path) -> None:
        journal = await opened(tmp_path / "j.db")
        await journal.append("s", batch("delivered"), time.time())
        await journal.append("s", batch("owed"), time.time())
        await journal.commit_progress("sink", 1, [], ["sink"])  # the mark passes the first record only
        logged = await journal._read(lambda c: c.execute("SELECT keys FROM dedup_log").fetchall())
        await journal.close()
        assert [orjson.loads(keys) for (keys,) in logged] == [["delivered"]]  # copied as delivery passed it
        again = await opened(tmp_path / "j.db")
        try:
            assert again.dedup.size == 2
            result = await again.append("s", batch("delivered", "owed", "new"), time.time())
            assert (result.accepted, result.duplicates) == (1, 2)
        finally:
            await again.close()

    async def test_cursor_commits_of_one_group_move_the_mark_once(self, tmp_path: Path) -> None:
        journal = await opened(tmp_path / "j.db")
        try:
            for key in ("k1", "k2", "k3", "k4", "k5"):
                await journal.append("s", batch(key), time.time())
            await journal.start_cursors(["a", "b"], 0)
            await journal.commit_progress("a", 5, [], ["a", "b"])
            held = asyncio.ensure_future(journal._write(lambda conn: time.sleep(0.3)))  # the next ones queue
            await asyncio.sleep(0.05)
            await asyncio.gather(  # one group: b twice, then a reload's view with a alone
                journal.commit_progress("b", 2, [], ["a", "b"]),
                journal.commit_progress("b", 4, [], ["a", "b"]),
                journal.commit_progress("a", 5, [], ["a"]),
                journal.commit_progress("b", 4, [], ["a", "b"]),
                held,
            )
            rows = await journal._read(lambda c: c.execute("SELECT keys FROM dedup_log").fetchall())
            mark = await journal._read(lambda c: c.execute("SELECT value FROM meta WHERE key = 'mark'").fetchone())
            keys = [key for (blob,) in rows for key in orjson.loads(blob)]
            assert sorted(keys) == ["k1", "k2", "k3", "k4", "k5"]  # each copied once
            assert mark == (5,) and journal._mark == 5  # never back to 4
        finally:
            await journal.close()

    async def test_keys_that_cannot_be_read_do_not_stop_delivery(self, tmp_path: Path) -> None:
        journal = await opened(tmp_path / "j.db")
        try:
            for key in ("a", "b"):
                await journal.append("s", batch(key), time.time())
            (segment,) = segment_files(journal)
            with segment.open("r+b") as file:  # the disk changed the first record's meta after it was checked
                file.seek(HEAD.size)
                byte = file.read(1)
                file.seek(HEAD.size)
                file.write(bytes([byte[0] ^ 0xFF]))
            await journal.commit_progress("sink", 2, [], ["sink"])
            assert (await journal.cursors(["sink"]))["sink"] == 2
        finally:
            await journal.close()


class TestSegmentsGoneWhileStopped:
    """Segment files an operator removed, cut, or copied back from a backup older than the database while the
    service was stopped: the events the database knows were not delivered yet and no file holds are reported
    (a dead letter naming their seqs, and an error logged), once, and delivery goes on past them."""

    @pytest.mark.parametrize(
        ("harm", "lost"),
        [
            ("the directory removed", "1-4"),
            ("the newest removed", "4-4"),
            ("an older one removed", "2-2"),
            ("the newest cut at a record's end", "4-4"),
            ("an older backup copied back", "3-4"),
        ],
    )
    async def test_the_events_no_file_holds_are_reported_once_and_passed(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, harm: str, lost: str
    ) -> None:
        path = tmp_path / "j.db"
        backup = tmp_path / "backup"
        monkeypatch.setattr("receiver.journal.segments.SEGMENT_BYTES", 1)
        journal = await opened(path)
        for key in ("a", "b"):
            await journal.append("s", batch(key), time.time())
        backup.mkdir()
        for file in segment_files(journal):
            backup.joinpath(file.name).write_bytes(file.read_bytes())
        for key in ("c", "d"):
            await journal.append("s", batch(key), time.time())
        await journal.close()
        files = segment_files(journal)  # a, b, c, d: a segment each
        directory = files[0].parent
        if harm == "the directory removed":
            for file in directory.iterdir():
                file.unlink()
            directory.rmdir()
        elif harm == "the newest removed":
            files[-1].unlink()
        elif harm == "an older one removed":
            files[1].unlink()
        elif harm == "the newest cut at a record's end":
            files[-1].write_bytes(b"")
        else:
            for file in files:
                file.unlink()
            for file in backup.iterdir():
                directory.joinpath(file.name).write_bytes(file.read_bytes())
        for _ in range(2):  # reported once, however often it starts
            again = await opened(path)
            try:
                letters = await again._read(lambda c: c.execute("SELECT data, reason FROM dead_letters").fetchall())
                assert [(bytes(data), f"(seqs {lost})" in reason) for data, reason in letters] == [(b"", True)]
                assert "segment file" in letters[0][1]
                told = [r for r in caplog.records if r.levelname == "ERROR" and "journal events missing" in r.message]
                assert len(told) == 1  # logged once, as the dead letter is kept once
                await again.append("s", batch("new"), time.time())
                assert batch("new").raws[0] in [e.raw for e, _ in await again.read(0, 10)]
            finally:
                await again.close()

    async def test_a_database_removed_beside_its_segments_is_said(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Was a defect: a new database was made beside segments holding events without a word: every sink
        delivered them again from the start and the dead letters were gone, in silence."""
        path = tmp_path / "j.db"
        await three_requests(path, delivered=1)
        for file in tmp_path.glob("j.db*"):
            if file.is_file() and not file.name.endswith(".lock"):
                file.unlink()
        again = await opened(path)
        try:
            assert [e.raw for e, _ in await again.read(0, 10)] == batch("a", "b", "c").raws  # again, not lost
            (warning,) = [r for r in caplog.records if r.levelname == "WARNING" and "new database" in r.getMessage()]
            assert "dead letters" in warning.getMessage()
        finally:
            await again.close()

    async def test_a_database_older_than_its_segments_loses_nothing(self, tmp_path: Path) -> None:
        # The database copied back from a backup: its cursors are behind, so events are delivered again.
        path = tmp_path / "j.db"
        journal = await opened(path)
        await journal.append("s", batch("a"), time.time())
        await journal.close()
        saved = {
            name: path.with_name(name).read_bytes() for name in ("j.db", "j.db-wal") if path.with_name(name).exists()
        }
        journal = await opened(path)
        await journal.append("s", batch("b"), time.time())
        await journal.close()
        for name, data in saved.items():
            path.with_name(name).write_bytes(data)
        again = await opened(path)
        try:
            assert [e.raw for e, _ in await again.read(0, 10)] == batch("a", "b").raws
            assert await again._read(lambda c: c.execute("SELECT count(*) FROM dead_letters").fetchone()) == (0,)
        finally:
            await again.close()


class TestSharing:
    async def test_a_second_process_is_refused(self, tmp_path: Path) -> None:
        journal = await opened(tmp_path / "j.db")
        try:
            with pytest.raises(JournalError, match="another log-bridge process"):
                await opened(tmp_path / "j.db")
        finally:
            await journal.close()

    async def test_a_second_process_is_refused_once_the_lock_file_was_removed(self, tmp_path: Path) -> None:
        """Was a defect: an operator who took `<journal>.lock` for a stale lock and removed it let a second service
        open the journal; both appended their own seqs at their own offsets of one segment, over each other's
        acknowledged records."""
        journal = await opened(tmp_path / "j.db")
        try:
            (tmp_path / "j.db.lock").unlink()
            with pytest.raises(JournalError, match="another log-bridge process.*ends with that process"):
                await opened(tmp_path / "j.db")
        finally:
            await journal.close()
        again = await opened(tmp_path / "j.db")  # the process gone, its locks are
        await again.close()

    async def test_a_symlinked_path_finds_the_same_segments(self, tmp_path: Path) -> None:
        (tmp_path / "real").mkdir()
        (tmp_path / "link").symlink_to(tmp_path / "real")
        journal = await opened(tmp_path / "link" / "j.db")
        await journal.append("s", batch("a"), time.time())
        await journal.close()
        again = await opened(tmp_path / "real" / "j.db")
        try:
            assert [e.raw for e, _ in await again.read(0, 10)] == batch("a").raws
        finally:
            await again.close()

    async def test_a_segment_that_cannot_be_removed_stops_nothing(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr("receiver.journal.segments.SEGMENT_BYTES", 1)
        journal = await opened(tmp_path / "j.db")
        try:
            await journal.append("s", batch("a"), time.time())
            await journal.append("s", batch("b"), time.time())
            unlink = Path.unlink

            def refuse(self: Path, missing_ok: bool = False) -> None:
                if self.suffix == ".seg":
                    raise PermissionError(13, "Permission denied", str(self))
                unlink(self, missing_ok)

            monkeypatch.setattr(Path, "unlink", refuse)
            await asyncio.wait_for(journal.commit_progress("sink", 2, [], ["sink"]), 5)
            monkeypatch.setattr(Path, "unlink", unlink)
            assert (await asyncio.wait_for(journal.append("s", batch("c"), time.time()), 5)).accepted == 1
        finally:
            await journal.close()


class TestFailedWrites:
    async def test_a_full_disk_leaves_no_partial_record(self, tmp_path: Path) -> None:
        with small_disk(tmp_path / "disk", "16m") as disk:
            journal = await opened(disk / "j.db")
            try:
                refused = 0
                for i in range(400):  # ≈ 100 KiB a request, incompressible: more than the disk holds
                    parsed = batch(f"k{i}")
                    parsed.raws[0] = b'{"event":{"pad":"%s"}}' % os.urandom(75_000).hex().encode()
                    try:
                        await journal.append("s", parsed, time.time())
                    except Exception:
                        refused += 1
                accepted = journal.last_seq
                assert refused
                assert all(s.path.stat().st_size == s.size for s in journal.segments.segments)
            finally:
                await journal.close()
            again = await opened(disk / "j.db")
            try:
                assert len(await again.read(0, 1000)) == accepted  # each one whole, after a restart too
            finally:
                await again.close()


def earlier_journal(path: Path, *statements: tuple[str, tuple[object, ...]]) -> None:
    """A journal of the version that kept the events in SQLite (`batches`), with these statements run in it."""
    conn = sqlite3.connect(path)
    conn.executescript(
        "CREATE TABLE batches (first_seq INTEGER PRIMARY KEY, last_seq INTEGER NOT NULL, stream TEXT NOT NULL, "
        "target TEXT, received_at REAL NOT NULL, meta BLOB NOT NULL, data BLOB NOT NULL);"
        "CREATE TABLE cursors (sink TEXT PRIMARY KEY, seq INTEGER NOT NULL);"
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;"
    )
    for statement, parameters in statements:
        conn.execute(statement, parameters)
    conn.commit()
    conn.close()


class TestEarlierVersion:
    async def test_batch_rows_move_into_the_segments_under_their_seqs(self, tmp_path: Path) -> None:
        path = tmp_path / "old.db"
        lines = [b'{"event":{"action":"a","n":18446744073709551616}}', b'{"event":{"action":"b"}}']
        pack = zstandard.ZstdCompressor(level=1).compress
        replayed = b'{"event":{"action":"c"}}'
        earlier_journal(
            path,
            (
                "INSERT INTO batches VALUES (41, 42, 'workos', NULL, 100.0, ?, ?)",
                (orjson.dumps([["a", "b"], [1.0, 2.0]]), pack(b"\n".join(lines))),
            ),
            (  # `dlq replay` of an earlier version stored rows uncompressed
                "INSERT INTO batches VALUES (45, 45, 'workos', 's3', 200.0, ?, ?)",
                (orjson.dumps([["c"], [3.0]]), replayed),
            ),
            ("INSERT INTO cursors VALUES ('file', 41)", ()),
            ("INSERT INTO meta VALUES ('last_seq', 46)", ()),
        )
        journal = await opened(path)
        try:
            read = [(e.seq, e.raw, e.action, e.time, target) for e, target in await journal.read(0, 10)]
            assert read == [
                (41, lines[0], "a", 1.0, None),
                (42, lines[1], "b", 2.0, None),
                (45, replayed, "c", 3.0, "s3"),
            ]
            await journal.append("workos", batch("new"), time.time())
            assert journal.last_seq == 47  # numbers never go back
            assert await journal.count_after(41, ["workos"], "file") == 2
            tables = await journal._read(lambda c: [r[0] for r in c.execute("SELECT name FROM sqlite_master")])
            assert "batches" not in tables
        finally:
            await journal.close()

    async def test_a_move_cut_short_is_not_made_twice(self, tmp_path: Path) -> None:
        path = tmp_path / "old.db"
        earlier_journal(
            path,
            (
                "INSERT INTO batches VALUES (41, 42, 's', NULL, 100.0, ?, ?)",
                (orjson.dumps([["a", "b"], [1.0, 2.0]]), b'{"n":41}\n{"n":42}'),
            ),
        )
        before = path.read_bytes()
        journal = await opened(path)  # moved in, table dropped
        await journal.close()
        for suffix in ("-wal", "-shm"):
            path.with_name(path.name + suffix).unlink(missing_ok=True)
        path.write_bytes(before)  # as if the process had stopped after the move, before the drop
        again = await opened(path)
        try:
            assert [(e.seq, e.raw) for e, _ in await again.read(0, 10)] == [(41, b'{"n":41}'), (42, b'{"n":42}')]
        finally:
            await again.close()


def flip(segment: Path, at: int) -> None:
    """Change one byte of a segment in place, as a failing disk would."""
    with segment.open("r+b") as file:
        file.seek(at)
        byte = file.read(1)
        file.seek(at)
        file.write(bytes([byte[0] ^ 0xFF]))


async def damage_letters(journal: Journal) -> list[tuple[str | None, bytes, str]]:
    query = "SELECT sink, data, reason FROM dead_letters WHERE reason LIKE 'journal record%'"
    return await journal._read(lambda c: c.execute(query).fetchall())


class TestDamageAfterStart:
    """Bytes the disk changes while the service runs: checked again at every read, never delivered altered,
    kept aside as a dead letter (once), and passed, so delivery goes on."""

    async def test_a_record_whose_meta_changed_is_kept_aside_and_passed(self, tmp_path: Path) -> None:
        journal = await opened(tmp_path / "j.db")
        try:
            for key in ("a", "b", "c"):
                await journal.append("s", batch(key), time.time())
            (segment,) = segment_files(journal)
            record = segment.read_bytes()[: journal.segments.segments[0].ends[0]]
            flip(segment, HEAD.size + 2)  # the first record's meta
            assert [e.raw for e, _ in await journal.read(0, 10)] == batch("b", "c").raws
            assert [e.raw for e, _ in await journal.read(0, 10)] == batch("b", "c").raws  # read again: same
            ((sink, data, reason),) = await damage_letters(journal)  # kept once, however often read
            assert sink is None  # an intake dead letter: not an event, `dlq replay` leaves it
            assert len(data) == len(record) and data != record  # what is left of it, as the disk has it
            assert "00000000000000000001.seg at byte 0" in reason and "(seqs 1-1) cannot be delivered" in reason
        finally:
            await journal.close()
        again = await opened(tmp_path / "j.db")  # the recovery at open finds it too: still one dead letter
        try:
            assert len(await damage_letters(again)) == 1
            assert [e.raw for e, _ in await again.read(0, 10)] == batch("b", "c").raws
        finally:
            await again.close()

    async def test_events_the_disk_changed_are_never_delivered(self, tmp_path: Path) -> None:
        journal = await opened(tmp_path / "j.db")
        try:
            await journal.append("s", batch("first"), time.time())
            await journal.append("s", batch("second"), time.time())
            (segment,) = segment_files(journal)
            whole = segment.read_bytes()
            _, _, _, meta_size, data_size = HEAD.unpack_from(whole, 0)
            frame = whole[HEAD.size + meta_size : HEAD.size + meta_size + data_size]
            decoder = zstandard.ZstdDecompressor()
            original = decoder.decompress(frame)
            changed = None  # a byte whose change still decompresses, to other events: zstd alone cannot tell
            for at in range(len(frame) - 1, 0, -1):
                altered = bytearray(frame)
                altered[at] ^= 0x01
                try:
                    if decoder.decompress(bytes(altered)) != original:
                        changed = at
                        break
                except zstandard.ZstdError:
                    continue
            assert changed is not None
            flip(segment, HEAD.size + meta_size + changed)
            assert [e.raw for e, _ in await journal.read(0, 10)] == batch("second").raws
            ((_, _, reason),) = await damage_letters(journal)
            assert "CRC-32 does not match" in reason
        finally:
            await journal.close()

    async def test_bytes_damaged_between_whole_records_at_open_are_kept_aside(self, tmp_path: Path) -> None:
        segment = await three_requests(tmp_path / "j.db")
        flip(segment, 0)  # the first record's magic: recovery skips to the next whole record
        again = await opened(tmp_path / "j.db")
        try:
            ((sink, data, reason),) = await damage_letters(again)
            assert sink is None and "at byte 0" in reason and data[:4] != MAGIC
        finally:
            await again.close()
        third = await opened(tmp_path / "j.db")  # every start finds it: kept once
        try:
            assert len(await damage_letters(third)) == 1
        finally:
            await third.close()

    async def test_keys_of_the_records_next_to_a_damaged_meta_are_kept(self, tmp_path: Path) -> None:
        journal = await opened(tmp_path / "j.db")
        try:
            for key in ("a", "b"):
                await journal.append("s", batch(key), time.time())
            (segment,) = segment_files(journal)
            flip(segment, HEAD.size)  # the first record's meta
            assert [e.raw for e, _ in await journal.read(0, 10)] == batch("b").raws  # a read finds the damage
            await journal.commit_progress("sink", 2, [], ["sink"])
            logged = await journal._read(lambda c: c.execute("SELECT keys FROM dedup_log").fetchall())
            assert [orjson.loads(keys) for (keys,) in logged] == [["b"]]
        finally:
            await journal.close()

    async def test_keys_of_a_record_damaged_after_it_was_delivered_from_memory_are_kept(self, tmp_path: Path) -> None:
        journal = await opened(tmp_path / "j.db")
        try:
            for key in ("a", "b"):
                await journal.append("s", batch(key), time.time())
            assert journal.recent_rows(0, 10)  # a sink that keeps up takes them from memory, not from the disk
            flip(segment_files(journal)[0], HEAD.size)  # the first record's meta, once delivered
            await journal.commit_progress("sink", 2, [], ["sink"])
            logged = await journal._read(lambda c: c.execute("SELECT keys FROM dedup_log").fetchall())
            assert [orjson.loads(keys) for (keys,) in logged] == [["a", "b"]]  # as sent, from memory
        finally:
            await journal.close()
        again = await opened(tmp_path / "j.db")
        try:  # a retry of either is a duplicate after a restart too
            assert (await again.append("s", batch("a", "b"), time.time())).duplicates == 2
        finally:
            await again.close()

    async def test_a_segment_cut_short_while_running_costs_only_what_it_lost(self, tmp_path: Path) -> None:
        journal = await opened(tmp_path / "j.db")
        try:
            for key in ("a", "b", "c"):
                await journal.append("s", batch(key), time.time())
            (segment,) = segment_files(journal)
            os.truncate(segment, journal.segments.segments[0].ends[1] + 5)  # the third record cut; a and b whole
            assert [e.raw for e, _ in await journal.read(0, 10)] == batch("a", "b").raws
            ((_, data, reason),) = await damage_letters(journal)
            assert len(data) == 5 and "shorter than it was written" in reason and "(seqs 3-3)" in reason
            await journal.append("s", batch("d"), time.time())  # and delivery goes on past it
            assert [e.seq for e, _ in await journal.read(2, 10)] == [4]
        finally:
            await journal.close()

    async def test_an_undelivered_segment_that_is_gone_is_reported_and_passed(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr("receiver.journal.segments.SEGMENT_BYTES", 1)  # a segment per request
        journal = await opened(tmp_path / "j.db")
        try:
            for key in ("a", "b", "c"):
                await journal.append("s", batch(key), time.time())
            segment_files(journal)[0].unlink()  # no sink had it
            assert [e.raw for e, _ in await journal.read(0, 10)] == batch("b", "c").raws
            ((_, data, reason),) = await damage_letters(journal)
            assert data == b"" and "segment file is gone" in reason and "(seqs 1-1)" in reason
        finally:
            await journal.close()

    async def test_dedup_keys_of_a_record_that_fails_its_crc_are_not_trusted(self, tmp_path: Path) -> None:
        journal = await opened(tmp_path / "j.db")
        try:
            await journal.append("s", batch("evt_AAAA"), time.time())
            await journal.append("s", batch("evt_BBBB"), time.time())
            (segment,) = segment_files(journal)
            altered = alter_key(segment)  # the meta still decodes, to another key
            assert [e.raw for e, _ in await journal.read(0, 10)] == batch("evt_BBBB").raws
            await journal.commit_progress("sink", 2, [], ["sink"])  # the mark passes the damaged record
            logged = await journal._read(lambda c: c.execute("SELECT keys FROM dedup_log").fetchall())
            assert [orjson.loads(keys) for (keys,) in logged] == [["evt_BBBB"]]
        finally:
            await journal.close()
        again = await opened(tmp_path / "j.db")
        try:  # an event nobody sent before, with the key the damage made up: not a duplicate
            assert (await again.append("s", batch(altered), time.time())).accepted == 1
        finally:
            await again.close()

    async def test_damage_at_the_end_of_the_newest_segment_is_kept_not_cut(self, tmp_path: Path) -> None:
        segment = await three_requests(tmp_path / "j.db")
        journal = await opened(tmp_path / "j.db")
        start, end = journal.segments.segments[0].starts[2], journal.segments.segments[0].ends[2]
        await journal.close()
        flip(segment, end - 2)  # the last record's events, acknowledged, damaged while the service was down
        again = await opened(tmp_path / "j.db")
        try:
            assert [e.raw for e, _ in await again.read(0, 10)] == batch("a", "b").raws
            ((_, data, reason),) = await damage_letters(again)
            assert len(data) == end - start and "(seqs 3-3)" in reason
            assert segment.stat().st_size == end  # not cut as a torn write: new records go after it
            await again.append("s", batch("d"), time.time())
            assert [e.seq for e, _ in await again.read(0, 10)] == [1, 2, 4]
        finally:
            await again.close()
        third = await opened(tmp_path / "j.db")  # now between whole records: still one dead letter
        try:
            assert len(await damage_letters(third)) == 1
            assert [e.raw for e, _ in await third.read(0, 10)] == batch("a", "b", "d").raws
        finally:
            await third.close()

    async def test_damage_that_grows_past_what_was_kept_is_kept_too(self, tmp_path: Path) -> None:
        journal = await opened(tmp_path / "j.db")
        for key in ("a", "b", "c", "d"):
            await journal.append("s", batch(key), time.time())
        (segment,) = segment_files(journal)
        index = journal.segments.segments[0]
        third = segment.read_bytes()[index.starts[2] : index.ends[2]]
        flip(segment, index.starts[1] + HEAD.size + 2)
        assert [e.raw for e, _ in await journal.read(0, 10)] == batch("a", "c", "d").raws  # b kept aside
        await journal.close()
        flip(segment, index.starts[2] + HEAD.size + 2)  # then c, while the service is down
        again = await opened(tmp_path / "j.db")
        try:
            assert [e.raw for e, _ in await again.read(0, 10)] == batch("a", "d").raws
            letters = await damage_letters(again)
            assert len(letters) == 2 and len(letters[1][1]) == index.ends[2] - index.starts[1]
            assert letters[1][1][-len(third) :] != third and "(seqs 2-3)" in letters[1][2]
        finally:
            await again.close()

    async def test_the_seqs_a_dead_letter_names_are_never_given_again(self, tmp_path: Path) -> None:
        journal = await opened(tmp_path / "j.db")
        for key in ("a", "b"):
            await journal.append("s", batch(key), time.time())
        (segment,) = segment_files(journal)
        flip(segment, journal.segments.segments[0].starts[1] + HEAD.size + 3)
        await journal.read(0, 10)
        ((_, _, reason),) = await damage_letters(journal)
        assert "(seqs 2-2)" in reason
        await journal.close()
        again = await opened(tmp_path / "j.db")
        try:
            await again.append("s", batch("new"), time.time())
            assert [e.seq for e, _ in await again.read(0, 10)] == [1, 3]
        finally:
            await again.close()


def alter_key(segment: Path) -> str:
    """Change one byte of the first record's meta so that it still decodes, to another single dedup key; that key."""
    whole = segment.read_bytes()
    meta_size = HEAD.unpack_from(whole, 0)[3]
    meta = whole[HEAD.size : HEAD.size + meta_size]
    decoder = zstandard.ZstdDecompressor()
    original = orjson.loads(decoder.decompress(meta))
    for at in range(len(meta)):
        for change in range(1, 256):
            altered = bytearray(meta)
            altered[at] ^= change
            try:
                value = orjson.loads(decoder.decompress(bytes(altered)))
            except (zstandard.ZstdError, orjson.JSONDecodeError, MemoryError):  # a changed frame size: too big
                continue
            if value[:6] == original[:6] and value[6] != original[6] and len(value[6]) == 1:
                with segment.open("r+b") as file:
                    file.seek(HEAD.size + at)
                    file.write(bytes([altered[at]]))
                return str(value[6][0])
    raise AssertionError("no change of one byte gives another key")


async def group_of_four(path: Path) -> tuple[Path, bytes, list[int], list[int]]:
    """A journal with request a (acknowledged alone), then a commit group of b, c and d (one write); the
    segment, its bytes, and its records' starts and ends."""
    journal = await opened(path)
    await journal.append("s", batch("a"), time.time())
    held = asyncio.ensure_future(journal._write(lambda conn: time.sleep(0.3)))  # the next three queue: one group
    await asyncio.sleep(0.05)
    await asyncio.gather(*(journal.append("s", batch(key), time.time()) for key in ("b", "c", "d")), held)
    index = journal.segments.segments[0]
    starts, ends = list(index.starts), list(index.ends)
    await journal.close()
    (segment,) = segment_files(journal)
    return segment, segment.read_bytes(), starts, ends


def fresh_database(path: Path, saved: bytes) -> None:
    """The journal's database as saved (no dead letters), its WAL gone."""
    for extra in ("-wal", "-shm"):
        path.with_name(path.name + extra).unlink(missing_ok=True)
    path.write_bytes(saved)


class TestTheNewestSegmentsEnd:
    """What a crash leaves at the end of the newest segment is cut (never acknowledged); what the disk damaged
    there, acknowledged, is kept aside."""

    async def test_a_group_torn_at_any_length_is_cut_back_to_a_record_and_never_kept(self, tmp_path: Path) -> None:
        segment, whole, _, ends = await group_of_four(tmp_path / "j.db")
        saved = (tmp_path / "j.db").read_bytes()
        problems = []
        for cut in (n for n in range(ends[0] + 1, len(whole)) if n not in ends):  # killed inside the write
            segment.write_bytes(whole[:cut])
            journal = await opened(tmp_path / "j.db")
            try:
                letters, size = await damage_letters(journal), segment.stat().st_size
            finally:
                await journal.close()
            if letters or size != max(end for end in ends if end <= cut):
                problems.append((cut, size, letters))
            fresh_database(tmp_path / "j.db", saved)
        assert not problems, problems[:3]

    async def test_zeros_alone_at_the_end_are_cut(self, tmp_path: Path) -> None:
        segment, whole, _, ends = await group_of_four(tmp_path / "j.db")
        saved = (tmp_path / "j.db").read_bytes()
        for zeros in (3, len(whole) - ends[0], 4096):  # a power loss kept the file's size, not its data
            segment.write_bytes(whole[: ends[0]] + bytes(zeros))
            journal = await opened(tmp_path / "j.db")
            try:
                assert await damage_letters(journal) == [] and segment.stat().st_size == ends[0]
                assert [e.raw for e, _ in await journal.read(0, 10)] == batch("a").raws
            finally:
                await journal.close()
            fresh_database(tmp_path / "j.db", saved)

    async def test_a_length_the_disk_changed_in_the_last_record_is_damage_not_a_torn_write(
        self, tmp_path: Path
    ) -> None:
        segment, whole, starts, _ = await group_of_four(tmp_path / "j.db")
        saved = (tmp_path / "j.db").read_bytes()
        for field in (16, 20):  # the meta's length, the events' length (their high bytes: larger)
            flip(segment, starts[3] + field + 3)
            journal = await opened(tmp_path / "j.db")
            try:
                assert [e.raw for e, _ in await journal.read(0, 10)] == batch("a", "b", "c").raws
                ((_, data, reason),) = await damage_letters(journal)
                assert len(data) == len(whole) - starts[3] and segment.stat().st_size == len(whole)
            finally:
                await journal.close()
            segment.write_bytes(whole)
            fresh_database(tmp_path / "j.db", saved)

    async def test_a_torn_write_after_damage_kept_there_is_cut_and_the_damage_kept_once(self, tmp_path: Path) -> None:
        segment, _, _, ends = await group_of_four(tmp_path / "j.db")
        flip(segment, ends[3] - 2)  # d's events: damage at the end, kept
        journal = await opened(tmp_path / "j.db")
        try:
            assert len(await damage_letters(journal)) == 1
            await journal.append("s", batch("e", "f"), time.time())
            start, end = journal.segments.segments[0].starts[-1], journal.segments.segments[0].ends[-1]
        finally:
            await journal.close()
        segment.write_bytes(segment.read_bytes()[: start + (end - start) // 2])  # e and f's write, torn
        again = await opened(tmp_path / "j.db")
        try:
            assert len(await damage_letters(again)) == 1 and segment.stat().st_size == start
        finally:
            await again.close()

    async def test_every_damaged_record_at_the_end_keeps_its_seqs(self, tmp_path: Path) -> None:
        segment, _, _, ends = await group_of_four(tmp_path / "j.db")
        flip(segment, ends[2] - 2)  # c's events
        flip(segment, ends[3] - 2)  # and d's
        journal = await opened(tmp_path / "j.db")
        try:
            ((_, _, reason),) = await damage_letters(journal)
            assert "(seqs 3-4)" in reason
            await journal.append("s", batch("new"), time.time())
            assert [e.seq for e, _ in await journal.read(0, 10)] == [1, 2, 5]
        finally:
            await journal.close()

    async def test_a_damaged_meta_at_the_end_keeps_the_seqs_its_events_count(self, tmp_path: Path) -> None:
        segment, _, starts, _ = await group_of_four(tmp_path / "j.db")
        flip(segment, starts[3] + HEAD.size + 1)  # d's meta: how many events it held is read from its events
        journal = await opened(tmp_path / "j.db")
        try:
            ((_, _, reason),) = await damage_letters(journal)
            assert "(seqs 4-4)" in reason
            await journal.append("s", batch("new"), time.time())
            assert [e.seq for e, _ in await journal.read(0, 10)] == [1, 2, 3, 5]
        finally:
            await journal.close()

    @pytest.mark.parametrize("shorter", [4, 12, 20])
    async def test_a_meta_length_the_disk_shrank_never_names_too_few_seqs_for_certain(
        self, tmp_path: Path, shorter: int
    ) -> None:
        # The events' bytes would then start inside the meta: counted as plain lines, they would give a number
        # of seqs that has nothing to do with the record's. They count only when the meta is one whole frame.
        journal = await opened(tmp_path / "j.db")
        await journal.append("s", batch("a"), time.time())  # seq 1
        await journal.append("s", batch(*(f"b{n}" for n in range(10))), time.time())  # seqs 2-11, the last record
        (segment,) = segment_files(journal)
        start = journal.segments.segments[0].starts[-1]
        await journal.close()
        data = bytearray(segment.read_bytes())
        (meta_size,) = struct.unpack_from("<I", data, start + 16)
        struct.pack_into("<I", data, start + 16, meta_size - shorter)
        segment.write_bytes(bytes(data))
        again = await opened(tmp_path / "j.db")
        try:
            ((_, _, reason),) = await damage_letters(again)
            certain = re.search(r"\(seqs (\d+)-(\d+)\)", reason)
            assert certain is None or (int(certain[1]) == 2 and int(certain[2]) >= 11), reason
            await again.append("s", batch("new"), time.time())
            assert [e.raw for e, _ in await again.read(1, 100)] == batch("new").raws
        finally:
            await again.close()


async def seqs(journal: Journal) -> list[int]:
    return [event.seq for event, _ in await journal.read(0, 100)]


class TestDamageThatLooksLikeATornWrite:
    """Damage at the newest segment's end that a torn write could be mistaken for, and back (found by an
    adversarial pass): acknowledged records are kept, their seqs never given again, a crash's tail cut."""

    async def test_a_changed_length_followed_by_more_damage_is_damage(self, tmp_path: Path) -> None:
        segment = await three_requests(tmp_path / "j.db")
        journal = await opened(tmp_path / "j.db")
        index = journal.segments.segments[0]
        b_start, c_end = index.starts[1], index.ends[2]
        await journal.close()
        flip(segment, b_start + 20 + 3)  # b's events' length: larger than the file
        flip(segment, c_end - 2)  # and c's events
        again = await opened(tmp_path / "j.db")
        try:
            assert len(await damage_letters(again)) == 1 and segment.stat().st_size == c_end
            await again.append("s", batch("new"), time.time())
            assert await seqs(again) == [1, 4]
        finally:
            await again.close()

    async def test_a_magic_inside_a_damaged_records_events_is_not_a_head(self, tmp_path: Path) -> None:
        journal = await opened(tmp_path / "j.db")
        await journal.append("s", batch("a"), time.time())
        literal = batch("k")
        literal.raws[:] = [b'{"event":{"id":"' + MAGIC + b'zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz"}}']
        await journal.append("s", literal, time.time())
        start, end = journal.segments.segments[0].starts[1], journal.segments.segments[0].ends[1]
        await journal.close()
        (segment,) = segment_files(journal)
        assert segment.read_bytes().find(MAGIC, start + 1) > 0  # zstd kept it literal
        flip(segment, end - 2)
        for _ in range(2):
            again = await opened(tmp_path / "j.db")
            try:
                ((_, data, _),) = await damage_letters(again)
                assert len(data) == end - start and segment.stat().st_size == end
            finally:
                await again.close()

    async def test_a_torn_write_of_a_few_bytes_after_damage_is_cut(self, tmp_path: Path) -> None:
        journal = await opened(tmp_path / "j.db")
        for key in ("a", "b"):
            await journal.append("s", batch(key), time.time())
        end = journal.segments.segments[0].ends[1]
        await journal.close()
        (segment,) = segment_files(journal)
        flip(segment, end - 2)  # b's events: damage at the end, kept
        await (await opened(tmp_path / "j.db")).close()
        with segment.open("ab") as file:  # then a crash 2 bytes into the next write
            file.write(MAGIC[:2])
        again = await opened(tmp_path / "j.db")
        try:
            assert len(await damage_letters(again)) == 1 and segment.stat().st_size == end
        finally:
            await again.close()

    async def test_a_length_grown_into_a_torn_write_after_it_still_lets_the_torn_write_be_cut(
        self, tmp_path: Path
    ) -> None:
        # b's events' length claims more than b holds, its end inside the torn write after it: b's CRC-32,
        # checked with that length changed to end at the torn write's magic, says where b ends.
        journal = await opened(tmp_path / "j.db")
        for key in ("a", "b"):
            await journal.append("s", batch(key), time.time())
        b_start, end = journal.segments.segments[0].starts[1], journal.segments.segments[0].ends[1]
        await journal.close()
        (segment,) = segment_files(journal)
        with segment.open("ab") as file:  # a crash inside the next write: its head and 150 bytes of 200
            file.write(MAGIC + struct.pack("<IQII", 0, 3, 50, 150) + bytes(range(150)))
        data = bytearray(segment.read_bytes())
        struct.pack_into("<I", data, b_start + 20, struct.unpack_from("<I", data, b_start + 20)[0] + 100)
        segment.write_bytes(bytes(data))
        again = await opened(tmp_path / "j.db")
        try:
            ((_, kept, _),) = await damage_letters(again)
            assert kept == bytes(data[b_start:end]) and segment.stat().st_size == end
        finally:
            await again.close()

    async def test_a_record_damaged_twice_before_a_head_whose_seq_changed_is_damage_not_a_torn_write(
        self, tmp_path: Path
    ) -> None:
        # b's meta length and its events changed (no length makes its CRC-32 check), then c's seq: b looked
        # like a torn write with nothing after it, and b and c were cut, their seqs given again.
        segment = await three_requests(tmp_path / "j.db")
        journal = await opened(tmp_path / "j.db")
        index = journal.segments.segments[0]
        b_start, c_start, c_end = index.starts[1], index.starts[2], index.ends[2]
        b_end = index.ends[1]
        await journal.close()
        flip(segment, b_start + 16 + 2)  # b's meta length: larger than the file
        flip(segment, b_end - 2)  # b's events
        flip(segment, c_start + 15)  # c's first seq: not one this journal wrote
        again = await opened(tmp_path / "j.db")
        try:
            assert segment.stat().st_size == c_end
            assert b"".join(data for _, data, _ in await damage_letters(again)) == segment.read_bytes()[b_start:]
            await again.append("s", batch("new"), time.time())
            assert await seqs(again) == [1, 4]
        finally:
            await again.close()

    @pytest.mark.parametrize("byte", [13, 15])
    async def test_a_changed_high_byte_of_a_seq_neither_stops_the_start_nor_moves_the_seqs(
        self, tmp_path: Path, byte: int
    ) -> None:
        segment = await three_requests(tmp_path / "j.db")
        journal = await opened(tmp_path / "j.db")
        start = journal.segments.segments[0].starts[2]
        await journal.close()
        flip(segment, start + byte)  # c's first seq
        again = await opened(tmp_path / "j.db")
        try:
            await again.append("s", batch("new"), time.time())
            assert await seqs(again) == [1, 2, 4]
        finally:
            await again.close()

    async def test_a_record_whose_seq_went_back_keeps_every_seq_its_events_count(self, tmp_path: Path) -> None:
        journal = await opened(tmp_path / "j.db")
        for keys in (["a"], ["b"], ["c1", "c2", "c3"]):  # c holds seqs 3-5
            await journal.append("s", batch(*keys), time.time())
        start = journal.segments.segments[0].starts[2]
        await journal.close()
        (segment,) = segment_files(journal)
        with segment.open("r+b") as file:  # its first seq 3 -> 1
            file.seek(start + 8)
            file.write((1).to_bytes(8, "little"))
        again = await opened(tmp_path / "j.db")
        try:
            ((_, _, reason),) = await damage_letters(again)
            assert "(seqs 3-5)" in reason
            await again.append("s", batch("new"), time.time())
            assert await seqs(again) == [1, 2, 6]
        finally:
            await again.close()

    async def test_a_newest_segment_holding_only_damage_is_never_reused(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr("receiver.journal.segments.SEGMENT_BYTES", 1)  # a segment per request
        journal = await opened(tmp_path / "j.db")
        for key in ("a", "b"):
            await journal.append("s", batch(key), time.time())
        files = segment_files(journal)
        await journal.close()
        flip(files[1], files[1].stat().st_size - 2)  # b's events: the newest segment holds only damage
        damaged = files[1].read_bytes()
        again = await opened(tmp_path / "j.db")
        try:
            for key in ("c", "d"):
                await again.append("s", batch(key), time.time())
            assert files[1].read_bytes() == damaged  # not truncated to take the new records
            await again.commit_progress("sink", 1, [], ["sink"])  # the sink is past a: the damage goes, kept aside
            ((_, data, _),) = await damage_letters(again)
            assert data == damaged
        finally:
            await again.close()
        third = await opened(tmp_path / "j.db")
        try:
            assert [event.raw for event, _ in await third.read(1, 10)] == batch("c", "d").raws
        finally:
            await third.close()

    async def test_a_dedup_log_row_that_cannot_be_read_costs_only_its_keys(self, tmp_path: Path) -> None:
        journal = await opened(tmp_path / "j.db")
        for key in ("a", "b"):
            await journal.append("s", batch(key), time.time())
        await journal.commit_progress("sink", 2, [], ["sink"])  # both records' keys move to dedup_log
        await journal.close()
        conn = sqlite3.connect(tmp_path / "j.db")
        conn.execute("UPDATE dedup_log SET keys = 'not json' WHERE rowid = (SELECT min(rowid) FROM dedup_log)")
        conn.execute("INSERT INTO dedup_log (stream, at, keys) VALUES ('s', ?, ?)", (time.time(), b'["later"]'))
        conn.commit()
        conn.close()
        again = await opened(tmp_path / "j.db")  # it starts
        try:
            assert (await again.append("s", batch("later"), time.time())).accepted == 0  # the other row's key holds
        finally:
            await again.close()


class TestPlainRecords:
    """Records whose events are written plain (while the backlog is small): a changed byte still reads as valid
    JSON, so only the CRC tells, and an event's own text may hold the record magic."""

    @pytest.fixture(autouse=True)
    def _plain(self, monkeypatch: pytest.MonkeyPatch) -> None:
        plain(monkeypatch)

    async def test_an_event_the_disk_changed_to_other_valid_json_is_never_delivered(self, tmp_path: Path) -> None:
        journal = await opened(tmp_path / "j.db")
        try:
            await journal.append("s", batch("first"), time.time())
            await journal.append("s", batch("second"), time.time())
            (segment,) = segment_files(journal)
            whole = segment.read_bytes()
            assert whole.count(b'{"event"') == 2  # plain: the events as sent
            at = whole.index(b'"id":"first"') + len(b'"id":"f')
            with segment.open("r+b") as file:  # "first" -> "fArst": still valid JSON, another id
                file.seek(at)
                file.write(b"A")
            assert [e.raw for e, _ in await journal.read(0, 10)] == batch("second").raws
            ((_, data, reason),) = await damage_letters(journal)
            assert "CRC-32 does not match" in reason and b'"id":"fArst"' in data
        finally:
            await journal.close()

    async def test_the_record_magic_inside_an_event_is_never_taken_for_a_record(self, tmp_path: Path) -> None:
        journal = await opened(tmp_path / "j.db")
        parsed = batch("a", "b")
        # An event whose text holds what a record's head starts with (JSON cannot hold the zero bytes a
        # plausible seq has), then the rest of the group.
        parsed.raws[1] = b'{"event":{"action":"x","ua":"LBJ1LBJ1\\u0000' + MAGIC + b'"}}'
        try:
            await journal.append("s", parsed, time.time())
            await journal.append("s", batch("c"), time.time())
        finally:
            await journal.close()
        (segment,) = segment_files(journal)
        whole = segment.read_bytes()
        for damage in ("torn", "first head"):
            if damage == "torn":  # a crash inside the next write: cut, nothing kept aside
                segment.write_bytes(whole + MAGIC + struct.pack("<IQII", 0, 4, 40, 40) + b"x" * 10)
            else:  # the first record's magic changed: the next whole record is found, past the event's magic
                segment.write_bytes(whole)
                flip(segment, 0)
            again = await opened(tmp_path / "j.db")
            try:
                read = [e.raw for e, _ in await again.read(0, 10)]
                if damage == "torn":
                    assert read == [*parsed.raws, *batch("c").raws] and not await damage_letters(again)
                    assert segment.stat().st_size == len(whole)
                else:
                    assert read == batch("c").raws
                    ((_, data, _),) = await damage_letters(again)
                    assert parsed.raws[1] in data  # the whole first record kept aside, its event in it
            finally:
                await again.close()


@pytest.mark.parametrize("seed", range(100))
@pytest.mark.parametrize("records", ["zstd", "plain"])
async def test_restarts_among_damage_torn_writes_and_appends_keep_every_promise(
    tmp_path: Path, seed: int, records: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Random appends, flipped bytes, torn writes and restarts: seqs stay in order and are never given to other
    events, no acknowledged record the disk left alone is lost, and dead letters grow only with new damage."""
    if records == "plain":
        plain(monkeypatch)
    rng = random.Random(seed)
    path = tmp_path / "j.db"
    journal = await opened(path)
    seen: dict[int, bytes] = {}
    spans: dict[int, tuple[int, int]] = {}
    """First seq -> (start, end) of each acknowledged record."""
    flipped: list[int] = []
    letters, damaged, count = 0, False, 0
    try:
        for step in range(40):
            action = rng.choice(["append", "append", "append", "flip", "torn", "restart", "restart"])
            if action == "append":
                count += 1
                parsed = batch(*[f"e{count}-{i}" for i in range(rng.randrange(1, 4))])
                parsed.times[:] = [1_800_000_000.0 + step] * len(parsed.times)  # the same bytes at every run
                await journal.append("s", parsed, 1_800_000_000.0 + step)
                newest = journal.segments.segments[-1]
                spans[newest.firsts[-1]] = (newest.starts[-1], newest.ends[-1])
                continue
            await journal.close()
            (segment,) = segment_files(journal)
            if action == "flip" and spans and segment.stat().st_size:  # an empty segment has no byte to change
                flipped.append(rng.randrange(0, segment.stat().st_size))
                flip(segment, flipped[-1])
                damaged = True
            elif action == "torn":  # a crash inside the write of the next record
                first = max([journal.last_seq, *seen]) + 1
                meta, data = rng.randbytes(rng.randrange(20, 80)), rng.randbytes(rng.randrange(20, 200))
                record = MAGIC + struct.pack("<IQII", 0, first, len(meta), len(data)) + meta + data
                with segment.open("ab") as file:
                    file.write(record[: rng.randrange(1, len(record))])
            journal = await opened(path)
            now = len(await damage_letters(journal))
            assert damaged or now == letters, f"step {step}: dead letters grew without damage"
            letters, damaged = now, False
            read = [(event.seq, event.raw) for event, _ in await journal.read(0, 10_000)]
            assert [s for s, _ in read] == sorted({s for s, _ in read}), f"step {step}: seqs out of order"
            for s, raw in read:
                assert seen.setdefault(s, raw) == raw, f"step {step}: seq {s} given to another event"
            held = {s for s, _ in read}
            for first, (start, end) in spans.items():
                untouched = not any(start <= at < end for at in flipped)
                assert not untouched or first in held, f"step {step}: acknowledged record {first} lost"
    finally:
        await journal.close()
