"""Configuration: the documented example, ${VAR} expansion, units, and errors that name their YAML path."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
import yaml
from cryptography.hazmat.primitives import serialization

from receiver.config import WORKOS_EGRESS, default_config, expand_env, load_config, parse_config, secret_values
from receiver.errors import ConfigError
from receiver.logs import MASK, Scrubber
from receiver.samples import encode_body, sample_wrappers
from sinks.base import parse_duration, parse_size
from tests.conftest import TOKEN, StartService

ROOT = Path(__file__).resolve().parents[2]

GOOD_FILE = """\
server: {host: 127.0.0.1, port: 8080, allowlist: [127.0.0.1/32]}
streams: [{name: w, path: /w, auth: {values: [stream-secret-42]}, sinks: [archive]}]
sinks: {archive: {type: file, path: ./out.ndjson}}
"""


def validate(path: Path, *options: str, **environ: str) -> subprocess.CompletedProcess[str]:
    """`log-bridge validate --config path` of this checkout, in a process of its own."""
    return subprocess.run(
        [sys.executable, "-m", "receiver.cli", "validate", *options, "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=path.parent,
        env={**os.environ, "PYTHONPATH": str(ROOT), **environ},
    )


def refused(path: Path, **environ: str) -> list[str]:
    """The problems `log-bridge validate` lists for `path`, checking that it exits 1 without a traceback."""
    result = validate(path, **environ)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("log-bridge: configuration is invalid"), result.stderr
    return [line.strip() for line in result.stderr.splitlines()[1:]]


ISSUE_EXAMPLE = """
server:
  host: 127.0.0.1            # default 0.0.0.0
  port: 8080                 # default 8443
  max_body_bytes: 10485760   # cap on the compressed AND the decompressed body -> 413
  trusted_proxies: [127.0.0.3/32]        # X-Forwarded-For is believed only from these peers
  allowlist: [workos, 127.0.0.1/32]      # "workos" = WorkOS's published egress addresses; default [workos]
journal:
  path: ./data/journal.db
  max_bytes: 1073741824      # backlog cap -> 503 + Retry-After
  dedup_window: 24h
streams:
  - name: workos
    path: /workos
    auth:
      header: Authorization  # default
      values: ["Bearer ${LOG_BRIDGE_TOKEN}"]   # one or more accepted values, for rotation
    sinks: [archive]
sinks:
  archive:
    type: file
    path: ./data/events/%Y-%m-%d.ndjson
    # include_actions: ["user.*"]   exclude_actions: []     (glob filters, optional, on every sink)
    # batch: {max_events: 1000, max_bytes: 1048576, max_wait: 1s}
    # retry: {initial: 1s, max: 60s, max_attempts: null}    (null = retry for ever)
"""


def errors_of(tree: Any, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(tree, environ or {})
    return caught.value.errors


def minimal(**changes: Any) -> dict[str, Any]:
    tree: dict[str, Any] = {
        "streams": [{"name": "workos", "path": "/workos", "auth": {"values": ["s"]}, "sinks": ["archive"]}],
        "sinks": {"archive": {"type": "file", "path": "/tmp/x.ndjson"}},
    }
    tree.update(changes)
    return tree


class TestExamples:
    def test_the_documented_example_works_as_written(self, tmp_path: Path) -> None:
        path = tmp_path / "config.yaml"
        path.write_text(ISSUE_EXAMPLE)
        config = load_config(path, {"LOG_BRIDGE_TOKEN": "abc"})
        assert config.server.port == 8080 and config.server.max_body_bytes == 10485760
        assert config.streams[0].auth is not None and config.streams[0].auth.values == ("Bearer abc",)
        assert config.journal.dedup_window == 86400.0
        networks = {str(n) for n in config.server.allowed_networks()}
        assert {f"{a}/32" for a in WORKOS_EGRESS} | {"127.0.0.1/32"} == networks

    @pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "examples").glob("*.yaml")))
    def test_shipped_examples_validate(self, name: str) -> None:
        environ = {
            "LOG_BRIDGE_TOKEN": "t",
            "SPLUNK_HEC_TOKEN": "t",
            "DD_API_KEY": "k",
            "AWS_ACCESS_KEY_ID": "a",
            "AWS_SECRET_ACCESS_KEY": "s",
            "FORWARD_TOKEN": "f",
        }
        load_config(ROOT / "examples" / name, environ)

    def test_defaults(self) -> None:
        config = parse_config(minimal(), {})
        assert (config.server.host, config.server.port) == ("0.0.0.0", 8443)
        assert config.server.allowlist == ("workos",)
        assert config.sinks["archive"].batch.max_events == 1000
        assert config.sinks["archive"].retry.max_attempts is None

    def test_local_default_is_loopback_only_without_secret(self) -> None:
        config = default_config()
        assert config.server.host == "127.0.0.1" and config.server.port == 8080
        assert all(n.is_loopback for n in config.server.allowed_networks())
        assert config.streams[0].auth is None
        assert "log-bridge-data" in str(config.journal.path)


class TestExpansion:
    def test_variables_and_defaults(self) -> None:
        tree, errors = expand_env(
            {"a": "${X}", "b": ["x-${Y:-dflt}-y"], "c": "$${X}", "d": 5, "e": "${E:-}"}, {"X": "1"}
        )
        assert errors == [] and tree == {"a": "1", "b": ["x-dflt-y"], "c": "${X}", "d": 5, "e": ""}

    def test_unset_variable_is_an_error_naming_the_path(self) -> None:
        problems = errors_of(
            minimal(streams=[{"name": "w", "path": "/w", "auth": {"values": ["Bearer ${NOPE}"]}, "sinks": ["archive"]}])
        )
        assert problems == ["streams[0].auth.values[0]: environment variable NOPE is not set"]

    def test_a_value_cannot_inject_yaml(self, tmp_path: Path) -> None:
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump(minimal(sinks={"archive": {"type": "file", "path": "${EVIL}"}})))
        evil = "x\"]\nserver: {allowlist: ['0.0.0.0/0']}\n#"
        config = load_config(path, {"EVIL": evil})
        assert config.sinks["archive"].options.path == evil  # type: ignore[attr-defined]
        assert config.server.allowlist == ("workos",)

    @pytest.mark.parametrize("value", ["$HEC_TOKEN", "${HEC_TOKEN", "Splunk ${1TOKEN}", "${HEC_TOKEN:?unset}", "$"])
    def test_a_dollar_that_starts_no_reference_is_an_error(self, tmp_path: Path, value: str) -> None:
        """`token: $HEC_TOKEN` or a reference missing its brace was kept as it is: the text itself was sent to
        Splunk as the token, and the stream answered 401."""
        tree = yaml.safe_load(GOOD_FILE)
        tree["sinks"]["hec"] = {"type": "splunk_hec", "url": "https://hec.example.com:8088", "token": value}
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(tree))
        assert refused(path, HEC_TOKEN=SECRET) == [
            "sinks.hec.token: a `$` that starts no ${VAR} reference (write $$ for a `$`)"
        ]

    def test_a_doubled_dollar_is_one(self) -> None:
        assert expand_env({"a": "pa$$word", "b": "${X:-a$b}"}, {}) == ({"a": "pa$word", "b": "a$b"}, [])


class TestUnits:
    @pytest.mark.parametrize(
        ("text", "seconds"),
        [("500ms", 0.5), ("1s", 1), ("24h", 86400), (30, 30), ("2m", 120), ("1.5s", 1.5), ("7d", 604800)],
    )
    def test_durations(self, text: object, seconds: float) -> None:
        assert parse_duration(text) == seconds

    @pytest.mark.parametrize(
        ("text", "size"),
        [
            ("10MiB", 10 * 1024**2),
            (1048576, 1048576),
            ("1GiB", 1024**3),
            ("512KiB", 524288),
            ("1MB", 1000**2),
            ("2k", 2000),
            ("1.5GiB", 3 * 2**29),
            ("1024TiB", 2**50),
            ("1PiB", 2**50),
            ("1PB", 1000**5),
        ],
    )
    def test_sizes(self, text: object, size: int) -> None:
        assert parse_size(text) == size

    def test_a_duration_or_size_past_what_clocks_and_disks_hold_is_refused(self, tmp_path: Path) -> None:
        """`timeout: 999999999d` was taken: the S3 sink then failed every send with `timestamp out of range for
        platform time_t`; sizes of any number of digits were taken too."""
        tree = yaml.safe_load(GOOD_FILE)
        tree["sinks"]["s3"] = {"type": "s3", "bucket": "b", "timeout": "999999999d"}
        tree["journal"] = {"max_bytes": "99999999999999999999999TiB", "dedup_window": "3650d"}
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(tree))
        assert sorted(refused(path)) == [
            "journal.max_bytes: a size cannot be more than 1PiB",
            "sinks.s3.timeout: a duration cannot be more than 3650d (ten years)",
        ]

    def test_a_size_past_the_limit_written_in_pib_is_refused_for_its_size(self) -> None:
        """Was a defect: the limit is 1PiB and its error says so, yet `1PiB` itself was refused as no size at all
        (`expected a size such as ...`), and so was `2PiB`."""
        problems = errors_of(minimal(journal={"max_bytes": "2PiB"}))
        assert problems == ["journal.max_bytes: a size cannot be more than 1PiB"]

    @pytest.mark.parametrize("bad", ["fast", "-1s", True, "1 week"])
    def test_bad_duration_names_the_path(self, bad: object) -> None:
        problems = errors_of(minimal(journal={"dedup_window": bad}))
        assert len(problems) == 1 and problems[0].startswith("journal.dedup_window: ")


class TestErrors:
    def test_unknown_keys_name_their_path(self) -> None:
        tree = minimal(server={"prot": 1})
        tree["sinks"]["archive"]["colour"] = "blue"
        assert sorted(errors_of(tree)) == [
            "server.prot: unknown key (did you mean port?)",
            "sinks.archive.colour: unknown key",
        ]

    @pytest.mark.parametrize(
        ("where", "section", "problem"),
        [
            ("", {"sink": {}}, "sink: unknown key (did you mean sinks?)"),
            ("server", {"tls": {"cert_file": "c", "key_file": "k", "client_ca": "ca"}},
             "server.tls.client_ca: unknown key (did you mean client_ca_file?)"),
            ("journal", {"dedup_store": {"typ": "redis"}}, "journal.dedup_store.typ: unknown key (did you mean type?)"),
            ("streams", {"sink": ["archive"]}, "streams[0].sink: unknown key (did you mean sinks?)"),
            ("archive", {"include_action": ["user.*"]},
             "sinks.archive.include_action: unknown key (did you mean include_actions?)"),
            ("archive", {"batch": {"max_event": 10}},
             "sinks.archive.batch.max_event: unknown key (did you mean max_events?)"),
            ("archive", {"max_file_byte": "10MiB"},
             "sinks.archive.max_file_byte: unknown key (did you mean max_file_bytes?)"),
        ],
    )  # fmt: skip
    def test_an_unknown_key_names_the_key_it_is_closest_to(
        self, tmp_path: Path, where: str, section: dict[str, Any], problem: str
    ) -> None:
        """`server.prot: unknown key` left the reader to find the key meant among those of the section."""
        tree = yaml.safe_load(GOOD_FILE)
        tree["journal"] = {}
        parents = {"": tree, "streams": tree["streams"][0], "archive": tree["sinks"]["archive"]}
        parents.get(where, tree.get(where)).update(section)
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(tree))
        assert refused(path) == [problem]

    def test_every_error_is_reported_at_once(self) -> None:
        tree = minimal(server={"port": 70000, "allowlist": ["not-an-ip"]}, journal={"max_bytes": "lots"})
        tree["sinks"]["archive"]["batch"] = {"max_events": 0}
        problems = errors_of(tree)
        assert {p.split(":")[0] for p in problems} == {
            "server.port",
            "server.allowlist[0]",
            "journal.max_bytes",
            "sinks.archive.batch.max_events",
        }

    @pytest.mark.parametrize("value", [0, "lots"])
    def test_the_dead_letter_cap_is_a_positive_size(self, value: object) -> None:
        (problem,) = errors_of(minimal(journal={"max_dead_letter_bytes": value}))
        assert problem.startswith("journal.max_dead_letter_bytes: ")
        assert (
            parse_config(minimal(journal={"max_dead_letter_bytes": "64MiB"}), {}).journal.max_dead_letter_bytes
            == 64 * 2**20
        )

    def test_stream_naming_an_undefined_sink(self) -> None:
        tree = minimal()
        tree["streams"][0]["sinks"] = ["archive", "splunk"]
        assert errors_of(tree) == ["streams[0].sinks[1]: sink 'splunk' is not defined under sinks (defined: archive)"]

    def test_sink_without_its_required_option(self) -> None:
        assert errors_of(minimal(sinks={"archive": {"type": "file"}})) == ["sinks.archive.path: field required"]

    @pytest.mark.parametrize(
        ("options", "problem"),
        [
            ({"max_age": 90}, "sinks.archive.max_age: must be at least 1h (a bare number is seconds: write 90d"),
            ({"max_age": "90x"}, "sinks.archive.max_age: expected a duration such as 500ms"),
            ({"max_age": "0s"}, "sinks.archive.max_age: must be more than 0 (0 would turn this protection off)"),
            ({"max_total_bytes": 0}, "sinks.archive.max_total_bytes: Input should be greater than 0"),
            ({"max_total_bytes": "lots"}, "sinks.archive.max_total_bytes: expected a size such as"),
            ({"max_total_bytes": 40}, "sinks.archive.max_total_bytes: must be at least 1MiB (a bare number is bytes"),
            ({"max_age": "90d", "path": "/data/%s.ndjson"}, "sinks.archive: path holds %s, which retention cannot"),
            ({"max_age": "90d", "path": "/data/%-d.ndjson"}, "sinks.archive: path holds %-d, which retention"),
            ({"max_age": "90d", "path": "/data/%Ey.ndjson"}, "sinks.archive: path holds %Ey, which retention"),
            ({"max_total_bytes": "1GiB", "path": "/data/%Y/../x.ndjson"}, "sinks.archive: path holds '..' after"),
        ],
    )  # fmt: skip
    def test_a_bad_retention_option_names_its_yaml_path(self, options: dict[str, Any], problem: str) -> None:
        (found,) = errors_of(minimal(sinks={"archive": {"type": "file", "path": "/data/%Y-%m-%d.ndjson", **options}}))
        assert found.startswith(problem), found

    def test_retention_is_off_unless_set_and_takes_units(self) -> None:
        sinks = parse_config(minimal(), {}).sinks
        assert (sinks["archive"].options.max_age, sinks["archive"].options.max_total_bytes) == (None, None)
        archive = {"type": "file", "path": "/data/%s.ndjson"}  # a field retention cannot read: fine without it
        retained = {"max_age": "90d", "max_total_bytes": "20GiB", "path": "/data/%Y/%m/%d/events.ndjson"}
        sinks = parse_config(minimal(sinks={"archive": archive, "kept": {"type": "file", **retained}}), {}).sinks
        assert (sinks["kept"].options.max_age, sinks["kept"].options.max_total_bytes) == (90 * 86400, 20 * 2**30)

    def test_retention_that_would_delete_another_file_sinks_files_is_refused(self) -> None:
        def tree(**sinks: dict[str, Any]) -> dict[str, Any]:
            stream = {"name": "workos", "path": "/workos", "auth": {"values": ["s"]}, "sinks": [*sinks]}
            return minimal(streams=[stream], sinks=sinks)

        daily = {"type": "file", "path": "/data/%Y-%m-%d.ndjson", "max_age": "90d"}
        hourly = {"type": "file", "path": "/data/%Y-%m-%d.%H.ndjson"}  # 2024-01-15.13.ndjson: a daily's rotation?
        (found,) = errors_of(tree(archive=daily, hourly=hourly))
        assert found.startswith(
            "sinks.archive: retention would delete files of sink 'hourly': /data/2024-01-01.10.ndjson, of its path"
        ), found
        apart = {"type": "file", "path": "/data/%Y-%m-%d-%H.ndjson"}  # no name of the daily's
        same = {"type": "file", "path": "/data/./%Y-%m-%d.ndjson"}  # the very files: shared, not mistaken
        parse_config(tree(archive=daily, apart=apart, same=same, hourly=hourly | {"path": "/other/%H.ndjson"}), {})

    def test_unknown_sink_type_lists_the_known_ones(self) -> None:
        (problem,) = errors_of(minimal(sinks={"archive": {"type": "kafka"}}))
        assert problem.startswith("sinks.archive.type: unknown sink type 'kafka'") and "splunk_hec" in problem

    def test_several_streams_need_distinct_paths(self) -> None:
        stream = {"name": "a", "path": "/same", "sinks": ["archive"]}
        problems = errors_of(minimal(streams=[stream, {**stream, "name": "b"}]))
        assert problems == ["streams[1].path: '/same' is already used by 'a'"]

    @pytest.mark.parametrize(
        ("path", "why"),
        [
            ("/a/../workos", "'.' or '..' segments"),
            ("/./workos", "'.' or '..' segments"),
            ("/workos/..", "'.' or '..' segments"),
            ("/a//workos", "an empty segment"),
            ("//workos", "an empty segment"),
        ],
    )
    def test_a_stream_path_no_sender_can_reach_is_refused(self, path: str, why: str) -> None:
        tree = minimal()
        tree["streams"][0]["path"] = path
        (problem,) = errors_of(tree)
        assert problem.startswith("streams[0].path: ") and why in problem

    @pytest.mark.parametrize("path", ["/", "/workos/", "/audit/v1.2/workos", "/a.b/c..d"])
    def test_stream_paths_senders_keep_as_they_are_are_taken(self, path: str) -> None:
        tree = minimal()
        tree["streams"][0]["path"] = path
        assert parse_config(tree, {}).streams[0].path == path

    def test_an_empty_list_that_needs_entries_says_so_in_words(self) -> None:
        """pydantic's own message named a Python type: "Tuple should have at least 1 item after validation"."""
        tree = minimal()
        tree["streams"] = []
        assert errors_of(tree) == ["streams: needs at least 1 entry, not 0"]
        tree = minimal()
        tree["streams"][0]["sinks"] = []
        assert errors_of(tree) == ["streams[0].sinks: needs at least 1 entry, not 0"]

    def test_a_bad_stream_is_not_also_reported_as_no_stream(self) -> None:
        tree = minimal()
        tree["streams"][0]["name"] = "bad name"
        assert errors_of(tree) == ["streams[0].name: String should match pattern '^[A-Za-z0-9_.-]+$'"]

    def test_errors_do_not_repeat_secret_values(self) -> None:
        tree = minimal()
        tree["sinks"]["archive"]["path"] = {"secret": "hunter2-token"}
        problems = errors_of(tree)
        assert problems and not any("hunter2" in p for p in problems)

    def test_bad_yaml_says_where(self, tmp_path: Path) -> None:
        path = tmp_path / "bad.yaml"
        path.write_text("server:\n  port: [1,\n")
        with pytest.raises(ConfigError) as caught:
            load_config(path)
        assert "line" in caught.value.errors[0]

    def test_missing_file(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match="cannot read"):
            load_config(tmp_path / "nope.yaml")


class TestSecretValues:
    def test_a_percent_encoded_redis_password_is_masked_as_redis_is_given_it(self) -> None:
        # Was a defect: only the URL's password as written (`p%40ss%2Fw0rd-9876`) was registered; redis-py decodes
        # it, so a line quoting the password it was given (`p@ss/w0rd-9876`) kept it.
        tree = minimal()
        tree["journal"] = {
            "path": "j.db",
            "dedup_store": {"type": "redis", "url": "redis://u:p%40ss%2Fw0rd-9876@r:6379/0"},
        }
        scrubber = Scrubber()
        scrubber.register(secret_values(parse_config(tree, {}), {}))
        line = scrubber("AUTH u p@ss/w0rd-9876 refused; url had p%40ss%2Fw0rd-9876")
        assert "w0rd-9876" not in line and line.count(MASK) == 2

    def test_a_sink_credential_is_masked_in_logs_without_its_scheme_too(self) -> None:
        # Was a defect: a sink's `Authorization: Bearer <token>` was registered whole only, so a log line quoting
        # the token alone (an endpoint's answer, a library's debug line) kept it.
        token = "fwd-secret-0123456789"
        tree = minimal()
        tree["sinks"]["fwd"] = {
            "type": "http",
            "url": "https://collector.example.com/ingest",
            "headers": {"Authorization": f"Bearer {token}", "proxy-authorization": "Basic dXNlcjpwYXNzd29yZA=="},
        }
        tree["streams"][0]["sinks"] = ["archive", "fwd"]
        scrubber = Scrubber()
        scrubber.register(secret_values(parse_config(tree, {}), {}))
        line = scrubber(f"the endpoint answered 401: revoked {token}; proxy said dXNlcjpwYXNzd29yZA== is unknown")
        assert token not in line and "dXNlcjpwYXNzd29yZA" not in line
        assert line.count(MASK) == 2


class TestTheFileItself:
    """What `validate` says of a file that is not a readable UTF-8 YAML mapping of a sensible size."""

    def test_a_file_that_is_not_utf8_is_named_with_its_line(self, tmp_path: Path) -> None:
        path = tmp_path / "config.yaml"
        data = GOOD_FILE.replace("stream-secret-42", "stream-secr\xe9t").encode("latin-1")
        path.write_bytes(data)
        problems = refused(path)
        assert problems == [f"{path}: not UTF-8 text (line 2, byte {data.index(0xE9) + 1}); save it as UTF-8"]
        assert "secr" not in "".join(problems)

    def test_a_file_too_large_to_be_a_configuration_is_refused_unread(self, tmp_path: Path) -> None:
        path = tmp_path / "config.yaml"
        path.write_text(GOOD_FILE + ("# " + "x" * 98 + "\n") * 11_000)
        assert refused(path) == [f"{path}: larger than 1024 KiB, which no configuration needs"]

    def test_a_directory_is_named(self, tmp_path: Path) -> None:
        assert refused(tmp_path) == [f"{tmp_path}: cannot read the file (Is a directory)"]

    @pytest.mark.parametrize("text", ["", "# nothing but a comment\n", "- a list\n", "just text\n"])
    def test_a_file_that_is_no_mapping_says_what_is_expected(self, tmp_path: Path, text: str) -> None:
        path = tmp_path / "config.yaml"
        path.write_text(text)
        problems = refused(path)
        assert problems in (
            ["streams: field required", "sinks: field required"],
            ["<root>: expected a mapping of server, journal, streams and sinks"],
        )

    def test_the_journal_commands_say_the_same(self, tmp_path: Path) -> None:
        path = tmp_path / "config.yaml"
        path.write_bytes(GOOD_FILE.encode() + b"# caf\xe9\n")
        result = subprocess.run(
            [sys.executable, "-m", "receiver.cli", "dlq", "list", "--config", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert f"{path}: not UTF-8 text (line 4," in result.stderr


class TestValidateLoadsTheTlsFiles:
    """`validate` loads the listener's certificate, key and client CA as a start does, with the same errors."""

    @staticmethod
    def config(tmp_path: Path, **tls: str) -> Path:
        path = tmp_path / "config.yaml"
        tree = yaml.safe_load(GOOD_FILE)
        tree["server"]["tls"] = tls
        path.write_text(yaml.safe_dump(tree))
        return path

    @staticmethod
    def pair(tmp_path: Path, name: str, **validity: datetime) -> tuple[str, str]:
        issued = trustme.CA().issue_cert("127.0.0.1", **validity)  # type: ignore[arg-type]
        cert, key = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
        issued.cert_chain_pems[0].write_to_path(str(cert))
        issued.private_key_pem.write_to_path(str(key))
        return str(cert), str(key)

    def test_a_pair_that_loads_is_said_to_with_its_validity(self, tmp_path: Path) -> None:
        cert, key = self.pair(tmp_path, "tls", not_after=datetime(2040, 1, 2, 3, 4, 5, tzinfo=UTC))
        ca = tmp_path / "clients.pem"
        trustme.CA().cert_pem.write_to_path(str(ca))
        result = validate(self.config(tmp_path, cert_file=cert, key_file=key, client_ca_file=str(ca)))
        assert result.returncode == 0, result.stderr
        assert (
            f"  tls: certificate {cert} and key {key} load, valid until 2040-01-02 03:04:05 UTC; client CA {ca} loads\n"
        ) in result.stdout

    def test_an_expired_or_future_certificate_is_refused(self, tmp_path: Path) -> None:
        cert, key = self.pair(
            tmp_path,
            "old",
            not_before=datetime(2020, 1, 1, tzinfo=UTC),
            not_after=datetime(2021, 6, 1, tzinfo=UTC),
        )
        assert refused(self.config(tmp_path, cert_file=cert, key_file=key)) == [
            f"server.tls.cert_file: the certificate in {cert} expired on 2021-06-01 00:00:00 UTC"
        ]
        cert, key = self.pair(tmp_path, "new", not_before=datetime(2099, 1, 1, tzinfo=UTC))
        assert refused(self.config(tmp_path, cert_file=cert, key_file=key)) == [
            f"server.tls.cert_file: the certificate in {cert} is not valid before 2099-01-01 00:00:00 UTC"
        ]

    def test_a_key_of_another_certificate_is_refused(self, tmp_path: Path) -> None:
        cert, _ = self.pair(tmp_path, "one")
        _, key = self.pair(tmp_path, "two")
        (problem,) = refused(self.config(tmp_path, cert_file=cert, key_file=key))
        assert problem.startswith(f"server.tls: cannot load the certificate {cert} with key {key}: "), problem

    def test_an_encrypted_key_is_refused_without_asking_for_a_passphrase(self, tmp_path: Path) -> None:
        cert, key = self.pair(tmp_path, "tls")
        private = serialization.load_pem_private_key(Path(key).read_bytes(), password=None)
        Path(key).write_bytes(
            private.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"passphrase"),
            )
        )
        assert refused(self.config(tmp_path, cert_file=cert, key_file=key)) == [
            f"server.tls: the key {key} is encrypted; give log-bridge an unencrypted key"
        ]

    def test_files_that_cannot_be_read_are_named(self, tmp_path: Path) -> None:
        cert, key = self.pair(tmp_path, "tls")
        missing = str(tmp_path / "missing.crt")
        assert refused(self.config(tmp_path, cert_file=missing, key_file=key)) == [
            f"server.tls: cannot load the certificate {missing} with key {key}: No such file or directory"
        ]
        skipped = validate(self.config(tmp_path, cert_file=missing, key_file=key), "--skip-tls-files")
        assert skipped.returncode == 0 and "  tls: files not loaded (--skip-tls-files)\n" in skipped.stdout
        not_a_ca = tmp_path / "ca.pem"
        not_a_ca.write_text("not a certificate\n")
        (problem,) = refused(self.config(tmp_path, cert_file=cert, key_file=key, client_ca_file=str(not_a_ca)))
        assert problem.startswith(f"server.tls.client_ca_file: cannot load {not_a_ca}: "), problem

    def test_the_sinks_tls_files_are_loaded_as_building_them_does(self, tmp_path: Path) -> None:
        """validate said OK for a sink's `tls.ca_file` that does not exist, or a client certificate with the key
        of another; a start then refused it (`cannot start: sinks.hec.tls.ca_file: cannot load ...`)."""
        ca = tmp_path / "ca.pem"
        trustme.CA().cert_pem.write_to_path(str(ca))
        cert, _ = self.pair(tmp_path, "one")
        _, key = self.pair(tmp_path, "two")
        tree = yaml.safe_load(GOOD_FILE)
        hec = {"type": "splunk_hec", "url": "https://hec.example.com:8088", "token": "hec-token"}
        tree["sinks"]["hec"] = {**hec, "tls": {"ca_file": str(ca)}}
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(tree))
        result = validate(path)
        assert result.returncode == 0 and "  sink hec: type splunk_hec (no stream feeds it) (its TLS files load)\n" in (
            result.stdout
        ), result.stdout + result.stderr
        tree["sinks"]["hec"]["tls"]["ca_file"] = str(tmp_path / "missing.pem")
        tree["sinks"]["syslog"] = {
            "type": "syslog",
            "host": "siem.example.com",
            "tls": {"cert_file": cert, "key_file": key},
        }
        path.write_text(yaml.safe_dump(tree))
        problems = refused(path)
        assert [p.split(": ", 1)[0] for p in problems] == ["sinks.hec.tls.ca_file", "sinks.syslog.tls.cert_file"]
        assert (
            problems[0]
            == f"sinks.hec.tls.ca_file: cannot load '{tmp_path / 'missing.pem'}': [Errno 2] No such file or directory"
        )
        assert validate(path, "--skip-tls-files").returncode == 0

    def test_the_dedup_stores_ca_file_is_loaded_as_a_start_does(self, tmp_path: Path) -> None:
        """validate said OK for a `journal.dedup_store.ca_file` that a start refused to load."""
        tree = yaml.safe_load(GOOD_FILE)
        tree["journal"] = {"dedup_store": {"type": "redis", "url": "rediss://cache:6380/0", "ca_file": "missing.pem"}}
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(tree))
        assert refused(path) == ["journal.dedup_store.ca_file: cannot load missing.pem: No such file or directory"]
        trustme.CA().cert_pem.write_to_path(str(tmp_path / "missing.pem"))
        assert validate(path).returncode == 0

    @pytest.mark.parametrize(
        ("where", "change"),
        [
            ("server.tls.cert_file", {"server": {"tls": {"cert_file": "a\0b.crt", "key_file": "k.key"}}}),
            (
                "server.tls.client_ca_file",
                {"server": {"tls": {"cert_file": "c", "key_file": "k", "client_ca_file": "\0"}}},
            ),
            ("journal.path", {"journal": {"path": "data/\0journal.db"}}),
            (
                "journal.dedup_store.ca_file",
                {"journal": {"dedup_store": {"type": "redis", "url": "rediss://cache:6380/0", "ca_file": "ca\0.pem"}}},
            ),
            ("sinks.archive.path", {"sinks": {"archive": {"type": "file", "path": "out\0.ndjson"}}}),
            (
                "sinks.archive.tls.ca_file",
                {"sinks": {"archive": {"type": "http", "url": "https://h.example.com/in", "tls": {"ca_file": "\0"}}}},
            ),
        ],
    )
    def test_a_path_holding_a_nul_byte_is_a_configuration_error(
        self, tmp_path: Path, where: str, change: dict[str, Any]
    ) -> None:
        """A NUL byte in a file path passed `validate --skip-tls-files` and was a traceback (`ValueError: embedded
        null byte`) in `validate` and at start."""
        tree = yaml.safe_load(GOOD_FILE)
        for section, value in change.items():
            tree[section] = {**tree.get(section, {}), **value}
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(tree))
        for options in ((), ("--skip-tls-files",)):
            result = validate(path, *options)
            assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
            assert f"  {where}: holds a NUL byte, which no file path can" in result.stderr.splitlines(), result.stderr


class TestSinkNames:
    @staticmethod
    def named(tmp_path: Path, name: str) -> Path:
        path = tmp_path / "config.yaml"
        tree = yaml.safe_load(GOOD_FILE)
        tree["sinks"] = {name: tree["sinks"]["archive"]}
        tree["streams"][0]["sinks"] = [name]
        path.write_text(yaml.safe_dump(tree))
        return path

    def test_intake_is_reserved(self, tmp_path: Path) -> None:
        """A sink named `intake` had its dead letters counted with the intake's, in the one `stage` label."""
        assert refused(self.named(tmp_path, "intake")) == [
            "sinks.intake: the name 'intake' is reserved (the intake's dead letters are counted under it)"
        ]

    @pytest.mark.parametrize("name", ["", "(intake)", "two words", "line\nbreak", "caf\u00e9"])
    def test_a_name_is_what_a_stream_name_may_be(self, tmp_path: Path, name: str) -> None:
        """An empty name, `(intake)` (what `dlq` calls the intake's dead letters) or one with spaces or line
        breaks was taken, for a metric label, a log field and a `--sink` argument."""
        assert refused(self.named(tmp_path, name)) == [
            f"sinks: {name!r} is not a sink name (letters, digits and _ . - only)"
        ]

    @pytest.mark.parametrize("name", ["archive", "splunk-prod", "s3_eu.west-1", "intake2"])
    def test_usual_names_are_taken(self, tmp_path: Path, name: str) -> None:
        assert validate(self.named(tmp_path, name)).returncode == 0


SECRET = "hunter2-Secret-4242"
"""A made-up credential, to look for in what `validate` prints."""


class TestSecretsWithStrayCharacters:
    async def test_a_stream_secret_read_with_its_trailing_newline_still_matches(
        self, start_service: StartService, client: aiohttp.ClientSession
    ) -> None:
        """A secret file's trailing newline (`--from-file`, `echo`) stayed in the accepted value, which no request
        can carry (HTTP strips the whitespace around a header's value): every WorkOS request was answered 401."""
        stream = {"name": "workos", "path": "/workos", "auth": {"values": ["${STREAM_TOKEN}"]}, "sinks": ["mem"]}
        service = await start_service({"streams": [stream]}, {"STREAM_TOKEN": f"Bearer {SECRET}\n"})
        body, content_type = encode_body(sample_wrappers(1), "json")
        headers = {"Authorization": f"Bearer {SECRET}", "Content-Type": content_type}
        async with client.post(service.url + "/workos", data=body, headers=headers) as response:
            assert response.status == 200

    @pytest.mark.parametrize("stray", ["\n", "\r", "\x00", "\t", "\x7f"])
    @pytest.mark.parametrize(
        ("where", "sink"),
        [
            ("streams[0].auth.values[0]", None),
            ("sinks.hec.token", {"type": "splunk_hec", "url": "https://hec.example.com:8088", "token": "VALUE"}),
            ("sinks.dd.api_key", {"type": "datadog", "api_key": "VALUE"}),
            (
                "sinks.s3.secret_access_key",
                {"type": "s3", "bucket": "b", "access_key_id": "AKIAEXAMPLEEXAMPLE12", "secret_access_key": "VALUE"},
            ),
            ("sinks.http.headers", {"type": "http", "url": "https://h.example.com/in", "headers": {"X-Key": "VALUE"}}),
        ],
    )
    def test_a_control_character_inside_a_secret_is_refused_without_showing_it(
        self, tmp_path: Path, stray: str, where: str, sink: dict[str, Any] | None
    ) -> None:
        """A line break, NUL or DEL inside a sink's credential was taken; each send then failed with `health check
        raised ValueError`, or botocore's error quoting the whole signed header; one in a stream's secret made
        the stream unreachable."""
        tree = yaml.safe_load(GOOD_FILE)
        value = f"{SECRET}{stray}{SECRET}"
        if sink is None:
            tree["streams"][0]["auth"]["values"] = [value]
        else:
            tree["sinks"][where.split(".")[1]] = {k: value if v == "VALUE" else v for k, v in sink.items()}
            if "headers" in sink:
                tree["sinks"]["http"]["headers"] = {"X-Key": value}
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(tree))
        result = validate(path)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        problem = result.stderr.splitlines()[1]
        assert problem.startswith(f"  {where}: ") and "control character" in problem, result.stderr
        assert SECRET not in result.stderr + result.stdout

    @pytest.mark.parametrize("key", ["token", "secret_access_key"])
    def test_a_non_ascii_credential_is_refused_without_showing_it(self, tmp_path: Path, key: str) -> None:
        tree = yaml.safe_load(GOOD_FILE)
        hec = {"type": "splunk_hec", "url": "https://hec.example.com:8088", "token": "${VALUE}"}
        s3 = {"type": "s3", "bucket": "b", "access_key_id": "AKIAEXAMPLEEXAMPLE12", "secret_access_key": "${VALUE}"}
        tree["sinks"]["extra"] = hec if key == "token" else s3
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(tree))
        result = validate(path, VALUE=f"{SECRET}\u00e9")
        assert f"sinks.extra.{key}: holds a line break, a tab, another control character or a non-ASCII one" in (
            result.stderr
        )
        assert result.returncode == 1 and SECRET not in result.stderr + result.stdout

    @pytest.mark.parametrize("header", ["", "X Secret", "X-Secret\n", "X:Secret"])
    def test_a_stream_header_that_is_no_header_name_is_refused(self, tmp_path: Path, header: str) -> None:
        """`auth.header` took any text, such as an empty one: no request could carry the secret, all got 401."""
        tree = yaml.safe_load(GOOD_FILE)
        tree["streams"][0]["auth"]["header"] = header
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(tree))
        assert refused(path) == [
            "streams[0].auth.header: not an HTTP header name (letters, digits and !#$%&'*+.^_`|~- only)"
        ]


class TestAddressEntries:
    @pytest.mark.parametrize(
        "server",
        [{"allowlist": ["::ffff:127.0.0.1"]}, {"allowlist": ["::ffff:127.0.0.0/104"]}],
    )
    async def test_an_ipv4_mapped_entry_admits_its_ipv4_peers(
        self, start_service: StartService, client: aiohttp.ClientSession, server: dict[str, Any]
    ) -> None:
        """Peers are compared as IPv4 (an IPv4-mapped peer is taken for its IPv4 address), so an IPv4-mapped entry
        matched no one: validate said OK and every request was refused 403."""
        service = await start_service({"server": server})
        body, content_type = encode_body(sample_wrappers(1), "json")
        headers = {"Authorization": TOKEN, "Content-Type": content_type}
        async with client.post(service.url + "/workos", data=body, headers=headers) as response:
            assert response.status == 200

    def test_an_ipv4_mapped_proxy_is_trusted_as_its_ipv4_address(self) -> None:
        config = parse_config(minimal(server={"trusted_proxies": ["::ffff:10.1.2.3", "::ffff:10.9.0.0/112"]}), {})
        assert [str(n) for n in config.server.proxy_networks()] == ["10.1.2.3/32", "10.9.0.0/16"]

    @pytest.mark.parametrize("key", ["allowlist", "trusted_proxies"])
    def test_an_entry_with_bits_past_its_prefix_is_refused_at_its_index(self, key: str) -> None:
        """`52.1.251.34/24` was taken as 52.1.251.0/24: 256 addresses let in where one was meant."""
        assert errors_of(minimal(server={key: ["10.0.0.0/8", "52.1.251.34/24"]})) == [
            f"server.{key}[1]: '52.1.251.34/24' has bits set past its prefix: write 52.1.251.0/24, or the address alone"
        ]

    def test_a_bad_entry_is_named_by_its_index(self) -> None:
        assert errors_of(minimal(server={"allowlist": ["workos", "10.0.0.0/8", "not-an-ip"]})) == [
            "server.allowlist[2]: 'not-an-ip' is not an IP address or CIDR network"
        ]
