"""Reusable test helpers: the sink compliance suite and local stand-ins for the sinks' peers."""
