"""Exceptions -> gRPC status codes, in one place: the table and the interceptor that applies it.

The servicer raises plain exceptions (the engine's InvalidRequest/Cancelled/DeadlineExceeded, the
scheduler's QueueFull, the registry's NotReady); `StatusInterceptor` turns whatever escapes an RPC
handler into the status code and message the caller sees, and logs what was not the caller's fault.
The client side's view of a failed call is serve.protocol.errors.TranslatorError.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from nmt.decoding import Cancelled, DeadlineExceeded, InvalidRequest
from serve.engine.scheduler import QueueFull
from serve.server.handlers import behaviour, rewrap
from serve.server.registry import NotReady, ReloadRefused

log = logging.getLogger("nmt.serve")

# Most specific first: DeadlineExceeded is a Cancelled.
_CODES: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (QueueFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (NotReady, grpc.StatusCode.UNAVAILABLE),
    (ReloadRefused, grpc.StatusCode.FAILED_PRECONDITION),
    (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (Cancelled, grpc.StatusCode.CANCELLED),
]


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and caller-facing message of an exception raised while serving a request.

    Anything unexpected is INTERNAL with a generic message: internals stay in the server log.
    """
    for cls, code in _CODES:
        if isinstance(exc, cls):
            return code, str(exc) or code.name.lower().replace("_", " ")
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see the server log"


def _abort(context: grpc.ServicerContext, method: str, exc: Exception) -> None:
    code, message = status_of(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.error("%s failed", method, exc_info=exc)
    context.abort(code, message)


def _mapped(behaviour: Callable, method: str, streaming: bool) -> Callable:
    if streaming:
        def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            try:
                yield from behaviour(request, context)
            except Exception as exc:
                if context.code() is not None:  # already aborted by the handler or an outer interceptor
                    raise
                _abort(context, method, exc)
        return stream

    def unary(request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return behaviour(request, context)
        except Exception as exc:
            if context.code() is not None:
                raise
            _abort(context, method, exc)
    return unary


class StatusInterceptor(grpc.ServerInterceptor):
    """Wraps every handler of `service` so that an exception it raises becomes `status_of`'s code."""

    def __init__(self, service: str):
        self._prefix = f"/{service}/"

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or not details.method.startswith(self._prefix):
            return handler
        method = details.method[len(self._prefix):]
        return rewrap(handler, _mapped(behaviour(handler), method, handler.response_streaming))
