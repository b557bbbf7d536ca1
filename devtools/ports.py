"""Ports read back from the process that bound them, for tests and benchmarks (Linux).

A server started on port 0 binds whatever the kernel gives it; we read the port from
``/proc/<pid>/net/tcp*`` (sockets in LISTEN state whose inodes are among the process's open
files). No window in which another process can take a port we picked but have not bound yet,
which is what made two test runs at once collide.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

LISTEN = "0A"  # TCP state LISTEN in /proc/net/tcp


def listening_ports(pid: int) -> set[int]:
    """TCP ports process ``pid`` is listening on (empty if it has gone)."""
    fd_dir = Path(f"/proc/{pid}/fd")
    inodes = set()
    try:
        for fd in os.listdir(fd_dir):
            try:
                target = os.readlink(fd_dir / fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        return set()
    ports = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == LISTEN and fields[9] in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def wait_listening(
    proc: subprocess.Popen[bytes], count: int = 1, timeout: float = 120.0, poll: float = 0.05
) -> list[int]:
    """The ports ``proc`` listens on once it listens on ``count`` of them (sorted)."""
    deadline = time.monotonic() + timeout
    while True:
        ports = listening_ports(proc.pid)
        if len(ports) >= count:
            return sorted(ports)
        if proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited ({proc.returncode}) before listening")
        if time.monotonic() > deadline:
            raise RuntimeError(f"process {proc.args!r} did not listen within {timeout:.0f} s")
        time.sleep(poll)
