"""The `log-bridge` command: serve, reload, validate, check, send-test, drain, dlq list / replay / purge, workos
(receiver.workos_cli)."""

from __future__ import annotations

import signal
import sys

_HANGUPS: list[int] = []
"""SIGHUPs that arrived while `serve` was starting; applied as one reload once it serves."""
_STOPS: list[int] = []
"""SIGTERMs that arrived while `serve` was starting; it stops before serving. (Raising from the handler instead
would interrupt whatever module is being imported: orjson's initialisation then crashes the interpreter.)"""
if sys.argv[1:2] == ["serve"]:  # as early as the program can
    # As a container's PID 1 the kernel drops any signal without a handler: a SIGTERM during start-up would be
    # lost, and the pod killed only at the end of its grace period.
    signal.signal(signal.SIGTERM, lambda signum, _frame: _STOPS.append(signum))
    if hasattr(signal, "SIGHUP"):  # a HUP never kills
        signal.signal(signal.SIGHUP, lambda signum, _frame: _HANGUPS.append(signum))

import argparse
import asyncio
import base64
import gzip
import logging
import os
import sqlite3
import ssl
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import orjson

from receiver import __version__
from receiver.config import Config, TLSConfig, default_config, listen_url, load_config, load_journal_config
from receiver.errors import ConfigError, LogBridgeError
from receiver.health import check_sinks
from receiver.journal import (
    INTAKE,
    DeadLetter,
    count_dead_letters,
    iter_dead_letters,
    measure_dead_letters,
    purge_dead_letters,
    replay_dead_letters,
)
from receiver.journal.schema import open_problem
from receiver.logs import scrub, setup_logging
from receiver.samples import encode_body, sample_wrappers
from receiver.send import Unreachable, post
from sinks.errors import SinkError
from sinks.fields import TlsOptions

log = logging.getLogger("log_bridge")

CONFIG_ENV = "LOG_BRIDGE_CONFIG"
NO_CONFIG = f"no configuration: pass --config FILE or set {CONFIG_ENV}"


def _config_path(given: str | None) -> str | None:
    return given or os.environ.get(CONFIG_ENV) or None


def _load(given: str | None, *, required: bool) -> Config:
    path = _config_path(given)
    if path is None:
        if required:
            raise ConfigError([NO_CONFIG])
        return default_config()
    return load_config(path)


def _load_required(given: str | None) -> Config | None:
    """The configuration a command needs, or None after printing every problem with it."""
    try:
        return _load(given, required=True)
    except ConfigError as exc:
        _print_errors(exc)
        return None


def _print_errors(exc: ConfigError) -> None:
    print(f"log-bridge: configuration is invalid ({len(exc.errors)} problem(s)):", file=sys.stderr)
    for problem in exc.errors:
        print(f"  {problem}", file=sys.stderr)


# --- serve / validate ----------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the receiver."""
    from receiver.server import serve

    setup_logging(args.log_level, args.debug_logger)
    try:
        config = _load(args.config, required=False)
    except ConfigError as exc:
        _print_errors(exc)
        return 2
    if _config_path(args.config) is None:
        log.warning(
            "no configuration given: serving the local default (loopback only, no secret, file sink in "
            "./log-bridge-data/); pass --config FILE for anything else"
        )
    try:
        status = asyncio.run(
            serve(config, _config_path(args.config), args.pid_file, early_hangups=_HANGUPS, early_stops=_STOPS)
        )
    except ConfigError as exc:
        _print_errors(exc)
        return 2
    except (LogBridgeError, SinkError, ssl.SSLError) as exc:
        print(f"log-bridge: cannot start: {scrub(str(exc))}", file=sys.stderr)
        return 2
    except OSError as exc:  # the port is taken, a certificate file is missing, the journal's disk is unusable
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"log-bridge: cannot start: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    return _leave(status)


def _leave(status: int) -> int:
    """After `serve` or `drain` stopped (the journal closed): threads still running are requests a sink sent to
    an endpoint that does not answer (an S3 put waiting out its `timeout`), and what they were sending is in the
    journal at that sink's cursor. The interpreter would wait for them before exiting, past `shutdown_timeout`
    or drain's `--timeout`: the process exits without them (idle threads, which end at once, get a second)."""
    until = time.monotonic() + 1.0
    lingering = [t for t in threading.enumerate() if t is not threading.current_thread() and not t.daemon]
    for thread in lingering:
        thread.join(max(0.0, until - time.monotonic()))
    if not any(thread.is_alive() for thread in lingering):
        return status
    log.warning(
        "exiting without waiting for sink requests still in progress; what they were sending stays in the journal",
        extra={"threads": [thread.name for thread in lingering if thread.is_alive()]},
    )
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def cmd_validate(args: argparse.Namespace) -> int:
    """Check a configuration and print a summary."""
    config = _load_required(args.config)
    if config is None:
        return 1
    server = config.server
    try:
        tls = None
        if server.tls is not None:
            tls = "files not loaded (--skip-tls-files)" if args.skip_tls_files else _check_tls(server.tls)
        loaded = [] if args.skip_tls_files else _check_sink_tls(config)
        if not args.skip_tls_files:
            config.journal.dedup_store.load_ca_file()
    except ConfigError as exc:
        _print_errors(exc)
        return 1
    print(f"configuration OK: {_config_path(args.config)}")
    print(
        f"  listen: {listen_url(server.host, server.port, tls=server.tls is not None)}"
        + (" (mTLS)" if server.tls and server.tls.client_ca_file else "")
        + (" (IPv4 and IPv6)" if server.host == "::" else "")
    )
    if tls is not None:
        print(f"  tls: {tls}")
    print(f"  allowlist: {', '.join(server.allowlist)}; trusted proxies: {', '.join(server.trusted_proxies) or 'none'}")
    journal = config.journal
    print(f"  journal: {journal.path} (cap {journal.max_bytes} bytes, dedup {journal.dedup_window:g}s)")
    if journal.dedup_store.type == "redis":
        from receiver.dedup_store import display_url

        print(f"  dedup shared through redis at {display_url(journal.dedup_store.url_text())}")
    for stream in config.streams:
        auth = (
            f"secret in {stream.auth.header} ({len(stream.auth.values)} accepted value(s))"
            if stream.auth
            else "NO SECRET"
        )
        print(f"  stream {stream.name}: POST {stream.path}, {auth} -> {', '.join(stream.sinks)}")
    for name, section in config.sinks.items():
        feeds = config.streams_of(name)
        note = ("" if feeds else " (no stream feeds it)") + (" (its TLS files load)" if name in loaded else "")
        print(f"  sink {name}: type {section.type}{note}")
    if config.workos is not None:
        export = config.workos.export
        archive = f"export every {export.every:g}s to {', '.join(export.sinks)}" if export else "no export"
        watch = f"watch every {config.workos.watch.every:g}s"
        print(f"  workos: {len(config.workos.organizations)} organization(s), {watch}, {archive}")
    return 0


def _check_tls(tls: TLSConfig) -> str:
    """Load the listener's certificate, key and client CA as `serve` does, and refuse a certificate outside its
    validity (`serve` would present it, and every client refuse it); what was loaded, for the summary."""
    from receiver.server import certificate_validity, server_tls_context, validity_problem

    server_tls_context(tls)
    validity = certificate_validity(tls.cert_file)
    problem = validity_problem(tls, validity, datetime.now(UTC))
    if problem is not None:
        raise ConfigError([problem])
    until = f", valid until {validity[1]:%Y-%m-%d %H:%M:%S} UTC" if validity is not None else ""
    client_ca = f"; client CA {tls.client_ca_file} loads" if tls.client_ca_file is not None else ""
    return f"certificate {tls.cert_file} and key {tls.key_file} load{until}{client_ca}"


def _check_sink_tls(config: Config) -> list[str]:
    """Load the CA, certificate and key files the sinks' `tls` name, as building them at a start does; the sinks
    whose files loaded (ConfigError listing those that do not)."""
    loaded, problems = [], []
    for name, section in config.sinks.items():
        tls = getattr(section.options, "tls", None)
        if isinstance(tls, TlsOptions) and (tls.ca_file is not None or tls.cert_file is not None):
            try:
                tls.client_context(name)
            except SinkError as exc:
                problems.append(str(exc))
            else:
                loaded.append(name)
    if problems:
        raise ConfigError(problems)
    return loaded


def _not_serving(pid: int) -> str | None:
    """Why process `pid` is not a `log-bridge serve`, when that can be told (through /proc, where there is one)."""
    if pid < 1:  # 0 would signal this command's process group, -1 every process it may signal
        return f"{pid} is not a process id"
    try:
        arguments = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except FileNotFoundError:
        return f"no process {pid} (a pid file left by a process that is gone?)" if Path("/proc/self").exists() else None
    except OSError:
        return None
    if b"serve" not in arguments or not any(b"log-bridge" in a or b"receiver.cli" in a for a in arguments):
        return f"process {pid} is not a log-bridge serve (a pid file left by a process that is gone?)"
    return None


def cmd_reload(args: argparse.Namespace) -> int:
    """Ask a running receiver to reload its configuration."""
    try:
        pid = int(Path(args.pid_file).read_text().strip())
        problem = _not_serving(pid)
        if problem is None:  # a SIGHUP kills most other programs
            os.kill(pid, signal.SIGHUP)
    except ValueError:  # not a number, or not text: int()'s own message would quote the file's bytes
        problem = "it holds no process id"
    except OSError as exc:
        problem = exc.strerror or str(exc)
    if problem is not None:
        print(f"log-bridge reload: cannot signal the process in {args.pid_file}: {problem}", file=sys.stderr)
        return 1
    print(f"sent SIGHUP to {pid}; its log says whether the new configuration was applied")
    return 0


# --- check ---------------------------------------------------------------------------------------


def cmd_check(args: argparse.Namespace) -> int:
    """Build the configured sinks and run their health checks: are they reachable, do they take these credentials."""
    config = _load_required(args.config)
    if config is None:
        return 2
    names = list(config.sinks) if not args.sink else args.sink
    unknown = [name for name in names if name not in config.sinks]
    if unknown:
        print(f"log-bridge check: no sink named {', '.join(map(repr, unknown))} in the configuration", file=sys.stderr)
        return 2
    results, unbuilt = asyncio.run(check_sinks(config, names, args.timeout))
    width = max(len(name) for name in names)
    for name, health in results.items():
        verdict = "ok    " if health.ok else "FAILED"
        print(f"{verdict} {name:<{width}}  ({config.sinks[name].type}) {health.message}")
    failed = sum(not health.ok for health in results.values())
    print(f"{len(results) - failed} of {len(results)} sink(s) healthy")
    if config.workos is not None and not args.sink:
        from receiver.workos_cli import check_workos

        failed += check_workos(config.workos, args.timeout)
    store_ok = True
    if not args.sink and config.journal.dedup_store.type == "redis":
        try:
            store_ok = asyncio.run(_check_dedup_store(config))
        except ConfigError as exc:  # the redis extra is not installed
            _print_errors(exc)
            return 2
    if unbuilt:  # the configuration itself needs a change (a file it names is missing), not the sink's end
        return 2
    return 1 if failed or not store_ok else 0


async def _check_dedup_store(config: Config) -> bool:
    """Ping the shared dedup store and print the verdict."""
    from receiver.dedup_store import RedisDedupStore

    store = RedisDedupStore(config.journal.dedup_store, config.journal.dedup_window)
    try:
        problem = await store.ping()
    finally:
        await store.close()
    if problem is None:
        print(f"ok     dedup store (redis) {store.where} answers: deduplication is shared between replicas")
    else:
        print(
            f"FAILED dedup store (redis) {store.where}: {problem}; "
            "the intake deduplicates locally only while it does not answer"
        )
    return problem is None


# --- send-test -----------------------------------------------------------------------------------


def cmd_send_test(args: argparse.Namespace) -> int:
    """Post sample events to a running receiver."""
    body, content_type = encode_body(sample_wrappers(args.count), args.format)
    headers = {"Content-Type": content_type, "User-Agent": "log-bridge send-test"}
    if args.gzip:
        body = gzip.compress(body)
        headers["Content-Encoding"] = "gzip"
    for header in args.header:
        name, sep, value = header.partition(":")
        if not sep or not name.strip():  # not quoted back: what was meant as a header may be a secret
            print("log-bridge send-test: --header must look like 'Name: value'", file=sys.stderr)
            return 2
        headers[name.strip()] = value.strip()
    try:
        status, text = post(args.url, body, headers, timeout=args.timeout, cafile=args.cafile, insecure=args.insecure)
    except ValueError as exc:  # not an http(s) URL
        print(f"log-bridge send-test: {exc}", file=sys.stderr)
        return 2
    except Unreachable as exc:
        print(f"log-bridge send-test: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1
    print(f"{status} {text}")
    return 0 if 200 <= status < 300 else 1


# --- dlq -----------------------------------------------------------------------------------------


def _journal_path(given: str | None) -> Path | None:
    """The journal a read-only command looks at: only the `journal` section is read, so the sinks'
    credentials need not be set."""
    path = _config_path(given)
    try:
        if path is None:
            raise ConfigError([NO_CONFIG])
        return load_journal_config(path).path
    except ConfigError as exc:
        _print_errors(exc)
        return None


def _no_journal(command: str, path: Path) -> bool:
    """Say so when there is no journal at `path`: a relative one is found from the working directory, so a
    command run elsewhere than `serve` would otherwise list nothing and look like an empty journal."""
    if path.exists():
        return False
    where = str(path) if path.is_absolute() else f"{path} (relative to the working directory: {path.absolute()})"
    print(f"log-bridge {command}: no journal at {where}", file=sys.stderr)
    return True


def _unusable(command: str, path: Path, exc: sqlite3.Error) -> int:
    """Say in one line why the journal cannot be used (not a journal, damaged, locked, not writable): exit 2."""
    print(f"log-bridge {command}: cannot use the journal {path}: {open_problem(exc, path)}", file=sys.stderr)
    return 2


def _json_text(data: bytes) -> bool:
    """Whether `data` is one JSON value in UTF-8 (numbers of any size or range included, as the sinks take them).
    One nested too deeply to check (bad input the intake kept) is not taken for JSON: it is printed as base64."""
    try:
        data.decode("utf-8")
        msgspec.json.decode(data, type=msgspec.Raw)
    except (UnicodeDecodeError, msgspec.DecodeError, RecursionError):
        return False
    return True


def _listing_line(letter: DeadLetter) -> bytes:
    """One dead letter as a JSON line, its element exactly as stored: embedded as it is when it is JSON on one
    line (parsing it and printing it again would turn integers past 64 bits into floats and round long
    decimals), else as base64 (`element_base64`) beside its text for reading."""
    at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(letter.at))
    line: dict[str, object] = {
        "id": letter.id,
        "sink": letter.sink,
        "stream": letter.stream,
        "reason": letter.reason,
        "at": at,
    }
    data = letter.data
    if b"\n" not in data and b"\r" not in data and _json_text(data):
        return orjson.dumps(line)[:-1] + b',"element":' + data + b"}\n"
    line["element"] = data.decode("utf-8", "replace")
    line["element_base64"] = base64.b64encode(data).decode("ascii")
    return orjson.dumps(line) + b"\n"


def cmd_dlq_list(args: argparse.Namespace) -> int:
    """Print dead letters as JSON lines."""
    journal = _journal_path(args.config)
    if journal is None:
        return 2
    if _no_journal("dlq list", journal):
        return 2
    out = sys.stdout.buffer
    try:
        for letter in iter_dead_letters(journal, args.sink):
            out.write(_listing_line(letter))
    except sqlite3.Error as exc:
        out.flush()
        return _unusable("dlq list", journal, exc)
    out.flush()
    return 0


def cmd_dlq_replay(args: argparse.Namespace) -> int:
    """Put the dead letters of the sinks a stream feeds back for delivery."""
    config = _load_required(args.config)
    if config is None:
        return 2
    if args.sink == INTAKE:
        print(
            "log-bridge dlq replay: intake dead letters are bad input, not events; they cannot be replayed",
            file=sys.stderr,
        )
        return 2
    if args.sink is not None and args.sink not in config.sinks:
        print(f"log-bridge dlq replay: no sink named {args.sink!r} in the configuration", file=sys.stderr)
        return 2
    if args.sink is not None and not config.streams_of(args.sink):
        print(
            f"log-bridge dlq replay: no stream feeds sink {args.sink!r} in the configuration, so nothing would "
            "deliver its dead letters; they are left as they are",
            file=sys.stderr,
        )
        return 2
    journal = Path(config.journal.path)
    if _no_journal("dlq replay", journal):
        return 2
    # Only sinks a stream feeds: a replay for another one would be appended for a sink nothing delivers to.
    fed = [args.sink] if args.sink is not None else [name for name in config.sinks if config.streams_of(name)]
    try:
        count = sum(replay_dead_letters(journal, name) for name in fed)
        remaining = count_dead_letters(journal) if args.sink is None else {}
    except sqlite3.Error as exc:
        return _unusable("dlq replay", journal, exc)
    print(f"replayed {count} dead letter(s); the running service delivers them (or the next start does)")
    if args.sink is None:
        for name, left in remaining.items():
            if name not in fed:
                why = "no stream feeds it" if name in config.sinks else "it is not in the configuration"
                print(f"left {left} dead letter(s) of sink {name}: {why}")
    return 0


def _instant(text: str) -> float:
    """An ISO 8601 time for `--before` (UTC when it names no offset), as a Unix time."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r} (e.g. 2026-01-31T12:00:00Z)") from None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def _letter_id(text: str) -> int:
    """A dead letter's `id` for `--id`: a positive integer SQLite can hold."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 0 < value < 2**63:
        raise argparse.ArgumentTypeError(f"not a dead letter id: {text!r} (the id of `dlq list`, a positive integer)")
    return value


def cmd_dlq_purge(args: argparse.Namespace) -> int:
    """Delete the dead letters selected (with --yes; else say what would be deleted)."""
    selected = args.sink is not None or args.before is not None or bool(args.id)
    if selected == args.all:  # none at all is a mistake far more often than a wish to delete everything
        why = "--all is every dead letter, not with --sink, --before or --id" if args.all else "nothing selected"
        print(f"log-bridge dlq purge: {why}: give --sink, --before or --id, or --all alone", file=sys.stderr)
        return 2
    journal = _journal_path(args.config)
    if journal is None:
        return 2
    if _no_journal("dlq purge", journal):
        return 2
    ids = sorted(set(args.id))
    try:
        if not args.yes:
            count, size = measure_dead_letters(journal, args.sink, args.before, ids)
            print(f"would delete {count} dead letter(s), {size} bytes; nothing deleted: pass --yes to delete them")
            return 0
        count, size = purge_dead_letters(journal, args.sink, args.before, ids)
    except sqlite3.Error as exc:
        return _unusable("dlq purge", journal, exc)
    print(f"deleted {count} dead letter(s), {size} bytes; a running service counts the room within a few seconds")
    return 0


# --- drain -------------------------------------------------------------------------------------


def cmd_drain(args: argparse.Namespace) -> int:
    """Deliver what the journal holds, then exit: 0 when everything is delivered, 1 with what is left."""
    from receiver.drain import drain

    setup_logging("warning")
    config = _load_required(args.config)
    if config is None:
        return 2
    if _no_journal("drain", Path(config.journal.path)):
        return 2
    try:
        left = asyncio.run(drain(config, args.timeout))
    except (LogBridgeError, SinkError, ssl.SSLError) as exc:  # the journal cannot be opened, a sink built
        print(f"log-bridge drain: cannot start: {scrub(str(exc))}", file=sys.stderr)
        return 2
    if not left:
        print(f"drained: every event in {config.journal.path} is delivered (dead letters: `log-bridge dlq list`)")
        return _leave(0)
    print(f"not drained within {args.timeout:g}s; left in {config.journal.path}:")
    for item in left:
        print(f"  {item.sink}: {item.events} event(s) ({item.health})")
    return _leave(1)


# --- the parser ----------------------------------------------------------------------------------


def _seconds(text: str) -> float:
    """A `--timeout`: a number of seconds above 0 (0 or less would give up before trying, NaN never)."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0 (got {text!r})")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(
        prog="log-bridge", description="Receive WorkOS audit-log streams and deliver them to your sinks."
    )
    parser.add_argument("--version", action="version", version=f"log-bridge {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    config_help = f"YAML configuration file (default: ${CONFIG_ENV})"

    serve = commands.add_parser("serve", help="run the receiver", description="Run the receiver until SIGTERM/SIGINT.")
    serve.add_argument("--config", "-c", help=config_help + "; none: a safe local default")
    serve.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log-bridge's own level; libraries log at info at most unless named with --debug-logger",
    )
    serve.add_argument(
        "--debug-logger",
        action="append",
        default=[],
        metavar="NAME",
        help="also let this library logger print debug lines (e.g. botocore); repeatable; secrets are masked",
    )
    serve.add_argument("--pid-file", help="write the process id here (for `log-bridge reload`)")
    serve.set_defaults(func=cmd_serve)

    reload = commands.add_parser(
        "reload",
        help="reload a running receiver's configuration",
        description="Send SIGHUP to the receiver whose --pid-file is given: it re-reads its configuration file "
        "and TLS files, and keeps the old configuration if the new one is invalid (its log says which).",
    )
    reload.add_argument("--pid-file", required=True, help="the file `serve --pid-file` wrote")
    reload.set_defaults(func=cmd_reload)

    validate = commands.add_parser("validate", help="check a configuration", description="Check a configuration.")
    validate.add_argument("--config", "-c", help=config_help)
    validate.add_argument(
        "--skip-tls-files",
        action="store_true",
        help="do not load the TLS files of server.tls and of the sinks' tls (where they exist only beside the service)",
    )
    validate.set_defaults(func=cmd_validate)

    check = commands.add_parser(
        "check",
        help="run the sinks' health checks",
        description="Build the configured sinks and run their health checks (reachable, credentials accepted, "
        "writable); exit 1 when one fails.",
    )
    check.add_argument("--config", "-c", help=config_help)
    check.add_argument("--sink", action="append", help="only this sink (repeatable)")
    check.add_argument("--timeout", type=_seconds, default=30.0, help="seconds each check may take (default 30)")
    check.set_defaults(func=cmd_check)

    send = commands.add_parser(
        "send-test",
        help="post sample WorkOS events to a receiver",
        description="Post realistic WorkOS audit-log wrappers to URL and print the answer.",
    )
    send.add_argument("url", help="e.g. http://127.0.0.1:8080/workos")
    send.add_argument("--header", "-H", action="append", default=[], help="'Name: value', e.g. the stream's secret")
    send.add_argument("--format", choices=["json", "ndjson"], default="json")
    send.add_argument("--count", "-n", type=int, default=3)
    send.add_argument("--gzip", action="store_true", help="gzip the body")
    send.add_argument("--cafile", help="CA bundle to verify an https URL")
    send.add_argument("--insecure", action="store_true", help="do not verify the https certificate")
    send.add_argument("--timeout", type=_seconds, default=30.0, help="seconds to wait for the answer (default 30)")
    send.set_defaults(func=cmd_send_test)

    drain = commands.add_parser(
        "drain",
        help="deliver a journal's backlog, then exit",
        description="Deliver everything in the journal to its sinks, without listening; exit 0 when all is "
        "delivered, 1 with what is left per sink when the timeout ends first. For the volume of a replica that is "
        "gone; never on a journal a running `serve` uses.",
    )
    drain.add_argument("--config", "-c", help=config_help)
    drain.add_argument("--timeout", type=_seconds, default=300.0, help="seconds to keep trying (default 300)")
    drain.set_defaults(func=cmd_drain)

    dlq = commands.add_parser(
        "dlq", help="dead letters: list, replay or purge", description="Inspect, replay or delete dead letters."
    )
    dlq_commands = dlq.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")
    listing = dlq_commands.add_parser(
        "list",
        help="print dead letters as JSON lines",
        description="Print dead letters as JSON lines: element, reason, when.",
    )
    listing.add_argument("--config", "-c", help=config_help)
    listing.add_argument("--sink", help=f"only this sink's ({INTAKE} for bad input)")
    listing.set_defaults(func=cmd_dlq_list)
    replay = dlq_commands.add_parser(
        "replay",
        help="put dead letters back for delivery",
        description="Put sinks' dead letters back into the journal for delivery.",
    )
    replay.add_argument("--config", "-c", help=config_help)
    replay.add_argument("--sink", help="only this sink's")
    replay.set_defaults(func=cmd_dlq_replay)
    purge = dlq_commands.add_parser(
        "purge",
        help="delete dead letters",
        description="Delete the dead letters every selector given matches (--sink, --before, --id; or --all), "
        "while the service runs or not. Without --yes it only says how many letters and bytes it would delete.",
    )
    purge.add_argument("--config", "-c", help=config_help)
    purge.add_argument("--sink", help=f"only this sink's ({INTAKE} for bad input; a sink no longer configured too)")
    purge.add_argument(
        "--before",
        type=_instant,
        metavar="TIME",
        help="only those dead-lettered before this ISO 8601 time (UTC unless it names an offset)",
    )
    purge.add_argument(
        "--id", type=_letter_id, action="append", default=[], metavar="N", help="only this one (repeatable)"
    )
    purge.add_argument("--all", action="store_true", help="every dead letter (instead of selectors)")
    purge.add_argument("--yes", action="store_true", help="delete them (without it: a dry run)")
    purge.set_defaults(func=cmd_dlq_purge)

    from receiver.workos_cli import add_commands as add_workos_commands

    add_workos_commands(commands, config_help)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `log-bridge` script."""
    args = build_parser().parse_args(argv)
    if getattr(args, "count", 1) is not None and getattr(args, "count", 1) < 1:
        print(f"log-bridge {args.command}: --count must be at least 1", file=sys.stderr)
        return 2
    if args.command != "serve" and "config" in args and _config_path(args.config) is None:  # only serve has a default
        print(f"log-bridge {args.command}: {NO_CONFIG}", file=sys.stderr)
        return 2
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # what reads the output went away (`dlq list | head`): stop quietly, as a shell tool
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the flush at exit would raise again
        return 141  # 128 + SIGPIPE, the status a shell shows for a tool SIGPIPE ended


if __name__ == "__main__":
    sys.exit(main())
