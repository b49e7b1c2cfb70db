"""Which sinks owe which events when the configuration changes: events are owed by the sinks their stream fed
when they were accepted. A reload or a restart that takes a stream away from a sink (a stream removed, renamed,
or routed elsewhere) leaves that sink owing the stream's events accepted until then; the journal keeps the
routing in use and what is still owed, so a restart in between loses nothing either."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from receiver.config import Config

ROUTING = "routing"
OWED = "owed_elsewhere"

Owed = dict[str, dict[str, float]]
"""sink -> stream -> the last seq of that stream the sink still owes (inf: until requests in flight finish)."""


def routing_of(config: Config) -> dict[str, list[str]]:
    """Each stream's sinks."""
    return {stream.name: sorted(stream.sinks) for stream in config.streams}


def carried_over(routing: Mapping[str, Any] | None, owed: Mapping[str, Any] | None, config: Config, last: int) -> Owed:
    """At a start: what the previous process's routing and unsettled ownership leave the sinks of `config`
    owing (up to `last`, the journal's end: every request of the previous process has committed)."""
    carried: Owed = {}
    for sink, streams in (owed or {}).items():
        for stream, until in streams.items():
            carried.setdefault(sink, {})[stream] = float(last if until is None else until)
    for stream, sinks in (routing or {}).items():
        for sink in sinks:
            if sink in config.sinks and stream not in config.streams_of(sink):
                carried.setdefault(sink, {})[stream] = float(last)
    return carried


def stored(owed: Owed) -> dict[str, dict[str, int | None]]:
    """`owed` as JSON (inf as null)."""
    return {
        sink: {s: (None if math.isinf(u) else int(u)) for s, u in streams.items()} for sink, streams in owed.items()
    }
