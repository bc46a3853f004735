"""The gRPC server: Translator service, grpc.health.v1, reflection, optional bearer token and TLS.

    server, port = create_server(registry, ServerConfig(port=0))   # started, health NOT_SERVING
    registry.add(Translator.from_bundle(...))                      # models can load after the start
    server.set_serving()                                           # health SERVING
    ...
    server.drain(grace=30)   # NOT_SERVING, refuse new RPCs, finish accepted ones, stop the schedulers
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from serve.protocol.convert import SERVICE
from serve.server.handlers import behaviour, rewrap
from serve.server.keys import KeyInterceptor, KeyStore
from serve.server.metrics import Metrics
from serve.server.registry import ModelRegistry
from serve.server.reload import Reloader, admin_handler
from serve.server.servicer import Limits, TranslatorServicer, generic_handler
from serve.server.status import StatusInterceptor

log = logging.getLogger("nmt.serve")

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 0  # 0: any free port (create_server returns it)
    limits: Limits = Limits()
    auth_token: str | None = None  # when set, every RPC but health needs "authorization: Bearer <token>"
    tls_cert: bytes | None = None  # PEM certificate chain and private key: TLS when both are given
    tls_key: bytes | None = None
    workers: int = 64  # RPCs handled at once (each waits on the scheduler while its texts are decoded)
    max_concurrent_rpcs: int = 256  # beyond this grpc answers RESOURCE_EXHAUSTED at once
    keys: KeyStore | None = None  # per-key limits (serve.server.keys); replaces the auth_token check


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """UNAUTHENTICATED for any RPC except health without `authorization: Bearer <token>`."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation, details):
        if details.method.startswith(f"/{HEALTH_SERVICE}/"):
            return continuation(details)
        given = dict(details.invocation_metadata).get("authorization", "")
        if hmac.compare_digest(given.encode() if isinstance(given, str) else given, self._expected):
            return continuation(details)
        handler = continuation(details)
        if handler is None:
            return None

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")

        return rewrap(handler, deny)


class InFlightInterceptor(grpc.ServerInterceptor):
    """Counts Translator RPCs from arrival (before they wait for a worker thread) to termination, so a
    drain knows when accepted work is done without waiting on health Watch streams, which never end.
    An RPC counts until gRPC has sent its answer (a termination callback), not only until its handler
    returned: a drain that stopped the server in between cancelled an answer on its way out."""

    def __init__(self) -> None:
        self._count = 0
        self._lock = threading.Lock()

    @property
    def count(self) -> int:
        with self._lock:
            return self._count

    def _add(self, n: int) -> None:
        with self._lock:
            self._count += n

    def _until_terminated(self, context: grpc.ServicerContext) -> None:
        if not context.add_callback(lambda: self._add(-1)):  # already terminated: no callback comes
            self._add(-1)

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or not details.method.startswith(f"/{SERVICE}/"):
            return handler
        self._add(1)
        inner = behaviour(handler)
        if handler.response_streaming:
            def counted_stream(request, context):
                self._until_terminated(context)
                yield from inner(request, context)
            return rewrap(handler, counted_stream)

        def counted(request, context):
            self._until_terminated(context)
            return inner(request, context)
        return rewrap(handler, counted)


class TranslationServer:
    """A started grpc server with its health state and model registry."""

    def __init__(self, grpc_server: grpc.Server, health_servicer: health.HealthServicer,
                 registry: ModelRegistry, metrics: Metrics, in_flight: InFlightInterceptor,
                 reloader: Reloader | None = None):
        self.grpc_server, self.health = grpc_server, health_servicer
        self.registry, self.metrics, self.in_flight = registry, metrics, in_flight
        self.reloader = reloader or Reloader(registry, metrics=metrics)

    def _set_health(self, status: Any) -> None:
        for name in ("", SERVICE):
            self.health.set(name, status)

    def set_serving(self) -> None:
        self._set_health(health_pb2.HealthCheckResponse.SERVING)

    def set_not_serving(self) -> None:
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)

    def drain(self, grace: float) -> None:
        """NOT_SERVING, refuse new RPCs, let accepted ones finish within `grace` seconds, stop schedulers."""
        self.set_not_serving()
        self.health.enter_graceful_shutdown()  # and no later set() flips it back
        stopped = self.grpc_server.stop(grace)
        end = time.monotonic() + grace
        while self.in_flight.count > 0 and time.monotonic() < end and not stopped.is_set():
            time.sleep(0.02)
        self.grpc_server.stop(0)  # what is left: health watchers, or work past the grace period
        stopped.wait()
        self.registry.close(timeout=1.0)

    def stop(self) -> None:
        """Stop at once: RPCs in flight are cancelled."""
        self.drain(grace=0)


def create_server(registry: ModelRegistry, config: ServerConfig = ServerConfig(),
                  metrics: Metrics | None = None,
                  reloader: Reloader | None = None) -> tuple[TranslationServer, int]:
    """Build and start the server on config.host:config.port; returns it (health NOT_SERVING) and the port.
    `reloader` serves the ReloadModel RPC (default: one that needs the bundle path in the request)."""
    metrics = metrics or registry.metrics or Metrics()
    reloader = reloader or Reloader(registry, metrics=metrics)
    size = config.limits.max_message_bytes
    options = [("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size),
               ("grpc.so_reuseport", 0)]
    in_flight = InFlightInterceptor()
    # Outermost first; the status mapping wraps the handlers themselves.
    interceptors: list[grpc.ServerInterceptor] = [in_flight, StatusInterceptor(SERVICE)]
    if config.keys is not None:
        interceptors.insert(0, KeyInterceptor(config.keys, f"/{HEALTH_SERVICE}/", f"/{SERVICE}/Translate"))
    elif config.auth_token:
        interceptors.insert(0, BearerTokenInterceptor(config.auth_token))
    server = grpc.server(ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="rpc"),
                         interceptors=interceptors, options=options,
                         maximum_concurrent_rpcs=config.max_concurrent_rpcs)
    server.add_generic_rpc_handlers([generic_handler(TranslatorServicer(registry, config.limits, metrics)),
                                     admin_handler(reloader, config.auth_token)])
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME], server)
    address = f"{config.host}:{config.port}"
    if (config.tls_cert is None) != (config.tls_key is None):
        raise ValueError("TLS needs both a certificate and a private key")
    try:
        if config.tls_cert is not None:
            creds = grpc.ssl_server_credentials([(config.tls_key, config.tls_cert)])
            port = server.add_secure_port(address, creds)
        else:
            port = server.add_insecure_port(address)
    except RuntimeError as e:  # grpc's way of saying the address is taken or invalid
        raise OSError(f"cannot listen on {address}: {e}") from None
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    wrapper = TranslationServer(server, health_servicer, registry, metrics, in_flight, reloader)
    wrapper.set_not_serving()
    server.start()
    log.info("listening on %s:%d (%s)", config.host, port, "TLS" if config.tls_cert else "plaintext")
    return wrapper, port

