"""Membership through etcd (v3 API, the `aetcd` asyncio client): a process keeps a key alive under
a lease, a watcher lists a prefix and follows its changes, and store masters elect a leader.

Key layout (under `--etcd-prefix`, default /pdserve):

    <prefix>/workers/<worker_id>        WorkerInfo (protobuf), lease of the worker      routers watch these
    <prefix>/kvstore/nodes/<node_id>    node gRPC address, lease of the node            informational
    <prefix>/kvstore/masters/<address>  master gRPC address, lease of the master        every master, leader or not
    <prefix>/kvstore/leader             address of the leading master, its lease        created only when absent

A lease's TTL (`--etcd-ttl-s`, 10 s) is refreshed every third of it; when a process dies its keys
vanish at the TTL. When etcd is unreachable a process keeps serving: a registered key is put again
under a new lease once etcd answers (after an etcd restart everyone re-registers), and a watcher
keeps the last membership it saw until it can list again. Does not own what the keys mean: the
router's registry, the store master and the worker runtime decide that.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aetcd
import grpc

from pdserve.errors import PeerUnavailable

logger = logging.getLogger(__name__)

OnPut = Callable[[str, bytes], Awaitable[None] | None]
OnDelete = Callable[[str], Awaitable[None] | None]


def _h(text: str, **extra) -> dict:
    return {"help": text, **extra}


@dataclass(frozen=True, slots=True)
class EtcdConfig:
    """The etcd flags every component shares (`--etcd` empty: no etcd, direct registration)."""

    etcd: str = field(default="", metadata=_h(
        "etcd address http://host:port: register under a lease and discover peers there (empty: no etcd)",
        metavar="URL"))
    etcd_prefix: str = field(default="/pdserve", metadata=_h("key prefix of this cluster in etcd"))
    etcd_ttl_s: float = field(default=10.0, metadata=_h(
        "lease TTL in seconds: a process that stops refreshing vanishes from etcd this long after"))
    etcd_wait_s: float = field(default=10.0, metadata=_h(
        "at start-up, wait this long for etcd to answer, then fail naming its address"))

    def __post_init__(self) -> None:
        if self.etcd:
            host_port(self.etcd)
        if self.etcd_ttl_s < 2:
            raise ValueError("etcd_ttl_s must be >= 2")
        if not self.etcd_prefix.startswith("/"):
            raise ValueError("etcd_prefix must start with /")
        if self.etcd_wait_s < 0:
            raise ValueError("etcd_wait_s must be >= 0")

    def key(self, *parts: str) -> str:
        return "/".join([self.etcd_prefix.rstrip("/"), *parts])


def host_port(url: str) -> tuple[str, int]:
    """("127.0.0.1", 2379) from "http://127.0.0.1:2379" or "127.0.0.1:2379"."""
    rest = url.split("://", 1)[-1].rstrip("/")
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"etcd address {url!r}: expected http://host:port or host:port")
    return host, int(port)


async def _maybe_await(value) -> None:
    if asyncio.iscoroutine(value):
        await value


_ETCD_ERRORS = (aetcd.exceptions.ClientError, grpc.aio.AioRpcError, asyncio.TimeoutError, OSError)


class Etcd:
    """One connection to etcd shared by a process's registrations, watches and elections."""

    def __init__(self, config: EtcdConfig) -> None:
        assert config.etcd, "no etcd address"
        self.config = config
        host, port = host_port(config.etcd)
        self.client = aetcd.Client(host, port, timeout=max(2, int(config.etcd_ttl_s / 3)))
        self._tasks: list[asyncio.Task] = []
        self._leases: set[int] = set()  # leases of this process's registrations, revoked at close
        self._changed: dict[str, asyncio.Event] = {}  # registered key -> set when its value changed

    async def connect(self) -> None:
        """Wait (bounded by `connect_timeout_s`) until etcd answers; PeerUnavailable naming it otherwise."""
        deadline = time.monotonic() + self.config.etcd_wait_s
        while True:
            try:
                await self.client.get(self.config.key("ping").encode())
                return
            except _ETCD_ERRORS as exc:
                if time.monotonic() > deadline:
                    raise PeerUnavailable(f"etcd at {self.config.etcd} is unreachable after "
                                          f"{self.config.etcd_wait_s:.0f} s: {exc}") from exc
            await asyncio.sleep(0.2)

    async def close(self, timeout_s: float = 3.0) -> None:
        """Stop every background task and revoke this process's leases (its keys vanish at once).
        Bounded: with etcd gone or reconnecting, the leases expire by themselves."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            await asyncio.wait_for(self._revoke_and_close(), timeout_s)
        except asyncio.TimeoutError:
            logger.warning("etcd at %s: close timed out; this process's leases expire by themselves", self.config.etcd)

    async def _revoke_and_close(self) -> None:
        for lease_id in self._leases:
            try:
                await asyncio.wait_for(self.client.revoke_lease(lease_id), 1.0)
            except _ETCD_ERRORS:
                pass  # the lease expires by itself
        await self.client.close()

    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self._tasks.append(task)
        return task

    async def grant(self, ttl_s: float | None = None) -> int:
        lease_id = (await self.client.lease(int(ttl_s or self.config.etcd_ttl_s))).id
        self._leases.add(lease_id)
        return lease_id

    async def refresh(self, lease_id: int) -> bool:
        """True while the lease lives (False: it expired, e.g. etcd was down longer than the TTL)."""
        reply = await self.client.refresh_lease(lease_id)
        return reply is not None and reply.TTL > 0

    # ---- registration --------------------------------------------------------------------------
    def register(self, key: str, value: Callable[[], bytes]) -> asyncio.Task:
        """Keep `key` = value() alive under a lease of this process, in the background, until close."""
        self._changed[key] = asyncio.Event()
        return self.spawn(self._keep_registered(key, value))

    def changed(self, key: str) -> None:
        """A registered key's value() changed: put it again now (not at the next refresh)."""
        if key in self._changed:
            self._changed[key].set()

    async def _keep_registered(self, key: str, value: Callable[[], bytes]) -> None:
        interval_s = self.config.etcd_ttl_s / 3
        lease_id = 0
        changed = self._changed[key]
        while True:
            failed = False
            try:
                if lease_id and changed.is_set():
                    await self.client.put(key.encode(), value(), lease=lease_id)
                    changed.clear()
                if not lease_id:
                    lease_id = await self.grant()
                    await self.client.put(key.encode(), value(), lease=lease_id)
                    changed.clear()
                    logger.info("registered %s in etcd (lease %x, TTL %.0f s)", key, lease_id, self.config.etcd_ttl_s)
                elif not await self.refresh(lease_id):
                    logger.warning("etcd lease of %s expired: registering again", key)
                    self._leases.discard(lease_id)
                    lease_id = 0
                    continue
            except _ETCD_ERRORS as exc:
                logger.warning("etcd at %s: %s; %s stays registered until its lease expires", self.config.etcd,
                               str(exc).splitlines()[0] if str(exc) else type(exc).__name__, key)
                failed = True
            if failed:  # a change waits for etcd like everything else
                await asyncio.sleep(interval_s)
                continue
            try:
                await asyncio.wait_for(changed.wait(), interval_s)
            except asyncio.TimeoutError:
                pass

    # ---- discovery -----------------------------------------------------------------------------
    def watch(self, prefix: str, on_put: OnPut, on_delete: OnDelete) -> asyncio.Task:
        """List `prefix`, then follow it: on_put(key, value) for each key present or put, on_delete(key)
        for each removed (lease expiry included). When etcd goes away the last membership stays; when
        it answers again the list is read afresh and what vanished meanwhile is deleted."""
        return self.spawn(self._watch(prefix, on_put, on_delete))

    async def _watch(self, prefix: str, on_put: OnPut, on_delete: OnDelete) -> None:
        known: set[str] = set()
        warned = False
        while True:
            try:
                listing = await self.client.get_prefix(prefix.encode())
                present = {kv.key.decode(): kv.value for kv in listing}
                for key in sorted(known - set(present)):
                    await _maybe_await(on_delete(key))
                for key, value in present.items():
                    await _maybe_await(on_put(key, value))
                known = set(present)
                warned = False
                watch = await self.client.watch_prefix(prefix.encode(), start_revision=listing.header.revision + 1)
                async for event in watch:
                    key = event.kv.key.decode()
                    if event.kind == aetcd.EventKind.PUT:
                        known.add(key)
                        await _maybe_await(on_put(key, event.kv.value))
                    else:
                        known.discard(key)
                        await _maybe_await(on_delete(key))
            except _ETCD_ERRORS as exc:
                if not warned:
                    logger.warning("etcd watch of %s lost (%s): keeping the last membership (%d keys)", prefix,
                                   str(exc).splitlines()[0] if str(exc) else type(exc).__name__, len(known))
                    warned = True
            await asyncio.sleep(0.5)


class Election:
    """Leader election on one key: the winner holds it under its own lease (created only when absent,
    so two candidates never both win) and checks on every refresh that the key is still its own
    (fencing); it steps down (on_lose) as soon as a refresh fails or finds another value there, no
    later than the lease's TTL, when etcd would give the key to someone else."""

    def __init__(self, etcd: Etcd, key: str, value: bytes, on_win: Callable[[], Awaitable[None]],
                 on_lose: Callable[[], Awaitable[None]], ttl_s: float | None = None) -> None:
        self.etcd = etcd
        self.ttl_s = ttl_s or etcd.config.etcd_ttl_s  # a standby takes over at most this long after a leader dies
        self.key = key
        self.value = value
        self.on_win = on_win
        self.on_lose = on_lose
        self.leading = False
        self._transition: asyncio.Task | None = None  # on_win, running beside the refreshes

    def start(self) -> asyncio.Task:
        return self.etcd.spawn(self._run())

    async def _campaign(self) -> int:
        """A lease id when this candidate now holds the key, else 0."""
        c = self.etcd.client
        lease_id = await self.etcd.grant(self.ttl_s)
        won, _ = await c.transaction(compare=[c.transactions.create(self.key.encode()) == 0],
                                     success=[c.transactions.put(self.key.encode(), self.value, lease=lease_id)],
                                     failure=[])
        if not won:
            self.etcd._leases.discard(lease_id)
            await c.revoke_lease(lease_id)
            return 0
        return lease_id

    async def _still_mine(self, lease_id: int) -> bool:
        if not await self.etcd.refresh(lease_id):
            return False
        got = await self.etcd.client.get(self.key.encode())
        return got is not None and got.value == self.value and got.lease == lease_id

    async def _run(self) -> None:
        ttl_s = self.ttl_s
        lease_id = 0
        last_ok = 0.0
        while True:
            try:
                if not self.leading:
                    lease_id = await self._campaign()
                    if lease_id:
                        self.leading, last_ok = True, time.monotonic()
                        logger.info("won the election for %s (lease %x)", self.key, lease_id)
                        # on_win runs beside the refreshes: a slow start must not let the lease lapse.
                        self._transition = asyncio.create_task(self.on_win())
                elif await self._still_mine(lease_id):
                    last_ok = time.monotonic()
                else:
                    await self._step_down("the key is no longer held by this lease")
            except _ETCD_ERRORS as exc:
                # Fencing: without a refresh for 2/3 of the TTL, another candidate may win soon.
                if self.leading and time.monotonic() - last_ok > ttl_s * 2 / 3:
                    await self._step_down(f"etcd unreachable ({type(exc).__name__})")
            await asyncio.sleep(ttl_s / 6 if self.leading else 0.5)

    async def _step_down(self, why: str) -> None:
        logger.warning("stepping down as leader of %s: %s", self.key, why)
        self.leading = False
        if self._transition is not None:
            await asyncio.gather(self._transition, return_exceptions=True)
            self._transition = None
        await self.on_lose()

    async def resign(self) -> None:
        """Graceful stop: give the key up at once so a standby need not wait for the TTL."""
        if self._transition is not None:
            await asyncio.gather(self._transition, return_exceptions=True)
        if self.leading:
            self.leading = False
            try:
                await asyncio.wait_for(self.etcd.client.delete(self.key.encode()), 1.0)
            except _ETCD_ERRORS:
                pass
