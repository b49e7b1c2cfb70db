"""JSON-lines logging on stderr. Log calls pass context in `extra`; no caller passes a secret, and every line is
scrubbed anyway: the configured secrets and credential-shaped header values are masked whatever logged them.

Libraries' own loggers (botocore dumps request headers at debug) stay at INFO or above unless named with
`--debug-logger NAME`; what they print is scrubbed like the rest.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Iterable
from typing import Any

import orjson

_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}

OWN_LOGGERS = ("receiver", "sinks", "log_bridge")
"""Loggers that `--log-level debug` turns to debug; every other logger (a library's) stays at INFO at most."""

MASK = "[redacted]"
MIN_SECRET_LENGTH = 4
"""Shorter configured values are not masked (masking `a` would garble every line); validation warns of them."""

_CREDENTIAL = re.compile(
    r"(?i)((?:authorization|proxy-authorization|x-amz-security-token|x-amz-credential|dd-api-key|"
    r"dd-application-key|x-splunk-request-channel|cookie|set-cookie|api[_-]?key|token|secret|password|"
    r"aws_access_key_id|aws_secret_access_key|aws_session_token|credential)"
    r"\\?['\"]?\s*[:=]\s*b?\\?['\"]?(?:(?:bearer|splunk|basic|aws4-hmac-sha256)\s+)?)"
    r"([^\s'\"\\,;&}]+)"
)
"""A header or field whose name says it holds a credential: its value is masked (the name is kept)."""
_CREDENTIAL_ELEMENT = re.compile(
    r"(?i)(<(SecretAccessKey|SessionToken|AccessKeyId|Token|Password|ClientSecret)>)[^<]*(</\2>)"
)
"""A credential in XML (an STS reply botocore prints at debug): the element's text is masked."""
_AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b")


class Scrubber:
    """Masks secrets in text: the configured ones (registered at start and on reload) and credential shapes."""

    def __init__(self) -> None:
        self._secrets: re.Pattern[str] | None = None

    def register(self, secrets: Iterable[str]) -> None:
        """Replace the set of known secret values (longest first, so one inside another is masked whole)."""
        # Lines are JSON: a value with a quote or a backslash appears escaped, so both forms are masked.
        known = {s for s in secrets if len(s) >= MIN_SECRET_LENGTH}
        known |= {orjson.dumps(s).decode()[1:-1] for s in known}
        values = sorted(known, key=len, reverse=True)
        self._secrets = re.compile("|".join(map(re.escape, values))) if values else None

    def __call__(self, text: str) -> str:
        if self._secrets is not None:
            text = self._secrets.sub(MASK, text)
        text = _CREDENTIAL.sub(lambda m: m.group(1) + MASK, text)
        text = _CREDENTIAL_ELEMENT.sub(lambda m: m.group(1) + MASK + m.group(3), text)
        return _AWS_KEY_ID.sub(MASK, text)


scrub = Scrubber()
"""The process's scrubber; the service registers its configuration's secrets with it."""


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, and the record's `extra` fields; scrubbed."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return scrub(orjson.dumps(entry, default=str).decode())


class _OwnOrNamed(logging.Filter):
    """Lets DEBUG records through only from log-bridge's loggers and those named on the command line."""

    def __init__(self, names: Iterable[str]) -> None:
        super().__init__()
        self._names = tuple(OWN_LOGGERS) + tuple(names)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.INFO:
            return True
        return any(record.name == name or record.name.startswith(name + ".") for name in self._names)


def setup_logging(level: str = "info", debug_loggers: Iterable[str] = ()) -> None:
    """Send every log record to stderr as JSON lines; libraries' debug output only from `debug_loggers`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(_OwnOrNamed(debug_loggers))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
