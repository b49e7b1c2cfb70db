"""Reload: a new configuration applied to a running service (streams, secrets, sinks, TLS), an invalid one
refused with the old kept, and what needs a restart reported; under load, no request fails and no event is lost."""

from __future__ import annotations

import asyncio
import datetime
import logging
import socket
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import trustme
import yaml

from receiver.config import parse_config
from receiver.reload import plan_reload
from receiver.samples import encode_body, sample_wrappers
from receiver.server import HANDSHAKE_FAILURES, Service, handshake_failure, tls_files_stamp
from tests.conftest import BASE_CONFIG, ORGANIZATION, TOKEN, merge, scrape
from tests.workos_fake import API_KEY, FakeWorkOS

NEW_TOKEN = "Bearer rotated-secret-9876543210"


class ConfigFile:
    """A configuration file a service was started from, rewritten by the test."""

    def __init__(self, tmp_path: Path, tree: dict[str, Any]) -> None:
        self.path = tmp_path / "config.yaml"
        self.tree = merge(tree, {"journal": {"path": str(tmp_path / "journal.db")}})
        self.write(self.tree)

    def write(self, tree: dict[str, Any]) -> None:
        self.tree = tree
        self.path.write_text(yaml.safe_dump(tree))

    def change(self, changes: dict[str, Any]) -> None:
        self.write(merge(self.tree, changes))


@pytest.fixture
async def running(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A service started from a configuration file it reloads; stopped at the end."""
    services: list[Service] = []

    async def start(tree: dict[str, Any] | None = None) -> tuple[Service, ConfigFile]:
        file = ConfigFile(tmp_path, tree or BASE_CONFIG)
        service = Service(parse_config(yaml.safe_load(file.path.read_text()), {}), path=str(file.path))
        await service.start()
        services.append(service)
        return service, file

    yield start
    for service in services:
        if not service.state.draining:
            await service.stop()


async def post(
    session: aiohttp.ClientSession, url: str, count: int = 3, token: str = TOKEN, **kwargs: Any
) -> tuple[int, bytes]:
    body, content_type = encode_body(sample_wrappers(count), "json")
    async with session.post(
        url, data=body, headers={"Authorization": token, "Content-Type": content_type}, **kwargs
    ) as r:
        return r.status, await r.read()


def reloads(service: Service, result: str) -> float:
    return service.metrics.reloads.labels(result)._value.get()


class TestPlan:
    def test_restart_only_settings_are_kept_and_named(self) -> None:
        old = parse_config(BASE_CONFIG, {})
        new = parse_config(
            merge(BASE_CONFIG, {"server": {"port": 9999, "header_timeout": "3s", "body_timeout": "7s"}}), {}
        )
        plan = plan_reload(old, new)
        assert plan.needs_restart == ["server.port", "server.header_timeout"]
        assert (plan.config.server.port, plan.config.server.header_timeout) == (0, 10.0)
        assert plan.config.server.body_timeout == 7.0  # applies at once

    def test_the_admin_listener_changes_with_a_restart(self) -> None:
        old = parse_config(merge(BASE_CONFIG, {"server": {"admin": {"port": 9090}}}), {})
        for admin in ({"port": 9091}, None):
            new = parse_config(merge(BASE_CONFIG, {"server": {"admin": admin}}), {})
            plan = plan_reload(old, new)
            assert plan.needs_restart == ["server.admin"]
            assert plan.config.server.admin is not None and plan.config.server.admin.port == 9090

    def test_sinks_added_removed_changed(self) -> None:
        tree = merge(BASE_CONFIG, {"sinks": {"other": {"type": "memory"}}})
        tree["streams"] = [{**tree["streams"][0], "sinks": ["mem", "other"]}]
        old = parse_config(tree, {})
        changed = merge(tree, {"sinks": {"mem": {"batch": {"max_events": 7}}, "third": {"type": "memory"}}})
        changed["streams"] = [{**tree["streams"][0], "sinks": ["mem", "third"]}]
        plan = plan_reload(old, parse_config(changed, {}))
        assert plan.sinks == {"added": ["third"], "removed": ["other"], "changed": ["mem"]}
        assert plan.sinks_to_build == ["mem", "third"]  # new or changed, in file order
        assert plan.streams["changed"] == ["workos"]


class TestReload:
    async def test_secret_rotation_by_reload(self, running, client: aiohttp.ClientSession) -> None:
        service, file = await running()
        url = service.url + "/workos"
        assert (await post(client, url, token=NEW_TOKEN))[0] == 401
        # Rotation: both values accepted for a while, then the old one removed.
        file.change({"streams": [{**BASE_CONFIG["streams"][0], "auth": {"values": [TOKEN, NEW_TOKEN]}}]})
        assert await service.reload()
        assert (await post(client, url, token=NEW_TOKEN))[0] == 200
        assert (await post(client, url, token=TOKEN))[0] == 200
        file.change({"streams": [{**BASE_CONFIG["streams"][0], "auth": {"values": [NEW_TOKEN]}}]})
        assert await service.reload()
        assert (await post(client, url, token=TOKEN))[0] == 401
        assert (await post(client, url, token=NEW_TOKEN))[0] == 200
        assert reloads(service, "success") == 2

    async def test_an_invalid_configuration_changes_nothing(
        self, running, client: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
    ) -> None:
        service, file = await running()
        file.change({"server": {"header_timeout": 0}, "streams": [{"name": "x", "path": "/x", "sinks": ["nope"]}]})
        assert not await service.reload()
        problems = next(r for r in caplog.records if r.getMessage().startswith("reload refused")).problems
        assert "server.header_timeout: must be more than 0 (0 would turn this protection off)" in problems
        assert any(p.startswith("streams[0].sinks[0]: sink 'nope' is not defined") for p in problems)
        assert (await post(client, service.url + "/workos"))[0] == 200  # the old stream still serves
        file.path.write_text("streams: [unclosed")
        assert not await service.reload()
        assert reloads(service, "failure") == 2
        assert reloads(service, "success") == 0
        text = (await (await client.get(service.url + "/metrics")).read()).decode()
        assert scrape(text, "log_bridge_config_reloads_total", result="failure") == 2

    async def test_streams_added_removed_and_sinks_rebuilt(self, running, client: aiohttp.ClientSession) -> None:
        service, file = await running()
        assert (await post(client, service.url + "/workos", 2))[0] == 200
        tree = merge(file.tree, {"sinks": {"second": {"type": "memory", "batch": {"max_wait": "50ms"}}}})
        tree["streams"] = [{"name": "other", "path": "/other", "auth": {"values": [TOKEN]}, "sinks": ["second"]}]
        file.write(tree)
        assert await service.reload()
        assert (await post(client, service.url + "/workos"))[0] == 404
        assert (await post(client, service.url + "/other", 4))[0] == 200
        second = service.engine.runners["second"].sink  # type: ignore[union-attr]
        await wait_for(lambda: len(second.events) == 4)  # type: ignore[attr-defined]
        assert "mem" not in service.engine.runners  # type: ignore[union-attr]
        # The cursor is committed after the sink has taken the batch: wait for that commit, then read it back.
        runner = service.engine.runners["second"]  # type: ignore[union-attr]
        await wait_for(lambda: runner.cursor == service.journal.last_seq)
        cursors = await service.journal.cursors(["mem", "second"])
        assert cursors == {"mem": 0, "second": service.journal.last_seq}

    async def test_a_reload_moves_the_room_readiness_waits_for_after_a_full_disk(self, running) -> None:
        from receiver.journal import PROBE_ROOM

        service, file = await running(merge(BASE_CONFIG, {"server": {"max_body_bytes": "1MiB"}}))
        assert service.journal.room == 2 * 1024 * 1024 + PROBE_ROOM
        file.write(merge(file.tree, {"server": {"max_body_bytes": "8MiB"}}))
        assert await service.reload()
        assert service.journal.room == 16 * 1024 * 1024 + PROBE_ROOM  # the largest request's record, as now

    async def test_a_new_sink_starts_at_the_journal_end(self, running, client: aiohttp.ClientSession) -> None:
        service, file = await running(merge(BASE_CONFIG, {"sinks": {"mem": {"fail": "retry"}}}))
        assert (await post(client, service.url + "/workos", 5))[0] == 200
        tree = merge(file.tree, {"sinks": {"late": {"type": "memory", "batch": {"max_wait": "50ms"}}}})
        tree["streams"] = [{**tree["streams"][0], "sinks": ["mem", "late"]}]
        file.write(tree)
        assert await service.reload()
        assert (await post(client, service.url + "/workos", 2))[0] == 200
        late = service.engine.runners["late"].sink  # type: ignore[union-attr]
        await wait_for(lambda: len(late.events) == 2)  # type: ignore[attr-defined]
        await asyncio.sleep(0.2)
        assert len(late.events) == 2  # type: ignore[attr-defined]  # not the 5 from before it was added
        await wait_for(lambda: service.engine.runners["mem"].owed() == 7)  # type: ignore[union-attr]  # still owed

    async def test_reload_under_load_fails_no_request_and_loses_no_event(self, running, tmp_path: Path) -> None:
        out = tmp_path / "out"
        tree = merge(BASE_CONFIG, {"sinks": {"mem": {"type": "file", "path": str(out / "events.ndjson")}}})
        tree["sinks"]["mem"].pop("retry")
        service, file = await running(tree)
        url = service.url + "/workos"
        statuses: list[int] = []
        acknowledged: list[str] = []
        stop = asyncio.Event()

        async def sender() -> None:
            async with aiohttp.ClientSession() as session:
                while not stop.is_set():
                    wrappers = sample_wrappers(10)
                    body, content_type = encode_body(wrappers, "json")
                    headers = {"Authorization": TOKEN, "Content-Type": content_type}
                    async with session.post(url, data=body, headers=headers) as response:
                        statuses.append(response.status)
                        if response.status == 200:
                            acknowledged.extend(w["keySuffix"] for w in wrappers)

        senders = [asyncio.create_task(sender()) for _ in range(4)]
        for round_ in range(6):
            await asyncio.sleep(0.15)
            values = [TOKEN, f"Bearer extra-{round_}-secret"]
            file.change({"streams": [{**BASE_CONFIG["streams"][0], "auth": {"values": values}}]})
            file.change({"sinks": {"mem": {"batch": {"max_events": 50 + round_}}}})  # the sink is rebuilt
            assert await service.reload()
        stop.set()
        await asyncio.gather(*senders)
        await wait_for(lambda: service.engine.runners["mem"].owed() == 0)  # type: ignore[union-attr]
        delivered = {orjson.loads(line)["keySuffix"] for line in (out / "events.ndjson").read_bytes().splitlines()}
        failed = [s for s in statuses if s != 200]
        lost = len(set(acknowledged) - delivered)
        print(f"reload under load: {len(statuses)} requests, {len(failed)} not 200, {len(acknowledged)} acknowledged")
        print(f"events lost: {lost}")
        assert failed == []
        assert len(acknowledged) >= 100
        assert set(acknowledged) <= delivered  # rebuilt six times, the sink still got every acknowledged event

    async def test_removed_streams_and_sinks_leave_no_series(self, running, client: aiohttp.ClientSession) -> None:
        # A process reloaded for months (streams added per organisation, sinks renamed) must not export the
        # series of every stream and sink it ever had: /metrics would grow with each reload, for ever.
        service, file = await running()

        def series() -> int:
            return sum(len(family.samples) for family in service.metrics.registry.collect())

        counts = []
        for n in range(4):
            sink, stream = f"mem{n}", {"name": f"s{n}", "path": f"/s{n}", "auth": {"values": [TOKEN]}}
            tree = merge(BASE_CONFIG, {"journal": file.tree["journal"], "sinks": {sink: BASE_CONFIG["sinks"]["mem"]}})
            tree["streams"].append({**stream, "sinks": [sink]})
            file.write(tree)
            assert await service.reload()
            assert (await post(client, service.url + f"/s{n}", 2))[0] == 200
            assert (await post(client, service.url + f"/s{n}", 2, token=NEW_TOKEN))[0] == 401
            await wait_for(lambda n=n: service.engine.runners[f"mem{n}"].owed() == 0)  # type: ignore[union-attr]
            counts.append(series())
        assert counts == [counts[0]] * 4, counts
        text = service.metrics.render().decode()
        assert 'stream="s0"' not in text and 'sink="mem0"' not in text
        assert scrape(text, "log_bridge_sink_events_delivered_total", sink="mem3") == 2
        assert scrape(text, "log_bridge_requests_refused_total", stream="s3", reason="unauthorised") == 1


async def wait_for(condition: Any, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


class TestCertificateRotation:
    @staticmethod
    def pair(tmp_path: Path, ca: trustme.CA, name: str, **validity: datetime.datetime) -> tuple[Path, Path]:
        issued = ca.issue_cert("127.0.0.1", "localhost", common_name=name, **validity)
        cert, key = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
        issued.cert_chain_pems[0].write_to_path(str(cert))
        issued.private_key_pem.write_to_path(str(key))
        return cert, key

    @staticmethod
    async def served_name(port: int, ca: trustme.CA) -> str:
        context = ssl.create_default_context()
        ca.configure_trust(context)
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
        peer = writer.get_extra_info("peercert")
        writer.close()
        return dict(item[0] for item in peer["subject"])["commonName"]

    @classmethod
    async def comes_to_serve(cls, port: int, ca: trustme.CA, name: str) -> None:
        """Within 10 s, new connections are served the certificate named `name`."""
        deadline = asyncio.get_running_loop().time() + 10
        while await cls.served_name(port, ca) != name:
            assert asyncio.get_running_loop().time() < deadline, f"{name} not served in time"
            await asyncio.sleep(0.05)

    async def test_a_client_sees_the_new_certificate(self, running, tmp_path: Path) -> None:
        ca = trustme.CA()
        cert, key = self.pair(tmp_path, ca, "first")
        service, file = await running(
            merge(BASE_CONFIG, {"server": {"tls": {"cert_file": str(cert), "key_file": str(key)}}})
        )
        assert await self.served_name(service.port, ca) == "first"
        context = ssl.create_default_context()
        ca.configure_trust(context)
        async with aiohttp.ClientSession() as session:
            kept = await session.get(service.url + "/healthz", ssl=context)  # a connection open across the reload
            cert2, key2 = self.pair(tmp_path, ca, "second")
            file.change({"server": {"tls": {"cert_file": str(cert2), "key_file": str(key2)}}})
            assert await service.reload()
            assert await self.served_name(service.port, ca) == "second"
            again = await session.get(service.url + "/healthz", ssl=context)
            assert (kept.status, again.status) == (200, 200)
            # A pair that does not load is refused; the second stays in use.
            (tmp_path / "broken.key").write_text("not a key")
            file.change({"server": {"tls": {"cert_file": str(cert2), "key_file": str(tmp_path / "broken.key")}}})
            assert not await service.reload()
            assert await self.served_name(service.port, ca) == "second"

    async def test_a_certificate_out_of_its_validity_is_refused(
        self, running, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        # A renewal that went wrong (an old certificate copied back, a clock far off): every new handshake would
        # fail at WorkOS. The reload is refused, the certificate in use stays, and the failure is counted.
        ca = trustme.CA()
        cert, key = self.pair(tmp_path, ca, "first")
        service, file = await running(
            merge(BASE_CONFIG, {"server": {"tls": {"cert_file": str(cert), "key_file": str(key)}}})
        )
        now = datetime.datetime.now(datetime.UTC)
        day = datetime.timedelta(days=1)
        expired = self.pair(tmp_path, ca, "expired", not_before=now - 30 * day, not_after=now - day)
        early = self.pair(tmp_path, ca, "early", not_before=now + day, not_after=now + 30 * day)
        for (cert2, key2), problem in ((expired, "expired on"), (early, "not valid before")):
            caplog.clear()
            file.change({"server": {"tls": {"cert_file": str(cert2), "key_file": str(key2)}}})
            with caplog.at_level(logging.ERROR, logger="receiver.server"):
                assert not await service.reload()
            assert await self.served_name(service.port, ca) == "first"
            refused = [r for r in caplog.records if r.getMessage().startswith("reload refused")]
            assert len(refused) == 1
            assert any(problem in text for text in refused[0].problems)  # type: ignore[attr-defined]
        assert reloads(service, "failure") == 2
        assert reloads(service, "success") == 0

    async def test_a_start_with_an_expired_certificate_says_so_and_serves(
        self, running, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        ca = trustme.CA()
        now = datetime.datetime.now(datetime.UTC)
        day = datetime.timedelta(days=1)
        cert, key = self.pair(tmp_path, ca, "expired", not_before=now - 30 * day, not_after=now - day)
        with caplog.at_level(logging.ERROR, logger="receiver.server"):
            service, file = await running(
                merge(BASE_CONFIG, {"server": {"tls": {"cert_file": str(cert), "key_file": str(key)}}})
            )
        [line] = [r for r in caplog.records if r.getMessage().startswith("TLS certificate unusable")]
        assert "expired on" in line.problem  # type: ignore[attr-defined]
        # Keeping it is no worse than the one in use: a reload for something else is applied, and says so again.
        caplog.clear()
        file.change({"server": {"max_connections": 100}})
        with caplog.at_level(logging.ERROR, logger="receiver.server"):
            assert await service.reload()
        assert [r.getMessage() for r in caplog.records] == [
            "TLS certificate unusable: clients will refuse every handshake"
        ]
        # A renewed pair is taken by the next reload.
        cert2, key2 = self.pair(tmp_path, ca, "renewed")
        file.change({"server": {"tls": {"cert_file": str(cert2), "key_file": str(key2)}}})
        assert await service.reload()
        assert await self.served_name(service.port, ca) == "renewed"

    @staticmethod
    def secret_volume(tmp_path: Path, ca: trustme.CA, name: str, **validity: datetime.datetime) -> tuple[Path, Path]:
        """A Kubernetes Secret as the kubelet mounts and updates it: tls.crt and tls.key link through `..data` to
        a directory of the version; `..data` is swapped to update them (call again with another name)."""
        volume = tmp_path / "secret"
        version = volume / f"..{name}"
        version.mkdir(parents=True)
        cert, key = TestCertificateRotation.pair(version, ca, name, **validity)
        cert.rename(version / "tls.crt")
        key.rename(version / "tls.key")
        (volume / "..data_tmp").symlink_to(version.name)
        (volume / "..data_tmp").rename(volume / "..data")
        for file in ("tls.crt", "tls.key"):
            if not (volume / file).is_symlink():
                (volume / file).symlink_to(f"..data/{file}")
        return volume / "tls.crt", volume / "tls.key"

    async def test_a_certificate_renewed_on_disk_is_taken_without_a_reload(
        self, running, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
    ) -> None:
        # Was a defect: a certificate renewed in its files (cert-manager updating the mounted Secret) stayed unused
        # until a SIGHUP, which nothing sent: the old one was served until it expired.
        monkeypatch.setattr("receiver.server.TLS_WATCH_INTERVAL", 0.05)
        ca = trustme.CA()
        cert, key = self.secret_volume(tmp_path, ca, "first")
        service, _ = await running(
            merge(BASE_CONFIG, {"server": {"tls": {"cert_file": str(cert), "key_file": str(key)}}})
        )
        assert await self.served_name(service.port, ca) == "first"
        not_after = datetime.datetime.now(datetime.UTC).replace(microsecond=0) + datetime.timedelta(days=90)
        with caplog.at_level(logging.INFO, logger="receiver.server"):
            self.secret_volume(tmp_path, ca, "renewed", not_after=not_after)
            await self.comes_to_serve(service.port, ca, "renewed")
        assert reloads(service, "success") == 1 and reloads(service, "failure") == 0
        assert [r.getMessage() for r in caplog.records if "TLS files" in r.getMessage()] == [
            "TLS files changed: the new certificate is in use"
        ]
        async with aiohttp.ClientSession() as session:
            context = ssl.create_default_context()
            ca.configure_trust(context)
            async with session.get(service.url + "/metrics", ssl=context) as answer:
                text = await answer.text()
        expiry = scrape(text, "log_bridge_tls_certificate_expiry_timestamp_seconds")
        assert expiry == not_after.timestamp()

    async def test_a_pair_that_cannot_be_used_is_tried_again_only_once_it_changes(
        self, running, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
    ) -> None:
        monkeypatch.setattr("receiver.server.TLS_WATCH_INTERVAL", 0.05)
        ca = trustme.CA()
        cert, key = self.pair(tmp_path, ca, "first")
        service, _ = await running(
            merge(BASE_CONFIG, {"server": {"tls": {"cert_file": str(cert), "key_file": str(key)}}})
        )
        second_cert, second_key = self.pair(tmp_path, ca, "second")
        with caplog.at_level(logging.ERROR, logger="receiver.server"):
            cert.write_bytes(second_cert.read_bytes())  # the certificate rewritten in place, its key not yet
            await asyncio.sleep(1.0)  # 20 looks
            assert await self.served_name(service.port, ca) == "first"
            assert reloads(service, "failure") == 1  # once for these files, not once a look
            [refused] = [r for r in caplog.records if r.getMessage().startswith("TLS files changed")]
            assert "cannot be used" in refused.getMessage()
            key.write_bytes(second_key.read_bytes())
            await self.comes_to_serve(service.port, ca, "second")
        assert (reloads(service, "failure"), reloads(service, "success")) == (1, 1)

    async def test_a_certificate_not_valid_yet_is_taken_once_it_is(
        self, running, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # Was a defect: a renewed certificate whose notBefore was still ahead (an issuer that does not backdate, a
        # clock a little behind its) was refused, rightly, but never tried again: it stayed unused until the files
        # changed again or a SIGHUP, while the one in use went on towards its expiry.
        monkeypatch.setattr("receiver.server.TLS_WATCH_INTERVAL", 0.05)
        ca = trustme.CA()
        cert, key = self.secret_volume(tmp_path, ca, "first")
        service, _ = await running(
            merge(BASE_CONFIG, {"server": {"tls": {"cert_file": str(cert), "key_file": str(key)}}})
        )
        now = datetime.datetime.now(datetime.UTC)
        self.secret_volume(tmp_path, ca, "early", not_before=now + datetime.timedelta(seconds=4))
        await wait_for(lambda: reloads(service, "failure") == 1)
        assert await self.served_name(service.port, ca) == "first"
        await self.comes_to_serve(service.port, ca, "early")
        assert (reloads(service, "failure"), reloads(service, "success")) == (1, 1)

    async def test_the_expiry_is_read_from_a_file_with_text_that_is_not_ascii(
        self, running, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        # Was a defect: the "Bag Attributes" `openssl pkcs12` writes before a certificate carry its friendlyName as
        # it is, "Zürich gateway" say; OpenSSL loads such a file, but the validity was read as ASCII text: the
        # expiry gauge said NaN, and an expired certificate passed for one of unknown validity.
        ca = trustme.CA()
        now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
        cert, key = self.pair(tmp_path, ca, "server", not_after=now + datetime.timedelta(days=30))
        cert.write_bytes("Bag Attributes\n    friendlyName: Zürich gateway\n".encode() + cert.read_bytes())
        service, file = await running(
            merge(BASE_CONFIG, {"server": {"tls": {"cert_file": str(cert), "key_file": str(key)}}})
        )
        async with aiohttp.ClientSession() as session:
            context = ssl.create_default_context()
            ca.configure_trust(context)
            async with session.get(service.url + "/metrics", ssl=context) as answer:
                text = await answer.text()
        expiry = scrape(text, "log_bridge_tls_certificate_expiry_timestamp_seconds")
        assert expiry == (now + datetime.timedelta(days=30)).timestamp()
        day = datetime.timedelta(days=1)
        expired, expired_key = self.pair(tmp_path, ca, "expired", not_before=now - 9 * day, not_after=now - day)
        expired.write_bytes("Bag Attributes\n    friendlyName: Zürich gateway\n".encode() + expired.read_bytes())
        file.change({"server": {"tls": {"cert_file": str(expired), "key_file": str(expired_key)}}})
        with caplog.at_level(logging.ERROR, logger="receiver.server"):
            assert not await service.reload()
        [refused] = [r for r in caplog.records if r.getMessage().startswith("reload refused")]
        assert any("expired on" in text for text in refused.problems)  # type: ignore[attr-defined]
        assert await self.served_name(service.port, ca) == "server"

    def test_a_chmod_or_chown_is_a_change_of_the_files(self, tmp_path: Path) -> None:
        # Was a defect: a renewed key the service could not read (a root-owned 0600 file) was refused and not tried
        # again until the files changed, and the `chmod` or `chown` that makes it readable leaves its inode, size
        # and modification time as they were: the renewed pair stayed unused until a SIGHUP.
        ca = trustme.CA()
        cert, key = self.pair(tmp_path, ca, "server")
        config = parse_config(
            merge(BASE_CONFIG, {"server": {"tls": {"cert_file": str(cert), "key_file": str(key)}}}), {}
        )
        assert config.server.tls is not None
        key.chmod(0o600)
        refused = tls_files_stamp(config.server.tls)
        key.chmod(0o644)
        assert tls_files_stamp(config.server.tls) != refused

    @staticmethod
    def tls_post(
        port: int, context: ssl.SSLContext, sni: str, session: ssl.SSLSession | None
    ) -> tuple[bytes, bool, ssl.SSLSession | None]:
        """A POST over a new TLS connection offering `session`: the answer's first bytes (b"" when refused),
        whether the session was resumed, and the session to offer next time."""
        request = (
            b"POST /workos HTTP/1.1\r\nHost: x\r\nAuthorization: %s\r\nContent-Length: 2\r\n\r\n[]" % TOKEN.encode()
        )
        try:
            with context.wrap_socket(
                socket.create_connection(("127.0.0.1", port), timeout=5), server_hostname=sni, session=session
            ) as conn:
                conn.sendall(request)
                return conn.recv(12), conn.session_reused, conn.session
        except (OSError, ssl.SSLError):
            return b"", False, None

    @pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
    @pytest.mark.parametrize("sni", ["127.0.0.1", "localhost"])  # no SNI sent for an address; one for a name
    async def test_a_client_ca_removed_by_a_reload_lets_no_resumed_session_in(
        self, running, tmp_path: Path, version: ssl.TLSVersion, sni: str
    ) -> None:
        # A resumed TLS session skips the client certificate check: sessions from before the reload would let
        # the clients of a CA the reload stopped trusting (one compromised, say) in for hours.
        ca, old, new = trustme.CA(), trustme.CA(), trustme.CA()
        cert, key = self.pair(tmp_path, ca, "server")
        old.cert_pem.write_to_path(str(tmp_path / "clients.pem"))
        tls = {"cert_file": str(cert), "key_file": str(key), "client_ca_file": str(tmp_path / "clients.pem")}
        service, file = await running(merge(BASE_CONFIG, {"server": {"tls": tls}}))
        context = ssl.create_default_context()
        ca.configure_trust(context)
        context.maximum_version = version
        old.issue_cert("old-client").configure_cert(context)
        answer, _, session = await asyncio.to_thread(self.tls_post, service.port, context, sni, None)
        assert answer == b"HTTP/1.1 200"
        answer, _, session = await asyncio.to_thread(self.tls_post, service.port, context, sni, session)
        assert answer == b"HTTP/1.1 200"
        new.cert_pem.write_to_path(str(tmp_path / "clients.pem"))  # the old CA is no longer trusted
        file.change({"server": {"tls": {"client_ca_file": str(tmp_path / "clients.pem")}}})
        assert await service.reload()
        assert (await asyncio.to_thread(self.tls_post, service.port, context, sni, None))[0] == b""
        answer, resumed, _ = await asyncio.to_thread(self.tls_post, service.port, context, sni, session)
        assert (answer, resumed) == (b"", False)


class TestHandshakeFailures:
    """A failed TLS handshake is counted by kind, and a client refusing the server's certificate (what WorkOS does
    with an incomplete chain or a name the certificate was not issued for) is logged: asyncio keeps them all to its
    debug mode, so before, a stream broken that way left nothing in the log or the metrics."""

    @staticmethod
    def handshake(port: int, context: ssl.SSLContext, name: str) -> str:
        """A TLS handshake as an OpenSSL client makes it (one that tells the server why it refuses, unlike
        asyncio's); what the client made of it."""
        try:
            with context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=5), server_hostname=name):
                return "connected"
        except ssl.SSLCertVerificationError:
            return "refused"
        except (OSError, ssl.SSLError):
            return "failed"

    @staticmethod
    def failures(service: Service) -> dict[str, float]:
        counter = service.metrics.tls_handshake_failures
        return {kind: counter.labels(kind)._value.get() for kind in HANDSHAKE_FAILURES}

    async def test_each_kind_is_counted_and_a_refused_certificate_is_logged(
        self, running, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        ca, other = trustme.CA(), trustme.CA()
        cert, key = TestCertificateRotation.pair(tmp_path, ca, "server")
        service, _ = await running(
            merge(BASE_CONFIG, {"server": {"tls": {"cert_file": str(cert), "key_file": str(key)}}})
        )
        trusting, untrusting = ssl.create_default_context(), ssl.create_default_context()
        ca.configure_trust(trusting)
        other.configure_trust(untrusting)
        with caplog.at_level(logging.WARNING, logger="receiver"):
            assert await asyncio.to_thread(self.handshake, service.port, untrusting, "localhost") == "refused"
            assert await asyncio.to_thread(self.handshake, service.port, trusting, "wrong.example") == "refused"
            assert await asyncio.to_thread(self.handshake, service.port, trusting, "localhost") == "connected"
            _, writer = await asyncio.open_connection("127.0.0.1", service.port)  # plain HTTP to the TLS port
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(0.2)
            writer.close()
        assert self.failures(service) == {
            "certificate_refused": 2,
            "client_certificate": 0,
            "not_tls": 1,
            "no_common_protocol": 0,
            "other": 0,
        }
        refused = [r for r in caplog.records if "refused the server's certificate" in r.getMessage()]
        assert [r.alert for r in refused] == ["unknown ca", "bad certificate"]  # type: ignore[attr-defined]
        async with aiohttp.ClientSession() as session:
            async with session.get(service.url + "/metrics", ssl=trusting) as answer:
                text = await answer.text()
        assert scrape(text, "log_bridge_tls_handshake_failures_total", reason="certificate_refused") == 2

    async def test_a_client_without_its_certificate_under_mutual_tls_is_counted_not_logged(
        self, running, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        ca, clients = trustme.CA(), trustme.CA()
        cert, key = TestCertificateRotation.pair(tmp_path, ca, "server")
        clients.cert_pem.write_to_path(str(tmp_path / "clients.pem"))
        tls = {"cert_file": str(cert), "key_file": str(key), "client_ca_file": str(tmp_path / "clients.pem")}
        service, _ = await running(merge(BASE_CONFIG, {"server": {"tls": tls}}))
        stranger = ssl.create_default_context()
        ca.configure_trust(stranger)
        stranger.maximum_version = ssl.TLSVersion.TLSv1_2  # the client certificate is asked for in the handshake
        trustme.CA().issue_cert("stranger").configure_cert(stranger)
        anonymous = ssl.create_default_context()
        ca.configure_trust(anonymous)
        anonymous.maximum_version = ssl.TLSVersion.TLSv1_2
        with caplog.at_level(logging.DEBUG, logger="receiver"):
            for context in (stranger, anonymous):
                assert await asyncio.to_thread(self.handshake, service.port, context, "localhost") == "failed"
        assert self.failures(service)["client_certificate"] == 2
        assert not [r for r in caplog.records if "handshake" in r.getMessage() or "certificate" in r.getMessage()]

    def test_openssl_reasons_are_sorted_into_a_few_kinds(self) -> None:
        assert handshake_failure("TLSV1_ALERT_UNKNOWN_CA") == "certificate_refused"
        assert handshake_failure("SSLV3_ALERT_CERTIFICATE_EXPIRED") == "certificate_refused"
        assert handshake_failure("WRONG_VERSION_NUMBER") == "not_tls"
        assert handshake_failure("NO_SHARED_CIPHER") == "no_common_protocol"
        assert handshake_failure("SOMETHING_NEW") == handshake_failure(None) == "other"


class TestReloadWithWorkos:
    async def test_the_export_sink_survives_and_the_watch_restarts(
        self, running, workos_fake: FakeWorkOS, tmp_path: Path, client: aiohttp.ClientSession
    ) -> None:
        tree = merge(
            BASE_CONFIG,
            {
                "sinks": {"exports": {"type": "file", "path": str(tmp_path / "exports" / "events.ndjson")}},
                "workos": {
                    "api_key": API_KEY,
                    "base_url": workos_fake.url,
                    "organizations": [ORGANIZATION],
                    "export": {"sinks": ["exports"]},
                },
            },
        )
        service, file = await running(tree)
        first = service.workos
        exports = service.engine.sinks["exports"]  # type: ignore[union-attr]  # no stream feeds it
        file.change({"sinks": {"mem": {"batch": {"max_events": 9}}}})  # the workos section is unchanged
        assert await service.reload()
        assert service.workos is first
        assert service.engine.sinks["exports"] is exports  # type: ignore[union-attr]
        file.change({"workos": {"watch": {"every": "1m"}}})
        assert await service.reload()  # the same metrics are reused: no duplicate series
        assert service.workos is not first and service.workos is not None
        assert service.engine.sinks["exports"] is exports  # type: ignore[union-attr]
        text = (await (await client.get(service.url + "/metrics")).read()).decode()
        assert "log_bridge_workos_stream_state" in text
