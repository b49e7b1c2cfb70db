"""The YAML configuration: models, `${VAR}` expansion, and errors that name their YAML path.

Validation is pure: it reads the file and the environment, nothing else (no network, no credentials).
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import ssl
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import unquote, urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from receiver.dedup import DEFAULT_MAX_KEYS as DEFAULT_DEDUP_MAX_KEYS
from receiver.errors import ConfigError
from receiver.parsing import DEFAULT_MAX_EVENTS
from sinks import registry
from sinks.errors import SinkTypeError
from sinks.fields import (
    HEADER_NAME,
    ByteSize,
    ConfigModel,
    Duration,
    PositiveDuration,
    SinkConfig,
    has_control_character,
    no_nul_byte,
)
from sinks.http_client import header_secrets

WORKOS = "workos"
"""The allowlist entry that stands for WorkOS's published egress addresses."""

WORKOS_EGRESS = (
    "3.217.146.166",
    "23.21.184.92",
    "34.204.154.149",
    "44.213.245.178",
    "44.215.236.82",
    "50.16.203.9",
    "52.1.251.34",
    "52.21.49.187",
    "174.129.36.47",
)
"""WorkOS's published egress addresses for log streams and webhooks."""

RESERVED_PATHS = ("/healthz", "/readyz", "/metrics")

NAME_PATTERN = r"^[A-Za-z0-9_.-]+$"
"""What a stream's or a sink's name may hold: it is a metric label, a log field and a command-line argument."""
RESERVED_SINK_NAME = "intake"
"""The `stage` label of `log_bridge_events_dead_lettered_total` that counts the intake's dead letters, beside
the sinks' names: a sink of that name would be counted with them."""

COMMON_SINK_KEYS = frozenset({"type", "include_actions", "exclude_actions", "batch", "retry"})


_Model = ConfigModel


def _network(value: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        network = ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address or CIDR network") from None
    mapped = network.network_address.ipv4_mapped if isinstance(network, ipaddress.IPv6Network) else None
    if mapped is not None and network.prefixlen >= 96:  # peers are compared as IPv4 (receiver.netaddr)
        return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


def _network_entry(value: str) -> str:
    """An entry of `allowlist` or `trusted_proxies`: an address, or a network without bits set past its prefix."""
    network = _network(value)
    try:
        ipaddress.ip_network(value)
    except ValueError:  # `10.0.0.1/8` is all of 10.0.0.0/8, rarely what was meant
        raise ValueError(f"{value!r} has bits set past its prefix: write {network}, or the address alone") from None
    return value


def _allowlist_entry(value: str) -> str:
    return value if value == WORKOS else _network_entry(value)


_NetworkEntry = Annotated[str, AfterValidator(_network_entry)]
_LocalPath = Annotated[Path, BeforeValidator(no_nul_byte)]
_AllowlistEntry = Annotated[str, AfterValidator(_allowlist_entry)]


class TLSConfig(_Model):
    """HTTPS for the listener; `client_ca_file` turns on mutual TLS."""

    cert_file: _LocalPath
    key_file: _LocalPath
    client_ca_file: _LocalPath | None = None


class AdminConfig(_Model):
    """The operations listener: /healthz, /readyz and /metrics over plain HTTP, outside server.max_connections,
    so a flood of connections on the stream listener neither fails the probes nor blinds the scrapes."""

    host: str | None = None
    """None: the stream listener's host."""
    port: int = Field(ge=0, le=65535)
    """0 asks the system for a free port (tests)."""


class ServerConfig(_Model):
    """The HTTP listener."""

    host: str = "0.0.0.0"  # noqa: S104 - a service listens on every interface unless told otherwise
    port: int = Field(8443, ge=0, le=65535)
    """0 asks the system for a free port (tests); anything else is 1-65535."""
    tls: TLSConfig | None = None
    admin: AdminConfig | None = None
    max_body_bytes: ByteSize = Field(10 * 1024 * 1024, gt=0)
    # A parsed body takes about 3 to 4 times its bytes at its peak: 64 MiB in flight stays near 250 MiB of memory.
    max_inflight_bytes: ByteSize = Field(64 * 1024 * 1024, gt=0, validate_default=True)
    max_events_per_request: int = Field(DEFAULT_MAX_EVENTS, ge=1)
    max_connections: int = Field(4096, ge=1, le=1_000_000)
    """Connections open at once; one more is closed unread. Never more than the file-descriptor limit allows
    (receiver.limits.connection_cap)."""
    trusted_proxies: tuple[_NetworkEntry, ...] = ()
    allowlist: tuple[_AllowlistEntry, ...] = (WORKOS,)
    refuse_unlisted: bool = False
    """Close at accept, before any TLS handshake or HTTP, a connection from an address neither in `allowlist`
    nor in `trusted_proxies` (probes and scrapes then go to `admin`)."""
    header_timeout: PositiveDuration = 10.0
    """Longest wait for a request's headers, and for a TLS handshake."""
    body_timeout: PositiveDuration = 30.0
    shutdown_timeout: Duration = 10.0

    @field_validator("max_inflight_bytes")
    @classmethod
    def _check_inflight(cls, value: int, info: Any) -> int:  # pydantic.ValidationInfo
        # A compressed body and its decompressed form are held together; one such request must always fit.
        body = info.data.get("max_body_bytes")
        if body is not None and value < 2 * body:
            raise ValueError(f"must be at least twice max_body_bytes ({2 * body} bytes)")
        return value

    def allowed_networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        """The allowlist as networks, with `workos` expanded to its addresses."""
        networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for entry in self.allowlist:
            names = WORKOS_EGRESS if entry == WORKOS else (entry,)
            networks.extend(_network(name) for name in names)
        return networks

    def proxy_networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        """The trusted proxies as networks."""
        return [_network(entry) for entry in self.trusted_proxies]


class DedupStoreConfig(_Model):
    """Where dedup keys are shared: the journal alone (one replica), or a Redis every replica asks (several)."""

    type: Literal["journal", "redis"] = "journal"
    url: SecretStr | None = Field(None, validate_default=True)
    """redis://[user:password@]host[:port][/db] or rediss:// (TLS); secret, since it may carry the password."""
    password: SecretStr | None = None
    """The password, when it is not in the URL (e.g. `${REDIS_PASSWORD}`)."""
    key_prefix: str = Field("log-bridge:dedup:", min_length=1)
    timeout: Duration = Field(0.25, gt=0, le=10)
    """Longest wait for one round trip to Redis; past it the request is deduplicated locally only."""
    ca_file: _LocalPath | None = None
    """CA bundle that signed the Redis server's certificate (rediss://), when not a public CA."""

    @field_validator("url")
    @classmethod
    def _check_url(cls, secret: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        value = secret.get_secret_value() if secret is not None else ""
        kind = info.data.get("type")
        if kind == "redis" and not value:
            raise ValueError("field required with type redis")
        if kind == "journal" and value:
            raise ValueError("only used with type redis")
        if value and not value.startswith(("redis://", "rediss://")):  # the value itself is never repeated
            raise ValueError("must start with redis:// or rediss:// (TLS)")
        if value:
            parts = urlsplit(value)
            if parts.query or parts.fragment or value.endswith(("?", "#")):  # redis-py takes options from a query:
                raise ValueError(  # a TLS check turned off, a password no log line is scrubbed of
                    "takes no query string or fragment (`?`, `#`): its options are keys of journal.dedup_store, "
                    "and a `?` or `#` in the password is written %3F or %23"
                )
            try:
                parts.port  # noqa: B018 - raises on a port that is not a number from 0 to 65535
            except ValueError:
                raise ValueError("the port is not a number from 1 to 65535") from None
            if not parts.hostname:
                raise ValueError("names no host")
            database = parts.path.strip("/")
            if database and not database.isdigit():
                raise ValueError("the database (the path) must be a number")
        return secret

    def url_text(self) -> str:
        """The URL itself ('' without one)."""
        return self.url.get_secret_value() if self.url is not None else ""

    def load_ca_file(self) -> None:
        """Read `ca_file` as the connections to a rediss:// store will; ConfigError naming it when it does not load."""
        if self.ca_file is None or not self.url_text().startswith("rediss://"):
            return
        try:
            ssl.create_default_context(cafile=str(self.ca_file))
        except (OSError, ssl.SSLError) as exc:
            reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or type(exc).__name__
            raise ConfigError([f"journal.dedup_store.ca_file: cannot load {self.ca_file}: {reason}"]) from None


class JournalConfig(_Model):
    """The durable SQLite journal."""

    path: _LocalPath = Path("./data/journal.db")
    max_bytes: ByteSize = Field(1024**3, gt=0)
    """Cap on the undelivered events' bytes (the backlog); dedup keys do not count."""
    max_dead_letter_bytes: ByteSize = Field(256 * 1024**2, gt=0)
    """Cap on the dead letters' bytes: past it a request with elements to dead-letter is refused (503) and a
    sink's permanent failures are held and retried, so that dead letters cannot fill the disk."""
    dedup_window: Duration = 24 * 3600.0
    dedup_max_keys: int = Field(DEFAULT_DEDUP_MAX_KEYS, ge=1)
    """Keys the dedup index holds at most; past it the oldest are forgotten early (counted), never refused."""
    dedup_store: DedupStoreConfig = DedupStoreConfig()

    @model_validator(mode="after")
    def _check_dedup_store(self) -> JournalConfig:
        if self.dedup_store.type == "redis" and self.dedup_window <= 0:
            raise ValueError(
                "dedup_window must be above 0 with dedup_store type redis (its keys expire with the window)"
            )
        return self


def _accepted_value(value: str) -> str:
    # An HTTP parser strips the whitespace around a header's value, and no sender sends a line break or another
    # control character in one: a value holding them could never match (a secret file's trailing newline).
    value = value.strip(" \t\r\n")
    if not value:
        raise ValueError("an accepted value cannot be empty")
    if has_control_character(value):  # the value itself is never repeated
        raise ValueError("holds a line break, a tab or another control character, which no request can carry")
    return value


def _header_name(value: str) -> str:
    if not HEADER_NAME.fullmatch(value):
        raise ValueError("not an HTTP header name (letters, digits and !#$%&'*+.^_`|~- only)")
    return value


class AuthConfig(_Model):
    """The secret header a stream requires; several values may be accepted at once, for rotation."""

    header: Annotated[str, AfterValidator(_header_name)] = "Authorization"
    values: tuple[Annotated[str, AfterValidator(_accepted_value)], ...] = Field(min_length=1)


class StreamConfig(_Model):
    """One WorkOS log stream: where it posts, the secret it sends, the sinks it feeds."""

    name: str = Field(pattern=NAME_PATTERN)
    path: str = Field(pattern=r"^/[A-Za-z0-9_./-]*$")
    auth: AuthConfig | None = None
    sinks: tuple[str, ...] = Field(min_length=1)

    @field_validator("path")
    @classmethod
    def _normal_path(cls, value: str) -> str:
        # A sender's URL parser resolves dot segments before the request is sent (WHATWG URL, RFC 3986
        # section 5.2.4), so a path holding them, or an empty segment, would be a stream nothing ever reaches.
        segments = value[1:].split("/")
        if any(segment in (".", "..") for segment in segments):
            raise ValueError("a path cannot hold '.' or '..' segments (senders resolve them away)")
        if "" in segments[:-1]:
            raise ValueError("a path cannot hold an empty segment ('//')")
        return value


class BatchConfig(_Model):
    """How the delivery engine groups events for one send."""

    max_events: int = Field(1000, ge=1)
    max_bytes: ByteSize = Field(1024 * 1024, ge=1)
    max_wait: Duration = 1.0


class RetryConfig(_Model):
    """Backoff between attempts (exponential, full jitter) and the attempt limit (None: for ever)."""

    initial: PositiveDuration = 1.0
    max: PositiveDuration = 60.0
    max_attempts: int | None = Field(None, ge=1)


class SinkSection(_Model):
    """A sink as configured: the common keys, and its own options validated by its type's model."""

    type: str
    include_actions: tuple[str, ...] = ()
    exclude_actions: tuple[str, ...] = ()
    batch: BatchConfig = BatchConfig()
    retry: RetryConfig = RetryConfig()
    options: SinkConfig = SinkConfig()


WORKOS_EXPORT_MAX_AGE = 90 * 86400.0
"""How far back WorkOS exports reach (three months)."""


def _organization_id(value: str) -> str:
    if not re.fullmatch(r"org_[A-Za-z0-9]{1,64}", value):
        raise ValueError("not a WorkOS organization id (org_ followed by letters and digits)")
    return value


def _within_export_reach(value: float) -> float:
    if value > WORKOS_EXPORT_MAX_AGE:
        raise ValueError("must be at most 90d (WorkOS exports reach three months back)")
    return value


_ExportSpan = Annotated[Duration, AfterValidator(_within_export_reach)]


class WorkosWatchConfig(_Model):
    """`workos.watch`: how often each organization's audit-log configuration is read."""

    every: Duration = Field(300.0, ge=10.0)


class WorkosExportConfig(_Model):
    """`workos.export`: the scheduled export archive."""

    every: _ExportSpan = Field(24 * 3600.0, ge=60.0)
    first_range: _ExportSpan = Field(24 * 3600.0, gt=0)
    settle: Duration = Field(15 * 60.0, ge=0, le=7 * 86400.0)
    sinks: tuple[str, ...] = Field(min_length=1)
    actions: tuple[str, ...] = ()
    actor_names: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()
    timeout: Duration = Field(30 * 60.0, gt=0)
    """How long an export may stay `pending` before the attempt is given up (and retried later)."""
    max_bytes: ByteSize = Field(256 * 1024 * 1024, gt=0)
    """Cap on one downloaded CSV (it is held in memory while the sinks store it)."""


class WorkosConfig(_Model):
    """The optional `workos:` section: the WorkOS API, for the stream watch and the export archive."""

    api_key: SecretStr
    base_url: str = Field("https://api.workos.com", pattern=r"^https?://[^/\s]+")
    organizations: tuple[Annotated[str, AfterValidator(_organization_id)], ...] = Field(min_length=1)
    timeout: Duration = Field(30.0, ge=1.0, le=600.0)
    """Time limit of one API request."""
    watch: WorkosWatchConfig = WorkosWatchConfig()
    export: WorkosExportConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _sdk_installed(cls, value: Any) -> Any:
        import importlib.util

        if importlib.util.find_spec("workos") is None:
            raise ValueError("needs the workos package, which is not installed: pip install 'log-bridge[workos]'")
        return value

    @field_validator("api_key")
    @classmethod
    def _key_format(cls, value: SecretStr) -> SecretStr:
        key = value.get_secret_value()
        if not key:
            raise ValueError("is empty (is its environment variable set?)")
        # Printable ASCII only: anything else h11 refuses as a header value, quoting the whole value in its error.
        if not key.startswith("sk_") or not (key.isascii() and key.isprintable()) or " " in key:
            raise ValueError("a WorkOS API key starts with sk_ (Dashboard > API Keys)")
        return value

    @field_validator("organizations")
    @classmethod
    def _organization_ids(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for index, organization in enumerate(value):
            if organization in value[:index]:
                raise ValueError(f"[{index}] {organization!r} is listed twice")
        return value


class Config(_Model):
    """The whole configuration file."""

    server: ServerConfig = ServerConfig()
    journal: JournalConfig = JournalConfig()
    streams: tuple[StreamConfig, ...] = Field(min_length=1)
    sinks: dict[str, SinkSection] = Field(min_length=1)
    workos: WorkosConfig | None = None

    @model_validator(mode="after")
    def _check_references(self) -> Config:
        # The same checks `parse_config` runs on the raw tree (so they are reported beside every other problem).
        streams = [{"name": s.name, "path": s.path, "sinks": list(s.sinks)} for s in self.streams]
        problems = _reference_problems({"streams": streams, "sinks": self.sinks})
        if problems:
            raise ConfigError(problems)
        return self

    @model_validator(mode="after")
    def _check_admin_port(self) -> Config:
        # Here rather than on ServerConfig, so that the error names the key at fault, server.admin.port.
        server, admin = self.server, self.server.admin
        if admin is not None and admin.port and admin.port == server.port and admin.host in (None, server.host):
            clash = f"port {admin.port} is server.port already: the admin listener needs one of its own"
            raise ConfigError([f"server.admin.port: {clash}"])
        return self

    @model_validator(mode="after")
    def _check_workos_sinks(self) -> Config:
        from sinks.objects import stores_objects

        export = self.workos.export if self.workos is not None else None
        problems = []
        for position, sink in enumerate(export.sinks if export is not None else ()):
            where = f"workos.export.sinks[{position}]"
            if sink not in self.sinks:
                problems.append(f"{where}: sink {sink!r} is not defined under sinks")
            elif not stores_objects(self.sinks[sink].type):
                problems.append(
                    f"{where}: sink {sink!r} (type {self.sinks[sink].type}) cannot store files; use a sink of type "
                    "s3 or file"
                )
        if problems:
            raise ConfigError(problems)
        return self

    @model_validator(mode="after")
    def _check_file_retention(self) -> Config:
        # Across sinks, so here: one file sink's retention must not take another's files for its own.
        from sinks.file import FileSink, retention_clashes

        files = {name: sink.options for name, sink in self.sinks.items() if isinstance(sink.options, FileSink.Config)}
        if (
            len(files) > 1
            and any(options.retains for options in files.values())
            and (problems := retention_clashes(files))
        ):
            raise ConfigError(problems)
        return self

    def streams_of(self, sink: str) -> tuple[str, ...]:
        """Names of the streams that feed `sink`."""
        return tuple(s.name for s in self.streams if sink in s.sinks)


# --- ${VAR} expansion ----------------------------------------------------------------------------

_REFERENCE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$")


def expand_env(tree: Any, environ: Mapping[str, str], path: str = "") -> tuple[Any, list[str]]:
    """Expand `${VAR}` and `${VAR:-default}` inside string values (`$$` is a literal `$`).

    Runs on the parsed YAML tree, so a value cannot inject YAML. Returns the new tree and the errors
    (an unset variable without a default, a `$` that starts no reference), each naming its YAML path.
    """
    errors: list[str] = []

    def walk(node: Any, where: str) -> Any:
        if isinstance(node, str):

            def replace(match: re.Match[str]) -> str:
                if match.group(0) == "$$":
                    return "$"
                if match.group(0) == "$":  # `$TOKEN`, `${TOKEN`, `${1TOKEN}`: kept as it is, the value would be
                    # sent as a credential; the value itself is never repeated
                    errors.append(f"{where or '<root>'}: a `$` that starts no ${{VAR}} reference (write $$ for a `$`)")
                    return "$"
                name, default = match.group(1), match.group(2)
                value = environ.get(name)
                if value is None or (value == "" and default is not None):
                    if default is None:
                        errors.append(f"{where or '<root>'}: environment variable {name} is not set")
                        return ""
                    return default
                return value

            return _REFERENCE.sub(replace, node)
        if isinstance(node, dict):
            return {key: walk(value, _join(where, key)) for key, value in node.items()}
        if isinstance(node, list):
            return [walk(value, f"{where}[{index}]") for index, value in enumerate(node)]
        return node

    return walk(tree, path), errors


def _join(where: str, key: object) -> str:
    return f"{where}.{key}" if where else str(key)


def _location(loc: tuple[int | str, ...], prefix: str = "") -> str:
    where = prefix
    for part in loc:
        where = f"{where}[{part}]" if isinstance(part, int) else _join(where, part)
    return where or "<root>"


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The model an annotation holds (`Model`, `Model | None`, `Annotated[Model, ...]`), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    found = [_model_in(arg) for arg in typing.get_args(annotation)]
    return next((model for model in found if model is not None), None)


def _keys_at(model: type[BaseModel], loc: tuple[int | str, ...]) -> list[str]:
    """The keys the mapping at `loc` takes, `model` being the root's model ([] when it is not known)."""
    annotation: Any = model
    for part in loc:
        origin = typing.get_origin(annotation)
        if origin in (tuple, dict):  # `part` is a list's index or a mapping's key: the items' type
            annotation = typing.get_args(annotation)[-1 if origin is dict else 0]
            continue
        current = _model_in(annotation)
        if current is None or not isinstance(part, str) or part not in current.model_fields:
            return []
        annotation = current.model_fields[part].annotation
    current = _model_in(annotation)
    return list(current.model_fields) if current is not None else []


def _unknown_key(key: object, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.6)
    return f"unknown key (did you mean {close[0]}?)" if close else "unknown key"


def _pydantic_errors(
    exc: ValidationError, prefix: str = "", model: type[BaseModel] | None = None, also: Iterable[str] = ()
) -> list[str]:
    """One line per error, naming its YAML path; an unknown key with the known key it is closest to, from
    `model` (the root's) and `also` (keys the root takes besides its model's)."""
    # Messages only: pydantic's own rendering repeats the input value, which may be a secret.
    problems = []
    errors = exc.errors(include_input=False, include_url=False)
    failed_items = {tuple(e["loc"][:n]) for e in errors for n, part in enumerate(e["loc"]) if isinstance(part, int)}
    for error in errors:
        if error["type"] == "too_short" and tuple(error["loc"]) in failed_items:
            continue  # pydantic counts the items that failed as missing: their own errors say what is wrong
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            parent = tuple(error["loc"][:-1])
            known = (_keys_at(model, parent) if model is not None else []) + ([] if parent else list(also))
            message = _unknown_key(error["loc"][-1], known)
        elif error["type"] == "missing":
            message = "field required"
        elif error["type"] == "too_short" and {"min_length", "actual_length"} <= error.get("ctx", {}).keys():
            least, has = error["ctx"]["min_length"], error["ctx"]["actual_length"]  # pydantic's names a Python type
            message = f"needs at least {least} {'entry' if least == 1 else 'entries'}, not {has}"
        problems.append(f"{_location(tuple(error['loc']), prefix)}: {message}")
    return problems


# --- loading -------------------------------------------------------------------------------------

M = TypeVar("M", bound=BaseModel)
_STAND_INS: dict[Any, Any] = {str: "stand-in", int: 1, float: 1.0}
"""Values put in place of a required key that failed, only to let the other checks of its section run."""


def validate_all(model: type[M], data: Any, where: str, also: Iterable[str] = ()) -> tuple[M | None, list[str]]:
    """Validate `data`; on errors, validate again without the keys that failed, so the checks that span
    several keys (which run only once every key is valid) are reported in the same run. `also`: keys the
    mapping takes besides the model's (for the did-you-mean of an unknown key)."""
    try:
        return model.model_validate(data), []
    except ValidationError as exc:
        problems = _pydantic_errors(exc, where, model, also)
        failed = {e["loc"][0] for e in exc.errors() if e["loc"] and isinstance(e["loc"][0], str)}
    if isinstance(data, dict) and failed and failed <= set(data):
        rest = {key: value for key, value in data.items() if key not in failed}
        for key in failed:  # a required key that failed gets a stand-in, so the checks across keys still run
            field = model.model_fields.get(str(key))
            if field is not None and field.is_required() and field.annotation in _STAND_INS:
                rest[key] = _STAND_INS[field.annotation]
        try:
            model.model_validate(rest)
        except ValidationError as again:
            dropped = {_location((key,), where) for key in failed}
            problems += [p for p in _pydantic_errors(again, where, model, also) if p.split(": ", 1)[0] not in dropped]
    return None, list(dict.fromkeys(problems))


def _reference_problems(tree: dict[str, Any]) -> list[str]:
    """Names, paths and sink references of the streams, checked on the raw tree so they are reported even
    when other keys are invalid."""
    streams, sinks = tree.get("streams"), tree.get("sinks")
    if not isinstance(streams, list):
        return []
    defined = sorted(str(name) for name in sinks) if isinstance(sinks, dict) else []
    problems: list[str] = []
    names: set[object] = set()
    paths: dict[object, object] = {}
    for index, stream in enumerate(streams):
        if not isinstance(stream, dict):
            continue
        name, path = stream.get("name"), stream.get("path")
        if isinstance(name, str):
            if name in names:
                problems.append(f"streams[{index}].name: {name!r} is used by another stream")
            names.add(name)
        if isinstance(path, str):
            if path in paths:
                problems.append(f"streams[{index}].path: {path!r} is already used by {paths[path]!r}")
            paths.setdefault(path, name)
            if path in RESERVED_PATHS:
                problems.append(f"streams[{index}].path: {path!r} is reserved")
        wanted = stream.get("sinks")
        for position, sink in enumerate(wanted if isinstance(wanted, list) else []):
            if isinstance(sinks, dict) and sink not in sinks:
                problems.append(
                    f"streams[{index}].sinks[{position}]: sink {sink!r} is not defined under sinks "
                    f"(defined: {', '.join(defined) or 'none'})"
                )
    return problems


def _duplicate_keys(node: yaml.Node, where: str = "") -> list[str]:
    """Keys given twice in one mapping (YAML would silently keep the last), each with its YAML path."""
    problems: list[str] = []
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key, line = str(key_node.value), key_node.start_mark.line + 1
            if key in seen:
                problems.append(f"{_join(where, key)}: duplicate key (line {line}; first given at line {seen[key]})")
            else:
                seen[key] = line
            problems += _duplicate_keys(value_node, _join(where, key))
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            problems += _duplicate_keys(item, f"{where}[{index}]")
    return problems


def _validate_sinks(raw_sinks: Any) -> tuple[dict[str, Any], list[str]]:
    """Validate each sink's own options against its type's model; the common keys stay for `Config`."""
    errors: list[str] = []
    if not isinstance(raw_sinks, dict):
        return raw_sinks, errors
    prepared: dict[str, Any] = {}
    for name, section in raw_sinks.items():
        where = f"sinks.{name}"
        if not isinstance(name, str) or not re.fullmatch(NAME_PATTERN, name):
            errors.append(f"sinks: {name!r} is not a sink name (letters, digits and _ . - only)")
        elif name == RESERVED_SINK_NAME:
            errors.append(f"{where}: the name {name!r} is reserved (the intake's dead letters are counted under it)")
        if not isinstance(section, dict):
            errors.append(f"{where}: expected a mapping")
            prepared[name] = {"type": "?", "options": SinkConfig()}
            continue
        type_name = section.get("type")
        if not isinstance(type_name, str):
            errors.append(f"{where}.type: field required (one of: {', '.join(registry.known_types())})")
            prepared[name] = {"type": "?", "options": SinkConfig()}
            continue
        try:
            factory = registry.load(type_name)
        except SinkTypeError as exc:
            errors.append(f"{where}.type: {exc}")
            prepared[name] = {"type": type_name, "options": SinkConfig()}
            continue
        own = {key: value for key, value in section.items() if key not in COMMON_SINK_KEYS}
        common = {key: value for key, value in section.items() if key in COMMON_SINK_KEYS}
        # A sink whose own options are invalid stays defined, so its common keys are still checked
        # and the streams naming it do not report it as missing.
        options, problems = validate_all(factory.Config, own, where, COMMON_SINK_KEYS)
        errors.extend(problems)
        prepared[name] = {**common, "options": options or SinkConfig()}
    return prepared, errors


def parse_config(tree: Any, environ: Mapping[str, str] | None = None) -> Config:
    """Validate a parsed YAML tree; raises ConfigError listing every problem with its YAML path."""
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise ConfigError(["<root>: expected a mapping of server, journal, streams and sinks"])
    expanded, env_errors = expand_env(tree, os.environ if environ is None else environ)
    sinks, errors = _validate_sinks(expanded.get("sinks"))
    if "sinks" in expanded:
        expanded["sinks"] = sinks
    errors.extend(_reference_problems(expanded))
    config: Config | None = None
    try:
        config = Config.model_validate(expanded)
    except ValidationError as exc:
        errors.extend(_pydantic_errors(exc, model=Config))
    except ConfigError as exc:
        errors.extend(exc.errors)
    errors = list(dict.fromkeys(errors))
    # An unset variable is the problem to report at its path, not the empty value it left behind.
    unset = {problem.split(": ", 1)[0] for problem in env_errors}
    errors = env_errors + [problem for problem in errors if problem.split(": ", 1)[0] not in unset]
    if errors or config is None:
        raise ConfigError(errors)
    return config


MAX_CONFIG_VALUES = 100_000
"""Most values a configuration may hold once its aliases are expanded: a few lines of nested aliases (a
"billion laughs") would otherwise cost minutes to hours of CPU, and gigabytes, in the checks that walk it."""


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """How many values `node` holds with its aliases expanded (each shared node measured once)."""
    known = sizes.get(id(node))
    if known is not None:
        return known
    size = 1
    if isinstance(node, yaml.MappingNode):
        size += sum(_expanded_size(key, sizes) + _expanded_size(value, sizes) for key, value in node.value)
    elif isinstance(node, yaml.SequenceNode):
        size += sum(_expanded_size(item, sizes) for item in node.value)
    sizes[id(node)] = size
    return size


MAX_CONFIG_BYTES = 1024 * 1024
"""Largest configuration file read: a real one is a few kilobytes, and checking a YAML file takes about a second
per megabyte (a `/dev/zero` given by mistake would never end)."""


def read_config_text(path: str | os.PathLike[str]) -> str:
    """The text of a configuration file; ConfigError when it cannot be read, is too large or is not UTF-8."""
    try:
        with Path(path).open("rb") as file:
            data = file.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read the file ({exc.strerror or type(exc).__name__})"]) from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError([f"{path}: larger than {MAX_CONFIG_BYTES // 1024} KiB, which no configuration needs"])
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:  # its text would quote the bytes around the fault, which may be a secret
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError([f"{path}: not UTF-8 text (line {line}, byte {exc.start + 1}); save it as UTF-8"]) from None


def load_config(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate a YAML configuration file."""
    text = read_config_text(path)
    try:
        document = yaml.compose(text, Loader=yaml.SafeLoader) or yaml.MappingNode("", [])
        if _expanded_size(document, {}) > MAX_CONFIG_VALUES:
            raise ConfigError([f"{path}: its aliases expand to more than {MAX_CONFIG_VALUES} values"])
        duplicates = _duplicate_keys(document)
        tree = yaml.safe_load(text)
    except RecursionError:
        raise ConfigError([f"{path}: an alias refers to itself (or the document nests too deeply)"]) from None
    except (ValueError, TypeError, OverflowError, AttributeError):  # an explicit tag that does not convert
        # (`!!int abc`; `!!timestamp abc` is an AttributeError in PyYAML): its message quotes the value, maybe a secret
        raise ConfigError([f"{path}: a value with an explicit YAML tag (such as !!int) does not convert"]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError([f"{path}: {problem}{where}"]) from None
    try:
        config = parse_config(tree, environ)
    except ConfigError as exc:
        raise ConfigError(duplicates + exc.errors) from None
    if duplicates:
        raise ConfigError(duplicates)
    return config


SECRET_ENVIRONMENT = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "DD_API_KEY", "WORKOS_API_KEY")
"""Variables libraries read credentials from by themselves; their values are masked in logs like the config's."""


def secret_values(config: Config, environ: Mapping[str, str] | None = None) -> list[str]:
    """Every secret the configuration holds (stream secrets, sinks' `SecretStr` options), and the credentials
    in the environment that libraries read themselves: what the logs must never show."""
    found: list[str] = []

    def walk(value: object) -> None:
        if isinstance(value, SecretStr):
            found.append(value.get_secret_value())
        elif isinstance(value, BaseModel):
            if isinstance(value, SinkConfig):
                found.extend(value.secrets())
            for name in type(value).model_fields:
                walk(getattr(value, name))
        elif isinstance(value, tuple | list):
            for item in value:
                walk(item)
        elif isinstance(value, dict):
            for key, item in value.items():
                if isinstance(item, SecretStr):  # a header's value: `Authorization: Bearer x` holds x alone too
                    found.extend(header_secrets(str(key), item.get_secret_value()))
                else:
                    walk(item)

    walk(config)
    password = urlsplit(config.journal.dedup_store.url_text()).password or ""
    found += [password, unquote(password)]  # the URL's password alone too, as written and as Redis is given it
    for stream in config.streams:
        for value in stream.auth.values if stream.auth else ():
            found.append(value)
            found.append(value.split(" ", 1)[-1])  # `Bearer x`: x alone too
    env = os.environ if environ is None else environ
    found.extend(env[name] for name in SECRET_ENVIRONMENT if env.get(name))
    return found


def listen_url(host: str, port: int, *, tls: bool) -> str:
    """`scheme://host:port`, with an IPv6 host in brackets."""
    scheme = "https" if tls else "http"
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def load_journal_config(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> JournalConfig:
    """Only the `journal` section of a configuration file (for commands that read the journal alone, so
    variables the other sections use, such as sinks' credentials, need not be set)."""
    try:
        tree = yaml.safe_load(read_config_text(path))
    except (yaml.YAMLError, ValueError, TypeError, OverflowError, AttributeError):
        load_config(path, environ)  # raises the same clear error the full load gives
        raise
    section = tree.get("journal", {}) if isinstance(tree, dict) else {}
    expanded, errors = expand_env(section, os.environ if environ is None else environ, "journal")
    journal, problems = validate_all(JournalConfig, expanded or {}, "journal")
    if errors or problems or journal is None:
        raise ConfigError(errors + problems)
    return journal


DEFAULT_DATA_DIR = Path("./log-bridge-data")


def default_config() -> Config:
    """The safe local default used when no configuration is given: loopback only, file sink, no secret."""
    return parse_config(
        {
            "server": {"host": "127.0.0.1", "port": 8080, "allowlist": ["127.0.0.1/32", "::1/128"]},
            "journal": {"path": str(DEFAULT_DATA_DIR / "journal.db")},
            "streams": [{"name": "workos", "path": "/workos", "sinks": ["archive"]}],
            "sinks": {"archive": {"type": "file", "path": str(DEFAULT_DATA_DIR / "events" / "%Y-%m-%d.ndjson")}},
        },
        environ={},
    )
