"""One request's state inside an engine: its tokens, KV block table and progress."""

from __future__ import annotations

import enum
import time
from typing import TYPE_CHECKING

import torch

from pdserve.engine.block_hash import BlockHash
from pdserve.engine.sampling_params import SEED_STRIDE, SamplingParams

if TYPE_CHECKING:
    from pdserve.engine.spec.speculator import SpecState


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(self, req_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.req_id = req_id
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.block_hashes: list[BlockHash] = []  # of full blocks, in order
        self.num_registered_blocks = 0  # leading blocks entered into the prefix-cache index
        self.num_computed_tokens = 0  # tokens whose K/V are in the cache
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache at first admission
        self.num_preemptions = 0
        self.admitted = False
        self.reserved = False  # prompt KV arrived in reserved blocks (decode worker); grows from headroom
        self.keep_blocks = False  # on finish, hold the blocks until `release` (prefill worker)
        self.output_logprobs: list[float] = []
        self.spec: SpecState | None = None  # speculation controller (engines with --speculative)
        self.finish_reason: str | None = None
        self.arrival_time = time.monotonic()
        self.first_token_time: float | None = None
        self.first_scheduled_time: float | None = None  # when its first tokens entered a step

    def generator_for_next_token(self) -> torch.Generator | None:
        """The seeded generator for the next draw, keyed on (seed, output position) so that a
        request gives the same tokens wherever its earlier tokens were sampled (prefill or decode)."""
        if self.generator is None:
            return None
        assert self.params.seed is not None
        return self.generator.manual_seed((self.params.seed + SEED_STRIDE * self.num_output_tokens) % 2**63)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (f"Sequence({self.req_id!r}, tokens={self.num_tokens}, computed={self.num_computed_tokens}, "
                f"blocks={len(self.block_table)}, {self.status.value})")
