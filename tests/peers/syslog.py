"""Real syslog servers on loopback for the `syslog` sink: rsyslog (imtcp, gtls) and syslog-ng (`syslog()` and
`network()` sources, TLS), each writing every message it parses as one JSON line, plus the compliance `Harness`.

Debian's rsyslog and syslog-ng-core conflict (both are the system logger), so CI installs syslog-ng with apt and
unpacks rsyslog under /opt/rsyslog (.ci/run); `RSYSLOGD` / `SYSLOG_NG` name other binaries. Without a server
the tests skip, unless LOG_BRIDGE_REQUIRE_SYSLOG=1 (CI), where they fail.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import trustme

from sinks.base import Sink
from sinks.syslog import SyslogConfig, SyslogSink
from sinks.testing.compliance import Mode
from sinks.testing.exact import loads

Framing = Literal["octet-counting", "non-transparent"]


class SyslogUnavailable(RuntimeError):
    """The server's binary is not installed here."""


def rsyslogd() -> tuple[str, str | None]:
    """(rsyslogd binary, module directory or None for its built-in one)."""
    for candidate in (os.environ.get("RSYSLOGD"), shutil.which("rsyslogd"), "/opt/rsyslog/usr/sbin/rsyslogd"):
        if candidate and Path(candidate).is_file():
            root = Path(candidate).parents[2]  # <root>/usr/sbin/rsyslogd
            modules = sorted(root.glob("usr/lib/*/rsyslog")) if not candidate.startswith("/usr/") else []
            return candidate, str(modules[0]) if modules else None
    raise SyslogUnavailable("rsyslogd is not installed (apt-get download rsyslog rsyslog-gnutls; see .ci/run)")


def syslog_ng() -> str:
    """The syslog-ng binary."""
    for candidate in (os.environ.get("SYSLOG_NG"), shutil.which("syslog-ng"), "/usr/sbin/syslog-ng"):
        if candidate and Path(candidate).is_file():
            return candidate
    raise SyslogUnavailable("syslog-ng is not installed (apt-get install syslog-ng-core)")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Certificates:
    """A trustme CA with a server certificate for 127.0.0.1/localhost and a client certificate, as files."""

    def __init__(self, directory: Path) -> None:
        self.ca = trustme.CA()
        server = self.ca.issue_cert("127.0.0.1", "localhost")
        client = self.ca.issue_cert("log-bridge-client@example.com")
        self.ca_file = str(directory / "ca.pem")
        self.cert_file, self.key_file = str(directory / "server.pem"), str(directory / "server.key")
        self.client_cert, self.client_key = str(directory / "client.pem"), str(directory / "client.key")
        self.ca.cert_pem.write_to_path(self.ca_file)
        server.cert_chain_pems[0].write_to_path(self.cert_file)
        server.private_key_pem.write_to_path(self.key_file)
        client.cert_chain_pems[0].write_to_path(self.client_cert)
        client.private_key_pem.write_to_path(self.client_key)


class SyslogServer:
    """One syslog server process on 127.0.0.1; `messages()` reads what it wrote."""

    kind = "?"

    def __init__(self, directory: Path, *, tls: Certificates | None = None, client_auth: bool = False) -> None:
        self.directory = directory
        self.tls = tls
        self.client_auth = client_auth
        self.port = free_port()
        self.output = directory / f"{self.kind}-messages.json"
        self.process: subprocess.Popen[bytes] | None = None
        self.log = directory / f"{self.kind}.log"

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.kind} exited: {self.log.read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{self.kind} did not listen on {self.port}: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        """Stop the server the way a service manager does (SIGTERM), so it writes what it has read."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)

    def messages(self) -> list[dict[str, Any]]:
        """Every message the server parsed and wrote, as the fields it parsed."""
        if not self.output.exists():
            return []
        # The server may be writing a line as it is read: only lines it has ended count.
        complete = self.output.read_text().rpartition("\n")[0]
        return [json.loads(line) for line in complete.splitlines() if line.strip()]

    def sink(self, name: str = "siem", **options: Any) -> SyslogSink:
        """A syslog sink pointed at this server."""
        base: dict[str, Any] = {"host": "127.0.0.1", "port": self.port, "transport": "tls" if self.tls else "tcp"}
        if self.tls is not None:
            base["tls"] = {"ca_file": self.tls.ca_file}
            if self.client_auth:
                base["tls"].update(cert_file=self.tls.client_cert, key_file=self.tls.client_key)
        return SyslogSink(name, SyslogConfig.model_validate({**base, **options}))


class Rsyslog(SyslogServer):
    """rsyslogd with imtcp (octet-counted and LF framing both accepted), TLS through the gtls driver."""

    kind = "rsyslog"

    def __init__(self, directory: Path, *, max_message_size: str = "1m", **kwargs: Any) -> None:
        super().__init__(directory, **kwargs)
        self.max_message_size = max_message_size
        """rsyslog's `maxMessageSize` (its own default is 8k)."""

    def command(self) -> list[str]:
        binary, modules = rsyslogd()
        conf = self.directory / "rsyslog.conf"
        tls = self.tls
        lines = [f'global(workDirectory="{self.directory}" maxMessageSize="{self.max_message_size}"']
        if tls is not None:
            lines.append(
                f'  defaultNetstreamDriverCAFile="{tls.ca_file}" defaultNetstreamDriverCertFile="{tls.cert_file}"'
                f' defaultNetstreamDriverKeyFile="{tls.key_file}"'
            )
        lines.append(")")
        if tls is None:
            lines.append('module(load="imtcp")')
        else:
            auth = "x509/certvalid" if self.client_auth else "anon"
            lines.append(
                f'module(load="imtcp" streamDriver.name="gtls" streamDriver.mode="1" streamDriver.authMode="{auth}")'
            )
        fields = [("pri", "pri"), ("facility", "syslogfacility-text"), ("severity", "syslogseverity-text"),
                  ("time", "timereported"), ("host", "hostname"), ("app", "app-name"), ("procid", "procid"),
                  ("msgid", "msgid"), ("sd", "structured-data"), ("msg", "msg")]  # fmt: skip
        props = "\n".join(
            f'  property(outname="{out}" name="{name}" format="jsonf"'
            + (' dateFormat="rfc3339"' if name == "timereported" else "")
            + ")"
            for out, name in fields
        )
        lines += [
            f'template(name="fields" type="list" option.jsonf="on") {{\n{props}\n}}',
            f'input(type="imtcp" address="127.0.0.1" port="{self.port}" ruleset="out")',
            f'ruleset(name="out") {{ action(type="omfile" file="{self.output}" template="fields") }}',
        ]
        conf.write_text("\n".join(lines) + "\n")
        command = [binary, "-n", "-f", str(conf), "-i", str(self.directory / "rsyslog.pid")]
        return command + (["-M", modules] if modules else [])


class SyslogNg(SyslogServer):
    """syslog-ng with a `syslog()` source (octet counting, RFC 6587/5425) or, for LF framing, a `network()` source
    with `flags(syslog-protocol)`; TLS with its own certificate."""

    kind = "syslog-ng"

    def __init__(self, directory: Path, *, framing: Framing = "octet-counting", **kwargs: Any) -> None:
        super().__init__(directory, **kwargs)
        self.framing = framing

    def command(self) -> list[str]:
        binary = syslog_ng()
        transport = "tls" if self.tls else "tcp"
        tls = ""
        if self.tls is not None:
            verify = "required-trusted" if self.client_auth else "optional-untrusted"
            tls = (
                f'tls(key-file("{self.tls.key_file}") cert-file("{self.tls.cert_file}") '
                f'ca-file("{self.tls.ca_file}") peer-verify({verify}))'
            )
        common = f'ip("127.0.0.1") port({self.port}) transport("{transport}") log-msg-size(1048576) {tls}'
        source = (
            f"syslog({common})" if self.framing == "octet-counting" else f"network({common} flags(syslog-protocol))"
        )
        pairs = " ".join(
            f"--pair {key}=${value}"
            for key, value in (
                ("pri", "PRI"),
                ("facility", "FACILITY"),
                ("severity", "LEVEL"),
                ("time", "ISODATE"),
                ("host", "HOST"),
                ("app", "PROGRAM"),
                ("msgid", "MSGID"),
                ("sd", "SDATA"),
                ("msg", "MSG"),
            )  # fmt: skip
        )
        sd = "${.SDATA.workos@32473"
        template = f"$(format-json {pairs} --pair sd_id={sd}.id}} --pair sd_key={sd}.keySuffix}})\\n"
        conf = self.directory / "syslog-ng.conf"
        conf.write_text(
            "@version: 3.38\n"
            "options { keep-hostname(yes); chain-hostnames(no); use-dns(no); stats_freq(0); frac-digits(3);"
            " log-msg-size(1048576); };\n"
            f"source s_net {{ {source}; }};\n"
            f'destination d_file {{ file("{self.output}" template("{template}")); }};\n'
            "log { source(s_net); destination(d_file); };\n"
        )
        d = self.directory
        return [binary, "-F", "--no-caps", "-f", str(conf), "-R", str(d / "sng.persist"), "-p", str(d / "sng.pid"),
                "-c", str(d / "sng.ctl")]  # fmt: skip


class Harness:
    """The syslog sink against rsyslog over TLS; "retry" stops the server (connection refused) until "ok"."""

    supports = frozenset({"retry"})  # syslog has no answer: nothing can be refused per event or for good

    def __init__(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="log-bridge-syslog-"))
        self.server = Rsyslog(self.directory, tls=Certificates(self.directory))

    async def start(self) -> None:
        """Start rsyslog (skip, or fail under LOG_BRIDGE_REQUIRE_SYSLOG=1, where it is not installed)."""
        try:
            rsyslogd()
        except SyslogUnavailable as exc:
            import pytest

            if os.environ.get("LOG_BRIDGE_REQUIRE_SYSLOG") == "1":
                pytest.fail(f"LOG_BRIDGE_REQUIRE_SYSLOG=1 but {exc}")
            pytest.skip(str(exc))
        self.server.start()

    async def stop(self) -> None:
        """Stop rsyslog and remove its files."""
        self.server.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def build(self) -> Sink:
        """A syslog sink over TLS to the server."""
        return self.server.sink()

    def set_mode(self, mode: Mode) -> None:
        """Stop or start the server."""
        if mode == "retry":
            self.server.stop()
        elif self.server.process is None:
            self.server.start()

    async def received(self) -> list[dict[str, Any]]:
        """The bare events in the messages the server wrote."""
        deadline = time.monotonic() + 5
        messages = self.server.messages()
        while time.monotonic() < deadline:  # rsyslog writes asynchronously: wait until the file stops growing
            time.sleep(0.1)
            again = self.server.messages()
            if len(again) == len(messages):
                break
            messages = again
        return [loads(message["msg"])["event"] for message in messages]
