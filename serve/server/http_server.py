"""The HTTP side of `nmt serve`: uvicorn in a background thread of the server process, plus the
request plumbing every endpoint shares (body parsing, CORS, error answers).

    http = HttpServer(build_app(state), host="127.0.0.1", port=0)
    port = http.start()     # bound and accepting
    ...
    http.stop(grace=20)     # health 503, stop accepting, let requests in flight finish

Why Starlette on uvicorn: a thin ASGI layer (no per-request model validation we would not use) on
uvicorn's httptools parser keeps the HTTP overhead per call well under the model's decode time, and
both are widely used and maintained. Handlers are async; the blocking scheduler wait runs in the
thread pool, so one slow translation never stalls other connections.
"""

from __future__ import annotations

import json
import logging
import math
import socket
import threading
import time
from typing import Any

import uvicorn
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from nmt.decoding import InvalidRequest

log = logging.getLogger("nmt.serve")

# As LibreTranslate answers, so browser pages on other origins can call the API.
CORS_HEADERS = [
    (b"access-control-allow-origin", b"*"),
    (b"access-control-allow-headers", b"Authorization, Content-Type"),
    (b"access-control-expose-headers", b"Authorization"),
    (b"access-control-allow-methods", b"GET, POST"),
    (b"access-control-allow-credentials", b"true"),
    (b"access-control-max-age", str(60 * 60 * 24 * 20).encode()),
]


class HttpError(Exception):
    """An answer other than 400 for a request the caller must change (404 unknown file, ...)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class Cors:
    """ASGI middleware: CORS headers on every answer, preflight OPTIONS answered directly."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope["method"] == "OPTIONS":
            await send({"type": "http.response.start", "status": 200, "headers": CORS_HEADERS})
            await send({"type": "http.response.body", "body": b""})
            return

        async def with_cors(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *CORS_HEADERS]}
            await send(message)
        await self.app(scope, receive, with_cors)


async def read_params(request: Request) -> tuple[dict[str, Any], bool]:
    """The request's fields from its query string and its body (JSON, form or multipart), and whether
    the body was JSON. Bad JSON, or JSON that is not an object, is InvalidRequest."""
    params: dict[str, Any] = dict(request.query_params)
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "application/json" or kind.endswith("+json"):
        body = await request.body()
        try:
            data = json.loads(body) if body.strip() else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise InvalidRequest("Invalid JSON format") from None
        if not isinstance(data, dict):
            raise InvalidRequest("Invalid JSON format: expected an object")
        params.update(data)
        return params, True
    if kind in ("application/x-www-form-urlencoded", "multipart/form-data"):
        form = await request.form()
        for name in form:
            values = form.getlist(name)
            if isinstance(values[0], UploadFile):
                params[name] = values[0]
            else:  # a field sent several times (q=a&q=b) is a list, as in a JSON body
                params[name] = values[0] if len(values) == 1 else list(values)
    return params, False


class HttpServer:
    """uvicorn serving `app` on a socket bound here (port 0: any free port), in a daemon thread."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, grace: float = 20.0):
        self.app, self.host, self.port = app, host, port
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=max(1, math.ceil(grace)))
        self.server = uvicorn.Server(config)
        self.thread: threading.Thread | None = None

    def start(self, timeout: float = 10.0) -> int:
        """Bind, start serving, return the port; OSError when the address cannot be bound."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as e:
            sock.close()
            raise OSError(f"cannot listen on {self.host}:{self.port} (http): {e.strerror}") from None
        self.port = sock.getsockname()[1]
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]},
                                       name="http", daemon=True)
        self.thread.start()
        end = time.monotonic() + timeout
        while not self.server.started and self.thread.is_alive() and time.monotonic() < end:
            time.sleep(0.01)
        if not self.server.started:
            raise OSError(f"http server on {self.host}:{self.port} did not start")
        log.info("http listening on %s:%d", self.host, self.port)
        return self.port

    def stop(self, grace: float | None = None) -> None:
        """Answer 503 to new work, close the listener, let requests in flight finish (uvicorn waits
        for them up to the grace period given at construction)."""
        state = getattr(self.app, "state", None)
        if state is not None:
            state.draining = True
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(None if grace is None else grace + 1.0)


def status_response(exc: BaseException) -> Response:
    """The HTTP answer for an exception raised while serving a request (see serve.server.http_api)."""
    import grpc

    from serve.server.keys import InvalidKey, MissingKey, OverLimit
    from serve.server.status import status_of

    if isinstance(exc, HttpError):
        return error(exc.status, str(exc))
    if isinstance(exc, MissingKey):
        return error(400, str(exc))
    if isinstance(exc, InvalidKey):
        return error(403, str(exc))
    if isinstance(exc, OverLimit):
        return error(429, f"Slowdown: {exc}")
    code, message = status_of(exc)
    status = {grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
              grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.DEADLINE_EXCEEDED: 504,
              grpc.StatusCode.CANCELLED: 503}.get(code, 500)
    if status == 500:
        log.error("HTTP request failed", exc_info=exc)
    return error(status, message)
