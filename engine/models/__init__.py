"""The model registry: which family module serves each `architectures` entry of a config.json.

A family is one module here exposing `FAMILY` (a `ModelFamily`: config parser, weight loader and
forward over the paged cache, KV layout through its config's `kv_spec`); registering it is one line
in `FAMILIES`. The engine calls `load_model` and never names a family.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pdserve.engine.loader import read_checkpoint
from pdserve.engine.model_config import ModelConfig
from pdserve.engine.models import deepseek, llama, mixtral, qwen3, qwen_moe
from pdserve.engine.models.base import BuildOptions, DecoderModel, ModelFamily
from pdserve.errors import InvalidModel

FAMILIES: tuple[ModelFamily, ...] = (llama.FAMILY, qwen3.FAMILY, mixtral.FAMILY, qwen_moe.FAMILY, deepseek.FAMILY)
ARCHITECTURES: dict[str, ModelFamily] = {arch: f for f in FAMILIES for arch in f.architectures}


def supported_architectures() -> list[str]:
    return sorted(ARCHITECTURES)


def family_for(raw: dict[str, Any], source: str) -> tuple[str, ModelFamily]:
    """(architecture, family) for a raw config; InvalidModel listing the supported ones otherwise."""
    archs = raw.get("architectures") or []
    arch = next((a for a in archs if a in ARCHITECTURES), None)
    if arch is None:
        raise InvalidModel(f"{source}: field 'architectures' = {archs!r} is not supported; "
                           f"supported: {supported_architectures()}")
    return arch, ARCHITECTURES[arch]


__all__ = ["ARCHITECTURES", "FAMILIES", "BuildOptions", "DecoderModel", "family_for", "load_model",
           "supported_architectures"]


def load_model(model_dir: str | Path, config: ModelConfig, opts: BuildOptions, dtype: torch.dtype = torch.float32,
               device: str = "cpu") -> DecoderModel:
    """The model of `config`'s family with the directory's weights (shapes checked against the config)."""
    _, family = family_for({"architectures": [config.architecture]}, str(model_dir))
    return family.build(config, read_checkpoint(model_dir, dtype, device), opts)
