"""Prometheus metrics of the translation server, on their own registry (several servers per process work).

    rate(nmt_requests_total[1m]) by code       requests per second by status code
    nmt_request_seconds                        end-to-end latency per RPC
    nmt_queue_seconds / nmt_compute_seconds    time a text waited for a batch / a batch's engine time
    nmt_batch_texts / nmt_batch_tokens         batch sizes the scheduler formed
    rate(nmt_generated_tokens_total[1m])       tokens/s out (nmt_source_tokens_total: in)
    nmt_queue_depth                            texts waiting per model
    nmt_step_rows / nmt_step_seconds           continuous batching: running-batch rows and time per step
    nmt_first_step_seconds                     arrival of a text to its first decoder step
    nmt_cache_hits_total / nmt_cache_misses_total   texts answered by the cache of repeats / decoded
    nmt_reloads_total by outcome               model reloads: reloaded, unchanged, refused
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("nmt_requests", "RPCs (stream items: one each) by method, model, status code",
                                ["method", "model", "code"], registry=r)
        self.latency = Histogram("nmt_request_seconds", "RPC latency, arrival to answer", ["method"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("nmt_queue_seconds", "Time a text waited for its batch",
                                    ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.compute_time = Histogram("nmt_compute_seconds", "Engine time of a batch (static) or a step",
                                      ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_texts = Histogram("nmt_batch_texts", "Texts per engine batch", ["model"],
                                     buckets=SIZE_BUCKETS, registry=r)
        self.batch_tokens = Histogram("nmt_batch_tokens", "Source tokens per engine batch", ["model"],
                                      buckets=SIZE_BUCKETS, registry=r)
        self.source_tokens = Counter("nmt_source_tokens", "Source tokens translated", ["model"], registry=r)
        self.generated_tokens = Counter("nmt_generated_tokens", "Target tokens generated (best hypotheses)",
                                        ["model"], registry=r)
        self.queue_depth = Gauge("nmt_queue_depth", "Texts waiting for the engine", ["model"], registry=r)
        # Continuous batching: the running batch at every decoder step.
        self.step_rows = Histogram("nmt_step_rows", "Rows of the running batch per decoder step", ["model"],
                                   buckets=SIZE_BUCKETS, registry=r)
        self.step_time = Histogram("nmt_step_seconds", "Time of one decoder step of the running batch",
                                   ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.first_step_time = Histogram("nmt_first_step_seconds", "Arrival of a text to its first step",
                                         ["model"], buckets=LATENCY_BUCKETS, registry=r)
        # The cache of repeats (serve.server.cache) and model reloads (serve.server.reload).
        self.cache_hits = Counter("nmt_cache_hits", "Texts answered from the cache", ["model"], registry=r)
        self.cache_misses = Counter("nmt_cache_misses", "Texts the cache did not hold (decoded)", ["model"],
                                    registry=r)
        self.cache_evictions = Counter("nmt_cache_evictions", "Least recently used entries dropped",
                                       registry=r)
        self.cache_entries = Gauge("nmt_cache_entries", "Translations held in the cache", registry=r)
        self._steps: dict[str, tuple] = {}  # per model: its step_done children (labels() resolved once)
        self.reloads = Counter("nmt_reloads", "Model reloads by outcome (reloaded, unchanged, refused)",
                               ["model", "outcome"], registry=r)

    def request_done(self, method: str, model: str, code: str, seconds: float) -> None:
        self.requests.labels(method, model, code).inc()
        self.latency.labels(method).observe(seconds)

    def batch_done(self, model: str, *, rows: int, tokens: int, queue_seconds: list[float],
                   compute_seconds: float, generated: int) -> None:
        for s in queue_seconds:
            self.queue_time.labels(model).observe(s)
        self.compute_time.labels(model).observe(compute_seconds)
        self.batch_texts.labels(model).observe(rows)
        self.batch_tokens.labels(model).observe(tokens)
        self.source_tokens.labels(model).inc(tokens)
        self.generated_tokens.labels(model).inc(generated)

    def admitted(self, model: str, *, texts: int, tokens: int, queue_seconds: list[float]) -> None:
        """Texts that joined a running batch (continuous batching)."""
        for s in queue_seconds:
            self.queue_time.labels(model).observe(s)
        self.batch_texts.labels(model).observe(texts)
        self.source_tokens.labels(model).inc(tokens)

    def step_done(self, model: str, *, rows: int, seconds: float, generated: int) -> None:
        """One decoder step of a running batch (continuous batching): its engine time is the compute time."""
        step = self._steps.get(model)
        if step is None:  # labels() resolved once: 15 µs a step before, 4 after
            step = self._steps[model] = (self.step_rows.labels(model), self.step_time.labels(model),
                                         self.compute_time.labels(model), self.generated_tokens.labels(model))
        step[0].observe(rows)
        step[1].observe(seconds)
        step[2].observe(seconds)
        if generated:
            step[3].inc(generated)

    def first_step(self, model: str, seconds: float) -> None:
        self.first_step_time.labels(model).observe(seconds)

    def set_queue_depth(self, model: str, texts: int) -> None:
        self.queue_depth.labels(model).set(texts)

    def serve_http(self, port: int, host: str = "0.0.0.0"):
        """Expose /metrics over HTTP; returns the HTTP server (`.server_port`, `.shutdown()`)."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return server
