"""log-bridge's receiver: HTTP intake, configuration, durable journal, delivery engine and CLI."""

__version__ = "0.1.0"
