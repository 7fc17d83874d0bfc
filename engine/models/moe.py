"""Sparse mixture-of-experts MLP: a router picks top-k experts per token, the experts run as grouped
GEMMs (tokens sorted by expert, one matmul per active expert on its contiguous slice, never a loop
over tokens), results are weighted and scattered back; optional shared experts run on every token.

Routers cover the families here: softmax top-k, renormalised or not (Mixtral, Qwen MoE, DeepSeek-V2
with its group-limited variant) and DeepSeek-V3's sigmoid scores with a selection-only bias and
grouped top-k. Config fields shared by the MoE families live in `MoEConfig`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pdserve.engine.linear import Linear
from pdserve.engine.loader import Checkpoint
from pdserve.engine.model_config import ConfigReader, ModelConfig
from pdserve.engine.models.base import StepContext
from pdserve.engine.models.layers import DenseMLP, load_dense_mlp
from pdserve.engine.ops import TORCH_OPS


@dataclass(frozen=True, slots=True, kw_only=True)
class MoEConfig(ModelConfig):
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int  # each routed expert's hidden width
    norm_topk_prob: bool  # renormalise the chosen experts' weights to sum to 1
    sparse_layers: tuple[bool, ...]  # per layer: MoE (True) or the dense MLP of width intermediate_size
    shared_expert_intermediate_size: int = 0  # 0: no shared expert
    qk_norm: bool = False  # Qwen3-MoE's per-head q/k RMSNorm


def moe_fields(r: ConfigReader, num_layers: int, *, experts_keys: tuple[str, ...], dense_first: int = 0,
               every: int = 1, mlp_only_layers: tuple[int, ...] = ()) -> dict:
    """Expert counts and which layers are sparse: layer i is sparse when i >= dense_first,
    (i + 1) % every == 0 and i is not in mlp_only_layers."""
    num_experts = next((r.need(k) for k in experts_keys if r.raw.get(k) is not None), None)
    if num_experts is None:
        raise r.fail(experts_keys[0], "is missing: the number of routed experts")
    top_k = r.need("num_experts_per_tok")
    if not 0 < top_k <= num_experts:
        raise r.fail("num_experts_per_tok", f"= {top_k} must be in [1, {num_experts}]")
    sparse = tuple(i >= dense_first and (i + 1) % every == 0 and i not in mlp_only_layers for i in range(num_layers))
    return dict(num_experts=num_experts, num_experts_per_tok=top_k, sparse_layers=sparse)


class Experts:
    """E gated SiLU MLPs. Tokens are sorted by expert so each active expert runs one GEMM over its rows."""

    def __init__(self, gate_up: list[Linear], down: list[Linear]) -> None:
        self.gate_up, self.down = gate_up, down  # per expert: [2 * inter, hidden], [hidden, inter]
        self.num_experts = len(gate_up)

    def __call__(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, hidden]; expert_ids, weights [T, k] (weights float32). Returns sum_k weight * expert(x) [T, hidden]."""
        T, k = expert_ids.shape
        flat = expert_ids.reshape(-1)
        order = torch.argsort(flat, stable=True)  # [T * k] (token, slot) pairs grouped by expert
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        token_of = order // k
        xs = x.index_select(0, token_of)  # [T * k, hidden], expert-contiguous
        ys = torch.empty_like(xs)
        start = 0
        for e, n in enumerate(counts):
            if n:
                rows = slice(start, start + n)
                ys[rows] = self.down[e](TORCH_OPS.silu_mul(self.gate_up[e](xs[rows])))
                start += n
        ys = ys * weights.reshape(-1)[order].unsqueeze(1).to(ys.dtype)
        return torch.zeros_like(x).index_add_(0, token_of, ys)


def load_experts(ckpt: Checkpoint, prefix: str, num_experts: int, hidden: int, inter: int,
                 linear: Callable[..., Linear], names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
                 ) -> Experts:
    """Per-expert tensors `{prefix}{e}.{gate,up,down}.weight` (the Hugging Face checkpoint layout)."""
    mlps = [load_dense_mlp(ckpt, f"{prefix}{e}.", hidden, inter, linear, names) for e in range(num_experts)]
    return Experts([m.gate_up for m in mlps], [m.down for m in mlps])


@dataclass(slots=True)
class Router:
    """Chooses experts: scores = softmax or sigmoid of x @ weight.T (float32); with groups, only the
    best `topk_group` of `num_groups` expert groups compete; `bias` shifts the choice, not the weights."""

    weight: torch.Tensor  # [E, hidden] float32
    top_k: int
    scoring: str = "softmax"  # or "sigmoid" (DeepSeek-V3)
    normalize: bool = False  # renormalise the top-k weights to sum to 1
    scale: float = 1.0  # routed_scaling_factor
    num_groups: int = 1
    topk_group: int = 1
    group_score: str = "max"  # "max" (DeepSeek-V2) or "top2" (sum of each group's two best, V3)
    bias: torch.Tensor | None = None  # [E] float32, e_score_correction_bias

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, hidden] -> (expert ids [T, k], weights [T, k] float32)."""
        logits = F.linear(x.float(), self.weight)
        scores = logits.softmax(dim=-1) if self.scoring == "softmax" else logits.sigmoid()
        choice = scores if self.bias is None else scores + self.bias
        if self.num_groups > 1:
            E = choice.shape[-1]
            grouped = choice.view(-1, self.num_groups, E // self.num_groups)
            if self.group_score == "max":
                group_scores = grouped.max(dim=-1).values
            else:
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
            keep = torch.zeros_like(group_scores).scatter_(1, group_scores.topk(self.topk_group, dim=-1).indices, 1.0)
            keep = keep.bool().unsqueeze(-1).expand_as(grouped).reshape(-1, E)
            # V2 zeroes the other groups' (positive) softmax scores; V3 excludes them outright
            choice = choice.masked_fill(~keep, 0.0 if self.scoring == "softmax" else float("-inf"))
        ids = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, ids)  # the unbiased scores of the chosen experts
        if self.normalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + (1e-20 if self.scoring == "sigmoid" else 0.0))
        return ids, weights * self.scale if self.scale != 1.0 else weights


class SparseMoE:
    """Routed experts, plus shared experts on every token (optionally gated by sigmoid(x @ gate.T))."""

    def __init__(self, router: Router, experts: Experts, shared: DenseMLP | None = None,
                 shared_gate: torch.Tensor | None = None) -> None:
        self.router, self.experts, self.shared, self.shared_gate = router, experts, shared, shared_gate

    def __call__(self, x: torch.Tensor, step: StepContext | None = None) -> torch.Tensor:
        ids, weights = self.router(x)
        y = self.experts(x, ids, weights)
        if self.shared is not None:
            s = self.shared(x)
            if self.shared_gate is not None:
                s = torch.sigmoid(F.linear(x, self.shared_gate)) * s
            y = y + s
        return y
