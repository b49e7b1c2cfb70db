"""Where the receiver's CPU per request goes, stage by stage: the receiver as it ships (file sink delivering),
then the same process with a stage taken away, and the orjson no-op, all under the same wrk load, the servers'
order rotating from round to round. The CPU counted is the server process's (every thread, user + system) from
the start of a run until the sink has caught up, over the requests served.

The variants (`python -m bench.stages --serve VARIANT --config ...` starts one; each replaces one method before
the service starts, so the rest of the process is the receiver's own code):
- `full`: the receiver as it ships.
- `no-delivery`: the journal as it ships, no sink runner taking rows (delivery's cost is `full` minus this).
- `no-journal`: `Journal.append` acknowledges at once: the front, authentication, parsing, metrics and answer.

Not part of `make bench`; run by hand: `python -m bench.stages [EVENTS [ROUNDS]]` (default 10 events a request,
6 rounds of 4 s). Prints Markdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.intake import (
    Server,
    cpu_seconds,
    measure,
    noop_process,
    pinning,
    receiver_process,
    wait_delivered,
)

VARIANTS = ("full", "no-delivery", "no-journal")
DELIVERING = ("full",)
"""Variants whose sink catches up after a run (the CPU until then is counted)."""
DURATION = 4.0


# --- the variants, in the server process ------------------------------------------------------


def _no_delivery() -> None:
    from receiver import delivery

    async def run(self: Any) -> None:
        await asyncio.Event().wait()

    delivery.SinkRunner.run = run  # type: ignore[method-assign]


def _no_journal() -> None:
    from receiver.journal import facade

    async def append(self: Any, stream: str, parsed: Any, received_at: float, scope: str | None = None) -> Any:
        return facade.AppendResult(len(parsed), 0, len(parsed.rejected))

    facade.Journal.append = append  # type: ignore[method-assign]


_PATCHES = {"full": lambda: None, "no-delivery": _no_delivery, "no-journal": _no_journal}


def serve(variant: str, argv: list[str]) -> None:
    """Run `log-bridge` with `argv` (`serve ...`) and the variant's stage replaced."""
    _PATCHES[variant]()
    from receiver.cli import main

    sys.argv = ["log-bridge", *argv]
    main()


# --- the measurement --------------------------------------------------------------------------


def variant_process(variant: str) -> contextlib.AbstractContextManager[Server]:
    """The receiver variant (file sink), as bench.intake starts the receiver."""
    launcher = (sys.executable, "-m", "bench.stages", "--serve", variant)
    return receiver_process({"type": "file"}, launcher=launcher, name=variant)


def run(events: int, rounds: int) -> dict[str, list[float]]:
    """CPU µs per request of every variant and of the orjson no-op, by round."""
    results: dict[str, list[float]] = {}
    workdir = Path(tempfile.mkdtemp(prefix="log-bridge-stages-load-"))
    try:
        with contextlib.ExitStack() as stack:
            servers = [stack.enter_context(variant_process(variant)) for variant in VARIANTS]
            servers.append(stack.enter_context(noop_process("orjson", "aiohttp")))
            for server in servers:
                results[server.name] = []
                measure(server, events, 2, workdir)  # warm up
                if server.name in DELIVERING:
                    wait_delivered(server.url)
            for turn in range(rounds):
                shift = turn % len(servers)
                for server in servers[shift:] + servers[:shift]:
                    before = cpu_seconds(server.pid)
                    load = measure(server, events, DURATION, workdir)
                    if server.name in DELIVERING:
                        wait_delivered(server.url)
                    results[server.name].append(1e6 * (cpu_seconds(server.pid) - before) / max(load.requests, 1))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return results


def render(events: int, results: dict[str, list[float]]) -> str:
    """Markdown: every run, the median, and the no-op's CPU per request over the variant's."""
    noop = statistics.median(next(runs for name, runs in results.items() if name.startswith("no-op")))
    lines = [
        f"CPU per request at {events} events/request (µs, server process, until the sink caught up); "
        f"{pinning()}, wrk; {len(next(iter(results.values())))} rounds of {DURATION:g} s, order rotating.",
        "",
        "| server | every run | median | no-op / it |",
        "|---|---|---:|---:|",
    ]
    for name, runs in results.items():
        median = statistics.median(runs)
        every = ", ".join(f"{value:.0f}" for value in runs)
        lines.append(f"| {name} | {every} | {median:.0f} | {noop / median:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    if argv[:1] == ["--serve"]:
        serve(argv[1], argv[2:])
        return
    events = int(argv[0]) if argv else 10
    rounds = int(argv[1]) if len(argv) > 1 else 6
    print(render(events, run(events, rounds)))


if __name__ == "__main__":
    main(sys.argv[1:])
