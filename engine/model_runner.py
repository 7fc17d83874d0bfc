"""Turns a scheduled batch into model inputs (token ids, positions, slots, attention metadata),
runs the forward pass, and returns the logits of the rows that sample a token."""

from __future__ import annotations

import torch

from pdserve.engine.kv_cache import PagedKVCache
from pdserve.engine.model import AttentionMetadata, LayerCallback, PrefillSegment, Transformer
from pdserve.engine.scheduler import ScheduledSeq


class ModelRunner:
    def __init__(self, model: Transformer, kv_cache: PagedKVCache) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = kv_cache.block_size

    def _slots(self, block_table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return block_table[positions // self.block_size] * self.block_size + positions % self.block_size

    def prepare(self, batch: list[ScheduledSeq]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        """Returns (input_ids [T], positions [T], metadata, sample_rows) where sample_rows[i] is the
        batch row whose logits give batch[i]'s next token, or -1 if batch[i] is mid-prefill."""
        input_ids: list[int] = []
        positions: list[torch.Tensor] = []
        slots: list[torch.Tensor] = []
        prefills: list[PrefillSegment] = []
        decode_rows: list[int] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        sample_rows: list[int] = []
        row = 0
        for item in batch:
            seq, n = item.seq, item.num_new_tokens
            start = seq.num_computed_tokens
            input_ids.extend(seq.token_ids[start:start + n])
            table = torch.tensor(seq.block_table, dtype=torch.long)
            pos = torch.arange(start, start + n)
            positions.append(pos)
            slots.append(self._slots(table, pos))
            if n == 1:
                decode_rows.append(row)
                decode_tables.append(seq.block_table)
                decode_lens.append(start + 1)
            else:
                ctx = start + n
                mask = None if start == 0 else torch.arange(ctx)[None, :] <= (start + torch.arange(n))[:, None]
                prefills.append(PrefillSegment(row, n, table[:-(-ctx // self.block_size)], ctx, mask))
            row += n
            sample_rows.append(row - 1 if start + n == seq.num_tokens else -1)

        meta = AttentionMetadata(slot_mapping=torch.cat(slots), prefills=prefills)
        if decode_rows:
            max_len = max(decode_lens)
            max_blocks = -(-max_len // self.block_size)
            tables = torch.zeros(len(decode_rows), max_blocks, dtype=torch.long)
            for i, t in enumerate(decode_tables):
                t = t[:max_blocks]
                tables[i, :len(t)] = torch.tensor(t, dtype=torch.long)
            pos = torch.arange(max_blocks * self.block_size)
            meta.decode_rows = torch.tensor(decode_rows, dtype=torch.long)
            meta.decode_block_tables = tables
            lens = torch.tensor(decode_lens)
            meta.decode_mask = (pos[None, :] < lens[:, None])[:, None, None, :]
        return torch.tensor(input_ids, dtype=torch.long), torch.cat(positions), meta, sample_rows

    def execute(self, batch: list[ScheduledSeq], on_layer_done: LayerCallback | None = None
                ) -> tuple[torch.Tensor | None, list[int]]:
        """Runs one step. Returns (logits [num_sampling, vocab] or None, sample_rows)."""
        input_ids, positions, meta, sample_rows = self.prepare(batch)
        device = self.model.device  # inputs are built on the CPU; no-ops there
        hidden = self.model.forward(input_ids.to(device), positions.to(device), meta.to(device), self.kv_cache,
                                    on_layer_done)
        rows = [r for r in sample_rows if r >= 0]
        if not rows:
            return None, sample_rows
        # sampling runs on the CPU (per-request seeded CPU generators): [rows, vocab] float32 comes back
        return self.model.logits(hidden[torch.tensor(rows, device=device)]).cpu(), sample_rows
