"""The OpenAI wire format of the router's HTTP API: request bodies of /v1/completions and
/v1/chat/completions parsed and checked field by field (InvalidRequest names the field), and the
response, chunk and error bodies. Owns no I/O and never touches the cluster (router/http_api.py does).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from pdserve.engine.sampling_params import MAX_TOP_LOGPROBS, SamplingParams
from pdserve.errors import InvalidRequest, NotFound
from pdserve.proto import pdserve_pb2 as pb

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context

CHAT_ROLES = ("system", "developer", "user", "assistant")

# Fields OpenAI defines that pdserve accepts only at their neutral value: name -> (allowed values, reason).
_NEUTRAL: dict[str, tuple[tuple[Any, ...], str]] = {
    "n": ((None, 1), "pdserve returns one choice per request; n must be 1"),
    "best_of": ((None, 1), "best_of is not supported; it must be 1"),
    "echo": ((None, False), "echo is not supported; it must be false"),
    "suffix": ((None, ""), "suffix is not supported"),
    "presence_penalty": ((None, 0, 0.0), "presence_penalty is not supported; it must be 0"),
    "frequency_penalty": ((None, 0, 0.0), "frequency_penalty is not supported; it must be 0"),
    "repetition_penalty": ((None, 1, 1.0), "repetition_penalty is not supported; it must be 1"),
    "logit_bias": ((None, {}), "logit_bias is not supported"),
    "response_format": ((None, {"type": "text"}), "only response_format {\"type\": \"text\"} is supported"),
    "tools": ((None, []), "tools are not supported"),
    "tool_choice": ((None, "none"), "tool_choice must be \"none\": tools are not supported"),
}

_COMMON_FIELDS = {"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids",
                  "ignore_eos", "min_tokens", "stream", "stream_options", "user", "logprobs",
                  "n", "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "response_format"}
COMPLETION_FIELDS = _COMMON_FIELDS | {"prompt", "echo", "best_of", "suffix"}
CHAT_FIELDS = _COMMON_FIELDS | {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice",
                                "parallel_tool_calls"}


class ModelNotFound(NotFound):
    param = "model"
    code = "model_not_found"


def invalid(param: str, message: str) -> InvalidRequest:
    return InvalidRequest(message, param=param)


@dataclass
class OpenAIRequest:
    """One checked request; `sampling_params` builds the engine's view once the prompt length is known."""

    model: str = ""
    prompt_text: str | None = None
    prompt_ids: list[int] | None = None
    messages: list[dict[str, str]] | None = None
    max_tokens: int | None = None
    sampling: dict[str, Any] = field(default_factory=dict)  # SamplingParams kwargs except max_tokens
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    top_logprobs: int = 0  # the chosen token is the only alternative pdserve reports

    def sampling_params(self, default_max_tokens: int) -> SamplingParams:
        try:
            return SamplingParams(max_tokens=self.max_tokens if self.max_tokens is not None
                                  else max(1, default_max_tokens), logprobs=self.logprobs, **self.sampling)
        except InvalidRequest as exc:
            if exc.param is None:
                exc.param = str(exc).split(" ", 1)[0]  # SamplingParams messages start with the field name
            raise


# ---- field checks ------------------------------------------------------------------------------

def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(body: dict, name: str, *, minimum: int | None = None, maximum: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_int(value):
        raise invalid(name, f"{name} must be an integer, got {value!r}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        bounds = f"[{minimum if minimum is not None else '-inf'}, {maximum if maximum is not None else 'inf'}]"
        raise invalid(name, f"{name} must be in {bounds}, got {value}")
    return value


def _number(body: dict, name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise invalid(name, f"{name} must be a number, got {value!r}")
    return float(value)


def _bool(body: dict, name: str) -> bool | None:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise invalid(name, f"{name} must be true or false, got {value!r}")
    return value


def _utf8(text: str, name: str) -> str:
    """JSON may carry lone surrogates (\\ud800) that no tokenizer can encode: refuse them here."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise invalid(name, f"{name} is not valid Unicode text (a lone surrogate at position {exc.start})") from None
    return text


def _int_list(value: Any, name: str) -> list[int]:
    if not isinstance(value, list) or not all(_is_int(t) for t in value):
        raise invalid(name, f"{name} must be a list of integers")
    return value


def _check_fields(body: Any, allowed: set[str]) -> dict:
    if not isinstance(body, dict):
        raise invalid("body", "the request body must be a JSON object")
    for name in body:
        if name not in allowed:
            raise invalid(name, f"unknown or unsupported field {name!r}")
    for name, (neutral, reason) in _NEUTRAL.items():
        if name in body and not any(body[name] == v and type(body[name]) is type(v) for v in neutral):
            raise invalid(name, f"{reason} (got {body[name]!r})")
    return body


def _common(body: dict, req: OpenAIRequest) -> None:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise invalid("model", f"model must be a string, got {model!r}")
    req.model = model or ""
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise invalid("user", "user must be a string")
    s = req.sampling
    for name in ("temperature", "top_p"):
        if (value := _number(body, name)) is not None:
            s[name] = value
    for name, minimum in (("top_k", -1), ("seed", 0), ("min_tokens", 0)):
        if (value := _int(body, name, minimum=minimum)) is not None:
            s[name] = value
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or not all(isinstance(x, str) for x in stop)):
        raise invalid("stop", "stop must be a string or a list of strings")
    s["stop"] = [_utf8(x, "stop") for x in stop or [] if x]
    if body.get("stop_token_ids") is not None:
        s["stop_token_ids"] = _int_list(body["stop_token_ids"], "stop_token_ids")
    s["ignore_eos"] = bool(_bool(body, "ignore_eos"))
    req.max_tokens = _int(body, "max_tokens", minimum=1)
    req.stream = bool(_bool(body, "stream"))
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise invalid("stream_options", "stream_options must be an object with only include_usage")
        if not req.stream:
            raise invalid("stream_options", "stream_options is only allowed with stream: true")
        req.include_usage = bool(_bool(options, "include_usage"))


def parse_completion(body: Any) -> OpenAIRequest:
    """A /v1/completions body: `prompt` is a string, a list of token ids, or a batch of one of those."""
    body = _check_fields(body, COMPLETION_FIELDS)
    req = OpenAIRequest()
    _common(body, req)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise invalid("prompt", f"batches of {len(prompt)} prompts are not supported: send one prompt per request")
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise invalid("prompt", "prompt is empty")
        req.prompt_text = _utf8(prompt, "prompt")
    elif isinstance(prompt, list):
        if not prompt:
            raise invalid("prompt", "prompt is empty")
        req.prompt_ids = _int_list(prompt, "prompt")
        if any(t < 0 for t in req.prompt_ids):
            raise invalid("prompt", "prompt token ids must be >= 0")
    else:
        raise invalid("prompt", "prompt is required: a string or a list of token ids")
    top = _int(body, "logprobs", minimum=0, maximum=MAX_TOP_LOGPROBS)
    req.logprobs = top is not None
    req.top_logprobs = top or 0
    return req


def _message_content(i: int, message: dict) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if content is None and message.get("role") == "assistant":
        return ""
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise invalid(f"messages[{i}].content", "only text content parts ({\"type\": \"text\", \"text\": ...}) "
                                                        "are supported")
            texts.append(part["text"])
        return "\n".join(texts)
    raise invalid(f"messages[{i}].content", "content must be a string or a list of text parts")


def parse_chat(body: Any) -> OpenAIRequest:
    """A /v1/chat/completions body; `messages` become plain {role, content} strings for the chat template."""
    body = _check_fields(body, CHAT_FIELDS)
    req = OpenAIRequest()
    _common(body, req)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "messages must be a non-empty list")
    req.messages = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise invalid(f"messages[{i}]", "each message must be an object")
        if m.get("role") not in CHAT_ROLES:
            raise invalid(f"messages[{i}].role", f"role must be one of {', '.join(CHAT_ROLES)}, got {m.get('role')!r}")
        extra = set(m) - {"role", "content", "name"}
        if extra:
            raise invalid(f"messages[{i}].{sorted(extra)[0]}", f"unsupported message field {sorted(extra)[0]!r}")
        role = "system" if m["role"] == "developer" else m["role"]
        req.messages.append({"role": role, "content": _utf8(_message_content(i, m), f"messages[{i}].content")})
    max_completion_tokens = _int(body, "max_completion_tokens", minimum=1)
    if max_completion_tokens is not None:
        if req.max_tokens is not None and req.max_tokens != max_completion_tokens:
            raise invalid("max_completion_tokens", "give max_completion_tokens or max_tokens, not both")
        req.max_tokens = max_completion_tokens
    _bool(body, "parallel_tool_calls")
    req.logprobs = bool(_bool(body, "logprobs"))
    top = _int(body, "top_logprobs", minimum=0, maximum=MAX_TOP_LOGPROBS)
    if top and not req.logprobs:
        raise invalid("top_logprobs", "top_logprobs needs logprobs: true")
    req.top_logprobs = top or 0
    return req


# ---- responses ---------------------------------------------------------------------------------

def usage_body(usage: pb.Usage) -> dict[str, Any]:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}


_ERROR_TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 413: "invalid_request_error",
                429: "rate_limit_error", 499: "request_aborted", 503: "service_unavailable", 504: "timeout"}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": _ERROR_TYPES.get(status, "internal_error" if status >= 500
                                                                  else "invalid_request_error"),
                      "param": param, "code": code}}


class ResponseBuilder:
    """Bodies of one request's response: whole (`full`) or streamed (`chunk`, `usage_chunk`)."""

    def __init__(self, chat: bool, model: str, top_logprobs: int) -> None:
        self.chat = chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.top_logprobs = top_logprobs
        self.text_offset = 0  # completions: where the next token's text starts in the output

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def logprobs(self, tokens: list[str], logprobs: list[float]) -> dict[str, Any]:
        """vLLM's shapes; each `top_logprobs` entry holds the chosen token only (pdserve reports no alternatives)."""
        if self.chat:
            return {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode()),
                                 "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())}]
                                 if self.top_logprobs else []} for t, lp in zip(tokens, logprobs)]}
        offsets = []
        for t in tokens:
            offsets.append(self.text_offset)
            self.text_offset += len(t)
        return {"tokens": tokens, "token_logprobs": logprobs, "text_offset": offsets,
                "top_logprobs": [{t: lp} for t, lp in zip(tokens, logprobs)] if self.top_logprobs else None}

    def chunk(self, text: str, logprobs: dict | None, finish_reason: str | None, first: bool = False,
              with_usage_field: bool = False) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": text} if first else (
                {"content": text} if text or not finish_reason else {})
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
            body = {**self._head("chat.completion.chunk"), "choices": [choice]}
        else:
            choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
            body = {**self._head("text_completion"), "choices": [choice]}
        if with_usage_field:
            body["usage"] = None
        return body

    def usage_chunk(self, usage: pb.Usage) -> dict[str, Any]:
        return {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [],
                "usage": usage_body(usage)}

    def full(self, text: str, logprobs: dict | None, finish_reason: str, usage: pb.Usage) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                      "finish_reason": finish_reason}
            return {**self._head("chat.completion"), "choices": [choice], "usage": usage_body(usage)}
        choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        return {**self._head("text_completion"), "choices": [choice], "usage": usage_body(usage)}
