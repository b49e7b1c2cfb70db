"""The journal's SQLite schema (everything but the events, which are in the segments), its migrations and the
SQL statements more than one part of the journal runs, named once."""

from __future__ import annotations

import errno
import os
import sqlite3
from collections.abc import Iterable
from pathlib import Path

import orjson

from receiver.errors import JournalError, JournalFull

SCHEMA = """
CREATE TABLE IF NOT EXISTS cursors (sink TEXT PRIMARY KEY, seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS dedup_log (
    id INTEGER PRIMARY KEY, stream TEXT NOT NULL, at REAL NOT NULL, keys BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS dedup_log_at ON dedup_log (at);
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY,
    sink TEXT,
    stream TEXT NOT NULL,
    data BLOB NOT NULL,
    reason TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS dead_letters_sink ON dead_letters (sink);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS replays (
    id INTEGER PRIMARY KEY,
    target TEXT NOT NULL,
    stream TEXT NOT NULL,
    data BLOB NOT NULL,
    action TEXT NOT NULL,
    time REAL NOT NULL
);
"""
"""`replays` holds the dead letters `dlq replay` put back, until the service appends them to the segments (it
runs in another process, and only the service writes the segments)."""

MIGRATIONS = (("dead_letters", "meta", "ALTER TABLE dead_letters ADD COLUMN meta BLOB"),)
"""(table, column, statement) applied to a journal of an earlier version that lacks the column. `dead_letters.meta`
holds `[action, time]` of a sink's dead letter, what replay needs to put it back without parsing it."""

LAYOUT = 2
"""The journal layout this version reads and writes, kept in `meta` (`layout`): 1 held the events in SQLite
(`batches`, moved into the segments at open), 2 holds them in segment files. A version that changes what an
earlier one cannot read raises it; a journal of a later layout than this is refused, not opened as this one's
(its tables changed, what it keeps elsewhere passed over)."""

COMPRESSION_LEVEL = 1
"""zstd level of the stored events: level 1 stores WorkOS events in a fifth to an eighth of their size for
≈ 3 µs of CPU per KiB, so the backlog cap holds five to eight times more events."""
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

WAL_SIZE_LIMIT = 8 * 1024 * 1024
"""What the WAL is cut back to once checkpointed (`journal_size_limit`): twice what SQLite's own checkpoint
lets it hold (1,000 pages), so the usual WAL keeps its room, and one large transaction (a purge, which
overwrites the rows it frees) does not keep its size on disk for ever."""

INTAKE = "(intake)"
"""How `dlq list` names dead letters of the intake (bad input), which belong to no sink."""


def connect(path: Path, cache_kib: int | None = None) -> sqlite3.Connection:
    """A connection with the journal's durability settings and schema (migrated to this version)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
    try:
        _check_layout(conn)  # before WAL mode, which stays with the file for good
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=30000")
        conn.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
        if cache_kib is not None:
            conn.execute(f"PRAGMA cache_size=-{int(cache_kib)}")
        conn.executescript(SCHEMA)
        _migrate(conn)
        if _layout(conn) != LAYOUT:
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('layout', ?)", (LAYOUT,))
    except BaseException:
        conn.close()
        raise
    return conn


def _layout(conn: sqlite3.Connection) -> int | None:
    """The layout `meta` names (None: a new journal, or one of a version before layouts were kept)."""
    if not conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone():
        return None
    row = conn.execute("SELECT value FROM meta WHERE key = 'layout'").fetchone()
    return None if row is None else int(row[0])


JOURNAL_TABLES = frozenset({"cursors", "dedup_log", "dead_letters", "meta", "replays", "batches", "dedup"})
"""The tables of a journal, of this version or an earlier one: a database holding tables but none of them is
another program's."""


def _check_layout(conn: sqlite3.Connection) -> None:
    """Refuse another program's database, or a journal a later version wrote, before anything in it changes."""
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if tables and not tables & JOURNAL_TABLES:
        raise sqlite3.DatabaseError(
            "the file is not a log-bridge journal (another SQLite database: none of its tables)"
        )
    found = _layout(conn)
    if found is not None and found > LAYOUT:
        raise sqlite3.DatabaseError(
            f"it was written by a later version of log-bridge (journal layout {found}; this version reads up to "
            f"{LAYOUT}): run that version or a later one on it"
        )


def _migrate(conn: sqlite3.Connection) -> None:
    for table, column, statement in MIGRATIONS:
        if column not in {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}:
            try:
                conn.execute(statement)
            except sqlite3.OperationalError as exc:  # another process added it meanwhile
                if "duplicate column" not in str(exc):
                    raise


DEAD_LETTER_ROW = 64
"""Bytes a dead letter takes besides its data, reason and stream (its id, sink, time, meta, the index entry)."""

LETTER_BYTES = f"length(data) + length(CAST(reason AS BLOB)) + length(CAST(stream AS BLOB)) + {DEAD_LETTER_ROW}"
"""What one `dead_letters` row takes, as `letter_bytes` counts it (length() of a BLOB reads no overflow page)."""

DEAD_LETTER_BYTES = f"SELECT coalesce(sum({LETTER_BYTES}), 0) FROM dead_letters"  # noqa: S608
"""What the dead letters take."""


def letter_bytes(raw: bytes, reason: str, stream: str) -> int:
    """What one dead letter takes in the journal, for `journal.max_dead_letter_bytes`."""
    return len(raw) + len(reason.encode()) + len(stream.encode()) + DEAD_LETTER_ROW


DEAD_LETTERS_TAKEN = "dead_letters_taken"
"""The `meta` key `dlq purge` and `dlq replay` change in each transaction that takes dead letters away, so that
a running service knows to count them again (a count reads them all; this is one row)."""
TAKE_DEAD_LETTERS = "INSERT OR REPLACE INTO meta (key, value) VALUES ('dead_letters_taken', ?)"

_LAST_LETTER_ID = (
    "max(coalesce((SELECT max(id) FROM dead_letters), 0), "
    "coalesce((SELECT value FROM meta WHERE key = 'dead_letter_ids'), 0))"
)
KEEP_DEAD_LETTER_IDS = f"INSERT OR REPLACE INTO meta (key, value) VALUES ('dead_letter_ids', {_LAST_LETTER_ID})"  # noqa: S608
"""Run before dead letters are taken away, in the same transaction: `meta` (`dead_letter_ids`) keeps the highest
id given, and each new dead letter's id is past it, so an id from an earlier `dlq list` never names another letter
(SQLite gives a rowid again once the newest row is deleted)."""

INSERT_DEAD_LETTER = (
    "INSERT INTO dead_letters (id, sink, stream, data, reason, at, meta) "  # noqa: S608
    f"VALUES ({_LAST_LETTER_ID} + 1, ?, ?, ?, ?, ?, ?)"
)


def insert_dead_letters(
    conn: sqlite3.Connection,
    sink: str | None,
    stream: str,
    at: float,
    letters: Iterable[tuple[bytes, str, tuple[str, float] | None]],
) -> None:
    """Dead-letter elements: (bytes, reason, (action, time) or None for bad input, which is no event)."""
    conn.executemany(
        INSERT_DEAD_LETTER,
        [
            (sink, stream, raw, reason, at, None if head is None else orjson.dumps(list(head)))
            for raw, reason, head in letters
        ],
    )


def last_seq(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT value FROM meta WHERE key = 'last_seq'").fetchone()
    return int(row[0]) if row else 0


def store_last_seq(conn: sqlite3.Connection, seq: int) -> None:
    conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('last_seq', ?)", (seq,))


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # a directory it may not search: the directory is the problem
        return False


def _read_only(directory: Path) -> bool:
    """Whether the file system holding `directory` is mounted read-only."""
    try:
        return bool(os.statvfs(directory).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def open_problem(exc: OSError | sqlite3.Error, path: Path) -> str:
    """Why a journal could not be opened, in one line, with the next step where it is clear."""
    denied = isinstance(exc, PermissionError) or "readonly" in str(exc)
    refused = denied or getattr(exc, "errno", 0) == errno.EROFS or isinstance(exc, sqlite3.Error)
    if refused and _read_only(path.parent):  # no chmod or chown changes that
        return f"the file system holding {path.parent} is mounted read-only (the journal is written to)"
    if denied or (isinstance(exc, sqlite3.Error) and not os.access(path.parent, os.W_OK)):
        files = [path, *(path.with_name(path.name + end) for end in ("-wal", "-shm", ".lock"))]
        theirs = [str(f) for f in files if _exists(f) and not os.access(f, os.R_OK | os.W_OK)]
        if theirs:
            return (
                f"permission denied (log-bridge runs as UID {os.getuid()}; it cannot write {', '.join(theirs)}: "
                "make them its own, or writable by it)"
            )
        return (
            f"permission denied (log-bridge runs as UID {os.getuid()}; it needs to write in {path.parent}, "
            "for the database and its -wal and -shm files)"
        )
    if isinstance(exc, OSError):
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{exc.strerror or exc}{where}"
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
    if code in (sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_CORRUPT):
        return f"the file is not a log-bridge journal or is damaged ({exc}); move it aside to start a new one"
    if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return f"the database is locked by another process ({exc})"
    if code == sqlite3.SQLITE_FULL:
        return "the disk is full"
    return str(exc)


def map_error(exc: sqlite3.Error) -> JournalError:
    if getattr(exc, "sqlite_errorcode", 0) & 0xFF == sqlite3.SQLITE_FULL:  # the primary code of an extended one
        return DiskFull("the journal's disk is full")
    return JournalError(f"journal write failed: {exc}")


def disk_error(exc: OSError) -> JournalError:
    """What a journal file's failed write means: DiskFull for lack of space (or of quota), else a JournalError."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFull("the journal's disk is full")
    return JournalError(f"journal write failed: {exc}")


class DiskFull(JournalFull):
    """A write failed because the journal's file system has no room."""


class DeadLettersFull(JournalFull):
    """A request's dead letters would take the journal's dead letters past `journal.max_dead_letter_bytes`."""
