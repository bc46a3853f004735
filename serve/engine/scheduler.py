"""Dynamic batching: one scheduler thread per model turns concurrent requests into engine batches.

Requests are split into rows (one per text) and queued. The thread waits for work, gives the queue
a short `max_delay` to fill (unless the token budget is already reached), then takes the oldest
row's options and every queued row with identical options, oldest first, up to the token budget, and runs
them through `Translator.translate_ids` as one call. Each request's future completes when its last
row is done. The queue is bounded in texts: `submit` raises QueueFull instead of growing.

The fill delay is adaptive by default: it applies only while requests overlap (the previous batch held
several), so a lone client is not made to wait for company that is not coming; under concurrent load
batches fill up. `always_wait=True` waits every time (largest batches, for throughput-bound jobs).
A lone request on an idle model runs on the submitting thread: no hand-off to the scheduler thread and
back, which on a busy host can cost more than the gRPC call itself. One batch runs at a time per model.

A request's StopSignal (deadline or cancellation) drops its rows from the queue and from a running
batch at the next decoding step; the future then fails with DeadlineExceeded or Cancelled.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol

from nmt.decoding import DecodeOptions, Hypothesis, StopSignal
from serve.engine.packing import DEFAULT_MAX_BATCH_TOKENS, batch_cost

log = logging.getLogger("nmt.serve")


class QueueFull(Exception):
    """The model's queue holds as much work as it may: the caller should retry later."""


class StepTranslator(Protocol):
    """What the scheduler needs of a translator (serve.engine.translator.Translator; fakes in tests)."""

    @property
    def name(self) -> str: ...

    def translate_ids(self, sources: list[list[int]], options: DecodeOptions = ...,
                      stops: list[StopSignal | None] | None = None,
                      max_batch_tokens: int | None = None, prefixes: list[list[int]] | None = None
                      ) -> list[list[Hypothesis] | None]: ...


class StepListener(Protocol):
    """Told the candidates of a text after each of its decoder steps: `candidates[0]` is the current
    best (greedy: the one hypothesis; beam: the live beams best first, then the finished ones), and
    their alignments when the request asked for them."""

    def __call__(self, index: int, step: int, candidates: list[list[int]],
                 alignments: list[list[int]] | None = None) -> None: ...


class BatchMetrics(Protocol):
    """What the scheduler reports (serve.server.metrics.Metrics); a protocol, so the engine needs no
    Prometheus."""

    def batch_done(self, model: str, *, rows: int, tokens: int, queue_seconds: list[float],
                   compute_seconds: float, generated: int) -> None: ...

    def set_queue_depth(self, model: str, texts: int) -> None: ...

    def step_done(self, model: str, *, rows: int, seconds: float, generated: int) -> None: ...

    def admitted(self, model: str, *, texts: int, tokens: int, queue_seconds: list[float]) -> None: ...

    def first_step(self, model: str, seconds: float) -> None: ...


@dataclass(eq=False)  # identity semantics: jobs are dict keys
class Job:
    """One request: its rows' sources, shared options and stop signal, and where results go."""

    sources: list[list[int]]
    options: DecodeOptions
    stop: StopSignal
    enqueued: float
    future: Future = field(default_factory=Future)
    results: list[list[Hypothesis] | None] = field(default_factory=list)
    remaining: int = 0
    # Forced target prefix of each source (target ids; empty = none), or None for no prefixes at all.
    prefixes: list[list[int]] | None = None
    # Called by the continuous loop after each decoder step of a text (serve.engine.streaming).
    listener: StepListener | None = None

    def __post_init__(self) -> None:
        self.results = [None] * len(self.sources)
        if self.prefixes is not None and len(self.prefixes) != len(self.sources):
            raise ValueError(f"{len(self.prefixes)} target prefixes for {len(self.sources)} sources")
        self.remaining = len(self.sources)

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)

    def prefix(self, index: int) -> list[int]:
        return self.prefixes[index] if self.prefixes is not None else []

    def finish_row(self, index: int, hyps: list[Hypothesis]) -> None:
        self.results[index] = hyps
        self.remaining -= 1
        if self.remaining == 0 and not self.future.done():
            self.future.set_result(self.results)


Row = tuple[Job, int]  # (request, index of its text)


def wait_for_room(cond: threading.Condition, queued: Callable[[], int], n: int, max_queue: int, name: str,
                  stop: StopSignal, block: bool, closing: Callable[[], bool]) -> bool:
    """With `cond` held: True once the queue has room for n more texts. Raises QueueFull when it will not
    (over the bound, full and not blocking, or shutting down); False when `stop` was set while waiting."""
    if n > max_queue:
        raise QueueFull(f"{n} texts exceed the queue of model {name!r} ({max_queue})")
    while True:
        if closing():  # the loop thread may already be gone: queued work would never run
            raise QueueFull(f"model {name!r} is shutting down")
        if queued() + n <= max_queue:
            return True
        if not block:
            raise QueueFull(f"the queue of model {name!r} is full ({queued()} texts waiting, "
                            f"max {max_queue}); retry later")
        if stop.stopped(time.monotonic()):
            return False
        cond.wait(0.05)


class BatchScheduler:
    """Gathers queued rows into engine batches on its own thread."""

    def __init__(self, translator: StepTranslator, *, max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
                 max_delay: float = 0.002,
                 max_queue: int = 1024, always_wait: bool = False, name: str = "",
                 metrics: BatchMetrics | None = None):
        if max_batch_tokens <= 0 or max_queue <= 0 or max_delay < 0:
            raise ValueError("max_batch_tokens and max_queue must be positive, max_delay >= 0")
        self.translator = translator
        self.max_batch_tokens, self.max_delay, self.max_queue = max_batch_tokens, max_delay, max_queue
        self.name = name or translator.name
        self.metrics = metrics
        self._rows: deque[Row] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self.always_wait = always_wait
        self._busy = False  # a batch is running (on the scheduler thread or a submitting thread)
        self._overlapping = False  # the last batch held several requests: worth waiting for more
        self._thread = threading.Thread(target=self._run, name=f"scheduler-{self.name}", daemon=True)
        self._thread.start()

    @property
    def stopped(self) -> bool:
        """Closed and its thread gone: nothing runs on the engine any more."""
        return self._closing and not self._thread.is_alive()

    @property
    def queued(self) -> int:
        """Texts waiting for the engine."""
        with self._cond:
            return len(self._rows)

    def submit(self, sources: list[list[int]], options: DecodeOptions, stop: StopSignal,
               block: bool = False, prefixes: list[list[int]] | None = None,
               listener: StepListener | None = None) -> Future:
        """Queue a request's sources; the future resolves to one hypothesis list per source.

        Raises QueueFull when the queue cannot take them, or with block=True waits for room
        (until `stop` is set: then the returned future fails like a stopped request).
        With block=False a lone request on an idle model is decoded right here, before returning.
        `prefixes`: forced target prefixes per source. `listener` is never called here (a batch is
        decoded in one engine call): a streaming caller gets the finished translation only.
        """
        job = Job(sources, options, stop, time.monotonic(), prefixes=prefixes, listener=listener)
        with self._cond:
            if not wait_for_room(self._cond, lambda: len(self._rows), len(sources), self.max_queue, self.name,
                                 stop, block, lambda: self._closing):
                job.fail(stop.error(time.monotonic()))
                return job.future
            if not sources:
                job.future.set_result([])
                return job.future
            job.enqueued = time.monotonic()
            self._rows.extend((job, i) for i in range(len(sources)))
            inline = (not block and not self._busy and not self._overlapping and not self.always_wait
                      and len(self._rows) == len(sources))
            if inline:
                self._busy = True
                batch = self._take_locked()
            else:
                self._cond.notify_all()
        if inline:
            self._execute_and_release(batch)
        else:
            self._report_queue()
        return job.future

    def close(self, timeout: float | None = None) -> None:
        """Finish the queued work, then stop the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout)

    # -- the scheduler thread -----------------------------------------------------------------
    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._execute_and_release(batch)

    def _queued_cost(self) -> int:
        """The padded cost (serve.engine.packing.batch_cost) of running every queued row at once."""
        longest = max(len(job.sources[i]) for job, i in self._rows)
        return sum(batch_cost(1, longest, job.options.beam_size) for job, _ in self._rows)

    def _next_batch(self) -> list[Row] | None:
        """Wait for rows, let the queue fill up to max_delay, then take one batch (None: closed and empty)."""
        with self._cond:
            while not self._rows or self._busy:
                if self._closing and not self._rows and not self._busy:
                    return None
                self._cond.wait()
            wait = self.always_wait or self._overlapping
            fill_until = self._rows[0][0].enqueued + (self.max_delay if wait else 0.0)
            while not self._closing and self._queued_cost() < self.max_batch_tokens:
                left = fill_until - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch = self._take_locked()
            self._busy = True
            self._cond.notify_all()  # room in the queue for blocked submitters
        self._report_queue()
        return batch

    def _take_locked(self) -> list[Row]:
        """The head row's options and all queued rows sharing them, oldest first, within the budget."""
        now = time.monotonic()
        options, longest = None, 0
        batch: list[Row] = []
        kept: deque[Row] = deque()
        while self._rows:
            row = self._rows.popleft()
            job = row[0]
            if job.future.done():  # an earlier row of it was stopped or failed
                continue
            if job.stop.stopped(now):
                job.fail(job.stop.error(now))
                continue
            if options is None:
                options = job.options
            length = max(longest, len(job.sources[row[1]]))
            cost = batch_cost(len(batch) + 1, length, job.options.beam_size)  # the engine's own rule
            if job.options == options and (not batch or cost <= self.max_batch_tokens):
                batch.append(row)
                longest = length
            else:
                kept.append(row)
        self._rows = kept
        self._overlapping = len({id(job) for job, _ in batch}) > 1
        return batch

    def _execute_and_release(self, batch: list[Row]) -> None:
        try:
            if batch:
                self._execute(batch)
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify_all()
            self._report_queue()

    def _execute(self, batch: list[Row]) -> None:
        started = time.monotonic()
        options = batch[0][0].options
        try:
            # The same budget as the batch was formed under: the engine runs it as one batch.
            # Prefixes only when some row has one, so translators without prefix support still serve.
            forced = ({"prefixes": [job.prefix(i) for job, i in batch]}
                      if any(job.prefixes for job, _ in batch) else {})
            outputs = self.translator.translate_ids([job.sources[i] for job, i in batch], options,
                                                    [job.stop for job, _ in batch], self.max_batch_tokens,
                                                    **forced)
        except Exception as exc:
            self._isolate_failure(batch, exc)
            return
        now = time.monotonic()
        generated = 0
        for (job, i), hyps in zip(batch, outputs):
            if hyps is None:
                job.fail(job.stop.error(now))
            elif not job.future.done():
                job.finish_row(i, hyps)
                generated += len(hyps[0].tokens)
        if self.metrics is not None:
            tokens = sum(len(job.sources[i]) for job, i in batch)
            self.metrics.batch_done(self.name, rows=len(batch), tokens=tokens,
                                    queue_seconds=[started - job.enqueued for job, _ in batch],
                                    compute_seconds=now - started, generated=generated)

    def _isolate_failure(self, batch: list[Row], exc: Exception) -> None:
        """A failing batch of several requests is rerun per request, so only the culprit fails."""
        jobs = list(dict.fromkeys(job for job, _ in batch))
        if len(jobs) == 1:
            log.warning("model %s: batch of %d texts failed: %r", self.name, len(batch), exc,
                        exc_info=not isinstance(exc, ValueError))
            jobs[0].fail(exc)
            return
        for job in jobs:
            self._execute([row for row in batch if row[0] is job])

    def _report_queue(self) -> None:
        if self.metrics is not None:
            self.metrics.set_queue_depth(self.name, self.queued)
