"""podman for the image tests: the engine with the settings these machines need, and a stand-in base image.

Neither the development machines nor CI can pull images, so the official base (`python:3.13-slim-trixie`) is
replaced by one made from Debian's packages: debootstrap of Debian 12 (minbase) with python3 and python3-venv, a
`python` link, and the machine's CA bundle (pip inside the build checks the package index's certificate against
it). The base is kept between runs under a tag made from everything it is made of, so it is made once per machine.

Facts of these machines (shared/notes/containers.md): crun fails here ("cgroups in hybrid mode"), so runc is the
runtime when it is installed; podman's default ulimits cannot be set in this sandbox, so a containers.conf with
`default_ulimits = []` is passed through CONTAINERS_CONF; builds and containers use the host's network.

Skipped where podman is missing, unless LOG_BRIDGE_REQUIRE_PODMAN=1 (set by `.ci/run`): then it fails.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pytest

REQUIRE_ENV = "LOG_BRIDGE_REQUIRE_PODMAN"
RUNC = Path("/usr/sbin/runc")
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
BASE_REPOSITORY = "localhost/log-bridge-test-base"
BASE_SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python3-venv")
BASE_RECIPE = "minbase;python-link;ca-bundle;v1"
"""Change this when the way the base is made changes: it is part of the base's tag."""


def unavailable(reason: str) -> None:
    """Skip, or fail when the environment requires the image tests."""
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{REQUIRE_ENV}=1 but {reason}", pytrace=False)
    pytest.skip(reason)


class Podman:
    """The podman command line with this machine's settings."""

    def __init__(self, workdir: Path) -> None:
        found = shutil.which("podman")
        if found is None:
            unavailable("podman is not installed (apt-get install podman buildah runc debootstrap)")
        self.binary = str(found)
        conf = workdir / "containers.conf"
        conf.write_text("[containers]\ndefault_ulimits = []\n")
        self.env = {**os.environ, "CONTAINERS_CONF": str(conf)}
        self.global_args = ["--runtime", str(RUNC)] if RUNC.exists() else []

    @property
    def command(self) -> list[str]:
        """podman and its global options, for `make image ENGINE=...`."""
        return [self.binary, *self.global_args]

    def __call__(
        self, *args: str, timeout: float = 120, check: bool = True, stdin: bytes | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a podman command; on failure (with `check`), fail the test with its output."""
        result = subprocess.run(
            [*self.command, *args],
            input=stdin.decode() if stdin is not None else None,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env,
        )
        if check and result.returncode != 0:
            pytest.fail(f"podman {' '.join(args[:3])} failed ({result.returncode}):\n{result.stderr[-3000:]}")
        return result

    def exists(self, image: str) -> bool:
        """Whether an image is in local storage."""
        return self("image", "exists", image, check=False).returncode == 0

    def remove_images(self, *images: str) -> None:
        """Remove images (those already gone are ignored)."""
        if images:
            self("rmi", "--force", *images, check=False)


def base_tag() -> str:
    """The stand-in base's tag: a digest of what it is made of."""
    digest = hashlib.sha256()
    for part in (BASE_SUITE, ",".join(BASE_PACKAGES), BASE_RECIPE):
        digest.update(part.encode() + b"\0")
    digest.update(CA_BUNDLE.read_bytes() if CA_BUNDLE.exists() else b"")
    return f"{BASE_REPOSITORY}:{BASE_SUITE}-{digest.hexdigest()[:16]}"


def stand_in_base(podman: Podman) -> str:
    """The stand-in base image, made unless a base of the same inputs is there already; older bases are removed."""
    image = base_tag()
    listed = podman("images", "--format", "{{.Repository}}:{{.Tag}}", BASE_REPOSITORY).stdout.split()
    podman.remove_images(*[name for name in listed if name != image])
    if podman.exists(image):
        return image
    debootstrap = shutil.which("debootstrap")
    if os.geteuid() != 0:
        unavailable("making the stand-in base with debootstrap needs root")
    if debootstrap is None:
        unavailable("debootstrap is not installed (apt-get install debootstrap)")
    if not CA_BUNDLE.exists():
        unavailable(f"there is no CA bundle at {CA_BUNDLE} (apt-get install ca-certificates)")
    with tempfile.TemporaryDirectory(prefix="log-bridge-base-") as scratch:
        rootfs = Path(scratch) / "rootfs"
        made = subprocess.run(
            [str(debootstrap), "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", BASE_SUITE, str(rootfs)],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if made.returncode != 0:
            pytest.fail(f"debootstrap failed ({made.returncode}):\n{(made.stdout + made.stderr)[-3000:]}")
        (rootfs / "usr/bin/python").symlink_to("python3")
        shutil.copyfile(CA_BUNDLE, rootfs / "etc/ssl/certs/ca-certificates.crt")
        tar = subprocess.run(["tar", "-C", str(rootfs), "-c", "."], capture_output=True, timeout=300, check=True)
        imported = subprocess.run(
            [*podman.command, "import", "-", image], input=tar.stdout, capture_output=True, timeout=300, env=podman.env
        )
        if imported.returncode != 0:
            pytest.fail(f"podman import failed:\n{imported.stderr.decode(errors='replace')[-3000:]}")
    return image


def make_image(podman: Podman, repo: Path, base: str, image: str, build_flags: Sequence[str]) -> None:
    """Build the repository's Dockerfile with `make image`, on `base`."""
    result = subprocess.run(
        [
            "make",
            "-C",
            str(repo),
            "image",
            f"ENGINE={' '.join(podman.command)}",
            f"BASE={base}",
            f"IMAGE={image}",
            f"BUILD_FLAGS={' '.join(build_flags)}",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env=podman.env,
    )
    if result.returncode != 0:
        pytest.fail(f"make image failed ({result.returncode}):\n{(result.stdout + result.stderr)[-4000:]}")
