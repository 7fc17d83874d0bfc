"""UpProcess: `pdserve up` run as users run it (a real process), driven from tests and benchmarks.

It finds the cluster's current processes in `<log dir>/processes.json` (the supervisor rewrites it
on every restart), so a caller can `kill -9` one by the pid `pdserve up` started and watch it come
back. Stopping is a SIGINT, like Ctrl-C. Does not start any process of the cluster itself.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pdserve.cluster import free_port, spawn_process


class UpProcess:
    def __init__(self, args: list[str], log_dir: str = "", log_level: str = "info",
                 env: dict[str, str] | None = None) -> None:
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="pdserve-up-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.argv = [sys.executable, "-m", "pdserve", "--log-level", log_level, "up", "--port", str(self.port),
                     "--log-dir", str(self.log_dir), *args]
        self.log_path = self.log_dir / "up.log"
        self.env = env
        self.popen: subprocess.Popen | None = None

    def start(self) -> "UpProcess":
        self.popen = spawn_process(self.argv, self.log_path, self.env)
        return self

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def state(self) -> dict:
        try:
            return json.loads((self.log_dir / "processes.json").read_text())
        except (OSError, ValueError):
            return {"processes": []}

    def processes(self) -> dict[str, dict]:
        """name -> {pid, address, restarts, log, ...} as `pdserve up` last wrote it."""
        return {p["name"]: p for p in self.state()["processes"]}

    def pid(self, name: str) -> int:
        return int(self.processes()[name]["pid"])

    def kill(self, name: str, sig: int = signal.SIGKILL) -> int:
        """Send `sig` to the cluster process `name`; returns the pid that got it."""
        pid = self.pid(name)
        os.kill(pid, sig)
        return pid

    async def wait_ready(self, num_workers: int, timeout_s: float = 240.0, router: str = "") -> None:
        """Until `pdserve up` printed that it is up and the router lists `num_workers` healthy workers."""
        from pdserve.client import Client

        address = router or self.address
        deadline = time.monotonic() + timeout_s
        async with Client(address) as client:
            while True:
                if not self.alive():
                    raise RuntimeError(f"pdserve up exited with {self.popen.returncode}:\n{self.log_tail()}")
                if "pdserve is up" in self.log_tail(400):
                    try:
                        if sum(w.healthy for w in await client.workers(timeout_s=2.0)) >= num_workers:
                            return
                    except Exception:  # noqa: BLE001 - the router is not up (again) yet
                        pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"pdserve up not ready after {timeout_s} s:\n{self.log_tail()}")
                await asyncio.sleep(0.2)

    async def wait_restarted(self, name: str, old_pid: int, timeout_s: float = 120.0) -> dict:
        """Until the supervisor has started `name` again under a new pid; returns its record."""
        deadline = time.monotonic() + timeout_s
        while True:
            proc = self.processes().get(name)
            if proc and proc["pid"] != old_pid:
                return proc
            if not self.alive():
                raise RuntimeError(f"pdserve up exited with {self.popen.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} not restarted within {timeout_s} s:\n{self.log_tail()}")
            await asyncio.sleep(0.2)

    def stop(self, timeout_s: float = 30.0) -> int:
        """Ctrl-C: SIGINT, then SIGKILL if it has not exited within `timeout_s`. Returns its exit status."""
        if self.popen is None:
            return 0
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGINT)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        return self.popen.returncode
