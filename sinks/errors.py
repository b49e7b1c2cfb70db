"""Errors raised by sinks and the sink registry.

SinkError
└── SinkTypeError      unknown sink type, or its optional dependency is missing
"""

from __future__ import annotations


class SinkError(Exception):
    """Base of the sink errors; its message is safe to show (it names no secret)."""


class SinkTypeError(SinkError):
    """A sink type that cannot be loaded: unknown, or its extra is not installed."""
