"""Exceptions <-> gRPC status codes, in one place for the server and the client.

Server side: the servicer raises plain exceptions (the engine's InvalidRequest/Cancelled, the scheduler's
QueueFull, ...) and `status_of` names the status code and the message the caller sees.
Client side: `TranslatorError` carries the status code back into Python code.
"""

from __future__ import annotations

import grpc

from serve.types import Cancelled, InvalidRequest


class QueueFull(Exception):
    """The model's queue holds as much work as it may: the caller should retry later."""


class NotReady(Exception):
    """Models are still loading, or the server is draining."""


class DeadlineExceeded(Cancelled):
    """Decoding stopped because the request's deadline passed (not because the caller cancelled)."""


# Most specific first: DeadlineExceeded is a Cancelled.
_CODES: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (QueueFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (NotReady, grpc.StatusCode.UNAVAILABLE),
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


_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}

# Worth retrying as is, possibly on another server: the request itself was fine.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})


def code_from_number(number: int) -> grpc.StatusCode:
    return _BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)


class TranslatorError(grpc.RpcError):
    """A failed call to a translation server. Like grpc's own errors, `code()` is the grpc.StatusCode and
    `details()` the server's message, so `except grpc.RpcError` code handles both."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    @property
    def retryable(self) -> bool:
        """The request itself was fine: sending it again (later, or elsewhere) may succeed."""
        return self._code in RETRYABLE

    @classmethod
    def from_rpc_error(cls, e: grpc.RpcError) -> TranslatorError:
        code = e.code() if callable(getattr(e, "code", None)) else None
        details = e.details() if callable(getattr(e, "details", None)) else None
        return cls(code or grpc.StatusCode.UNKNOWN, details or str(e))
