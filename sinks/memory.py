"""The memory sink: keeps what it is sent, and can be told to fail. For tests and for trying a config.

Each instance keeps its own events; a running service's sinks are found through `Service.sinks`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import Field

from sinks.base import Event, Health, SendResult, SinkConfig, Verdict

FailMode = Literal["none", "retry", "config", "permanent"]


class MemorySink:
    """Stores delivered events in a list; `fail`, `reject_actions` and `pending_asks` make it misbehave."""

    class Config(SinkConfig):
        """Options of the memory sink."""

        fail: FailMode = "none"
        """`retry`, `config` (a retry that is a configuration problem) or `permanent` for every send."""
        reject_actions: tuple[str, ...] = ()
        pending_asks: int = Field(0, ge=0, le=100)
        """Answer PENDING this many times for each event before keeping it, like a peer that confirms later."""
        pending_wait: float = Field(0.01, ge=0, le=60)
        """Seconds the PENDING answers ask the engine to wait before asking again (0: no wait asked)."""

    def __init__(self, name: str, config: MemorySink.Config | None = None) -> None:
        self.name = name
        config = config or MemorySink.Config()
        self.fail: FailMode = config.fail
        self.reject_actions = set(config.reject_actions)
        self.pending_asks = config.pending_asks
        self.pending_wait = config.pending_wait
        self.events: list[Event] = []
        self.batch_sizes: list[int] = []
        self.closed = False
        self._asked: dict[int, int] = {}

    async def send(self, batch: Sequence[Event]) -> SendResult:
        """Keep the batch, unless told to fail."""
        self.batch_sizes.append(len(batch))
        if self.fail == "retry":
            return SendResult.retry("memory sink told to fail (retry)")
        if self.fail == "config":
            return SendResult.retry("memory sink told to fail (configuration problem)", config_problem=True)
        if self.fail == "permanent":
            return SendResult.permanent("memory sink told to fail (permanent)")
        failures = {}
        for event in batch:
            asked = self._asked.get(event.seq, 0)
            if event.action in self.reject_actions:
                failures[event.seq] = Verdict.permanent(f"memory sink rejects action {event.action}")
            elif asked < self.pending_asks:
                self._asked[event.seq] = asked + 1
                failures[event.seq] = Verdict.pending("memory sink awaiting its own confirmation", self.pending_wait)
            else:
                self._asked.pop(event.seq, None)
                self.events.append(event)
        return SendResult.partial(failures)

    async def healthcheck(self) -> Health:
        """Healthy unless told to fail."""
        if self.fail != "none":
            return Health(False, f"memory sink told to fail ({self.fail})")
        return Health(True, f"memory sink holds {len(self.events)} events")

    async def close(self) -> None:
        """Mark closed."""
        self.closed = True
