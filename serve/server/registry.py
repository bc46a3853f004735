"""The models a server serves, each with its batch scheduler, routed by model name or language pair.

The first model added is the default: it answers requests that name neither model nor languages.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from nmt.decoding import InvalidRequest
from serve.engine.continuous import ContinuousScheduler
from serve.engine.packing import DEFAULT_MAX_BATCH_TOKENS
from serve.engine.scheduler import BatchScheduler
from serve.server.metrics import Metrics

if TYPE_CHECKING:  # the registry itself never builds one
    from serve.engine.translator import Translator


Scheduler = BatchScheduler | ContinuousScheduler  # the same submit / queued / close


class NotReady(Exception):
    """Models are still loading, or the server is draining."""


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


@dataclass
class ServedModel:
    translator: Translator
    scheduler: Scheduler

    @property
    def name(self) -> str:
        return self.translator.name


class ModelRegistry:
    def __init__(self, batching: BatchingConfig = BatchingConfig(), metrics: Metrics | None = None):
        self.batching, self.metrics = batching, metrics
        self._models: list[ServedModel] = []
        self._lock = threading.Lock()

    @property
    def models(self) -> list[ServedModel]:
        with self._lock:
            return list(self._models)

    def add(self, translator: Translator) -> ServedModel:
        """Serve a loaded translator; names must be unique (they are the routing key)."""
        with self._lock:
            if any(m.name == translator.name for m in self._models):
                raise ValueError(f"two bundles are named {translator.name!r}; model names must be unique")
            b = self.batching
            scheduler: Scheduler
            if b.mode == "continuous":
                scheduler = ContinuousScheduler(translator, max_batch_tokens=b.max_batch_tokens,
                                                max_queue=b.max_queue, metrics=self.metrics)
            else:
                scheduler = BatchScheduler(translator, max_batch_tokens=b.max_batch_tokens,
                                           max_delay=b.max_delay, max_queue=b.max_queue,
                                           always_wait=b.always_wait, metrics=self.metrics)
            model = ServedModel(translator, scheduler)
            self._models.append(model)
            return model

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
