"""The ArcSight Common Event Format (CEF) line of a WorkOS event, for the syslog sink's `format: cef`.

Every value is taken from the event's bytes as received, never from parsed Python values: a string field
carries its characters, and any other value (a number, an object, an array, `true`) carries its JSON text as
WorkOS sent it, with only the whitespace outside strings removed. So an integer beyond 64 bits, `1e999`, a
decimal with more digits than a double holds and every string escape inside `targets` reach the SIEM
unchanged, and no valid event fails to encode for the size of a number. The mapping is in docs/sinks/syslog.md.
"""

from __future__ import annotations

import ipaddress
import re

import msgspec

from sinks.base import Event

__all__ = ["cef_line"]

_ABSENT = msgspec.Raw(b"")


class _Actor(msgspec.Struct):
    """The actor's fields CEF maps, each as its JSON text; the rest is skipped, never converted."""

    id: msgspec.Raw = _ABSENT
    name: msgspec.Raw = _ABSENT
    type: msgspec.Raw = _ABSENT


class _Target(msgspec.Struct):
    """The first target's fields CEF maps."""

    id: msgspec.Raw = _ABSENT
    name: msgspec.Raw = _ABSENT


class _Context(msgspec.Struct):
    """The context's fields CEF maps."""

    location: msgspec.Raw = _ABSENT
    user_agent: msgspec.Raw = _ABSENT


class _CefEvent(msgspec.Struct):
    """The event's fields CEF maps; `actor`, `targets` and `context` stay raw, as they may be any JSON value."""

    id: msgspec.Raw = _ABSENT
    actor: msgspec.Raw = _ABSENT
    targets: msgspec.Raw = _ABSENT
    context: msgspec.Raw = _ABSENT
    organization_id: msgspec.Raw = _ABSENT


_event = msgspec.json.Decoder(_CefEvent).decode
_actor = msgspec.json.Decoder(_Actor).decode
_target = msgspec.json.Decoder(_Target).decode
_context = msgspec.json.Decoder(_Context).decode
_elements = msgspec.json.Decoder(list[msgspec.Raw]).decode
_string = msgspec.json.Decoder(str).decode

_HEADER_ESCAPE = re.compile(r"([\\|])")
_VALUE_ESCAPE = re.compile(r"([\\=])")


def cef_line(event: Event, severity: int) -> bytes:
    """`CEF:0|WorkOS|Audit Logs|1|<action>|<action>|<severity>|<extension>` for `event`.

    ValueError (msgspec.DecodeError is one) when the wrapper has no event, or its event is not a JSON object."""
    bare = event.event_raw
    if not bare.startswith(b"{"):
        raise ValueError("the wrapper's `event` is not a JSON object")
    data = _event(bare)
    actor = _actor(data.actor) if _is(data.actor, b"{") else _Actor()
    context = _context(data.context) if _is(data.context, b"{") else _Context()
    # Targets that are not objects are left out, as they always were; the others keep their bytes.
    targets = [t for t in _elements(data.targets) if _is(t, b"{")] if _is(data.targets, b"[") else []
    first = _target(targets[0]) if targets else _Target()
    location = _text(context.location)
    ip = _is(context.location, b'"') and location is not None and _is_ip(location)
    fields: list[tuple[str, str | None]] = [
        ("rt", str(int(event.time * 1000))),
        ("act", event.action),
        ("externalId", _text(data.id)),
        ("suid", _text(actor.id)),
        ("suser", _text(actor.name) or _text(actor.id)),
        ("duid", _text(first.id)),
        ("duser", _text(first.name)),
        ("src", location if ip else None),
        ("requestClientApplication", _text(context.user_agent)),
    ]
    custom = (
        ("actorType", _text(actor.type)),
        ("targets", "[" + ",".join(_json(t) for t in targets) + "]" if targets else None),
        ("location", None if ip else location),
        ("keySuffix", event.key_suffix),
        ("organizationId", _text(data.organization_id)),
    )
    for number, (label, value) in enumerate(custom, 1):
        if value:
            fields += [(f"cs{number}Label", label), (f"cs{number}", value)]
    extension = " ".join(f"{key}={_escape(value)}" for key, value in fields if value)
    name = _escape(event.action, _HEADER_ESCAPE)
    return f"CEF:0|WorkOS|Audit Logs|1|{name}|{name}|{severity}|{extension}".encode()


def _is(raw: msgspec.Raw, start: bytes) -> bool:
    """Whether the raw JSON value starts with `start` (`{` an object, `[` an array, `"` a string)."""
    return bytes(memoryview(raw)[:1]) == start


def _json(raw: msgspec.Raw) -> str:
    """The value's JSON text as sent, without the whitespace outside strings (values keep every byte)."""
    return msgspec.json.format(raw, indent=-1).decode()


def _text(raw: msgspec.Raw) -> str | None:
    """A field's CEF value: a string's characters, any other value's JSON text; None when absent, null or ""."""
    if not raw or _is(raw, b"n"):  # absent, or null
        return None
    if _is(raw, b'"'):
        return _string(raw) or None
    return _json(raw)


def _is_ip(value: str) -> bool:
    try:
        return bool(ipaddress.ip_address(value))
    except ValueError:
        return False


def _escape(value: str, special: re.Pattern[str] = _VALUE_ESCAPE) -> str:
    """A value with its `special` characters escaped (an extension's `\\` and `=`, the header's `\\` and `|`)
    and line breaks written as `\\n` / `\\r`, so that no value ends the line."""
    return special.sub(r"\\\1", value).replace("\r", "\\r").replace("\n", "\\n")
