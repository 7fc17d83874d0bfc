"""Reads a Hugging Face safetensors checkpoint (each family in engine/models/ names and shapes its
tensors), and fingerprints the model.

The fingerprint (config + weight bytes) goes into every block hash, so KV from another model
can never be mistaken for ours. It is computed once per model version and cached.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
import xxhash
from safetensors import SafetensorError
from safetensors.torch import load_file

from pdserve.errors import InvalidModel


class Checkpoint:
    """A checkpoint's tensors by name; `take` checks each against the shape the config implies."""

    def __init__(self, tensors: dict[str, torch.Tensor], source: str | Path, dtype: torch.dtype, device: str) -> None:
        self.tensors, self.source, self.dtype, self.device = tensors, str(source), dtype, device

    def has(self, name: str) -> bool:
        return name in self.tensors

    def take(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """The tensor in the model's dtype and device; InvalidModel naming it and both shapes if it does not fit."""
        if name not in self.tensors:
            raise InvalidModel(f"{self.source}: weight '{name}' is missing (config implies shape {shape})")
        t = self.tensors[name]
        if tuple(t.shape) != shape:
            raise InvalidModel(f"{self.source}: weight '{name}' has shape {tuple(t.shape)}, config implies {shape}")
        return t.to(dtype=self.dtype, device=self.device)

    def take_float32(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """As `take`, kept in float32 (router gates and biases, computed in full precision as transformers does)."""
        return self.take(name, shape).float()


def _safetensors_files(model_dir: Path) -> list[Path]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise InvalidModel(f"{model_dir}: no *.safetensors weight files found")
    return files


FINGERPRINT_FILE = ".pdserve-fingerprint.json"


def _fingerprint_key(model_dir: Path) -> dict:
    """What the cached fingerprint is valid for: config.json's bytes and each weight file's size and mtime."""
    return {"config_sha256": hashlib.sha256((model_dir / "config.json").read_bytes()).hexdigest(),
            "files": {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in _safetensors_files(model_dir)}}


def _fingerprint_cache_paths(model_dir: Path) -> list[Path]:
    """Beside the model, else (a read-only model directory) under ~/.cache/pdserve/fingerprints."""
    digest = hashlib.sha256(str(model_dir.resolve()).encode()).hexdigest()[:24]
    return [model_dir / FINGERPRINT_FILE, Path.home() / ".cache" / "pdserve" / "fingerprints" / f"{digest}.json"]


def compute_model_fingerprint(model_dir: str | Path) -> bytes:
    """16 bytes identifying this exact model: config.json plus every weight byte (reads them all)."""
    model_dir = Path(model_dir)
    h = hashlib.sha256()
    h.update((model_dir / "config.json").read_bytes())
    for path in _safetensors_files(model_dir):
        digest = xxhash.xxh3_128()
        with path.open("rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
        h.update(path.name.encode())
        h.update(digest.digest())
    return h.digest()[:16]


def model_fingerprint(model_dir: str | Path) -> bytes:
    """`compute_model_fingerprint`, hashed once per model version: the result is cached (beside the
    model, or under ~/.cache) keyed by config.json's bytes and each weight file's size and mtime, so
    later starts of any process skip reading every weight byte."""
    model_dir = Path(model_dir)
    key = _fingerprint_key(model_dir)
    paths = _fingerprint_cache_paths(model_dir)
    for path in paths:
        try:
            cached = json.loads(path.read_text())
            if cached.get("key") == key:
                return bytes.fromhex(cached["fingerprint"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    fingerprint = compute_model_fingerprint(model_dir)
    record = json.dumps({"key": key, "fingerprint": fingerprint.hex()})
    for path in paths:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(record)
            os.replace(tmp, path)
            break
        except OSError:
            continue
    return fingerprint


def read_checkpoint(model_dir: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Checkpoint:
    """Every tensor of the directory's *.safetensors files (on the CPU until a family `take`s it)."""
    model_dir = Path(model_dir)
    tensors: dict[str, torch.Tensor] = {}
    for path in _safetensors_files(model_dir):
        try:
            tensors.update(load_file(str(path), device="cpu"))
        except (SafetensorError, OSError, json.JSONDecodeError) as exc:
            raise InvalidModel(f"{path}: cannot read safetensors file ({exc})") from exc
    return Checkpoint(tensors, model_dir, dtype, device)
