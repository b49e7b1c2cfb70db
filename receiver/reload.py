"""What a reload changes: the configuration to apply, the sinks to build, the settings that need a restart."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from receiver.config import Config

RESTART_ONLY = {
    "server": ("host", "port", "admin", "header_timeout"),
    "journal": ("path", "dedup_window", "dedup_max_keys", "dedup_store"),
}
"""Settings a running process keeps until it restarts: the listening socket and its timeouts, the journal file,
the dedup index built from it and the shared dedup store it connects to."""


@dataclass(frozen=True)
class ReloadPlan:
    """The configuration a reload applies (the new one, restart-only settings kept) and what it changes."""

    config: Config
    needs_restart: list[str]
    sinks_to_build: list[str]
    """Sinks new or changed in the file (fed by a stream or not)."""
    streams: dict[str, list[str]]
    sinks: dict[str, list[str]]

    moved: frozenset[str] = frozenset()
    """Streams of the running configuration that are gone, or feed other sinks now: the sinks they fed still
    owe what they brought."""

    def summary(self) -> dict[str, Any]:
        """The changes, for the log line that reports the reload."""
        changes = {f"streams_{kind}": names for kind, names in self.streams.items() if names}
        changes.update({f"sinks_{kind}": names for kind, names in self.sinks.items() if names})
        return {"changes": changes or "none", "needs_restart": self.needs_restart}


def plan_reload(old: Config, new: Config) -> ReloadPlan:
    """Compare the running configuration with the one just read."""
    needs_restart: list[str] = []
    kept: dict[str, dict[str, Any]] = {}
    for section, keys in RESTART_ONLY.items():
        before, after = getattr(old, section), getattr(new, section)
        for key in keys:
            if getattr(before, key) != getattr(after, key):
                needs_restart.append(f"{section}.{key}")
                kept.setdefault(section, {})[key] = getattr(before, key)
    old_tls, new_tls = old.server.tls, new.server.tls
    if (old_tls is None) != (new_tls is None) or (
        old_tls is not None
        and new_tls is not None
        and (old_tls.client_ca_file is None) != (new_tls.client_ca_file is None)
    ):
        needs_restart.append("server.tls" if (old_tls is None) != (new_tls is None) else "server.tls.client_ca_file")
        kept.setdefault("server", {})["tls"] = old_tls
    config = new.model_copy(
        update={section: getattr(new, section).model_copy(update=values) for section, values in kept.items()}
    )

    old_streams = {s.name: s for s in old.streams}
    new_streams = {s.name: s for s in config.streams}
    streams = {
        "added": [name for name in new_streams if name not in old_streams],
        "removed": [name for name in old_streams if name not in new_streams],
        "changed": [name for name in new_streams if name in old_streams and new_streams[name] != old_streams[name]],
    }
    old_active = {name for name in old.sinks if old.streams_of(name)}
    new_active = [name for name in config.sinks if config.streams_of(name)]
    sinks = {
        "added": [name for name in new_active if name not in old_active],
        "removed": [name for name in old_active if name not in new_active],
        "changed": [name for name in new_active if name in old_active and config.sinks[name] != old.sinks[name]],
    }
    # Every sink new or changed in the file is built, fed by a stream or not (the WorkOS export uses sinks too).
    build = [name for name in config.sinks if name not in old.sinks or config.sinks[name] != old.sinks[name]]
    routes = {s.name: set(s.sinks) for s in config.streams}
    moved = frozenset(s.name for s in old.streams if routes.get(s.name) != set(s.sinks))
    return ReloadPlan(config, needs_restart, build, streams, sinks, moved)
