"""Helpers for the transfer unit tests (conftest.py puts this folder on the path)."""

from __future__ import annotations

import asyncio
import secrets

import numpy as np


async def push_whole(sender, receiver, src: np.ndarray) -> np.ndarray:
    """Register `src` on the sender and a zeroed twin on the receiver, expect all of it under a fresh token, push it
    whole and wait until it landed; returns the receiver's copy."""
    dst = np.zeros_like(src)
    sender.register_buffer("src", src)
    receiver.register_buffer("dst", dst)
    token = secrets.token_bytes(16)
    exp = receiver.expect(token, "dst", [(0, src.nbytes)], 5.0)
    await sender.push(receiver.address, token, "src", [(0, src.nbytes)], [(0, src.nbytes)])
    await asyncio.wait_for(exp.wait(), 5)
    return dst
