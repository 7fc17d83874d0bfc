"""Conversions between proto messages and engine types (one place for every hop)."""

from __future__ import annotations

from pdserve.engine.kv_cache import LATENT_LAYOUT_ORDER, LAYOUT_ORDER, PLANES_OF_ORDER, KVCacheLayout
from pdserve.engine.sampling_params import SamplingParams
from pdserve.errors import InvalidRequest
from pdserve.proto import pdserve_pb2 as pb

DEFAULT_MAX_TOKENS = 16


def sampling_from_proto(opts: pb.SamplingOptions) -> SamplingParams:
    """Validated SamplingParams (InvalidRequest names the field to fix)."""
    return SamplingParams(
        max_tokens=opts.max_tokens or DEFAULT_MAX_TOKENS,
        temperature=opts.temperature if opts.HasField("temperature") else 1.0,
        top_k=opts.top_k,
        top_p=opts.top_p if opts.HasField("top_p") else 1.0,
        seed=opts.seed if opts.HasField("seed") else None,
        stop_token_ids=list(opts.stop_token_ids),
        stop=list(opts.stop),
        ignore_eos=opts.ignore_eos,
        logprobs=opts.logprobs,
        min_tokens=opts.min_tokens,
    )


def sampling_to_proto(p: SamplingParams) -> pb.SamplingOptions:
    opts = pb.SamplingOptions(max_tokens=p.max_tokens, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
                              stop_token_ids=p.stop_token_ids, stop=p.stop, ignore_eos=p.ignore_eos,
                              logprobs=p.logprobs, min_tokens=p.min_tokens)
    if p.seed is not None:
        opts.seed = p.seed
    return opts


def check_token_ids(ids, vocab_size: int) -> list[int]:
    out = list(ids)
    bad = next((t for t in out if t >= vocab_size), None)
    if bad is not None:
        raise InvalidRequest(f"prompt token id {bad} is outside the vocabulary [0, {vocab_size})")
    return out


def layout_to_proto(layout: KVCacheLayout) -> pb.KVLayout:
    return pb.KVLayout(num_layers=layout.num_layers, num_kv_heads=layout.num_kv_heads, head_dim=layout.head_dim,
                       block_size=layout.block_size, num_blocks=layout.num_blocks, dtype=layout.dtype,
                       order=layout.order)


_ELEMENT_SIZES = {"float32": 4, "bfloat16": 2, "float16": 2}


def layout_from_proto(msg: pb.KVLayout) -> KVCacheLayout:
    """A peer's pool layout; InvalidRequest when it is not one this version can address."""
    if msg.order not in PLANES_OF_ORDER:
        raise InvalidRequest(f"peer KV pool has dimension order {msg.order or '(unset: layer-major)'!r}; this "
                             f"worker needs {LAYOUT_ORDER!r} (or, for latent-attention models, "
                             f"{LATENT_LAYOUT_ORDER!r}): run the same pdserve version on both workers")
    if msg.dtype not in _ELEMENT_SIZES:
        raise InvalidRequest(f"peer KV pool has unknown dtype {msg.dtype!r}")
    return KVCacheLayout(msg.num_blocks, msg.num_layers, msg.block_size, msg.num_kv_heads, msg.head_dim, msg.dtype,
                         _ELEMENT_SIZES[msg.dtype], PLANES_OF_ORDER[msg.order])
