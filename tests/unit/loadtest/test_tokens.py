"""TokenCodec with a real (tiny, word-level) tokenizer.json and without one."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pdserve.loadtest.tokens import FIRST_ORDINARY_ID, TokenCodec


def test_with_tokenizer(word_tokenizer_dir: Path) -> None:
    codec = TokenCodec(str(word_tokenizer_dir), vocab_size=1000)
    assert codec.has_tokenizer
    assert 0 not in codec.ordinary_ids and 1 not in codec.ordinary_ids
    ids = codec.sample_ids(np.random.default_rng(0), 30)
    text = codec.decode(ids)
    assert codec.count(text) == 30
    assert codec.count("t0 t1 t2 ") == 3


def test_without_tokenizer() -> None:
    codec = TokenCodec(None, vocab_size=500)
    assert not codec.has_tokenizer and codec.count("anything") is None
    ids = codec.sample_ids(np.random.default_rng(0), 40)
    assert all(FIRST_ORDINARY_ID <= i < 500 for i in ids)
    assert len(codec.decode(ids).split()) == 40
