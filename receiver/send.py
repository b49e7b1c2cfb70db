"""A minimal HTTP client posting one body to a receiver (`log-bridge send-test`): the standard library only."""

from __future__ import annotations

import ssl
import urllib.error
import urllib.request
from collections.abc import Mapping


class Unreachable(Exception):
    """No HTTP answer: the connection or the TLS handshake failed, or it timed out."""


def post(
    url: str,
    body: bytes,
    headers: Mapping[str, str],
    *,
    timeout: float,
    cafile: str | None = None,
    insecure: bool = False,
) -> tuple[int, str]:
    """POST `body` to an http:// or https:// `url`; the status and the answer's text (also for 4xx/5xx)."""
    if not url.startswith(("http://", "https://")):
        raise ValueError("URL must start with http:// or https://")
    context = None
    if url.startswith("https://"):
        context = ssl.create_default_context(cafile=cafile)
        if insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
    request = urllib.request.Request(url, data=body, headers=dict(headers), method="POST")  # noqa: S310 - scheme checked
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:  # noqa: S310
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError) as exc:
        raise Unreachable(str(getattr(exc, "reason", exc))) from None
