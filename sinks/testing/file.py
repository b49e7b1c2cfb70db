"""Compliance harness for the file sink: the peer is a temporary directory."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from sinks.base import Sink
from sinks.file import FileSink
from sinks.testing.compliance import Mode
from sinks.testing.exact import loads


class Harness:
    """A file sink writing under a temporary directory; "retry" puts a plain file where the directory must be."""

    supports = frozenset({"retry"})  # a local file has no per-event or permanent refusal to provoke

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="log-bridge-file-"))
        self.directory = self.root / "events"

    async def start(self) -> None:
        """Nothing to start."""

    async def stop(self) -> None:
        """Remove the directory."""
        shutil.rmtree(self.root, ignore_errors=True)

    def build(self) -> Sink:
        """A file sink pointed at the directory."""
        return FileSink("file", FileSink.Config(path=str(self.directory / "%Y-%m-%d.ndjson")))

    def set_mode(self, mode: Mode) -> None:
        """Block or unblock the directory."""
        if mode == "retry":
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory.write_text("not a directory")
        elif self.directory.is_file():
            self.directory.unlink()

    async def received(self) -> list[dict[str, Any]]:
        """The bare events written so far."""
        if not self.directory.is_dir():
            return []
        return [
            loads(line)["event"]
            for path in sorted(self.directory.glob("*.ndjson"))
            for line in path.read_bytes().splitlines()
        ]
