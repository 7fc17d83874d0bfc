"""The fused C++ elementwise ops against the torch reference compositions (engine/ops.py)."""

import pytest
import torch

from pdserve.engine.ops import TORCH_OPS, KernelOps

EPS = 1e-5


@pytest.fixture(scope="module")
def ops():
    from pdserve.engine.kernels import load_kernel

    try:
        return KernelOps(load_kernel())
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"CPU kernels unavailable here: {exc}")


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("rows,hidden", [(1, 256), (7, 768), (600, 256), (3, 100)])
def test_rms_norm_and_residual_add_match_the_reference(ops, rows, hidden):
    x, delta, w = rand(rows, hidden), rand(rows, hidden, seed=1), rand(hidden, seed=2)
    torch.testing.assert_close(ops.rms_norm(x, w, EPS), TORCH_OPS.rms_norm(x, w, EPS), rtol=1e-5, atol=1e-5)
    ref_h, ref_x = TORCH_OPS.add_rms_norm(x.clone(), delta, w, EPS)
    h = x.clone()
    new_h, out = ops.add_rms_norm(h, delta, w, EPS)
    torch.testing.assert_close(new_h, ref_h, rtol=0, atol=0)  # the add is exact
    torch.testing.assert_close(out, ref_x, rtol=1e-5, atol=1e-5)
    assert new_h.data_ptr() == h.data_ptr()  # in place


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 2, 64), (12, 4, 64), (6, 1, 128), (2, 2, 6)])
def test_rope_matches_the_reference_on_views_of_a_fused_projection(ops, heads, kv_heads, head_dim):
    T = 9
    qkv = rand(T, (heads + 2 * kv_heads) * head_dim)  # q, k, v as views into one row, as the layers do
    q, k, _ = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k = q.view(T, heads, head_dim), k.view(T, kv_heads, head_dim)
    freqs = torch.outer(torch.arange(T, dtype=torch.float32) * 3, 1.0 / (10000 ** (torch.arange(0, head_dim, 2) / head_dim)))
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().unsqueeze(1), emb.sin().unsqueeze(1)
    ref_q, ref_k = TORCH_OPS.rope(q.clone(), k.clone(), cos, sin)
    out_q, out_k = ops.rope(q, k, cos, sin)
    torch.testing.assert_close(out_q, ref_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_k, ref_k, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows,ffn", [(1, 688), (64, 2048), (5, 3)])
def test_silu_mul_matches_the_reference(ops, rows, ffn):
    gate_up = rand(rows, 2 * ffn) * 6  # large |x| too: exp must not overflow into NaN
    gate_up[0, 0], gate_up[0, 1] = -200.0, 200.0
    torch.testing.assert_close(ops.silu_mul(gate_up), TORCH_OPS.silu_mul(gate_up), rtol=1e-5, atol=1e-5)


def test_other_dtypes_take_the_reference(ops):
    x, w = rand(4, 64).bfloat16(), rand(64).bfloat16()
    torch.testing.assert_close(ops.rms_norm(x, w, EPS), TORCH_OPS.rms_norm(x, w, EPS), rtol=0, atol=0)
    gate_up = rand(4, 32).bfloat16()
    torch.testing.assert_close(ops.silu_mul(gate_up), TORCH_OPS.silu_mul(gate_up), rtol=0, atol=0)


def test_bad_shapes_are_refused_not_misread(ops):
    with pytest.raises(RuntimeError, match="residual and delta"):
        ops._m.add_rms_norm_(rand(4, 8), rand(4, 9), rand(8), EPS)
    with pytest.raises(RuntimeError, match="even width"):
        ops._m.silu_mul(rand(4, 7))
