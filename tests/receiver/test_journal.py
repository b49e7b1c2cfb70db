"""The journal: group commit, durability settings, dedup, cursors and pruning, dead letters."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import logging
import os
import sqlite3
import sys
import time
import tracemalloc
from pathlib import Path

import orjson
import pytest

from receiver.errors import JournalClosed, JournalError, JournalFull
from receiver.journal import INTAKE, Journal, Row, facade, list_dead_letters, replay_dead_letters
from receiver.parsing import MAX_KEY_CHARS, Parsed, Rejected, parse_body
from sinks.base import Event
from tests.receiver.test_unattended import small_disk


def batch(*keys: str | None, rejected: list[Rejected] | None = None) -> Parsed:
    """A parsed body whose elements carry these dedup keys."""
    parsed = Parsed(rejected=rejected or [])
    for key in keys:
        parsed.raws.append(b'{"event":{"action":"user.signed_in","id":"%s"}}' % (key or "").encode())
        parsed.actions.append("user.signed_in")
        parsed.times.append(time.time())
        parsed.keys.append(key)
    return parsed


async def opened(path: Path) -> Journal:
    """A journal at `path` (1 GiB cap, a 1 h dedup window), open."""
    journal = Journal(path, max_bytes=1 << 30, dedup_window=3600)
    await journal.open()
    return journal


@pytest.fixture
async def journal(tmp_path: Path):
    j = await opened(tmp_path / "j.db")
    yield j
    await j.close()


class TestJournal:
    async def test_wal_and_full_synchronous(self, journal: Journal) -> None:
        conn = sqlite3.connect(journal.path)
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        conn.close()
        # synchronous is per connection: check the writer's own setting through a write job.
        level = await journal._write(lambda c: c.execute("PRAGMA synchronous").fetchone()[0])
        assert level == 2  # FULL

    async def test_concurrent_appends_share_commits(self, journal: Journal) -> None:
        before = journal.commits
        results = await asyncio.gather(*(journal.append("s", batch(f"k{i}"), time.time()) for i in range(200)))
        assert all(r.accepted == 1 for r in results)
        assert journal.commits - before < 100  # grouped: far fewer fsyncs than requests
        rows = await journal.read(0, 1000)
        assert len(rows) == 200 and [e.seq for e, _ in rows] == sorted(e.seq for e, _ in rows)

    async def test_dedup_across_and_within_requests(self, journal: Journal) -> None:
        first = await journal.append("s", batch("a", "b", "a"), time.time())
        second = await journal.append("s", batch("b", "c", None, None), time.time())
        other_stream = await journal.append("t", batch("a"), time.time())
        assert (first.accepted, first.duplicates) == (2, 1)
        assert (second.accepted, second.duplicates) == (3, 1)
        assert other_stream.accepted == 1

    async def test_expired_keys_are_pruned(self, journal: Journal) -> None:
        now = time.time()
        await journal.append("s", batch("old"), now - 7200)
        await journal.prune_dedup(now)
        again = await journal.append("s", batch("old"), now)
        assert again.accepted == 1

    async def test_cursor_progress_prunes_rows_every_sink_passed(self, journal: Journal) -> None:
        for i in range(10):  # one request each: a batch row goes once every sink is past all its events
            await journal.append("s", batch(f"k{i}"), time.time())
        rows = await journal.read(0, 100)
        await journal.commit_progress("a", rows[5][0].seq, [], ["a", "b"])
        assert len(await journal.read(0, 100)) == 10  # b has not moved
        await journal.commit_progress("b", rows[2][0].seq, [(rows[1][0], "bad")], ["a", "b"])
        remaining = await journal.read(0, 100)
        assert [e.seq for e, _ in remaining] == [e.seq for e, _ in rows[3:]]
        assert await journal.cursors(["a", "b", "c"]) == {"a": rows[5][0].seq, "b": rows[2][0].seq, "c": 0}
        (letter,) = list_dead_letters(journal.path, "b")
        assert letter.reason == "bad" and letter.data == rows[1][0].raw

    async def test_a_row_stays_until_every_event_in_it_is_passed(self, journal: Journal) -> None:
        await journal.append("s", batch(*(f"k{i}" for i in range(10))), time.time())
        rows = await journal.read(0, 100)
        await journal.commit_progress("a", rows[4][0].seq, [], ["a"])
        assert [e.seq for e, _ in await journal.read(rows[4][0].seq, 100)] == [e.seq for e, _ in rows[5:]]
        await journal.commit_progress("a", rows[9][0].seq, [], ["a"])
        assert await journal.read(0, 100) == []

    async def test_sequence_numbers_never_go_back_after_the_journal_empties(self, journal: Journal) -> None:
        await journal.append("s", batch("x"), time.time())
        ((event, _),) = await journal.read(0, 10)
        await journal.commit_progress("a", event.seq, [], ["a"])
        assert await journal.read(0, 10) == []
        await journal.append("s", batch("y"), time.time())
        ((later, _),) = await journal.read(0, 10)
        assert later.seq > event.seq

    async def test_over_cap_refuses(self, tmp_path: Path) -> None:
        small = Journal(tmp_path / "small.db", max_bytes=20000, dedup_window=60)
        await small.open()
        try:
            with pytest.raises(JournalFull):
                for i in range(1000):
                    await small.append("s", batch(*(f"k{i}-{j}" for j in range(20))), time.time())
        finally:
            await small.close()

    async def test_closed_journal_refuses(self, tmp_path: Path) -> None:
        j = Journal(tmp_path / "c.db", max_bytes=1 << 20, dedup_window=60)
        await j.open()
        await j.close()
        with pytest.raises(JournalClosed):
            await j.append("s", batch("k"), time.time())

    async def test_intake_dead_letters_are_listed_but_not_replayed(self, journal: Journal) -> None:
        await journal.append(
            "s", batch(rejected=[Rejected(b"42", "element is a JSON number, not an object")]), time.time()
        )
        (letter,) = list_dead_letters(journal.path, INTAKE)
        assert letter.sink == INTAKE and letter.data == b"42"
        assert replay_dead_letters(journal.path) == 0
        assert len(list_dead_letters(journal.path)) == 1

    async def test_reopen_keeps_everything(self, tmp_path: Path) -> None:
        j = Journal(tmp_path / "r.db", max_bytes=1 << 20, dedup_window=60)
        await j.open()
        await j.append("s", batch("a", "b"), time.time())
        await j.close()
        again = Journal(tmp_path / "r.db", max_bytes=1 << 20, dedup_window=60)
        await again.open()
        try:
            assert len(await again.read(0, 10)) == 2 and again.last_seq == 2
            assert (await again.append("s", batch("a"), time.time())).duplicates == 1
        finally:
            await again.close()

    async def test_a_loop_in_another_thread_gets_its_answers_on_its_own_loop(self, journal: Journal) -> None:
        # The loop that opened the journal is running (it waits for the thread) but is not the caller's.
        async def elsewhere() -> int:
            return (await journal.append("s", batch("from-another-loop"), time.time())).accepted

        assert await asyncio.to_thread(asyncio.run, elsewhere()) == 1
        assert [e.raw for e, _ in await journal.read(0, 10)] == batch("from-another-loop").raws


def test_a_journal_opened_by_one_loop_serves_the_next(tmp_path: Path) -> None:
    # One asyncio.run after another, as CLI commands do: the loop that opened the journal is closed.
    journal = asyncio.run(opened(tmp_path / "j.db"))

    async def use() -> int:
        try:
            return (await journal.append("s", batch("k"), time.time())).accepted
        finally:
            await journal.close()

    assert asyncio.run(use()) == 1


async def test_a_zero_window_turns_dedup_off(tmp_path: Path) -> None:
    j = Journal(tmp_path / "off.db", max_bytes=1 << 20, dedup_window=0)
    await j.open()
    try:
        assert (await j.append("s", batch("a", "a"), time.time())).accepted == 2
        assert (await j.append("s", batch("a"), time.time())).accepted == 1
    finally:
        await j.close()


class TestReadinessProbe:
    async def test_a_probe_where_the_os_cannot_allocate_ahead_still_answers(
        self, journal: Journal, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.delattr(os, "posix_fallocate")  # macOS has none
        journal.disk_full = journal.room_owed = True
        assert await journal.probe()
        assert not journal.disk_full and not journal.room_owed

    async def test_a_reservation_a_crash_left_is_freed_at_open(self, tmp_path: Path) -> None:
        journal = await opened(tmp_path / "journal.db")
        room = journal.segments.directory / ".room"
        await journal.close()
        with room.open("wb") as file:
            os.posix_fallocate(file.fileno(), 0, 1 << 20)
        again = await opened(tmp_path / "journal.db")
        try:
            assert not room.exists()
        finally:
            await again.close()


class TestDedupState:
    """Dedup keys are bounded on their own, never count against the backlog cap, and survive restarts."""

    async def test_keys_do_not_fill_the_backlog_cap(self, tmp_path: Path) -> None:
        # 2 MiB of cap; 40 k unique keys (≈ 70 bytes each on disk) would fill it if keys counted.
        j = Journal(tmp_path / "cap.db", max_bytes=2 * 1024 * 1024, dedup_window=86400)
        await j.open()
        try:
            for start in range(0, 40_000, 500):
                await j.append("s", batch(*(f"key-{start + i:08d}-{'x' * 40}" for i in range(500))), time.time())
                rows = await j.read(0, 1_000_000)
                await j.commit_progress("a", rows[-1][0].seq, [], ["a"])  # delivered: the backlog is empty
            assert j.size_bytes == 0 and not j.over_cap
            assert j.dedup.size == 40_000
            assert (await j.append("s", batch("fresh"), time.time())).accepted == 1
            assert (await j.append("s", batch("key-00000007-" + "x" * 40), time.time())).duplicates == 1
        finally:
            await j.close()

    async def test_backlog_bytes_are_the_undelivered_events(self, journal: Journal) -> None:
        await journal.append("s", batch("a", "b"), time.time())
        await journal.append("s", batch("c"), time.time())
        rows = await journal.read(0, 10)
        stored = sum(path.stat().st_size for path in journal.segments.directory.glob("*.seg"))  # not the spare room
        assert journal.size_bytes == stored > 0  # what the disk holds for them
        await journal.commit_progress("a", rows[1][0].seq, [], ["a"])
        assert 0 < journal.size_bytes < stored
        await journal.commit_progress("a", rows[-1][0].seq, [], ["a"])
        assert journal.size_bytes == 0

    async def test_a_cap_under_plain_below_still_compresses_a_backlog_past_a_quarter_of_it(
        self, tmp_path: Path
    ) -> None:
        # With max_bytes 64 KiB a backlog never reaches PLAIN_BELOW (32 MiB): written plain, it would fill the cap
        # 5-10x sooner than compressed.
        j = Journal(tmp_path / "small.db", max_bytes=64 * 1024, dedup_window=3600)
        await j.open()
        try:
            sent = []
            while j.size_bytes < 32 * 1024:
                parsed = batch(*(f"k{len(sent) + n}" for n in range(20)))
                sent += parsed.raws
                await j.append("s", parsed, time.time())
            starts = [record.data[:4] for record in j.segments.read(0, len(sent))]
            assert starts[0][:1] == b"{" and starts[-1] == b"\x28\xb5\x2f\xfd"  # plain, then zstd past 16 KiB
            assert [e.raw for e, _ in await j.read(0, len(sent))] == sent
        finally:
            await j.close()

    async def test_rows_are_stored_plain_while_the_backlog_is_small_then_compressed_and_read_back_exactly(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(facade, "PLAIN_BELOW", 200)
        path = tmp_path / "mixed.db"
        j = await opened(path)
        sent = []
        for name in ("a", "b", "c"):
            parsed = batch(f"{name}1", f"{name}2")
            parsed.raws[1] = b'{"event":{"action":"x","n":18446744073709551616,"s":"\\u00e9"}}'
            sent += parsed.raws
            await j.append("s", parsed, time.time())
        frames = [(record.data[:4], record.data[:1]) for record in j.segments.read(0, 10)]
        assert frames[0][1] == b"{" and frames[-1][0] == b"\x28\xb5\x2f\xfd"  # plain, then a zstd frame
        assert [e.raw for e, _ in await j.read(0, 10)] == sent
        await j.close()
        again = await opened(path)  # the keys of both kinds of records come back
        try:
            assert again.dedup.size == 6
            assert [e.raw for e, _ in await again.read(0, 10)] == sent
            assert (await again.append("s", batch("a1", "c2", "d"), time.time())).duplicates == 2
        finally:
            await again.close()

    async def test_keys_the_mark_passes_reach_dedup_log_from_memory_or_read_back(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # Keys held in memory up to HELD_BYTES (5 keys here); past it (a sink behind) the oldest are read back
        # from the records; records appended before a restart are read back too. Every key reaches dedup_log once
        # either way.
        monkeypatch.setattr(facade, "HELD_BYTES", 5 * (3 + facade.KEY_COST))
        path = tmp_path / "held.db"
        j = await opened(path)
        await j.start_cursors(["out"], 0)
        for n in range(3):
            await j.append("s", batch(f"before{n}"), time.time())
        await j.close()
        j = await opened(path)
        try:
            sent = [f"before{n}" for n in range(3)]
            for n in range(8):
                keys = [f"k{n}a", f"k{n}b"]
                sent += keys
                await j.append("s", batch(*keys), time.time())
            assert sum(len(keys) for *_, keys in j._held) <= 5 and j._held_from > 3  # the oldest let go: read back
            for upto in (2, 7, 12, j.last_seq):
                await j.commit_progress("out", upto, [], ["out"])
            rows = await j._read(lambda c: c.execute("SELECT keys FROM dedup_log ORDER BY rowid").fetchall())
            assert [key for (keys,) in rows for key in orjson.loads(keys)] == sent
            assert not j._held and j._held_bytes == 0
        finally:
            await j.close()
        again = await opened(path)
        try:
            assert (await again.append("s", batch(*sent), time.time())).duplicates == len(sent)
        finally:
            await again.close()

    async def test_keys_held_for_a_sink_behind_stay_within_held_bytes_however_long(
        self, journal: Journal, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # A bound in keys would let a sender's long keySuffixes hold more memory while a sink is down.
        monkeypatch.setattr(facade, "HELD_BYTES", 64 * 1024)
        await journal.start_cursors(["down"], 0)
        sent = [f"{n:03d}" + "k" * (MAX_KEY_CHARS - 3) for n in range(400)]  # 100 KiB of the longest keys
        for key in sent:
            body = b'[{"event":{"action":"a"},"keySuffix":"%s"}]' % key.encode()
            parsed = parse_body(body, "application/json", time.time())
            assert (await journal.append("s", parsed, time.time())).accepted == 1
        held = [key for *_, keys in journal._held for key in keys]
        assert held and sum(len(key) + facade.KEY_COST for key in held) <= 64 * 1024
        await journal.commit_progress("down", journal.last_seq, [], ["down"])  # the rest are read back
        rows = await journal._read(lambda c: c.execute("SELECT keys FROM dedup_log ORDER BY rowid").fetchall())
        assert [key for (keys,) in rows for key in orjson.loads(keys)] == sent

    @pytest.mark.parametrize("form", ["array", "ndjson", "bare"])
    async def test_a_long_key_is_remembered_by_its_digest_and_still_dedups_across_a_restart(
        self, tmp_path: Path, form: str
    ) -> None:
        # Dedup keeps a key in dedup_log and in its record's meta: a 1 MiB keySuffix (or id) would be kept as
        # 1 MiB, for the whole window, once in each. The element itself is delivered as sent.
        long_key = "é" + "k" * (1024 * 1024)
        if form == "bare":  # a bare event: its id is the key
            element = b'{"action":"a","id":"%s","n":1e999}' % long_key.encode()
            expected = b'{"event":' + element + b"}"
        else:
            element = expected = b'{"event":{"action":"a","n":1e999},"keySuffix":"%s"}' % long_key.encode()
        body = element if form != "array" else b"[" + element + b',{"event":{"action":"b"},"keySuffix":"short"}]'
        content_type = "application/x-ndjson" if form == "ndjson" else "application/json"
        digest = "sha256:" + hashlib.sha256(long_key.encode()).hexdigest()
        path = tmp_path / "long.db"
        j = await opened(path)
        await j.start_cursors(["out"], 0)
        try:
            parsed = parse_body(body, content_type, time.time())
            assert parsed.keys[0] == digest and parsed.keys[1:] == ["short"][: len(parsed) - 1]
            assert (await j.append("s", parsed, time.time())).accepted == len(parsed)
            assert (await j.read(0, 1))[0][0].raw == expected
            await j.commit_progress("out", j.last_seq, [], ["out"])
            rows = await j._read(lambda c: c.execute("SELECT keys FROM dedup_log").fetchall())
            assert [key for (keys,) in rows for key in orjson.loads(keys)][:1] == [digest]
        finally:
            await j.close()
        again = await opened(path)
        try:
            assert (await again.append("s", parse_body(body, content_type, time.time()), time.time())).accepted == 0
        finally:
            await again.close()

    @pytest.mark.parametrize("content_type", ["application/json", "application/x-ndjson"])
    async def test_a_key_sent_as_the_digest_of_another_is_no_duplicate_of_it(
        self, tmp_path: Path, content_type: str
    ) -> None:
        # A keySuffix that is the text a long key is remembered by must not make that key's event a
        # duplicate (or the other way round): a key sent starting "sha256:" is digested too.
        long_key = "k" * 300
        digest = "sha256:" + hashlib.sha256(long_key.encode()).hexdigest()
        j = await opened(tmp_path / "digest.db")
        try:
            for key in (long_key, digest):
                body = b'[{"event":{"action":"a"},"keySuffix":"%s"}]' % key.encode()
                body = body if content_type == "application/json" else body[1:-1]
                assert (await j.append("s", parse_body(body, content_type, time.time()), time.time())).accepted == 1
            digested = parse_body(b'{"event":{"action":"a"},"keySuffix":"%s"}' % digest.encode(), content_type, 0.0)
            assert digested.keys == ["sha256:" + hashlib.sha256(digest.encode()).hexdigest()]
        finally:
            await j.close()

    def test_a_key_of_max_key_chars_is_kept_as_it_is(self) -> None:
        key = "k" * MAX_KEY_CHARS
        body = b'[{"event":{"action":"a"},"keySuffix":"%s"}]' % key.encode()
        assert parse_body(body, "application/json", 0.0).keys == [key]

    async def test_keys_survive_a_restart_and_expire_with_the_window(self, tmp_path: Path) -> None:
        path = tmp_path / "keys.db"
        now = time.time()
        j = await opened(path)
        await j.append("s", batch("recent"), now - 60)
        await j.append("s", batch("old"), now - 7200)
        await j.close()
        again = await opened(path)
        try:
            assert again.dedup.size == 1
            assert (await again.append("s", batch("recent"), now)).duplicates == 1
            assert (await again.append("s", batch("old"), now)).accepted == 1
            await again.prune_dedup(now + 3 * 3600)
            count = await again._read(lambda c: c.execute("SELECT count(*) FROM dedup_log").fetchone()[0])
            assert count == 0 and again.dedup.size == 0
        finally:
            await again.close()

    async def test_a_failed_request_does_not_mark_its_keys_seen(self, journal: Journal) -> None:
        # Two requests with the same key in one commit group; the first fails on its own.
        poison = batch("same")
        poison.rejected.append(Rejected(object(), "unstorable"))  # type: ignore[arg-type]
        results = await asyncio.gather(
            journal.append("s", poison, time.time()),
            journal.append("s", batch("same"), time.time()),
            return_exceptions=True,
        )
        assert isinstance(results[0], Exception)
        assert results[1].accepted == 1  # type: ignore[union-attr]
        assert (await journal.append("s", batch("same"), time.time())).duplicates == 1

    async def test_the_index_is_bounded_by_max_keys(self, tmp_path: Path) -> None:
        j = Journal(tmp_path / "bound.db", max_bytes=1 << 30, dedup_window=3600, dedup_max_keys=1000)
        await j.open()
        try:
            now = time.time()
            await j.append("s", batch(*(f"early-{i}" for i in range(800))), now - 3000)
            await j.append("s", batch(*(f"late-{i}" for i in range(800))), now)
            assert j.dedup.size <= 1000 and j.dedup.evicted == 800
            assert (await j.append("s", batch("late-5"), now)).duplicates == 1
            assert (await j.append("s", batch("early-5"), now)).accepted == 1  # forgotten early, not refused
        finally:
            await j.close()

    async def test_keys_of_an_earlier_journal_version_are_kept(self, tmp_path: Path) -> None:
        path = tmp_path / "old.db"
        conn = sqlite3.connect(path)
        conn.execute("CREATE TABLE dedup (stream TEXT, key TEXT, seen REAL, PRIMARY KEY (stream, key))")
        conn.execute("INSERT INTO dedup VALUES ('s', 'legacy', ?)", (time.time(),))
        conn.commit()
        conn.close()
        j = await opened(path)
        try:
            assert (await j.append("s", batch("legacy"), time.time())).duplicates == 1
        finally:
            await j.close()


class TestDeadLetterReplay:
    """Dead letters carry their action and time, so replay writes them back exactly as intake wrote them."""

    async def test_replay_puts_back_the_recorded_action_and_time(self, journal: Journal) -> None:
        await journal.append("workos", batch("k1"), time.time())
        (event, _), *_ = await journal.read(0, 10)
        # what the element says is not what is replayed: the recorded action and time are
        moved = Event(event.seq, event.stream, event.raw, action="recorded.action", time=1234.5, received_at=1.0)
        await journal.commit_progress("s3", event.seq, [(moved, "HTTP 400")], ["s3"])
        assert replay_dead_letters(journal.path) == 1
        journal.replay_sinks = frozenset({"s3"})
        assert await journal.ingest_replays() == 1
        replayed = [pair for pair in await journal.read(event.seq, 10)]
        assert [(e.raw, e.action, e.time, target) for e, target in replayed] == [
            (event.raw, "recorded.action", 1234.5, "s3")
        ]
        (stored,) = journal.segments.read(event.seq, 10)
        assert stored.data[:4] == b"\x28\xb5\x2f\xfd"  # compressed like every intake batch

    async def test_the_service_logs_what_it_took(self, journal: Journal, caplog: pytest.LogCaptureFixture) -> None:
        """Was a defect: the service appended what another process's `dlq replay` put back without a word in its
        log, so its log did not show why its backlog grew or where the events sent again came from."""
        await journal.append("workos", batch("k1", "k2", "k3"), time.time())
        first, second, third = (event for event, _ in await journal.read(0, 10))
        await journal.commit_progress("fwd", third.seq, [(first, "HTTP 409"), (second, "HTTP 409")], ["fwd"])
        await journal.commit_progress("s3", third.seq, [(third, "HTTP 400")], ["s3"])
        assert replay_dead_letters(journal.path) == 3
        journal.replay_sinks = frozenset({"fwd", "s3"})
        caplog.set_level(logging.INFO, "receiver.journal")
        assert await journal.ingest_replays() == 3
        assert await journal.ingest_replays() == 0
        told = [r for r in caplog.records if r.getMessage() == "journal: replayed dead letters appended for delivery"]
        assert [r.__dict__["sinks"] for r in told] == [{"fwd": 2, "s3": 1}]

    async def test_replays_for_a_sink_not_active_stay_until_it_is(
        self, journal: Journal, caplog: pytest.LogCaptureFixture
    ) -> None:
        await journal.append("workos", batch("k1", "k2"), time.time())
        first, second = (event for event, _ in await journal.read(0, 10))
        await journal.commit_progress("fwd", second.seq, [(first, "HTTP 409")], ["fwd"])
        await journal.commit_progress("s3", second.seq, [(second, "HTTP 400")], ["s3"])
        assert replay_dead_letters(journal.path) == 2
        assert await journal.ingest_replays() == 0  # which sinks are active is not known yet: none taken
        journal.replay_sinks = frozenset({"s3"})  # a configuration without fwd
        assert await journal.ingest_replays() == 1
        assert await journal.ingest_replays() == 0
        assert [target for _, target in await journal.read(second.seq, 10)] == ["s3"]
        left = await journal._read(lambda conn: conn.execute("SELECT target, data FROM replays").fetchall())
        assert left == [("fwd", first.raw)]  # not appended for a sink nothing delivers to: the mark would pass it
        told = [r for r in caplog.records if r.getMessage().startswith("journal: replayed dead letters wait")]
        assert [(r.__dict__["sink"], r.__dict__["waiting"]) for r in told] == [("fwd", 1)]  # logged once
        journal.replay_sinks = frozenset({"s3", "fwd"})  # a configuration that feeds fwd again
        assert await journal.ingest_replays() == 1
        assert [(e.raw, target) for e, target in await journal.read(second.seq + 1, 10)] == [(first.raw, "fwd")]

    async def test_the_service_takes_large_replays_a_chunk_at_a_time(self, journal: Journal) -> None:
        """Was a defect: the service took up to 1,000 replays in one read and one write, whatever they held: 72 MiB
        of them (192 of 384 KiB) took 181 MiB of traced memory at the peak (a `serve` replaying 200 MiB grew by
        290 MB), so a replay of more than a pod's memory limit allows killed it, and again at every start, until
        someone deleted the replays by hand. Now a chunk (CHUNK_BYTES, 8 MiB) at a time: 20 MiB."""
        raws = [b'{"event":{"id":"e%d","pad":"%s"}}' % (i, os.urandom(192 * 1024).hex().encode()) for i in range(192)]
        await journal.append("workos", batch(*(f"e{i}" for i in range(len(raws)))), time.time())
        read = [event for event, _ in await journal.read(0, len(raws))]
        dead = [
            (Event(e.seq, e.stream, raw, action="a", time=1.0, received_at=1.0), "HTTP 422")
            for e, raw in zip(read, raws, strict=True)
        ]
        await journal.commit_progress("fwd", read[-1].seq, dead, ["fwd"])
        del dead, read
        assert replay_dead_letters(journal.path) == len(raws)
        journal.replay_sinks = frozenset({"fwd"})
        gc.collect()
        tracemalloc.start()
        try:
            assert await journal.ingest_replays() == len(raws)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 48 * 1024 * 1024, f"{peak / 2**20:.0f} MiB"
        last = journal.last_seq - len(raws)
        assert [(e.raw, target) for e, target in await journal.read(last, len(raws))] == [(r, "fwd") for r in raws]

    async def test_an_earlier_journal_gains_the_column_and_its_old_rows_still_replay(self, tmp_path: Path) -> None:
        path = tmp_path / "old.db"
        conn = sqlite3.connect(path)
        conn.executescript(
            "CREATE TABLE dead_letters (id INTEGER PRIMARY KEY, sink TEXT, stream TEXT NOT NULL, data BLOB NOT NULL, "
            "reason TEXT NOT NULL, at REAL NOT NULL);"
        )
        wrapped = b'{"event":{"id":"01A","action":"user.deleted","occurred_at":"2024-01-15T10:30:00.000Z"}}'
        bare = b'{"id":"01B","action":"role.assigned","occurred_at":"2024-01-15T10:30:01Z"}'
        conn.executemany(
            "INSERT INTO dead_letters (sink, stream, data, reason, at) VALUES (?, 'workos', ?, 'HTTP 400', 1.0)",
            [("s3", wrapped), ("s3", bare), ("s3", b"not json")],
        )
        conn.commit()
        conn.close()
        before = time.time()
        assert replay_dead_letters(path) == 3
        journal = await opened(path)
        try:
            columns = await journal._read(lambda c: [r[1] for r in c.execute("PRAGMA table_info(dead_letters)")])
            assert "meta" in columns
            journal.replay_sinks = frozenset({"s3"})
            await journal.ingest_replays()
            events = [event for event, _ in await journal.read(0, 10)]
        finally:
            await journal.close()
        assert [(e.raw, e.action) for e in events] == [
            (wrapped, "user.deleted"),
            (bare, "role.assigned"),
            (b"not json", ""),
        ]
        assert events[0].time == 1705314600.0 and events[1].time == 1705314601.0
        assert events[2].time >= before  # nothing to read a time from: the replay's


def _index_bytes(journal: Journal) -> int:
    """Memory of the segments' index arrays."""
    return sum(
        sys.getsizeof(column)
        for segment in journal.segments.segments
        for column in (segment.firsts, segment.lasts, segment.starts, segment.ends, segment.routes)
    )


def _rows(rows: list[Row]) -> list[tuple[str, str | None, list[tuple[int, bytes, str, float, float]], int]]:
    return [
        (row.stream, row.target, [(e.seq, e.raw, e.action, e.time, e.received_at) for e in row.events], row.size)
        for row in rows
    ]


class TestRecentRows:
    """The rows a process committed last are kept in memory for sinks that are caught up: they must be what a
    read of the journal gives, and never stand in for rows they do not hold."""

    async def test_every_start_gives_what_the_journal_read_gives(self, journal: Journal) -> None:
        for size in (3, 1, 5, 2):
            await journal.append("s", batch(*(f"k{size}-{i}" for i in range(size))), time.time())
        await journal.append("s", batch("dup-0", "k3-0", "fresh"), time.time())  # a duplicate is not stored
        for after in range(journal.last_seq + 1):
            for limit in (1, 2, 4, 100):
                recent = journal.recent_rows(after, limit)
                if after == journal.last_seq:
                    assert recent is None  # nothing held after the end: the journal is asked
                    continue
                assert recent is not None
                assert _rows(recent) == _rows(await journal.read_rows(after, limit)), (after, limit)

    async def test_rows_another_process_wrote_are_read_from_the_journal(self, journal: Journal) -> None:
        await journal.append("workos", batch("a", "b"), time.time())
        (event, _), *_ = await journal.read(0, 10)
        await journal.commit_progress("s3", event.seq, [(event, "HTTP 400")], ["s3"])
        assert replay_dead_letters(journal.path) == 1  # another process's
        journal.replay_sinks = frozenset({"s3"})
        assert await journal.ingest_replays() == 1  # seq 3, not in this process's memory
        await journal.append("workos", batch("c"), time.time())  # seq 4
        assert journal.recent_rows(2, 10) is None  # seq 3 is not held: read it
        rows = await journal.read_rows(2, 10)
        assert [(row.target, [e.seq for e in row.events]) for row in rows] == [("s3", [3]), (None, [4])]
        recent = journal.recent_rows(0, 10)
        assert recent is not None and [e.seq for row in recent for e in row.events] == [1, 2]  # stops at the gap

    async def test_memory_is_bounded(self, journal: Journal, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr("receiver.journal.facade.RECENT_BYTES", 1000)
        for i in range(50):
            await journal.append("s", batch(*(f"m{i}-{j}" for j in range(3))), time.time())
        held = journal.recent_rows(journal.last_seq - 1, 10)
        assert held is not None and [e.seq for row in held for e in row.events] == [journal.last_seq]
        assert journal.recent_rows(0, 10) is None  # the oldest rows were let go: the journal has them
        assert journal._recent_bytes <= 1000 + max(row.cost for row in journal._recent)

    async def test_held_rows_keep_their_events_not_the_request_bodies(self, journal: Journal) -> None:
        # The fast parse keeps each element as a view into its body. A row held for the sinks must not keep a
        # body much larger than its events alive, or a window of small rows could hold as many large bodies:
        # those of retried batches (all but one element a duplicate) and those padded with whitespace.
        pad = "p" * 900
        seen = [f'{{"event":{{"action":"a"}},"keySuffix":"seen-{i}","pad":"{pad}"}}' for i in range(1000)]
        first = parse_body(("[" + ",".join(seen) + "]").encode(), "application/json", time.time())
        assert (await journal.append("s", first, time.time())).accepted == 1000
        del first
        sent = []
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for n in range(40):  # ~1 MB each, with one new event of ~50 bytes in it
                new = f'{{"event":{{"action":"a"}},"keySuffix":"new-{n}"}}'
                if n % 2:
                    body = ("[" + ",".join([*seen, new]) + "]").encode()
                else:
                    body = ("[" + new + " " * 1_000_000 + "]").encode()
                result = await journal.append("s", parse_body(body, "application/json", time.time()), time.time())
                assert result.accepted == 1 and result.duplicates == (1000 if n % 2 else 0)
                sent.append(new.encode())
                del body
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert len(journal._recent) == 41
        assert held < 4 * 1024 * 1024, held  # the 40 bodies are 40 MB
        # Nothing asked for them yet: no event was made; a sink that asks gets them exactly.
        assert all(row._source is not None for row in journal._recent)
        recent = journal.recent_rows(1000, 100)
        assert recent is not None and [e.raw for row in recent for e in row.events] == sent
        assert all(type(e.raw) is bytes for row in recent for e in row.events)

    async def test_many_tiny_rows_stay_in_bounds(self, journal: Journal, monkeypatch: pytest.MonkeyPatch) -> None:
        # One 12-byte event a request: a row's own objects weigh far more than its bytes, and are charged.
        monkeypatch.setattr("receiver.journal.facade.RECENT_BYTES", 50_000)
        for _ in range(100):
            await journal.append("s", parse_body(b'[{"event":{}}]', "application/json", time.time()), time.time())
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0] - _index_bytes(journal)
            for _ in range(60):  # 3,000 rows: uncharged, 12 bytes each, the window would keep them all (≈ 2 MB)
                bodies = [parse_body(b'[{"event":{}}]', "application/json", time.time()) for _ in range(50)]
                await asyncio.gather(*(journal.append("s", parsed, time.time()) for parsed in bodies))
            del bodies
            gc.collect()
            held = tracemalloc.get_traced_memory()[0] - _index_bytes(journal) - before
        finally:
            tracemalloc.stop()
        assert held < 3 * 50_000, (held, len(journal._recent))  # the segment index (≈ 36 bytes a record) aside

    async def test_a_parsed_body_changed_after_append_does_not_change_what_sinks_get(self, journal: Journal) -> None:
        parsed = batch("a", "b")
        await journal.append("s", parsed, time.time())
        journaled = _rows(await journal.read_rows(0, 10))
        parsed.raws[0], parsed.actions[0] = b'{"event":{"action":"changed"}}', "changed"
        recent = journal.recent_rows(0, 10)
        assert recent is not None and _rows(recent) == journaled

    async def test_large_rows_are_made_in_the_writer(self, journal: Journal, monkeypatch: pytest.MonkeyPatch) -> None:
        # Making a large row's events on the event loop when a sink first asks would hold the loop (100 k events:
        # 30-60 ms), so those are made at the commit, as a read would make them.
        monkeypatch.setattr("receiver.journal.facade.DEFER_MAX_EVENTS", 3)
        await journal.append("s", batch("a", "b", "c"), time.time())
        await journal.append("s", batch("d", "e", "f", "g"), time.time())
        assert [row._source is None for row in journal._recent] == [False, True]
        recent = journal.recent_rows(0, 10)
        assert recent is not None and _rows(recent) == _rows(await journal.read_rows(0, 10))


class TestGroupedWrites:
    """Batches queued together are appended with one write; one that fails does not sink the others."""

    async def test_a_failing_batch_fails_alone_and_the_others_commit(
        self, journal: Journal, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        record = journal._record

        def refuse_bad(batch, records):  # type: ignore[no-untyped-def]
            result = record(batch, records)
            if batch.parsed.keys == ["bad"]:
                raise ValueError("simulated failure of one request's record")
            return result

        monkeypatch.setattr(journal, "_record", refuse_bad)
        results = await asyncio.gather(
            *(journal.append("s", batch(key), time.time()) for key in ("a", "b", "bad", "c", "a")),
            return_exceptions=True,
        )
        assert [type(r).__name__ if isinstance(r, BaseException) else r.accepted for r in results] == [
            1,
            1,
            "JournalError",
            1,
            0,  # "a" again, in the same group: a duplicate of the first, whose keys were not undone
        ]
        assert [e.raw for e, _ in await journal.read(0, 10)] == [batch(k).raws[0] for k in ("a", "b", "c")]
        assert [e.seq for e, _ in await journal.read(0, 10)] == [1, 2, 3]  # no gap where "bad" was undone
        again = await journal.append("s", batch("bad2", "c"), time.time())
        assert (again.accepted, again.duplicates) == (1, 1)

    async def test_requests_are_answered_before_the_writes_no_request_waits_on(self, journal: Journal) -> None:
        # A sink's cursor commit queued in the same group as requests took ≈ 1.5 ms of CPU and a WAL fsync
        # that every request of the group waited for (p99). The writer now answers the requests first.
        busy, slow = asyncio.Event(), asyncio.Event()
        loop = asyncio.get_running_loop()
        started = loop.create_future()

        def hold(flag: asyncio.Event) -> None:  # the writer thread waits until the test sets `flag`
            loop.call_soon_threadsafe(lambda: started.done() or started.set_result(None))
            asyncio.run_coroutine_threadsafe(flag.wait(), loop).result(10)

        first = asyncio.create_task(journal._write(lambda conn: hold(busy)))
        await started  # the writer is in a group: what is queued now makes the next group, together
        cursor = asyncio.create_task(journal._write(lambda conn: hold(slow)))
        await asyncio.sleep(0)
        request = asyncio.create_task(journal.append("s", batch("k1", "k2"), time.time()))
        await asyncio.sleep(0.05)
        busy.set()
        await first
        result = await asyncio.wait_for(request, 5)  # answered while the other write of its group still runs
        assert result.accepted == 2 and not cursor.done()
        slow.set()
        await cursor
        assert [e.raw for e, _ in await journal.read(0, 10)] == batch("k1", "k2").raws

    async def test_keys_of_dropped_segments_are_kept(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr("receiver.journal.segments.SEGMENT_BYTES", 1)  # a segment per group
        path = tmp_path / "g.db"
        j = await opened(path)
        for i in range(40):
            await j.append("s", batch(f"g{i}", f"h{i}"), time.time())
        await j.commit_progress("a", j.last_seq, [], ["a"])  # every segment but the newest is dropped
        left = len(list(j.segments.directory.glob("*.seg")))
        logged = await j._read(lambda c: c.execute("SELECT count(*) FROM dedup_log").fetchone()[0])
        await j.close()
        assert left == 1 and logged == 1  # the dropped segments' keys, in one row
        again = await opened(path)
        try:
            result = await again.append("s", batch(*(f"g{i}" for i in range(40)), "new"), time.time())
            assert (result.accepted, result.duplicates) == (1, 40)
        finally:
            await again.close()


def _in_database_file(path: Path) -> int:
    """Cursor rows in the database file itself, without its WAL (what checkpoints have copied so far)."""
    conn = sqlite3.connect(f"file:{path}?immutable=1", uri=True)
    try:
        return int(conn.execute("SELECT count(*) FROM cursors").fetchone()[0])
    except sqlite3.OperationalError:  # not even the schema has been copied yet
        return 0
    finally:
        conn.close()


async def _sustained_intake(journal: Journal, seconds: float, writers: int = 8) -> tuple[int, int]:
    """Requests of 20 events from `writers` concurrent clients while a sink keeps up (its progress frees the
    rows); (committed, refused)."""
    stop = time.monotonic() + seconds
    counts = [0, 0]

    async def client(number: int) -> None:
        i = 0
        while time.monotonic() < stop:
            try:
                await journal.append("s", batch(*(f"c{number}-{i}-{k}" for k in range(20))), time.time())
                counts[0] += 1
            except JournalError:
                counts[1] += 1
                await asyncio.sleep(0.05)
            i += 1

    async def sink() -> None:
        position = 0
        while time.monotonic() < stop:
            with contextlib.suppress(JournalError):
                rows = journal.recent_rows(position, 4096) or await journal.read_rows(position, 4096)
                if rows:
                    position = rows[-1].events[-1].seq
                    await journal.commit_progress("mem", position, [], ["mem"])
            await asyncio.sleep(0.01)

    await asyncio.gather(*(client(n) for n in range(writers)), sink())
    return counts[0], counts[1]


def _wal_bytes(journal: Journal) -> int:
    wal = journal.path.with_name(journal.path.name + "-wal")
    return wal.stat().st_size if wal.exists() else 0


class TestCheckpoints:
    """The WAL is copied into the database mostly in the background, and stays bounded: SQLite restarts it only
    after a checkpoint that copies all of it, which the commits of the writer still run."""

    async def test_the_background_checkpoint_copies_what_was_committed(self, journal: Journal) -> None:
        await journal.append("s", batch("d"), time.time())
        for sink in ("a", "b", "c", "d", "e"):
            await journal.commit_progress(sink, 1, [], ["a", "b", "c", "d", "e"])
        deadline = time.monotonic() + 10
        while _in_database_file(journal.path) < 5 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert _in_database_file(journal.path) == 5  # no commit since: only the background task copied them

    async def test_the_wal_stays_bounded_under_sustained_intake(self, journal: Journal) -> None:
        committed, _ = await _sustained_intake(journal, 4.0)
        # SQLite's 1,000-page checkpoint keeps it near 4 MiB; checkpoints that never copy all of it while
        # writes keep coming let it grow by megabytes a second.
        assert committed > 100 and _wal_bytes(journal) < 16 * 1024 * 1024, (committed, _wal_bytes(journal))

    async def test_writes_commit_again_after_the_disk_filled_under_sustained_intake(self, tmp_path: Path) -> None:
        with small_disk(tmp_path / "disk", "32m") as disk:
            journal = Journal(disk / "j.db", max_bytes=1 << 34, dedup_window=3600)
            await journal.open()
            try:
                await _sustained_intake(journal, 4.0)
                await asyncio.sleep(2)  # checkpoint periods with nothing arriving
                outcomes = []
                for attempt in range(10):
                    try:
                        await journal.append("s", batch(f"after-{attempt}"), time.time())
                        outcomes.append("ok")
                        break
                    except JournalError as exc:
                        outcomes.append(str(exc))
                        await asyncio.sleep(1)
                wal = _wal_bytes(journal)
            finally:
                await journal.close()
        assert outcomes[-1] == "ok", f"still refused once intake paused: {outcomes[-1]!r}; WAL {wal / 1e6:.1f} MB"
