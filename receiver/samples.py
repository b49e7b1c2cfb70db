"""Sample WorkOS audit-log wrappers, as WorkOS sends them: for `log-bridge send-test`, the benchmarks and the sink
compliance suite."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

import orjson

ACTIONS = ("user.signed_in", "user.signed_out", "role.assigned", "api_key.created", "user.deleted", "group.updated")


def stamp(moment: float) -> str:
    """`moment` (epoch seconds) as WorkOS writes `occurred_at`: RFC 3339, UTC, milliseconds."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(moment)) + f".{int(moment * 1000) % 1000:03d}Z"


def sample_wrappers(
    count: int, source: str = "log-bridge-test", *, actions: Sequence[str] = ACTIONS, start: float | None = None
) -> list[dict[str, Any]]:
    """Realistic WorkOS wrappers with unique ids and keySuffixes, the actions taken in turn from `actions`, one
    millisecond apart, from `start` (default: `count` milliseconds ago)."""
    first = time.time() - count * 0.001 if start is None else start
    wrappers = []
    for index in range(count):
        when = stamp(first + index * 0.001)
        wrappers.append(
            {
                "event": {
                    "id": "01" + uuid.uuid4().hex[:24].upper(),
                    "action": actions[index % len(actions)],
                    "actor": {"id": f"user_{uuid.uuid4().hex[:20]}", "type": "user", "name": "Test User"},
                    "targets": [{"id": f"team_{index % 7}", "type": "team"}],
                    "context": {"location": "198.51.100.7", "user_agent": "log-bridge send-test"},
                    "occurred_at": when,
                    "version": 1,
                    "metadata": {"test": True},
                },
                "keySuffix": uuid.uuid4().hex,
                "timestamp": when,
                "source": source,
            }
        )
    return wrappers


def encode_body(wrappers: Sequence[object], fmt: str) -> tuple[bytes, str]:
    """The body and its Content-Type, as WorkOS sends them."""
    if fmt == "ndjson":
        return b"".join(orjson.dumps(w) + b"\n" for w in wrappers), "application/x-ndjson"
    return orjson.dumps(list(wrappers)), "application/json"
