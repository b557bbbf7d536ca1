"""The project's container images built and run without a Docker engine: buildah (vfs storage,
chroot isolation) and podman (runc, cgroupfs, explicit ulimits), as an unprivileged-kernel CI
machine allows. For tests/images and the engine image benchmark.

Where Docker Hub cannot be reached, the Dockerfiles' base (``python:3.11-slim``) is replaced by
a stand-in with the same Python line and layout: Debian bookworm (minbase, by debootstrap) with
its Python 3.11, ``python``/``pip`` on ``/usr/local/bin`` and no "externally managed" marker, as in
the official image. Every other line of the Dockerfile is built as written.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OFFICIAL_BASE = "docker.io/library/python:3.11-slim"
STAND_IN_BASE = "localhost/kvcache-exporter/python-3.11-bookworm-standin:1"
_STORAGE = ("--storage-driver", "vfs")
_RUNTIME = ("--runtime", "runc", "--cgroup-manager", "cgroupfs")
# runc refuses podman's default process limit here; a container needs both given explicitly.
ULIMITS = ("--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096")
_HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


def missing_tools() -> list[str]:
    return [tool for tool in ("buildah", "podman", "debootstrap") if shutil.which(tool) is None]


def buildah(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return _run(("buildah", *_STORAGE, *args), timeout)


def podman(
    *args: str, timeout: float = 120, check: bool = True
) -> subprocess.CompletedProcess[str]:
    return _run(("podman", *_STORAGE, *_RUNTIME, *args), timeout, check)


def _run(
    command: tuple[str, ...], timeout: float, check: bool = True
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        output = done.stdout[-4000:] + done.stderr[-4000:]
        raise RuntimeError(f"{' '.join(command)} exited {done.returncode}:\n{output}")
    return done


def _has(name: str) -> bool:
    inspected = _run(("buildah", *_STORAGE, "inspect", "--type", "image", name), 60, check=False)
    return inspected.returncode == 0


def base_image() -> str:
    """The image the Dockerfiles build FROM: the official one if present or pullable, else the
    stand-in (made once, about a minute)."""
    if _has(OFFICIAL_BASE):
        return OFFICIAL_BASE
    pulled = _run(("buildah", *_STORAGE, "pull", "--quiet", OFFICIAL_BASE), 120, check=False)
    if pulled.returncode == 0:
        return OFFICIAL_BASE
    if not _has(STAND_IN_BASE):
        _make_stand_in()
    return STAND_IN_BASE


def _make_stand_in() -> None:
    with tempfile.TemporaryDirectory(prefix="kvcache-rootfs-") as scratch:
        rootfs = Path(scratch) / "rootfs"
        _run(
            (
                "debootstrap",
                "--variant=minbase",
                "--include=python3,python3-pip,python3-venv",
                "bookworm",
                str(rootfs),
                debian_mirror(),
            ),
            900,
        )
        for marker in rootfs.glob("usr/lib/python3*/EXTERNALLY-MANAGED"):
            marker.unlink()
        for name, target in (("python", "/usr/bin/python3"), ("pip", "/usr/bin/pip3")):
            (rootfs / "usr/local/bin" / name).symlink_to(target)
        # This machine's trust store (it may sit behind a TLS-inspecting proxy), so that the
        # Dockerfile's own `pip install` reaches PyPI as it would from the official image.
        if _HOST_CA_BUNDLE.is_file():
            shutil.copyfile(_HOST_CA_BUNDLE, rootfs / "etc/ssl/certs/ca-certificates.crt")
            (rootfs / "etc/pip.conf").write_text(
                "[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n"
            )
        shutil.rmtree(rootfs / "var/cache/apt/archives", ignore_errors=True)
        container = buildah("from", "scratch").stdout.strip()
        try:
            mount = Path(buildah("mount", container).stdout.strip())
            _run(("cp", "-a", f"{rootfs}/.", str(mount)), 300)
            buildah("umount", container)
            buildah(
                "config",
                "--env",
                "PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin",
                "--env",
                "LANG=C.UTF-8",
                "--cmd",
                "python3",
                container,
            )
            buildah("commit", "--quiet", container, STAND_IN_BASE)
        finally:
            _run(("buildah", *_STORAGE, "rm", container), 60, check=False)


def debian_mirror() -> str:
    """The Debian mirror apt uses here (a CI machine may have its own), else deb.debian.org."""
    for source in sorted(Path("/etc/apt").glob("sources.list*")) + sorted(
        Path("/etc/apt/sources.list.d").glob("*")
    ):
        if not source.is_file():
            continue
        for line in source.read_text(errors="replace").splitlines():
            words = line.split()
            if words[:1] == ["URIs:"] or words[:1] == ["deb"]:
                for word in words[1:]:
                    if word.startswith(("http://", "https://")) and word.rstrip("/").endswith(
                        "/debian"
                    ):
                        return word
    return "http://deb.debian.org/debian"


def build(dockerfile: str, tag: str, base: str, build_args: dict[str, str] | None = None) -> None:
    args = {"BASE_IMAGE": base, **(build_args or {})}
    buildah(
        "bud",
        "--isolation",
        "chroot",
        "--pull-never",
        "--layers=false",
        *(option for key, value in args.items() for option in ("--build-arg", f"{key}={value}")),
        "-f",
        str(ROOT / dockerfile),
        "-t",
        tag,
        str(ROOT),
    )


def remove_image(tag: str) -> None:
    _run(("buildah", *_STORAGE, "rmi", "--force", tag), 120, check=False)


def image_size_bytes(tag: str) -> int:
    return int(podman("image", "inspect", "--format", "{{.Size}}", tag).stdout.strip())
