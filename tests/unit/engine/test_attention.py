"""The paged attention kernel against the reference (gather + SDPA) on mixed steps."""

from __future__ import annotations

import pytest
import torch

from pdserve.engine.attention import AttentionMetadata, PagedAttention, ReferenceAttention
from pdserve.engine.kernels import load_kernel
from pdserve.engine.kv_cache import PagedKVCache


@pytest.fixture(scope="module")
def kernel():
    try:
        return load_kernel()
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"the paged attention kernel must build on this machine: {exc}")


def make_step(seqs: list[tuple[int, int]], cache: PagedKVCache, seed: int) -> tuple[AttentionMetadata, int]:
    """seqs: (context length, new rows). Gives each sequence shuffled (fragmented) blocks."""
    g = torch.Generator().manual_seed(seed)
    bs = cache.block_size
    free = torch.randperm(cache.num_blocks, generator=g).tolist()
    tables, slots, cu = [], [], [0]
    for ctx, n in seqs:
        nb = -(-ctx // bs)
        table = [free.pop() for _ in range(nb)]
        tables.append(table)
        pos = torch.arange(ctx - n, ctx)
        t = torch.tensor(table)
        slots.append(t[pos // bs] * bs + pos % bs)
        cu.append(cu[-1] + n)
    width = max(len(t) for t in tables)
    bt = torch.zeros(len(seqs), width, dtype=torch.int32)
    for i, t in enumerate(tables):
        bt[i, :len(t)] = torch.tensor(t, dtype=torch.int32)
    meta = AttentionMetadata(torch.cat(slots), torch.tensor(cu, dtype=torch.int32),
                             torch.tensor([c for c, _ in seqs], dtype=torch.int32), bt, bs)
    return meta, cu[-1]


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(4, 2, 64), (12, 4, 64), (8, 8, 32), (6, 1, 128), (16, 1, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_reference(kernel, num_heads, num_kv_heads, head_dim, dtype):
    cache = PagedKVCache(2, 128, 16, num_kv_heads, head_dim, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    cache.kv.copy_(torch.randn(cache.kv.shape, generator=g).to(dtype))
    # decodes of several lengths, a fresh prompt, a chunk with history, a chunk ending mid-block, one token;
    # prompts and chunks over several of the prefill path's 64-key softmax blocks, ending inside one
    seqs = [(1, 1), (17, 1), (100, 1), (37, 37), (80, 33), (48, 16), (5, 5), (130, 1), (200, 70), (129, 129)]
    meta, T = make_step(seqs, cache, seed=2)
    q = torch.randn(T, num_heads, head_dim, generator=g).to(dtype)
    k = torch.randn(T, num_kv_heads, head_dim, generator=g).to(dtype)
    v = torch.randn(T, num_kv_heads, head_dim, generator=g).to(dtype)
    ref = ReferenceAttention(num_heads, num_kv_heads, head_dim)
    fast = PagedAttention(kernel, head_dim)
    for layer in range(2):
        cache.write(layer, meta.slot_mapping, k, v)
        want = ref(q, k, v, layer, meta, cache)
        got = fast(q, k, v, layer, meta, cache)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)



@pytest.mark.parametrize("block_size", [8, 32])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(8, 2, 64), (16, 2, 128), (3, 3, 64)])
def test_decodes_match_reference_at_other_block_sizes(kernel, block_size, num_heads, num_kv_heads, head_dim):
    """Decodes take the block-walking path when the block holds a multiple of 16 tokens (32 here) and the
    per-key path otherwise (8): contexts ending anywhere in a block, one block, several, and a prefill chunk."""
    cache = PagedKVCache(1, 64, block_size, num_kv_heads, head_dim)
    g = torch.Generator().manual_seed(5)
    cache.kv.copy_(torch.randn(cache.kv.shape, generator=g))
    seqs = [(1, 1), (15, 1), (16, 1), (31, 1), (32, 1), (33, 1), (70, 1), (129, 1), (40, 8)]
    meta, T = make_step(seqs, cache, seed=6)
    q = torch.randn(T, num_heads, head_dim, generator=g)
    k = torch.randn(T, num_kv_heads, head_dim, generator=g)
    v = torch.randn(T, num_kv_heads, head_dim, generator=g)
    cache.write(0, meta.slot_mapping, k, v)
    want = ReferenceAttention(num_heads, num_kv_heads, head_dim)(q, k, v, 0, meta, cache)
    got = PagedAttention(kernel, head_dim)(q, k, v, 0, meta, cache)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

def test_kernel_reads_strided_blocks(kernel):
    """A cache whose blocks are not adjacent in memory (block-major layouts interleave layers)."""
    nkv, hd, bs = 2, 64, 16
    big = torch.randn(64, 3, bs, nkv, hd)
    k_blocks, v_blocks = big[:, 0], big[:, 2]  # [64, bs, nkv, hd] with a block stride of 3 blocks

    class Strided(PagedKVCache):
        def layer_blocks(self, layer):
            return k_blocks, v_blocks

    cache = Strided(1, 64, bs, nkv, hd)
    meta, T = make_step([(40, 1), (33, 9)], cache, seed=3)
    q = torch.randn(T, 4, hd)
    fast = PagedAttention(kernel, hd)(q, None, None, 0, meta, cache)
    # reference on a contiguous copy of the same blocks
    contiguous = PagedKVCache(1, 64, bs, nkv, hd)
    contiguous.layer_blocks(0)[0].copy_(k_blocks)
    contiguous.layer_blocks(0)[1].copy_(v_blocks)
    meta2 = AttentionMetadata(meta.slot_mapping, meta.cu_q, meta.ctx_lens, meta.block_tables, bs)
    ref = ReferenceAttention(4, nkv, hd)(q, None, None, 0, meta2, contiguous)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)


def test_kernel_rejects_bad_metadata(kernel):
    cache = PagedKVCache(1, 8, 16, 2, 64)
    meta, T = make_step([(20, 1)], cache, seed=4)
    meta.ctx_lens[0] = 1000  # more blocks than the table has
    q = torch.randn(T, 4, 64)
    with pytest.raises(RuntimeError, match="context length"):
        PagedAttention(kernel, 64)(q, None, None, 0, meta, cache)


def test_a_stale_build_lock_does_not_block_loading(kernel):
    """A build killed mid-way leaves torch's lock file behind; loading must not wait on it."""
    import threading

    from pdserve.engine.kernels import kernel_build_dir

    (kernel_build_dir() / "lock").write_text("")
    done = threading.Event()
    result = []
    thread = threading.Thread(target=lambda: (result.append(load_kernel()), done.set()), daemon=True)
    thread.start()
    assert done.wait(120), "load_kernel waited on a stale lock file"
    assert result[0] is not None


def test_loading_twice_in_one_process_reuses_the_build(kernel):
    """Every worker loads the module twice (attention and the fused ops). torch appends its own link
    flags to the flag list it is handed; a shared list made the second load's hash differ, so torch
    rebuilt the whole module as pdserve_cpu_kernels_v1 in every worker (minutes each on 2 cores, and
    the CI run that shipped it timed out). The second load must be the first one's module."""
    from pdserve.engine import kernels

    cflags, ldflags = tuple(kernels.CFLAGS), tuple(kernels.LDFLAGS)
    again = load_kernel()
    assert again.__name__ == kernels.MODULE_NAME, f"a second load rebuilt the module as {again.__name__}"
    assert again is kernel
    assert (tuple(kernels.CFLAGS), tuple(kernels.LDFLAGS)) == (cflags, ldflags), "load_kernel changed the flags"


def test_two_checkouts_of_the_same_sources_build_in_separate_dirs(tmp_path, monkeypatch):
    """The build commands name the source files' paths: two checkouts run with one environment (a worktree
    next to main, a benchmark's --checkout) sharing a build dir would rebuild it on every alternate load."""
    import shutil

    from pdserve.engine import kernels

    here = kernels.kernel_build_dir()
    copy = tmp_path / "csrc"
    shutil.copytree(kernels._CSRC_DIR, copy)
    monkeypatch.setattr(kernels, "_CSRC_DIR", copy)
    assert kernels.kernel_build_dir() != here
    assert kernels.kernel_build_dir() == kernels.kernel_build_dir()  # and stable for one checkout
