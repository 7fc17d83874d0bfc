"""Tokenizer loading, chat templates, and IncrementalDetokenizer (UTF-8 hold-back, stop strings)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from pdserve.engine.builtin_model import write_tokenizer
from pdserve.engine.tokenizer import (
    DEFAULT_CHAT_TEMPLATE,
    IncrementalDetokenizer,
    Tokenizer,
    find_stop,
    partial_stop_len,
)
from pdserve.errors import InvalidModel, InvalidRequest

TEXTS = [
    "héllo wörld 日本語 😀 emoji",
    "def main():\n    return {'a': [1, 2, 3]}\n",
    "  leading and trailing spaces  ",
    "Ünïcödé ✓ — “quotes” 🇯🇵 👩‍👩‍👧 𝔘𝔫𝔦",
    "tabs\tand\r\nnewlines\n\n",
    "",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_tokenizer(tmp_path_factory.mktemp("tok") / "tiny", size="tiny")


@pytest.fixture(scope="module")
def tok(model_dir) -> Tokenizer:
    return Tokenizer(model_dir)


def _copy_with(model_dir: Path, dest: Path, **overrides: str) -> Path:
    shutil.copytree(model_dir, dest)
    for name, content in overrides.items():
        (dest / name.replace("__", ".")).write_text(content)
    return dest


def test_special_ids_and_vocab(tok):
    assert tok.vocab_size == 2048
    assert tok.bos_token_id == 1
    assert tok.eos_token_id == 2


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    with_bos = tok.encode(text)
    assert with_bos == [1] + ids
    assert tok.decode(with_bos) == text
    assert tok.decode(with_bos, skip_special_tokens=False) == "<s>" + text


def test_encode_matches_transformers(tok, model_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(model_dir)
    for text in TEXTS:
        assert tok.encode(text) == hf(text)["input_ids"]
        assert tok.encode(text, add_special_tokens=False) == hf(text, add_special_tokens=False)["input_ids"]


def test_missing_and_malformed_files(model_dir, tmp_path):
    with pytest.raises(InvalidModel, match="tokenizer.json"):
        Tokenizer(tmp_path)
    bad_json = _copy_with(model_dir, tmp_path / "a", tokenizer__json="{not json")
    with pytest.raises(InvalidModel, match="tokenizer.json"):
        Tokenizer(bad_json)
    bad_config = _copy_with(model_dir, tmp_path / "b", tokenizer_config__json="[1, 2")
    with pytest.raises(InvalidModel, match="tokenizer_config.json"):
        Tokenizer(bad_config)
    bad_template = _copy_with(model_dir, tmp_path / "c",
                              tokenizer_config__json=json.dumps({"chat_template": "{% for %}"}))
    with pytest.raises(InvalidModel, match="chat_template"):
        Tokenizer(bad_template)


def test_no_tokenizer_config_uses_fallbacks(model_dir, tmp_path):
    bare = _copy_with(model_dir, tmp_path / "bare")
    (bare / "tokenizer_config.json").unlink()
    tok = Tokenizer(bare)
    assert tok.eos_token_id == 2  # "</s>" found by name
    assert tok.bos_token_id is None
    assert tok.chat_template is None
    # tokenizer.json's own post-processor still adds <s>
    assert tok.encode("hi")[0] == 1
    messages = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(messages) == "<|user|>\nhi\n<|assistant|>\n"


MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "héllo 😀"},
    {"role": "assistant", "content": "Hi."},
    {"role": "user", "content": "More?"},
]


def test_chat_template_default(tok):
    expected = ("<|system|>\nBe brief.\n<|user|>\nhéllo 😀\n<|assistant|>\nHi.\n<|user|>\nMore?\n"
                "<|assistant|>\n")
    assert tok.chat_template is not None  # the built-in model ships DEFAULT_CHAT_TEMPLATE as Jinja
    assert tok.apply_chat_template(MESSAGES) == expected
    assert tok.apply_chat_template(MESSAGES, add_generation_prompt=False) == expected.removesuffix("<|assistant|>\n")


def test_chat_template_matches_transformers(tok, model_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(model_dir)
    assert hf.chat_template == DEFAULT_CHAT_TEMPLATE
    assert tok.apply_chat_template(MESSAGES) == hf.apply_chat_template(MESSAGES, tokenize=False,
                                                                         add_generation_prompt=True)


def test_custom_chat_template_and_errors(model_dir, tmp_path):
    template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
                "{{ raise_exception('no system role') }}{% endif %}[{{ m['content'] }}]{% endfor %}")
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    custom = _copy_with(model_dir, tmp_path / "custom",
                        tokenizer_config__json=json.dumps({**config, "chat_template": template}))
    tok = Tokenizer(custom)
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "<s>[x]"
    with pytest.raises(InvalidRequest, match="no system role"):
        tok.apply_chat_template(MESSAGES)
    with pytest.raises(InvalidRequest):
        tok.apply_chat_template([])
    with pytest.raises(InvalidRequest):
        tok.apply_chat_template([{"role": "user"}])


# --- IncrementalDetokenizer -------------------------------------------------------------------

def _stream(tok, ids, chunk=1, **kwargs) -> tuple[list[str], IncrementalDetokenizer]:
    detok = IncrementalDetokenizer(tok, **kwargs)
    deltas = [detok.feed(ids[i:i + chunk]) for i in range(0, len(ids), chunk)]
    deltas.append(detok.flush())
    return deltas, detok


def test_multibyte_characters_split_across_tokens(tok):
    text = "héllo wörld 日本語 😀 emoji " * 3
    ids = tok.encode(text, add_special_tokens=False)
    # the test only means something if some tokens hold part of a character
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    for chunk in (1, 2, 3):
        deltas, detok = _stream(tok, ids, chunk)
        assert all("\ufffd" not in d for d in deltas)
        assert "".join(deltas) == text == detok.text


def test_only_the_cut_tail_is_held_back(tok):
    """After every token, everything before a cut character has been shown: a stream of byte
    fragments still shows progress (and a token such as 'h' + half of 'é' shows its 'h' at once)."""
    rng = random.Random(1)
    texts = ["héllo wörld 日本語 😀 emoji " * 3]
    soups = [[rng.randrange(tok.vocab_size) for _ in range(60)] for _ in range(20)]
    for ids in [tok.encode(t, add_special_tokens=False) for t in texts] + soups:
        detok = IncrementalDetokenizer(tok, skip_special_tokens=False)
        shown = ""
        for k, token_id in enumerate(ids, start=1):
            shown += detok.feed(token_id)
            assert shown == tok.decode(ids[:k], skip_special_tokens=False).rstrip("\ufffd"), (ids, k)
        assert shown + detok.flush() == tok.decode(ids, skip_special_tokens=False)


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_concatenate_to_decode(tok, text):
    ids = tok.encode(text)
    deltas, _ = _stream(tok, ids)
    assert "".join(deltas) == tok.decode(ids)


def test_random_ids_including_invalid_utf8_and_specials(tok):
    """Random ids make byte soup (lone continuation bytes, cut sequences) and special tokens."""
    rng = random.Random(0)
    for trial in range(50):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 80))]
        ids += rng.choice([[], [0], [1, 2]])
        for skip in (True, False):
            deltas, _ = _stream(tok, ids, chunk=rng.choice([1, 1, 2, 5]), skip_special_tokens=skip)
            assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip), (trial, ids)


def test_prompt_ids_are_context_only(tok):
    prompt = tok.encode("日本")
    generated = tok.encode("語 😀 done", add_special_tokens=False)
    deltas, _ = _stream(tok, generated, prompt_ids=prompt)
    assert "".join(deltas) == tok.decode(prompt + generated)[len(tok.decode(prompt)):]


def test_find_stop_and_partial():
    assert find_stop("hello world", ["wor", "lo"]) == 3
    assert find_stop("hello world", ["xyz"]) is None
    assert find_stop("abcabc", ["abc"], start=1) == 3
    assert partial_stop_len("hello wo", ["world"]) == 2
    assert partial_stop_len("hello w", ["world", "x"]) == 1
    assert partial_stop_len("hello world", ["world"]) == 0  # a full match is not a partial one
    assert partial_stop_len("aaa", ["aaab"]) == 3
    assert partial_stop_len("hello", []) == 0


def test_stop_string_truncates_and_never_shows_a_partial(tok):
    text = "héllo wörld 日本語 😀 emoji"
    stop = "wörld"
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, stop_strings=["never", stop])
    shown = ""
    for token_id in ids:
        shown += detok.feed(token_id)
        if not detok.stopped:
            assert not any(shown.endswith(stop[:n]) for n in range(1, len(stop)))
    shown += detok.flush()
    assert detok.stopped and detok.stop_string == stop
    assert shown == detok.text == "héllo "
    assert detok.feed(5) == "" and detok.flush() == ""


def test_stop_string_across_tokens_with_emoji(tok):
    text = "abc 😀😀 xyz"
    ids = tok.encode(text, add_special_tokens=False)
    deltas, detok = _stream(tok, ids, stop_strings=["😀 x"])
    assert "".join(deltas) == "abc 😀"
    assert detok.stopped


def test_held_back_partial_is_released_when_it_does_not_complete(tok):
    text = "say wör then more"
    ids = tok.encode(text, add_special_tokens=False)
    deltas, detok = _stream(tok, ids, stop_strings=["wörld"])
    assert "".join(deltas) == text
    assert not detok.stopped
    # and a partial at the very end is released by flush()
    ids = tok.encode("ends in wör", add_special_tokens=False)
    deltas, detok = _stream(tok, ids, stop_strings=["wörld"])
    assert deltas[-1].endswith("wör") and "".join(deltas) == "ends in wör"


def test_empty_stop_string_rejected(tok):
    with pytest.raises(InvalidRequest):
        IncrementalDetokenizer(tok, stop_strings=[""])
