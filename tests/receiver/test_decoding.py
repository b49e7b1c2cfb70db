"""Undoing Content-Encoding: limits, broken and truncated bodies, many members in linear time."""

from __future__ import annotations

import gzip
import time
from typing import Any

import pytest
import zstandard

from receiver.decoding import MAX_MEMBERS, decode_body
from receiver.errors import BodyError

RAW = b"[" + b'{"event":{"action":"user.created"}},' * 5000 + b"{}]"
COMPRESS = {"gzip": gzip.compress, "zstd": zstandard.compress}


def refusal(body: bytes, encoding: str, limit: int = 10 * 1024 * 1024) -> tuple[int, str]:
    with pytest.raises(BodyError) as raised:
        decode_body(body, encoding, limit)
    return raised.value.status, raised.value.message


@pytest.mark.parametrize("encoding", ["gzip", "zstd"])
class TestDecodeBody:
    def test_round_trip_and_several_members(self, encoding: str) -> None:
        once = COMPRESS[encoding](RAW)
        assert decode_body(once, encoding, len(RAW)) == RAW
        assert decode_body(once * 3, encoding, 3 * len(RAW)) == RAW * 3

    def test_one_byte_over_the_limit_is_413(self, encoding: str) -> None:
        assert refusal(COMPRESS[encoding](RAW), encoding, len(RAW) - 1)[0] == 413

    @pytest.mark.parametrize("keep", [0.6, 0.99, 8])
    def test_truncated_body_says_so(self, encoding: str, keep: float) -> None:
        whole = COMPRESS[encoding](RAW)
        cut = int(len(whole) * keep) if keep < 1 else int(keep)
        assert refusal(whole[:cut], encoding) == (400, f"{encoding} body is truncated")

    def test_trailing_garbage_is_400(self, encoding: str) -> None:
        status, message = refusal(COMPRESS[encoding](RAW) + b"garbage!", encoding)
        assert status == 400 and "cannot be decompressed" in message

    def test_up_to_max_members_decode_and_one_more_is_400(self, encoding: str) -> None:
        member = COMPRESS[encoding](b"")
        assert decode_body(member * MAX_MEMBERS, encoding, 1024) == b""
        unit = {"gzip": "members", "zstd": "frames"}[encoding]
        assert refusal(member * (MAX_MEMBERS + 1), encoding) == (
            400,
            f"{encoding} body holds more than {MAX_MEMBERS} {unit}; compress it as one",
        )

    def test_many_empty_members_cost_no_more_than_max_members_of_them(self, encoding: str) -> None:
        member = COMPRESS[encoding](b"")
        timings = []
        for body in (member * (MAX_MEMBERS + 1), member * (1024 * 1024 // len(member))):
            started = time.perf_counter()
            assert refusal(body, encoding)[0] == 400
            timings.append(time.perf_counter() - started)
        # The 1 MiB body is refused where the short one is, at its first member too many (decoding every member
        # took 2.4 s for zstd's 116,508). Generous for a noisy machine.
        assert timings[1] < 4 * timings[0] + 0.05, f"{timings[0]:.3f} s then {timings[1]:.3f} s"


def test_the_frames_of_a_zstd_body_share_one_context(monkeypatch: pytest.MonkeyPatch) -> None:
    # Making a context costs about 11 µs, 40 times what decoding an empty frame with one does.
    sizes = (0, 1000, len(RAW), 0, 37)
    body = b"".join(zstandard.compress(RAW[:size]) for size in sizes)
    made: list[dict[str, Any]] = []
    real = zstandard.ZstdDecompressor

    def counted(**kwargs: Any) -> zstandard.ZstdDecompressor:
        made.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(zstandard, "ZstdDecompressor", counted)
    assert decode_body(body, "zstd", 10 * len(RAW)) == b"".join(RAW[:size] for size in sizes)
    assert len(made) == 1


def test_zstd_frame_asking_for_a_huge_window_is_400() -> None:
    params = zstandard.ZstdCompressionParameters.from_level(3, window_log=27, write_content_size=False)
    streaming = zstandard.ZstdCompressor(compression_params=params).compressobj()  # size unknown: window kept
    body = streaming.compress(RAW) + streaming.flush()
    status, message = refusal(body, "zstd")
    assert status == 400 and "zstd" in message


def test_unknown_encoding_is_415() -> None:
    assert refusal(b"x", "br")[0] == 415
