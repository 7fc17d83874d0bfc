"""The KV cache store with real processes on loopback: `pdserve kvstore-master` and `pdserve kvstore-node`
subprocesses, and KVStoreClients (each with its own UCXTransport and PagedKVCache) in the test.

Covers: publish then load into another pool is byte-identical; lookup gives the longest prefix;
kill -9 of a node degrades loads and stops placement on it; a restarted master rebuilds its map
from the nodes' inventories; a node lying about sizes is caught.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from pdserve import rpc
from pdserve.cluster import Proc, free_port, spawn_process
from pdserve.engine.block_hash import chain_block_hashes
from pdserve.engine.kv_cache import PagedKVCache
from pdserve.proto import kvstore_pb2 as kpb
from pdserve.proto import kvstore_pb2_grpc as kpb_grpc

# ucxx's context (and its notifier thread) is bound to the first event loop that uses it: one loop for the session.
pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(60)]

FP = b"integration-fp-0"
NUM_LAYERS, NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM = 2, 32, 16, 2, 16  # 8 KiB values
STARTUP_TIMEOUT_S = 30.0
HOST = "127.0.0.1"


@pytest.fixture(scope="session", autouse=True)
def _stop_ucxx_notifier_at_session_end():
    """ucxx's notifier thread is not a daemon: without stopping it the test process never exits."""
    yield
    from pdserve.transfer.ucx_env import import_ucxx

    import_ucxx().stop_notifier_thread()


class Store:
    """A master and nodes as subprocesses; everything started is killed by pid in stop()."""

    def __init__(self, master_args: list[str] = ()) -> None:
        self.log_dir = Path(tempfile.mkdtemp(prefix="pdserve-kvstore-"))
        self.master_port = free_port()
        self.master_address = f"{HOST}:{self.master_port}"
        self.master_args = ["--node-timeout-s", "1.5", "--heartbeat-interval-s", "0.2", *master_args]
        self.master: Proc | None = None
        self.nodes: list[Proc] = []
        self.procs: list[Proc] = []

    def _spawn(self, name: str, args: list[str], address: str) -> Proc:
        argv = [sys.executable, "-m", "pdserve", "kvstore-" + args[0], *args[1:]]
        proc = Proc(name, argv, self.log_dir / f"{name}-{len(self.procs)}.log", address)
        proc.popen = spawn_process(argv, proc.log_path)
        self.procs.append(proc)
        return proc

    def start_master(self) -> Proc:
        self.master = self._spawn("master", ["master", "--host", HOST, "--port", str(self.master_port),
                                             *self.master_args], self.master_address)
        return self.master

    def start_node(self, *extra: str) -> Proc:
        port = free_port()
        proc = self._spawn(f"node{len(self.nodes)}", ["node", "--host", HOST, "--port", str(port), "--master",
                                                      self.master_address, "--capacity-mb", "2", *extra],
                           f"{HOST}:{port}")
        self.nodes.append(proc)
        return proc

    async def wait_serving(self, procs: list[Proc]) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        for proc in procs:
            while not await rpc.is_serving(proc.address):
                if not proc.alive() or time.monotonic() > deadline:
                    raise TimeoutError(f"{proc.name} at {proc.address} not serving:\n{proc.log_tail()}")
                await asyncio.sleep(0.05)

    async def stats(self) -> kpb.MasterStats:
        async with rpc.channel(self.master_address) as ch:
            return await kpb_grpc.KVStoreMasterStub(ch).Stats(kpb.MasterStatsRequest(), timeout=5.0)

    async def wait_nodes(self, num_nodes: int, timeout_s: float = 15.0) -> kpb.MasterStats:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                stats = await self.stats()
                if len(stats.nodes) == num_nodes:
                    return stats
            except Exception:  # noqa: BLE001 - master still starting
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"master never saw {num_nodes} nodes:\n{self.master.log_tail()}")
            await asyncio.sleep(0.05)

    def kill(self, proc: Proc, sig: int = signal.SIGKILL) -> None:
        if proc.alive():
            os.kill(proc.pid, sig)
            proc.popen.wait(timeout=10)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.alive():
                os.kill(proc.pid, signal.SIGKILL)
                proc.popen.wait(timeout=10)


async def start_store(num_nodes: int, *node_args: str, master_args: list[str] = ()) -> Store:
    store = Store(master_args)
    store.start_master()
    for _ in range(num_nodes):
        store.start_node(*node_args)
    await store.wait_serving([store.master, *store.nodes])
    await store.wait_nodes(num_nodes)
    return store


class Worker:
    """What a prefill or decode worker has: a UCXTransport with its KV pool registered, and a client."""

    def __init__(self, master_address: str, seed: int) -> None:
        from pdserve.kvstore.client import KVStoreClient
        from pdserve.transfer.ucx import UCXTransport

        self.kv_cache = PagedKVCache(NUM_LAYERS, NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
        self.kv_cache.kv.copy_(torch.randn(self.kv_cache.kv.shape, generator=torch.Generator().manual_seed(seed)))
        self.agent = UCXTransport(HOST, 0, num_lanes=2, timeout_s=5.0)
        self.agent.register_buffer("kv", self.kv_cache.kv)
        self.client = KVStoreClient(master_address, self.agent, self.kv_cache, FP, timeout_s=3.0, staging_blocks=16)

    async def __aenter__(self) -> Worker:
        await self.agent.start()
        await self.client.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.client.close()
        await self.agent.close()

    def blocks(self, block_ids: list[int]) -> torch.Tensor:
        return self.kv_cache.kv[block_ids].clone()


def prompt_hashes(num_blocks: int, salt: int = 0) -> list:
    return chain_block_hashes([salt * 100_000 + t for t in range(num_blocks * BLOCK_SIZE)], BLOCK_SIZE, FP)


async def test_publish_then_load_is_byte_identical_and_lookup_gives_prefix():
    store = await start_store(2)
    try:
        async with Worker(store.master_address, seed=1) as a, Worker(store.master_address, seed=2) as b:
            hashes = prompt_hashes(6)
            src_ids = [7, 3, 4, 5, 20, 21]
            a.client.publish(hashes, src_ids)
            a.kv_cache.kv.zero_()  # the caller may reuse its blocks as soon as publish returns
            await a.client.wait_published()
            assert a.client.stats.num_published_blocks == 6 and a.client.stats.num_failures == 0
            stats = await store.stats()
            assert all(n.num_values > 0 for n in stats.nodes)  # spread over both nodes

            assert await b.client.lookup(hashes) == 6
            assert await b.client.lookup([*hashes[:3], prompt_hashes(1, salt=9)[0], *hashes[4:]]) == 3
            before = b.blocks([0, 1, 2, 3, 4, 5])
            dst_ids = [10, 11, 12, 13, 30, 31]
            assert await b.client.load(hashes, dst_ids) == 6
            reference = torch.randn(a.kv_cache.kv.shape, generator=torch.Generator().manual_seed(1))  # a's pool
            assert torch.equal(b.blocks(dst_ids), reference[src_ids])
            assert torch.equal(b.blocks([0, 1, 2, 3, 4, 5]), before)  # nothing else written

            # a prefix of the asked blocks, and a shorter block list
            assert await b.client.load([*hashes[:2], prompt_hashes(1, salt=9)[0]], [14, 15, 16]) == 2
            assert await b.client.load(hashes, [17]) == 1
            # publishing again skips what is stored
            b.client.publish(hashes[:4], [10, 11, 12, 13])
            await b.client.wait_published()
            assert b.client.stats.num_skipped_blocks == 4 and b.client.stats.num_published_blocks == 0
            stats = await store.stats()
            assert stats.num_leases == 0 and stats.num_pending_puts == 0
    finally:
        store.stop()


async def test_killed_node_degrades_loads_and_gets_no_more_placements():
    store = await start_store(2)
    try:
        async with Worker(store.master_address, seed=3) as w:
            hashes = prompt_hashes(8)
            w.client.publish(hashes, list(range(8)))
            await w.client.wait_published()
            assert w.client.stats.num_published_blocks == 8
            victim = store.nodes[1]
            store.kill(victim)  # kill -9
            n = await w.client.load(hashes, list(range(10, 18)))  # the master still lists the dead node
            assert n < 8
            assert w.client.stats.num_failures >= 1
            stats = await store.wait_nodes(1)  # declared dead after its heartbeats stop
            assert stats.num_dead_nodes == 1
            survivor = stats.nodes[0].node.address
            assert survivor == store.nodes[0].address
            assert await w.client.load(hashes, list(range(10, 18))) == n  # still degrades, never raises
            new = prompt_hashes(4, salt=1)
            w.client.publish(new, [20, 21, 22, 23])
            await w.client.wait_published()
            assert await w.client.load(new, [24, 25, 26, 27]) == 4
            assert torch.equal(w.blocks([24, 25, 26, 27]), w.blocks([20, 21, 22, 23]))
            stats = await store.stats()
            assert [n.node.address for n in stats.nodes] == [survivor]
    finally:
        store.stop()


async def test_master_restart_rebuilds_map_from_inventories():
    store = await start_store(2)
    try:
        async with Worker(store.master_address, seed=4) as w:
            hashes = prompt_hashes(6)
            w.client.publish(hashes, list(range(6)))
            await w.client.wait_published()
            store.kill(store.master)
            assert await w.client.load(hashes, list(range(10, 16))) == 0  # master down: degrade, no exception
            store.start_master()
            await store.wait_serving([store.master])
            await store.wait_nodes(2)  # nodes got NOT_FOUND and re-sent their inventories
            deadline = time.monotonic() + 10
            while await w.client.lookup(hashes) != 6:
                assert time.monotonic() < deadline, store.master.log_tail()
                await asyncio.sleep(0.05)
            assert sum(n.num_values for n in (await store.stats()).nodes) == 6
            assert await w.client.load(hashes, list(range(10, 16))) == 6
            assert torch.equal(w.blocks(list(range(10, 16))), w.blocks(list(range(6))))
    finally:
        store.stop()


async def test_node_lying_about_sizes_is_caught():
    store = await start_store(1, "--fault-lie-about-sizes")
    try:
        async with Worker(store.master_address, seed=5) as w:
            hashes = prompt_hashes(3)
            w.client.publish(hashes, [0, 1, 2])
            await w.client.wait_published()
            assert await w.client.lookup(hashes) == 3
            before = w.blocks([10, 11, 12])
            assert await w.client.load(hashes, [10, 11, 12]) == 0
            assert w.client.stats.num_bad_claims >= 1
            assert torch.equal(w.blocks([10, 11, 12]), before)  # caught before any byte moved
            assert (await store.stats()).num_leases == 0
    finally:
        store.stop()


# ---- tiers: DRAM + SSD ------------------------------------------------------------------------

SSD_ROUNDS, ROUND_BLOCKS = 12, 16  # 192 values of 8 KiB through a 1 MiB DRAM tier (128 frames)


def round_content(kv_cache: PagedKVCache, r: int) -> torch.Tensor:
    return torch.randn(kv_cache.kv.shape, generator=torch.Generator().manual_seed(1000 + r))  # [blocks, ...]


async def publish_rounds(w: Worker) -> list[list]:
    rounds = []
    for r in range(SSD_ROUNDS):
        hashes = prompt_hashes(ROUND_BLOCKS, salt=50 + r)
        w.kv_cache.kv.copy_(round_content(w.kv_cache, r))
        w.client.publish(hashes, list(range(ROUND_BLOCKS)))
        await w.client.wait_published()
        rounds.append(hashes)
    assert w.client.stats.num_published_blocks == SSD_ROUNDS * ROUND_BLOCKS and w.client.stats.num_failures == 0
    return rounds


async def node_stats(proc: Proc) -> kpb.NodeStats:
    async with rpc.channel(proc.address) as ch:
        return await kpb_grpc.KVStoreNodeStub(ch).Stats(kpb.NodeStatsRequest(), timeout=5.0)


async def test_both_tiers_under_eviction_pressure_serve_identical_bytes(tmp_path):
    store = await start_store(1, "--capacity-mb", "1", "--ssd-dir", str(tmp_path), "--ssd-mb", "4",
                              "--ssd-batch-blocks", "8")
    try:
        stats = await store.wait_nodes(1)
        assert stats.nodes[0].node.ssd_bytes == 4 * 2**20
        async with Worker(store.master_address, seed=5) as w:
            rounds = await publish_rounds(w)
            tiers = (await node_stats(store.nodes[0])).tiers
            assert tiers.dram.num_slots == 128 and tiers.ssd.num_slots == 512
            assert tiers.ssd.num_values > 0 and tiers.dram.num_evictions == tiers.ssd.num_values
            assert tiers.dram.num_values + tiers.ssd.num_values == SSD_ROUNDS * ROUND_BLOCKS  # nothing dropped
            for r in (0, 5, SSD_ROUNDS - 1, 0):  # oldest first: from SSD, promoted; then the newest from DRAM
                w.kv_cache.kv.zero_()
                assert await w.client.load(rounds[r], list(range(ROUND_BLOCKS))) == ROUND_BLOCKS
                expected = round_content(w.kv_cache, r)[:ROUND_BLOCKS]
                assert torch.equal(w.blocks(list(range(ROUND_BLOCKS))), expected), f"round {r}"
            tiers = (await node_stats(store.nodes[0])).tiers
            assert tiers.ssd.num_hits >= ROUND_BLOCKS and tiers.num_promotions >= ROUND_BLOCKS
            assert tiers.dram.num_hits >= ROUND_BLOCKS and tiers.num_corrupt_reads == 0
            assert tiers.ssd.bytes_written > 0 and tiers.ssd.bytes_read >= ROUND_BLOCKS * w.client.value_nbytes
            master_view = (await store.stats()).nodes[0].tiers  # heartbeats carry the tiers to the master
            assert master_view.ssd.num_slots == 512

            # bytes changed on the disk under a value are caught by its checksum: dropped, never served
            pool_file = next(tmp_path.glob("*.kvpool"))
            with open(pool_file, "r+b") as f:
                f.write(os.urandom(pool_file.stat().st_size))
            w.kv_cache.kv.zero_()
            got = await w.client.load(rounds[2], list(range(ROUND_BLOCKS)))
            assert got < ROUND_BLOCKS
            expected = round_content(w.kv_cache, 2)[:got]
            assert torch.equal(w.blocks(list(range(got))), expected)  # whatever did load is right
            assert (await node_stats(store.nodes[0])).tiers.num_corrupt_reads >= 1
    finally:
        store.stop()


async def test_ssd_tier_is_discarded_when_a_node_restarts(tmp_path):
    store = await start_store(1, "--node-id", "tiered", "--capacity-mb", "1", "--ssd-dir", str(tmp_path),
                              "--ssd-mb", "4")
    try:
        async with Worker(store.master_address, seed=6) as w:
            rounds = await publish_rounds(w)
            assert (await node_stats(store.nodes[0])).tiers.ssd.num_values > 0
            store.kill(store.nodes[0])  # kill -9, possibly mid-write: nothing of the old file is ever read
            await store.wait_nodes(0)
            store.start_node("--node-id", "tiered", "--capacity-mb", "1", "--ssd-dir", str(tmp_path), "--ssd-mb", "4")
            await store.wait_serving(store.nodes[-1:])
            await store.wait_nodes(1)
            assert await w.client.lookup(rounds[0]) == 0 and await w.client.load(rounds[0], [0]) == 0
            tiers = (await node_stats(store.nodes[-1])).tiers
            assert tiers.ssd.num_slots == 0 or tiers.ssd.num_values == 0
            assert next(tmp_path.glob("*.kvpool")).stat().st_size == 4 * 2**20  # reserved anew
    finally:
        store.stop()


async def test_unusable_ssd_directory_leaves_a_dram_only_node(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    store = await start_store(1, "--capacity-mb", "1", "--ssd-dir", str(blocker / "ssd"))
    try:
        stats = await store.wait_nodes(1)
        assert stats.nodes[0].node.ssd_bytes == 0
        async with Worker(store.master_address, seed=7) as w:
            hashes = prompt_hashes(4, salt=77)
            w.client.publish(hashes, [0, 1, 2, 3])
            await w.client.wait_published()
            assert await w.client.load(hashes, [4, 5, 6, 7]) == 4
            tiers = (await node_stats(store.nodes[0])).tiers
            assert tiers.ssd.num_slots == 0 and "cannot reserve" in tiers.ssd.off_reason
        log = store.nodes[0].log_path.read_text()
        assert log.count("SSD tier off") == 1
    finally:
        store.stop()


async def test_finish_read_ends_the_read_token():
    """After FinishRead (the reader is done) the node refuses any further pull under that token, so nobody can read
    frames the node has since reused; the connection that served the read keeps working."""
    from pdserve.kvstore.messages import location_from_pb, value_to_pb
    from pdserve.kvstore.values import StoredValue
    from pdserve.transfer.base import TransferRejected

    store = await start_store(1)
    try:
        async with Worker(store.master_address, seed=5) as w:
            hashes = prompt_hashes(2, salt=7)
            w.client.publish(hashes, [0, 1])
            await w.client.wait_published()
            async with rpc.channel(store.master_address) as mch:
                got = await kpb_grpc.KVStoreMasterStub(mch).GetStart(
                    kpb.GetStartRequest(keys=hashes, model_fingerprint=FP), timeout=5)
            locations = [location_from_pb(loc) for loc in got.locations]
            node = locations[0].node
            values = [value_to_pb(StoredValue(loc.key, loc.offset, loc.meta)) for loc in locations]
            nbytes = locations[0].meta.nbytes
            async with rpc.channel(node.address) as nch:
                stub = kpb_grpc.KVStoreNodeStub(nch)
                read = await stub.PrepareRead(kpb.PrepareReadRequest(values=values, timeout_s=30), timeout=5)
                dst = w.kv_cache.regions([5])
                src = [(read.offsets[0], nbytes)]
                assert await w.agent.pull(node.transfer_address, bytes(read.token), "kv", dst, src) == nbytes
                await stub.FinishRead(kpb.FinishReadRequest(token=read.token), timeout=5)
                with pytest.raises(TransferRejected):
                    await w.agent.pull(node.transfer_address, bytes(read.token), "kv", dst, src)
                again = await stub.PrepareRead(kpb.PrepareReadRequest(values=values, timeout_s=30), timeout=5)
                assert await w.agent.pull(node.transfer_address, bytes(again.token), "kv", dst, src) == nbytes
                await stub.FinishRead(kpb.FinishReadRequest(token=again.token), timeout=5)
            async with rpc.channel(store.master_address) as mch:
                await kpb_grpc.KVStoreMasterStub(mch).GetDone(kpb.GetDoneRequest(lease_id=got.lease_id), timeout=5)
    finally:
        store.stop()
