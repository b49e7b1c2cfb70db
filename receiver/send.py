"""A minimal HTTP client posting one body to a receiver (`log-bridge send-test`): the standard library only."""

from __future__ import annotations

import http.client
import ssl
import urllib.error
import urllib.request
from collections.abc import Mapping


class Unreachable(Exception):
    """No HTTP answer: the connection or the TLS handshake failed, or it timed out."""


NOT_TLS = ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "HTTP_REQUEST")
"""OpenSSL's reasons when the server answered the handshake with something else than TLS (plain HTTP)."""


def post(
    url: str,
    body: bytes,
    headers: Mapping[str, str],
    *,
    timeout: float,
    cafile: str | None = None,
    insecure: bool = False,
) -> tuple[int, str]:
    """POST `body` to an http:// or https:// `url`; the status and the answer's text (also for 4xx/5xx). A CA
    bundle that cannot be loaded is a ValueError, no answer an Unreachable that says what to try."""
    if not url.startswith(("http://", "https://")):
        raise ValueError("URL must start with http:// or https://")
    context = None
    if url.startswith("https://"):
        try:
            context = ssl.create_default_context(cafile=cafile)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"cannot load the CA bundle {cafile}: {exc.strerror or exc}") from None
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
        raise Unreachable(_why(getattr(exc, "reason", exc), url)) from None


def _why(reason: object, url: str) -> str:
    """What went wrong, and the next step where the cause is clear."""
    if isinstance(reason, ssl.SSLCertVerificationError):
        check = "pass --cafile with the CA that issued its certificate (--insecure skips the check)"
        return f"{reason.verify_message}: {check}"
    if isinstance(reason, ssl.SSLError) and reason.reason in NOT_TLS:
        return f"the server does not speak TLS there: is it http://? ({reason})"
    if isinstance(reason, http.client.RemoteDisconnected) and url.startswith("http://"):
        return "the server closed the connection without answering: is it https://, or does it refuse this address?"
    return str(reason)
