"""The network-namespace lab of netns_demo.py: one namespace per "host" with its own address, veth
pairs to a bridge in a namespace of its own (nothing added to the root namespace's network), the
processes started on those hosts, and the removal of all of it (`Lab.close`, `remove_leftovers`).
Knows nothing about pdserve beyond `child_env`'s choice of UCX transport."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "pds-"  # every namespace made here is named pds-<pid>-<host>
SUBNET = "10.77.0"  # a private /24 that exists only inside these namespaces


def child_env() -> dict[str, str]:
    """Environment of every process on a host. UCX keeps all its transports: the host identity
    (pdserve.transfer.host: kernel boot + network and pid namespace) tells these namespaces apart, so no
    shared-memory endpoint is opened between them and the KV crosses the veth (the demo's KV probe checks).
    PDS_NETNS_UCX_TLS sets UCX_TLS (e.g. `tcp`); PDSERVE_TRANSFER_SHARED_MEMORY=on forces shared memory
    between the namespaces, which the KV probe must then report as not crossing the link."""
    env = {**os.environ, "UCX_WARN_UNUSED_ENV_VARS": "n", "PYTHONUNBUFFERED": "1",
           "NO_PROXY": f"{SUBNET}.0/24,127.0.0.1", "no_proxy": f"{SUBNET}.0/24,127.0.0.1"}
    if "PDS_NETNS_UCX_TLS" in os.environ:
        env["UCX_TLS"] = os.environ["PDS_NETNS_UCX_TLS"]
    return env


class Skip(Exception):
    """This machine cannot build network namespaces; the reason says why."""


def die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _our_namespaces() -> list[str]:
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(PREFIX)]


def _kill_namespace_processes(ns: str) -> None:
    """Processes still running inside one of our namespaces (started by this script) are killed by pid."""
    for text in _ip("netns", "pids", ns, check=False).stdout.split():
        try:
            os.kill(int(text), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def remove_leftovers() -> list[str]:
    """Namespaces from earlier runs whose script is gone (pds-<pid>-... with a dead pid)."""
    removed = []
    for ns in _our_namespaces():
        pid_text = ns[len(PREFIX):].split("-", 1)[0]
        if pid_text.isdigit() and _pid_alive(int(pid_text)):
            continue  # another run of this script, still going
        _kill_namespace_processes(ns)
        _ip("netns", "del", ns, check=False)
        removed.append(ns)
    return removed


@dataclass
class Host:
    name: str
    ns: str
    address: str
    veth: str  # its end in the bridge namespace


@dataclass
class Proc:
    name: str
    host: Host
    popen: subprocess.Popen
    log_path: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, n: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


@dataclass
class Lab:
    """The namespaces, links and processes of one run; `close` removes all of them (idempotent)."""

    log_dir: Path
    tag: str = field(default_factory=lambda: f"{PREFIX}{os.getpid()}")
    hosts: dict[str, Host] = field(default_factory=dict)
    procs: list[Proc] = field(default_factory=list)
    namespaces: list[str] = field(default_factory=list)
    closed: bool = False

    @property
    def bridge_ns(self) -> str:
        return f"{self.tag}-br"

    def _add_namespace(self, ns: str) -> None:
        result = _ip("netns", "add", ns, check=False)
        if result.returncode != 0:
            if not self.namespaces and ("Operation not permitted" in result.stderr or "denied" in result.stderr):
                raise Skip(f"cannot create network namespaces here: {result.stderr.strip()}")
            raise RuntimeError(f"ip netns add {ns}: {result.stderr.strip()}")
        self.namespaces.append(ns)
        _ip("-n", ns, "link", "set", "lo", "up")

    def build(self, names: list[str]) -> None:
        self._add_namespace(self.bridge_ns)
        _ip("-n", self.bridge_ns, "link", "add", "pds-br", "type", "bridge")
        _ip("-n", self.bridge_ns, "link", "set", "pds-br", "up")
        for index, name in enumerate(names, start=1):
            host = Host(name, f"{self.tag}-{name}", f"{SUBNET}.{index}", f"v-{name}"[:15])
            self._add_namespace(host.ns)
            _ip("-n", self.bridge_ns, "link", "add", host.veth, "type", "veth", "peer", "name", "eth0",
                "netns", host.ns)
            _ip("-n", self.bridge_ns, "link", "set", host.veth, "master", "pds-br")
            _ip("-n", self.bridge_ns, "link", "set", host.veth, "up")
            _ip("-n", host.ns, "addr", "add", f"{host.address}/24", "dev", "eth0")
            _ip("-n", host.ns, "link", "set", "eth0", "up")
            self.hosts[name] = host

    def spawn(self, name: str, host: str, argv: list[str]) -> Proc:
        h = self.hosts[host]
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("wb") as log:
            popen = subprocess.Popen(["ip", "netns", "exec", h.ns, *argv], stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=child_env(), start_new_session=True,
                                     preexec_fn=die_with_parent)
        proc = Proc(name, h, popen, log_path)
        self.procs.append(proc)
        return proc

    def link_bytes(self) -> dict[str, dict[str, int]]:
        """host -> bytes its link carried, as counted on the bridge side (rx: from the host)."""
        out = {}
        for name, h in self.hosts.items():
            stats = json.loads(_ip("-n", self.bridge_ns, "-s", "-j", "link", "show", h.veth).stdout)[0]["stats64"]
            out[name] = {"from_host": stats["rx"]["bytes"], "to_host": stats["tx"]["bytes"]}
        return out

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for proc in reversed(self.procs):
            if proc.alive():
                proc.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in self.procs:
            try:
                proc.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait(5)
        for ns in reversed(self.namespaces):  # hosts first; the bridge namespace (and every veth) last
            _kill_namespace_processes(ns)
            _ip("netns", "del", ns, check=False)
        left = [ns for ns in _our_namespaces() if ns.startswith(self.tag + "-")]
        if left:
            print(f"warning: namespaces left behind: {left}", file=sys.stderr)
