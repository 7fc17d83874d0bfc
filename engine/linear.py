"""Linear layers of the forward pass, with weights prepacked once for the CPU's GEMM library.

On the CPU, `PackedLinear` hands oneDNN (torch's mkldnn ops) a weight reordered once at load
time into its blocked layout, as vLLM's CPU backend does. Measured on this 2-core machine
(benchmarks/linear_packing.py): 1.1-1.3x plain `F.linear` at prefill sizes and 2x at decode
sizes. `F.linear` stays as the reference and the path on other devices or without oneDNN.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


class Linear:
    """y = x @ weight.T + bias, with plain torch."""

    kind = "torch"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.weight = weight  # [out_features, in_features]
        self.bias = bias
        self.out_features = weight.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class PackedLinear:
    """y = x @ weight.T + bias through oneDNN on a weight packed once; keeps no plain copy."""

    kind = "onednn"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.out_features = weight.shape[0]
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), None)
        self.bias = bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def onednn_usable(device: str) -> bool:
    return device.startswith("cpu") and torch.backends.mkldnn.is_available()


def make_linear_factory(kind: str, device: str, dtype: torch.dtype):
    """The constructor for `--linear-backend` (auto: oneDNN-packed on the CPU when it works, else torch)."""
    if kind == "torch":
        return Linear
    if not onednn_usable(device):
        if kind == "onednn":
            raise ValueError(f"--linear-backend onednn needs the CPU with oneDNN (mkldnn); device is {device}")
        return Linear
    try:  # one tiny packed product proves the ops exist in this torch build
        probe = PackedLinear(torch.ones(2, 2, dtype=dtype))
        probe(torch.ones(1, 2, dtype=dtype))
    except (RuntimeError, AttributeError) as exc:
        if kind == "onednn":
            raise
        logger.warning("oneDNN weight packing unavailable (%s); using plain torch linear layers", exc)
        return Linear
    return PackedLinear
