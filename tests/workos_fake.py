"""A local fake of the WorkOS API (aiohttp, on 127.0.0.1, in a thread of its own) implementing the documented
shapes the bridge uses, so the real `workos` SDK can be pointed at it through `base_url`:

- `GET /organizations/{id}/audit_log_configuration`: the organization's audit-log state and its log stream
  (any type and state, or none); 404 for an unknown organization.
- `POST /audit_logs/exports` and `GET /audit_logs/exports/{id}`: an export is `pending` for `polls_until_ready`
  polls, then `ready` with a `url` (or `error` when the organization is in `failing_exports`). Its `created_at`
  is the fake's own `clock` (which a test can set apart from the bridge's), and its CSV holds the `events` of its
  range that had occurred by then, as a real export cannot hold events that arrive after it was made. Each
  `get_export` of a ready export hands out a fresh URL; a URL answers once, then 403 (as an expired one would),
  and `expire_next_urls` makes the next URLs answer 403 straight away.
- `GET /downloads/{token}`: the CSV bytes of the export (recorded in `served`).
- `POST /portal/generate_link`: `{link}`.
- 401 for a wrong API key; `fail(kind, status, times, retry_after)` queues 429 (with Retry-After) or 5xx answers;
  `hang_seconds` delays every API answer (timeouts); `misbehave(kind, how)` makes the next answers of a kind a
  200 with an empty body (`empty`), one that trickles a byte every 0.2 s (`trickle`) or one that never ends
  (`endless`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

API_KEY = "sk_test_fake0123456789abcdefABCDEF"
CREATED = "2024-01-01T00:00:00.000Z"


def stream(state: str = "active", type_: str = "GenericHttps", last_synced_at: str | None = None) -> dict[str, Any]:
    """A `log_stream` object."""
    return {
        "id": "als_01HXYZ" + secrets.token_hex(4).upper(),
        "type": type_,
        "state": state,
        "last_synced_at": last_synced_at,
        "created_at": CREATED,
    }


def stamp(epoch: float) -> str:
    """WorkOS's form of a moment: `2024-01-01T00:00:00.000Z`."""
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class Export:
    """One export the fake was asked for."""

    id: str
    organization: str
    range_start: str
    range_end: str
    filters: dict[str, Any]
    created_at: float
    polls: int = 0
    state: str = "pending"
    data: bytes = b""


@dataclass
class FakeWorkOS:
    """The fake's state; tests change it between calls (the server reads it under `lock`)."""

    api_key: str = API_KEY
    organizations: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    """Organization id -> its log stream (None: no stream)."""
    polls_until_ready: int = 2
    failing_exports: set[str] = field(default_factory=set)
    expire_next_urls: int = 0
    exports: dict[str, Export] = field(default_factory=dict)
    clock: Callable[[], float] = time.time
    """WorkOS's clock (the exports' `created_at`)."""
    events: list[tuple[float, str]] = field(default_factory=list)
    """(occurred at, id) of audit events: an export's CSV has a row for each in its range that occurred before it
    was made."""
    served: list[tuple[str, bytes]] = field(default_factory=list)
    """(export id, bytes) of every successful download."""
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)
    """(method, path, Authorization header) of every request."""
    failures: dict[str, list[tuple[int, str | None]]] = field(default_factory=dict)
    misbehaving: dict[str, list[str]] = field(default_factory=dict)
    hang_seconds: float = 0.0
    download_base: str = ""
    """When set, the base of the download URLs handed out (another server than the fake's)."""
    """When set, API requests (not downloads) are answered only after this long (to provoke timeouts)."""
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""
    _tokens: dict[str, str] = field(default_factory=dict)
    _numbers: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def fail(self, kind: str, status: int, times: int = 1, retry_after: str | None = None) -> None:
        """Answer the next `times` requests of `kind` (configuration, create_export, get_export, download,
        portal) with `status`."""
        with self.lock:
            self.failures.setdefault(kind, []).extend([(status, retry_after)] * times)

    def misbehave(self, kind: str, how: str, times: int = 1) -> None:
        """Answer the next `times` requests of `kind` with a broken 200: `empty`, `trickle` or `endless`."""
        with self.lock:
            self.misbehaving.setdefault(kind, []).extend([how] * times)

    def count(self, method: str, prefix: str) -> int:
        """How many requests matched."""
        with self.lock:
            return sum(1 for m, path, _ in self.requests if m == method and path.startswith(prefix))

    def csv_for(self, export: Export) -> bytes:
        """The CSV of an export: a header and rows that name the range (unique per export)."""
        rows = [b'"id","action","occurred_at","actor","targets","context"']
        for index in range(3):
            rows.append(
                f'"01HX{export.id[-8:]}{index}","user.signed_in","{export.range_start}","user_{index}",'
                f'"[{{""type"":""team""}}]","{export.organization} {export.range_end} \u00e9"'.encode()
            )
        start, end = (datetime.fromisoformat(export.range_start), datetime.fromisoformat(export.range_end))
        for occurred, event_id in sorted(self.events):
            if start.timestamp() <= occurred < end.timestamp() and occurred <= export.created_at:
                rows.append(f'"{event_id}","user.signed_in","{stamp(occurred)}","user","[]",""'.encode())
        return b"\r\n".join(rows) + b"\r\n"

    # --- the server ---

    def _failure(self, kind: str) -> web.Response | None:
        queued = self.failures.get(kind)
        if not queued:
            return None
        status, retry_after = queued.pop(0)
        headers = {"Retry-After": retry_after} if retry_after is not None else {}
        message = "Too many requests" if status == 429 else "Internal server error"
        return web.json_response({"message": message}, status=status, headers=headers)

    async def _broken(self, kind: str, request: web.Request) -> web.StreamResponse | None:
        with self.lock:
            queued = self.misbehaving.get(kind)
            how = queued.pop(0) if queued else None
        if how is None:
            return None
        if how == "empty":
            return web.Response(status=200, body=b"", content_type="application/json")
        response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        await response.prepare(request)
        await response.write(b'{"organization_id": "')
        with contextlib.suppress(ConnectionError):
            while True:  # until the client goes away
                if how == "trickle":
                    await asyncio.sleep(0.2)
                    await response.write(b"x")
                else:
                    await response.write(b"x" * 65536)
        return response

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        with self.lock:
            self.requests.append((request.method, request.path, request.headers.get("Authorization")))
        if not request.path.startswith("/downloads/"):
            if self.hang_seconds:
                await asyncio.sleep(self.hang_seconds)
            if request.headers.get("Authorization") != f"Bearer {self.api_key}":
                return web.json_response(
                    {"message": "Could not authorize the request. Maybe your API key is invalid?"}, status=401
                )
        response: web.StreamResponse = await handler(request)
        return response

    async def _configuration(self, request: web.Request) -> web.StreamResponse:
        if (broken := await self._broken("configuration", request)) is not None:
            return broken
        organization = request.match_info["id"]
        with self.lock:
            if (failed := self._failure("configuration")) is not None:
                return failed
            if organization not in self.organizations:
                return web.json_response({"message": "Organization not found", "code": "entity_not_found"}, status=404)
            found = self.organizations[organization]
        body: dict[str, Any] = {"organization_id": organization, "retention_period_in_days": 90, "state": "active"}
        if found is not None:
            body["log_stream"] = found
        return web.json_response(body)

    def _export_body(self, export: Export, request: web.Request) -> dict[str, Any]:
        body: dict[str, Any] = {
            "object": "audit_log_export",
            "id": export.id,
            "state": export.state,
            "created_at": stamp(export.created_at),
            "updated_at": stamp(export.created_at),
        }
        if export.state == "ready":
            token = secrets.token_urlsafe(12)
            if self.expire_next_urls:
                self.expire_next_urls -= 1
            else:
                self._tokens[token] = export.id
            body["url"] = f"{self.download_base or self.url}/downloads/{token}?X-Amz-Signature={secrets.token_hex(8)}"
        return body

    async def _create_export(self, request: web.Request) -> web.StreamResponse:
        payload = await request.json()
        if (broken := await self._broken("create_export", request)) is not None:
            return broken
        with self.lock:
            if (failed := self._failure("create_export")) is not None:
                return failed
            organization = payload.get("organization_id")
            if organization not in self.organizations:
                return web.json_response({"message": "Organization not found"}, status=404)
            export = Export(
                id=f"audit_log_export_{next(self._numbers):06d}",
                organization=organization,
                range_start=payload["range_start"],
                range_end=payload["range_end"],
                filters={k: v for k, v in payload.items() if k in ("actions", "actor_names", "targets")},
                created_at=self.clock(),
            )
            export.data = self.csv_for(export)
            self.exports[export.id] = export
            return web.json_response(self._export_body(export, request), status=201)

    async def _get_export(self, request: web.Request) -> web.Response:
        with self.lock:
            if (failed := self._failure("get_export")) is not None:
                return failed
            export = self.exports.get(request.match_info["id"])
            if export is None:
                return web.json_response({"message": "Audit log export not found"}, status=404)
            export.polls += 1
            if export.state == "pending" and export.polls >= self.polls_until_ready:
                export.state = "error" if export.organization in self.failing_exports else "ready"
            return web.json_response(self._export_body(export, request))

    async def _download(self, request: web.Request) -> web.Response:
        with self.lock:
            if (failed := self._failure("download")) is not None:
                return failed
            export_id = self._tokens.pop(request.match_info["token"], None)  # a URL answers once
            if export_id is None:
                return web.Response(
                    status=403,
                    text="<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>",
                    content_type="application/xml",
                )
            data = self.exports[export_id].data
            self.served.append((export_id, data))
        return web.Response(body=data, content_type="text/csv")

    async def _portal(self, request: web.Request) -> web.Response:
        payload = await request.json()
        with self.lock:
            if (failed := self._failure("portal")) is not None:
                return failed
            if payload.get("organization") not in self.organizations:
                return web.json_response({"message": "Organization not found"}, status=404)
        if payload.get("intent") not in ("sso", "dsync", "audit_logs", "log_streams", "domain_verification"):
            return web.json_response({"message": "Invalid intent", "code": "invalid_intent"}, status=422)
        return web.json_response({"link": f"https://setup.workos.test/portal/launch?secret={secrets.token_hex(8)}"})

    def app(self) -> web.Application:
        """The aiohttp application."""
        app = web.Application(middlewares=[self._middleware])
        app.router.add_get("/organizations/{id}/audit_log_configuration", self._configuration)
        app.router.add_post("/audit_logs/exports", self._create_export)
        app.router.add_get("/audit_logs/exports/{id}", self._get_export)
        app.router.add_get("/downloads/{token}", self._download)
        app.router.add_post("/portal/generate_link", self._portal)
        return app


class FakeWorkOSServer:
    """Runs a FakeWorkOS on 127.0.0.1 in a thread with its own event loop (usable from sync and async tests)."""

    def __init__(self, fake: FakeWorkOS | None = None) -> None:
        self.fake = fake or FakeWorkOS()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fake-workos", daemon=True)
        self._runner: web.AppRunner | None = None

    def start(self) -> FakeWorkOS:
        """Start serving; returns the fake, its `url` set."""
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self.fake

    async def _start(self) -> None:
        self._runner = web.AppRunner(self.fake.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.fake.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        """Stop serving and end the thread."""
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
