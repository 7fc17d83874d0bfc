"""Token ids <-> prompt text for the harness: the model's tokenizer when given, else a stand-in.

`TokenCodec` draws prompt ids from the ordinary (non-special) vocabulary, decodes ids to text
for servers that take text, and counts tokens of generated text. Without a tokenizer it spells
each id as a made-up word, so text prompts have roughly (not exactly) the intended length.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# Without a tokenizer, ids below this are skipped: small ids are often BOS/EOS/PAD.
FIRST_ORDINARY_ID = 10

_SYLLABLES = ("ka", "lo", "mi", "nu", "re", "sa", "ti", "vo", "be", "da", "fe", "go", "hi", "ju", "po", "zu",
              "ra", "le", "no", "ma", "si", "tu", "ve", "wo", "ba", "de", "fi", "gu", "ho", "ke", "pa", "zo")


class TokenCodec:
    def __init__(self, tokenizer_dir: str | None, vocab_size: int) -> None:
        self._tokenizer = None
        if tokenizer_dir is not None:
            from tokenizers import Tokenizer

            self._tokenizer = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
            special_ids = set(self._tokenizer.get_added_tokens_decoder())
            self.ordinary_ids = np.array(
                [i for i in range(self._tokenizer.get_vocab_size()) if i not in special_ids], dtype=np.int64)
        else:
            self.ordinary_ids = np.arange(FIRST_ORDINARY_ID, vocab_size, dtype=np.int64)

    @property
    def has_tokenizer(self) -> bool:
        return self._tokenizer is not None

    def sample_ids(self, rng: np.random.Generator, num_tokens: int) -> list[int]:
        return rng.choice(self.ordinary_ids, size=num_tokens).tolist()

    def decode(self, token_ids: list[int]) -> str:
        if self._tokenizer is not None:
            return self._tokenizer.decode(token_ids, skip_special_tokens=True)
        n = len(_SYLLABLES)
        return " ".join(_SYLLABLES[i % n] + _SYLLABLES[(i // n) % n] for i in token_ids)

    def count(self, text: str) -> int | None:
        """Tokens in `text` by the model's tokenizer; None without one."""
        if self._tokenizer is None:
            return None
        return len(self._tokenizer.encode(text, add_special_tokens=False).ids)
