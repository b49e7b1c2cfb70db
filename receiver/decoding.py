"""Undoing a request body's Content-Encoding (gzip, zstd) within a size limit, in time linear in the input.

A body may hold many gzip members or zstd frames; each ends with its decoder holding the rest of what it was fed
as `unused_data`. Feeding the whole remaining body each time would copy it once per member (quadratic), so the
input is fed in slices of a memoryview that start small for each member and double while it goes on: what is
copied per member is at most twice the member's own size.

Each member still costs a decoder and a few steps of Python, several times what its bytes cost when it holds
nothing (a 9-byte empty zstd frame, a 20-byte empty gzip member), so a body may hold at most `MAX_MEMBERS`: beyond
it, 400. One zstd decompression context serves every frame of a body (making one per frame cost 40 times as much
as the frame).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from functools import partial
from typing import Protocol

import zstandard

from receiver.errors import BodyError

MAX_MEMBERS = 1024
"""The most gzip members or zstd frames one body may hold (a sender compresses its body as one)."""
_FIRST_FEED = 256
_MAX_FEED = 64 * 1024
_ZSTD_MAX_RATIO = 32 * 1024
"""About the most output one byte of zstd input can give (an RLE block); bounds the output of one feed."""
_ZSTD_MAX_WINDOW = 8 * 1024 * 1024
"""Largest window a zstd frame may ask for (level 19 uses 8 MiB); a larger one would be memory the sender picks."""


def decode_body(body: bytes, encoding: str, limit: int) -> bytes:
    """The body without its Content-Encoding: 413 past `limit` bytes, 400 when broken, 415 when unknown."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding in ("gzip", "x-gzip"):
        return _decode_members(body, limit, "gzip", "members", _gzip_member, lambda room: _MAX_FEED)
    if encoding == "zstd":
        # zstd's decoder cannot cap its output, so a slice stays small enough not to overshoot the room by more
        # than about a megabyte.
        context = zstandard.ZstdDecompressor(max_window_size=_ZSTD_MAX_WINDOW)
        return _decode_members(
            body,
            limit,
            "zstd",
            "frames",
            partial(_ZstdFrame, context),
            lambda room: max(32, min(_MAX_FEED, room // _ZSTD_MAX_RATIO)),
        )
    raise BodyError(415, f"unsupported Content-Encoding {encoding[:40]!r}; use identity, gzip or zstd")


class _Decoder(Protocol):
    """What zlib's and zstd's streaming decoders share: one member (frame) at a time."""

    @property
    def eof(self) -> bool: ...
    @property
    def unused_data(self) -> bytes: ...
    def decompress(self, data: memoryview, max_length: int, /) -> bytes: ...


def _gzip_member() -> _Decoder:
    return zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)


class _ZstdFrame:
    """zstd's decoder for one frame, called like zlib's; it cannot cap its output, so the caller keeps its slices
    small. The frames of a body share `context` one after another (each decompressobj resets it)."""

    __slots__ = ("_decoder",)

    def __init__(self, context: zstandard.ZstdDecompressor) -> None:
        self._decoder = context.decompressobj()

    @property
    def eof(self) -> bool:
        return bool(self._decoder.eof)

    @property
    def unused_data(self) -> bytes:
        return bytes(self._decoder.unused_data)

    def decompress(self, data: memoryview, max_length: int, /) -> bytes:
        return bytes(self._decoder.decompress(data))


def _decode_members(
    body: bytes, limit: int, kind: str, unit: str, member: Callable[[], _Decoder], feed_cap: Callable[[int], int]
) -> bytes:
    view = memoryview(body)
    out = bytearray()
    position = 0
    members = 0
    try:
        while position < len(view):
            members += 1
            if members > MAX_MEMBERS:
                raise BodyError(400, f"{kind} body holds more than {MAX_MEMBERS} {unit}; compress it as one")
            decoder = member()
            feed = _FIRST_FEED
            while not decoder.eof:
                room = limit + 1 - len(out)
                piece = view[position : position + min(feed, feed_cap(room))]
                if not piece:
                    raise BodyError(400, f"{kind} body is truncated")
                out += decoder.decompress(piece, room)
                if len(out) > limit:
                    raise BodyError(413, f"decompressed body is larger than max_body_bytes ({limit} bytes)")
                # With output to spare, the whole slice was consumed unless the member ended inside it.
                position += len(piece) - len(decoder.unused_data)
                feed = min(feed * 2, _MAX_FEED)
    except zlib.error as exc:
        raise BodyError(400, f"gzip body cannot be decompressed: {exc}") from None
    except zstandard.ZstdError as exc:
        raise BodyError(400, f"zstd body cannot be decompressed: {exc}") from None
    return bytes(out)
