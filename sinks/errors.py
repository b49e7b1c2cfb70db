"""The sink errors, defined with the rest of the hierarchy under `LogBridgeError` in receiver.errors (a module
with no imports, so sinks depend on nothing else of the receiver)."""

from __future__ import annotations

from receiver.errors import LogBridgeError, SinkError, SinkTypeError

__all__ = ["LogBridgeError", "SinkError", "SinkTypeError"]
