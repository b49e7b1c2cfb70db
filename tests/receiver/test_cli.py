"""The `log-bridge dlq` commands on a real journal: what replay takes and leaves, what list prints, what purge
deletes (and that a running service takes requests again after it), and a journal that is not where the
configuration says."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import sqlite3
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml

from receiver.cli import main
from receiver.journal import INTAKE, list_dead_letters
from receiver.journal.schema import LAYOUT, WAL_SIZE_LIMIT
from receiver.parsing import Rejected
from receiver.samples import sample_wrappers
from sinks.base import Event
from tests.conftest import TOKEN, StartService, scrape
from tests.receiver.test_journal import batch, opened
from tests.receiver.test_unattended import small_disk

SINK = {"type": "memory"}


def write_config(tmp_path: Path, journal: str, feeds: list[str], sinks: list[str], name: str = "c.yaml") -> Path:
    """A configuration whose one stream feeds `feeds`, with `sinks` under `sinks:`."""
    tree: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": 17001, "allowlist": ["127.0.0.1/32"]},
        "journal": {"path": journal},
        "streams": [{"name": "workos", "path": "/workos", "auth": {"values": ["s3cr3t-value"]}, "sinks": feeds}],
        "sinks": dict.fromkeys(sinks, SINK),
    }
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tree))
    return path


async def dead_letter(path: Path, sink: str, raws: list[bytes]) -> None:
    """Make `sink` dead-letter events with these bytes, as the delivery engine does."""
    journal = await opened(path)
    try:
        await journal.append("workos", batch(*(f"{sink}-{i}" for i in range(len(raws)))), time.time())
        read = [event for event, _ in await journal.read(journal.last_seq - len(raws), len(raws))]
        dead = [
            (Event(event.seq, event.stream, raw, action=event.action, time=event.time, received_at=1.0), "HTTP 409")
            for event, raw in zip(read, raws, strict=True)
        ]
        await journal.commit_progress(sink, read[-1].seq, dead, [sink])
    finally:
        await journal.close()


def events(count: int) -> list[bytes]:
    return [b'{"event":{"id":"e%d","action":"user.signed_in"}}' % i for i in range(count)]


def another_database(tmp_path: Path) -> Path:
    """Another program's SQLite database (one table, rollback journal)."""
    other = tmp_path / "app.db"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE users (name TEXT)")
    conn.commit()
    conn.close()
    return other


def assert_untouched(other: Path) -> None:
    """`another_database` as it was made: no journal tables added, not turned to WAL mode."""
    conn = sqlite3.connect(other)
    try:
        assert conn.execute("SELECT name FROM sqlite_master").fetchall() == [("users",)]
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("delete",)
    finally:
        conn.close()


class TestDlqReplay:
    async def test_dead_letters_of_a_sink_the_configuration_lacks_are_left(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        journal = tmp_path / "j.db"
        await dead_letter(journal, "fwd", events(3))
        await dead_letter(journal, "archive", events(2))
        config = write_config(tmp_path, str(journal), ["archive"], ["archive"])
        assert main(["dlq", "replay", "--config", str(config)]) == 0
        out = capsys.readouterr().out
        assert "replayed 2 dead letter(s)" in out
        assert "left 3 dead letter(s) of sink fwd: it is not in the configuration" in out
        assert len(list_dead_letters(journal, "fwd")) == 3 and list_dead_letters(journal, "archive") == []

    async def test_dead_letters_of_a_sink_no_stream_feeds_are_left(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        journal = tmp_path / "j.db"
        await dead_letter(journal, "fwd", events(3))
        config = write_config(tmp_path, str(journal), ["archive"], ["archive", "fwd"])
        assert main(["dlq", "replay", "--config", str(config)]) == 0
        out = capsys.readouterr().out
        assert "replayed 0 dead letter(s)" in out and "left 3 dead letter(s) of sink fwd: no stream feeds it" in out
        assert len(list_dead_letters(journal, "fwd")) == 3

    async def test_an_explicit_sink_no_stream_feeds_is_refused(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        journal = tmp_path / "j.db"
        await dead_letter(journal, "fwd", events(3))
        config = write_config(tmp_path, str(journal), ["archive"], ["archive", "fwd"])
        assert main(["dlq", "replay", "--config", str(config), "--sink", "fwd"]) == 2
        captured = capsys.readouterr()
        assert "no stream feeds sink 'fwd'" in captured.err and "replayed" not in captured.out
        assert len(list_dead_letters(journal, "fwd")) == 3

    async def test_a_fed_sink_is_replayed(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        journal = tmp_path / "j.db"
        await dead_letter(journal, "fwd", events(3))
        config = write_config(tmp_path, str(journal), ["archive", "fwd"], ["archive", "fwd"])
        assert main(["dlq", "replay", "--config", str(config), "--sink", "fwd"]) == 0
        assert "replayed 3 dead letter(s)" in capsys.readouterr().out
        assert list_dead_letters(journal, "fwd") == []


class TestDlqList:
    async def test_elements_are_printed_as_stored(
        self, tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
    ) -> None:
        journal = tmp_path / "j.db"
        exact = (
            b'{"event":{"id":"e1","n":123456789012345678901234567890,"d":0.10000000000000000555111512312578,"x":1e999}}'
        )
        spaced = b'{ "event" : { "id" : "e2" } }'
        await dead_letter(journal, "fwd", [exact, spaced])
        opened_journal = await opened(journal)
        try:  # bad input as a sender posted it: not UTF-8, and JSON spread over lines
            rejected = [Rejected(b'{"event":"\xff\xfe"}', "not UTF-8"), Rejected(b'{\n"event": 5\n}', "not an event")]
            await opened_journal.append("workos", batch(rejected=rejected), time.time())
        finally:
            await opened_journal.close()
        config = write_config(tmp_path, str(journal), ["fwd"], ["fwd"])
        assert main(["dlq", "list", "--config", str(config)]) == 0
        lines = capsysbinary.readouterr().out.splitlines()
        assert len(lines) == 4
        assert lines[0].endswith(b',"element":' + exact + b"}") and lines[1].endswith(b',"element":' + spaced + b"}")
        first = json.loads(lines[0])  # 1e999: JSON, which orjson does not read
        assert first["sink"] == "fwd" and first["reason"] == "HTTP 409" and "element_base64" not in first
        for line, raw in zip(lines[2:], [b'{"event":"\xff\xfe"}', b'{\n"event": 5\n}'], strict=True):
            entry = orjson.loads(line)
            assert entry["sink"] == INTAKE and base64.b64decode(entry["element_base64"]) == raw
            assert entry["element"] == raw.decode("utf-8", "replace")

    async def test_an_element_nested_too_deeply_to_check_is_printed_as_base64(
        self, tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
    ) -> None:
        """Was a defect: the intake dead-letters an array nested 3,000 deep (not an object), and `dlq list`
        checking whether it is JSON raised RecursionError: a traceback, exit 1, and no letter after it listed."""
        journal = tmp_path / "j.db"
        deep = b"[" * 3000 + b"]" * 3000
        opened_journal = await opened(journal)
        try:
            rejected = [Rejected(deep, "element is a JSON array, not an object"), Rejected(b"5", "not an object")]
            await opened_journal.append("workos", batch(rejected=rejected), time.time())
        finally:
            await opened_journal.close()
        config = write_config(tmp_path, str(journal), ["fwd"], ["fwd"])
        assert main(["dlq", "list", "--config", str(config)]) == 0
        first, second = capsysbinary.readouterr().out.splitlines()
        assert base64.b64decode(orjson.loads(first)["element_base64"]) == deep
        assert second.endswith(b',"element":5}')

    async def test_a_reader_that_stops_early_ends_it_quietly(self, tmp_path: Path) -> None:
        """Was a defect: `dlq list | head -1` ended in a BrokenPipeError traceback once the reader had gone."""
        journal = tmp_path / "j.db"
        await dead_letter(journal, "fwd", [b'{"event":{"id":"e%d","pad":"%s"}}' % (i, b"x" * 65536) for i in range(8)])
        config = write_config(tmp_path, str(journal), ["fwd"], ["fwd"])
        with subprocess.Popen(
            [sys.executable, "-m", "receiver.cli", "dlq", "list", "--config", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        ) as listing:
            assert listing.stdout is not None and listing.stderr is not None
            assert orjson.loads(listing.stdout.readline())["id"] == 1
            listing.stdout.close()  # as `head -1` does
            err = listing.stderr.read()
            assert listing.wait(timeout=60) == 141 and err == b"", err


async def bad_input(path: Path, count: int) -> None:
    """Make the intake dead-letter `count` elements (bad input), one request each."""
    journal = await opened(path)
    try:
        for i in range(count):
            await journal.append("workos", batch(rejected=[Rejected(b'"bad-%d"' % i, "not an event")]), time.time())
    finally:
        await journal.close()


def ids(path: Path, sink: str | None = None) -> list[int]:
    return [letter.id for letter in list_dead_letters(path, sink)]


class TestDlqPurge:
    async def test_by_sink_only_that_sinks_are_deleted(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        journal = tmp_path / "j.db"
        await dead_letter(journal, "fwd", events(3))
        await dead_letter(journal, "archive", events(2))
        await bad_input(journal, 2)
        config = write_config(tmp_path, str(journal), ["archive"], ["archive"])  # fwd is no longer configured
        assert main(["dlq", "purge", "--config", str(config), "--sink", "fwd", "--yes"]) == 0
        assert "deleted 3 dead letter(s)" in capsys.readouterr().out
        assert ids(journal, "fwd") == [] and len(ids(journal, "archive")) == 2 and len(ids(journal, INTAKE)) == 2
        assert main(["dlq", "purge", "--config", str(config), "--sink", INTAKE, "--yes"]) == 0
        assert "deleted 2 dead letter(s)" in capsys.readouterr().out
        assert ids(journal, INTAKE) == [] and len(ids(journal, "archive")) == 2

    async def test_before_deletes_only_older_ones(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        journal = tmp_path / "j.db"
        await dead_letter(journal, "fwd", events(2))
        await asyncio.sleep(0.05)
        between = datetime.fromtimestamp(time.time(), UTC).isoformat()
        await asyncio.sleep(0.05)
        await dead_letter(journal, "archive", events(3))
        newer = ids(journal)[2:]
        config = write_config(tmp_path, str(journal), ["fwd", "archive"], ["fwd", "archive"])
        assert main(["dlq", "purge", "--config", str(config), "--before", between, "--yes"]) == 0
        assert "deleted 2 dead letter(s)" in capsys.readouterr().out
        assert ids(journal) == newer

    async def test_a_time_without_offset_is_utc_and_a_bad_one_is_refused(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        journal = tmp_path / "j.db"
        await dead_letter(journal, "fwd", events(2))
        config = write_config(tmp_path, str(journal), ["fwd"], ["fwd"])
        past = datetime.fromtimestamp(time.time() - 3600, UTC).replace(tzinfo=None).isoformat()
        assert main(["dlq", "purge", "--config", str(config), "--before", past, "--yes"]) == 0
        assert "deleted 0 dead letter(s)" in capsys.readouterr().out
        with pytest.raises(SystemExit) as exited:
            main(["dlq", "purge", "--config", str(config), "--before", "yesterday", "--yes"])
        assert exited.value.code == 2 and "not an ISO 8601 time: 'yesterday'" in capsys.readouterr().err
        assert len(ids(journal)) == 2

    async def test_by_id_with_a_sink_both_must_match(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        journal = tmp_path / "j.db"
        await dead_letter(journal, "fwd", events(3))
        await bad_input(journal, 1)
        first, second, third, intake = ids(journal)
        config = write_config(tmp_path, str(journal), ["fwd"], ["fwd"])
        argv = ["dlq", "purge", "--config", str(config), "--id", str(first), "--id", str(third), "--yes"]
        assert main(argv) == 0
        assert "deleted 2 dead letter(s)" in capsys.readouterr().out
        assert ids(journal) == [second, intake]
        assert main(["dlq", "purge", "--config", str(config), "--id", str(intake), "--sink", "fwd", "--yes"]) == 0
        assert "deleted 0 dead letter(s)" in capsys.readouterr().out
        assert ids(journal) == [second, intake]

    @pytest.mark.parametrize("given", ["99999999999999999999999", "-5", "0", "x1"])
    async def test_an_id_no_dead_letter_can_have_is_refused(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], given: str
    ) -> None:
        """Was a defect: an id past 64 bits ended in an OverflowError traceback (and a negative one was taken)."""
        journal = tmp_path / "j.db"
        await dead_letter(journal, "fwd", events(2))
        config = write_config(tmp_path, str(journal), ["fwd"], ["fwd"])
        with pytest.raises(SystemExit) as exited:
            main(["dlq", "purge", "--config", str(config), "--id", given, "--yes"])
        assert exited.value.code == 2
        assert f"argument --id: not a dead letter id: {given!r}" in capsys.readouterr().err
        assert len(ids(journal)) == 2

    @pytest.mark.parametrize("taken_by", ["purge", "replay"])
    async def test_an_id_never_names_another_letter_later(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], taken_by: str
    ) -> None:
        """Was a defect: ids were SQLite rowids, and a new dead letter took the id of the newest one taken away,
        so `dlq purge --id N` from an earlier listing deleted, for good, a letter its user had never seen."""
        journal = tmp_path / "j.db"
        await dead_letter(journal, "fwd", events(3))
        config = write_config(tmp_path, str(journal), ["fwd"], ["fwd"])
        taken = ids(journal)
        command = ["purge", "--id", str(taken[-1]), "--yes"] if taken_by == "purge" else ["replay"]
        assert main(["dlq", *command, "--config", str(config)]) == 0
        await bad_input(journal, 2)  # dead-lettered since
        assert min(ids(journal, INTAKE)) > max(taken)
        assert main(["dlq", "purge", "--config", str(config), "--id", str(taken[-1]), "--yes"]) == 0
        assert "deleted 0 dead letter(s)" in capsys.readouterr().out

    async def test_without_yes_it_is_a_dry_run(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        journal = tmp_path / "j.db"
        await bad_input(journal, 3)
        config = write_config(tmp_path, str(journal), ["fwd"], ["fwd"])
        opened_journal = await opened(journal)
        size = opened_journal.dead_letter_bytes  # what the service counts against the cap
        await opened_journal.close()
        assert main(["dlq", "purge", "--config", str(config), "--sink", INTAKE]) == 0
        out = capsys.readouterr().out
        assert f"would delete 3 dead letter(s), {size} bytes; nothing deleted: pass --yes" in out
        assert len(ids(journal)) == 3
        assert main(["dlq", "purge", "--config", str(config), "--all", "--yes"]) == 0
        assert f"deleted 3 dead letter(s), {size} bytes" in capsys.readouterr().out
        assert ids(journal) == []

    async def test_many_are_deleted_a_chunk_at_a_time(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        monkeypatch.setattr("receiver.journal.dead_letters.PURGE_CHUNK", 2)
        journal = tmp_path / "j.db"
        await dead_letter(journal, "fwd", events(5))
        await bad_input(journal, 1)
        config = write_config(tmp_path, str(journal), ["fwd"], ["fwd"])
        assert main(["dlq", "purge", "--config", str(config), "--sink", "fwd", "--yes"]) == 0
        assert "deleted 5 dead letter(s)" in capsys.readouterr().out
        assert ids(journal, "fwd") == [] and len(ids(journal, INTAKE)) == 1

    @pytest.mark.parametrize("extra", [[], ["--yes"], ["--all", "--sink", "fwd", "--yes"]])
    async def test_no_selector_or_all_with_one_is_refused(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str]
    ) -> None:
        journal = tmp_path / "j.db"
        await dead_letter(journal, "fwd", events(2))
        config = write_config(tmp_path, str(journal), ["fwd"], ["fwd"])
        assert main(["dlq", "purge", "--config", str(config), *extra]) == 2
        captured = capsys.readouterr()
        assert "give --sink, --before or --id, or --all alone" in captured.err and captured.out == ""
        assert len(ids(journal)) == 2

    async def test_a_running_service_at_its_cap_takes_requests_again_after_a_purge(
        self, start_service: StartService, tmp_path: Path, client: aiohttp.ClientSession
    ) -> None:
        """Intake dead letters cannot be replayed, so once they reached `max_dead_letter_bytes` every request
        holding a bad element was refused (503) until the cap was raised; and the service recounted them only at
        or past the cap, not when a request's letters would only take it past. `dlq purge`, from another process,
        frees the room and the running service takes the request again within a few seconds."""
        service = await start_service({"journal": {"max_dead_letter_bytes": "2KiB"}})
        body = orjson.dumps([*sample_wrappers(1), "x" * 400])  # one good event, one element to dead-letter
        headers = {"Authorization": TOKEN, "Content-Type": "application/json"}

        async def status() -> int:
            async with client.post(service.url + "/workos", data=body, headers=headers) as response:
                await response.read()
                return response.status

        answers = [await status() for _ in range(6)]
        assert answers[:3] == [200] * 3 and answers[-1] == 503, answers
        assert service.journal.dead_letter_bytes < service.journal.max_dead_letter_bytes  # the room was too small
        config = write_config(tmp_path, str(service.config.journal.path), ["mem"], ["mem"], name="cli.yaml")
        purge = await asyncio.create_subprocess_exec(  # another process, as an operator runs it
            *[sys.executable, "-m", "receiver.cli", "dlq", "purge", "--config", str(config)],
            *["--sink", INTAKE, "--yes"],
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await purge.communicate()
        assert purge.returncode == 0, err
        assert b"deleted " in out
        deadline = time.monotonic() + 5
        while (answer := await status()) == 503 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert answer == 200

    async def test_the_dead_letter_gauge_follows_a_purge_below_the_cap(
        self, start_service: StartService, tmp_path: Path, client: aiohttp.ClientSession
    ) -> None:
        """Was a defect: the running service recounted its dead letters after another process took some away
        only while it was at its cap or refusing, so after `dlq purge` of dead letters at 80-99 % of the cap (what
        LogBridgeDeadLettersNearlyFull asks the operator to do) log_bridge_dead_letter_bytes kept the old figure,
        and the alert kept firing, until a restart."""
        service = await start_service({"journal": {"max_dead_letter_bytes": "64KiB"}})
        body = orjson.dumps([*sample_wrappers(1), "x" * 400])  # one good event, one element to dead-letter
        for _ in range(5):
            async with client.post(
                service.url + "/workos", data=body, headers={"Authorization": TOKEN, "Content-Type": "application/json"}
            ) as response:
                assert response.status == 200
        before = service.journal.dead_letter_bytes
        assert 2000 < before < service.journal.max_dead_letter_bytes
        config = write_config(tmp_path, str(service.config.journal.path), ["mem"], ["mem"], name="cli.yaml")
        purge = await asyncio.create_subprocess_exec(  # another process, as an operator runs it
            *[sys.executable, "-m", "receiver.cli", "dlq", "purge", "--config", str(config)],
            *["--sink", INTAKE, "--yes"],
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await purge.communicate()
        assert purge.returncode == 0 and b"deleted 5 " in out, out + err
        deadline = time.monotonic() + 5
        while service.journal.dead_letter_bytes and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        gauge = scrape(service.metrics.render().decode(), "log_bridge_dead_letter_bytes")
        assert gauge == 0, f"{before} bytes before the purge, {gauge} reported 5 s after it"

    async def test_a_purge_gives_the_disk_back_to_the_wal_limit(
        self, start_service: StartService, tmp_path: Path, client: aiohttp.ClientSession
    ) -> None:
        """Was a defect: SQLite overwrites what a delete frees (secure_delete), so purging N bytes of dead letters
        wrote N bytes to the WAL, and a WAL is never made smaller by itself: the file kept its largest size for
        the life of the process (80 MB of purged letters left an 80 MB WAL beside the 80 MB database)."""
        service = await start_service()
        wal = Path(str(service.config.journal.path) + "-wal")
        body = orjson.dumps([*sample_wrappers(1), "x" * 1_000_000, "y" * 1_000_000])  # two letters of 1 MB
        headers = {"Authorization": TOKEN, "Content-Type": "application/json"}
        for _ in range(6):
            async with client.post(service.url + "/workos", data=io.BytesIO(body), headers=headers) as response:
                assert response.status == 200
        config = write_config(tmp_path, str(service.config.journal.path), ["mem"], ["mem"], name="cli.yaml")
        assert await asyncio.to_thread(main, ["dlq", "purge", "--config", str(config), "--all", "--yes"]) == 0
        largest = wal.stat().st_size
        deadline = time.monotonic() + 10
        while wal.stat().st_size > WAL_SIZE_LIMIT and time.monotonic() < deadline:  # the next writes truncate it
            async with client.post(service.url + "/workos", json=sample_wrappers(1), headers=headers) as response:
                assert response.status == 200
            await asyncio.sleep(0.2)
        assert largest > WAL_SIZE_LIMIT  # the purge did write its 12 MB there
        assert wal.stat().st_size <= WAL_SIZE_LIMIT, f"{largest} bytes after the purge, {wal.stat().st_size} now"


MEASURE = """
import re, sys
from receiver.cli import main
code = main(sys.argv[1:])
status = open("/proc/self/status").read()
print(int(re.search(r"^VmHWM:\\s+(\\d+) kB", status, re.M).group(1)) * 1024, file=sys.stderr)
sys.exit(code)
"""
"""Runs the CLI and prints its peak RSS: VmHWM, which starts again at exec (ru_maxrss would count the forked
test process's pages)."""


def peak_rss(args: list[str]) -> int:
    """The peak RSS of `log-bridge ...args` run in a process of its own (its output thrown away)."""
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=True
    )
    return int(done.stderr.splitlines()[-1])


class TestDlqMemory:
    PAD = 512 * 1024

    def raws(self, count: int) -> list[bytes]:
        return [b'{"event":{"id":"e%d","action":"a","pad":"%s"}}' % (i, b"x" * self.PAD) for i in range(count)]

    @pytest.mark.slow
    async def test_list_and_replay_hold_a_chunk_not_every_dead_letter(self, tmp_path: Path) -> None:
        """Was a defect: `dlq list` and `dlq replay` read every dead letter at once (up to
        journal.max_dead_letter_bytes, 256 MiB by default), replay in one transaction, which held the service's
        writer for all of it. 96 MiB of dead letters: the peak RSS of either grew by 96–97 MiB over an almost
        empty journal. Now they go a chunk (8 MiB) at a time: 14.5–15.1 MiB."""
        small, large = tmp_path / "small.db", tmp_path / "large.db"
        await dead_letter(small, "fwd", self.raws(1))
        await dead_letter(large, "fwd", self.raws(192))  # 96 MiB
        growth = {}
        for command in ("list", "replay"):
            runs = {}
            for journal in (small, large):
                config = write_config(tmp_path, str(journal), ["fwd"], ["fwd"], name=f"{journal.stem}.yaml")
                runs[journal] = peak_rss(["dlq", command, "--config", str(config)])
            growth[command] = runs[large] - runs[small]
        print({name: f"{size / 2**20:.1f} MiB" for name, size in growth.items()})
        assert max(growth.values()) < 40 * 1024 * 1024, {
            name: f"{size / 2**20:.0f} MiB" for name, size in growth.items()
        }
        assert list_dead_letters(large, "fwd") == []
        conn = sqlite3.connect(large)
        try:
            replayed = [bytes(row[0]) for row in conn.execute("SELECT data FROM replays ORDER BY id")]
        finally:
            conn.close()
        assert replayed == self.raws(192)  # every one, once, in order, across 12 transactions or more


class TestMissingJournal:
    @pytest.mark.parametrize("action", ["list", "replay", "purge"])
    async def test_a_relative_journal_path_not_found_from_here_is_said(
        self,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
        action: str,
    ) -> None:
        served = tmp_path / "served"
        served.mkdir()
        await dead_letter(served / "data" / "j.db", "fwd", events(2))
        config = write_config(tmp_path, "data/j.db", ["fwd"], ["fwd"])
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        monkeypatch.chdir(elsewhere)
        extra = ["--all"] if action == "purge" else []  # a dry run
        assert main(["dlq", action, "--config", str(config), *extra]) == 2
        captured = capsys.readouterr()
        assert f"no journal at data/j.db (relative to the working directory: {elsewhere / 'data/j.db'})" in captured.err
        assert captured.out == ""
        assert not (elsewhere / "data").exists()  # nothing created where it is not
        monkeypatch.chdir(served)  # where `serve` ran: found
        assert main(["dlq", action, "--config", str(config), *extra]) == 0
        assert capsys.readouterr().out

    @pytest.mark.parametrize("action", ["list", "replay", "purge"])
    async def test_a_file_that_is_not_a_journal_is_said(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], action: str
    ) -> None:
        """Was a defect: a journal path naming another file (or a directory) ended in a sqlite3 traceback."""
        (tmp_path / "notes.db").write_text("not a database\n")
        (tmp_path / "dir.db").mkdir()
        extra = ["--all", "--yes"] if action == "purge" else []
        for name, why in [("notes.db", "the file is not a log-bridge journal"), ("dir.db", "unable to open")]:
            config = write_config(tmp_path, str(tmp_path / name), ["fwd"], ["fwd"])
            assert main(["dlq", action, "--config", str(config), *extra]) == 2
            captured = capsys.readouterr()
            assert captured.err.startswith(f"log-bridge dlq {action}: cannot use the journal {tmp_path / name}: {why}")
            assert captured.err.count("\n") == 1 and captured.out == ""
        assert (tmp_path / "notes.db").read_text() == "not a database\n"

    @pytest.mark.parametrize("action", ["list", "replay", "purge"])
    async def test_another_sqlite_database_is_left_as_it_is(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], action: str
    ) -> None:
        """Was a defect: a journal path naming another program's SQLite database (a typo, a wrong volume) was
        taken for an empty journal: the command added the journal's five tables to it, turned it to WAL mode
        for good, and said it found no dead letters."""
        other = another_database(tmp_path)
        config = write_config(tmp_path, str(other), ["fwd"], ["fwd"])
        extra = ["--all", "--yes"] if action == "purge" else []
        assert main(["dlq", action, "--config", str(config), *extra]) == 2
        captured = capsys.readouterr()
        assert f"log-bridge dlq {action}: cannot use the journal {other}: the file is not a log-bridge journal" in (
            captured.err
        )
        assert captured.out == ""
        assert_untouched(other)

    @pytest.mark.parametrize("command", ["serve", "drain"])
    def test_another_sqlite_database_is_not_served_from(self, tmp_path: Path, command: str) -> None:
        """Was a defect: `serve` and `drain` on another program's SQLite database added the journal's tables to
        it, turned it to WAL mode for good, and served from it."""
        other = another_database(tmp_path)
        config = write_config(tmp_path, str(other), ["fwd"], ["fwd"])
        done = subprocess.run(  # another process, as an operator runs it (`serve` would not return otherwise)
            [sys.executable, "-m", "receiver.cli", command, "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 2
        (line,) = done.stderr.splitlines()
        assert f"cannot open the journal {other}: the file is not a log-bridge journal" in line
        assert_untouched(other)


class TestUnusableJournal:
    """A journal the commands cannot use is one line naming it and why, exit 2, never a traceback."""

    @pytest.mark.parametrize("command", [["dlq", "list"], ["dlq", "replay"], ["dlq", "purge", "--all"], ["drain"]])
    def test_a_file_that_is_not_a_journal_is_one_line(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
    ) -> None:
        journal = tmp_path / "j.db"
        journal.write_bytes(b"not a database, something else entirely\n" * 100)
        config = write_config(tmp_path, str(journal), ["fwd"], ["fwd"])
        assert main([*command, "--config", str(config)]) == 2
        captured = capsys.readouterr()
        (line,) = captured.err.splitlines()
        assert line.startswith(f"log-bridge {command[0]}") and f"journal {journal}" in line
        assert "not a log-bridge journal or is damaged" in line and captured.out == ""

    @pytest.mark.parametrize("command", [["dlq", "list"], ["dlq", "replay"], ["dlq", "purge", "--all"], ["drain"]])
    def test_a_journal_of_a_newer_layout_is_refused_and_left_as_it_is(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
    ) -> None:
        """Was a defect: a journal a later version wrote (a downgrade) was opened as this version's, its tables
        changed to this version's, and what that version keeps elsewhere passed over in silence."""
        journal = tmp_path / "j.db"

        async def make() -> None:
            await (await opened(journal)).close()

        asyncio.run(make())
        conn = sqlite3.connect(journal)
        conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('layout', ?)", (LAYOUT + 1,))
        conn.execute("DROP TABLE replays")  # what this version would create again
        conn.commit()
        conn.close()
        config = write_config(tmp_path, str(journal), ["fwd"], ["fwd"])
        assert main([*command, "--config", str(config)]) == 2
        captured = capsys.readouterr()
        (line,) = captured.err.splitlines()
        assert line.startswith(f"log-bridge {command[0]}") and f"journal {journal}" in line
        assert f"written by a later version of log-bridge (journal layout {LAYOUT + 1}" in line
        conn = sqlite3.connect(journal)
        try:
            assert conn.execute("SELECT name FROM sqlite_master WHERE name = 'replays'").fetchone() is None
        finally:
            conn.close()

    @pytest.mark.parametrize("command", [["dlq", "list"], ["dlq", "purge", "--all", "--yes"], ["drain"]])
    def test_a_journal_on_a_read_only_file_system_says_so(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
    ) -> None:
        """Was a defect: the dlq commands said "permission denied … make them its own, or writable by it" of a
        journal on a file system mounted read-only, which no chmod or chown changes."""
        with small_disk(tmp_path / "disk", "8m") as disk:
            journal = disk / "j.db"

            async def make() -> None:
                await (await opened(journal)).close()

            asyncio.run(make())
            subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
            config = write_config(tmp_path, str(journal), ["fwd"], ["fwd"])
            assert main([*command, "--config", str(config)]) == 2
            captured = capsys.readouterr()
            (line,) = captured.err.splitlines()
            assert f"journal {journal}" in line and f"the file system holding {disk} is mounted read-only" in line

    async def test_drain_on_a_journal_a_service_serves_from_is_one_line(
        self, tmp_path: Path, start_service: StartService, capsys: pytest.CaptureFixture[str]
    ) -> None:
        service = await start_service()
        config = write_config(tmp_path, str(service.config.journal.path), ["mem"], ["mem"], name="cli.yaml")
        drained = await asyncio.create_subprocess_exec(  # another process, as an operator runs it
            *[sys.executable, "-m", "receiver.cli", "drain", "--config", str(config), "--timeout", "1"],
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await drained.communicate()
        assert drained.returncode == 2, out + err
        (line,) = err.decode().splitlines()
        assert line.startswith("log-bridge drain: cannot start:") and "another log-bridge process" in line
