"""Where a batch job's chunks get translated: the in-process engine, or a set of gRPC servers.

Both speak the engine's types: `translate(texts, options) -> list[TranslationResult]`, raising
InvalidRequest for input the caller must fix and BackendError when the job cannot go on.
The gRPC backend spreads chunks round-robin over its servers, sets aside a server that stops
answering (retrying it later with exponential backoff), and retries overloaded or slow calls.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from nmt.decoding import DecodeOptions, InvalidRequest, TranslationResult
from nmt.errors import EXIT_FAILURE, UserError


class BackendError(UserError):
    """The job cannot go on (no server answers, authentication refused, engine failure)."""

    exit_code = EXIT_FAILURE


class Backend(Protocol):
    def translate(self, texts: list[str], options: DecodeOptions) -> list[TranslationResult]: ...

    def report(self) -> list[str]: ...  # per-backend lines for the job summary

    def source_language(self) -> str: ...  # of the model used ("" if unknown): --split-sentences

    @property
    def retries(self) -> int: ...

    def close(self) -> None: ...


# ----------------------------------------------------------------------------- in-process engine


class EngineBackend:
    """The ONNX Runtime engine in this process: no network, no retries."""

    def __init__(self, model_dir: str, device: str = "auto", intra_op_threads: int | None = None):
        # Imported here: the gRPC path need not load onnxruntime.
        from serve.engine.translator import EngineConfig, Translator

        config = EngineConfig(device=device, intra_op_threads=intra_op_threads)
        self.translator = Translator.from_bundle(model_dir, config)
        self.model_dir = model_dir
        self.calls = 0

    def translate(self, texts: list[str], options: DecodeOptions) -> list[TranslationResult]:
        self.calls += 1
        return self.translator.translate(texts, options)

    @property
    def retries(self) -> int:
        return 0

    def source_language(self) -> str:
        return self.translator.src_lang

    def report(self) -> list[str]:
        return [f"engine {self.model_dir}: {self.calls} calls"]

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------- gRPC servers


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2^attempt)]."""
    return rng.uniform(0, min(cap, base * 2 ** attempt))


@dataclass
class Server:
    target: str
    client: Any  # serve.protocol.client.TranslatorClient
    failures: int = 0  # consecutive UNAVAILABLE answers; reset by a success
    available_at: float = 0.0  # time.monotonic() after which the server is tried again
    ok_calls: int = 0
    failed_calls: int = 0


@dataclass
class ServerPool:
    """Round-robin over the servers that are not set aside; waits when every one is."""

    servers: list[Server]
    give_up_after: float  # seconds without any successful answer before the job fails
    base_delay: float = 0.5
    max_delay: float = 30.0
    clock: Callable[[], float] = time.monotonic
    rng: random.Random = field(default_factory=random.Random)
    _next: int = 0
    _last_success: float = field(default=-1.0)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._last_success = self.clock()

    def acquire(self) -> Server:
        while True:
            with self._lock:
                now = self.clock()
                for i in range(len(self.servers)):
                    server = self.servers[(self._next + i) % len(self.servers)]
                    if server.available_at <= now:
                        self._next = (self._next + i + 1) % len(self.servers)
                        return server
                if now - self._last_success > self.give_up_after:
                    raise BackendError(f"no server answered for {self.give_up_after:.0f}s "
                                       f"({', '.join(s.target for s in self.servers)}); "
                                       "rerun the same command to resume")
                wait = min(s.available_at for s in self.servers) - now
            time.sleep(min(max(wait, 0.01), 1.0))

    def succeeded(self, server: Server) -> None:
        with self._lock:
            server.failures = 0
            server.ok_calls += 1
            self._last_success = self.clock()

    def set_aside(self, server: Server) -> None:
        with self._lock:
            server.failed_calls += 1
            server.available_at = self.clock() + backoff_delay(server.failures, self.base_delay,
                                                               self.max_delay, self.rng)
            server.failures += 1


class GrpcBackend:
    """Chunks go to servers round-robin through `serve.protocol.client.TranslatorClient`.

    UNAVAILABLE (or CANCELLED by a stopping server): the server is set aside (backoff grows per
    consecutive failure) and the chunk goes to the next server at once; it costs no retry, since
    only `give_up_after` seconds without any answer end the job. RESOURCE_EXHAUSTED /
    DEADLINE_EXCEEDED: the chunk is retried after an exponential, jittered backoff, at most
    `max_retries` times. INVALID_ARGUMENT becomes InvalidRequest (the caller isolates the bad
    segment); any other code ends the job.
    """

    def __init__(self, targets: list[str], *, timeout: float, max_retries: int, give_up_after: float,
                 auth_token: str | None = None, tls_ca: str | None = None,
                 base_delay: float = 0.5, rng: random.Random | None = None):
        from serve.protocol.client import TranslatorClient

        clients = [TranslatorClient(t, auth_token=auth_token, tls_ca=tls_ca) for t in targets]
        self.pool = ServerPool([Server(t, c) for t, c in zip(targets, clients)], give_up_after=give_up_after,
                               base_delay=base_delay, rng=rng or random.Random())
        self.timeout = timeout
        self.max_retries = max_retries
        self._retries = 0
        self._lock = threading.Lock()

    @property
    def retries(self) -> int:
        return self._retries

    def _count_retry(self) -> None:
        with self._lock:
            self._retries += 1

    def translate(self, texts: list[str], options: DecodeOptions) -> list[TranslationResult]:
        import grpc

        transient = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED)
        attempt = 0
        while True:
            server = self.pool.acquire()
            try:
                results = server.client.translate(texts, options, timeout=self.timeout)
            except grpc.RpcError as e:
                code, details = e.code(), e.details()
                if code == grpc.StatusCode.INVALID_ARGUMENT:
                    raise InvalidRequest(details) from None
                # CANCELLED: this job never cancels, so the server aborted the call (it is stopping).
                if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                    self.pool.set_aside(server)
                    self._count_retry()
                    continue
                if code in transient and attempt < self.max_retries:
                    self._count_retry()
                    pool = self.pool
                    time.sleep(backoff_delay(attempt, pool.base_delay, pool.max_delay, pool.rng))
                    attempt += 1
                    continue
                raise BackendError(f"server {server.target}: {code.name}: {details}"
                                   + (f" (after {attempt} retries)" if code in transient else "")) from None
            self.pool.succeeded(server)
            return results

    def source_language(self) -> str:
        """The default model's, from the first server that answers ("" when none does: the job's own
        calls then wait for the servers as usual, and the splitter uses its English rules)."""
        import grpc

        for s in self.pool.servers:
            try:
                models = s.client.model_info(timeout=self.timeout).models
            except grpc.RpcError:
                continue
            default = next((m for m in models if m.is_default), models[0] if models else None)
            if default is not None:
                return str(default.source_language)
        return ""

    def report(self) -> list[str]:
        return [f"server {s.target}: {s.ok_calls} calls answered, {s.failed_calls} unavailable"
                for s in self.pool.servers]

    def close(self) -> None:
        for s in self.pool.servers:
            s.client.close()
