"""Where the receiver's time goes under load: py-spy samples the receiver (file sink delivering) while wrk
posts requests of 10 and 100 events, and this prints the top functions by self time and the share of each part
of the service (intake parse, journal writer, delivery, aiohttp, ...), as Markdown.

Not part of `make bench` (it needs py-spy, `pip install py-spy`, and ptrace rights); run it by hand:
`python -m bench.profile [EVENTS ...]` (default 10 100). The server is pinned like the intake benchmark's;
py-spy runs on the load generator's core. The collapsed stacks of each size are left in /tmp.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from bench.intake import LOAD_CPUS, measure, pinned, pinning, receiver_process, wait_delivered

SECONDS = 10
RATE = 200
TOP = 15
_LINE = re.compile(r"^(?P<stack>.*) (?P<count>\d+)$")
_FRAME = re.compile(r"^(?P<name>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")

IDLE = "(idle: waiting for work)"
PARTS = (
    ("journal writer thread", ("Journal._write_loop", "GroupWriter._write_loop"), ()),
    ("delivery: sink write thread", (), ("sinks/file.py",)),
    ("intake: parse", (), ("receiver/parsing.py",)),
    ("journal: loop side and reads", (), ("receiver/journal/",)),
    ("delivery: engine", (), ("receiver/delivery.py", "sinks/")),
    ("intake: handler, auth, metrics", (), ("receiver/app.py", "receiver/netaddr.py", "receiver/metrics.py")),
    ("aiohttp", (), ("aiohttp/",)),
    ("asyncio event loop", (), ("asyncio/", "selectors.py")),
)


@dataclass
class Profile:
    """Aggregated samples of one run."""

    events: int
    samples: int
    self_time: Counter[str]
    parts: Counter[str]
    rps: float
    collapsed: str


def _frames(stack: str) -> list[str]:
    return [frame for frame in stack.split(";") if frame]


def _label(frame: str) -> str:
    match = _FRAME.match(frame)
    if match is None:
        return frame
    name, file = match.group("name"), match.group("file")
    for marker in ("site-packages/", "lib/python3.11/", "/work/wt-bench/", "/work/main/"):
        if marker in file:
            file = file.split(marker, 1)[1]
    return f"{name} ({file})"


def _part(frames: list[str]) -> str:
    names = [_label(frame) for frame in frames]
    for part, functions, _ in PARTS:
        if functions and any(name.split(" (", 1)[0] in functions for name in names):
            return part
    for name in reversed(names):  # the innermost frame that belongs to a part decides
        for part, _, files in PARTS:
            if files and any(marker in name for marker in files):
                return part
    return "other (interpreter, C libraries)"


_WAITS = (
    "_worker (concurrent/futures/thread.py)",
    "GroupWriter._write_loop (receiver/journal/writer.py)",
    "select (selectors.py)",
)
"""Innermost Python frames of a thread parked waiting for work: an idle executor thread, the journal writer
waiting on its queue, the event loop in epoll. With --native py-spy cannot tell these waits from work (the
leaf is a libc futex or epoll_wait), so they are counted apart."""


def _idle(frames: list[str]) -> bool:
    leaf = frames[-1]
    if ".py" in leaf:
        return False
    python = [_label(frame) for frame in frames if ".py" in frame]
    return bool(python) and python[-1].endswith(_WAITS)


def _self_label(frame: str) -> str:
    label = _label(frame)
    if label.startswith("0x") and "(libc.so.6)" in label:
        return "libc, unsymbolised (futex: waiting for the GIL or a lock)"
    return label


def aggregate(raw: str) -> tuple[int, Counter[str], Counter[str]]:
    """Busy samples, self time by function (the leaf frame) and samples by part, from py-spy's raw output;
    parts["(idle: waiting for work)"] counts the parked threads' samples, left out of the rest."""
    self_time: Counter[str] = Counter()
    parts: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        match = _LINE.match(line.strip())
        if match is None:
            continue
        count = int(match.group("count"))
        frames = [f for f in _frames(match.group("stack")) if not f.startswith(("thread (", "process "))]
        if not frames:
            continue
        if _idle(frames):
            parts[IDLE] += count
            continue
        total += count
        self_time[_self_label(frames[-1])] += count
        parts[_part(frames)] += count
    return total, self_time, parts


def profile(events: int, workdir: Path) -> Profile:
    """One sampled run at `events` per request."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    with receiver_process({"type": "file"}) as receiver:
        measure(receiver, events, 2, workdir)  # warm up
        wait_delivered(receiver.url)
        raw = workdir / f"profile-{events}.txt"
        collapsed = f"/tmp/log-bridge-profile-{events}.txt"  # noqa: S108 - left for flamegraph.pl / speedscope
        load: list[float] = []

        def drive() -> None:
            load.append(measure(receiver, events, SECONDS + 4, workdir).rps)

        driver = threading.Thread(target=drive)
        driver.start()
        time.sleep(2)
        common = ["--native", "-r", str(RATE), "-d", str(SECONDS), "--pid", str(receiver.pid)]
        subprocess.run(
            pinned(LOAD_CPUS, [spy, "record", *common, "-F", "-f", "raw", "-o", str(raw)]),
            capture_output=True,
            check=True,
            timeout=SECONDS + 60,
        )
        driver.join()
        shutil.copy(raw, collapsed)
        total, self_time, parts = aggregate(raw.read_text())
    return Profile(events, total, self_time, parts, load[0] if load else 0.0, collapsed)


def render(profiles: list[Profile]) -> str:
    """Markdown: the parts' shares and the top functions by self time, per size."""
    lines = [
        "### Profile (py-spy)",
        "",
        f"`py-spy record --native -r {RATE} -F -f raw` for {SECONDS} s of the receiver (all threads; "
        f"threads parked waiting for work are counted apart, shares are of the busy samples) under wrk, file "
        f"sink delivering; {pinning()}, py-spy on the load generator's core "
        "(its sampling stops the receiver briefly, so the req/s under the profiler is lower than in the "
        "benchmark).",
        "",
    ]
    for prof in profiles:
        lines += [
            f"#### {prof.events} events/request ({prof.samples:,} busy samples, {prof.rps:,.0f} req/s under wrk "
            f"during the sampled run)",
            "",
            "| part | share of samples |",
            "|---|---:|",
        ]
        for part, count in prof.parts.most_common():
            if part != IDLE:
                lines.append(f"| {part} | {100 * count / prof.samples:.1f} % |")
        lines.append(f"| {IDLE}, not in the total | {prof.parts[IDLE]:,} samples |")
        lines += ["", f"| top {TOP} by self time | share |", "|---|---:|"]
        for name, count in prof.self_time.most_common(TOP):
            lines.append(f"| `{name}` | {100 * count / prof.samples:.1f} % |")
        lines += ["", f"Collapsed stacks: `{prof.collapsed}`.", ""]
    return "\n".join(lines)


def from_files(runs: list[tuple[int, float]]) -> str:
    """The Markdown again from the collapsed stacks left in /tmp: (events, req/s during the run) each."""
    profiles = []
    for events, rps in runs:
        collapsed = f"/tmp/log-bridge-profile-{events}.txt"  # noqa: S108
        total, self_time, parts = aggregate(Path(collapsed).read_text())
        profiles.append(Profile(events, total, self_time, parts, rps, collapsed))
    return render(profiles)


def main(sizes: list[int]) -> None:
    """Profile each size and print the Markdown."""
    workdir = Path(tempfile.mkdtemp(prefix="log-bridge-bench-profile-"))
    try:
        print(render([profile(events, workdir) for events in sizes]))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main([int(arg) for arg in sys.argv[1:]] or [10, 100])
