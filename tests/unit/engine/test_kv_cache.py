"""Paged KV cache: block-major layout, writes land where layer_blocks reads, regions match the bytes."""

from __future__ import annotations

import pytest
import torch

from pdserve.convert import layout_from_proto, layout_to_proto
from pdserve.engine.kv_cache import PagedKVCache
from pdserve.errors import InvalidRequest


def test_write_lands_where_layer_blocks_reads():
    kv = PagedKVCache(num_layers=3, num_blocks=6, block_size=4, num_kv_heads=2, head_dim=5)
    slots = torch.tensor([0, 5, 22, 23])  # block 0 offset 0, block 1 offset 1, block 5 offsets 2 and 3
    k, v = torch.randn(4, 2, 5), torch.randn(4, 2, 5)
    kv.write(1, slots, k, v)
    kb, vb = kv.layer_blocks(1)
    assert kb.shape == (6, 4, 2, 5) and kb[0, 0].is_contiguous()
    for i, s in enumerate(slots.tolist()):
        assert torch.equal(kb[s // 4, s % 4], k[i]) and torch.equal(vb[s // 4, s % 4], v[i])
    assert not kv.layer_blocks(0)[0].any() and not kv.layer_blocks(2)[1].any()


def test_layout_numbers_and_regions_cover_exactly_the_blocks_bytes():
    kv = PagedKVCache(num_layers=4, num_blocks=10, block_size=2, num_kv_heads=2, head_dim=3, dtype=torch.bfloat16)
    lay = kv.layout()
    assert lay.shape == tuple(kv.kv.shape)
    assert lay.strides_bytes == tuple(s * 2 for s in kv.kv.stride())
    assert lay.block_nbytes == 4 * 2 * 2 * 2 * 3 * 2 and lay.token_nbytes * 2 == lay.block_nbytes
    assert lay.nbytes == kv.nbytes
    # all layers: one region per run of consecutive ids, in the ids' order
    assert lay.regions([3, 4, 5, 9, 1]) == [(3 * lay.block_nbytes, 3 * lay.block_nbytes),
                                             (9 * lay.block_nbytes, lay.block_nbytes), (lay.block_nbytes, lay.block_nbytes)]
    flat = kv.kv.view(-1).view(torch.uint8)
    kv.kv.copy_(torch.randn(kv.kv.shape))
    # a layer range: that layer's K and V of each block
    (offset, nbytes), = lay.regions([7], range(2, 3))
    assert torch.equal(flat[offset:offset + nbytes], kv.kv[7, 2].reshape(-1).view(torch.uint8))
    with pytest.raises(ValueError):
        lay.regions([1], range(3, 5))


def test_layout_round_trips_through_proto_and_refuses_the_old_order():
    lay = PagedKVCache(2, 8, 4, 2, 8).layout()
    msg = layout_to_proto(lay)
    assert layout_from_proto(msg) == lay
    msg.order = ""
    with pytest.raises(InvalidRequest, match="dimension order"):
        layout_from_proto(msg)


def test_one_plane_latent_cache_serves_k_and_v_from_one_tensor_and_pairs_only_with_its_kind():
    """MLA: one latent vector per token and layer is both K and V; the wire layout says so."""
    kv = PagedKVCache(num_layers=2, num_blocks=4, block_size=4, num_kv_heads=1, head_dim=6, num_planes=1)
    latent = torch.randn(3, 1, 6)
    kv.write(1, torch.tensor([1, 2, 9]), latent, None)
    kb, vb = kv.layer_blocks(1)
    assert kb.data_ptr() == vb.data_ptr() and torch.equal(kb[2, 1], latent[2])
    with pytest.raises(ValueError, match="k only"):
        kv.write(0, torch.tensor([0]), latent[:1], latent[:1])
    lay = kv.layout()
    assert lay.token_nbytes == 2 * 6 * 4 and lay.nbytes == kv.nbytes and lay.shape == tuple(kv.kv.shape)
    assert layout_from_proto(layout_to_proto(lay)) == lay
    two_planes = PagedKVCache(2, 4, 4, 1, 6).layout()
    assert not lay.compatible(two_planes) and lay.order != two_planes.order
