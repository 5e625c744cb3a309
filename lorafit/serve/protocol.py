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
    max_stop_chars: int = 256  # each stop string: matching them costs every co-batched row, so it is bounded
    max_depth: int = 32  # JSON nesting; a completion request needs 3
    body_timeout_s: float = 30.0  # the whole body must arrive within this (a stalled body holds a connection)


class ApiError(Exception):
    """An error answered to the client as {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(exc: ApiError):
    """The app's one way to answer a bad request: OpenAI's error shape, rendered so that it cannot fail."""
    from starlette.responses import Response  # optional extra: [serve]; this module itself imports without it

    return Response(render_json(exc.body()), status_code=exc.status, media_type="application/json",
                    headers=exc.headers)


def render_json(obj) -> bytes:
    """JSON as bytes that cannot fail on text from a client: ASCII escapes carry lone surrogates
    (which UTF-8 cannot encode) through unchanged."""
    return json.dumps(obj, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def shown(value, limit: int = 80) -> str:
    """A client's value inside a message: JSON-quoted (surrogates escaped), cut to `limit` characters."""
    try:
        text = json.dumps(value, ensure_ascii=True) if isinstance(value, str) else repr(value)
    except ValueError:  # an int beyond Python's str() digit limit
        text = f"<an integer of about {value.bit_length() * 30103 // 100000} digits>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


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


def parse_json(raw: bytes, max_depth: int = 32):
    """The body as JSON, refused with a 400 when it is not JSON, nests deeper than `max_depth`, holds
    a number Python will not convert (over 4,300 digits), or a string with a lone surrogate."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"The request body is not valid JSON ({shown(str(exc), 200)}).", code="invalid_json") from None
    except RecursionError:
        raise ApiError(400, f"The request body nests too deeply; at most {max_depth} levels.", code="invalid_json") from None
    except ValueError as exc:  # int digits over sys.get_int_max_str_digits()
        raise ApiError(400, f"The request body holds a number too long to read ({shown(str(exc), 120)}).",
                       code="invalid_json") from None
    check_values(data, max_depth)
    return data


def check_values(data, max_depth: int) -> None:
    """Walk the parsed body (without recursion): bounded depth, and text that is valid Unicode
    (a lone surrogate such as "\\ud800" cannot be tokenised or written back as UTF-8)."""
    stack = [(data, 1, None)]
    while stack:
        value, depth, where = stack.pop()
        if depth > max_depth:
            raise ApiError(400, f"The request body nests too deeply; at most {max_depth} levels.", code="invalid_json")
        if isinstance(value, dict):
            for key, item in value.items():
                if not is_unicode(key):
                    raise ApiError(400, f"A parameter name holds a lone surrogate: {shown(key)}.", code="invalid_value")
                stack.append((item, depth + 1, where or key))
        elif isinstance(value, list):
            stack.extend((item, depth + 1, where) for item in value)
        elif isinstance(value, str) and not is_unicode(value):
            raise ApiError(400, f"'{where}' holds a lone surrogate (text must be valid Unicode)." if where else
                           "The request body holds a lone surrogate (text must be valid Unicode).", param=where,
                           code="invalid_value")


def is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _number(data: dict, key: str, default, lo, hi, integer: bool = False):
    value = data.get(key, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        kind = "an integer" if integer else "a number"
        raise ApiError(400, f"'{key}' must be {kind}, got {shown(value)}.", param=key, code="invalid_type")
    if not lo <= value <= hi:
        raise ApiError(400, f"'{key}' is {shown(value)}; it must be between {lo} and {hi}.", param=key, code="invalid_value")
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
        raise ApiError(400, f"Unknown parameter(s): {', '.join(shown(u, 40) for u in unknown[:5])}.",
                       param=unknown[0][:40], code="unknown_parameter")
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
    if any(len(s) > limits.max_stop_chars for s in stops):
        raise ApiError(400, f"A stop string is longer than {limits.max_stop_chars} characters.", param="stop",
                       code="invalid_value")
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
