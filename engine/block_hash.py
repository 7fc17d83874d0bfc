"""Chained block hashes: the identity of a full KV block everywhere (prefix cache, store, router).

hash(block i) = sha256(fingerprint, hash(block i-1), token ids of block i)[:16], so a block's hash
changes when any earlier token, or the model, changes. Never Python's `hash`.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence
from typing import NewType

BlockHash = NewType("BlockHash", bytes)

HASH_NBYTES = 16


def hash_block(parent: BlockHash | None, token_ids: Sequence[int], fingerprint: bytes) -> BlockHash:
    h = hashlib.sha256()
    h.update(fingerprint)
    h.update(parent if parent is not None else b"\0" * HASH_NBYTES)
    h.update(array("q", token_ids).tobytes())
    return BlockHash(h.digest()[:HASH_NBYTES])


def chain_block_hashes(token_ids: Sequence[int], block_size: int, fingerprint: bytes,
                       known: Sequence[BlockHash] = ()) -> list[BlockHash]:
    """Hashes of every *full* block of `token_ids`, reusing the already-computed prefix `known`."""
    hashes = list(known)
    for i in range(len(hashes), len(token_ids) // block_size):
        parent = hashes[-1] if hashes else None
        hashes.append(hash_block(parent, token_ids[i * block_size:(i + 1) * block_size], fingerprint))
    return hashes
