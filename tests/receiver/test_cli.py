"""The `log-bridge dlq` commands on a real journal: what replay takes and leaves, what list prints, and a journal
that is not where the configuration says."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from receiver.cli import main
from receiver.journal import INTAKE, list_dead_letters
from receiver.parsing import Rejected
from sinks.base import Event
from tests.receiver.test_journal import batch, opened

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


class TestMissingJournal:
    @pytest.mark.parametrize("action", ["list", "replay"])
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
        assert main(["dlq", action, "--config", str(config)]) == 2
        captured = capsys.readouterr()
        assert f"no journal at data/j.db (relative to the working directory: {elsewhere / 'data/j.db'})" in captured.err
        assert captured.out == ""
        assert not (elsewhere / "data").exists()  # nothing created where it is not
        monkeypatch.chdir(served)  # where `serve` ran: found
        assert main(["dlq", action, "--config", str(config)]) == 0
        assert capsys.readouterr().out
