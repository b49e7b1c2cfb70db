"""Sinks: the interface (`sinks.base`), the registry (`sinks.registry`) and the built-in destinations."""
