"""Turns a scheduled batch into model inputs (token ids, positions, slots, attention metadata),
runs the forward pass, and returns the logits of the rows that sample a token: the last row of a
sequence whose context is complete, and for a speculative decode every row from its last token on
(row i verifies proposal i; the row after the last proposal gives the bonus token)."""

from __future__ import annotations

import torch

from pdserve.engine.attention import AttentionMetadata
from pdserve.engine.kv_cache import PagedKVCache
from pdserve.engine.models.base import DecoderModel, LayerCallback
from pdserve.engine.scheduler import ScheduledSeq


class ModelRunner:
    def __init__(self, model: DecoderModel, kv_cache: PagedKVCache) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = kv_cache.block_size

    def prepare(self, batch: list[ScheduledSeq]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int],
                                                          list[int]]:
        """Returns (input_ids [T], positions [T], metadata, sample_rows, num_sample_rows): batch[i]'s
        logits are rows sample_rows[i] - num_sample_rows[i] + 1 .. sample_rows[i] (1 + its proposals;
        num_sample_rows[i] == 0 and sample_rows[i] == -1 if batch[i] is mid-prefill).

        Python touches each sequence once (its new token ids and the block ids its context needs);
        positions, slots and the padded block table are computed by a handful of tensor ops.
        """
        bs = self.block_size
        input_ids: list[int] = []
        block_ids: list[int] = []  # the context blocks of every sequence, concatenated
        starts: list[int] = []  # first new position of each sequence
        q_lens: list[int] = []
        num_blocks: list[int] = []
        sample_rows: list[int] = []
        num_sample_rows: list[int] = []
        row = 0
        for item in batch:
            seq, n = item.seq, item.num_new_tokens
            start = seq.num_computed_tokens
            m = len(item.spec_token_ids)
            input_ids.extend(seq.token_ids[start:start + n - m])
            if m:
                input_ids.extend(item.spec_token_ids)
            nb = -(-(start + n) // bs)
            block_ids.extend(seq.block_table[:nb])
            starts.append(start)
            q_lens.append(n)
            num_blocks.append(nb)
            row += n
            done = start + n - m == seq.num_tokens
            sample_rows.append(row - 1 if done else -1)
            num_sample_rows.append(1 + m if done else 0)

        S, T = len(batch), row
        q_len_t = torch.tensor(q_lens, dtype=torch.int32)
        start_t = torch.tensor(starts, dtype=torch.long)
        nb_t = torch.tensor(num_blocks, dtype=torch.long)
        cu_q = torch.zeros(S + 1, dtype=torch.int32)
        torch.cumsum(q_len_t, 0, out=cu_q[1:])
        width = max(num_blocks)
        tables = torch.zeros(S, width, dtype=torch.int32)
        tables[torch.arange(width)[None, :] < nb_t[:, None]] = torch.tensor(block_ids, dtype=torch.int32)
        seq_of_row = torch.repeat_interleave(torch.arange(S), q_len_t, output_size=T)  # [T]
        positions = start_t[seq_of_row] + (torch.arange(T) - cu_q[:-1].long()[seq_of_row])
        slots = tables[seq_of_row, positions // bs].long() * bs + positions % bs
        meta = AttentionMetadata(slot_mapping=slots, cu_q=cu_q, ctx_lens=(start_t + q_len_t).to(torch.int32),
                                 block_tables=tables, block_size=bs)
        return torch.tensor(input_ids, dtype=torch.long), positions, meta, sample_rows, num_sample_rows

    def execute(self, batch: list[ScheduledSeq], on_layer_done: LayerCallback | None = None
                ) -> tuple[torch.Tensor | None, list[int]]:
        """Runs one step. Returns (logits [sum(num_sample_rows), vocab] or None, num_sample_rows): batch[i]'s
        rows follow those of batch[:i]."""
        input_ids, positions, meta, sample_rows, num_sample_rows = self.prepare(batch)
        device = self.model.device  # inputs are built on the CPU; no-ops there
        hidden = self.model.forward(input_ids.to(device), positions.to(device), meta.to(device), self.kv_cache,
                                    on_layer_done)
        rows = [r - k for r, n in zip(sample_rows, num_sample_rows) for k in range(n - 1, -1, -1)]
        if not rows:
            return None, num_sample_rows
        # sampling runs on the CPU (per-request seeded CPU generators): [rows, vocab] float32 comes back
        return self.model.logits(hidden[torch.tensor(rows, device=device)]).cpu(), num_sample_rows
