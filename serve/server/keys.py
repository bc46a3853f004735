"""API keys with per-key limits, shared by the gRPC and HTTP front doors of one server.

A keys file is JSON: each key with its limits over a sliding minute (a missing limit: none):

    {"k-3f9a": {"requests_per_minute": 60, "chars_per_minute": 20000}, "k-internal": {}}

The server's bearer token (--auth-token) is a key without limits. When any key exists, every request
needs one: `api_key` in the body or `Authorization: Bearer KEY` on HTTP, the `authorization` metadata on
gRPC. Missing key: HTTP 400 / UNAUTHENTICATED; unknown key: 403 / UNAUTHENTICATED; over a limit:
429 / RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import hmac
import json
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from serve.server.handlers import behaviour, rewrap

WINDOW = 60.0  # seconds: limits are per sliding minute


class MissingKey(Exception):
    """Keys are required and the request carries none."""


class InvalidKey(Exception):
    """The request's key is not one of the server's."""


class OverLimit(Exception):
    """The key used up its requests or characters for the last minute: retry later."""


@dataclass(frozen=True)
class KeyLimits:
    requests_per_minute: int | None = None
    chars_per_minute: int | None = None


def read_keys_file(path: Path) -> dict[str, KeyLimits]:
    """Parse a keys file; ValueError names what is wrong with it."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSON: {e}") from None
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"{path} must be a JSON object of key -> limits, with at least one key")
    keys = {}
    for key, limits in raw.items():
        if not key.strip() or not isinstance(limits, dict):
            raise ValueError(f"{path}: key {key!r} needs a non-empty name and an object of limits")
        unknown = set(limits) - {"requests_per_minute", "chars_per_minute"}
        if unknown:
            raise ValueError(f"{path}: key {key!r} has unknown limits {sorted(unknown)}")
        for name, value in limits.items():
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ValueError(f"{path}: key {key!r}: {name} must be a positive integer, got {value!r}")
        keys[key] = KeyLimits(**limits)
    return keys


class KeyStore:
    """Which keys may call, and what each has used in the last minute. Thread-safe."""

    def __init__(self, keys: dict[str, KeyLimits] | None = None, token: str | None = None):
        self._keys = dict(keys or {})
        if token:
            self._keys[token] = KeyLimits()
        self._used: dict[str, deque[tuple[float, int]]] = {k: deque() for k in self._keys}
        self._lock = threading.Lock()

    @property
    def required(self) -> bool:
        return bool(self._keys)

    def _find(self, key: str) -> str | None:
        # Constant-time per comparison, so a key cannot be guessed from response timing.
        found = None
        for known in self._keys:
            if hmac.compare_digest(known.encode(), key.encode()):
                found = known
        return found

    def check(self, key: str | None) -> str | None:
        """The known key (None when keys are not required); MissingKey / InvalidKey otherwise."""
        if not self.required:
            return None
        if not key:
            raise MissingKey("an API key is required: send api_key or 'Authorization: Bearer KEY'")
        found = self._find(key)
        if found is None:
            raise InvalidKey("Invalid API key")
        return found

    def charge(self, key: str | None, chars: int, now: float | None = None) -> None:
        """Count one request of `chars` characters against `key`; OverLimit when it does not fit."""
        known = self.check(key)
        if known is None:
            return
        limits, now = self._keys[known], time.monotonic() if now is None else now
        with self._lock:
            used = self._used[known]
            while used and used[0][0] <= now - WINDOW:
                used.popleft()
            rpm, cpm = limits.requests_per_minute, limits.chars_per_minute
            if rpm is not None and len(used) + 1 > rpm:
                raise OverLimit(f"{rpm} requests per minute for this key")
            if cpm is not None and sum(c for _, c in used) + chars > cpm:
                raise OverLimit(f"{cpm} characters per minute for this key")
            used.append((now, chars))


def bearer(value: str | bytes | None) -> str | None:
    """The KEY of an 'Authorization: Bearer KEY' value."""
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if value and value.lower().startswith("bearer "):
        return value[7:].strip()
    return None


class KeyInterceptor(grpc.ServerInterceptor):
    """The keys on gRPC: every RPC but health needs a known key; Translate calls count against its
    limits (a Translate call: one request and its texts' characters; a stream: one request)."""

    def __init__(self, store: KeyStore, health_prefix: str, charged_prefix: str):
        self.store, self.health_prefix, self.charged_prefix = store, health_prefix, charged_prefix

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or details.method.startswith(self.health_prefix):
            return handler
        key = bearer(dict(details.invocation_metadata).get("authorization"))
        charged = details.method.startswith(self.charged_prefix)

        def gate(request: Any, context: grpc.ServicerContext) -> None:
            try:
                if charged:
                    self.store.charge(key, sum(map(len, getattr(request, "texts", []) or [])))
                else:
                    self.store.check(key)
            except (MissingKey, InvalidKey) as e:
                context.abort(grpc.StatusCode.UNAUTHENTICATED, str(e))
            except OverLimit as e:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"over the limit: {e}")

        return gated(handler, gate)


def gated(handler: Any, gate: Callable[[Any, grpc.ServicerContext], None]) -> Any:
    """`handler` with `gate(request or None, context)` run first (it aborts to refuse the call)."""
    inner, streamed = behaviour(handler), handler.request_streaming

    def checked(request, context):
        gate(None if streamed else request, context)
        return inner(request, context)
    return rewrap(handler, checked)
