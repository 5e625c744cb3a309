"""What stands between the network and the app: the Host check (DNS rebinding), the API key, the
one-line request log, and uvicorn's protocol with a deadline for request headers. Each is plain
ASGI (or a uvicorn protocol), so streamed responses and disconnects pass through untouched; each
answers a refusal through protocol.error_response, the app's one error path."""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import time

from lorafit.serve.protocol import ApiError, error_response

request_log = logging.getLogger("lorafit.serve.requests")

LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
WILDCARD_BINDS = {"0.0.0.0", "::", ""}


def host_name(header: str) -> str:
    """'example.com:8000' -> 'example.com', '[::1]:8000' -> '::1' (lower case)."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class HostCheck:
    """Refuse a Host header that names neither loopback nor the address the server is bound to. A DNS
    rebinding attack reaches 127.0.0.1 under the attacker's own domain name, which is refused here.
    On a wildcard bind (0.0.0.0, ::) any IP literal is accepted as well: those are never rebound names."""

    def __init__(self, app, bound_host: str):
        self.app = app
        self.allowed = LOOPBACK_NAMES | {host_name(bound_host)}
        self.any_ip = bound_host in WILDCARD_BINDS

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            header = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            name = host_name(header)
            if name not in self.allowed and not (self.any_ip and is_ip(name)):
                shown = json.dumps(header[:80])
                message = (f"Host header {shown} is not this server's address; use http://127.0.0.1 (or the "
                           "address given to --host). Other names are refused to stop DNS rebinding.")
                return await error_response(ApiError(421, message, code="invalid_host"))(scope, receive, send)
        return await self.app(scope, receive, send)


class BearerAuth:
    """Every request but the playground page itself (which holds nothing; all it calls is under /v1)
    needs `Authorization: Bearer KEY`."""

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] == "/":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        if hmac.compare_digest(given, self.expected):
            return await self.app(scope, receive, send)
        message = "Missing or wrong API key: send 'Authorization: Bearer KEY' (the key given to --api-key)."
        await error_response(ApiError(401, message, code="invalid_api_key"))(scope, receive, send)


class RequestLog:
    """One line a request once its response has ended: time, method, path, status, the model, tokens
    and latency. The routes put what they know in `request.state.log`; prompt text only when asked."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.time(), [0]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            if request_log.isEnabledFor(logging.INFO):
                info = scope.get("state", {}).get("log", {})
                fields = " ".join(f"{k}={json.dumps(v, ensure_ascii=True)}" for k, v in info.items())
                when = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(start)) + f".{int(start % 1 * 1000):03d}Z"
                request_log.info("%s %s %s %s %s latency_ms=%.1f", when, scope["method"], scope["path"],
                                 status[0] or "-", fields or "-", (time.time() - start) * 1000)


def guarded_h11(header_timeout_s: float):
    """uvicorn's h11 protocol with a deadline for each request's headers: uvicorn times out idle
    keep-alive connections, but holds a silent or dribbling new connection forever."""
    from uvicorn.protocols.http.h11_impl import H11Protocol  # optional extra: [serve]

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm_header_deadline()

        def on_response_complete(self):
            super().on_response_complete()
            self._arm_header_deadline()

        def connection_lost(self, exc):
            deadline = getattr(self, "_header_deadline", None)
            if deadline is not None:
                deadline.cancel()
            super().connection_lost(exc)

        def _arm_header_deadline(self):
            waiting_after = self.cycle  # a new request's headers replace the cycle

            def expire():
                if self.cycle is waiting_after and not self.transport.is_closing():
                    self.transport.close()

            self._header_deadline = self.loop.call_later(header_timeout_s, expire)

    return GuardedH11Protocol
