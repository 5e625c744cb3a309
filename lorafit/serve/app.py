"""The HTTP server: OpenAI-compatible completions over the batcher, adapter (un)loading, the playground."""

import asyncio
import contextlib
import json
import logging
import sys
from importlib import resources
from pathlib import Path

from lorafit.errors import LorafitError
from lorafit.serve.batcher import AdapterGone, Batcher, Row
from lorafit.serve.guards import BearerAuth, HostCheck, RequestLog, guarded_h11, request_log
from lorafit.serve.models import ModelHost, NameTaken, parse_adapter_arg, under_root
from lorafit.serve.protocol import (
    ApiError, Limits, choice, completion, completion_id, error_response, now, parse_completion, parse_json, shown, usage,
)

UNLOAD_WAIT_S = 120  # DELETE waits this long for the adapter's requests in flight to finish
HEADER_TIMEOUT_S = 10  # a new connection's request headers must arrive within this
MAX_CONNECTIONS = 256  # uvicorn answers 503 beyond this many connections and tasks
MAX_PATH_CHARS = 4096  # PATH_MAX on Linux


def create_app(host: ModelHost, api_key: str | None = None, adapters_root: Path | None = None,
               limits: Limits | None = None, max_batch: int = 64, allow_admin: bool = False,
               bound_host: str | None = None, log_prompts: bool = False):
    """The app. Loading and unloading adapters needs `api_key`, or `allow_admin` to allow it without
    one; `bound_host` (the address served on) turns on the Host-header check."""
    # optional extra: [serve] (fastapi; uvicorn runs it)
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    limits = limits or Limits()
    batcher = Batcher(host, max_batch=max_batch)
    unloading: set[str] = set()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        batcher.stop()

    app = FastAPI(title="lorafit serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher, app.state.host = batcher, host

    # the one error path: every refusal, raised anywhere, leaves as protocol.error_response
    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):  # unknown routes, wrong methods: same error shape
        return error_response(ApiError(exc.status_code, str(exc.detail), code=str(exc.status_code)))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc):
        return error_response(ApiError(400, f"Invalid request: {shown(exc.errors()[0].get('msg', ''), 200)}"))

    @app.exception_handler(Exception)
    async def _bug(request, exc):  # never bad input (that is a 4xx above): a bug, said as one
        return error_response(ApiError(500, f"internal error: {type(exc).__name__}", type="server_error"))

    # outermost last: the log sees every answer, the Host check runs before the key is looked at
    if api_key is not None:
        app.add_middleware(BearerAuth, api_key=api_key)
    if bound_host is not None:
        app.add_middleware(HostCheck, bound_host=bound_host)
    app.add_middleware(RequestLog)

    def note(request: Request, **fields):
        request.state.log = {**getattr(request.state, "log", {}), **fields}

    async def read_json(request: Request):
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            # a browser's cross-origin "simple" POST (text/plain, forms) must never reach a route
            raise ApiError(415, f"Send the body as JSON with 'Content-Type: application/json' (got {shown(kind or None)}).",
                           code="unsupported_media_type")
        try:  # (asyncio.timeout would read better, but Python 3.10 lacks it)
            body = await asyncio.wait_for(receive_body(request), limits.body_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(408, f"The request body did not arrive within {limits.body_timeout_s:g} s.",
                           code="request_timeout", headers={"Connection": "close"}) from None
        return parse_json(body, limits.max_depth)

    async def receive_body(request: Request) -> bytes:
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > limits.max_body_bytes:
            await drain(request)
            raise ApiError(413, f"Request body of {size} bytes; at most {limits.max_body_bytes}.", code="body_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limits.max_body_bytes:
                await drain(request)
                raise ApiError(413, f"Request body over {limits.max_body_bytes} bytes.", code="body_too_large")
        return bytes(body)

    async def drain(request: Request):
        """Read (and drop) the rest of a refused body, so that the client, still sending, reads the
        413 instead of a reset connection. Bounded by the body timeout around it."""
        with contextlib.suppress(Exception):
            async for _ in request.stream():
                pass

    def admin(request: Request):
        if api_key is None and not allow_admin:
            raise ApiError(403, "Loading and unloading adapters is off on a server without --api-key; restart it "
                           "with --api-key KEY (or --allow-admin to allow it to anyone who can reach it).",
                           code="admin_disabled")

    @app.get("/", response_class=HTMLResponse)
    async def playground():
        return HTMLResponse(resources.files("lorafit.serve").joinpath("playground.html").read_text(encoding="utf-8"))

    @app.get("/v1/models")
    async def models():
        created = now()
        data = [{"id": host.base_id, "object": "model", "created": created, "owned_by": "lorafit", "parent": None}]
        data += [{"id": name, "object": "model", "created": created, "owned_by": "lorafit", "parent": host.base_id}
                 for name in host.adapters if name not in unloading]
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = parse_completion(await read_json(request), limits)
        note(request, model=req.model)
        if log_prompts:
            note(request, prompts=req.prompts)
        adapter = host.adapter_for(req.model) if req.model not in unloading else None
        if adapter is None:
            raise ApiError(404, f"The model '{req.model}' does not exist; GET /v1/models lists those served.",
                           param="model", code="model_not_found")
        prompt_ids = [encode(p) for p in req.prompts]
        for ids in prompt_ids:
            if host.context and len(ids) + req.max_tokens > host.context:
                raise ApiError(400, f"This model's maximum context length is {host.context} tokens, however you requested "
                               f"{len(ids) + req.max_tokens} tokens ({len(ids)} in your prompt; {req.max_tokens} for the "
                               "completion). Please reduce your prompt or max_tokens.", param="prompt",
                               code="context_length_exceeded")
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def emit(row, text, finish, error=None):  # worker thread -> this request's event loop
            loop.call_soon_threadsafe(events.put_nowait, (row, text, finish, error))

        rows = []
        for ids in prompt_ids:
            for j in range(req.n):
                seed = None if req.seed is None else req.seed + j  # n samples of one seed must differ
                rows.append(Row(ids, adapter, req.max_tokens, req.temperature, req.top_p, seed, req.stop, emit))
        index = {id(r): i for i, r in enumerate(rows)}
        for r in rows:
            batcher.submit(r)
        cid, created = completion_id(), now()
        prompt_tokens = sum(len(ids) for ids in prompt_ids) * req.n
        note(request, prompt_tokens=prompt_tokens, completion_tokens=0)

        def cancel_all():
            for r in rows:
                r.cancel()

        if req.stream:
            async def sse():
                open_rows, tokens = len(rows), 0
                try:
                    while open_rows:
                        row, text, finish, error = await events.get()
                        if error is not None:  # this row only; the others of the request go on
                            text, finish = "", "error"
                        if finish:
                            open_rows -= 1
                            tokens += len(row.tokens)
                            note(request, completion_tokens=tokens)
                        yield sse_data(completion(cid, created, req.model, [choice(text, index[id(row)], finish)], None))
                    if req.include_usage:
                        yield sse_data(completion(cid, created, req.model, [], usage(prompt_tokens, tokens)))
                    yield "data: [DONE]\n\n"
                finally:  # the client went away (or all done): free the slots
                    cancel_all()

            return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

        texts, finishes = [""] * len(rows), [None] * len(rows)
        open_rows, tokens = len(rows), 0
        try:
            while open_rows:
                try:
                    row, text, finish, error = await asyncio.wait_for(events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return error_response(ApiError(499, "client disconnected"))
                    continue
                if error is not None:
                    raise row_failure(error, req.model)
                i = index[id(row)]
                texts[i] += text
                if finish:
                    finishes[i], open_rows, tokens = finish, open_rows - 1, tokens + len(row.tokens)
        finally:
            cancel_all()
        choices = [choice(t, i, f) for i, (t, f) in enumerate(zip(texts, finishes))]
        note(request, completion_tokens=tokens)
        return completion(cid, created, req.model, choices, usage(prompt_tokens, tokens))

    def encode(prompt: str) -> list[int]:
        ids = host.tokenizer(prompt)["input_ids"]
        return ids or [host.eos_id]  # an empty prompt starts from <|endoftext|>, as GPT-2 was trained

    @app.post("/v1/adapters")
    async def load(request: Request):
        admin(request)
        data = await read_json(request)
        if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not isinstance(data.get("path"), str):
            raise ApiError(400, 'Give {"name": NAME, "path": ADAPTER_OR_RUN_DIR} (the path under --adapters-root).')
        name, path = data["name"], data["path"]
        note(request, model=name)
        if "\0" in path or len(path) > MAX_PATH_CHARS:
            raise ApiError(400, f"'path' {shown(path)} is not a usable path (a NUL byte, or over {MAX_PATH_CHARS} "
                           "characters).", param="path", code="invalid_value")
        try:
            host.check_name(name)
        except NameTaken as exc:
            raise ApiError(409, str(exc), param="name", code="adapter_exists") from None
        except LorafitError as exc:
            raise ApiError(400, str(exc), param="name", code="invalid_value") from None
        try:
            adapter_dir = under_root(path, adapters_root)
            await run_in_threadpool(host.add, name, adapter_dir)  # waits for the forward pass in flight
        except PermissionError as exc:
            raise ApiError(403, str(exc), param="path", code="path_not_allowed") from None
        except NameTaken as exc:  # another request took the name meanwhile
            raise ApiError(409, str(exc), param="name", code="adapter_exists") from None
        except LorafitError as exc:  # not an adapter, or one for another base: lorafit's own message
            raise ApiError(400, str(exc), param="path", code="adapter_not_loadable") from None
        except (OSError, ValueError) as exc:  # a name too long for the file system, a file unreadable
            raise ApiError(400, f"Cannot load an adapter from {shown(path)}: {shown(str(exc), 200)}.", param="path",
                           code="adapter_not_loadable") from None
        return {"id": name, "object": "model", "created": now(), "owned_by": "lorafit", "parent": host.base_id}

    @app.delete("/v1/adapters/{name}")
    async def unload(name: str, request: Request):
        admin(request)
        note(request, model=name)
        if name not in host.adapters or name in unloading:
            raise ApiError(404, f"No adapter named {shown(name)} is loaded.", param="name", code="model_not_found")
        unloading.add(name)  # no new requests for it from now on
        try:
            for _ in range(int(UNLOAD_WAIT_S / 0.05)):
                if not batcher.busy_rows(name):
                    break
                await asyncio.sleep(0.05)
            else:
                raise ApiError(409, f"Adapter '{name}' still has requests in flight; try again.", code="adapter_busy")
            await run_in_threadpool(host.remove, name)
        finally:
            unloading.discard(name)
        return {"id": name, "object": "model", "deleted": True}

    return app


def row_failure(error: Exception, model: str) -> ApiError:
    """A row the batcher dropped alone, as its request's answer."""
    if isinstance(error, AdapterGone):
        return ApiError(404, f"The model '{model}' was unloaded while this request ran.", param="model",
                        code="model_not_found")
    return ApiError(500, f"generation failed: {type(error).__name__}", type="server_error")


def sse_data(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def serve(args) -> int:
    """`lorafit serve`: load the models, then run uvicorn until interrupted."""
    try:
        # optional extra: [serve]
        import uvicorn
        import fastapi  # noqa: F401
    except ImportError:
        raise LorafitError('lorafit serve needs FastAPI and uvicorn: pip install -e ".[serve]"') from None

    root = Path(args.adapters_root) if args.adapters_root else None
    if root is not None and not root.is_dir():
        raise LorafitError(f"--adapters-root '{root}' is not a directory.")
    adapters = [parse_adapter_arg(a) for a in args.adapters]
    names = [n for n, _ in adapters]
    if len(set(names)) != len(names):
        raise LorafitError(f"Two adapters share a name ({', '.join(sorted({n for n in names if names.count(n) > 1}))}); "
                           "name them: NAME=RUN_DIR.")
    host = ModelHost(adapters, base=args.base, precision=args.precision, attn_implementation=args.attn_implementation,
                     trust_remote_code=args.trust_remote_code, force_base=args.force_base)
    app = create_app(host, api_key=args.api_key, adapters_root=root, allow_admin=args.allow_admin,
                     bound_host=args.host, log_prompts=args.log_prompts)
    served = ", ".join([f"{host.base_id} (base)", *host.adapters])
    print(f"serving {served} on http://{args.host}:{args.port}/ (playground at /, OpenAI API at /v1)", file=sys.stderr)
    if args.api_key:
        print("adapter loading and unloading (POST/DELETE /v1/adapters): on, with the API key", file=sys.stderr)
    elif args.allow_admin:
        print("adapter loading and unloading (POST/DELETE /v1/adapters): on for anyone, without a key (--allow-admin)",
              file=sys.stderr)
    else:
        print("adapter loading and unloading (POST/DELETE /v1/adapters): off (no --api-key; --allow-admin turns it on)",
              file=sys.stderr)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"warning: --host {args.host} without --api-key: anyone who can reach this address can use the models.",
              file=sys.stderr)
    log_requests(prompts=args.log_prompts)
    uvicorn.run(app, **server_settings(args.host, args.port))
    return 0


def server_settings(host: str, port: int, header_timeout_s: float = HEADER_TIMEOUT_S) -> dict:
    """uvicorn's settings: keep-alive and header deadlines, a connection cap, bounded header size."""
    return dict(host=host, port=port, log_level="warning", http=guarded_h11(header_timeout_s), timeout_keep_alive=5,
                limit_concurrency=MAX_CONNECTIONS, h11_max_incomplete_event_size=64 << 10)


def log_requests(prompts: bool) -> None:
    """The request log on stderr, one line a request (prompt text only with --log-prompts)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    request_log.handlers[:] = [handler]
    request_log.setLevel(logging.INFO)
    request_log.propagate = False
    if prompts:
        print("warning: --log-prompts writes every prompt to the log.", file=sys.stderr)
