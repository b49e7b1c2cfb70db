"""Dead letters, for `log-bridge dlq list` and `dlq replay`: a plain connection of their own, safe while the
service runs. Replay moves them to the `replays` table in one transaction; the service appends them to its
segments (within a second while it runs, else when it next starts), each for the sink that failed it."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import orjson

from receiver.journal.schema import INTAKE, connect


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One dead-lettered element."""

    id: int
    sink: str
    stream: str
    data: bytes
    reason: str
    at: float


def list_dead_letters(path: Path, sink: str | None = None) -> list[DeadLetter]:
    """Dead letters, oldest first; `sink` may be a sink's name or INTAKE."""
    if not path.exists():
        return []
    conn = connect(path)
    try:
        query = "SELECT id, sink, stream, data, reason, at FROM dead_letters"
        params: tuple[Any, ...] = ()
        if sink == INTAKE:
            query += " WHERE sink IS NULL"
        elif sink is not None:
            query += " WHERE sink = ?"
            params = (sink,)
        rows = conn.execute(query + " ORDER BY id", params).fetchall()
    finally:
        conn.close()
    return [DeadLetter(r[0], r[1] or INTAKE, r[2], bytes(r[3]), r[4], r[5]) for r in rows]


def count_dead_letters(path: Path) -> dict[str, int]:
    """How many dead letters each sink has (intake dead letters, which no sink owns, left out)."""
    if not path.exists():
        return {}
    conn = connect(path)
    try:
        rows = conn.execute(
            "SELECT sink, count(*) FROM dead_letters WHERE sink IS NOT NULL GROUP BY sink ORDER BY sink"
        ).fetchall()
    finally:
        conn.close()
    return {str(sink): int(count) for sink, count in rows}


def replay_dead_letters(path: Path, sink: str | None = None) -> int:
    """Put sinks' dead letters back into the backlog (through `replays`), each for the sink that failed it.
    Intake dead letters (bad input) stay: they are not events. Returns how many were put back."""
    if not path.exists():
        return 0
    conn = connect(path)
    try:
        conn.execute("BEGIN IMMEDIATE")
        query = "SELECT id, sink, stream, data, meta FROM dead_letters WHERE sink IS NOT NULL"
        params: tuple[Any, ...] = ()
        if sink:
            query, params = query + " AND sink = ?", (sink,)
        now = time.time()
        rows = conn.execute(query + " ORDER BY id", params).fetchall()
        moved = []
        for _id, target, stream, data, meta in rows:
            action, moment = _action_and_time(meta, bytes(data), now)
            moved.append((target, stream, bytes(data), action, moment))
        conn.executemany("INSERT INTO replays (target, stream, data, action, time) VALUES (?, ?, ?, ?, ?)", moved)
        conn.executemany("DELETE FROM dead_letters WHERE id = ?", [(row[0],) for row in rows])
        conn.execute("COMMIT")
    finally:
        conn.close()
    return len(rows)


class _Head(msgspec.Struct):
    action: str = ""
    occurred_at: str = ""


class _Element(msgspec.Struct):
    event: _Head | None = None
    action: str = ""
    occurred_at: str = ""


def _action_and_time(meta: bytes | None, raw: bytes, now: float) -> tuple[str, float]:
    """What the dead letter recorded; for a row of an earlier version (no `meta`), read from the element."""
    if meta is not None:
        action, moment = orjson.loads(meta)
        return str(action), float(moment)
    try:
        element = msgspec.json.decode(raw, type=_Element)
    except msgspec.DecodeError:
        return "", now
    head = element.event or _Head(element.action, element.occurred_at)
    try:
        when = datetime.fromisoformat(head.occurred_at)
    except ValueError:
        return head.action, now
    return head.action, (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()
