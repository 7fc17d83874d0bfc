"""The paged KV cache: one preallocated tensor holding every layer's K and V blocks.

Layout `[num_layers, 2 (K, V), num_blocks, block_size, num_kv_heads, head_dim]`, contiguous, so
one layer's K (or V) for a run of consecutive blocks is one contiguous byte range: the unit the
transfer layer moves. Owns memory and byte offsets; never chooses blocks (see block_manager.py).
"""

from __future__ import annotations

import torch


class PagedKVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: str = "cpu") -> None:
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.kv = torch.zeros(num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype,
                              device=device)
        # per layer: flat [num_blocks * block_size, num_kv_heads, head_dim] views of K and V
        self._flat = [
            (self.kv[i, 0].view(-1, num_kv_heads, head_dim), self.kv[i, 1].view(-1, num_kv_heads, head_dim))
            for i in range(num_layers)
        ]

    def layer_blocks(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of one layer as [num_blocks, block_size, num_kv_heads, head_dim]."""
        return self.kv[layer, 0], self.kv[layer, 1]

    @property
    def block_nbytes(self) -> int:
        """Bytes of one block of one layer's K (or V)."""
        return self.block_size * self.num_kv_heads * self.head_dim * self.kv.element_size()

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat K and V views of one layer, indexed by slot (block_id * block_size + offset)."""
        return self._flat[layer]

    def write(self, layer: int, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store new tokens' K/V ([T, num_kv_heads, head_dim]) at their slots ([T])."""
        k_flat, v_flat = self._flat[layer]
        k_flat.index_copy_(0, slot_mapping, k)
        v_flat.index_copy_(0, slot_mapping, v)

    def layer_regions(self, layer: int, block_ids: list[int]) -> list[tuple[int, int]]:
        """(byte_offset, nbytes) regions covering `block_ids` of one layer's K and V, adjacent blocks merged."""
        return layer_regions(self.num_blocks, self.block_nbytes, layer, block_ids)

    def regions(self, block_ids: list[int], layers: range | None = None) -> list[tuple[int, int]]:
        """Regions for `block_ids` over several layers, in (layer, K/V, run) order."""
        out: list[tuple[int, int]] = []
        for layer in layers if layers is not None else range(self.num_layers):
            out.extend(self.layer_regions(layer, block_ids))
        return out


def layer_regions(num_blocks: int, block_nbytes: int, layer: int, block_ids: list[int]) -> list[tuple[int, int]]:
    """Byte regions of `block_ids` of one layer (K runs, then V runs) in a pool of `num_blocks`
    blocks with this module's layout; also used for a peer's pool, from its KVLayout."""
    regions: list[tuple[int, int]] = []
    for kind in (0, 1):
        base = (layer * 2 + kind) * num_blocks
        for start, count in block_runs(block_ids):
            regions.append(((base + start) * block_nbytes, count * block_nbytes))
    return regions


def block_runs(block_ids: list[int]) -> list[tuple[int, int]]:
    """Split block ids (in order) into runs of consecutive ids: [(first_id, count), ...]."""
    runs: list[tuple[int, int]] = []
    for b in block_ids:
        if runs and runs[-1][0] + runs[-1][1] == b:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((b, 1))
    return runs
