"""Fixtures shared by the sink tests: a real S3 server (Ceph RGW) on loopback and a boto3 client to it, and a
private CA for the HTTP sinks' TLS tests."""

from __future__ import annotations

import os
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trustme

from tests.peers.rgw import RGWServer, RGWUnavailable

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

REQUIRE_RGW_ENV = "LOG_BRIDGE_REQUIRE_RGW"


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    """A private CA that no system store knows."""
    return trustme.CA()


@pytest.fixture
def server_tls(ca: trustme.CA) -> ssl.SSLContext:
    """A server context with a certificate for 127.0.0.1 signed by `ca`."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    return context


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> str:
    """`ca`'s certificate as a PEM file, for a sink's `tls.ca_file`."""
    path = tmp_path / "private-ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture(scope="session")
def rgw_server() -> Iterator[RGWServer]:
    """A started Ceph RGW for the whole session; skipped where it cannot run, failed if LOG_BRIDGE_REQUIRE_RGW=1."""
    server = RGWServer()
    try:
        server.start()
    except RGWUnavailable as exc:
        reason = str(exc)
    else:
        reason = ""
    if reason:  # decided outside the except block so the report is not a chained traceback
        if os.environ.get(REQUIRE_RGW_ENV) == "1":
            pytest.fail(f"{REQUIRE_RGW_ENV}=1 but the Ceph RGW S3 server is unavailable:\n{reason}", pytrace=False)
        pytest.skip(f"Ceph RGW S3 server unavailable: {reason.splitlines()[0]}")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def rgw_s3_client(rgw_server: RGWServer) -> S3Client:
    """A boto3 S3 client authenticated as the RGW test user (``request_checksum_calculation="when_required"``)."""
    pytest.importorskip("boto3")
    return rgw_server.s3_client()
