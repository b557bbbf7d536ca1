"""The reference engine's image, built and run as the compose stack runs it: an opt-in check,
not part of every CI run (torch makes it gigabytes and minutes).

    .venv/bin/python bench/engine_image.py [--torch-index-url URL] [--keep]

Builds ``docker/engine.Dockerfile`` with buildah (vfs, chroot; the base as in tests/images:
the official ``python:3.11-slim`` if it can be pulled, else the debootstrap stand-in), runs it
with podman (read-only root, its own user, a tmpfs for its KV files, host network) and waits
for ``/healthz`` and a ``kvcache.stats`` snapshot with the agentic workload running. Prints the
build time, the image size, the time to first snapshot, and removes the image unless
``--keep``. ``--torch-index-url`` is where pip finds torch 2.13.0: the Dockerfile's default is
PyTorch's CPU index; PyPI (``https://pypi.org/simple``) has the CUDA build, several GB larger.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.request
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from devtools import images
from devtools.ports import listening_ports


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--torch-index-url", default=None)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    missing = images.missing_tools()
    if missing:
        print(f"needs {', '.join(missing)} (apt install them; scripts/test does)", file=sys.stderr)
        return 2
    tag = f"localhost/kvcache-exporter/engine:bench-{uuid.uuid4().hex[:8]}"
    started = time.monotonic()
    base = images.base_image()
    extra = {} if args.torch_index_url is None else {"TORCH_INDEX_URL": args.torch_index_url}
    images.build("docker/engine.Dockerfile", tag, base, extra)
    built = time.monotonic() - started
    print(f"built {tag} on {base} in {built:.0f} s; {images.image_size_bytes(tag) / 2**30:.2f} GiB")
    name = f"kvcache-engine-bench-{uuid.uuid4().hex[:8]}"
    try:
        run_started = time.monotonic()
        images.podman(
            "run", "--detach", "--name", name, "--network", "host", "--cgroupns", "host",
            "--read-only", "--tmpfs", "/data/kv:mode=1777", "--tmpfs", "/tmp:mode=1777",
            *images.ULIMITS, tag,
            "kvcache-shim", "reference", "--listen", "127.0.0.1:0", "--workload", "agentic",
        )  # fmt: skip
        pid = int(images.podman("inspect", "--format", "{{.State.Pid}}", name).stdout.strip())
        port = None
        while port is None and time.monotonic() - run_started < 300:
            ports = listening_ports(pid)
            port = min(ports) if ports else None
            time.sleep(0.5)
        if port is None:
            raise SystemExit("the engine did not listen within 300 s")
        snapshot = None
        while snapshot is None and time.monotonic() - run_started < 300:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/kv/stats", timeout=5) as r:
                    snapshot = json.loads(r.read())
            except OSError:
                time.sleep(0.5)
        first = time.monotonic() - run_started
        user = images.podman("exec", name, "id", "-un").stdout.strip()
        print(
            f"first snapshot {first:.1f} s after start ({snapshot and snapshot['schema']}),"
            f" running as {user}, read-only root"
        )
    finally:
        images.podman("rm", "--force", "--time", "0", name, check=False)
        if not args.keep:
            images.remove_image(tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
