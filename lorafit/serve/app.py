"""The HTTP server: OpenAI-compatible completions over the batcher, adapter (un)loading, the playground."""

import asyncio
import contextlib
import hmac
import json
from importlib import resources
from pathlib import Path

from lorafit.errors import LorafitError
from lorafit.serve.batcher import Batcher, Row
from lorafit.serve.models import ModelHost, NameTaken, parse_adapter_arg, under_root
from lorafit.serve.protocol import (
    ApiError, Limits, choice, completion, completion_id, error_body, now, parse_completion, parse_json, usage,
)

UNLOAD_WAIT_S = 120  # DELETE waits this long for the adapter's requests in flight to finish


def create_app(host: ModelHost, api_key: str | None = None, adapters_root: Path | None = None,
               limits: Limits | None = None, max_batch: int = 64):
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
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

    def fail(exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return fail(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):  # unknown routes, wrong methods: same error shape
        return JSONResponse(error_body(str(exc.detail), code=str(exc.status_code)), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc):
        return JSONResponse(error_body(f"Invalid request: {exc.errors()[0].get('msg', exc)}"), status_code=400)

    @app.exception_handler(Exception)
    async def _bug(request, exc):  # never bad input (that is a 4xx above): a bug, said as one
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", type="server_error"), status_code=500)

    if api_key is not None:
        app.add_middleware(BearerAuth, api_key=api_key)

    async def read_json(request: Request):
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > limits.max_body_bytes:
            raise ApiError(413, f"Request body of {size} bytes; at most {limits.max_body_bytes}.", code="body_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limits.max_body_bytes:
                raise ApiError(413, f"Request body over {limits.max_body_bytes} bytes.", code="body_too_large")
        return parse_json(bytes(body))

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

        def cancel_all():
            for r in rows:
                r.cancel()

        if req.stream:
            async def sse():
                open_rows, tokens = len(rows), 0
                try:
                    while open_rows:
                        row, text, finish, error = await events.get()
                        if error is not None:
                            yield sse_data(error_body(f"generation failed: {type(error).__name__}", type="server_error"))
                            return
                        if finish:
                            open_rows -= 1
                            tokens += len(row.tokens)
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
                        return JSONResponse(error_body("client disconnected"), status_code=499)
                    continue
                if error is not None:
                    raise ApiError(500, f"generation failed: {type(error).__name__}", type="server_error")
                i = index[id(row)]
                texts[i] += text
                if finish:
                    finishes[i], open_rows, tokens = finish, open_rows - 1, tokens + len(row.tokens)
        finally:
            cancel_all()
        choices = [choice(t, i, f) for i, (t, f) in enumerate(zip(texts, finishes))]
        return completion(cid, created, req.model, choices, usage(prompt_tokens, tokens))

    def encode(prompt: str) -> list[int]:
        ids = host.tokenizer(prompt)["input_ids"]
        return ids or [host.eos_id]  # an empty prompt starts from <|endoftext|>, as GPT-2 was trained

    @app.post("/v1/adapters")
    async def load(request: Request):
        data = await read_json(request)
        if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not isinstance(data.get("path"), str):
            raise ApiError(400, 'Give {"name": NAME, "path": ADAPTER_OR_RUN_DIR} (the path under --adapters-root).')
        name, path = data["name"], data["path"]
        try:
            host.check_name(name)
        except NameTaken as exc:
            raise ApiError(409, str(exc), param="name", code="adapter_exists") from None
        except LorafitError as exc:
            raise ApiError(400, str(exc), param="name", code="invalid_value") from None
        try:
            adapter_dir = under_root(path, adapters_root)
            from starlette.concurrency import run_in_threadpool

            await run_in_threadpool(host.add, name, adapter_dir)  # waits for the forward pass in flight
        except PermissionError as exc:
            raise ApiError(403, str(exc), param="path", code="path_not_allowed") from None
        except NameTaken as exc:  # another request took the name meanwhile
            raise ApiError(409, str(exc), param="name", code="adapter_exists") from None
        except LorafitError as exc:  # not an adapter, or one for another base: lorafit's own message
            raise ApiError(400, str(exc), param="path", code="adapter_not_loadable") from None
        return {"id": name, "object": "model", "created": now(), "owned_by": "lorafit", "parent": host.base_id}

    @app.delete("/v1/adapters/{name}")
    async def unload(name: str):
        if name not in host.adapters or name in unloading:
            raise ApiError(404, f"No adapter named '{name}' is loaded.", param="name", code="model_not_found")
        unloading.add(name)  # no new requests for it from now on
        try:
            for _ in range(int(UNLOAD_WAIT_S / 0.05)):
                if not batcher.busy_rows(name):
                    break
                await asyncio.sleep(0.05)
            else:
                raise ApiError(409, f"Adapter '{name}' still has requests in flight; try again.", code="adapter_busy")
            from starlette.concurrency import run_in_threadpool

            await run_in_threadpool(host.remove, name)
        finally:
            unloading.discard(name)
        return {"id": name, "object": "model", "deleted": True}

    return app


class BearerAuth:
    """Every request but the playground page itself (which holds nothing; all it calls is under /v1)
    needs `Authorization: Bearer KEY`. Plain ASGI, so streamed responses and disconnects pass untouched."""

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] == "/":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        if hmac.compare_digest(given, self.expected):
            return await self.app(scope, receive, send)
        from fastapi.responses import JSONResponse

        message = "Missing or wrong API key: send 'Authorization: Bearer KEY' (the key given to --api-key)."
        await JSONResponse(error_body(message, code="invalid_api_key"), status_code=401)(scope, receive, send)


def sse_data(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def serve(args) -> int:
    """`lorafit serve`: load the models, then run uvicorn until interrupted."""
    try:
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
    host = ModelHost(adapters, base=args.base, precision=args.precision, attn_implementation=args.attn_implementation)
    app = create_app(host, api_key=args.api_key, adapters_root=root)
    served = ", ".join([f"{host.base_id} (base)", *host.adapters])
    import sys

    print(f"serving {served} on http://{args.host}:{args.port}/ (playground at /, OpenAI API at /v1)", file=sys.stderr)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"warning: --host {args.host} without --api-key: anyone who can reach this address can use the models "
              "and load adapters from --adapters-root.", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
