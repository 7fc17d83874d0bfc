"""PackedLinear against plain F.linear: both of its paths (the plain copy of a small weight for a few
rows, the oneDNN-packed weight otherwise) give the reference product."""

import pytest
import torch
import torch.nn.functional as F

from pdserve.engine import linear
from pdserve.engine.linear import SMALL_ROWS, SMALL_WEIGHT, PackedLinear, onednn_usable

pytestmark = pytest.mark.skipif(not onednn_usable("cpu"), reason="torch built without oneDNN (mkldnn)")


@pytest.mark.parametrize("rows", [1, SMALL_ROWS, SMALL_ROWS + 1, 64])
@pytest.mark.parametrize("bias", [False, True])
def test_small_weight_matches_reference_on_both_paths(rows, bias):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 64, generator=g)
    b = torch.randn(96, generator=g) if bias else None
    x = torch.randn(rows, 64, generator=g)
    lin = PackedLinear(w, b)
    assert lin.plain is not None
    torch.testing.assert_close(lin(x), F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_which_path_a_product_takes(monkeypatch):
    calls = []
    real = F.linear
    monkeypatch.setattr(linear.F, "linear", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    lin = PackedLinear(torch.randn(32, 16))
    lin(torch.randn(SMALL_ROWS, 16))
    lin(torch.randn(SMALL_ROWS + 1, 16))
    assert calls == [SMALL_ROWS]  # the larger product went to oneDNN


def test_large_weight_keeps_no_plain_copy():
    w = torch.randn(SMALL_WEIGHT // 128 + 1, 128)
    lin = PackedLinear(w)
    assert lin.plain is None
    x = torch.randn(2, 128)
    torch.testing.assert_close(lin(x), F.linear(x, w), rtol=1e-4, atol=1e-4)


def test_bfloat16_weight_keeps_no_plain_copy():
    # plain bfloat16 F.linear is slower than oneDNN's at few rows: a draft's bf16 weights stay packed only
    w = torch.randn(32, 16).to(torch.bfloat16)
    lin = PackedLinear(w)
    assert lin.plain is None
    x = torch.randn(2, 16).to(torch.bfloat16)
    torch.testing.assert_close(lin(x).float(), F.linear(x, w).float(), rtol=2e-2, atol=2e-2)
