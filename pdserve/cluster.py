"""Cluster: starts a whole pdserve deployment as real OS processes on this machine and stops it.

Used by `pdserve up`, the integration tests and the benchmarks. Each process is a `pdserve`
subcommand; readiness is the router's health check plus the expected number of healthy workers
(polled with a deadline, never a fixed sleep); on failure the log tails are shown. Children get
PR_SET_PDEATHSIG so that even a `kill -9` of the parent leaves no orphans.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from pdserve.engine.threads import available_cpus

logger = logging.getLogger(__name__)



def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# Sets PR_SET_PDEATHSIG in the child and execs the real command (the setting survives exec). Done
# in a tiny launcher rather than in `preexec_fn`: Python code run between fork and exec can crash
# the child when the parent has other threads (gRPC's, under load), e.g. when restarting a worker.
_LAUNCHER = ("import ctypes, os, signal, sys\n"
             "try: ctypes.CDLL('libc.so.6', use_errno=True).prctl(1, signal.SIGTERM)\n"
             "except OSError: pass\n"
             "if os.getppid() != int(sys.argv[1]): sys.exit(1)  # the parent died before prctl\n"
             "os.execv(sys.argv[2], sys.argv[2:])\n")


def _with_parent_death_signal(argv: list[str]) -> list[str]:
    return [sys.executable, "-c", _LAUNCHER, str(os.getpid()), *argv]


def spawn_process(argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start `argv` with stdout+stderr to `log_path`, killed (SIGTERM) if this process dies.
    Every pdserve launcher (clusters, tests, benchmarks) starts processes through this."""
    full_env = {**os.environ, "UCX_WARN_UNUSED_ENV_VARS": "n", "PYTHONUNBUFFERED": "1", **(env or {})}
    with log_path.open("wb") as log:
        return subprocess.Popen(_with_parent_death_signal(argv), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=full_env)


@dataclass
class Proc:
    name: str
    argv: list[str]
    log_path: Path
    address: str = ""
    popen: subprocess.Popen | None = None
    metrics_url: str = ""  # http://host:port/metrics when the process serves Prometheus metrics
    restarts: int = 0  # times this process was started again after the first start

    @property
    def pid(self) -> int:
        return self.popen.pid if self.popen else -1

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


@dataclass
class ClusterSpec:
    model: str = ""
    num_prefill: int = 1
    num_decode: int = 1
    num_colocated: int = 0
    num_store_nodes: int = 0  # > 0: a KV store master plus this many nodes; workers and router use it
    store_args: list[str] = field(default_factory=list)  # extra flags for every store node
    host: str = "127.0.0.1"
    router_port: int = 0
    http_port: int = 0  # router's OpenAI HTTP API and /metrics (0: a free one; -1: none)
    worker_metrics: bool = True  # each worker and store process serves /metrics on a free port of its own
    router_args: list[str] = field(default_factory=list)
    prefill_args: list[str] = field(default_factory=list)
    decode_args: list[str] = field(default_factory=list)
    worker_args: list[str] = field(default_factory=list)  # every worker role
    log_dir: str = ""
    log_level: str = "info"
    env: dict[str, str] = field(default_factory=dict)


class Cluster:
    def __init__(self, spec: ClusterSpec) -> None:
        self.spec = spec
        self.procs: list[Proc] = []
        self.log_dir = Path(spec.log_dir or tempfile.mkdtemp(prefix="pdserve-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.router_address = ""
        self.store_address = ""  # KV store master, when the spec asks for a store
        self.http_url = ""  # http://host:port of the router's HTTP API ("" when disabled)

    def _cmd(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "pdserve", "--log-level", self.spec.log_level, *args]

    def _spawn(self, name: str, argv: list[str], address: str = "", log_name: str = "") -> Proc:
        proc = Proc(name, argv, self.log_dir / (log_name or f"{name}.log"), address)
        proc.popen = spawn_process(argv, proc.log_path, self.spec.env)
        self.procs.append(proc)
        self.write_state()
        return proc

    def start_router(self) -> Proc:
        s = self.spec
        port = s.router_port or free_port(s.host)
        self.router_address = f"{s.host}:{port}"
        http_port = s.http_port if s.http_port != 0 else free_port(s.host)
        self.http_url = f"http://{s.host}:{http_port}" if http_port > 0 else ""
        model = ["--model", s.model] if s.model else []
        proc = self._spawn("router", self._cmd("router", "--host", s.host, "--port", str(port),
                                               "--http-port", str(http_port), *model, *self._store_flags(),
                                               *s.router_args),
                           self.router_address)
        proc.metrics_url = f"{self.http_url}/metrics" if self.http_url else ""
        return proc

    def start_store(self) -> None:
        """The KV store master and its nodes (nodes register with the master by themselves)."""
        s = self.spec
        port = free_port(s.host)
        self.store_address = f"{s.host}:{port}"
        metrics_flags, metrics_url = self._metrics_endpoint()
        proc = self._spawn("kvstore-master", self._cmd("kvstore-master", "--host", s.host, "--port", str(port),
                                                       *metrics_flags), self.store_address)
        proc.metrics_url = metrics_url
        for i in range(s.num_store_nodes):
            self.start_store_node(i)

    def start_store_node(self, index: int) -> Proc:
        s = self.spec
        port = free_port(s.host)
        metrics_flags, metrics_url = self._metrics_endpoint()
        proc = self._spawn(f"kvstore-node-{index}", self._cmd(
            "kvstore-node", "--host", s.host, "--port", str(port), "--master", self.store_address,
            "--node-id", f"node-{index}", *metrics_flags, *s.store_args), f"{s.host}:{port}")
        proc.metrics_url = metrics_url
        return proc

    def _metrics_endpoint(self) -> tuple[list[str], str]:
        """(`--metrics-port P` on a free port, its /metrics URL) when the spec asks for per-process
        metrics, else ([], "")."""
        if not self.spec.worker_metrics:
            return [], ""
        port = free_port(self.spec.host)
        return ["--metrics-port", str(port)], f"http://{self.spec.host}:{port}/metrics"

    def _store_flags(self) -> list[str]:
        return ["--kvstore-master", self.store_address] if self.store_address else []

    def worker_threads(self) -> int:
        """Each engine process's share of the cores this process may use (at least one): 1 prefill +
        1 decode on 2 cores get one thread each, one colocated worker gets both."""
        s = self.spec
        return max(1, available_cpus() // max(1, s.num_prefill + s.num_decode + s.num_colocated))

    def start_worker(self, role: str, index: int) -> Proc:
        s = self.spec
        port = free_port(s.host)
        extra = {"prefill": s.prefill_args, "decode": s.decode_args, "worker": s.decode_args}[role]
        model = ["--model", s.model] if s.model else []
        metrics_flags, metrics_url = self._metrics_endpoint()
        threads = [] if "--num-threads" in (*s.worker_args, *extra) else ["--num-threads", str(self.worker_threads())]
        argv = self._cmd(role, "--host", s.host, "--port", str(port), "--router", self.router_address,
                         *metrics_flags, *model, *self._store_flags(), *threads, *s.worker_args, *extra)
        name = {"prefill": "prefill", "decode": "decode", "worker": "colocated"}[role]
        proc = self._spawn(f"{name}-{index}", argv, f"{s.host}:{port}")
        proc.metrics_url = metrics_url
        return proc

    def start(self, timeout_s: float = 120.0) -> str:
        """Start every process and wait until the router sees all workers healthy. Returns the router address."""
        if not self.spec.model:
            from pdserve.engine.builtin_model import ensure_builtin_model

            self.spec.model = str(ensure_builtin_model("tiny"))  # once, before any process races to make it
        if self.spec.num_prefill + self.spec.num_decode + self.spec.num_colocated:
            from pdserve.engine.attention import ensure_kernel_built

            ensure_kernel_built()  # likewise: one build (about 40 s, first start only), not one per worker
        if self.spec.num_store_nodes > 0:
            self.start_store()
        self.start_router()
        for i in range(self.spec.num_prefill):
            self.start_worker("prefill", i)
        for i in range(self.spec.num_decode):
            self.start_worker("decode", i)
        for i in range(self.spec.num_colocated):
            self.start_worker("worker", i)
        self.write_state()
        try:
            asyncio.run(self.wait_ready(timeout_s))
        except BaseException:
            self.stop()
            raise
        return self.router_address

    @property
    def num_workers(self) -> int:
        s = self.spec
        return s.num_prefill + s.num_decode + s.num_colocated

    async def wait_ready(self, timeout_s: float, num_workers: int | None = None) -> None:
        from pdserve.client import Client
        from pdserve.rpc import is_serving

        want = self.num_workers if num_workers is None else num_workers
        deadline = time.monotonic() + timeout_s
        async with Client(self.router_address) as client:
            while True:
                dead = [p for p in self.procs if not p.alive()]
                if dead:
                    raise RuntimeError(f"{dead[0].name} exited with {dead[0].popen.returncode}:\n{dead[0].log_tail()}")
                if await is_serving(self.router_address):
                    try:
                        healthy = [w for w in await client.workers() if w.healthy]
                    except Exception:  # noqa: BLE001 - not up yet
                        healthy = []
                    if len(healthy) >= want:
                        return
                if time.monotonic() > deadline:
                    tails = "\n".join(f"--- {p.name} ---\n{p.log_tail()}" for p in self.procs)
                    raise TimeoutError(f"cluster not ready after {timeout_s} s\n{tails}")
                await asyncio.sleep(0.2)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> Proc:
        proc = next(p for p in self.procs if p.name == name)
        if proc.alive():
            proc.popen.send_signal(sig)  # type: ignore[union-attr]
            proc.popen.wait(10)  # type: ignore[union-attr]
        return proc

    def restart(self, name: str, sig: int = signal.SIGKILL) -> Proc:
        """Stop process `name` with `sig` if it still runs, then start it again (`respawn`)."""
        self.kill(name, sig)
        return self.respawn(name)

    def respawn(self, name: str) -> Proc:
        """Start the exited process `name` again with the same command line (same ports, so a worker
        re-registers with the router under its old address); its log goes to `<name>.restart<N>.log`.
        Returns the new Proc, in the old one's place; wait for it with `wait_ready`."""
        old = next(p for p in self.procs if p.name == name)
        assert not old.alive(), f"{name} still runs"
        num_restarts = sum(1 for p in self.log_dir.glob(f"{name}.restart*.log")) + 1
        index = self.procs.index(old)
        self.procs.remove(old)
        proc = self._spawn(name, old.argv, old.address, log_name=f"{name}.restart{num_restarts}.log")
        proc.metrics_url = old.metrics_url
        proc.restarts = old.restarts + 1
        self.procs.remove(proc)
        self.procs.insert(index, proc)
        self.write_state()
        return proc

    @property
    def state_path(self) -> Path:
        return self.log_dir / "processes.json"

    def write_state(self) -> None:
        """`<log dir>/processes.json`: every process's name, pid, address, metrics URL, restarts and log,
        rewritten on each (re)start so operators and tests can find the current pids."""
        rows = [{"name": p.name, "pid": p.pid, "address": p.address, "metrics_url": p.metrics_url,
                 "restarts": p.restarts, "log": str(p.log_path)} for p in self.procs]
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"router": self.router_address, "http": self.http_url,
                                   "kvstore_master": self.store_address, "processes": rows}, indent=1))
        tmp.replace(self.state_path)

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM everything (workers first), then SIGKILL what is left after `timeout_s`."""
        for proc in reversed(self.procs):
            if proc.alive():
                proc.popen.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        deadline = time.monotonic() + timeout_s
        for proc in self.procs:
            if proc.popen is None:
                continue
            try:
                proc.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop in time; killing it", proc.name)
                proc.popen.kill()
                proc.popen.wait(5)

    def __enter__(self) -> "Cluster":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_cluster(spec: ClusterSpec, timeout_s: float = 120.0, attempts: int = 1) -> Cluster:
    """A started cluster. With `attempts` > 1 a failed start is retried with a fresh Cluster (fresh
    ports): a port picked by `free_port` can be taken by another process before the worker binds it.
    Each failed attempt has already stopped its own processes."""
    for attempt in range(1, attempts + 1):
        cluster = Cluster(spec)
        try:
            cluster.start(timeout_s=timeout_s)
            return cluster
        except (RuntimeError, TimeoutError) as exc:
            if attempt == attempts:
                raise
            logger.warning("cluster start failed (attempt %d of %d): %s", attempt, attempts,
                           str(exc).splitlines()[0])
    raise AssertionError("unreachable")
