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
import random
import shutil
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



_PORT_FLOOR = 20000  # free_port's lowest pick: clear of the well-known and most registered service ports
_given_ports: set[int] = set()  # what free_port handed out in this process: never twice (nothing is bound yet)


def _ephemeral_range() -> tuple[int, int]:
    """The kernel's range for outgoing connections' local ports (Linux default 32768-60999)."""
    try:
        low, high = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now, for a process started later to bind. Picked below the ephemeral
    range: a port the kernel hands out (bind to 0) is also what it hands to the next outgoing
    connection, so on a busy machine (a bench client, a store, another cluster) the port was often
    taken by then and the worker died with EADDRINUSE at start; below that range only an explicit
    bind can take it. Falls back to a kernel-chosen port when the range below is full or absent."""
    low, _ = _ephemeral_range()
    rng = random.SystemRandom()
    for _ in range(64) if low - 1 > _PORT_FLOOR else ():
        port = rng.randint(_PORT_FLOOR, low - 1)
        if port in _given_ports:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        if len(_given_ports) >= 2048:  # long since bound (or abandoned) by whoever asked
            _given_ports.clear()
        _given_ports.add(port)
        return port
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
    num_routers: int = 1  # router replicas, each on its own port; clients get the list (see Cluster.router_address)
    num_store_masters: int = 1  # > 1 needs etcd: one leads, the others stand by
    etcd: str = ""  # etcd URL every process registers in; "start": this cluster starts its own etcd server
    etcd_args: list[str] = field(default_factory=list)  # extra --etcd-* flags for every process

    def __post_init__(self) -> None:
        if self.num_routers < 1 or self.num_store_masters < 1:
            raise ValueError("need at least one router and one store master")
        if self.num_store_masters > 1 and not self.etcd:
            raise ValueError("several store masters elect their leader through etcd: give etcd too")


ETCD_INSTALL_HINT = "install Debian's etcd-server (apt-get install etcd-server) or pass an etcd URL"


class Cluster:
    def __init__(self, spec: ClusterSpec) -> None:
        self.spec = spec
        self.procs: list[Proc] = []
        self.log_dir = Path(spec.log_dir or tempfile.mkdtemp(prefix="pdserve-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.router_address = ""  # host:port, or a comma-separated list of the router replicas
        self.store_address = ""  # KV store master(s), when the spec asks for a store
        self.http_url = ""  # http://host:port of the (first) router's HTTP API ("" when disabled)
        self.http_urls: list[str] = []  # every router replica's HTTP API
        self.etcd_url = ""  # etcd every process registers in ("" without etcd)

    def _cmd(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "pdserve", "--log-level", self.spec.log_level, *args]

    def _spawn(self, name: str, argv: list[str], address: str = "", log_name: str = "") -> Proc:
        proc = Proc(name, argv, self.log_dir / (log_name or f"{name}.log"), address)
        proc.popen = spawn_process(argv, proc.log_path, self.spec.env)
        self.procs.append(proc)
        self.write_state()
        return proc

    def start_etcd(self) -> Proc:
        """A real etcd server (Debian's etcd-server) with its data in the log dir, so a restart keeps
        every key and lease; on loopback, on free client and peer ports."""
        binary = shutil.which("etcd")
        if binary is None:
            raise RuntimeError(f"etcd not found: {ETCD_INSTALL_HINT}")
        s = self.spec
        client, peer = free_port(s.host), free_port(s.host)
        self.etcd_url = f"http://{s.host}:{client}"
        argv = [binary, "--name", "pdserve", "--data-dir", str(self.log_dir / "etcd-data"),
                "--listen-client-urls", self.etcd_url, "--advertise-client-urls", self.etcd_url,
                "--listen-peer-urls", f"http://{s.host}:{peer}", "--initial-advertise-peer-urls",
                f"http://{s.host}:{peer}", "--initial-cluster", f"pdserve=http://{s.host}:{peer}",
                "--log-level", "warn"]
        return self._spawn("etcd", argv, self.etcd_url)

    def _etcd_flags(self) -> list[str]:
        return ["--etcd", self.etcd_url, *self.spec.etcd_args] if self.etcd_url else []

    def start_routers(self) -> None:
        s = self.spec
        ports = [s.router_port or free_port(s.host)] + [free_port(s.host) for _ in range(s.num_routers - 1)]
        self.router_address = ",".join(f"{s.host}:{p}" for p in ports)
        for i, port in enumerate(ports):
            http_port = s.http_port if s.http_port != 0 and i == 0 else (-1 if s.http_port < 0 else free_port(s.host))
            self.http_urls.append(f"http://{s.host}:{http_port}" if http_port > 0 else "")
            self.start_router(i, port, http_port)
        self.http_url = self.http_urls[0]

    def start_router(self, index: int, port: int, http_port: int) -> Proc:
        s = self.spec
        model = ["--model", s.model] if s.model else []
        name = "router" if s.num_routers == 1 else f"router-{index}"
        proc = self._spawn(name, self._cmd("router", "--host", s.host, "--port", str(port),
                                           "--http-port", str(http_port), *model, *self._store_flags(),
                                           *self._etcd_flags(), *s.router_args), f"{s.host}:{port}")
        proc.metrics_url = f"{self.http_urls[index]}/metrics" if self.http_urls[index] else ""
        return proc

    def start_store(self) -> None:
        """The KV store master(s) and the nodes (nodes register with the leading master by themselves)."""
        s = self.spec
        ports = [free_port(s.host) for _ in range(s.num_store_masters)]
        self.store_address = ",".join(f"{s.host}:{p}" for p in ports)
        for i, port in enumerate(ports):
            metrics_flags, metrics_url = self._metrics_endpoint()
            name = "kvstore-master" if s.num_store_masters == 1 else f"kvstore-master-{i}"
            proc = self._spawn(name, self._cmd("kvstore-master", "--host", s.host, "--port", str(port),
                                               *metrics_flags, *self._etcd_flags()), f"{s.host}:{port}")
            proc.metrics_url = metrics_url
        for i in range(s.num_store_nodes):
            self.start_store_node(i)

    def start_store_node(self, index: int) -> Proc:
        s = self.spec
        port = free_port(s.host)
        metrics_flags, metrics_url = self._metrics_endpoint()
        proc = self._spawn(f"kvstore-node-{index}", self._cmd(
            "kvstore-node", "--host", s.host, "--port", str(port), "--master", self.store_address,
            "--node-id", f"node-{index}", *metrics_flags, *self._etcd_flags(), *s.store_args), f"{s.host}:{port}")
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
        1 decode on 2 cores get one thread each, one colocated worker gets both. A worker given less than
        the whole machine also gets --elastic-threads (it may use the cores its neighbours leave idle)."""
        s = self.spec
        return max(1, available_cpus() // max(1, s.num_prefill + s.num_decode + s.num_colocated))

    def start_worker(self, role: str, index: int) -> Proc:
        s = self.spec
        port = free_port(s.host)
        extra = {"prefill": s.prefill_args, "decode": s.decode_args, "worker": s.decode_args}[role]
        model = ["--model", s.model] if s.model else []
        metrics_flags, metrics_url = self._metrics_endpoint()
        share = self.worker_threads()
        threads = [] if "--num-threads" in (*s.worker_args, *extra) else ["--num-threads", str(share)]
        if threads and share < available_cpus() and not any(
                a.endswith("elastic-threads") for a in (*s.worker_args, *extra)):
            threads.append("--elastic-threads")  # a worker whose neighbours idle may use their cores
        # With etcd the routers find the worker there; without, it registers with every router replica.
        registration = self._etcd_flags() or ["--router", self.router_address]
        argv = self._cmd(role, "--host", s.host, "--port", str(port), *registration,
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
            from pdserve.engine.kernels import ensure_kernel_built

            ensure_kernel_built()  # likewise: one build (about 40 s, first start only), not one per worker
        if self.spec.etcd == "start":
            self.start_etcd()
        elif self.spec.etcd:
            self.etcd_url = self.spec.etcd
        if self.etcd_url:
            try:
                asyncio.run(self.wait_etcd(30.0))
            except BaseException:
                self.stop()
                raise
        if self.spec.num_store_nodes > 0:
            self.start_store()
        self.start_routers()
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

    async def wait_etcd(self, timeout_s: float) -> None:
        from pdserve.membership import Etcd, EtcdConfig

        etcd = Etcd(EtcdConfig(etcd=self.etcd_url, etcd_wait_s=timeout_s))
        try:
            await etcd.connect()
        except Exception as exc:  # noqa: BLE001 - reported with the log tail
            tail = "\n".join(f"--- {p.name} ---\n{p.log_tail()}" for p in self.procs if p.name == "etcd")
            raise RuntimeError(f"{exc}\n{tail}") from exc
        finally:
            await etcd.close()

    @property
    def num_workers(self) -> int:
        s = self.spec
        return s.num_prefill + s.num_decode + s.num_colocated

    async def wait_ready(self, timeout_s: float, num_workers: int | None = None) -> None:
        """Until every router replica serves and sees `num_workers` (default: all) healthy workers."""
        want = self.num_workers if num_workers is None else num_workers
        deadline = time.monotonic() + timeout_s
        while True:
            dead = [p for p in self.procs if not p.alive()]
            if dead:
                raise RuntimeError(f"{dead[0].name} exited with {dead[0].popen.returncode}:\n{dead[0].log_tail()}")
            if all([await self._router_ready(a, want) for a in self.router_address.split(",")]):
                return
            if time.monotonic() > deadline:
                tails = "\n".join(f"--- {p.name} ---\n{p.log_tail()}" for p in self.procs)
                raise TimeoutError(f"cluster not ready after {timeout_s} s\n{tails}")
            await asyncio.sleep(0.2)

    async def _router_ready(self, address: str, want: int) -> bool:
        """The router replica at `address` serves and sees `want` healthy workers."""
        from pdserve.client import Client
        from pdserve.rpc import is_serving

        if not await is_serving(address):
            return False
        async with Client(address) as client:
            try:
                return sum(w.healthy for w in await client.workers()) >= want
            except Exception:  # noqa: BLE001 - not up yet
                return False

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
