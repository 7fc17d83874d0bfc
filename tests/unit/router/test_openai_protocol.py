"""router/openai_protocol.py: every bad request body is an InvalidRequest (HTTP 400) naming its field;
good ones become the right prompt and SamplingParams; response bodies have OpenAI's shape."""

from __future__ import annotations

import math

import pytest

from pdserve.errors import InvalidRequest, http_status_of
from pdserve.proto import pdserve_pb2 as pb
from pdserve.router.openai_protocol import (ModelNotFound, ResponseBuilder, error_body, parse_chat,
                                            parse_completion)

MSGS = [{"role": "user", "content": "hi"}]

# (parser, body, the field the error must name)
BAD = [
    (parse_completion, [], "body"),
    (parse_completion, "prompt", "body"),
    (parse_completion, {}, "prompt"),
    (parse_completion, {"prompt": ""}, "prompt"),
    (parse_completion, {"prompt": []}, "prompt"),
    (parse_completion, {"prompt": 5}, "prompt"),
    (parse_completion, {"prompt": [1, "a"]}, "prompt"),
    (parse_completion, {"prompt": [1, -2]}, "prompt"),
    (parse_completion, {"prompt": [1, True]}, "prompt"),
    (parse_completion, {"prompt": ["a", "b"]}, "prompt"),
    (parse_completion, {"prompt": [[1], [2]]}, "prompt"),
    (parse_completion, {"prompt": "x", "n": 2}, "n"),
    (parse_completion, {"prompt": "x", "best_of": 3}, "best_of"),
    (parse_completion, {"prompt": "x", "echo": True}, "echo"),
    (parse_completion, {"prompt": "x", "suffix": "y"}, "suffix"),
    (parse_completion, {"prompt": "x", "presence_penalty": 0.5}, "presence_penalty"),
    (parse_completion, {"prompt": "x", "frequency_penalty": 1}, "frequency_penalty"),
    (parse_completion, {"prompt": "x", "logit_bias": {"1": 5}}, "logit_bias"),
    (parse_completion, {"prompt": "x", "bogus": 1}, "bogus"),
    (parse_completion, {"prompt": "x", "messages": MSGS}, "messages"),
    (parse_completion, {"prompt": "x", "model": 3}, "model"),
    (parse_completion, {"prompt": "x", "max_tokens": "8"}, "max_tokens"),
    (parse_completion, {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    (parse_completion, {"prompt": "x", "max_tokens": 1.5}, "max_tokens"),
    (parse_completion, {"prompt": "x", "max_tokens": True}, "max_tokens"),
    (parse_completion, {"prompt": "x", "temperature": "hot"}, "temperature"),
    (parse_completion, {"prompt": "x", "top_p": [1]}, "top_p"),
    (parse_completion, {"prompt": "x", "top_k": 1.0}, "top_k"),
    (parse_completion, {"prompt": "x", "top_k": -2}, "top_k"),
    (parse_completion, {"prompt": "x", "seed": -1}, "seed"),
    (parse_completion, {"prompt": "x", "seed": "1"}, "seed"),
    (parse_completion, {"prompt": "x", "stop": 3}, "stop"),
    (parse_completion, {"prompt": "x", "stop": ["a", 1]}, "stop"),
    (parse_completion, {"prompt": "x", "stop_token_ids": [1.5]}, "stop_token_ids"),
    (parse_completion, {"prompt": "x", "stop_token_ids": 7}, "stop_token_ids"),
    (parse_completion, {"prompt": "x", "ignore_eos": "yes"}, "ignore_eos"),
    (parse_completion, {"prompt": "x", "min_tokens": -1}, "min_tokens"),
    (parse_completion, {"prompt": "x", "stream": 1}, "stream"),
    (parse_completion, {"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    (parse_completion, {"prompt": "x", "stream": True, "stream_options": {"x": 1}}, "stream_options"),
    (parse_completion, {"prompt": "x", "stream": True, "stream_options": {"include_usage": 1}}, "include_usage"),
    (parse_completion, {"prompt": "x", "logprobs": True}, "logprobs"),
    (parse_completion, {"prompt": "x", "logprobs": 21}, "logprobs"),
    (parse_completion, {"prompt": "x", "logprobs": -1}, "logprobs"),
    (parse_completion, {"prompt": "x", "user": 5}, "user"),
    (parse_chat, {}, "messages"),
    (parse_chat, {"messages": []}, "messages"),
    (parse_chat, {"messages": "hi"}, "messages"),
    (parse_chat, {"messages": ["hi"]}, "messages[0]"),
    (parse_chat, {"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    (parse_chat, {"messages": [{"role": "user"}]}, "messages[0].content"),
    (parse_chat, {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    (parse_chat, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content"),
    (parse_chat, {"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    (parse_chat, {"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages[0].tool_calls"),
    (parse_chat, {"messages": MSGS, "prompt": "x"}, "prompt"),
    (parse_chat, {"messages": MSGS, "logprobs": 1}, "logprobs"),
    (parse_chat, {"messages": MSGS, "top_logprobs": 2}, "top_logprobs"),
    (parse_chat, {"messages": MSGS, "logprobs": True, "top_logprobs": 99}, "top_logprobs"),
    (parse_chat, {"messages": MSGS, "max_completion_tokens": 0}, "max_completion_tokens"),
    (parse_chat, {"messages": MSGS, "max_tokens": 4, "max_completion_tokens": 5}, "max_completion_tokens"),
    (parse_chat, {"messages": MSGS, "tools": [{"type": "function"}]}, "tools"),
    (parse_chat, {"messages": MSGS, "tool_choice": "auto"}, "tool_choice"),
    (parse_chat, {"messages": MSGS, "response_format": {"type": "json_object"}}, "response_format"),
    (parse_chat, {"messages": MSGS, "n": 2}, "n"),
    (parse_chat, {"messages": MSGS, "echo": False}, "echo"),
]


@pytest.mark.parametrize("parse,body,param", BAD, ids=[f"{p.__name__}-{i}-{b}" for i, (p, _, b) in enumerate(BAD)])
def test_bad_request_names_field(parse, body, param):
    with pytest.raises(InvalidRequest) as info:
        parse(body)
    assert info.value.param == param
    assert http_status_of(info.value) == 400
    assert str(info.value)


# Values only SamplingParams can judge: raised when the params are built, still 400 with the field named.
BAD_SAMPLING = [
    ({"temperature": -1}, "temperature"),
    ({"temperature": math.nan}, "temperature"),
    ({"temperature": 101}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"seed": 2**63}, "seed"),
    ({"max_tokens": 4, "min_tokens": 5}, "min_tokens"),
    ({"stop": ["a"] * 17}, "stop"),
]


@pytest.mark.parametrize("extra,param", BAD_SAMPLING)
def test_bad_sampling_value_names_field(extra, param):
    req = parse_completion({"prompt": "x", **extra})
    with pytest.raises(InvalidRequest) as info:
        req.sampling_params(16)
    assert info.value.param == param
    assert http_status_of(info.value) == 400


def test_completion_parses_fields():
    req = parse_completion({"model": "m", "prompt": [[3, 4, 5]], "max_tokens": 7, "temperature": 0, "top_p": 0.5,
                            "top_k": 3, "seed": 11, "stop": "\n", "stop_token_ids": [9], "ignore_eos": True,
                            "min_tokens": 2, "stream": True, "stream_options": {"include_usage": True},
                            "logprobs": 2, "n": 1, "echo": False, "presence_penalty": 0, "user": "u"})
    assert (req.model, req.prompt_ids, req.prompt_text) == ("m", [3, 4, 5], None)
    assert req.stream and req.include_usage and req.logprobs and req.top_logprobs == 2
    p = req.sampling_params(16)
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.seed) == (7, 0.0, 0.5, 3, 11)
    assert (p.stop, p.stop_token_ids, p.ignore_eos, p.min_tokens, p.logprobs) == (["\n"], [9], True, 2, True)


def test_completion_defaults():
    req = parse_completion({"prompt": ["hello"]})
    assert req.prompt_text == "hello" and not req.stream and not req.logprobs
    p = req.sampling_params(16)
    assert (p.max_tokens, p.temperature, p.top_p, p.stop) == (16, 1.0, 1.0, [])
    assert parse_completion({"prompt": "x", "logprobs": 0}).logprobs  # 0: chosen token's logprob only


def test_chat_parses_messages():
    req = parse_chat({"messages": [{"role": "developer", "content": "be brief"},
                                   {"role": "user", "name": "ann", "content": [{"type": "text", "text": "a"},
                                                                               {"type": "text", "text": "b"}]},
                                   {"role": "assistant", "content": None}],
                      "max_completion_tokens": 5, "logprobs": True, "top_logprobs": 1})
    assert req.messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a\nb"},
                            {"role": "assistant", "content": ""}]
    assert req.sampling_params(100).max_tokens == 5 and req.logprobs and req.top_logprobs == 1
    assert parse_chat({"messages": MSGS}).sampling_params(100).max_tokens == 100  # default: rest of the context


def test_errors_have_openai_shape():
    body = error_body(400, "bad", "n")
    assert body == {"error": {"message": "bad", "type": "invalid_request_error", "param": "n", "code": None}}
    exc = ModelNotFound("no such model")
    assert http_status_of(exc) == 404 and exc.param == "model" and exc.code == "model_not_found"


def test_response_bodies():
    usage = pb.Usage(prompt_tokens=3, completion_tokens=2, cached_tokens=1)
    out = ResponseBuilder(chat=False, model="m", top_logprobs=1)
    whole = out.full("ab", out.logprobs(["a", "b"], [-0.5, -0.25]), "length", usage)
    assert whole["object"] == "text_completion" and whole["choices"][0]["text"] == "ab"
    assert whole["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5,
                              "prompt_tokens_details": {"cached_tokens": 1}}
    lp = whole["choices"][0]["logprobs"]
    assert lp["token_logprobs"] == [-0.5, -0.25] and lp["text_offset"] == [0, 1]
    assert lp["top_logprobs"][1] == {"b": -0.25}
    chat = ResponseBuilder(chat=True, model="m", top_logprobs=0)
    first = chat.chunk("", None, None, first=True, with_usage_field=True)
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"] == {"role": "assistant",
                                                                                         "content": ""}
    assert first["usage"] is None
    assert chat.chunk("", None, "stop")["choices"][0]["delta"] == {}
    assert chat.usage_chunk(usage)["choices"] == [] and chat.usage_chunk(usage)["usage"]["total_tokens"] == 5
    lp = chat.logprobs(["é"], [-1.0])["content"][0]
    assert lp == {"token": "é", "logprob": -1.0, "bytes": [195, 169], "top_logprobs": []}
