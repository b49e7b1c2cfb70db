"""Retention for the file sink: which files its `path` pattern makes, and the sweep that deletes the old ones.

A file is recognised by its name alone: below the pattern's leading directories (those without a strftime
field), each directory and the file name must have the shape its part of the pattern gives (`%Y` four digits,
`%m` 01 to 12, literal text as written), or be a rotated name `<name>.<n><suffix>` of such a file. Anything else
in the tree (a README, `2024-01-15.ndjson.bak`, a symbolic link, another program's files) is never touched.
"""

from __future__ import annotations

import fcntl
import functools
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePath

__all__ = ["FilePattern", "SweepResult", "leading_directories", "rotated_name", "shared_name", "sweep"]

_COMPOSITES = {"F": "%Y-%m-%d", "T": "%H:%M:%S", "R": "%H:%M", "D": "%m/%d/%y"}
_DIGITS = {
    "Y": r"\d{4}",
    "G": r"\d{4}",
    "y": r"\d\d",
    "g": r"\d\d",
    "C": r"\d\d",
    "m": r"0[1-9]|1[0-2]",
    "d": r"0[1-9]|[12]\d|3[01]",
    "e": r" [1-9]|[12]\d|3[01]",
    "H": r"[01]\d|2[0-3]",
    "I": r"0[1-9]|1[0-2]",
    "M": r"[0-5]\d",
    "S": r"[0-5]\d|6[01]",
    "j": r"00[1-9]|0[1-9]\d|[12]\d\d|3[0-5]\d|36[0-6]",
    "U": r"[0-4]\d|5[0-3]",
    "W": r"[0-4]\d|5[0-3]",
    "V": r"0[1-9]|[1-4]\d|5[0-3]",
    "u": r"[1-7]",
    "w": r"[0-6]",
}
_WORDS = "aAbBhpZz"
"""Fields that are words (the locale's day and month names, AM/PM, the zone): matched as the values they take."""
_ROTATION = re.compile(r"\.([1-9]\d*)(?=\.|$)")
_FIELD = re.compile(r"(%[-_0^#]?[EO]?.?)", re.DOTALL)
"""A strftime field with its flag and modifier (`%-d`, `%Ey`), which an error names whole; `%%` is one too."""


def rotated_name(name: str, number: int) -> str:
    """The name `max_file_bytes` gives the `number`th full file of `name`: `<stem>.<number><suffix>`."""
    path = PurePath(name)
    return f"{path.stem}.{number}{path.suffix}"


@functools.cache
def _words(field: str) -> str:
    """An alternation of every value a word field takes in UTC (a year of days at midnight and noon)."""
    start = 1704067200  # 2024-01-01, a Monday; a leap year
    values = {time.strftime(f"%{field}", time.gmtime(start + hours * 3600)) for hours in range(0, 366 * 24, 12)}
    return "|".join(re.escape(value) for value in sorted(values, key=len, reverse=True))


def _part_regex(part: str) -> re.Pattern[str]:
    pieces = []
    for piece in _FIELD.split(part):
        if not piece.startswith("%"):
            pieces.append(re.escape(piece))
        elif piece == "%%":
            pieces.append("%")
        elif piece[1:] in _DIGITS:
            pieces.append(f"(?:{_DIGITS[piece[1:]]})")
        elif piece[1:] and piece[1:] in _WORDS:
            pieces.append(f"(?:{_words(piece[1:])})")
        else:
            known = " ".join(f"%{field}" for field in [*_DIGITS, *_WORDS, *_COMPOSITES])
            raise ValueError(f"path holds {piece}, which retention cannot recognise in file names (it knows {known})")
    return re.compile("".join(pieces), re.DOTALL)


def leading_directories(path: str) -> str:
    """The directories of a strftime `path` before its first field, with their trailing `/` ('' for none), a
    `%%` in them as the `%` it makes: what no moment changes."""
    return path[: _leading_end(path)].replace("%%", "%")


def _leading_end(path: str) -> int:
    first = path.replace("%%", "\0\0").find("%")  # `%%` is a `%`, part of a leading directory
    return path.rfind("/", 0, len(path) if first < 0 else first) + 1


@dataclass(frozen=True)
class FilePattern:
    """The files a file sink's `path` can name: below `root`, one regex per directory level, then the name."""

    root: str
    """The leading directories without a strftime field, as written (`%%` as the `%` it makes), with their
    trailing `/` ('' for the working directory)."""
    parts: tuple[re.Pattern[str], ...]

    @classmethod
    def of(cls, path: str) -> FilePattern:
        """The pattern of `path`; ValueError when a field or a `..` below its first field keeps it from being sure
        of the files it makes (pure: no I/O)."""
        expanded = re.sub(r"%(.)", lambda match: _COMPOSITES.get(match[1], match[0]), path, flags=re.DOTALL)
        split = _leading_end(expanded)
        parts = [part for part in expanded[split:].split("/") if part not in ("", ".")]
        if ".." in parts:
            raise ValueError("path holds '..' after its first strftime field: retention cannot tell its tree")
        if not parts:
            raise ValueError("path names a directory, not a file")
        return cls(expanded[:split].replace("%%", "%"), tuple(_part_regex(part) for part in parts))

    def names(self, name: str) -> bool:
        """Whether `name` is a file name the pattern makes, or a rotation of one."""
        last = self.parts[-1]
        if last.fullmatch(name):
            return True
        for number in _ROTATION.finditer(name):
            original = name[: number.start()] + name[number.end() :]
            if last.fullmatch(original) and rotated_name(original, int(number[1])) == name:
                return True
        return False

    def claims(self, path: str) -> bool:
        """Whether a sweep would take the file at `path` for one of the pattern's (by its name alone: no I/O)."""
        root, path = os.path.normpath(self.root or "."), os.path.normpath(path)
        if root != ".":
            base = root.rstrip("/") + "/"
            if not path.startswith(base):
                return False
            path = path[len(base) :]
        elif os.path.isabs(path) or path.split("/")[0] == "..":
            return False
        names = path.split("/")
        return (
            len(names) == len(self.parts)
            and all(part.fullmatch(name) for part, name in zip(self.parts[:-1], names, strict=False))
            and self.names(names[-1])
        )

    def files(self, unlisted: list[OSError]) -> Iterator[str]:
        """The regular files below `root` the pattern makes (symbolic links neither followed nor given). A
        directory that cannot be listed is left out and its error added to `unlisted`: one unreadable directory
        must not keep every other file for ever."""
        yield from self._walk(self.root, 0, unlisted)

    def _walk(self, prefix: str, depth: int, unlisted: list[OSError]) -> Iterator[str]:
        try:
            with os.scandir(prefix or ".") as scan:
                entries = list(scan)
        except FileNotFoundError:
            return
        except OSError as exc:
            unlisted.append(exc)
            return
        last = depth == len(self.parts) - 1
        for entry in entries:
            if last:
                if entry.is_file(follow_symlinks=False) and self.names(entry.name):
                    yield prefix + entry.name
            elif entry.is_dir(follow_symlinks=False) and self.parts[depth].fullmatch(entry.name):
                yield from self._walk(prefix + entry.name + "/", depth + 1, unlisted)


_SAMPLES = (
    *(1704067200 + hours * 3600 + hours * 7 % 60 * 60 + hours * 13 % 60 for hours in range(8 * 24)),
    *(1704067200 + days * 86400 + 43200 for days in range(2 * 366)),
)
"""Times from 2024-01-01 that give each field every value it takes: each hour of a week and a day (with every
minute and second among them), and a day of each of two years."""


def shared_name(pattern: FilePattern, path: str) -> str | None:
    """A file name that `path` (another file sink's) makes, or its rotation, and a sweep of `pattern` would take for
    its own (`2024-01-15.13.ndjson` of `%Y-%m-%d.%H.ndjson` reads as a rotation of `%Y-%m-%d.ndjson`); None if
    none of those the sample times give is. Pure: no I/O."""
    for moment in _SAMPLES:
        made = os.path.normpath(time.strftime(path, time.gmtime(moment)))
        directory, name = os.path.split(made)
        for candidate in (made, *(os.path.join(directory, rotated_name(name, number)) for number in (1, 2, 10))):
            if pattern.claims(candidate):
                return candidate
    return None


@dataclass
class SweepResult:
    """What one sweep did."""

    removed: int = 0
    removed_bytes: int = 0
    kept: int = 0
    kept_bytes: int = 0
    directories: int = 0
    """Empty directories removed."""
    failed: int = 0
    failure: str = ""
    """The first failure, for the log."""


def sweep(
    pattern: FilePattern, *, now: float, current: str, max_age: float | None, max_total_bytes: int | None
) -> SweepResult:
    """Delete the pattern's files last written (mtime) more than `max_age` seconds before `now`, then the oldest
    while all of them add up to more than `max_total_bytes`; never `current`, the file the sink writes now."""
    found = []
    unreadable: list[OSError] = []
    for name in pattern.files(unreadable):
        try:
            found.append((os.stat(name, follow_symlinks=False), name))
        except FileNotFoundError:
            continue
        except OSError as exc:  # a directory listed but not searchable (mode r--): its files, not the sweep
            unreadable.append(exc)
    found.sort(key=lambda item: (item[0].st_mtime_ns, item[1]))  # oldest first
    total = sum(stat.st_size for stat, _ in found)
    current = os.path.normpath(current)
    result = SweepResult()
    for error in unreadable:
        _failed(result, error.filename, error)
    emptied: set[str] = set()
    for stat, name in found:
        expired = max_age is not None and now - stat.st_mtime > max_age
        over = max_total_bytes is not None and total > max_total_bytes
        if (expired or over) and os.path.normpath(name) != current:
            try:
                removed = _remove(name, stat)
            except OSError as exc:
                _failed(result, name, exc)
                removed = False
            if removed:
                result.removed += 1
                result.removed_bytes += stat.st_size
                total -= stat.st_size
                emptied.add(os.path.dirname(name[len(pattern.root) :]))
                continue
        result.kept += 1
        result.kept_bytes += stat.st_size
    result.directories = _remove_empty(pattern.root, emptied)
    return result


def _failed(result: SweepResult, name: str, exc: OSError) -> None:
    result.failed += 1
    result.failure = result.failure or f"{name}: {exc.strerror or exc}"


def _remove(name: str, seen: os.stat_result) -> bool:
    """Unlink `name` if it is still the file `seen` describes, unchanged. Under its lock: a writer that opened it
    meanwhile finds it unlinked once it holds the lock, and writes to a new file instead (sinks.file._append)."""
    # Opened for writing: on NFS an exclusive lock (flock is emulated there with fcntl's) needs it, and read-only
    # it failed with EBADF, every file, every sweep; a file its owner made read-only is then kept (EACCES).
    fd = os.open(name, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            # Held by a writer (or any program that locks it): the sweep holds the sink's lock, so waiting here
            # would stop the sink's delivery for as long as the other holds it. The next sweep decides.
            return False
        now = os.fstat(fd)
        same = (now.st_dev, now.st_ino, now.st_mtime_ns, now.st_size) == (
            seen.st_dev,
            seen.st_ino,
            seen.st_mtime_ns,
            seen.st_size,
        )
        if not same or os.stat(name, follow_symlinks=False).st_ino != now.st_ino:
            return False  # written or replaced since the scan: the next sweep decides
        os.unlink(name)
        return True
    finally:
        os.close(fd)


def _remove_empty(root: str, directories: set[str]) -> int:
    """Remove the directories below `root` (relative paths) that removed files left empty, deepest first, and
    their parents that became empty in turn; `root` itself stays."""
    candidates = {directory for relative in directories for directory in _ancestors(relative)}
    removed = 0
    for relative in sorted(candidates, key=lambda directory: directory.count("/"), reverse=True):
        try:
            os.rmdir(root + relative)
        except OSError:
            continue  # not empty (or already gone): left as it is
        removed += 1
    return removed


def _ancestors(relative: str) -> Iterator[str]:
    while relative:
        yield relative
        relative = os.path.dirname(relative)
