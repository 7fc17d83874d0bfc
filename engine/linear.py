"""Linear layers of the forward pass, with weights prepacked once for the CPU's GEMM library.

On the CPU, `PackedLinear` hands oneDNN (torch's mkldnn ops) a weight reordered once at load
time into its blocked layout, as vLLM's CPU backend does: 1.2-2.0x plain `F.linear` on the
built-in small model's layers from 4 rows on (`python benchmarks/linear_rows.py`;
docs/benchmarks.md). For a small weight and a few rows (a
decode step of the built-in tiny model) oneDNN's per-call cost is most of the time and plain
`F.linear` takes 0.4-0.75x as long, so a small float32 weight also keeps its plain copy and products of
up to `SMALL_ROWS` rows take that (weights of over `SMALL_WEIGHT` elements keep no plain copy).
`F.linear` stays as the reference and the path on other devices or without oneDNN.
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


# A float32 weight of at most this many elements (2 MiB: the built-in tiny model's largest, its
# 2048 x 256 head) keeps a plain copy beside the packed one, and products of at most SMALL_ROWS rows
# use the plain one. Measured crossover (tiny's layers, 2 threads): plain 0.4-0.75x of oneDNN's time
# at 1-8 rows, 1.0x at 32. Not for bfloat16 (a draft's weights): there plain F.linear takes 1.5-1.6x
# oneDNN's time at 1-4 rows on this CPU (avx512_bf16).
SMALL_WEIGHT = 1 << 19
SMALL_ROWS = 8


class PackedLinear:
    """y = x @ weight.T + bias through oneDNN on a weight packed once; a small float32 weight (at most
    `SMALL_WEIGHT` elements) also keeps its plain copy for products of at most `SMALL_ROWS` rows."""

    kind = "onednn"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.out_features = weight.shape[0]
        weight = weight.contiguous()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        self.plain = weight if weight.numel() <= SMALL_WEIGHT and weight.dtype == torch.float32 else None
        self.bias = bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.plain is not None and x.dim() == 2 and x.shape[0] <= SMALL_ROWS:
            return F.linear(x, self.plain, self.bias)
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
