"""The models a server serves, each with its batch scheduler, routed by model name or language pair.

The first model added is the default: it answers requests that name neither model nor languages.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nmt.bundle import Manifest
from nmt.decoding import InvalidRequest
from serve.engine.continuous import ContinuousScheduler
from serve.engine.packing import DEFAULT_MAX_BATCH_TOKENS
from serve.engine.scheduler import BatchScheduler
from serve.server.cache import CachedScheduler, TranslationCache
from serve.server.metrics import Metrics

if TYPE_CHECKING:  # the registry itself never builds one
    from serve.engine.translator import Translator


Scheduler = BatchScheduler | ContinuousScheduler  # the same submit / queued / close


log = logging.getLogger("nmt.serve")


class NotReady(Exception):
    """Models are still loading, or the server is draining."""


class ReloadRefused(Exception):
    """A new bundle version that cannot be served (broken, fails to load or warm up): the old one stays."""


BATCHING_MODES = ("continuous", "static")


@dataclass(frozen=True)
class BatchingConfig:
    # continuous: texts join and leave the running batch at every decoder step (serve.engine.continuous);
    # static: one batch of requests with identical options at a time (serve.engine.scheduler).
    mode: str = "continuous"
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS  # padded tokens per batch (see the two schedulers)
    max_delay: float = 0.002  # static: seconds the scheduler lets the queue fill once work arrived
    max_queue: int = 1024  # texts waiting per model; beyond it RESOURCE_EXHAUSTED
    always_wait: bool = False  # static: wait max_delay even for a lone request (default: while overlapping)


def tokenizer_identity(manifest: Manifest) -> tuple:
    """What decides the token ids of a text: every file of the bundle but its graphs (our one
    SentencePiece model, or an imported pair and its vocabularies) and the manifest's tokenizer entry."""
    files = sorted((name, entry.get("sha256")) for name, entry in manifest.files.items()
                   if not name.endswith(".onnx"))
    return tuple(files), repr(manifest.raw.get("tokenizer"))


class Handoff:
    """The scheduler a served model exposes. When a reload replaces the model, `retire` lets requests
    that already resolved it still submit to its own scheduler (their source ids come from its tokenizer),
    and closes that scheduler in the background once no submission has come for `idle` seconds: close
    finishes its queued and running texts. A submission after that goes to the successor when it shares
    the tokenizer, else is refused as UNAVAILABLE (the caller retries and resolves the new version)."""

    def __init__(self, inner: Any, translator: Translator):
        self.inner, self.translator = inner, translator
        # The bundle's version, hashed once: every response names it, and hashing the manifest per
        # request cost a third of a millisecond.
        self.version = translator.manifest.checksum
        self._lock = threading.Lock()
        self._active = 0  # submissions under way into `inner`
        self._last_use = time.monotonic()
        self._closed = False
        self._successor: Handoff | None = None

    def __getattr__(self, name: str) -> Any:  # queued, running, ...: the scheduler's own
        return getattr(self.inner, name)

    def submit(self, sources: list[list[int]], options: Any, stop: Any, block: bool = False,
               **extra: Any) -> Any:
        return self.submit_on(sources, options, stop, block, **extra)[0]

    def submit_on(self, sources: list[list[int]], options: Any, stop: Any, block: bool = False,
                  **extra: Any) -> tuple[Any, str]:
        """As submit, with the version (manifest checksum) that takes the texts: this one, or the
        successor once this one has closed, so a response names the version that really translated."""
        with self._lock:
            successor = self._successor if self._closed else None
            if self._closed and successor is None:
                raise NotReady(f"model {self.translator.name!r} was reloaded; retry")
            if successor is None:
                self._active += 1
        if successor is not None:
            return successor.submit_on(sources, options, stop, block, **extra)
        try:
            return self.inner.submit(sources, options, stop, block=block, **extra), self.version
        finally:
            with self._lock:
                self._active -= 1
                self._last_use = time.monotonic()

    def close(self, timeout: float | None = None) -> None:
        self.inner.close(timeout)  # later submissions fail as the scheduler's do when shutting down

    def retire(self, successor: Handoff, idle: float = 1.0, timeout: float | None = 60.0) -> threading.Thread:
        """Close this scheduler once idle (in a thread, returned); later submissions go to `successor`."""
        mine, theirs = self.translator.manifest, successor.translator.manifest
        same = tokenizer_identity(mine) == tokenizer_identity(theirs)

        def close_when_idle() -> None:
            while True:
                with self._lock:
                    if self._active == 0 and time.monotonic() - self._last_use >= idle:
                        self._closed, self._successor = True, successor if same else None
                        break
                time.sleep(idle / 4)
            self.inner.close(timeout)
            if self.inner.stopped:  # its sessions' memory goes back now, not at some garbage collection
                self.translator.runtime.release()
            log.info("model %s: version %s closed after its last request", self.translator.name,
                     self.version[:12])

        thread = threading.Thread(target=close_when_idle, name=f"retire-{self.translator.name}", daemon=True)
        thread.start()
        return thread


@dataclass
class ServedModel:
    translator: Translator
    scheduler: Handoff

    @property
    def name(self) -> str:
        return self.translator.name

    @property
    def version(self) -> str:
        return self.scheduler.version


class ModelRegistry:
    def __init__(self, batching: BatchingConfig = BatchingConfig(), metrics: Metrics | None = None,
                 cache: TranslationCache | None = None):
        self.batching, self.metrics, self.cache = batching, metrics, cache
        self._models: list[ServedModel] = []
        self._lock = threading.Lock()
        self._retiring: list[threading.Thread] = []

    @property
    def models(self) -> list[ServedModel]:
        with self._lock:
            return list(self._models)

    def add(self, translator: Translator) -> ServedModel:
        """Serve a loaded translator; names must be unique (they are the routing key)."""
        with self._lock:
            if any(m.name == translator.name for m in self._models):
                raise ValueError(f"two bundles are named {translator.name!r}; model names must be unique")
            model = self._serve(translator)
            self._models.append(model)
            return model

    def _serve(self, translator: Translator) -> ServedModel:
        """A translator with its own scheduler (each loop owns its translator), the cache in front."""
        b = self.batching
        scheduler: Scheduler
        if b.mode == "continuous":
            scheduler = ContinuousScheduler(translator, max_batch_tokens=b.max_batch_tokens,
                                            max_queue=b.max_queue, metrics=self.metrics)
        else:
            scheduler = BatchScheduler(translator, max_batch_tokens=b.max_batch_tokens,
                                       max_delay=b.max_delay, max_queue=b.max_queue,
                                       always_wait=b.always_wait, metrics=self.metrics)
        front: Any = scheduler
        if self.cache is not None:
            front = CachedScheduler(scheduler, self.cache, translator.manifest.checksum, translator.name)
        return ServedModel(translator, Handoff(front, translator))

    def replace(self, translator: Translator, idle: float = 1.0) -> tuple[ServedModel, ServedModel]:
        """Serve `translator` in place of the model of the same name (same routing position, so a default
        stays the default); the old one finishes its requests and closes in the background. (old, new)."""
        new = self._serve(translator)
        with self._lock:
            index = next((i for i, m in enumerate(self._models) if m.name == translator.name), None)
            if index is None:
                new.scheduler.close(0)
                raise InvalidRequest(f"unknown model {translator.name!r}")
            old, self._models[index] = self._models[index], new
            self._retiring = [t for t in self._retiring if t.is_alive()]
            self._retiring.append(old.scheduler.retire(new.scheduler, idle))
        return old, new

    def get(self, name: str) -> ServedModel | None:
        return next((m for m in self.models if m.name == name), None)

    def resolve(self, model: str = "", source_language: str = "", target_language: str = "") -> ServedModel:
        """The model for a request: by name, else by language pair (a side may be empty), else the default."""
        models = self.models
        if not models:
            raise NotReady("models are still loading; retry shortly")
        src, tgt = source_language.strip(), target_language.strip()
        if model:
            found = next((m for m in models if m.name == model), None)
            if found is None:
                raise InvalidRequest(f"unknown model {model!r}; served: {', '.join(m.name for m in models)}")
            t = found.translator
            if (src and src != t.src_lang) or (tgt and tgt != t.tgt_lang):
                raise InvalidRequest(f"model {model!r} translates {t.src_lang}->{t.tgt_lang}, "
                                     f"not {src or '*'}->{tgt or '*'}")
            return found
        for m in models:
            if (not src or src == m.translator.src_lang) and (not tgt or tgt == m.translator.tgt_lang):
                return m
        pairs = ", ".join(f"{m.translator.src_lang}->{m.translator.tgt_lang}" for m in models)
        raise InvalidRequest(f"unknown language pair {src or '*'}->{tgt or '*'}; served: {pairs}")

    def close(self, timeout: float | None = None) -> None:
        """Let every scheduler finish its queue, then stop it."""
        for m in self.models:
            m.scheduler.close(timeout)
        with self._lock:
            retiring = list(self._retiring)
        for t in retiring:  # versions replaced by a reload still finishing their requests
            t.join(timeout)
