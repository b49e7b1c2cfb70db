"""Intake benchmark: the receiver (file sink delivering, journal with group commit) against three no-op
handlers under the same load, at 1, 10 and 100 events per request, then the receiver's latency at half of its
measured maximum under a fixed-rate (open-loop) load.

The no-ops: one reads the body and `orjson.loads` it (the target's baseline); another only splits the array with
`msgspec.json.Decoder(list[msgspec.Raw])` (the stricter ceiling: the least work a receiver that keeps the elements
apart can do); the third is the orjson one without aiohttp's web framework (a bare asyncio protocol on aiohttp's C
request parser), which shows how much of the baseline is the framework. Every server runs as its own process on
loopback, pinned to one core with `taskset`, and the load generator to the other (BENCH_SERVER_CPUS /
BENCH_LOAD_CPUS, default 1 and 0 on a machine with 2 or more cores). The load is wrk when it is installed (a Lua
script makes every request's keySuffix values unique, so the receiver's dedup never skips a journal write), else a
Python aiohttp load generator. Each size is measured REPEATS times on every server, the servers' order rotating
from round to round, and ratios are taken within a round. Run: `python -m bench.intake` (prints the section, with
the backlog part of bench.backlog and the dedup part of bench.dedup).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson

from bench.openloop import OpenLoopResult, run_open_loop
from receiver.samples import sample_wrappers

SIZES = (1, 10, 100)
"""Events per request."""
REPEATS = 3
CONNECTIONS = 32
DURATION = 8.0
WARMUP = 2.0
TARGETS = {10: 0.9, 100: 1.0}
"""Required ratio receiver / orjson no-op (req/s) by events per request; 1 event/request is information."""
LATENCY_EVENTS = 10
LATENCY_REPEATS = 5
"""Fixed-rate runs per server: five, since on a shared machine one run in three may meet another tenant's
burst (run 14: p99 5.0, 52.9, 20.1 ms on the same code)."""
LATENCY_DURATION = 10.0
LATENCY_TARGET_MS = 15.0
"""p99 latency at half of the receiver's measured maximum load (LATENCY_EVENTS per request) must be below."""
SECRET = "Bearer bench-secret"  # noqa: S105 - a loopback benchmark's made-up token
STREAM_PATH = "/workos"
_MARK = "@@KEY@@"


# --- processes -----------------------------------------------------------------------------------


def _cpus(variable: str, default: str) -> str | None:
    value = os.environ.get(variable)
    if value is not None:
        return value or None
    return default if (os.cpu_count() or 1) >= 2 and shutil.which("taskset") else None


SERVER_CPUS = _cpus("BENCH_SERVER_CPUS", "1")
"""The cores the servers under test are pinned to (taskset -c), None for no pinning."""
LOAD_CPUS = _cpus("BENCH_LOAD_CPUS", "0")
"""The cores the load generator is pinned to."""


def pinned(cpus: str | None, command: list[str]) -> list[str]:
    """`command` under `taskset -c cpus` (as is when cpus is None)."""
    return command if cpus is None else ["taskset", "-c", cpus, *command]


@contextlib.contextmanager
def load_affinity() -> Iterator[None]:
    """Pin the calling thread (the Python load generator) to LOAD_CPUS for the block."""
    if LOAD_CPUS is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {int(c) for c in LOAD_CPUS.split(",")})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def pinning() -> str:
    """A description of the core pinning in use."""
    if SERVER_CPUS is None or LOAD_CPUS is None:
        return "no core pinning"
    return f"server on core {SERVER_CPUS}, load generator on core {LOAD_CPUS} (taskset)"


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as answer:  # noqa: S310 - loopback URL built here
        return bytes(answer.read())


def wait_healthy(url: str, process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """Wait for `url/healthz` to answer, or raise with the process's fate."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with status {process.returncode} before it was ready")
        with contextlib.suppress(OSError, urllib.error.URLError):
            _get(f"{url}/healthz", timeout=1.0)
            return
        time.sleep(0.1)
    raise RuntimeError(f"server at {url} not healthy after {timeout:g}s")


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it does not go within 15 s."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def receiver_config(workdir: Path, port: int, sink: dict[str, object]) -> str:
    """A receiver configuration (YAML is a superset of JSON) with one stream feeding one sink `out`."""
    config = {
        "server": {"host": "127.0.0.1", "port": port, "allowlist": ["127.0.0.1/32"], "max_body_bytes": "10MiB"},
        # BENCH_DEDUP_WINDOW=0 measures the receiver with deduplication off (see docs/performance.md).
        "journal": {
            "path": str(workdir / "journal.db"),
            "max_bytes": "4GiB",
            "dedup_window": os.environ.get("BENCH_DEDUP_WINDOW", "24h"),
        },
        "streams": [
            {
                "name": "workos",
                "path": STREAM_PATH,
                "auth": {"header": "Authorization", "values": [SECRET]},
                "sinks": ["out"],
            }
        ],
        "sinks": {"out": sink},
    }
    path = workdir / "config.yaml"
    path.write_bytes(orjson.dumps(config, option=orjson.OPT_INDENT_2))
    return str(path)


@dataclass
class Server:
    """A server process under test."""

    name: str
    url: str
    process: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        """Process id."""
        return self.process.pid


RECEIVER = (sys.executable, "-m", "receiver.cli")
"""How a receiver process is started (its `serve` arguments follow)."""


@contextlib.contextmanager
def receiver_process(
    sink: dict[str, object], *, launcher: Sequence[str] = RECEIVER, name: str = "receiver"
) -> Iterator[Server]:
    """`log-bridge serve` (run by `launcher`) in a temporary directory (journal, sink output, log), killed on
    exit."""
    workdir = Path(tempfile.mkdtemp(prefix="log-bridge-bench-"))
    port = free_port()
    if sink.get("type") == "file":
        sink = {**sink, "path": str(workdir / "events" / "%Y-%m-%d.ndjson")}
    config = receiver_config(workdir, port, sink)
    log = (workdir / "receiver.log").open("wb")
    process = subprocess.Popen(
        pinned(SERVER_CPUS, [*launcher, "serve", "--config", config, "--log-level", "warning"]),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        server = Server(name, f"http://127.0.0.1:{port}", process)
        wait_healthy(server.url, process)
        yield server
    finally:
        stop_process(process)
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def noop_process(parser: str = "orjson", front: str = "aiohttp") -> Iterator[Server]:
    """The no-op handler (`parser`: orjson or msgspec; `front`: aiohttp.web or bare, bench.noop_server) in its
    own process, killed on exit."""
    command = [sys.executable, "-m", "bench.noop_server", "--port", "0", "--parser", parser, "--front", front]
    process = subprocess.Popen(
        pinned(SERVER_CPUS, command),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().decode()
        if "listening on" not in line:
            raise RuntimeError(f"the no-op server did not start: {line!r}")
        server = Server(f"no-op ({parser}, {front})", line.rsplit(" ", 1)[1].strip(), process)
        wait_healthy(server.url, process)
        yield server
    finally:
        stop_process(process)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


_METRIC = re.compile(r"^([a-z_]+)(\{[^}]*\})? ([0-9.eE+-]+)$")


def metrics(url: str) -> dict[str, float]:
    """The receiver's metrics, summed over labels: `{name: value}`."""
    values: dict[str, float] = {}
    for line in _get(f"{url}/metrics").decode().splitlines():
        match = _METRIC.match(line)
        if match:
            values[match.group(1)] = values.get(match.group(1), 0.0) + float(match.group(3))
    return values


def wait_delivered(url: str, timeout: float = 60.0) -> float:
    """Wait (bounded) until the sink has caught up, so a run's delivery work does not spill into the next run.
    Returns the seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        m = metrics(url)
        if m.get("log_bridge_sink_events_delivered_total", 0.0) >= m.get("log_bridge_events_received_total", 0.0):
            break
        time.sleep(0.2)
    return time.monotonic() - started


# --- bodies --------------------------------------------------------------------------------------


def body_pieces(events: int) -> list[bytes]:
    """A JSON-array body of `events` realistic wrappers, split where each keySuffix goes (events + 1 pieces)."""
    wrappers = sample_wrappers(events, source="log-bridge-bench")
    for wrapper in wrappers:
        wrapper["keySuffix"] = _MARK
    return orjson.dumps(wrappers).split(_MARK.encode())


class Bodies:
    """Bodies whose keySuffix values never repeat within a process: `run-prefix counter-index`."""

    def __init__(self, events: int) -> None:
        self.pieces = body_pieces(events)
        self.prefix = uuid.uuid4().hex[:12]
        self.counter = 0

    def next(self) -> bytes:
        """The next body."""
        self.counter += 1
        base = f"{self.prefix}-p-{self.counter}-".encode()
        parts = [self.pieces[0]]
        for index, piece in enumerate(self.pieces[1:], 1):
            parts.append(base + str(index).encode())
            parts.append(piece)
        return b"".join(parts)

    def __len__(self) -> int:
        return len(self.pieces) - 1


# --- load ----------------------------------------------------------------------------------------


@dataclass
class Load:
    """What one load run measured."""

    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int
    events_per_request: int
    cpu_percent: float = 0.0
    loadgen_cpu_percent: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def rps(self) -> float:
        """Requests per second."""
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def eps(self) -> float:
        """Events per second."""
        return self.rps * self.events_per_request


def wrk_path() -> str | None:
    """wrk, if installed (BENCH_LOADGEN=python forces the Python load generator)."""
    if os.environ.get("BENCH_LOADGEN", "").lower() == "python":
        return None
    return shutil.which("wrk")


def load_tool() -> str:
    """A description of the load generator in use."""
    wrk = wrk_path()
    if wrk is None:
        return f"Python aiohttp load generator ({CONNECTIONS} connections, one process)"
    banner = subprocess.run([wrk, "-v"], capture_output=True, text=True, timeout=10, check=False)
    version = (banner.stdout + banner.stderr).split("[")[0].strip() or "wrk"
    return f"{version} (-t1 -c{CONNECTIONS} -d{DURATION:g}s, Lua script: unique keySuffix per event)"


def _lua_long(text: str) -> str:
    level = 1
    while f"]{'=' * level}]" in text:
        level += 1
    return f"[{'=' * level}[{text}]{'=' * level}]"


WRK_DONE = r"""
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH_RESULT %d %d %d %d %d %d %d %.1f %.1f\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


def wrk_script(events: int, prefix: str) -> str:
    """A wrk Lua script posting JSON arrays of `events` wrappers, every keySuffix unique within the run."""
    pieces = [piece.decode() for piece in body_pieces(events)]
    table = ",\n".join(_lua_long(piece) for piece in pieces)
    return f"""
local pieces = {{
{table}
}}
local n = {events}
local prefix = "{prefix}"
local counter = 0
local threads = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "{SECRET}"

function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end

function request()
  counter = counter + 1
  local base = prefix .. "-" .. (tid or 0) .. "-" .. counter .. "-"
  local parts = {{}}
  for i = 1, n do
    parts[2 * i - 1] = pieces[i]
    parts[2 * i] = base .. i
  end
  parts[2 * n + 1] = pieces[n + 1]
  return wrk.format(nil, nil, nil, table.concat(parts))
end
{WRK_DONE}
"""


def run_wrk(url: str, events: int, duration: float, workdir: Path) -> Load:
    """One wrk run against `url`."""
    wrk = wrk_path()
    assert wrk is not None
    script = workdir / f"post-{events}-{uuid.uuid4().hex[:8]}.lua"
    script.write_text(wrk_script(events, uuid.uuid4().hex[:12]))
    command = pinned(
        LOAD_CPUS,
        [
            wrk,
            "-t1",
            f"-c{CONNECTIONS}",
            f"-d{duration:g}s",
            "--timeout",
            "10s",
            "--latency",
            "-s",
            str(script),
            url + STREAM_PATH,
        ],
    )
    done = subprocess.run(command, capture_output=True, text=True, timeout=duration + 60, check=False)
    line = next((row for row in done.stdout.splitlines() if row.startswith("BENCH_RESULT ")), None)
    if line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr.strip()[:300]} {done.stdout[-300:]}")
    numbers = line.split()[1:]
    requests, micros = int(numbers[0]), int(numbers[1])
    errors = sum(int(value) for value in numbers[2:7])
    return Load(requests, micros / 1e6, float(numbers[7]) / 1000, float(numbers[8]) / 1000, errors, events)


async def python_load(
    url: str,
    bodies: Bodies,
    *,
    connections: int = CONNECTIONS,
    duration: float | None = None,
    requests: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> Load:
    """Post bodies from `connections` concurrent clients until `duration` seconds or `requests` requests."""
    assert duration is not None or requests is not None
    latencies: list[float] = []
    errors = 0
    sent = 0
    started = time.monotonic()
    deadline = started + duration if duration is not None else float("inf")
    headers = {"Content-Type": "application/json", "Authorization": SECRET}
    connector = aiohttp.TCPConnector(limit=connections)
    timeout = aiohttp.ClientTimeout(total=30)

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal errors, sent
        while time.monotonic() < deadline and (requests is None or sent < requests):
            sent += 1
            body = bodies.next()
            began = time.perf_counter()
            try:
                async with session.post(url + STREAM_PATH, data=body, headers=headers) as answer:
                    await answer.read()
                    ok = answer.status == 200
            except (aiohttp.ClientError, TimeoutError):
                ok = False
            latencies.append(time.perf_counter() - began)
            if not ok:
                errors += 1
            if progress is not None:
                progress(len(latencies))

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(worker(session) for _ in range(connections)))
    elapsed = time.monotonic() - started
    latencies.sort()
    p50 = latencies[len(latencies) // 2] if latencies else 0.0
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] if latencies else 0.0
    return Load(len(latencies), elapsed, p50 * 1000, p99 * 1000, errors, len(bodies))


def measure(server: Server, events: int, duration: float, workdir: Path) -> Load:
    """One load run against a server, with its CPU use during the run."""
    before = cpu_seconds(server.pid)
    if wrk_path() is not None:
        who = resource.RUSAGE_CHILDREN  # wrk, once reaped (the servers are reaped only at the end)
        used = resource.getrusage(who)
        load = run_wrk(server.url, events, duration, workdir)
    else:
        who = resource.RUSAGE_SELF
        used = resource.getrusage(who)
        with load_affinity():
            load = asyncio.run(python_load(server.url, Bodies(events), duration=duration))
    load.cpu_percent = 100 * (cpu_seconds(server.pid) - before) / load.seconds
    now = resource.getrusage(who)
    load.loadgen_cpu_percent = 100 * (now.ru_utime + now.ru_stime - used.ru_utime - used.ru_stime) / load.seconds
    return load


# --- the benchmark -------------------------------------------------------------------------------

NOOPS = {"orjson": ("orjson", "aiohttp"), "msgspec": ("msgspec", "aiohttp"), "bare": ("orjson", "bare")}
"""The no-ops by name: (parser, front) of bench.noop_server. `bare` is the orjson no-op without aiohttp's web
framework: how much of the baseline is the framework, which the receiver pays as well."""
NOOP_LABELS = {"orjson": "no-op, orjson", "msgspec": "no-op, msgspec", "bare": "no-op, orjson, bare protocol"}


@dataclass
class Pair:
    """Every run of one size on every server, by round."""

    events: int
    receiver: list[Load] = field(default_factory=list)
    noop: dict[str, list[Load]] = field(default_factory=lambda: {parser: [] for parser in NOOPS})
    ratios: dict[str, list[float]] = field(default_factory=lambda: {parser: [] for parser in NOOPS})
    journaled: int = 0
    duplicates: int = 0
    expected: int = 0


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


@dataclass
class Latency:
    """Fixed-rate runs at half of the receiver's measured maximum, receiver and orjson no-op alternating."""

    max_rps: float
    rate: float
    receiver: list[OpenLoopResult] = field(default_factory=list)
    noop: list[OpenLoopResult] = field(default_factory=list)


@dataclass
class Throughput:
    """The whole intake measurement."""

    pairs: list[Pair]
    latency: Latency | None


def _round(pair: Pair, receiver: Server, noops: dict[str, Server], order: list[Server], workdir: Path) -> None:
    results: dict[str, Load] = {}
    for server in order:
        before = metrics(receiver.url)
        load = measure(server, pair.events, DURATION, workdir)
        results[server.name] = load
        if server is receiver:
            after = metrics(receiver.url)
            pair.journaled += int(
                after["log_bridge_events_received_total"] - before["log_bridge_events_received_total"]
            )
            pair.duplicates += int(
                after.get("log_bridge_events_duplicate_total", 0) - before.get("log_bridge_events_duplicate_total", 0)
            )
            pair.expected += load.requests * pair.events
            waited = wait_delivered(receiver.url)
            load.notes.append(f"sink caught up {waited:.1f}s after the run")
    mine = results[receiver.name]
    pair.receiver.append(mine)
    for parser, noop in noops.items():
        pair.noop[parser].append(results[noop.name])
        base = results[noop.name].rps
        pair.ratios[parser].append(mine.rps / base if base else 0.0)


def latency_runs(receiver: Server, noop: Server, max_rps: float) -> Latency:
    """LATENCY_REPEATS fixed-rate runs at max_rps / 2 on the receiver and the orjson no-op, alternating."""
    result = Latency(max_rps, max_rps / 2)
    headers = {"Content-Type": "application/json", "Authorization": SECRET}
    for repeat in range(LATENCY_REPEATS):
        order = (receiver, noop) if repeat % 2 == 0 else (noop, receiver)
        for server in order:
            bodies = Bodies(LATENCY_EVENTS)
            with load_affinity():
                run = run_open_loop(
                    server.url, STREAM_PATH, headers, bodies.next, rate=result.rate, duration=LATENCY_DURATION
                )
            (result.receiver if server is receiver else result.noop).append(run)
            if server is receiver:
                wait_delivered(receiver.url)
    return result


def throughput() -> Throughput:
    """Rounds of every size on the receiver and every no-op, the order rotating; REPEATS times. Then the
    fixed-rate latency runs."""
    pairs = {events: Pair(events) for events in SIZES}
    workdir = Path(tempfile.mkdtemp(prefix="log-bridge-bench-load-"))
    try:
        with contextlib.ExitStack() as stack:
            receiver = stack.enter_context(receiver_process({"type": "file"}))
            noops = {name: stack.enter_context(noop_process(*spec)) for name, spec in NOOPS.items()}
            orjson_noop = noops["orjson"]
            servers = [receiver, *noops.values()]
            for server in servers:  # warm up (imports, first connections, the journal's pages)
                measure(server, 10, WARMUP, workdir)
            wait_delivered(receiver.url)
            for repeat in range(REPEATS):
                turn = repeat % len(servers)
                order = servers[turn:] + servers[:turn]
                if repeat % (2 * len(servers)) >= len(servers):
                    order.reverse()
                for events in SIZES:
                    _round(pairs[events], receiver, noops, order, workdir)
            latency = None
            if LATENCY_EVENTS in pairs:
                best = _median([x.rps for x in pairs[LATENCY_EVENTS].receiver])
                latency = latency_runs(receiver, orjson_noop, best)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return Throughput(list(pairs.values()), latency)


def _runs(values: list[float], fmt: str = "{:.2f}") -> str:
    return ", ".join(fmt.format(v) for v in values)


def _cpu_per_request(load: Load) -> float:
    return load.cpu_percent / 100 / load.rps if load.rps else 0.0


def _cpu_ratios(receiver: list[Load], noop: list[Load]) -> list[float]:
    """Per round: the no-op's CPU seconds per request over the receiver's (what the req/s ratio would be with
    both CPU-bound on a core of their own; steadier than req/s when other work takes the server's core)."""
    return [
        _cpu_per_request(b) / _cpu_per_request(a) if _cpu_per_request(a) else 0.0
        for a, b in zip(receiver, noop, strict=True)
    ]


def render_throughput(result: Throughput) -> str:
    """The Markdown tables: medians per server, every run's req/s, the ratios per round."""
    pairs = result.pairs
    lines = [
        "| events/request | server | req/s (median) | req/s, every run | events/s | p50 ms | p99 ms "
        "| server CPU % | load gen. CPU % | errors |",
        "|---:|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for pair in pairs:
        rows = [("receiver (file sink)", pair.receiver)] + [(NOOP_LABELS[name], pair.noop[name]) for name in NOOPS]
        for name, loads in rows:
            lines.append(
                f"| {pair.events} | {name} | {_median([x.rps for x in loads]):,.0f} "
                f"| {_runs([x.rps for x in loads], '{:,.0f}')} "
                f"| {_median([x.eps for x in loads]):,.0f} | {_median([x.p50_ms for x in loads]):.1f} "
                f"| {_median([x.p99_ms for x in loads]):.1f} | {_median([x.cpu_percent for x in loads]):.0f} "
                f"| {_median([x.loadgen_cpu_percent for x in loads]):.0f} "
                f"| {sum(x.errors for x in loads)} |"
            )
    lines += [
        "",
        "| events/request | receiver / orjson no-op (median) | per round | target | met "
        "| receiver / msgspec no-op (median) | per round | receiver / bare no-op (median) | per round "
        "| CPU per request, orjson no-op / receiver, per round "
        "| CPU per request, bare no-op / orjson no-op, per round |",
        "|---:|---:|---|---:|---|---:|---|---:|---|---|---|",
    ]
    for pair in pairs:
        target = TARGETS.get(pair.events)
        ratio = _median(pair.ratios["orjson"])
        met = "— (information)" if target is None else ("yes" if ratio >= target else "**no**")
        lines.append(
            f"| {pair.events} | {ratio:.2f} | {_runs(pair.ratios['orjson'])} "
            f"| {'—' if target is None else f'≥ {target}'} | {met} "
            f"| {_median(pair.ratios['msgspec']):.2f} | {_runs(pair.ratios['msgspec'])} "
            f"| {_median(pair.ratios['bare']):.2f} | {_runs(pair.ratios['bare'])} "
            f"| {_runs(_cpu_ratios(pair.receiver, pair.noop['orjson']))} "
            f"| {_runs(_cpu_ratios(pair.noop['orjson'], pair.noop['bare']))} |"
        )
    checks = [
        f"{p.events}/request: {p.journaled:,} events journaled of {p.expected:,} answered, {p.duplicates} duplicates"
        for p in pairs
    ]
    lines += ["", "Journal check (receiver metrics vs. requests answered): " + "; ".join(checks) + "."]
    if result.latency is not None:
        lines += ["", render_latency(result.latency)]
    return "\n".join(lines)


def render_latency(latency: Latency) -> str:
    """The fixed-rate latency table."""
    lines = [
        "### Latency at half of the maximum load",
        "",
        f"Open-loop load (`bench/openloop.py`: Python asyncio, 64 keep-alive connections, pinned like wrk): "
        f"requests of {LATENCY_EVENTS} events are due at a fixed {latency.rate:,.0f} req/s, half of the "
        f"receiver's median maximum above ({latency.max_rps:,.0f} req/s), for {LATENCY_DURATION:g} s per run, "
        f"{LATENCY_REPEATS} runs per server alternating with the orjson no-op (the generator's own floor). "
        "Latency runs from the moment a request was due, so queueing behind a stall counts (no coordinated "
        "omission); `gen. lag` is how late the generator itself dispatched at worst.",
        "",
        "| server | run | answered req/s | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | gen. lag ms | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, runs in (("receiver (file sink)", latency.receiver), ("no-op, orjson", latency.noop)):
        for number, run in enumerate(runs, 1):
            lines.append(
                f"| {name} | {number} | {run.achieved:,.0f} | {run.percentile(0.5):.1f} | {run.percentile(0.9):.1f} "
                f"| {run.percentile(0.99):.1f} | {run.percentile(0.999):.1f} | {run.percentile(1.0):.1f} "
                f"| {run.max_lag_ms:.1f} | {run.errors} |"
            )
    p99s = [run.percentile(0.99) for run in latency.receiver]
    p99 = _median(p99s)
    floor = _median([run.percentile(0.99) for run in latency.noop])
    met = "yes" if p99 < LATENCY_TARGET_MS else "**no**"
    lines += [
        "",
        f"Receiver p99 (median of runs): **{p99:.1f} ms** (runs: {_runs(p99s, '{:.1f}')}); "
        f"target < {LATENCY_TARGET_MS:g} ms — {met}. The no-op's p99 at the same rate: {floor:.1f} ms.",
    ]
    return "\n".join(lines)


async def run() -> str:
    """The intake section (throughput and latency, then the backlog, then dedup memory and restart)."""
    from bench import backlog, dedup

    cores = os.cpu_count()
    result = await asyncio.to_thread(throughput)
    section = [
        "## Intake",
        "",
        "### Receiver vs. no-op handlers",
        "",
        f"Receiver (`log-bridge serve`, its stream front serving the POSTs (receiver/front.py), file sink "
        f"delivering in the same process; the journal's events in append-only segment files, one `fdatasync` per "
        f"commit group, SQLite (WAL, `synchronous=FULL`) for cursors and dead letters; in-memory dedup) "
        f"and three no-op handlers: two on aiohttp's web framework — one reads the body and `orjson.loads` it "
        f"(the target's baseline), one only splits it with `msgspec.json.Decoder(list[msgspec.Raw])` (the "
        f"stricter ceiling) — and the orjson one on a bare `asyncio.Protocol` feeding aiohttp's C request parser "
        f"(`--front bare`: what the web framework itself costs). Each in its own process on loopback, "
        f"{pinning()}, same load: {load_tool()}. {REPEATS} rounds of {DURATION:g} s per server and size, the "
        f"servers' order rotating from round to round; medians and every run reported; a ratio is receiver req/s "
        f"÷ no-op req/s of the same round. Machine: {cores} cores, shared with other work, so absolute figures "
        f"are noisy; the ratios are the figure to read. Before each run the file sink is allowed to catch up "
        f"(bounded), so a run's delivery work does not spill into the next. Server CPU % is the server process's "
        f"user + system time over the run (100 = one core, all threads); load gen. CPU % is the load generator's.",
        "",
        render_throughput(result),
        "",
    ]
    for part in (backlog, dedup):
        try:
            section.append(await part.run())
        except Exception as exc:  # the throughput figures stand on their own
            section.append(f"### {part.__name__}\n\nfailed: `{type(exc).__name__}: {exc}`\n")
    return "\n".join(section)


if __name__ == "__main__":
    print(asyncio.run(run()))
