"""Membership against a real etcd process (Debian's etcd-server): a registered key vanishes when
its holder stops refreshing (lease expiry), a watcher keeps its last membership while etcd is down
and re-reads it when etcd is back, a registration survives an etcd restart, two candidates never
both lead, and an unreachable etcd is a clear error naming its address."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

from pdserve.cluster import Cluster, ClusterSpec
from pdserve.errors import PeerUnavailable
from pdserve.membership import Election, Etcd, EtcdConfig, host_port

TTL_S = 2.0


@pytest.fixture
def etcd_cluster(etcd_binary, tmp_path):
    """An etcd server started the way `pdserve up --etcd` starts it."""
    cluster = Cluster(ClusterSpec(log_dir=str(tmp_path)))
    cluster.start_etcd()
    try:
        asyncio.run(cluster.wait_etcd(30))
        yield cluster
    finally:
        cluster.stop(timeout_s=5)


async def _until(predicate, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.05)


def test_lease_expiry_removes_a_dead_registration_and_restart_keeps_a_live_one(etcd_cluster):
    config = EtcdConfig(etcd=etcd_cluster.etcd_url, etcd_prefix="/t", etcd_ttl_s=TTL_S)

    async def main() -> None:
        holder, alive, watcher = Etcd(config), Etcd(config), Etcd(config)
        for e in (holder, alive, watcher):
            await e.connect()
        seen: dict[str, bytes] = {}
        watcher.watch(config.key("workers") + "/", lambda k, v: seen.__setitem__(k, v), lambda k: seen.pop(k, None))
        holder.register(config.key("workers", "w1"), lambda: b"one")
        alive.register(config.key("workers", "w2"), lambda: b"two")
        await _until(lambda: seen == {"/t/workers/w1": b"one", "/t/workers/w2": b"two"})
        for task in holder._tasks:  # w1's process "dies": no more refreshes, no revoke
            task.cancel()
        await _until(lambda: "/t/workers/w1" not in seen)
        assert seen == {"/t/workers/w2": b"two"}

        etcd_cluster.kill("etcd", signal.SIGKILL)  # etcd down: the watcher keeps what it knew
        await asyncio.sleep(TTL_S)
        assert seen == {"/t/workers/w2": b"two"}
        etcd_cluster.respawn("etcd")
        await etcd_cluster.wait_etcd(30)
        await asyncio.sleep(2 * TTL_S)  # past the TTL: w2 kept (or re-made) its registration
        assert seen == {"/t/workers/w2": b"two"}
        for e in (holder, alive, watcher):
            await e.close()

    asyncio.run(main())


def test_two_candidates_never_both_lead_and_a_standby_takes_over(etcd_cluster):
    config = EtcdConfig(etcd=etcd_cluster.etcd_url, etcd_prefix="/t", etcd_ttl_s=TTL_S)

    async def main() -> None:
        a, b = Etcd(config), Etcd(config)
        await a.connect()
        await b.connect()
        events: list[str] = []

        async def note(what: str) -> None:
            events.append(what)

        ea = Election(a, config.key("leader"), b"a", lambda: note("a leads"), lambda: note("a lost"))
        eb = Election(b, config.key("leader"), b"b", lambda: note("b leads"), lambda: note("b lost"))
        ea.start()
        await _until(lambda: events == ["a leads"])
        eb.start()
        await asyncio.sleep(2 * TTL_S)
        assert events == ["a leads"] and not eb.leading  # b stands by while a refreshes
        for task in a._tasks:  # a dies
            task.cancel()
        await _until(lambda: "b leads" in events)
        assert events == ["a leads", "b leads"]
        await b.close()
        await a.client.close()

    asyncio.run(main())


def test_unreachable_etcd_names_its_address():
    from pdserve.cluster import free_port

    url = f"http://127.0.0.1:{free_port()}"

    async def main() -> None:
        etcd = Etcd(EtcdConfig(etcd=url, etcd_wait_s=0.5))
        with pytest.raises(PeerUnavailable, match=f"etcd at {url} is unreachable"):
            await etcd.connect()
        await etcd.close()

    asyncio.run(main())


def test_config_checks():
    assert host_port("http://10.0.0.1:2379") == ("10.0.0.1", 2379)
    assert host_port("etcd:2379") == ("etcd", 2379)
    with pytest.raises(ValueError, match="expected http://host:port"):
        EtcdConfig(etcd="http://etcd")
    with pytest.raises(ValueError):
        EtcdConfig(etcd_ttl_s=1)
