"""A throwaway Ceph cluster on loopback (one monitor, one memstore OSD, one RGW): a real S3 server for tests.

Everything lives in one temporary directory (its own ``ceph.conf``, fsid, monitor store, run dir with the pid
files and admin sockets, logs); nothing is read from or written to ``/etc/ceph``, ``/var/lib/ceph`` or
``/var/log/ceph``. Ports are picked at run time, so several instances (several pytest sessions) can run at once.
Cephx is off between the daemons, but RGW still checks S3 request signatures against the user's keys.

    with RGWServer() as rgw:
        boto3.client("s3", endpoint_url=rgw.endpoint_url, aws_access_key_id=rgw.access_key, ...)
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import http.client
import os
import secrets
import shutil
import signal
import socket
import string
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

__all__ = ["BINARIES", "APT_PACKAGES", "RGWServer", "RGWUnavailable", "missing_binaries", "reap_stale_daemons"]

BINARIES = ("ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "ceph", "monmaptool")
APT_PACKAGES = "radosgw ceph-mon ceph-osd ceph-common"
DIR_PREFIX = "log-bridge-rgw-"
CLUSTER = "logbridge"
RGW_NAME = "client.rgw.a"
OWNER_FILE = "owner"
LOG_TAIL_LINES = 25
START_ATTEMPTS = 3  # a daemon can lose a port picked at run time to another process; then start again
# A daemon's admin socket path must fit in sockaddr_un.sun_path (108 bytes) or the daemon refuses to start.
MAX_SOCKET_PATH = 100
_PROGRAMS = {name.encode() for name in BINARIES}
_BIND_ERRORS = ("Address already in use", "unable to bind", "failed to bind")


class RGWUnavailable(Exception):
    """The RGW server cannot run here or did not start; the message says why (with the relevant log tail)."""


class _PortTaken(RGWUnavailable):
    """A daemon lost the race for a port picked at run time; starting again with new ports may succeed."""


def missing_binaries() -> list[str]:
    """Names of the Ceph programs the server needs that are not on PATH."""
    return [name for name in BINARIES if shutil.which(name) is None]


@dataclass
class _Daemon:
    """One daemon started by the server, run in the foreground in its own process group."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    out: Path


class RGWServer:
    """A single-node Ceph cluster with an RGW S3 endpoint on 127.0.0.1, started and stopped by this object."""

    region: str = "us-east-1"

    def __init__(self, workdir: Path | None = None) -> None:
        """Prepare a server; its temporary directory is made inside ``workdir`` (default: the system temp dir)."""
        self._parent = workdir
        self._dir: Path | None = None
        self._daemons: list[_Daemon] = []
        # CEPH_ARGS/CEPH_CONF would point the tools elsewhere; PYTHON* would leak this venv into the `ceph` CLI
        self._env = {k: v for k, v in os.environ.items() if not k.startswith(("CEPH_", "PYTHON"))}
        self.endpoint_url = ""
        self.access_key = "".join(secrets.choice(string.ascii_uppercase + string.digits) for _ in range(20))
        self.secret_key = secrets.token_urlsafe(30)
        self.start_seconds: float | None = None
        self.stop_seconds: float | None = None

    def __repr__(self) -> str:
        return f"RGWServer(endpoint_url={self.endpoint_url!r}, dir={str(self._dir)!r})"

    def __enter__(self) -> RGWServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def directory(self) -> Path | None:
        """The temporary directory holding the cluster while it runs."""
        return self._dir

    @property
    def pids(self) -> list[int]:
        """Process ids of the daemons this server started (running or not)."""
        return [d.proc.pid for d in self._daemons]

    def s3_client(self, *, access_key: str | None = None, secret_key: str | None = None) -> S3Client:
        """A boto3 S3 client for this server (needs boto3) that adds no checksums of its own (``when_required``).

        ``access_key``/``secret_key`` override the test user's keys, e.g. to check that RGW refuses wrong ones.
        """
        import boto3
        from botocore.config import Config

        config = Config(
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            s3={"addressing_style": "path"},
            retries={"mode": "standard", "max_attempts": 2},
            connect_timeout=5,
            read_timeout=30,
        )
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=access_key or self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            region_name=self.region,
            config=config,
        )

    # -- lifecycle -------------------------------------------------------------------------------------------------

    def start(self, timeout: float = 90.0) -> None:
        """Start monitor, OSD and RGW, create the S3 user and block until S3 answers; raise RGWUnavailable."""
        if self._daemons:
            raise RuntimeError("RGWServer already started")
        missing = missing_binaries()
        if missing:
            raise RGWUnavailable(
                f"Ceph programs not found on PATH: {', '.join(missing)} "
                f"(install with: apt-get install -y --no-install-recommends {APT_PACKAGES})"
            )
        reap_stale_daemons()
        if self._parent is not None:
            reap_stale_daemons(self._parent)
        began = time.monotonic()
        deadline = began + timeout
        atexit.register(self.stop)
        try:
            for attempt in range(1, START_ATTEMPTS + 1):
                try:
                    self._start_once(deadline)
                    break
                except _PortTaken:
                    if attempt == START_ATTEMPTS:
                        raise
                    self._teardown()
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - began

    def stop(self) -> None:
        """Kill every daemon this server started and remove its directory; safe to call more than once."""
        began = time.monotonic()
        atexit.unregister(self.stop)
        self._teardown()
        self.stop_seconds = time.monotonic() - began

    def _teardown(self) -> None:
        # SIGKILL: the cluster is thrown away, and a memstore OSD would spend time saving its store on SIGTERM.
        for daemon in self._daemons:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(daemon.proc.pid, signal.SIGKILL)
        for daemon in self._daemons:
            with contextlib.suppress(subprocess.TimeoutExpired):
                daemon.proc.wait(timeout=10)
        self._daemons = []
        if self._dir is not None and os.environ.get("LOG_BRIDGE_RGW_KEEP") != "1":
            shutil.rmtree(self._dir, ignore_errors=True)
        self._dir = None
        self.endpoint_url = ""

    def _start_once(self, deadline: float) -> None:
        base = Path(tempfile.mkdtemp(prefix=DIR_PREFIX, dir=self._parent)).resolve()
        self._dir = base
        (base / OWNER_FILE).write_text(_owner_token(os.getpid()) or "")
        for sub in ("run", "log", "mon", "osd/0", "rgw", "crash"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        mon_port, rgw_port = _free_ports(2)
        fsid = str(uuid.uuid4())
        conf = base / "ceph.conf"
        conf.write_text(_ceph_conf(base, fsid, mon_port, rgw_port))

        self._run(["monmaptool", "--create", "--fsid", fsid, "--addv", "a", f"[v2:127.0.0.1:{mon_port}]",
                   str(base / "monmap")], deadline)  # fmt: skip
        self._run(["ceph-mon", *self._ceph_args(), "--mkfs", "-i", "a", "--monmap", str(base / "monmap")], deadline)
        mon = self._spawn("mon.a", ["ceph-mon", *self._ceph_args(), "-f", "-i", "a"])
        self._wait_for(lambda: _port_open(mon_port), deadline, f"monitor to listen on 127.0.0.1:{mon_port}", mon)

        osd_uuid = str(uuid.uuid4())
        osd_id = self._run(["ceph", *self._ceph_args(), "osd", "new", osd_uuid], deadline, mon).strip()
        if osd_id != "0":
            raise RGWUnavailable(f"'ceph osd new' returned OSD id {osd_id!r}, expected 0")
        self._run(["ceph-osd", *self._ceph_args(), "-i", "0", "--mkfs", "--osd-uuid", osd_uuid], deadline, mon)
        osd = self._spawn("osd.0", ["ceph-osd", *self._ceph_args(), "-f", "-i", "0"])

        # radosgw-admin waits for the OSD, then creates the default zone, its pools and the user; RGW starts after
        # it so the two never race to create the default realm/zone objects.
        self._run(["radosgw-admin", *self._ceph_args(), "user", "create", "--uid", "log-bridge",
                   "--display-name", "log-bridge tests", "--access-key", self.access_key,
                   "--secret-key", self.secret_key], deadline, osd)  # fmt: skip
        rgw = self._spawn(RGW_NAME, ["radosgw", *self._ceph_args(), "-n", RGW_NAME, "-f"])
        self.endpoint_url = f"http://127.0.0.1:{rgw_port}"
        self._wait_for(lambda: _s3_answers(rgw_port), deadline, f"RGW to answer S3 on {self.endpoint_url}", rgw)

    # -- helpers ---------------------------------------------------------------------------------------------------

    def _ceph_args(self) -> list[str]:
        assert self._dir is not None
        return ["--cluster", CLUSTER, "-c", str(self._dir / "ceph.conf")]

    def _spawn(self, name: str, argv: list[str]) -> _Daemon:
        assert self._dir is not None
        out = self._dir / "log" / f"{name}.out"
        with out.open("wb") as sink:
            proc = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
                argv, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT, env=self._env,
                start_new_session=True, cwd=self._dir,
            )  # fmt: skip
        daemon = _Daemon(name, proc, self._dir / "log" / f"{CLUSTER}-{name}.log", out)
        self._daemons.append(daemon)
        return daemon

    def _run(self, argv: list[str], deadline: float, related: _Daemon | None = None) -> str:
        """Run one setup command to completion and return its stdout; raise RGWUnavailable with logs on failure."""
        remaining = max(1.0, deadline - time.monotonic())
        try:
            done = subprocess.run(  # noqa: S603 - fixed argv, no shell
                argv, stdin=subprocess.DEVNULL, capture_output=True, env=self._env, timeout=remaining, cwd=self._dir,
                check=False,
            )  # fmt: skip
        except subprocess.TimeoutExpired as exc:
            raise RGWUnavailable(self._report(f"'{_describe(argv)}' timed out", related)) from exc
        if done.returncode != 0:
            what = f"'{_describe(argv)}' exited with status {done.returncode}"
            output = (done.stderr or done.stdout).decode(errors="replace")
            raise RGWUnavailable(self._report(what, related, output))
        return done.stdout.decode(errors="replace")

    def _wait_for(self, ready: Callable[[], bool], deadline: float, what: str, daemon: _Daemon) -> None:
        delay = 0.05
        while not ready():
            for d in self._daemons:
                if d.proc.poll() is not None:
                    status = d.proc.returncode
                    # radosgw exits with EADDRINUSE when its port is taken, sometimes before its log line is
                    # written, so the status is checked as well as the log.
                    reason = " (Address already in use)" if status == errno.EADDRINUSE else ""
                    message = self._report(f"{d.name} exited with status {status}{reason} while waiting for {what}", d)
                    if any(marker in message for marker in _BIND_ERRORS):
                        raise _PortTaken(message)
                    raise RGWUnavailable(message)
            if time.monotonic() > deadline:
                raise RGWUnavailable(self._report(f"timed out waiting for {what}", daemon))
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    def _report(self, what: str, related: _Daemon | None, output: str = "") -> str:
        """Build a failure message: what failed, the command output and the tail of the relevant daemon log."""
        parts = [f"Ceph RGW test server did not start: {what}"]
        if output.strip():
            parts.append("--- command output ---\n" + _tail_text(output))
        for daemon in [related] if related is not None else self._daemons:
            if daemon is None:
                continue
            for path in (daemon.out, daemon.log):
                text = _tail_file(path)
                if text:
                    parts.append(f"--- {daemon.name}: {path.name} (last lines) ---\n{text}")
        return "\n".join(parts)


def _ceph_conf(base: Path, fsid: str, mon_port: int, rgw_port: int) -> str:
    """The cluster's whole configuration; every path points inside ``base``."""
    asok = "$run_dir/$cluster-$name.asok"
    if len(str(base / "run" / f"{CLUSTER}-{RGW_NAME}.asok")) > MAX_SOCKET_PATH:
        asok = ""  # an empty path turns the admin sockets off rather than failing on a too-long socket path
    return f"""\
[global]
fsid = {fsid}
mon host = v2:127.0.0.1:{mon_port}
mon initial members = a
public addr = 127.0.0.1
ms bind msgr1 = false
ms bind ipv6 = false
# cephx off between the daemons; plain CRC framing (a "secure" connection needs cephx session keys).
auth cluster required = none
auth service required = none
auth client required = none
ms mon client mode = crc
ms mon service mode = crc
ms mon cluster mode = crc
ms client mode = crc
ms service mode = crc
ms cluster mode = crc
# every monitor map change waits out the propose interval (1 s by default): the cluster is set up through a
# dozen of them
paxos propose interval = 0.01
paxos min wait = 0.01
# whatever is left for the next tick should not wait 5 s; a client that used a pool before its map arrived
# re-checks on the objecter tick (radosgw-admin stalled 5 s in one start out of ten without this)
mon tick interval = 1
objecter tick interval = 0.5
# a client that cannot reach the monitor gives up instead of hunting for 5 minutes
client mount timeout = 30
mon allow pool size one = true
mon allow pool delete = true
mon max pg per osd = 1000
mon data avail warn = 1
mon data avail crit = 0
mon osd down out interval = 0
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
osd objectstore = memstore
memstore device bytes = 1073741824
run dir = {base}/run
admin socket = {asok}
pid file = $run_dir/$cluster-$name.pid
log file = {base}/log/$cluster-$name.log
log to stderr = false
err to stderr = false
mon cluster log file = {base}/log/$cluster.log
crash dir = {base}/crash
keyring = {base}/keyring
mon data = {base}/mon/$id
osd data = {base}/osd/$id
osd journal = {base}/osd/$id/journal
rgw data = {base}/rgw

[{RGW_NAME}]
rgw frontends = beast endpoint=127.0.0.1:{rgw_port}
rgw enable lc threads = false
rgw enable quota threads = false
rgw enable usage log = false
"""


def _describe(argv: list[str]) -> str:
    """A command line for messages: without the common ``--cluster``/``-c`` arguments and the secret key."""
    shown: list[str] = []
    skip = 0
    for arg in argv:
        if skip:
            skip -= 1
        elif arg in ("--cluster", "-c"):
            skip = 1
        elif arg == "--secret-key":
            shown.append("--secret-key ***")
            skip = 1
        else:
            shown.append(arg)
    return " ".join(shown)


def _free_ports(count: int) -> list[int]:
    """Distinct loopback ports free right now (the kernel picks them; a daemon may still lose a race for one)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
        return ports


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _s3_answers(port: int) -> bool:
    """True when RGW answers an anonymous ListBuckets with an S3 response."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", "/")
        response = conn.getresponse()
        body = response.read()
    except OSError:
        return False
    finally:
        conn.close()
    return response.status == 200 and b"ListAllMyBucketsResult" in body


def _tail_text(text: str, lines: int = LOG_TAIL_LINES) -> str:
    # rocksdb statistics dumps (monitor log) say nothing about why a start failed
    kept = [line for line in text.splitlines() if line.strip() and "rocksdb" not in line]
    return "\n".join(kept[-lines:])


def _tail_file(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 64 * 1024))
            return _tail_text(fh.read().decode(errors="replace"), lines)
    except OSError:
        return ""


def _owner_token(pid: int) -> str | None:
    """``"<pid> <start time>"`` of a live process (the start time tells a reused pid apart), else None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may contain spaces and parentheses; fields after its closing ")" are fixed
    fields = stat[stat.rindex(")") + 2 :].split()
    return f"{pid} {fields[19]}"


def _daemon_conf_dir(pid: int) -> Path | None:
    """The server directory of a Ceph program run by an RGWServer (from its ``-c`` argument), else None."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    # the `ceph` CLI is a Python script: its name is the interpreter's second argument
    if not {os.path.basename(a) for a in argv[:2]} & _PROGRAMS:
        return None
    for flag, value in zip(argv, argv[1:], strict=False):
        if flag == b"-c" and value.endswith(b"/ceph.conf"):
            conf_dir = Path(value.decode(errors="replace")).parent
            if conf_dir.name.startswith(DIR_PREFIX):
                return conf_dir
    return None


def _owner_alive(server_dir: Path) -> bool | None:
    """Whether the process that made ``server_dir`` still runs; None while its owner file is not written yet."""
    try:
        token = (server_dir / OWNER_FILE).read_text().strip()
    except FileNotFoundError:
        return None if server_dir.is_dir() else False
    except OSError:
        return False
    owner_pid = int(token.split()[0]) if token[:1].isdigit() else 0
    return bool(token) and _owner_token(owner_pid) == token


def reap_stale_daemons(under: Path | None = None) -> list[int]:
    """Kill the daemons of RGWServers whose owning process is gone, remove their dirs; return the killed pids.

    Daemons of a live owner (another pytest session running right now) are left alone. ``under`` limits the sweep
    to servers made inside that directory; without it every such daemon is found, and leftover directories are
    looked for in the system temp dir.
    """
    scope = under.resolve() if under is not None else None
    killed: list[int] = []
    stale_dirs: set[Path] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        server_dir = _daemon_conf_dir(int(entry.name))
        if server_dir is None or (scope is not None and server_dir.parent != scope):
            continue
        # a daemon only runs once its owner file is written, so "not written" means the dir is gone or broken
        if _owner_alive(server_dir):
            continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(int(entry.name), signal.SIGKILL)
            killed.append(int(entry.name))
        stale_dirs.add(server_dir)
    # plus directories of servers whose owner died before any daemon ran or after they were killed
    stale_dirs.update(
        d for d in (scope or Path(tempfile.gettempdir())).glob(DIR_PREFIX + "*") if _owner_alive(d) is False
    )
    for server_dir in stale_dirs:
        shutil.rmtree(server_dir, ignore_errors=True)
    return killed


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main() -> None:
    """Run a server by hand until Ctrl-C: ``python -m tests.peers.rgw``; prints the endpoint and the keys."""
    signal.signal(signal.SIGTERM, _exit_on_signal)  # so `kill` stops the daemons too, even during start()
    server = RGWServer()
    try:
        server.start()
    except RGWUnavailable as exc:
        raise SystemExit(str(exc)) from None
    print(f"RGW started in {server.start_seconds:.1f} s, files in {server.directory}")
    print(f"export AWS_ENDPOINT_URL={server.endpoint_url}")
    print(f"export AWS_ACCESS_KEY_ID={server.access_key}")
    print(f"export AWS_SECRET_ACCESS_KEY={server.secret_key}")
    print(f"export AWS_DEFAULT_REGION={server.region}")
    print("Ctrl-C stops it and removes everything.", flush=True)
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
