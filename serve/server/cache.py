"""The cache of repeats: a bounded LRU of translations in front of a model's scheduler (off by default).

    nmt serve --model-dir bundles/en-de --cache-size 100000

Key: (bundle version, source token ids, decoding options). The token ids are the normalized source:
the tokenizer's own normalization (whitespace collapsed and trimmed, NFKC) decides which texts share
an entry, so a hit is exactly what decoding that input would return, never the answer to a text the
engine would see differently. The options are part of the key (beam, n-best, scores, alignments), and
so is the bundle checksum: after a reload the new version misses and the old entries age out.

It sits between the front doors and the scheduler (`CachedScheduler` has the scheduler's submit), so
gRPC, the HTTP API and batch jobs sent to the server all use it; texts repeated inside one request
are decoded once.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from concurrent.futures import Future
from typing import Any

from nmt.decoding import DecodeOptions, Hypothesis, StopSignal
from serve.server.metrics import Metrics

Key = tuple[str, tuple[int, ...], str]


class TranslationCache:
    """At most `capacity` translations (n-best lists), least recently used dropped first; thread-safe."""

    def __init__(self, capacity: int, metrics: Metrics | None = None):
        if capacity <= 0:
            raise ValueError(f"cache capacity must be positive, got {capacity}")
        self.capacity, self.metrics = capacity, metrics
        self._entries: OrderedDict[Hashable, list[Hypothesis]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def get(self, key: Hashable) -> list[Hypothesis] | None:
        with self._lock:
            hyps = self._entries.get(key)
            if hyps is not None:
                self._entries.move_to_end(key)
            return hyps

    def put(self, key: Hashable, hyps: list[Hypothesis]) -> None:
        with self._lock:
            self._entries[key] = hyps
            self._entries.move_to_end(key)
            evicted = 0
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
                evicted += 1
            self.evictions += evicted
            size = len(self._entries)
        if self.metrics is not None:
            if evicted:
                self.metrics.cache_evictions.inc(evicted)
            self.metrics.cache_entries.set(size)

    def count(self, model: str, hits: int, misses: int) -> None:
        with self._lock:
            self.hits += hits
            self.misses += misses
        if self.metrics is not None:
            self.metrics.cache_hits.labels(model).inc(hits)
            self.metrics.cache_misses.labels(model).inc(misses)


def options_key(options: DecodeOptions) -> str:
    # repr covers every field of the dataclass, those added later included, and floats exactly.
    return repr(options)


class CachedScheduler:
    """A scheduler's submit with the cache in front: hits resolve at once, misses go to `inner` (each
    distinct source once) and are stored when decoded. Everything else is the inner scheduler's."""

    def __init__(self, inner: Any, cache: TranslationCache, version: str, model: str):
        self.inner, self.cache, self.version, self.model = inner, cache, version, model

    def __getattr__(self, name: str) -> Any:  # queued, close, running, ...: the scheduler's own
        return getattr(self.inner, name)

    def submit(self, sources: list[list[int]], options: DecodeOptions, stop: StopSignal,
               block: bool = False, **extra: Any) -> Future:
        prefixes: list[list[int]] | None = extra.pop("prefixes", None)
        if extra:  # a kind of submission the cache does not know how to replay (a step listener)
            return self.inner.submit(sources, options, stop, block=block, prefixes=prefixes, **extra)
        opt = options_key(options)
        # A forced target prefix is part of what is decoded: it joins the options in the key.
        keys: list[Key] = [(self.version, tuple(s), opt + (repr(prefixes[i]) if prefixes else ""))
                           for i, s in enumerate(sources)]
        found: list[list[Hypothesis] | None] = [self.cache.get(k) for k in keys]
        missing: dict[Key, list[int]] = {}  # distinct missing source -> the positions it answers
        for i, (k, hyps) in enumerate(zip(keys, found)):
            if hyps is None:
                missing.setdefault(k, []).append(i)
        self.cache.count(self.model, len(sources) - len(missing), len(missing))
        out: Future = Future()
        if not missing:
            out.set_result([list(h) for h in found if h is not None])
            return out
        firsts = [positions[0] for positions in missing.values()]
        inner = self.inner.submit([sources[i] for i in firsts], options, stop, block=block,
                                  prefixes=[prefixes[i] for i in firsts] if prefixes else None)

        def done(f: Future) -> None:
            exc = f.exception()
            if exc is not None:
                out.set_exception(exc)
                return
            for (key, positions), hyps in zip(missing.items(), f.result()):
                self.cache.put(key, hyps)
                for i in positions:
                    found[i] = hyps
            out.set_result([list(h) for h in found if h is not None])

        inner.add_done_callback(done)
        return out
