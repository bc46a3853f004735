"""`nmt serve`: the gRPC translation server on one or more bundles.

    nmt serve --model-dir bundles/en-de [--model-dir bundles/en-fr] --host 0.0.0.0 --port 50051 \
        --metrics-port 9090 --device auto --drain-seconds 20

Start-up: every bundle's manifest and checksums are verified before the port opens (a bad bundle:
one line on stderr, exit 1, nothing listening); the server then listens with health NOT_SERVING
while the models load and warm up, and turns SERVING. SIGTERM/SIGINT: NOT_SERVING, new RPCs refused,
accepted requests finish within --drain-seconds, exit 0. SIGHUP: every --model-dir is read again and a
changed bundle is verified, warmed up and swapped in without downtime (serve.server.reload).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from nmt.bundle import BundleError, read_manifest
from nmt.errors import EXIT_FAILURE, UserError
from serve.server.cache import TranslationCache
from serve.server.keys import KeyStore, read_keys_file
from serve.server.metrics import Metrics
from serve.server.registry import BATCHING_MODES, BatchingConfig, ModelRegistry
from serve.server.reload import Reloader
from serve.server.server import ServerConfig, create_server
from serve.server.servicer import Limits

log = logging.getLogger("nmt.serve")


def parse_args(argv: list[str]) -> argparse.Namespace:
    d, b = Limits(), BatchingConfig()
    p = argparse.ArgumentParser(prog="nmt serve", description="Serve bundles over gRPC.")
    p.add_argument("--model-dir", action="append", required=True, type=Path,
                   help="a bundle directory (repeat for several; the first is the default model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: all interfaces)")
    p.add_argument("--port", type=int, default=50051, help="gRPC port (0: any free port, printed at start)")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this HTTP port")
    p.add_argument("--http-port", type=int,
                   help="also serve the LibreTranslate-compatible HTTP API and the translate page "
                        "on this port (0: any free port, printed at start); off by default")
    p.add_argument("--keys-file", type=Path,
                   help="JSON API keys with per-key requests/characters per minute (serve/server/keys.py); "
                        "required on HTTP and gRPC, beside --auth-token")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--intra-op-threads", type=int, help="ONNX Runtime threads per operator")
    p.add_argument("--batching", choices=BATCHING_MODES, default=b.mode,
                   help="continuous: requests join the running batch at every decoding step; "
                        "static: one batch of same-option requests at a time")
    p.add_argument("--max-batch-tokens", type=int, default=b.max_batch_tokens,
                   help="padded tokens per batch: continuous: rows x (longest source + longest budget); "
                        "static: sources x beam x longest source")
    p.add_argument("--max-delay-ms", type=float, default=b.max_delay * 1e3,
                   help="static: how long a batch may wait for more requests while requests overlap")
    p.add_argument("--batch-wait", choices=("adaptive", "always"), default="adaptive",
                   help="adaptive: a lone request does not wait (latency); always: wait every time")
    p.add_argument("--max-queue", type=int, default=b.max_queue,
                   help="texts waiting per model; more: RESOURCE_EXHAUSTED")
    p.add_argument("--max-texts", type=int, default=d.max_texts, help="texts per request")
    p.add_argument("--max-chars", type=int, default=d.max_chars, help="characters per text")
    p.add_argument("--max-message-mb", type=float, default=d.max_message_bytes / 2**20,
                   help="largest request/response message")
    p.add_argument("--workers", type=int, default=ServerConfig.workers, help="RPCs handled concurrently")
    p.add_argument("--auth-token", default=os.environ.get("NMT_AUTH_TOKEN"),
                   help="require 'authorization: Bearer TOKEN' on every RPC but health "
                        "(default: $NMT_AUTH_TOKEN; prefer the variable: flags show in `ps`)")
    p.add_argument("--tls-cert", type=Path, help="PEM certificate chain (with --tls-key: serve TLS)")
    p.add_argument("--tls-key", type=Path, help="PEM private key")
    p.add_argument("--drain-seconds", type=float, default=20.0,
                   help="on SIGTERM, how long accepted requests may take to finish")
    p.add_argument("--cache-size", type=int, default=0,
                   help="keep the translations of this many distinct texts (LRU) and answer repeats "
                        "from them; 0: no cache (the default)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                   help="debug logs one line per request")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace) -> tuple[ServerConfig, BatchingConfig]:
    """Check the flags; UserError names the bad one."""
    positive = {"--max-batch-tokens": args.max_batch_tokens, "--max-queue": args.max_queue,
                "--max-texts": args.max_texts, "--max-chars": args.max_chars, "--workers": args.workers,
                "--max-message-mb": args.max_message_mb}
    for flag, value in positive.items():
        if value <= 0:
            raise UserError(f"{flag} must be positive, got {value}")
    if args.cache_size < 0:
        raise UserError(f"--cache-size must be >= 0, got {args.cache_size}")
    if args.max_delay_ms < 0 or args.drain_seconds < 0:
        raise UserError("--max-delay-ms and --drain-seconds must be >= 0")
    if args.max_texts > args.max_queue:
        raise UserError(f"--max-texts ({args.max_texts}) cannot exceed --max-queue ({args.max_queue})")
    for flag, port in (("--port", args.port), ("--metrics-port", args.metrics_port),
                       ("--http-port", args.http_port)):
        if port is not None and not 0 <= port <= 65535:
            raise UserError(f"{flag} must be in [0, 65535], got {port}")
    if (args.tls_cert is None) != (args.tls_key is None):
        raise UserError("--tls-cert and --tls-key go together")
    if args.auth_token is not None and not args.auth_token.strip():
        raise UserError("the auth token is empty")
    try:
        cert = args.tls_cert.read_bytes() if args.tls_cert else None
        key = args.tls_key.read_bytes() if args.tls_key else None
    except OSError as e:
        raise UserError(f"cannot read {e.filename}: {e.strerror}") from None
    limits = Limits(max_texts=args.max_texts, max_chars=args.max_chars,
                    max_message_bytes=int(args.max_message_mb * 2**20))
    try:
        keys = KeyStore(read_keys_file(args.keys_file), args.auth_token) if args.keys_file else None
    except ValueError as e:
        raise UserError(f"--keys-file: {e}") from None
    config = ServerConfig(host=args.host, port=args.port, limits=limits, auth_token=args.auth_token,
                          tls_cert=cert, tls_key=key, workers=args.workers, keys=keys)
    batching = BatchingConfig(mode=args.batching, max_batch_tokens=args.max_batch_tokens,
                              max_delay=args.max_delay_ms / 1e3, max_queue=args.max_queue,
                              always_wait=args.batch_wait == "always")
    return config, batching


def check_bundles(dirs: list[Path]) -> None:
    """Manifest, files and checksums of every bundle, and unique names, before anything listens."""
    names: dict[str, Path] = {}
    for d in dirs:
        name = read_manifest(d).name
        if name in names:
            raise BundleError(f"{d} and {names[name]} are both named {name!r}; model names must be unique")
        names[name] = d


def start_http_api(registry: ModelRegistry, config: ServerConfig, metrics: Metrics,
                   args: argparse.Namespace):
    """The HTTP API on --http-port, on the same registry (so the same schedulers) as gRPC."""
    from serve.server.http_api import HttpState, build_app
    from serve.server.http_server import HttpServer

    keys = config.keys or KeyStore(token=config.auth_token)
    state = HttpState(registry, config.limits, keys, metrics)
    api = HttpServer(build_app(state), args.host, args.http_port, grace=args.drain_seconds)
    api.start()
    return api


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    config, batching = build_config(args)
    check_bundles(args.model_dir)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    hangup = threading.Event()
    signal.signal(signal.SIGHUP, lambda *_: hangup.set())

    metrics = Metrics()
    cache = TranslationCache(args.cache_size, metrics) if args.cache_size else None
    registry = ModelRegistry(batching, metrics, cache)
    reloader = Reloader(registry, metrics=metrics)  # its engine settings are set once the engine loads
    try:
        server, port = create_server(registry, config, metrics, reloader)
        http = metrics.serve_http(args.metrics_port, args.host) if args.metrics_port is not None else None
        api = start_http_api(registry, config, metrics, args) if args.http_port is not None else None
    except OSError as e:
        raise UserError(str(e), EXIT_FAILURE) from None
    print(f"nmt serve: listening on {args.host}:{port}"
          + (f", metrics on :{http.server_port}" if http else "")
          + (f", http on :{api.port}" if api else ""), file=sys.stderr, flush=True)
    try:
        from serve.engine.translator import EngineConfig, Translator

        engine = reloader.engine = EngineConfig(device=args.device, intra_op_threads=args.intra_op_threads)
        for d in args.model_dir:
            if stop.is_set():
                break
            translator = Translator.from_bundle(d, engine)
            registry.add(translator)
            reloader.dirs[translator.name] = d
            log.info("loaded %s (%s->%s) from %s on %s", translator.name, translator.src_lang,
                     translator.tgt_lang, d, translator.provider)
    except Exception as e:  # nothing half-started stays up: stop and say why in one line
        if api is not None:
            api.stop(0)
        server.stop()
        raise UserError(f"cannot load {d}: {e}", EXIT_FAILURE) from None
    if not stop.is_set():
        server.set_serving()
        log.info("SERVING %d model(s)", len(registry.models))
    while not stop.wait(0.5):
        if hangup.is_set():  # off the main thread: a SIGTERM during a reload still drains at once
            hangup.clear()
            log.info("SIGHUP: reading the bundle directories again")
            threading.Thread(target=reloader.reload_all, name="reload", daemon=True).start()
    log.info("draining (up to %.0fs)", args.drain_seconds)
    if api is not None:  # first: its requests in flight need the schedulers that drain() stops
        api.stop(args.drain_seconds)
    server.drain(args.drain_seconds)
    if http is not None:
        http.shutdown()
    log.info("stopped")
    return 0
