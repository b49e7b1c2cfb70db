"""What a newcomer meets first: docs whose commands work on any machine, and a `make run` that installs only what
serving needs."""

from __future__ import annotations

import itertools
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Text a newcomer reads or copies from.
DOCS = sorted(
    {
        *REPO.glob("*.md"),
        *REPO.glob("docs/**/*.md"),
        *REPO.glob("helm/*/README.md"),
        *REPO.glob("helm/*/templates/NOTES.txt"),
    }
    | {*REPO.glob("examples/*")}
)
# A path that exists only on the machine it was written on: someone's home or work tree, or one made in /tmp by one
# run (a placeholder such as /tmp/log-bridge-rgw-XXXXXXXX/ describes the pattern and is fine; plain /tmp is too).
MACHINE_PATH = re.compile(r"(?<![\w.~-])(?:/work/|/root/|/home/\w|/Users/\w|/tmp/(?![^\s`'\")]*(?:XXX|<|\$|\*))[\w.-])")


def machine_paths(text: str) -> list[str]:
    """The lines of a text that hold a machine-specific path."""
    return [line.strip() for line in text.splitlines() if MACHINE_PATH.search(line)]


class TestDocs:
    def test_docs_are_found(self) -> None:
        names = {p.relative_to(REPO).as_posix() for p in DOCS}
        assert {"README.md", "docs/testing-s3.md", "docs/sinks/s3.md", "helm/log-bridge/README.md"} <= names

    @pytest.mark.parametrize("path", DOCS, ids=[p.relative_to(REPO).as_posix() for p in DOCS])
    def test_no_machine_specific_paths(self, path: Path) -> None:
        assert machine_paths(path.read_text()) == []

    @pytest.mark.parametrize(
        "line",
        [
            "cd /work/main",
            "/tmp/probe-venv/bin/python -m pytest",
            "RGW started in 0.9 s, files in /tmp/log-bridge-rgw-vyooizcy",
            "see /root/.aws/credentials",
            "/home/alice/log-bridge/.venv/bin/log-bridge",
            "(`/Users/bob/src`)",
        ],
    )
    def test_a_machine_path_is_caught(self, line: str) -> None:
        assert machine_paths(f"text before\n{line}\n") == [line]

    @pytest.mark.parametrize(
        "line",
        [
            "docker run --read-only --tmpfs /tmp ...",
            "an in-memory `/tmp` is writable",
            "in one fresh directory, `/tmp/log-bridge-rgw-XXXXXXXX/`",
            "path: /var/lib/log-bridge/journal.db",
            ".venv/bin/python -m pytest -q",
            "mountPath: /etc/log-bridge/tls",
        ],
    )
    def test_ordinary_paths_pass(self, line: str) -> None:
        assert machine_paths(line) == []


def make_commands(target: str, tmp_path: Path) -> list[list[str]]:
    """The commands `make TARGET` would run on a machine without a venv yet (make -n: nothing is run)."""
    result = subprocess.run(
        ["make", "--no-print-directory", "-n", target, f"VENV={tmp_path / 'venv'}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
        # Run from `make test` too: a make started by make would print its directory and inherit its flags.
        env={k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")},
    )
    return [shlex.split(line) for line in result.stdout.splitlines() if line.strip()]


def installed_extras(commands: list[list[str]]) -> set[str]:
    """The extras of the project that the commands pip-install."""
    extras: set[str] = set()
    for command in commands:
        if "pip" in command and "install" in command and "-e" in command:
            spec = command[command.index("-e") + 1]
            match = re.fullmatch(r"\.\[([\w,-]+)\]", spec)
            assert match, spec
            extras |= set(match[1].split(","))
    return extras


class TestMake:
    def test_run_installs_only_what_serving_needs(self, tmp_path: Path) -> None:
        commands = make_commands("run", tmp_path)
        assert installed_extras(commands) == {"all"}
        assert commands[-1][1:3] == ["serve", "--config"]

    def test_test_installs_everything(self, tmp_path: Path) -> None:
        assert installed_extras(make_commands("test", tmp_path)) == {"all", "test", "deploy-checks"}

    def test_run_after_test_installs_nothing_more(self, tmp_path: Path) -> None:
        """The full install counts for `make run` too."""
        venv = tmp_path / "venv"
        for command in make_commands("test", tmp_path):
            if command[0] == "touch":
                venv.mkdir(exist_ok=True)
                for stamp in command[1:]:
                    Path(stamp).touch()
        assert installed_extras(make_commands("run", tmp_path)) == set()


EXAMPLES = sorted(REPO.glob("examples/*.yaml"))


class TestExamples:
    @pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
    def test_its_header_names_the_variables_it_needs_and_it_validates_with_them(self, path: Path) -> None:
        """Was a defect: examples/all-sinks.yaml said `Check it with: log-bridge validate ...`, which failed with
        six unset variables its comments never named."""
        lines = path.read_text().splitlines()
        header = "\n".join(line for line in itertools.takewhile(lambda line: line.startswith("#"), lines))
        body = "\n".join(line for line in lines if not line.lstrip().startswith("#"))
        needed = set(re.findall(r"\$\{(\w+)\}", body))  # those without a default
        assert [name for name in sorted(needed) if name not in header] == []
        result = subprocess.run(
            [sys.executable, "-m", "receiver.cli", "validate", "--skip-tls-files", "--config", str(path)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, **dict.fromkeys(needed, "any-value")},
        )
        assert result.returncode == 0, result.stderr
        # The commands the header shows (indented lines, `\` continued), as a newcomer pastes them from the root.
        shown = re.sub(r"\\\n#\s+", " ", "\n".join(line for line in header.splitlines() if line.startswith("#   ")))
        for command in re.findall(r"^#\s+(.*\bvalidate\b.*)$", shown, re.M):
            command = command.replace(".venv/bin/log-bridge", f"{shlex.quote(sys.executable)} -m receiver.cli")
            pasted = subprocess.run(
                ["sh", "-c", command],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=60,
                env={k: v for k, v in os.environ.items() if k not in needed},
            )
            assert pasted.returncode == 0 and "configuration OK" in pasted.stdout, (command, pasted.stderr)
