"""The HTTP plumbing the HTTP sinks share: one aiohttp session per sink with its TLS context and timeout, body
compression, the classification of an HTTP status, `Retry-After`, and the scrubbing of secrets from text.

A sink builds one `HttpClient` and calls `post`/`get`: it gets back a `Reply` to read, or a `Verdict` when the
request never got an answer (TLS refused, timeout, connection error), already classified.
"""

from __future__ import annotations

import asyncio
import threading
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import aiohttp
import zstandard

from sinks.fields import Compression, TlsOptions
from sinks.outcome import Verdict

__all__ = ["HttpClient", "Reply", "classify_status", "compress", "header_secrets", "parse_retry_after", "scrub"]

TEXT_LIMIT = 300
"""Longest peer text or error detail kept in a reason."""
REPLY_LIMIT = 1024 * 1024
"""Most bytes of an answer that are read. Sinks classify on the status and a short text (HEC's JSON answers are
well under a kilobyte); the rest of a longer answer is left unread and its connection closed, so a peer that
answers at length cannot hold the process's memory."""
THREAD_BYTES = 64 * 1024
"""Bodies at least this big are compressed in a worker thread (zlib and zstd release the GIL)."""
CONFIG_STATUSES = frozenset({401, 403, 404, 405, 407, 415, 421})
"""Answers a configuration fix cures (credentials, URL, compression): retried, and the sink is unhealthy meanwhile."""
HINTS = {
    401: "check the credentials",
    403: "check the credentials",
    407: "check the credentials",
    415: "check the sink's compression (the endpoint does not take this Content-Encoding or Content-Type)",
}
"""What to change for a configuration problem's status (any other: the URL)."""
SPLIT_STATUSES = frozenset({400, 413})
"""Answers about the request's data: the request is split to find the events at fault."""

_local = threading.local()


def compress(body: bytes, encoding: Compression, level: int | None = None) -> bytes:
    """`body` encoded as `gzip` (level 1 unless given: 12x smaller WorkOS batches at a third of level 6's CPU),
    `zstd` (level 3 unless given) or `none`. Safe to call from any thread."""
    if encoding == "gzip":
        compressor = zlib.compressobj(1 if level is None else level, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        return compressor.compress(body) + compressor.flush()
    if encoding == "zstd":
        key = f"zstd{level}"
        zstd = getattr(_local, key, None)
        if zstd is None:  # a ZstdCompressor is not thread-safe: one per thread and level
            zstd = zstandard.ZstdCompressor(level=3 if level is None else level)
            setattr(_local, key, zstd)
        data: bytes = zstd.compress(body)
        return data
    return body


def scrub(value: object, secrets: Iterable[str], limit: int | None = TEXT_LIMIT) -> str:
    """Text for a reason, message or log line: every secret replaced by `***`, shortened to `limit`."""
    text = str(value) or type(value).__name__
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text if limit is None or len(text) <= limit else text[:limit] + "…"


SCHEMED_HEADERS = frozenset({"authorization", "proxy-authorization"})
"""Headers whose value is `<scheme> <credentials>`."""


def header_secrets(name: str, value: str) -> list[str]:
    """What a credential header's value holds that must never be shown: the value, and for `Authorization`
    (`Bearer <token>`) the credentials alone too, which a peer refusing them may quote without the scheme."""
    if name.lower() in SCHEMED_HEADERS:
        return [value, value.split(" ", 1)[-1]]
    return [value]


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a `Retry-After` header given in seconds (HTTP dates are ignored)."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if 0 <= seconds < 86400 else None


def classify_status(status: int, what: str, retry_after: float | None = None) -> Verdict:
    """2xx delivered; 400/413 refused data (split); 401/403/404/405/407/415/421 and 3xx a configuration problem
    (retried: a credential, URL or compression fix must not cost data); 408/429/5xx retried; any other 4xx
    permanent."""
    if 200 <= status < 300:
        return Verdict.ok()
    if status in SPLIT_STATUSES:
        return Verdict.refused(what)
    if status in CONFIG_STATUSES or 300 <= status < 400:
        hint = HINTS.get(status, "is the url right?")
        return Verdict.retry(f"{what}; {hint}", retry_after, config_problem=True)
    if status in (408, 429) or status >= 500 or status < 200:
        return Verdict.retry(what, retry_after)
    return Verdict.permanent(what)


@dataclass(frozen=True, slots=True)
class Reply:
    """An HTTP answer: status, headers and body."""

    status: int
    headers: Mapping[str, str]
    body: bytes

    @property
    def retry_after(self) -> float | None:
        """The `Retry-After` the peer sent, in seconds."""
        return parse_retry_after(self.headers.get("Retry-After"))


class HttpClient:
    """One sink's HTTP connections to one peer."""

    def __init__(
        self,
        sink: str,
        *,
        peer: str,
        timeout: float,
        tls: TlsOptions,
        https: bool = True,
        secrets: Iterable[str] = (),
    ) -> None:
        self.peer = peer
        self.timeout = timeout
        self._ssl = tls.client_context(sink) if https else None  # a bad CA/key file fails the build
        self._secrets = [secret for secret in secrets if secret]
        self._session: aiohttp.ClientSession | None = None
        self.closed = False

    def scrub(self, value: object) -> str:
        """Text for a reason or message: shortened, and never holding a secret."""
        return scrub(value, self._secrets)

    def tls_hint(self) -> str:
        """What to change when the peer's certificate is refused."""
        peer = self.peer
        return f"set tls.ca_file to the CA that signed the {peer} certificate (or tls.verify: false to skip the check)"

    def peer_text(self, reply: Reply) -> str:
        """The peer's answer as text for a reason: every secret replaced, then shortened. Cutting first would
        keep the head of a credential the peer quoted across the cut."""
        text = reply.body.decode("utf-8", "replace").strip()
        return self.scrub(text) if text else ""

    def describe(self, reply: Reply, url: object) -> str:
        """`<peer> answered <status> at <url>: <its text>`, scrubbed and shortened."""
        text = self.peer_text(reply)
        return f"{self.peer} answered {reply.status} at {self.scrub(url)}" + (f": {text}" if text else "")

    async def post(
        self,
        url: str | object,
        body: bytes,
        headers: Mapping[str, str],
        *,
        compression: Compression = "none",
        level: int | None = None,
    ) -> Reply | Verdict:
        """POST `body` (compressed as asked, with the matching Content-Encoding) and read the answer (up to
        REPLY_LIMIT bytes)."""
        if compression != "none":
            if len(body) >= THREAD_BYTES:
                body = await asyncio.to_thread(compress, body, compression, level)
            else:
                body = compress(body, compression, level)
            headers = {**headers, "Content-Encoding": compression}
        return await self.request("POST", url, body, headers)

    async def request(
        self, method: str, url: str | object, body: bytes | None, headers: Mapping[str, str]
    ) -> Reply | Verdict:
        """One request; a Verdict (RETRY) when no answer came."""
        if self.closed:
            return Verdict.retry(f"the sink is closed (not sending to {self.peer})")
        try:
            # A redirect is answered, not followed: aiohttp would turn a POST into a bodiless GET on 301/302/303
            # (a sign-in page's 200 then counts the batch delivered) and take the events and the credential
            # headers to a URL nobody configured. classify_status makes a 3xx a configuration problem.
            request = self.session().request(method, url, data=body, headers=headers, allow_redirects=False)  # type: ignore[arg-type]
            async with request as response:
                return Reply(response.status, response.headers, await _read_upto(response.content, REPLY_LIMIT))
        except aiohttp.ClientSSLError as exc:
            reason = f"TLS verification of {self.scrub(url)} failed ({self.scrub(exc)}); {self.tls_hint()}"
            return Verdict.retry(reason, config_problem=True)
        except TimeoutError:
            return Verdict.retry(f"no answer from {self.peer} at {self.scrub(url)} within {self.timeout:g}s")
        except (aiohttp.ClientError, OSError) as exc:
            return Verdict.retry(f"cannot reach {self.peer} at {self.scrub(url)}: {self.scrub(exc)}")

    def session(self) -> aiohttp.ClientSession:
        """The sink's session, made on first use (inside the running loop)."""
        if self._session is None:
            connector = aiohttp.TCPConnector(ssl=self._ssl if self._ssl is not None else True)
            timeout = aiohttp.ClientTimeout(total=self.timeout)
            self._session = aiohttp.ClientSession(connector=connector, timeout=timeout)
        return self._session

    async def close(self) -> None:
        """Close the connections; safe to call twice."""
        self.closed = True
        session, self._session = self._session, None
        if session is not None:
            await session.close()


async def _read_upto(content: aiohttp.StreamReader, limit: int) -> bytes:
    """The body, or its first `limit` bytes (the rest stays unread: aiohttp then closes the connection rather
    than reuse it)."""
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = await content.read(limit - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)
