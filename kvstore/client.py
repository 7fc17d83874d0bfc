"""KVStoreClient: what prefill and decode workers use to find, load and publish KV blocks in the store.

A stored value is one block's KV for all layers, `[num_layers, 2 (K, V), block_size, num_kv_heads,
head_dim]` in the pool's dtype, C order: exactly block b of the block-major pool (`kv[b]`, one
contiguous region, `KVCacheLayout.block_nbytes`), so values move between a worker's pool and a node
slot without any reshaping copy, and adjacent blocks move as one region. Loads pull straight into the worker's pool; publishes copy into a
registered staging buffer first (so the caller may reuse its blocks at once) and push from there.

Store faults never reach the caller: a miss, a dead node, a timeout or a node whose claims do not
match the master's metadata all degrade to fewer blocks (the caller recomputes them).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
import torch

from pdserve import rpc
from pdserve.engine.block_hash import BlockHash
from pdserve.engine.kv_cache import PagedKVCache
from pdserve.proto import kvstore_pb2 as kpb
from pdserve.proto import kvstore_pb2_grpc as kpb_grpc
from pdserve.transfer.base import KVTransport

from .values import Location, StoredValue, ValueMeta, num_dram_slots
from .messages import location_from_pb, meta_to_pb, value_from_pb, value_to_pb

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class KVStoreClientStats:
    num_lookups: int = 0
    num_hit_blocks: int = 0  # blocks load() placed in the pool
    num_miss_blocks: int = 0  # blocks load() was asked for but did not place
    bytes_loaded: int = 0
    num_published_blocks: int = 0  # copies committed by background puts
    num_skipped_blocks: int = 0  # already stored (or being stored)
    num_dropped_blocks: int = 0  # staging full, or no room in the store
    bytes_published: int = 0
    num_failures: int = 0  # store faults absorbed (master or node unreachable, timeouts, rejected transfers)
    num_bad_claims: int = 0  # a node claimed something other than what the master recorded


@dataclass(frozen=True, slots=True)
class StagedBlocks:
    """Blocks copied into the client's staging buffer, waiting for `put_staged`."""

    hashes: tuple[BlockHash, ...]
    slots: tuple[int, ...]  # staging slots holding them, in the same order


class KVStoreClient:
    def __init__(self, master_address: str, transport: KVTransport, kv_cache: PagedKVCache, fingerprint: bytes, *,
                 buffer_name: str = "kv", timeout_s: float = 5.0, staging_blocks: int = 256) -> None:
        if timeout_s <= 0 or staging_blocks < 1:
            raise ValueError("timeout_s must be > 0 and staging_blocks >= 1")
        self.master_address = master_address
        self.transport = transport
        self.kv_cache = kv_cache
        self.fingerprint = fingerprint
        self.buffer_name = buffer_name
        self.timeout_s = timeout_s
        self.stats = KVStoreClientStats()
        layout = kv_cache.layout()
        # a stored value is one whole block of the block-major pool: [num_layers, 2, block_size, nkv, head_dim]
        shape = layout.shape[1:]
        self.value_nbytes = layout.block_nbytes
        self.meta = ValueMeta(self.value_nbytes, layout.dtype, shape, fingerprint)
        # staging: [staging_blocks, num_layers, 2, block_size, num_kv_heads, head_dim] on the host
        self._staging = torch.empty((staging_blocks, *shape), dtype=kv_cache.kv.dtype)
        self._staging_name = f"{buffer_name}-kvstore-staging"
        self._free_staging = list(reversed(range(staging_blocks)))
        # `stage` may run on the engine thread (decode's generated blocks) while puts free slots on the loop
        self._staging_lock = threading.Lock()
        self._tasks: set[asyncio.Task] = set()
        self._master: grpc.aio.Channel | None = None
        self._master_stub: kpb_grpc.KVStoreMasterStub | None = None
        self._node_channels: dict[str, grpc.aio.Channel] = {}  # node gRPC address -> channel

    async def start(self) -> None:
        self.transport.register_buffer(self._staging_name, self._staging)
        self._master = rpc.channel(self.master_address)
        self._master_stub = kpb_grpc.KVStoreMasterStub(self._master)

    async def wait_published(self, timeout_s: float | None = None) -> None:
        """Waits (bounded) until the background puts started so far have finished."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=self.timeout_s if timeout_s is None else timeout_s)

    async def close(self) -> None:
        await self.wait_published()  # let background puts finish (each is bounded by timeouts), then stop
        for task in list(self._tasks):
            task.cancel()
        for channel in [self._master, *self._node_channels.values()]:
            if channel is not None:
                await channel.close()
        self._node_channels.clear()
        self.transport.unregister_buffer(self._staging_name)

    def _node(self, address: str) -> kpb_grpc.KVStoreNodeStub:
        channel = self._node_channels.get(address)
        if channel is None:
            channel = self._node_channels[address] = rpc.channel(address)
        return kpb_grpc.KVStoreNodeStub(channel)

    def _remaining(self, deadline: float) -> float:
        return max(0.01, deadline - asyncio.get_running_loop().time())


    # ---- lookup / load ---------------------------------------------------------------------------
    async def lookup(self, hashes: list[BlockHash]) -> int:
        """Number of leading blocks stored (0 when the store is unreachable)."""
        self.stats.num_lookups += 1
        if not hashes:
            return 0
        try:
            resp = await self._master_stub.BatchLookup(kpb.BatchLookupRequest(
                keys=hashes, model_fingerprint=self.fingerprint), timeout=self.timeout_s)
            return resp.num_stored_prefix
        except grpc.aio.AioRpcError as exc:
            self.stats.num_failures += 1
            logger.warning("kvstore lookup failed: %s", rpc.typed_error(exc, self.master_address))
            return 0

    async def load(self, hashes: list[BlockHash], block_ids: list[int]) -> int:
        """Pulls the leading stored blocks into `block_ids`; returns how many leading blocks landed."""
        n = min(len(hashes), len(block_ids))
        if n == 0:
            return 0
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        lease_id = ""
        num_loaded = 0
        try:
            resp = await self._master_stub.GetStart(kpb.GetStartRequest(
                keys=hashes[:n], model_fingerprint=self.fingerprint), timeout=self._remaining(deadline))
            lease_id = resp.lease_id
            locations = self._checked_prefix(hashes[:n], [location_from_pb(loc) for loc in resp.locations])
            by_node: dict[str, list[tuple[int, Location]]] = defaultdict(list)
            for i, loc in enumerate(locations):
                by_node[loc.node.node_id].append((i, loc))
            results = await asyncio.gather(*(self._read_from_node(items, block_ids, deadline)
                                             for items in by_node.values()), return_exceptions=True)
            landed: set[int] = set()
            for items, result in zip(by_node.values(), results):
                if isinstance(result, BaseException):
                    self.stats.num_failures += 1
                    logger.warning("kvstore read of %d blocks from %s failed: %s", len(items),
                                   items[0][1].node.address, result)
                else:
                    landed.update(result)
            while num_loaded in landed:
                num_loaded += 1
        except grpc.aio.AioRpcError as exc:
            self.stats.num_failures += 1
            logger.warning("kvstore get failed: %s", rpc.typed_error(exc, self.master_address))
        except Exception:  # noqa: BLE001 - load never raises for store faults: the caller recomputes
            self.stats.num_failures += 1
            logger.exception("kvstore load failed")
        finally:
            if lease_id:
                await self._release(lease_id)
        self.stats.num_hit_blocks += num_loaded
        self.stats.num_miss_blocks += n - num_loaded
        self.stats.bytes_loaded += num_loaded * self.value_nbytes
        return num_loaded

    def _checked_prefix(self, hashes: Sequence[BlockHash], locations: list[Location]) -> list[Location]:
        """The leading locations that are the asked keys with exactly our value layout."""
        out: list[Location] = []
        for key, loc in zip(hashes, locations):
            if loc.key != key or loc.meta != self.meta:
                self.stats.num_bad_claims += 1
                logger.warning("kvstore master lists %s as %s, expected %s", key.hex(), loc.meta, self.meta)
                break
            out.append(loc)
        return out

    async def _read_from_node(self, items: list[tuple[int, Location]], block_ids: list[int],
                              deadline: float) -> list[int]:
        """Pulls the node's values for `items` (index, location); returns the indices that landed."""
        node = items[0][1].node
        asked = [StoredValue(loc.key, loc.offset, loc.meta) for _, loc in items]
        resp = await self._node(node.address).PrepareRead(kpb.PrepareReadRequest(
            values=[value_to_pb(v) for v in asked], timeout_s=self._remaining(deadline)),
            timeout=self._remaining(deadline))
        if len(resp.values) != len(asked) or len(resp.offsets) != len(asked):
            self.stats.num_bad_claims += 1
            raise ValueError(f"node {node.node_id} answered {len(resp.values)} claims and {len(resp.offsets)} "
                             f"offsets for {len(asked)} values")
        good: list[tuple[int, int]] = []  # (index in items' prompt, offset to read it at in the node's buffer)
        for (i, _), want, raw, offset in zip(items, asked, resp.values, resp.offsets):
            if not raw.key:
                break  # evicted or lost since the master looked: the prefix ends here
            claim = value_from_pb(raw)
            if claim != want:
                self.stats.num_bad_claims += 1
                logger.warning("kvstore node %s claims %s for %s: ignoring its values", node.node_id, claim, want)
                break
            good.append((i, offset))
        if not good:
            if resp.token:
                self._spawn(self._finish_read(node.address, bytes(resp.token)))
            return []
        src = [(offset, self.value_nbytes) for _, offset in good]
        dst = self.kv_cache.regions([block_ids[i] for i, _ in good])  # one region per run of adjacent blocks
        try:
            await self.transport.pull(node.transfer_address, bytes(resp.token), self.buffer_name, dst, src,
                                      timeout_s=self._remaining(deadline))
        finally:  # the node frees the frames it pinned for us now, not at the token's deadline
            self._spawn(self._finish_read(node.address, bytes(resp.token)))
        return [i for i, _ in good]

    async def _finish_read(self, address: str, token: bytes) -> None:
        try:
            await self._node(address).FinishRead(kpb.FinishReadRequest(token=token), timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:  # the token expires by itself
            logger.debug("kvstore FinishRead on %s failed: %s", address, exc.code().name)

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _release(self, lease_id: str) -> None:
        try:
            await self._master_stub.GetDone(kpb.GetDoneRequest(lease_id=lease_id), timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:  # the lease expires by itself
            logger.info("kvstore lease release failed: %s", exc.code().name)

    # ---- publish ---------------------------------------------------------------------------------
    def publish(self, hashes: list[BlockHash], block_ids: list[int]) -> None:
        """Copies the blocks into staging now, stores them in the background; never raises.

        Call it from the event loop thread. Blocks beyond free staging space are dropped.
        """
        staged = self.stage(hashes, block_ids)
        if staged is not None:
            self.put_staged(staged)

    def stage(self, hashes: list[BlockHash], block_ids: list[int]) -> StagedBlocks | None:
        """Copies the blocks into free staging slots now (any thread; the blocks may be reused as soon as it
        returns); blocks beyond free staging space are dropped. None when nothing was staged; never raises."""
        slots: list[int] = []
        try:
            with self._staging_lock:
                n = min(len(hashes), len(block_ids), len(self._free_staging))
                self.stats.num_dropped_blocks += min(len(hashes), len(block_ids)) - n
                slots = [self._free_staging.pop() for _ in range(n)]
            if not slots:
                return None
            src = self.kv_cache.read_blocks(block_ids[:n])  # [n, L, 2, bs, H, D]: already the stored layout
            self._staging.index_copy_(0, torch.tensor(slots), src.to("cpu"))
            return StagedBlocks(tuple(hashes[:n]), tuple(slots))
        except Exception:  # noqa: BLE001 - publishing is best effort
            self._free_slots(slots)
            self.stats.num_failures += 1
            logger.exception("kvstore publish failed")
            return None

    def put_staged(self, staged: StagedBlocks) -> asyncio.Task:
        """Stores staged blocks in the background (event loop thread); the task never raises."""
        task = asyncio.get_running_loop().create_task(self._put(list(staged.hashes), list(staged.slots)))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _free_slots(self, slots: list[int]) -> None:
        with self._staging_lock:
            self._free_staging.extend(slots)

    async def _put(self, hashes: list[BlockHash], slots: list[int]) -> None:
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        put_id = ""
        committed = False
        try:
            resp = await self._master_stub.PutStart(kpb.PutStartRequest(keys=hashes, meta=meta_to_pb(self.meta)),
                                                    timeout=self._remaining(deadline))
            put_id = resp.put_id
            self.stats.num_skipped_blocks += len(resp.already_stored)
            self.stats.num_dropped_blocks += len(resp.refused)
            slot_of = dict(zip(hashes, slots))
            by_node: dict[str, list[tuple[Location, int]]] = defaultdict(list)
            for copies in resp.placements:
                for loc in map(location_from_pb, copies.copies):
                    if loc.meta != self.meta or loc.key not in slot_of:
                        raise ValueError(f"master placed {loc.key.hex()} as {loc.meta}, expected {self.meta}")
                    by_node[loc.node.node_id].append((loc, slot_of[loc.key]))
            if not put_id:
                return
            results = await asyncio.gather(*(self._write_to_node(items, deadline) for items in by_node.values()),
                                           return_exceptions=True)
            failed = []
            for node_id, items, result in zip(by_node, by_node.values(), results):
                if isinstance(result, BaseException):
                    failed.append(node_id)
                    self.stats.num_failures += 1
                    logger.warning("kvstore write of %d blocks to %s failed: %s", len(items),
                                   items[0][0].node.address, result)
            commit = await self._master_stub.PutCommit(kpb.PutCommitRequest(put_id=put_id, failed_node_ids=failed),
                                                       timeout=self._remaining(deadline))
            committed = True
            self.stats.num_published_blocks += commit.num_committed
            self.stats.bytes_published += commit.num_committed * self.value_nbytes
        except grpc.aio.AioRpcError as exc:
            self.stats.num_failures += 1
            logger.warning("kvstore put failed: %s", rpc.typed_error(exc, self.master_address))
        except Exception:  # noqa: BLE001 - background, best effort
            self.stats.num_failures += 1
            logger.exception("kvstore put failed")
        finally:
            self._free_slots(slots)
            if put_id and not committed:
                try:
                    await self._master_stub.PutAbort(kpb.PutAbortRequest(put_id=put_id), timeout=self.timeout_s)
                except grpc.aio.AioRpcError:
                    pass  # the master frees uncommitted slots after put_timeout_s anyway

    async def _write_to_node(self, items: list[tuple[Location, int]], deadline: float) -> None:
        """In pieces of at most half the node's DRAM tier: a write must fit in DRAM frames while it lands."""
        node = items[0][0].node
        piece = max(1, num_dram_slots(node.capacity_bytes, node.slot_nbytes) // 2)
        for start in range(0, len(items), piece):
            await self._write_piece(items[start:start + piece], deadline)

    async def _write_piece(self, items: list[tuple[Location, int]], deadline: float) -> None:
        node = items[0][0].node
        resp = await self._node(node.address).PrepareWrite(kpb.PrepareWriteRequest(
            values=[value_to_pb(StoredValue(loc.key, loc.offset, loc.meta)) for loc, _ in items],
            timeout_s=self._remaining(deadline)), timeout=self._remaining(deadline))
        if len(resp.offsets) != len(items):
            raise ValueError(f"node {node.node_id} gave {len(resp.offsets)} offsets for {len(items)} values")
        src = [(slot * self.value_nbytes, self.value_nbytes) for _, slot in items]
        dst = [(offset, self.value_nbytes) for offset in resp.offsets]
        await self.transport.push(node.transfer_address, bytes(resp.token), self._staging_name, src, dst,
                              timeout_s=self._remaining(deadline))
