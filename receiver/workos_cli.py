"""`log-bridge workos status | export | portal-link`, and the `workos` lines of `log-bridge check`.

Exit codes: 0 fine; 1 a stream is `error` or `invalid` (status) or the export was not stored (export);
2 a configuration or API-key problem (no `workos:` section, key refused, unknown organization);
3 WorkOS could not be asked (timeouts, 5xx, rate limits past the retries).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from receiver.config import WORKOS_EXPORT_MAX_AGE, Config, WorkosConfig

CONFIG_PROBLEMS = frozenset({"unauthorized", "forbidden", "not_found", "client_error"})
INTENTS = (
    "log_streams",
    "audit_logs",
    "sso",
    "dsync",
    "domain_verification",
    "certificate_renewal",
    "bring_your_own_key",
)


def add_commands(commands: Any, config_help: str) -> None:
    """Add `workos` and its actions to the `log-bridge` parser."""
    workos = commands.add_parser(
        "workos",
        help="the WorkOS side: stream state, exports, Admin Portal link",
        description="The WorkOS side, through its API: each organization's log stream state, one export now, "
        "an Admin Portal link.",
    )
    actions = workos.add_subparsers(dest="workos_command", required=True, metavar="ACTION")

    status = actions.add_parser(
        "status",
        help="each organization's log stream: type, state, last synced",
        description="Print each organization's log stream type, state and last sync; exit 1 when a stream is "
        "error or invalid, 2 on a configuration or API-key problem, 3 when WorkOS cannot be asked.",
    )
    status.add_argument("--config", "-c", help=config_help)
    status.set_defaults(func=cmd_status)

    export = actions.add_parser(
        "export",
        help="one export now (does not move the schedule)",
        description="Export one organization's events for a time range as CSV, now; writes FILE, or stores it "
        "through workos.export.sinks. The schedule's state is not changed.",
    )
    export.add_argument("--config", "-c", help=config_help)
    export.add_argument("--organization", required=True, help="org_...")
    export.add_argument("--from", dest="start", required=True, help="ISO-8601 time, e.g. 2024-01-15T00:00:00Z")
    export.add_argument("--to", dest="end", required=True, help="ISO-8601 time")
    export.add_argument("--action", action="append", default=[], help="only this action (repeatable)")
    export.add_argument("--output", "-o", help="write the CSV here instead of through the export sinks")
    export.set_defaults(func=cmd_export)

    portal = actions.add_parser(
        "portal-link",
        help="print an Admin Portal link for an organization's admin",
        description="Print an ephemeral Admin Portal link, so the organization's admin can point their log "
        "stream at this receiver.",
    )
    portal.add_argument("--config", "-c", help=config_help)
    portal.add_argument("--organization", required=True, help="org_...")
    portal.add_argument("--intent", default="log_streams", choices=INTENTS)
    portal.add_argument("--return-url", help="where the portal's logo leads back to")
    portal.set_defaults(func=cmd_portal_link)


def _workos_config(args: argparse.Namespace) -> tuple[Config, WorkosConfig] | None:
    from receiver.cli import _load_required

    config = _load_required(args.config)
    if config is None:
        return None
    if config.workos is None:
        print("log-bridge workos: the configuration has no workos: section (see docs/workos.md)", file=sys.stderr)
        return None
    return config, config.workos


def _exit_for(reason: str) -> int:
    return 2 if reason in CONFIG_PROBLEMS else 3


# --- status ----------------------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    """Print each organization's stream state."""
    loaded = _workos_config(args)
    if loaded is None:
        return 2
    return asyncio.run(_status(loaded[1]))


async def _status(config: WorkosConfig) -> int:
    from receiver.workos import WorkosApi, WorkosApiError, stream_status

    api = WorkosApi(config)
    code = 0
    try:
        for organization in config.organizations:
            try:
                status = await stream_status(api, organization)
            except WorkosApiError as exc:
                print(f"{organization}  cannot read: {exc}")
                code = max(code, _exit_for(exc.reason))
                continue
            if status.stream_type is None:
                print(f"{organization}  no log stream  ({status.advice()})")
                continue
            synced = status.last_synced_at or "never"
            print(f"{organization}  {status.stream_type}  {status.state}  last synced {synced}  ({status.advice()})")
            if status.broken:
                code = max(code, 1)
    finally:
        await api.close()
    return code


# --- export ----------------------------------------------------------------------------------------


def _parse_time(text: str, flag: str) -> int:
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{flag}: expected an ISO-8601 time such as 2024-01-15T00:00:00Z, got {text!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp())


class ProgressBar:
    """One status line on a terminal: the wait for WorkOS, then the bytes downloaded. Silent elsewhere."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.on = stream.isatty()
        self._shown = False

    def __call__(self, phase: str, done: int, total: int | None) -> None:
        if not self.on:
            return
        if phase == "pending":
            line = f"waiting for WorkOS to prepare the export ... {done}s"
        elif total:
            filled = int(30 * done / total)
            line = f"downloading [{'#' * filled}{'.' * (30 - filled)}] {done / 2**20:.1f} of {total / 2**20:.1f} MiB"
        else:
            line = f"downloading ... {done / 2**20:.1f} MiB"
        self.stream.write(f"\r{line:<79}")
        self.stream.flush()
        self._shown = True

    def done(self) -> None:
        """End the status line."""
        if self._shown:
            self.stream.write("\n")
            self.stream.flush()


def cmd_export(args: argparse.Namespace) -> int:
    """One export now, to FILE or through the export sinks."""
    loaded = _workos_config(args)
    if loaded is None:
        return 2
    config, workos = loaded
    try:
        start, end = _parse_time(args.start, "--from"), _parse_time(args.end, "--to")
        if start >= end:
            raise ValueError("--from must be before --to")
        if start < time.time() - WORKOS_EXPORT_MAX_AGE:
            raise ValueError("--from is more than 90 days ago: WorkOS exports reach three months back")
        if args.output is None and workos.export is None:
            raise ValueError("no --output and no workos.export.sinks to store the file through")
    except ValueError as exc:
        print(f"log-bridge workos export: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(_export(config, workos, args.organization, start, end, args.action, args.output))


async def _export(
    config: Config,
    workos: WorkosConfig,
    organization: str,
    start: int,
    end: int,
    actions: list[str],
    output: str | None,
) -> int:
    from receiver.workos import WorkosApi, WorkosApiError
    from receiver.workos_export import Exporter, ExportFailed, Filters, object_name, store_everywhere

    api = WorkosApi(workos)
    export = workos.export
    exporter = Exporter(
        api,
        timeout=export.timeout if export else 1800.0,
        max_bytes=export.max_bytes if export else 256 * 2**20,
    )
    bar = ProgressBar(sys.stderr)
    filters = (
        Filters(actions) if export is None else Filters(actions or export.actions, export.actor_names, export.targets)
    )
    settled = end + (export.settle if export else 0.0)
    try:
        export_id, made = await exporter.create(organization, start, end, filters)
        if made < settled and output is None:
            print(f"log-bridge workos export: {_unsettled(made, settled)}; not stored", file=sys.stderr)
            return 1
        url = await exporter.wait_ready(export_id, bar)
        data = await exporter.download(export_id, url, bar)
    except WorkosApiError as exc:
        bar.done()
        print(f"log-bridge workos export: {exc}", file=sys.stderr)
        return _exit_for(exc.reason)
    except ExportFailed as exc:
        bar.done()
        print(f"log-bridge workos export: {exc}", file=sys.stderr)
        return 1
    finally:
        await exporter.close()
        await api.close()
    bar.done()
    if output is not None:
        from sinks.file import store_file

        try:
            await asyncio.to_thread(store_file, Path(output), data)
        except OSError as exc:
            print(f"log-bridge workos export: cannot write {output}: {exc.strerror}", file=sys.stderr)
            return 1
        print(f"wrote {len(data)} bytes to {output}")
        if made < settled:
            print(f"log-bridge workos export: warning: {_unsettled(made, settled)}", file=sys.stderr)
        return 0
    from receiver.delivery import build_sinks

    assert export is not None  # noqa: S101 - checked by cmd_export
    sinks = build_sinks(config, export.sinks)
    name = object_name(organization, start, end)
    try:
        failed = await store_everywhere(sinks, name, data, start)  # type: ignore[arg-type]
    finally:
        await asyncio.gather(*(sink.close() for sink in sinks.values()), return_exceptions=True)
    for sink_name in sinks:
        verdict = f"FAILED: {failed[sink_name]}" if sink_name in failed else "stored"
        print(f"{sink_name}: {name} ({len(data)} bytes) {verdict}")
    return 1 if failed else 0


def _unsettled(made: float, settled: float) -> str:
    """Why an export made at `made` (WorkOS's clock) may lack events of a range that settles at `settled` (its end
    plus workos.export.settle)."""
    from receiver.workos_export import iso

    return (
        f"WorkOS made the export at {iso(int(made))} by its clock, before the range had settled "
        f"({iso(int(settled))}), so it may lack events still to come in the range; ask again after then"
    )


# --- portal-link -----------------------------------------------------------------------------------


def cmd_portal_link(args: argparse.Namespace) -> int:
    """Print an Admin Portal link."""
    loaded = _workos_config(args)
    if loaded is None:
        return 2
    return asyncio.run(_portal_link(loaded[1], args.organization, args.intent, args.return_url))


async def _portal_link(config: WorkosConfig, organization: str, intent: str, return_url: str | None) -> int:
    from receiver.workos import WorkosApi, WorkosApiError

    api = WorkosApi(config)
    try:
        found = await api.call(
            "generate_link",
            lambda: api.client.admin_portal.generate_link(
                organization=organization, intent=intent, return_url=return_url
            ),
        )
    except WorkosApiError as exc:
        print(f"log-bridge workos portal-link: {exc}", file=sys.stderr)
        return _exit_for(exc.reason)
    finally:
        await api.close()
    print(found.link)
    return 0


# --- check -----------------------------------------------------------------------------------------


def check_workos(config: WorkosConfig, limit: float) -> int:
    """Print the `workos` lines of `log-bridge check` (key format, key accepted, each organization); returns
    how many failed."""
    results = asyncio.run(_check(config, limit))
    refused = any(getattr(result, "reason", None) == "unauthorized" for result in results.values())
    lines = [(True, "api_key", "has the format of a WorkOS secret key (sk_...)")]
    if refused:
        lines.append((False, "API", f"{config.base_url} refused the API key (401): check workos.api_key"))
    elif any(not isinstance(result, Exception) for result in results.values()):
        lines.append((True, "API", f"{config.base_url} accepts the API key"))
    else:
        lines.append((False, "API", f"{config.base_url}: no organization could be read"))
    for organization, result in results.items():
        if isinstance(result, Exception):
            detail = "not checked (the API key was refused)" if refused else str(result)
            lines.append((False, organization, detail))
        else:
            stream = f"{result.stream_type} stream, {result.state}" if result.stream_type else "no log stream"
            lines.append((True, organization, f"exists; {stream}"))
    width = max(len(name) for _, name, _ in lines)
    for ok, name, detail in lines:
        print(f"{'ok    ' if ok else 'FAILED'} workos {name:<{width}}  {detail}")
    failed = sum(not ok for ok, _, _ in lines)
    print(f"{len(lines) - failed} of {len(lines)} workos check(s) passed")
    return failed


async def _check(config: WorkosConfig, limit: float) -> dict[str, Any]:
    from receiver.workos import WorkosApi, WorkosApiError, stream_status

    api = WorkosApi(config)
    results: dict[str, Any] = {}
    try:
        for organization in config.organizations:
            try:
                async with asyncio.timeout(limit):
                    results[organization] = await stream_status(api, organization)
            except WorkosApiError as exc:
                results[organization] = exc
            except TimeoutError:
                results[organization] = TimeoutError(f"no answer within {limit:g}s")
    finally:
        await api.close()
    return results
