"""Model reload without downtime: a new bundle version under a served model's name.

    kill -HUP <pid of nmt serve>                       # re-read every --model-dir
    TranslatorClient(target, auth_token=T).reload_model("tiny", "/bundles/tiny-v2")   # the admin RPC

A reload verifies the new bundle (manifest format version, every file's SHA-256), loads it, warms it
up and checks one real translation before it takes traffic; then the registry entry is swapped at
once and the old version's scheduler finishes what it accepted and closes in the background
(registry.Handoff). A bundle that fails any of these is refused (FAILED_PRECONDITION with the reason,
a log line, nmt_reloads_total{outcome="refused"}) and the old version keeps serving. A bundle whose
version (manifest checksum) is already served is left alone, so a SIGHUP reloads only what changed.
"""

from __future__ import annotations

import hmac
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from nmt.bundle import BundleError, read_manifest
from nmt.decoding import InvalidRequest
from nmt.v1 import translator_pb2 as pb
from serve.protocol.convert import SERVICE, Malformed, lenient
from serve.server.metrics import Metrics
from serve.server.registry import ModelRegistry, ReloadRefused

log = logging.getLogger("nmt.serve")

WARMUP_TEXT = "A man is walking down the street."  # any sentence: the new version must translate it


@dataclass(frozen=True)
class ReloadResult:
    name: str
    previous_version: str
    version: str
    reloaded: bool


@dataclass
class Reloader:
    """Loads new versions into `registry`; `dirs` maps each model name to the directory it came from."""

    registry: ModelRegistry
    engine: Any = None  # serve.engine.translator.EngineConfig (default: EngineConfig())
    dirs: dict[str, Path] = field(default_factory=dict)
    metrics: Metrics | None = None
    idle: float = 1.0  # seconds without submissions before a replaced version closes
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def reload(self, name: str, path: str | Path | None = None) -> ReloadResult:
        """Serve the bundle at `path` (default: where `name` was last loaded from) as model `name`."""
        with self._lock:  # one reload at a time: two versions racing for one name help nobody
            try:
                result = self._reload(name, path)
            except (ReloadRefused, InvalidRequest) as e:
                self._count(name, "refused")
                log.error("reload of %s refused, the old version keeps serving: %s", name, e)
                raise
            self._count(name, "reloaded" if result.reloaded else "unchanged")
            return result

    def reload_all(self) -> list[ReloadResult]:
        """Every model from its directory (SIGHUP); a refused one is logged and the others go on."""
        results = []
        for name in list(self.dirs):
            try:
                results.append(self.reload(name))
            except (ReloadRefused, InvalidRequest):
                pass
        return results

    def _count(self, name: str, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.reloads.labels(name, outcome).inc()

    def _reload(self, name: str, path: str | Path | None) -> ReloadResult:
        from serve.engine.translator import EngineConfig, Translator  # onnxruntime: only when loading

        current = self.registry.get(name)
        if current is None:
            served = ", ".join(m.name for m in self.registry.models)
            raise InvalidRequest(f"unknown model {name!r}; served: {served}")
        where = Path(path) if path else self.dirs.get(name)
        if where is None:
            raise InvalidRequest(f"model {name!r} was not loaded from a directory: give the bundle's path")
        try:
            manifest = read_manifest(where)
        except BundleError as e:
            raise ReloadRefused(str(e)) from None
        if manifest.name != name:
            raise InvalidRequest(f"{where} holds model {manifest.name!r}, not {name!r}")
        t = current.translator
        if (manifest.src_lang, manifest.tgt_lang) != (t.src_lang, t.tgt_lang):
            raise InvalidRequest(f"{where} translates {manifest.src_lang}->{manifest.tgt_lang}; "
                                 f"{name!r} serves {t.src_lang}->{t.tgt_lang}")
        if manifest.checksum == current.version:
            return ReloadResult(name, current.version, current.version, reloaded=False)
        try:  # from_bundle checks the checksums again: the files may have changed since
            translator = Translator.from_bundle(where, self.engine or EngineConfig())
            if not translator.translate([WARMUP_TEXT])[0].text.strip():
                raise ValueError("the warm-up translation came back empty")
        except Exception as e:  # whatever breaks, the old version serves on
            raise ReloadRefused(f"cannot serve {where}: {e}") from None
        old, new = self.registry.replace(translator, self.idle)
        self.dirs[name] = where
        log.info("reloaded %s from %s: version %s -> %s", name, where, old.version[:12], new.version[:12])
        return ReloadResult(name, old.version, new.version, reloaded=True)


def admin_handler(reloader: Reloader, auth_token: str | None) -> grpc.GenericRpcHandler:
    """ReloadModel of nmt.v1.Translator. It needs the server's own token, also when API keys are in use
    (they let callers translate, not replace models); without a token the RPC is refused altogether."""
    expected = f"Bearer {auth_token}".encode() if auth_token else None

    def reload_model(request: pb.ReloadModelRequest | Malformed,
                     context: grpc.ServicerContext) -> pb.ReloadModelResponse:
        if expected is None:
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          "ReloadModel is disabled: start the server with --auth-token (or $NMT_AUTH_TOKEN)")
        given = dict(context.invocation_metadata()).get("authorization", "")
        if not hmac.compare_digest(given.encode() if isinstance(given, str) else given, expected or b""):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "ReloadModel needs the server's bearer token")
        if isinstance(request, Malformed):
            raise InvalidRequest(request.error)
        if not request.name:
            raise InvalidRequest("name is empty: give the model to reload")
        r = reloader.reload(request.name, request.path or None)
        return pb.ReloadModelResponse(name=r.name, previous_version=r.previous_version, version=r.version,
                                      reloaded=r.reloaded)

    return grpc.method_handlers_generic_handler(SERVICE, {
        "ReloadModel": grpc.unary_unary_rpc_method_handler(
            reload_model, request_deserializer=lenient(pb.ReloadModelRequest),
            response_serializer=lambda msg: msg.SerializeToString()),
    })
