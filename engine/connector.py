"""The engine connector: the one seam through which prefill, decode and the store prefix path touch the KV cache.

Two roles, as in vLLM's KV connector. The scheduler side (`SchedulerConnector`, one per engine, its
methods run on the engine thread: call them inside `AsyncEngine.call`) decides: how many prompt
tokens the local cache already holds, which blocks a request gets (reserve / allocate), which
loaded blocks enter the prefix cache, and when a request finishes, whether the engine or the
connector frees its blocks. The worker side (`WorkerConnector`, on the asyncio loop) moves bytes
through the process's KVTransport: expect a load, save (push) blocks or one layer of them, cancel.
They meet only through the metadata objects below; neither touches the other's state.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pdserve.engine.block_hash import BlockHash, hash_block
from pdserve.engine.kv_cache import KVCacheLayout
from pdserve.errors import InvalidRequest, Overloaded
from pdserve.transfer.base import ExpectationHandle, KVTransport

if TYPE_CHECKING:
    from pdserve.engine.llm_engine import LLMEngine
    from pdserve.engine.sampling_params import SamplingParams
    from pdserve.engine.sequence import Sequence

KV_BUFFER = "kv"  # name of the paged pool in the process's transport


@dataclass(frozen=True, slots=True)
class BlockGrant:
    """Blocks the scheduler side gave a request: `block_ids[:num_prompt_blocks]` will hold its prompt's KV,
    the rest is headroom for generated tokens."""

    req_id: str
    block_ids: tuple[int, ...]
    num_prompt_blocks: int

    @property
    def prompt_block_ids(self) -> list[int]:
        return list(self.block_ids[:self.num_prompt_blocks])


@dataclass(frozen=True, slots=True)
class SaveMeta:
    """One push: these local blocks (or one layer range of them) into these blocks of the peer's pool."""

    req_id: str
    peer: str  # the destination transport's address
    token: bytes  # the one-time token of the destination's reservation
    dest_layout: KVCacheLayout
    src_block_ids: tuple[int, ...]
    dst_block_ids: tuple[int, ...]
    layers: range | None = None  # None: every layer of each block


@dataclass(frozen=True, slots=True)
class FinishedPrefill:
    """A prefill request the engine finished but whose blocks it still holds for a transfer."""

    req_id: str
    block_ids: tuple[int, ...]
    compute_s: float  # first scheduled -> first token (queueing excluded)
    first_scheduled_at: float | None  # time.monotonic() when its first tokens entered a step


def check_block_hashes(prompt: Seq[int], hashes: Seq[bytes], block_size: int, fingerprint: bytes) -> list[BlockHash]:
    """The router's chained hashes of `prompt`'s full blocks, checked at O(1) cost, not recomputed.

    We trust the router (a component of the same deployment behind worker authentication) to hash the
    prompt it sends; what can really go wrong is a router and a worker that disagree on the model or
    the block size, or a hash list for another prompt length. The count, the first block's hash and
    the last block's hash (given its parent) catch those with two hashes instead of one per block.
    """
    if len(hashes) != len(prompt) // block_size:
        raise InvalidRequest(f"block_hashes has {len(hashes)} entries; the prompt has {len(prompt) // block_size} "
                             f"full blocks of {block_size} tokens")
    out = [BlockHash(bytes(h)) for h in hashes]
    if not out:
        return out
    last = len(out) - 1
    if hash_block(None, prompt[:block_size], fingerprint) != out[0] or (last and hash_block(
            out[last - 1], prompt[last * block_size:(last + 1) * block_size], fingerprint) != out[last]):
        raise InvalidRequest("block_hashes do not match the prompt (router and worker disagree on the model)")
    return out


class SchedulerConnector:
    """Scheduler side: owns every block decision made for callers outside the engine. Engine thread only."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.bm = engine.block_manager

    def num_matched_blocks(self, block_hashes: list[BlockHash], num_prompt_tokens: int) -> int:
        """Leading prompt blocks the local prefix cache holds (never the last token's block). No side effects."""
        cap = (num_prompt_tokens - 1) // self.bm.block_size
        return len(self.bm.match_prefix(block_hashes[:cap]))

    def reserve(self, req_id: str, num_prompt_tokens: int, max_tokens: int, headroom_tokens: int) -> BlockGrant:
        """Blocks for the prompt plus min(max_tokens, headroom_tokens) generated tokens, as few runs as the
        pool allows; the sequence takes more as it generates. Raises InvalidRequest (can never run here)
        or Overloaded (not now)."""
        self.engine.validate([0] * num_prompt_tokens, _LengthOnly(max_tokens))
        if req_id in self.engine.requests:
            raise Overloaded(f"request {req_id!r} is already running here")
        num_prompt_blocks = self.bm.blocks_for_tokens(num_prompt_tokens)
        n = self.bm.blocks_for_tokens(num_prompt_tokens + min(max_tokens, headroom_tokens))
        if n > self.bm.num_free_blocks:
            raise Overloaded(f"decode worker has {self.bm.num_free_blocks} free KV blocks, request needs {n}")
        return BlockGrant(req_id, tuple(self.bm.allocate(n)), num_prompt_blocks)

    def allocate_for_load(self, num_blocks: int, num_prompt_tokens: int) -> list[int]:
        """Fresh blocks to load stored KV into, or [] when taking them could starve the request's own compute."""
        if self.bm.num_free_blocks < self.bm.blocks_for_tokens(num_prompt_tokens) + num_blocks:
            return []
        return self.bm.allocate(num_blocks)

    def register_loaded(self, block_ids: list[int], block_hashes: list[BlockHash]) -> None:
        """Loaded blocks become prefix-cache entries, so the engine's own matching serves them."""
        for b, h in zip(block_ids, block_hashes):
            self.bm.register(b, h)

    def free(self, block_ids: Seq[int]) -> None:
        self.bm.free(list(block_ids))

    def admit_prefilled(self, grant: BlockGrant, prompt: list[int], first_token_id: int, params: SamplingParams,
                        first_logprob: float | None, num_cached_tokens: int,
                        block_hashes: list[BlockHash]) -> Sequence:
        """Hand a grant whose prompt KV has landed to a new running sequence; on any error the blocks are freed."""
        try:
            return self.engine.add_prefilled_request(grant.req_id, prompt, first_token_id, params,
                                                     list(grant.block_ids), first_logprob, num_cached_tokens,
                                                     block_hashes=block_hashes)
        except BaseException:
            self.free(grant.block_ids)
            raise

    def request_finished(self, req_id: str) -> FinishedPrefill | None:
        """A `keep_blocks` request's blocks after it finished: from now on the connector owns freeing them
        (`release`). None when the request is gone (aborted: the engine freed them)."""
        seq = self.engine.requests.get(req_id)
        if seq is None or not seq.is_finished:
            return None
        compute_s = (seq.first_token_time or 0.0) - (seq.first_scheduled_time or 0.0)
        return FinishedPrefill(req_id, tuple(seq.block_table), max(0.0, compute_s), seq.first_scheduled_time)

    def release(self, req_id: str) -> None:
        """Free whatever a finished or running request still holds (no-op when unknown)."""
        if req_id in self.engine.requests:
            self.engine.release(req_id)


class WorkerConnector:
    """Worker side: turns metadata into regions of the pools' layouts and moves them through the transport."""

    def __init__(self, transport: KVTransport, layout: KVCacheLayout) -> None:
        self.transport = transport
        self.layout = layout

    def expect_load(self, token: bytes, grant: BlockGrant, timeout_s: float) -> ExpectationHandle:
        """Allow the holder of `token` to write the grant's prompt blocks (all layers) once, within timeout_s."""
        return self.transport.expect(token, KV_BUFFER, self.layout.regions(grant.prompt_block_ids), timeout_s)

    async def save(self, meta: SaveMeta, timeout_s: float) -> int:
        """Push local blocks into the peer's; returns bytes sent. Both sides' regions follow the block order,
        so each side is one region per run of consecutive ids (per block for a layer range)."""
        src = self.layout.regions(list(meta.src_block_ids), meta.layers)
        dst = meta.dest_layout.regions(list(meta.dst_block_ids), meta.layers)
        return await self.transport.push(meta.peer, meta.token, KV_BUFFER, src, dst, timeout_s=timeout_s)

    async def cancel(self, token: bytes) -> None:
        """After this returns no byte lands under `token`: the blocks it covered may be reused."""
        await self.transport.cancel(token)


class _LengthOnly:
    """Just enough of SamplingParams for LLMEngine.validate's length checks."""

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
