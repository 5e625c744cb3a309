"""OpenAI's completion request and response shapes, checked strictly: anything the server cannot
honour is a 4xx error in OpenAI's error shape, never a silently ignored parameter or a 500."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass


@dataclass
class Limits:
    max_body_bytes: int = 1 << 20  # 1 MiB of JSON is far more than any prompt a small model's context holds
    max_tokens: int = 1024
    max_n: int = 16
    max_prompts: int = 64
    max_rows: int = 64  # n x prompts of one request
    max_stop: int = 4  # as OpenAI


class ApiError(Exception):
    """An error answered to the client as {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# parameters OpenAI defines that this server does not implement: refused unless left at their no-op value
UNSUPPORTED = {
    "logprobs": (None, 0),
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
}
IGNORED = {"user", "stream_options"}  # harmless: no effect on the completion (stream_options read below)
KNOWN = {"model", "prompt", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream"}


@dataclass
class CompletionRequest:
    model: str
    prompts: list[str]
    max_tokens: int
    temperature: float
    top_p: float
    n: int
    stop: tuple[str, ...]
    seed: int | None
    stream: bool
    include_usage: bool


def parse_json(raw: bytes):
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"The request body is not valid JSON ({exc}).", code="invalid_json") from None


def _number(data: dict, key: str, default, lo, hi, integer: bool = False):
    value = data.get(key, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        kind = "an integer" if integer else "a number"
        raise ApiError(400, f"'{key}' must be {kind}, got {json.dumps(value)}.", param=key, code="invalid_type")
    if not lo <= value <= hi:
        raise ApiError(400, f"'{key}' is {value}; it must be between {lo} and {hi}.", param=key, code="invalid_value")
    return value


def parse_completion(data, limits: Limits) -> CompletionRequest:
    if not isinstance(data, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    for key, allowed in UNSUPPORTED.items():
        if key in data and data[key] not in allowed:
            raise ApiError(400, f"'{key}' is not supported by lorafit serve; leave it out.", param=key,
                           code="unsupported_parameter")
    unknown = sorted(set(data) - KNOWN - IGNORED - set(UNSUPPORTED))
    if unknown:
        raise ApiError(400, f"Unknown parameter(s): {', '.join(unknown)}.", param=unknown[0], code="unknown_parameter")
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "'model' is required: the base model's name or an adapter's (see GET /v1/models).",
                       param="model", code="missing_required_parameter")
    prompt = data.get("prompt", "")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ApiError(400, "'prompt' must be a string or a non-empty list of strings (token arrays are not supported).",
                       param="prompt", code="invalid_type")
    if len(prompts) > limits.max_prompts:
        raise ApiError(400, f"{len(prompts)} prompts in one request; at most {limits.max_prompts}.", param="prompt",
                       code="invalid_value")
    n = _number(data, "n", 1, 1, limits.max_n, integer=True)
    if n * len(prompts) > limits.max_rows:
        raise ApiError(400, f"n x prompts = {n * len(prompts)} completions in one request; at most {limits.max_rows}.",
                       param="n", code="invalid_value")
    stop = data.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > limits.max_stop:
        raise ApiError(400, f"'stop' must be a non-empty string or a list of at most {limits.max_stop} of them.",
                       param="stop", code="invalid_value")
    seed = data.get("seed")
    if seed is not None:
        seed = _number(data, "seed", 0, 0, 2**63 - 1, integer=True)
    stream = data.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false.", param="stream", code="invalid_type")
    options = data.get("stream_options") or {}
    return CompletionRequest(
        model=model,
        prompts=prompts,
        max_tokens=_number(data, "max_tokens", 16, 1, limits.max_tokens, integer=True),
        temperature=float(_number(data, "temperature", 1.0, 0.0, 2.0)),
        top_p=float(_number(data, "top_p", 1.0, 0.0, 1.0)) or 1e-9,  # 0: only the most likely token
        n=n,
        stop=tuple(stops),
        seed=seed,
        stream=stream,
        include_usage=bool(isinstance(options, dict) and options.get("include_usage")),
    )


def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex[:24]}"


def choice(text: str, index: int, finish_reason: str | None) -> dict:
    return {"text": text, "index": index, "logprobs": None, "finish_reason": finish_reason}


def completion(cid: str, created: int, model: str, choices: list[dict], usage: dict | None) -> dict:
    body = {"id": cid, "object": "text_completion", "created": created, "model": model, "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return body


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def now() -> int:
    return int(time.time())
