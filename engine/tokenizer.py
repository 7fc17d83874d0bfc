"""Text <-> token ids for a Hugging Face model directory, chat templates, and streaming detokenization.

Owns `tokenizer.json` / `tokenizer_config.json` and stop strings; never samples or decides when a
sequence ends on eos (the engine does, using `eos_token_id`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

from pdserve.errors import InvalidModel, InvalidRequest

# The chat format used when tokenizer_config.json has no `chat_template`, or jinja2 is not
# installed. For messages [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
# it renders "<|system|>\nS\n<|user|>\nU\n<|assistant|>\n" (the last line only when a generation
# prompt is asked for). The built-in model ships it as its Jinja `chat_template`, so both paths
# (and transformers' `apply_chat_template`) agree on it.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

# eos names tried, in order, when tokenizer_config.json names none.
_FALLBACK_EOS_TOKENS = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<|eot_id|>", "<|im_end|>", "<eos>")

_REPLACEMENT_CHAR = "\ufffd"


def _render_default_chat(messages: Sequence[dict[str, str]], add_generation_prompt: bool) -> str:
    parts = [f"<|{m['role']}|>\n{m['content']}\n" for m in messages]
    if add_generation_prompt:
        parts.append("<|assistant|>\n")
    return "".join(parts)


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json spells it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """A `tokenizers` tokenizer plus the bos/eos/chat settings of tokenizer_config.json."""

    def __init__(self, model_dir: str | Path) -> None:
        model_dir = Path(model_dir)
        tokenizer_path = model_dir / "tokenizer.json"
        if not tokenizer_path.is_file():
            raise InvalidModel(f"{tokenizer_path}: file not found (only tokenizer.json tokenizers are supported)")
        try:
            self._tok = HFTokenizer.from_file(str(tokenizer_path))
        except Exception as exc:  # the Rust side raises a bare Exception on malformed JSON
            raise InvalidModel(f"{tokenizer_path}: cannot load tokenizer: {exc}") from exc

        config: dict[str, Any] = {}
        config_path = model_dir / "tokenizer_config.json"
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise InvalidModel(f"{config_path}: malformed JSON: {exc}") from exc
            if not isinstance(config, dict):
                raise InvalidModel(f"{config_path}: expected a JSON object")

        self.bos_token = _token_content(config.get("bos_token"))
        self._bos_token_id = self._tok.token_to_id(self.bos_token) if self.bos_token else None
        if self.bos_token and self._bos_token_id is None:
            raise InvalidModel(f"{config_path}: bos_token {self.bos_token!r} is not in tokenizer.json")
        # tokenizer.json's post-processor may add bos itself; `add_bos_token` adds it when it does not.
        self._add_bos_token = bool(config.get("add_bos_token", False)) and self._bos_token_id is not None

        self.eos_token = _token_content(config.get("eos_token"))
        if self.eos_token is None:
            self.eos_token = next((t for t in _FALLBACK_EOS_TOKENS if self._tok.token_to_id(t) is not None), None)
        eos_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        if eos_id is None:
            raise InvalidModel(f"{config_path}: no eos_token, and tokenizer.json has none of {_FALLBACK_EOS_TOKENS}")
        self._eos_token_id: int = eos_id

        self.chat_template = self._compile_chat_template(config.get("chat_template"), config_path)

    def _compile_chat_template(self, source: Any, config_path: Path) -> Any:
        """The compiled Jinja template, or None to use DEFAULT_CHAT_TEMPLATE's plain-Python twin."""
        if isinstance(source, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            source = next((t.get("template") for t in source if isinstance(t, dict) and t.get("name") == "default"), None)
        if not isinstance(source, str) or not source:
            return None
        try:
            from jinja2.exceptions import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:
            return None
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        env.globals["raise_exception"] = raise_exception
        try:
            return env.from_string(source)
        except TemplateError as exc:
            raise InvalidModel(f"{config_path}: chat_template does not compile: {exc}") from exc

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (may be less than the model's embedding rows)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_id(self) -> int:
        return self._eos_token_id

    @property
    def bos_token_id(self) -> int | None:
        return self._bos_token_id

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self._add_bos_token and (not ids or ids[0] != self._bos_token_id):
            ids.insert(0, self._bos_token_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt text for a chat: the model's Jinja template, else DEFAULT_CHAT_TEMPLATE's format.

        The text already holds any bos the template writes; encode it with add_special_tokens=True
        only for templates that do not (the default one does not).
        """
        if not isinstance(messages, list) or not messages:
            raise InvalidRequest("messages must be a non-empty list")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise InvalidRequest(f"messages[{i}] must be an object with string 'role' and 'content'")
        if self.chat_template is None:
            return _render_default_chat(messages, add_generation_prompt)
        from jinja2.exceptions import TemplateError

        try:
            return self.chat_template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except TemplateError as exc:  # e.g. raise_exception("roles must alternate user/assistant")
            raise InvalidRequest(f"chat template rejected the messages: {exc}") from exc


def find_stop(text: str, stop_strings: Sequence[str], start: int = 0) -> int | None:
    """Index in `text` where the earliest stop string begins (at or after `start`), or None."""
    found = [i for s in stop_strings if (i := text.find(s, start)) != -1]
    return min(found) if found else None


def partial_stop_len(text: str, stop_strings: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    longest = 0
    for s in stop_strings:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest


class IncrementalDetokenizer:
    """Turns a stream of generated token ids into text deltas for one sequence.

    Decodes a short window `ids[prefix_offset:]` and emits what it adds over `ids[prefix_offset:
    read_offset]`; when the window's text ends in U+FFFD (a multi-byte character split across
    byte-level tokens), the text before it is emitted at once and only that tail is held back
    until a later token completes it. So deltas never carry a broken character, and all deltas plus `flush()` equal `decode(ids)`, cut before the first stop
    string when one occurs. A trailing partial stop string is held back until it either completes
    (then it is dropped) or cannot (then it is emitted).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        skip_special_tokens: bool = True,
        stop_strings: Sequence[str] = (),
        prompt_ids: Sequence[int] = (),
    ) -> None:
        """`prompt_ids`: the tail of the prompt, as context only (spacing of sentencepiece tokens)."""
        if any(not isinstance(s, str) or not s for s in stop_strings):
            raise InvalidRequest("stop strings must be non-empty strings")
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._stop_strings = tuple(stop_strings)
        self._max_stop_len = max((len(s) for s in self._stop_strings), default=0)
        # The decode window: ids[:read_offset] are already in `_text`; ids[:prefix_offset] are
        # dropped, the rest kept as context so the window decodes the way the whole sequence would.
        context = list(prompt_ids[-6:])
        self._window_ids: list[int] = context
        self._read_offset = len(context)
        self._text = ""  # decoded text of every generated token up to read_offset
        self._pending = ""  # complete text of the tokens after read_offset, before their cut tail
        self._num_emitted_chars = 0
        self.num_tokens = 0
        self.stop_string: str | None = None  # the stop string that ended the sequence, if any

    @property
    def stopped(self) -> bool:
        return self.stop_string is not None

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return (self._text + self._pending)[: self._num_emitted_chars]

    def feed(self, token_ids: int | Iterable[int]) -> str:
        """Adds generated token(s); returns the text they make newly safe to show (maybe '')."""
        if self.stopped:
            return ""
        new_ids = [token_ids] if isinstance(token_ids, int) else list(token_ids)
        self.num_tokens += len(new_ids)
        self._window_ids.extend(new_ids)
        self._advance(final=False)
        return self._emit(final=False)

    def flush(self) -> str:
        """Call once when the sequence ends: returns everything still held back."""
        if self.stopped:
            return ""
        self._advance(final=True)
        return self._emit(final=True)

    def _advance(self, final: bool) -> None:
        """Moves complete text from the decode window into `_text`."""
        if self._read_offset == len(self._window_ids):
            return
        decode = self._tokenizer.decode
        prefix_text = decode(self._window_ids[: self._read_offset], self._skip_special_tokens)
        new_text = decode(self._window_ids, self._skip_special_tokens)
        if len(new_text) <= len(prefix_text):
            return
        if new_text.endswith(_REPLACEMENT_CHAR) and not final:
            # Bytes before a cut character never change when later bytes arrive: show them now.
            self._pending = new_text[len(prefix_text):].rstrip(_REPLACEMENT_CHAR)
            return
        self._text += new_text[len(prefix_text):]
        self._pending = ""
        self._window_ids = self._window_ids[self._read_offset:]
        self._read_offset = len(self._window_ids)

    def _emit(self, final: bool) -> str:
        text = self._text + self._pending
        if self._stop_strings:
            # a stop string can only begin where it could not have been seen on an earlier call
            start = max(0, self._num_emitted_chars - self._max_stop_len + 1)
            stop_at = find_stop(text, self._stop_strings, start)
            if stop_at is not None:
                self.stop_string = min(
                    (s for s in self._stop_strings if text.startswith(s, stop_at)), key=len)
                self._text, self._pending = text[:stop_at], ""
                end = stop_at
            elif final:
                end = len(text)
            else:
                end = len(text) - partial_stop_len(text, self._stop_strings)
        else:
            end = len(text)
        delta = text[self._num_emitted_chars:end]
        self._num_emitted_chars = max(self._num_emitted_chars, end)
        return delta
