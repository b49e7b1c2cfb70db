"""Dead letters, for `log-bridge dlq list`, `dlq replay` and `dlq purge`: a plain connection of their own, safe
while the service runs. Replay moves them to the `replays` table in one transaction; the service appends them to
its segments (within a second while it runs, else when it next starts), each for the sink that failed it. Purge
deletes them. Both mark `meta` (`dead_letters_taken`), and the service then counts again what its dead letters
take (within a second)."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import orjson

from receiver.journal.schema import INTAKE, KEEP_DEAD_LETTER_IDS, LETTER_BYTES, TAKE_DEAD_LETTERS, connect

PURGE_CHUNK = 1000
"""Dead letters one purge transaction deletes: the running service's writer waits for it, so it stays short."""

CHUNK_BYTES = 8 * 1024 * 1024
"""What the dead letters one replay transaction moves, or one page of a listing, may hold (at least one of
them): the command holds no more than that in memory, and the service's writer waits for no longer."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One dead-lettered element."""

    id: int
    sink: str
    stream: str
    data: bytes
    reason: str
    at: float


def _journal(path: Path) -> sqlite3.Connection:
    """`connect` to the journal at `path` once it is known to be one: another SQLite database named by mistake is
    left as it is (connect would add the journal's tables to it, and turn it to WAL mode for good)."""
    probe = sqlite3.connect(path, timeout=30.0)
    try:
        found = probe.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'dead_letters'").fetchone()
    finally:
        probe.close()
    if found is None:
        raise sqlite3.DatabaseError("the file is not a log-bridge journal (it has no dead_letters table)")
    return connect(path)


def list_dead_letters(path: Path, sink: str | None = None) -> list[DeadLetter]:
    """Dead letters, oldest first; `sink` may be a sink's name or INTAKE."""
    return list(iter_dead_letters(path, sink))


def iter_dead_letters(path: Path, sink: str | None = None) -> Iterator[DeadLetter]:
    """Dead letters, oldest first, read a page (CHUNK_BYTES) at a time, each page a read of its own: no
    snapshot is held between pages, so the service's checkpoints go on while a listing is read slowly."""
    if not path.exists():
        return
    where, params = _selection(sink)
    conn = _journal(path)
    try:
        after = 0
        while ids := _next_chunk(conn, where, params, after, None):
            query = f"SELECT id, sink, stream, data, reason, at FROM dead_letters WHERE id IN ({_marks(ids)})"  # noqa: S608
            rows = conn.execute(query + " ORDER BY id", ids).fetchall()
            after = ids[-1]
            for r in rows:
                yield DeadLetter(r[0], r[1] or INTAKE, r[2], bytes(r[3]), r[4], r[5])
    finally:
        conn.close()


def _next_chunk(conn: Any, where: str, params: tuple[Any, ...], after: int, upto: int | None) -> list[int]:
    """The ids of the next dead letters selected past `after` (and up to `upto`): PURGE_CHUNK of them at most,
    holding CHUNK_BYTES at most, but at least one."""
    where = (where + " AND" if where else " WHERE") + " id > ?" + ("" if upto is None else " AND id <= ?")
    query = f"SELECT id, {LETTER_BYTES} FROM dead_letters{where} ORDER BY id LIMIT ?"  # noqa: S608
    bounds = (after,) if upto is None else (after, upto)
    chunk: list[int] = []
    size = 0
    for letter_id, letter_bytes in conn.execute(query, (*params, *bounds, PURGE_CHUNK)):
        size += int(letter_bytes)
        if chunk and size > CHUNK_BYTES:
            break
        chunk.append(int(letter_id))
    return chunk


def _marks(ids: Sequence[int]) -> str:
    return ", ".join("?" * len(ids))


def _selection(sink: str | None, before: float | None = None, ids: Sequence[int] = ()) -> tuple[str, tuple[Any, ...]]:
    """The WHERE clause (empty when nothing is selected) and its parameters for these criteria, all of them."""
    clauses: list[str] = []
    params: list[Any] = []
    if sink == INTAKE:
        clauses.append("sink IS NULL")
    elif sink is not None:
        clauses.append("sink = ?")
        params.append(sink)
    if before is not None:
        clauses.append("at < ?")
        params.append(before)
    if ids:
        clauses.append(f"id IN ({_marks(ids)})")
        params.extend(ids)
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), tuple(params)


def measure_dead_letters(
    path: Path, sink: str | None = None, before: float | None = None, ids: Sequence[int] = ()
) -> tuple[int, int]:
    """How many dead letters `purge_dead_letters` would delete with these criteria, and the bytes they take."""
    if not path.exists():
        return 0, 0
    conn = _journal(path)
    try:
        where, params = _selection(sink, before, ids)
        count, size = conn.execute(
            f"SELECT count(*), coalesce(sum({LETTER_BYTES}), 0) FROM dead_letters{where}",  # noqa: S608
            params,
        ).fetchone()
    finally:
        conn.close()
    return int(count), int(size)


def purge_dead_letters(
    path: Path, sink: str | None = None, before: float | None = None, ids: Sequence[int] = ()
) -> tuple[int, int]:
    """Delete the dead letters matching every criterion given (all of them when none is), in transactions of
    PURGE_CHUNK rows; returns how many were deleted and the bytes they took. Only those there when it starts:
    one dead-lettered meanwhile was not selected by whoever ran it."""
    if not path.exists():
        return 0, 0
    conn = _journal(path)
    deleted = freed = 0
    try:
        where, params = _selection(sink, before, ids)
        upto = conn.execute("SELECT coalesce(max(id), 0) FROM dead_letters").fetchone()[0]
        where = (where + " AND" if where else " WHERE") + " id <= ?"
        query = f"SELECT id, {LETTER_BYTES} FROM dead_letters{where} ORDER BY id LIMIT ?"  # noqa: S608
        while True:
            conn.execute("BEGIN IMMEDIATE")
            try:
                rows = conn.execute(query, (*params, upto, PURGE_CHUNK)).fetchall()
                if rows:  # ids are not given again; a running service counts its dead letters again
                    conn.execute(KEEP_DEAD_LETTER_IDS)
                    conn.execute(TAKE_DEAD_LETTERS, (orjson.dumps(time.time_ns()),))
                conn.executemany("DELETE FROM dead_letters WHERE id = ?", [(row[0],) for row in rows])
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            deleted += len(rows)
            freed += sum(int(row[1]) for row in rows)
            if len(rows) < PURGE_CHUNK:
                return deleted, freed
    finally:
        conn.close()


def count_dead_letters(path: Path) -> dict[str, int]:
    """How many dead letters each sink has (intake dead letters, which no sink owns, left out)."""
    if not path.exists():
        return {}
    conn = _journal(path)
    try:
        rows = conn.execute(
            "SELECT sink, count(*) FROM dead_letters WHERE sink IS NOT NULL GROUP BY sink ORDER BY sink"
        ).fetchall()
    finally:
        conn.close()
    return {str(sink): int(count) for sink, count in rows}


def replay_dead_letters(path: Path, sink: str | None = None) -> int:
    """Put sinks' dead letters back into the backlog (through `replays`), each for the sink that failed it.
    Intake dead letters (bad input) stay: they are not events. Returns how many were put back.

    Only those there when it starts (one dead-lettered meanwhile is a new failure), a chunk (CHUNK_BYTES) a
    transaction: each moves its dead letters whole, so a replay cut short has moved some and left the rest."""
    if not path.exists():
        return 0
    where = " WHERE sink IS NOT NULL"
    params: tuple[Any, ...] = ()
    if sink:
        where, params = where + " AND sink = ?", (sink,)
    conn = _journal(path)
    moved = 0
    try:
        upto = conn.execute("SELECT coalesce(max(id), 0) FROM dead_letters").fetchone()[0]
        after = 0
        while True:
            conn.execute("BEGIN IMMEDIATE")
            try:
                ids = _next_chunk(conn, where, params, after, upto)
                if ids:
                    query = f"SELECT sink, stream, data, meta FROM dead_letters WHERE id IN ({_marks(ids)})"  # noqa: S608
                    now = time.time()
                    rows = conn.execute(query + " ORDER BY id", ids).fetchall()
                    conn.executemany(
                        "INSERT INTO replays (target, stream, data, action, time) VALUES (?, ?, ?, ?, ?)",
                        [
                            (target, stream, bytes(data), *_action_and_time(meta, bytes(data), now))
                            for target, stream, data, meta in rows
                        ],
                    )
                    conn.execute(KEEP_DEAD_LETTER_IDS)
                    conn.executemany("DELETE FROM dead_letters WHERE id = ?", [(letter_id,) for letter_id in ids])
                    conn.execute(TAKE_DEAD_LETTERS, (orjson.dumps(time.time_ns()),))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            if not ids:
                return moved
            moved += len(ids)
            after = ids[-1]
    finally:
        conn.close()


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
