"""A full journal disk: delivery recovers by itself once a sink can deliver again (the reserve lets its progress
commit, which frees segments), and dead letters are bounded so that they cannot fill the disk."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import orjson
import pytest

from receiver.samples import encode_body, sample_wrappers
from tests.conftest import TOKEN, StartService
from tests.receiver.test_unattended import small_disk

AUTH = {"Authorization": TOKEN}


def lines_of(path: Path) -> list[bytes]:
    """The events a file sink wrote (none when it wrote nothing)."""
    try:
        return [line for line in path.read_bytes().split(b"\n") if line]
    except (FileNotFoundError, NotADirectoryError):
        return []


class TestRecoveryFromAFullDisk:
    @pytest.mark.parametrize("restart", [False, True], ids=["running", "restarted"])
    async def test_a_repaired_sink_delivers_every_acknowledged_event_without_more_room(
        self, start_service: StartService, tmp_path: Path, restart: bool
    ) -> None:
        """max_bytes far above the disk, the sink broken until the disk fills, then repaired (while the service
        runs, or before it starts again): its progress commits although the disk is full, the segments behind
        it are freed, and everything acknowledged is delivered."""
        out = tmp_path / "out"
        out.write_bytes(b"")  # a plain file where the sink's directory goes: every write fails (retried)
        with small_disk(tmp_path / "disk", "12m") as disk:
            config = {
                "server": {"max_body_bytes": "256KiB"},
                "journal": {"path": str(disk / "journal.db"), "max_bytes": "1GiB"},
                "streams": [{"name": "workos", "path": "/workos", "auth": {"values": [TOKEN]}, "sinks": ["file"]}],
                "sinks": {
                    "file": {
                        "type": "file",
                        "path": str(out / "events.log"),
                        "batch": {"max_wait": "50ms", "max_events": 500},
                        "retry": {"initial": "10ms", "max": "100ms"},
                    }
                },
            }
            service = await start_service(config)
            accepted: set[bytes] = set()
            async with aiohttp.ClientSession() as session:
                for _ in range(2000):
                    wrappers = sample_wrappers(100)
                    data, content_type = encode_body(wrappers, "json")
                    headers = {**AUTH, "Content-Type": content_type}
                    async with session.post(service.url + "/workos", data=data, headers=headers) as response:
                        if response.status == 503:
                            break
                        assert response.status == 200, await response.text()
                    accepted.update(orjson.dumps(w["event"]["id"]) for w in wrappers)
                assert response.status == 503, "the disk never filled"
                assert len(accepted) > 5000
                if restart:
                    await service.stop()
                out.unlink()  # the sink is repaired; the disk is still full
                if restart:
                    service = await start_service(config)
                deadline = time.monotonic() + 60
                delivered: set[bytes] = set()
                while time.monotonic() < deadline and not accepted <= delivered:
                    await asyncio.sleep(0.5)
                    delivered = {
                        orjson.dumps(orjson.loads(line)["event"]["id"]) for line in lines_of(out / "events.log")
                    }
                missing = len(accepted - delivered)
                assert not missing, f"{missing} of {len(accepted)} acknowledged events not delivered"
                if not restart:  # progress recorded as it went: nothing sent twice
                    assert len(lines_of(out / "events.log")) == len(accepted)
                logged = await service.journal._read(lambda c: c.execute("SELECT keys FROM dedup_log").fetchall())
                kept = {key for (keys,) in logged for key in orjson.loads(keys)}
                assert len(kept) == len(accepted)  # the delivered records' keys, for a restart's dedup index
                # Room again (the delivered segments are freed): requests are taken and delivered.
                wrappers = sample_wrappers(5)
                data, content_type = encode_body(wrappers, "json")
                for _ in range(100):
                    async with session.post(
                        service.url + "/workos", data=data, headers={**AUTH, "Content-Type": content_type}
                    ) as response:
                        if response.status == 200:
                            break
                    await asyncio.sleep(0.1)
                assert response.status == 200
            await service.stop()
