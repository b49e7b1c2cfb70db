"""Compliance harness for the memory sink."""

from __future__ import annotations

from typing import Any

from sinks.base import Sink
from sinks.memory import MemorySink
from sinks.testing.compliance import REJECT_ACTION, Mode


class Harness:
    """Memory sinks whose failure mode follows `set_mode`."""

    supports = frozenset({"retry", "permanent", "partial"})

    def __init__(self) -> None:
        self.sinks: list[MemorySink] = []
        self.mode: Mode = "ok"

    async def start(self) -> None:
        """Nothing to start."""

    async def stop(self) -> None:
        """Nothing to stop."""

    def build(self) -> Sink:
        """A new memory sink in the current mode."""
        sink = MemorySink("memory", MemorySink.Config(reject_actions=(REJECT_ACTION,)))
        self.sinks.append(sink)
        self.set_mode(self.mode)
        return sink

    def set_mode(self, mode: Mode) -> None:
        """Apply the mode to every sink built so far."""
        self.mode = mode
        for sink in self.sinks:
            sink.fail = "retry" if mode == "retry" else "permanent" if mode == "permanent" else "none"

    async def received(self) -> list[dict[str, Any]]:
        """The bare events the sinks kept."""
        return [event.event for sink in self.sinks for event in sink.events]
