"""The memory sink: keeps what it is sent, and can be told to fail. For tests and for trying a config."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Literal

from sinks.base import Event, Failure, Health, Outcome, SendResult, SinkConfig


class MemorySink:
    """Stores delivered events in a list; `fail` and `reject_actions` make it misbehave on purpose."""

    class Config(SinkConfig):
        """Options of the memory sink."""

        fail: Literal["none", "retry", "permanent"] = "none"
        reject_actions: tuple[str, ...] = ()

    instances: ClassVar[dict[str, MemorySink]] = {}
    """The latest instance built under each name, so tests can look inside a running service."""

    def __init__(self, name: str, config: MemorySink.Config | None = None) -> None:
        self.name = name
        config = config or MemorySink.Config()
        self.fail: Literal["none", "retry", "permanent"] = config.fail
        self.reject_actions = set(config.reject_actions)
        self.events: list[Event] = []
        self.batch_sizes: list[int] = []
        self.closed = False
        MemorySink.instances[name] = self

    async def send(self, batch: Sequence[Event]) -> SendResult:
        """Keep the batch, unless told to fail."""
        self.batch_sizes.append(len(batch))
        if self.fail == "retry":
            return SendResult.retry("memory sink told to fail (retry)")
        if self.fail == "permanent":
            return SendResult.permanent("memory sink told to fail (permanent)")
        failures = {}
        for event in batch:
            if event.action in self.reject_actions:
                failures[event.seq] = Failure(Outcome.PERMANENT, f"memory sink rejects action {event.action}")
            else:
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
