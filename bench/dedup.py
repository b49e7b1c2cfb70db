"""Dedup benchmark: the memory one key in the window costs, and how long a restart with a full window takes.

Memory: a fresh subprocess fills `receiver.dedup.DedupIndex` with 1,000,000 keySuffixes (uuid4 hex, as WorkOS
sends them), 100 per `add` as the journal does per request, their times spread over the 24 h window so they
land in its 12 generations. The key strings are dropped once added: the index keeps only fingerprints (the
keys themselves are on disk in `dedup_log`). Measured two ways in separate processes: growth of VmRSS, and
the bytes tracemalloc sees alive afterwards. Target: ≤ 64 bytes per key.

Restart: a journal whose `dedup_log` holds 1,000,000 keys in 10,000 rows (100 keys each, spread over the last
23 h), then (a) `Journal.open` timed in a fresh process, and (b) `log-bridge serve` from spawn until
`/readyz` answers 200, alternating with the same on an empty journal (the start-up floor: imports, sinks).
Target: ready in < 5 s with 1 M keys. The serve process's RSS once ready gives the key cost end to end.

Run: `python -m bench.dedup` (prints the section).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from bench.intake import SERVER_CPUS, _get, free_port, pinned, receiver_config, rss_bytes, stop_process
from receiver.dedup import PART_KEYS, STEP_KEYS, STEP_PER_KEY

KEYS = 1_000_000
KEYS_PER_ROW = 100
LARGE_REQUEST = 1000
BURST_KEYS = 2_000_000
"""Keys of the burst into one generation: the index's default bound (receiver.dedup.DEFAULT_MAX_KEYS)."""
BURST_REQUEST = 10
"""Keys per request of the second dedup-pause run (WorkOS batches up to a few hundred events a request)."""
WINDOW = 24 * 3600.0
REPEATS = 3
BYTES_PER_KEY_TARGET = 64
READY_TARGET = 5.0
STREAM = "workos"


# --- children (fresh processes) ------------------------------------------------------------------


def _vm_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _fill(index: object, keys: int) -> None:
    from receiver.dedup import DedupIndex

    assert isinstance(index, DedupIndex)
    now = time.time()
    start = now - WINDOW + 60  # the whole window, so every generation holds its share
    step = (WINDOW - 120) / (keys // KEYS_PER_ROW)
    for row in range(keys // KEYS_PER_ROW):
        index.add(STREAM, _keys(), start + row * step)


def _keys(count: int = KEYS_PER_ROW) -> list[str]:
    """`count` random 32-hex-digit keys: the shape of a uuid4 hex keySuffix, made faster than uuid4()."""
    text = os.urandom(16 * count).hex()
    return [text[i : i + 32] for i in range(0, len(text), 32)]


def child_memory(mode: str, keys: int) -> dict[str, float]:
    """In this (fresh) process: fill an index; RSS growth ("rss") or live bytes by tracemalloc ("traced")."""
    import gc
    import tracemalloc

    from receiver.dedup import DedupIndex

    _keys()  # warm up before the baseline
    index = DedupIndex(WINDOW, 10 * keys)
    gc.collect()
    if mode == "traced":
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
    else:
        before = _vm_rss()
    _fill(index, keys)
    gc.collect()
    after = tracemalloc.get_traced_memory()[0] if mode == "traced" else _vm_rss()
    return {
        "bytes": after - before,
        "keys": index.size,
        "generations": sum(len(state.generations()) for state in index._streams.values()),
    }


def child_pauses(keys: int, per_request: int) -> dict[str, float]:
    """In this (fresh) process: a window of `keys` keys, then a second one timed request by request, as the
    writer thread does its dedup work (`fresh`, then `add_prints` of the fingerprints it took once committed;
    `expire` every 60 s of event time): the longest a request's dedup work held the writer while 12 generations
    were sealed and 12 expired."""
    from receiver.dedup import DedupIndex

    index = DedupIndex(WINDOW, 10 * keys)
    rows = keys // per_request
    step = WINDOW / rows
    expire_every = max(1, int(60 / step))
    pauses: list[float] = []
    for row in range(2 * rows):
        at = row * step
        batch = _keys(per_request)
        started = time.perf_counter()
        taken: list[int] = []
        index.fresh(STREAM, batch, at, set(), taken)
        index.add_prints(STREAM, taken, at)
        if row % expire_every == 0:
            index.expire(at)
        if row >= rows:
            pauses.append(time.perf_counter() - started)
    pauses.sort()
    return {
        "max": pauses[-1],
        "p999": pauses[int(len(pauses) * 0.999)],
        "p50": pauses[len(pauses) // 2],
        "total": sum(pauses),
        "requests": len(pauses),
    }


def child_burst(keys: int, per_request: int) -> dict[str, float]:
    """In this (fresh) process: `keys` keys into one generation (a burst within 2 h), `per_request` a request,
    each request's dedup work timed: the newest generation's dicts grow by copying their tables, which holds
    the GIL (receiver.dedup.PART_KEYS bounds it)."""
    from receiver.dedup import DedupIndex

    index = DedupIndex(WINDOW, 10 * keys)
    at = time.time()
    pauses: list[float] = []
    for _ in range(keys // per_request):
        batch = _keys(per_request)
        started = time.perf_counter()
        taken: list[int] = []
        index.fresh(STREAM, batch, at, set(), taken)
        index.add_prints(STREAM, taken, at)
        pauses.append(time.perf_counter() - started)
    started = time.perf_counter()  # the first request of the next generation: the burst is handed to sealing
    taken = []
    index.fresh(STREAM, _keys(per_request), at + index.span, set(), taken)
    index.add_prints(STREAM, taken, at + index.span)
    handover = time.perf_counter() - started
    pauses.sort()
    return {
        "max": pauses[-1],
        "p999": pauses[int(len(pauses) * 0.999)],
        "p50": pauses[len(pauses) // 2],
        "handover": handover,
    }


def child_collect(keys: int) -> dict[str, float]:
    """In this (fresh) process: `keys` keys in one generation (a busy stream's hour), then full garbage
    collections timed: each holds the GIL, so it is a pause of the whole service, every few seconds under load."""
    import gc

    from receiver.dedup import DedupIndex

    index = DedupIndex(WINDOW, 10 * keys)
    at = time.time()
    for _ in range(keys // KEYS_PER_ROW):
        index.add(STREAM, _keys(), at)
    gc.collect()
    timings = []
    for _ in range(5):
        started = time.perf_counter()
        gc.collect()
        timings.append(time.perf_counter() - started)
    return {"seconds": statistics.median(timings), "keys": index.size}


def child_open(path: str) -> dict[str, float]:
    """In this (fresh) process: time `Journal.open` on `path`, and the RSS it added."""
    from receiver.journal import Journal

    journal = Journal(Path(path), max_bytes=1 << 32, dedup_window=WINDOW)
    before = _vm_rss()

    async def go() -> float:
        started = time.perf_counter()
        await journal.open()
        elapsed = time.perf_counter() - started
        await journal.close()
        return elapsed

    seconds = asyncio.run(go())
    return {"seconds": seconds, "keys": journal.dedup.size, "rss_added": _vm_rss() - before}


def _child(*args: str) -> dict[str, float]:
    done = subprocess.run(
        pinned(SERVER_CPUS, [sys.executable, "-m", "bench.dedup", "--child", *args]),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"bench.dedup child {args} failed: {done.stderr.strip()[-500:]}")
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


# --- restart -------------------------------------------------------------------------------------


def build_journal(path: Path, keys: int) -> None:
    """A journal whose dedup_log holds `keys` keys, KEYS_PER_ROW per row, spread over the last 23 h."""
    from receiver.journal import connect

    conn = connect(path)
    try:
        rows = keys // KEYS_PER_ROW
        now = time.time()
        start = now - 23 * 3600
        step = 23 * 3600 / max(rows, 1)
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO dedup_log (stream, at, keys) VALUES (?, ?, ?)",
            ((STREAM, start + row * step, orjson.dumps(_keys())) for row in range(rows)),
        )
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()


@dataclass
class Serve:
    """One `log-bridge serve` start."""

    keys: int
    ready_seconds: float
    rss: int


def serve_until_ready(journal: Path, workdir: Path, keys: int) -> Serve:
    """Spawn `log-bridge serve` on `journal`; seconds until /readyz answers 200, and its RSS then."""
    port = free_port()
    run_dir = workdir / f"serve-{uuid.uuid4().hex[:8]}"
    run_dir.mkdir()
    config = receiver_config(run_dir, port, {"type": "file", "path": str(run_dir / "events.ndjson")})
    text = json.loads(Path(config).read_text())
    text["journal"]["path"] = str(journal)
    text["journal"]["dedup_window"] = "24h"
    Path(config).write_text(json.dumps(text))
    log = (run_dir / "receiver.log").open("wb")
    started = time.monotonic()
    process = subprocess.Popen(
        pinned(SERVER_CPUS, [sys.executable, "-m", "receiver.cli", "serve", "--config", config]),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"serve exited with {process.returncode}: {(run_dir / 'receiver.log').read_text()}")
            if time.monotonic() - started > 120:
                raise RuntimeError("serve not ready after 120 s")
            with contextlib.suppress(OSError, urllib.error.URLError):
                _get(f"http://127.0.0.1:{port}/readyz", timeout=1.0)
                break
            time.sleep(0.01)
        ready = time.monotonic() - started
        return Serve(keys, ready, rss_bytes(process.pid))
    finally:
        stop_process(process)
        log.close()


@dataclass
class Result:
    """Everything this part measured."""

    rss: list[dict[str, float]] = field(default_factory=list)
    traced: list[dict[str, float]] = field(default_factory=list)
    opens: list[dict[str, float]] = field(default_factory=list)
    pauses: list[dict[str, float]] = field(default_factory=list)
    large_pauses: list[dict[str, float]] = field(default_factory=list)
    collects: list[dict[str, float]] = field(default_factory=list)
    bursts: list[dict[str, float]] = field(default_factory=list)
    serves_full: list[Serve] = field(default_factory=list)
    serves_empty: list[Serve] = field(default_factory=list)
    build_seconds: float = 0.0
    journal_mib: float = 0.0


def measure() -> Result:
    """Run every measurement (blocking)."""
    result = Result()
    for _ in range(REPEATS):
        result.rss.append(_child("memory", "rss", str(KEYS)))
        result.traced.append(_child("memory", "traced", str(KEYS)))
        result.pauses.append(_child("pauses", str(KEYS), str(KEYS_PER_ROW)))
        result.large_pauses.append(_child("pauses", str(KEYS), str(LARGE_REQUEST)))
        result.collects.append(_child("collect", str(KEYS)))
        result.bursts.append(_child("burst", str(BURST_KEYS), str(BURST_REQUEST)))
    workdir = Path(tempfile.mkdtemp(prefix="log-bridge-bench-dedup-"))
    try:
        full, empty = workdir / "full" / "journal.db", workdir / "empty" / "journal.db"
        started = time.monotonic()
        build_journal(full, KEYS)
        result.build_seconds = time.monotonic() - started
        build_journal(empty, 0)
        result.journal_mib = full.stat().st_size / (1024 * 1024)
        for repeat in range(REPEATS):
            result.opens.append(_child("open", str(full)))
            order = [(full, KEYS), (empty, 0)]
            if repeat % 2:
                order.reverse()
            for path, keys in order:
                serve = serve_until_ready(path, workdir, keys)
                (result.serves_full if keys else result.serves_empty).append(serve)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return result


def _runs(values: list[float], fmt: str) -> str:
    return ", ".join(fmt.format(v) for v in values)


def render(result: Result) -> str:
    """The Markdown section."""
    mib = 1024 * 1024
    rss_per_key = [r["bytes"] / r["keys"] for r in result.rss]
    traced_per_key = [r["bytes"] / r["keys"] for r in result.traced]
    serve_added = [
        (full.rss - empty.rss) / KEYS for full, empty in zip(result.serves_full, result.serves_empty, strict=False)
    ]
    open_seconds = [r["seconds"] for r in result.opens]
    ready_full = [s.ready_seconds for s in result.serves_full]
    ready_empty = [s.ready_seconds for s in result.serves_empty]
    median_traced = statistics.median(traced_per_key)
    median_rss = statistics.median(rss_per_key)
    median_ready = statistics.median(ready_full)
    generations = int(result.traced[0]["generations"]) if result.traced else 0
    lines = [
        "### Dedup: memory per key and restart",
        "",
        f"`receiver.dedup.DedupIndex` filled in a fresh process (pinned to the server's core) with {KEYS:,} "
        f"random 32-hex-digit keySuffixes "
        f"(the shape of uuid4 hex), {KEYS_PER_ROW} per `add`, their times spread over the 24 h window "
        f"({generations} generations); the key strings are dropped after each `add`, as in the service (the "
        f"index keeps 60-bit fingerprints, the keys are on disk). {REPEATS} processes per method.",
        "",
        "| measure | bytes per key, every run | median | target | met |",
        "|---|---|---:|---:|---|",
        f"| live bytes after filling (tracemalloc) | {_runs(traced_per_key, '{:.1f}')} | {median_traced:.1f} "
        f"| ≤ {BYTES_PER_KEY_TARGET} | {'yes' if median_traced <= BYTES_PER_KEY_TARGET else '**no**'} |",
        f"| VmRSS growth while filling | {_runs(rss_per_key, '{:.1f}')} | {median_rss:.1f} "
        f"| ≤ {BYTES_PER_KEY_TARGET} | {'yes' if median_rss <= BYTES_PER_KEY_TARGET else '**no**'} |",
        f"| `log-bridge serve` VmRSS once ready, 1 M keys minus empty journal | {_runs(serve_added, '{:.1f}')} "
        f"| {statistics.median(serve_added) if serve_added else 0:.1f} | | |",
        "",
        f"The writer's dedup work per request over a second 24 h window of {KEYS:,} keys ({KEYS_PER_ROW} per "
        f"request, `fresh` then `add_prints`, `expire` every 60 s of event time; 12 generations sealed and 12 expired "
        f"meanwhile), every run: longest {_runs([p['max'] * 1e3 for p in result.pauses], '{:.1f}')} ms; "
        f"99.9th percentile {_runs([p['p999'] * 1e3 for p in result.pauses], '{:.2f}')} ms; median "
        f"{_runs([p['p50'] * 1e6 for p in result.pauses], '{:.0f}')} µs; in all "
        f"{_runs([p['total'] for p in result.pauses], '{:.2f}')} s for "
        f"{int(result.pauses[0]['requests']) if result.pauses else 0:,} requests. The same with "
        f"{LARGE_REQUEST:,} keys per request: longest {_runs([p['max'] * 1e3 for p in result.large_pauses], '{:.1f}')}"
        f" ms; 99.9th percentile {_runs([p['p999'] * 1e3 for p in result.large_pauses], '{:.2f}')} ms; median "
        f"{_runs([p['p50'] * 1e3 for p in result.large_pauses], '{:.2f}')} ms. Sealing and sweeping go a step of "
        f"{STEP_KEYS:,} + {STEP_PER_KEY} keys' worth per key of the request that takes it.",
        "",
        f"A full garbage collection (it holds the GIL: a pause of the whole service, every few seconds under "
        f"load) with {KEYS:,} keys in one generation (a burst within {WINDOW / 12 / 3600:g} h), median of 5 per "
        f"process, every process: {_runs([c['seconds'] * 1e3 for c in result.collects], '{:.1f}')} ms. The newest "
        f"generation is a dict of ints, which CPython's collector does not track; the sealed ones are arrays.",
        "",
        f"A burst of {BURST_KEYS:,} keys into one generation, {BURST_REQUEST} per request (`fresh` then "
        f"`add_prints`), every run: longest request {_runs([b['max'] * 1e3 for b in result.bursts], '{:.1f}')} ms; "
        f"99.9th percentile {_runs([b['p999'] * 1e6 for b in result.bursts], '{:.0f}')} µs; median "
        f"{_runs([b['p50'] * 1e6 for b in result.bursts], '{:.1f}')} µs; the first request of the next generation "
        f"(the burst handed to sealing) {_runs([b['handover'] * 1e3 for b in result.bursts], '{:.1f}')} ms. The "
        f"newest generation is held in dicts of at most {PART_KEYS:,} keys: a dict grows by copying its table, "
        "holding the GIL.",
        "",
        f"Restart: a journal with {KEYS:,} keys in {KEYS // KEYS_PER_ROW:,} `dedup_log` rows "
        f"({result.journal_mib:.0f} MiB, built in {result.build_seconds:.1f} s), no backlog. `Journal.open` is "
        f"timed inside a fresh process (after imports); `serve` is wall time from spawning `log-bridge serve` until "
        f"`/readyz` answers 200 (polled every 10 ms), alternating with an empty journal.",
        "",
        "| measure | seconds, every run | median | target | met |",
        "|---|---|---:|---:|---|",
        f"| `Journal.open`, 1 M keys | {_runs(open_seconds, '{:.2f}')} | {statistics.median(open_seconds):.2f} | | |",
        f"| `serve` until ready, 1 M keys | {_runs(ready_full, '{:.2f}')} | {median_ready:.2f} "
        f"| < {READY_TARGET:g} | {'yes' if median_ready < READY_TARGET else '**no**'} |",
        f"| `serve` until ready, empty journal | {_runs(ready_empty, '{:.2f}')} "
        f"| {statistics.median(ready_empty):.2f} | | |",
        "",
        f"Serve RSS once ready: {statistics.median([s.rss for s in result.serves_full]) / mib:.0f} MiB with 1 M "
        f"keys, {statistics.median([s.rss for s in result.serves_empty]) / mib:.0f} MiB with none (medians).",
    ]
    return "\n".join(lines) + "\n"


async def run() -> str:
    """The dedup section, as Markdown."""
    return render(await asyncio.to_thread(measure))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, *rest = sys.argv[2:]
        if kind == "memory":
            print(json.dumps(child_memory(rest[0], int(rest[1]))))
        elif kind == "pauses":
            print(json.dumps(child_pauses(int(rest[0]), int(rest[1]))))
        elif kind == "collect":
            print(json.dumps(child_collect(int(rest[0]))))
        elif kind == "burst":
            print(json.dumps(child_burst(int(rest[0]), int(rest[1]))))
        elif kind == "open":
            print(json.dumps(child_open(rest[0])))
        else:
            raise SystemExit(f"unknown child {kind}")
    else:
        print(asyncio.run(run()))
