"""The elementwise parts of a decoder layer, two ways: plain torch (the reference) and fused C++ CPU
kernels (`csrc/fused_ops.cpp`). A model gets one `Ops` at build time and reaches it through the step
(`StepContext.ops`), so the reference and the kernels can serve side by side in one process (the
parity tests run both).

What the fused versions save is the per-op dispatch and the extra passes over memory: an RMSNorm is
seven torch ops, RoPE ten, SiLU-and-multiply three, each allocating and walking its tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class TorchOps:
    """The reference compositions (as Hugging Face transformers computes them)."""

    name = "torch"

    @staticmethod
    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """RMSNorm computed in float32 and cast back (as transformers does for half-precision models)."""
        xf = x.float()
        variance = xf.pow(2).mean(-1, keepdim=True)
        return weight * (xf * torch.rsqrt(variance + eps)).to(x.dtype)

    def add_rms_norm(self, residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """(residual + delta, rms_norm(residual + delta)). May update `residual` in place."""
        h = residual + delta
        return h, self.rms_norm(h, weight, eps)

    @staticmethod
    def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, Hq, D], k [T, Hk, D] rotated (half-split layout); cos, sin [T, 1, D]. May work in place."""
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin)

    @staticmethod
    def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up of a fused [T, 2F] projection."""
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, dim] rotated (half-split layout)."""
    return x * cos + rotate_half(x) * sin


class KernelOps(TorchOps):
    """The fused C++ kernels for float32 on the CPU; anything else takes the reference."""

    name = "cpu-kernels"

    def __init__(self, module) -> None:
        self._m = module

    @staticmethod
    def _fits(x: torch.Tensor) -> bool:
        return x.dtype == torch.float32 and x.device.type == "cpu" and x.dim() == 2 and x.stride(-1) == 1

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        if not self._fits(x) or weight.dtype != torch.float32:
            return TorchOps.rms_norm(x, weight, eps)
        return self._m.rms_norm(x, weight, eps)

    def add_rms_norm(self, residual: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        if not (self._fits(residual) and self._fits(delta)) or weight.dtype != torch.float32:
            return super().add_rms_norm(residual, delta, weight, eps)
        return residual, self._m.add_rms_norm_(residual, delta, weight, eps)

    def rope(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
        rows_ok = all(t.dtype == torch.float32 and t.device.type == "cpu" and t.dim() == 3 and t.stride(2) == 1
                      and t.stride(1) == t.shape[2] for t in (q, k))
        if not rows_ok or cos.dtype != torch.float32:
            return TorchOps.rope(q, k, cos, sin)
        self._m.rope_(q, k, cos.reshape(cos.shape[0], -1).contiguous(), sin.reshape(sin.shape[0], -1).contiguous())
        return q, k

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        if not self._fits(gate_up):
            return TorchOps.silu_mul(gate_up)
        return self._m.silu_mul(gate_up)


TORCH_OPS = TorchOps()


def make_ops(kind: str, device: str):
    """The elementwise ops that go with `--attention-backend`: the fused kernels when the CPU kernel
    module is in use (auto where it builds, paged-cpu), else the reference."""
    if kind == "reference" or not device.startswith("cpu"):
        return TORCH_OPS
    from pdserve.engine.kernels import load_kernel

    try:
        return KernelOps(load_kernel())
    except Exception:  # noqa: BLE001 - make_attention already logged why, and fell back too
        if kind == "paged-cpu":
            raise
        return TORCH_OPS
