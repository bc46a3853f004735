"""Failed calls as Python exceptions on the client side (the server side maps in serve.server.status)."""

from __future__ import annotations

import grpc

from nmt.errors import EXIT_FAILURE, EXIT_USAGE, UserError

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

    def user_error(self, server: str) -> UserError:
        """The one line a command prints: a refused request is the user's to fix (exit 2), anything
        else a runtime failure (exit 1)."""
        code = EXIT_USAGE if self._code == grpc.StatusCode.INVALID_ARGUMENT else EXIT_FAILURE
        return UserError(f"{server}: {self._code.name}: {self._details}", code)

    @classmethod
    def from_rpc_error(cls, e: grpc.RpcError) -> TranslatorError:
        code = e.code() if callable(getattr(e, "code", None)) else None
        details = e.details() if callable(getattr(e, "details", None)) else None
        return cls(code or grpc.StatusCode.UNKNOWN, details or str(e))
