"""The paged KV cache: one preallocated tensor holding every block's KV for every layer, and its layout.

Block-major layout `[num_blocks, num_layers, num_planes, block_size, num_kv_heads, head_dim]`, contiguous.
The model's `KVSpec` sets the planes: 2 (K, V) for multi-head / grouped-query attention; 1 for
multi-head latent attention (MLA), whose one latent vector per token (`[1, kv_lora_rank + rope dims]`)
is both key and value. A block holds all its layers, so one request's KV is one byte region per run of consecutive block ids
whatever the layer count (the unit the transfer layer moves and the store keeps as one value).
`layout()` describes it; the transfer plan, reservations and the store compute regions from it, for
this pool and (from a peer's pb.KVLayout) for another's. Owns memory and byte offsets; never chooses
blocks (see block_manager.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Region = tuple[int, int]  # (byte_offset, nbytes) inside the registered pool
LAYOUT_ORDER = "block,layer,kv,token,head,dim"  # outermost first; pb.KVLayout.order names it for peers
LATENT_LAYOUT_ORDER = "block,layer,latent,token,head,dim"  # one plane: the MLA latent (K = V)
ORDER_OF_PLANES = {2: LAYOUT_ORDER, 1: LATENT_LAYOUT_ORDER}
PLANES_OF_ORDER = {order: planes for planes, order in ORDER_OF_PLANES.items()}


@dataclass(frozen=True, slots=True)
class KVCacheLayout:
    """Shape, dtype and byte arithmetic of a block-major pool (this worker's or a peer's)."""

    num_blocks: int
    num_layers: int
    block_size: int  # tokens per block
    num_kv_heads: int
    head_dim: int
    dtype: str  # "float32", "bfloat16", ...
    element_size: int  # bytes per element
    num_planes: int = 2  # 2: K and V; 1: the MLA latent

    @property
    def order(self) -> str:
        """Dimension names, outermost first (what pb.KVLayout.order carries)."""
        return ORDER_OF_PLANES[self.num_planes]

    @property
    def shape(self) -> tuple[int, int, int, int, int, int]:
        return (self.num_blocks, self.num_layers, self.num_planes, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def kv_block_nbytes(self) -> int:
        """Bytes of one plane (K, V or latent) of one layer of one block: [block_size, num_kv_heads, head_dim]."""
        return self.block_size * self.num_kv_heads * self.head_dim * self.element_size

    @property
    def layer_block_nbytes(self) -> int:
        """Bytes of one layer's planes of one block (adjacent in memory)."""
        return self.num_planes * self.kv_block_nbytes

    @property
    def block_nbytes(self) -> int:
        """Bytes of one block, all layers: the block stride, and the size of a stored value."""
        return self.num_layers * self.layer_block_nbytes

    @property
    def token_nbytes(self) -> int:
        """Bytes of one token's KV over all layers (what crosses the wire per token)."""
        return self.block_nbytes // self.block_size

    @property
    def nbytes(self) -> int:
        return self.num_blocks * self.block_nbytes

    @property
    def strides_bytes(self) -> tuple[int, ...]:
        """Byte strides of `shape` (C order)."""
        strides, acc = [], self.element_size
        for dim in reversed(self.shape):
            strides.append(acc)
            acc *= dim
        return tuple(reversed(strides))

    def regions(self, block_ids: list[int], layers: range | None = None) -> list[Region]:
        """Byte regions of `block_ids` (in order), all layers (None) or a contiguous range of layers.

        All layers: one region per run of consecutive ids. A layer range: one region per block (its
        layers' K and V are adjacent inside the block). Region order follows `block_ids`, so a source
        and a destination list of the same blocks pair up byte for byte.
        """
        if layers is None or (layers.start == 0 and layers.stop == self.num_layers):
            return [(start * self.block_nbytes, count * self.block_nbytes) for start, count in block_runs(block_ids)]
        if not (0 <= layers.start < layers.stop <= self.num_layers and layers.step == 1):
            raise ValueError(f"layers must be a contiguous range inside [0, {self.num_layers}), got {layers}")
        offset, nbytes = layers.start * self.layer_block_nbytes, len(layers) * self.layer_block_nbytes
        return [(b * self.block_nbytes + offset, nbytes) for b in block_ids]

    def compatible(self, other: KVCacheLayout) -> bool:
        """True when blocks can be copied byte for byte between the two pools (pool sizes may differ)."""
        return (self.num_layers, self.num_planes, self.block_size, self.num_kv_heads, self.head_dim, self.dtype) == (
            other.num_layers, other.num_planes, other.block_size, other.num_kv_heads, other.head_dim, other.dtype)


class PagedKVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: str = "cpu", num_planes: int = 2) -> None:
        if num_planes not in ORDER_OF_PLANES:
            raise ValueError(f"num_planes must be 2 (K, V) or 1 (latent), got {num_planes}")
        self.num_layers = num_layers
        self.num_planes = num_planes
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        # [num_blocks, num_layers, num_planes, block_size, num_kv_heads, head_dim]
        self.kv = torch.zeros(num_blocks, num_layers, num_planes, block_size, num_kv_heads, head_dim, dtype=dtype,
                              device=device)
        self._layout = KVCacheLayout(num_blocks, num_layers, block_size, num_kv_heads, head_dim,
                                     str(dtype).removeprefix("torch."), self.kv.element_size(), num_planes)

    def layout(self) -> KVCacheLayout:
        return self._layout

    def layer_blocks(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of one layer as [num_blocks, block_size, num_kv_heads, head_dim] views; the block
        dimension is strided (stride = one whole block), the inner three are contiguous. With one
        plane (MLA) both are the same view of the latent."""
        return self.kv[:, layer, 0], self.kv[:, layer, self.num_planes - 1]

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def write(self, layer: int, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None) -> None:
        """Store new tokens' K/V ([T, num_kv_heads, head_dim]) at their slots ([T], block_id * block_size + offset).
        With one plane (MLA), `k` is the latent and `v` is None."""
        if (v is None) != (self.num_planes == 1):
            raise ValueError(f"a {self.num_planes}-plane cache takes {'k only' if self.num_planes == 1 else 'k and v'}")
        block_idx = torch.div(slot_mapping, self.block_size, rounding_mode="floor")
        offset = slot_mapping - block_idx * self.block_size
        k_blocks, v_blocks = self.layer_blocks(layer)
        k_blocks.index_put_((block_idx, offset), k)
        if v is not None:
            v_blocks.index_put_((block_idx, offset), v)

    def regions(self, block_ids: list[int], layers: range | None = None) -> list[Region]:
        """Byte regions of `block_ids` in this pool (see KVCacheLayout.regions)."""
        return self._layout.regions(block_ids, layers)

    def read_blocks(self, block_ids: list[int]) -> torch.Tensor:
        """A copy of whole blocks, [n, num_layers, num_planes, block_size, num_kv_heads, head_dim] (the stored-value layout)."""
        return self.kv.index_select(0, torch.tensor(block_ids, dtype=torch.long, device=self.kv.device))


def block_runs(block_ids: list[int]) -> list[tuple[int, int]]:
    """Split block ids (in order) into runs of consecutive ascending ids: [(first_id, count), ...]."""
    runs: list[tuple[int, int]] = []
    for b in block_ids:
        if runs and runs[-1][0] + runs[-1][1] == b:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((b, 1))
    return runs
