"""Continuous batching: one decoding loop per model; requests join and leave the running batch at every step.

The loop thread owns a running batch (a SlotCache on CPU, else a DecoderCache; its rows may be of
different ages). At every step boundary it
  1. drops the rows of requests that were cancelled or passed their deadline,
  2. admits queued texts, oldest first, while the batch's cache stays within the token budget: their
     sources are encoded together and joined to the running cache (cross-attention K/V padded to
     the longer source; a SlotCache gives them the next free rows of its per-row buffers, a
     DecoderCache an empty self-attention past padded and masked), and
  3. runs one decoder step for every live row, each at its own position; finished texts leave.
A text never waits for a running batch to end: it joins at the next step boundary, or, when the
batch is a large DecoderCache (whose join copies the whole cache), within ADMIT_AFTER boundaries
together with others. While rows are decoding, newcomers are encoded on an encoder thread (when a
core is free: `encode_ahead`) and join at the first boundary after: the running rows do not wait
for an encoder run (bench/results/batching-encode-ahead.md: at 60% load short p99 1.18x
static's encoding between steps, 0.33x ahead).

The loop is a role, not only a thread: a lone request on an idle model runs the step boundaries on
its caller's thread (admitting whoever comes meanwhile) and leaves the rest to the loop thread.

Greedy and beam texts with any options share a step: the step fetches the largest top-k any row
needs and each text reads only its own columns, so its tokens are exactly those of a batch of its
own (serve.engine.search applies the same rules). A beam text's k rows stay together. Texts that
want alignments run in a second lane (the decoder graph with the cross_attention output), stepped
in turn with the first: every other text decodes on the plain graph, as it would alone.

A text with a forced target prefix takes its first steps from the prefix (unscored; a beam is one
hypothesis until the prefix ends), whatever the other rows are doing. A request's step listener (a
streamed text, serve.engine.streaming) is told its candidates after each of its steps.

The budget counts padded cache tokens of the batch as it would be at its longest: rows x (longest
source + longest generation budget), the `serve.engine.packing` unit. The queue is bounded in texts
(QueueFull beyond it), like the static scheduler (serve.engine.scheduler), whose interface it shares.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np

from nmt.decoding import DecodeOptions, StopSignal
from serve.engine.lanes import Lane, Text
from serve.engine.packing import DEFAULT_MAX_BATCH_TOKENS
from serve.engine.runtime import DecoderCache
from serve.engine.scheduler import BatchMetrics, Job, StepListener, wait_for_room
from serve.engine.search import Beam, advance, candidates, finish_live, force, greedy_pick, place, scored
from serve.engine.slots import SlotCache

if TYPE_CHECKING:
    from serve.engine.translator import Translator

log = logging.getLogger("nmt.serve")

ADMIT_AFTER = 4  # step boundaries a fitting text may wait for others to join with it (see _admit)


class ContinuousScheduler:
    """The decoding loop of one model: submit() queues a request's texts; the loop thread decodes them."""

    def __init__(self, translator: Translator, *, max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
                 max_queue: int = 1024, name: str = "", metrics: BatchMetrics | None = None,
                 thread: bool = True, encode_ahead: bool | None = None):
        if max_batch_tokens <= 0 or max_queue <= 0:
            raise ValueError("max_batch_tokens and max_queue must be positive")
        self.translator, self.metrics = translator, metrics
        self.max_batch_tokens, self.max_queue = max_batch_tokens, max_queue
        self.name = name or translator.name
        self._queue: deque[Text] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self.lanes = [Lane(alignments=False), Lane(alignments=True)]
        # Held by whoever runs step_once: the loop thread, or a lone request's own thread (see submit).
        self._drive = threading.Lock()
        # thread=False: no loop thread; the caller runs `step_once` (deterministic interleavings in tests).
        self._thread = threading.Thread(target=self._run, name=f"decoder-{self.name}", daemon=True)
        # Newcomers' sources are encoded on a second thread while the running batch keeps stepping, so
        # its rows wait for the join only, not for an encoder run. None: so when the loop has its thread,
        # runs on CPU and the sessions' threads leave a core free (on a GPU it was not measured).
        runtime = translator.runtime
        if encode_ahead is None:
            spare = (os.cpu_count() or 1) > runtime.copy_threads
            encode_ahead = thread and runtime.device.type == "cpu" and spare
        self._encoder = (ThreadPoolExecutor(1, thread_name_prefix=f"encoder-{self.name}")
                         if encode_ahead else None)
        if thread:
            self._thread.start()

    @property
    def stopped(self) -> bool:
        """Closed and its thread gone: nothing runs on the engine any more."""
        return self._closing and not self._thread.is_alive()

    @property
    def queued(self) -> int:
        with self._cond:
            return len(self._queue)

    @property
    def running(self) -> int:
        """Rows in the running batches."""
        return sum(lane.rows for lane in self.lanes)

    def submit(self, sources: list[list[int]], options: DecodeOptions, stop: StopSignal,
               block: bool = False, prefixes: list[list[int]] | None = None,
               listener: StepListener | None = None) -> Future:
        """Queue a request's sources; the future resolves to one hypothesis list per source.

        Raises QueueFull when the queue cannot take them, or with block=True waits for room (until
        `stop` is set: then the returned future fails like a stopped request). `prefixes`: forced
        target ids per source; `listener` is told each text's candidates after each of its steps."""
        self.translator.check(sources, options, prefixes)  # bad input fails here, as the engine would
        job = Job(sources, options, stop, time.monotonic(), prefixes=prefixes, listener=listener)
        with self._cond:
            if not wait_for_room(self._cond, lambda: len(self._queue), len(sources), self.max_queue,
                                 self.name, stop, block, lambda: self._closing):
                job.fail(stop.error(time.monotonic()))
                return job.future
            if not sources:
                job.future.set_result([])
                return job.future
            idle = not self._queue and not self._busy()
            now = job.enqueued = time.monotonic()
            for i, src in enumerate(sources):
                budget = self.translator.budget(len(src), options)
                beam = None if options.beam_size == 1 else Beam(budget=budget)
                self._queue.append(Text(job, i, src, budget, now, beam, prefix=job.prefix(i)))
            # A lone request on an idle model decodes on this thread: no hand-off to the loop thread
            # and back (in one process 4% of a lone sentence; through gRPC within the noise). A
            # streamed one does not: its caller reads the steps as they come.
            lone = (idle and not block and listener is None and self._thread.is_alive()
                    and self._drive.acquire(blocking=False))
            if not lone:
                self._cond.notify_all()
        self._report_queue()
        if lone:
            self._drive_until(job.future)
        return job.future

    def _drive_until(self, future: Future) -> None:
        """Run step boundaries (admitting whoever comes meanwhile) until `future` is done, then leave
        the rest to the loop thread."""
        try:
            while not future.done():
                self.step_once()
        finally:
            self._drive.release()
            with self._cond:
                if self._queue or self._busy():  # no wake-up for nothing: it would contend with the reply
                    self._cond.notify_all()

    def close(self, timeout: float | None = None) -> None:
        """Finish the queued and running work, then stop the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self._encoder is not None and not self._thread.is_alive():
            self._encoder.shutdown(wait=False)

    # -- the loop -----------------------------------------------------------------------------
    def _busy(self) -> bool:
        """Rows running or being encoded."""
        return bool(self.running or any(lane.encoding for lane in self.lanes))

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._busy():
                    if self._closing:
                        return
                    self._cond.wait()
            with self._drive:
                self.step_once()

    def step_once(self) -> None:
        """One step boundary of every lane: drop stopped rows, admit queued texts, one decoder step."""
        for lane in self.lanes:
            try:
                self._drop_stopped(lane.texts)
                self._admit(lane)
                if lane.texts:
                    self._step(lane)
            except Exception as exc:  # a broken step fails the texts in it, the loop goes on
                log.warning("model %s: decoding step failed: %r", self.name, exc,
                            exc_info=not isinstance(exc, ValueError))
                for text in lane.texts:
                    text.job.fail(exc)
                lane.texts, lane.cache = [], None

    def _drop_stopped(self, texts: list[Text]) -> None:
        """Texts whose request failed or was stopped are done (their rows leave at the next step)."""
        now = time.monotonic()
        for text in texts:
            if not text.done and (text.job.future.done() or text.job.stop.stopped(now)):
                text.done = True
                text.job.fail(text.job.stop.error(now))

    def _admit(self, lane: Lane) -> None:
        """Queued texts of this lane join the running batch, oldest first, within the budget."""
        if lane.encoding:
            self._join_encoded(lane)
        if not self._queue:  # read without the lock: a text queued meanwhile comes at the next boundary
            return
        now = time.monotonic()
        taken: list[Text] = []
        running = [t for t in lane.texts if not t.done] + lane.pending()
        rows = sum(t.options.beam_size for t in running)
        longest_src = max((len(t.source) for t in running), default=0)
        longest_budget = max((t.budget for t in running), default=0)
        with self._cond:
            kept: deque[Text] = deque()
            while self._queue:
                text = self._queue.popleft()
                if text.job.future.done():  # another text of it failed or was stopped
                    continue
                if text.job.stop.stopped(now):
                    text.job.fail(text.job.stop.error(now))
                    continue
                if text.options.return_alignments != lane.alignments:
                    kept.append(text)
                    continue
                n, src, budget = (rows + text.options.beam_size, max(longest_src, len(text.source)),
                                  max(longest_budget, text.budget))
                if n * (src + budget) <= self.max_batch_tokens or not (running or taken):
                    taken.append(text)  # (one text over the budget still runs, alone)
                    rows, longest_src, longest_budget = n, src, budget
                else:
                    kept.append(text)
                    break  # oldest first: nobody overtakes the text that does not fit yet
            # A DecoderCache join copies the running cache, so a full batch takes newcomers in groups:
            # at least an eighth of its rows, or whoever has waited ADMIT_AFTER step boundaries. A
            # SlotCache join copies only the newcomers' cross K/V: they come in at once.
            group = sum(t.options.beam_size for t in taken)
            copies = not isinstance(lane.cache, SlotCache)
            if taken and copies and group < len(running) // 8 and lane.deferred < ADMIT_AFTER:
                lane.deferred += 1
                kept.extendleft(reversed(taken))
                taken = []
            elif taken:
                lane.deferred = 0
            kept.extend(self._queue)
            self._queue = kept
            self._cond.notify_all()  # room in the queue for blocked submitters
        if not taken:
            return
        self._report_queue()
        for text in taken:
            if text.budget <= 0:  # nothing to generate: finished before its first step
                text.done = True
                if text.beam is not None:
                    finish_live(text.beam, text.options)
                self._finish(text)
        taken = [t for t in taken if not t.done]
        if not taken:
            return
        sources = [t.source for t in taken]
        if self._encoder is not None and (lane.encoding or lane.live()):
            encoded = self._encoder.submit(self.translator.encode, sources, lane.alignments)
            lane.encoding.append((taken, encoded, now))
        else:  # nothing to overlap with: encode here
            self._join(lane, taken, self.translator.encode(sources, lane.alignments), now)

    def _join_encoded(self, lane: Lane) -> None:
        """Encodings that finished join the batch, oldest first; with no live row, wait for one."""
        while lane.encoding and (lane.encoding[0][1].done() or not lane.live()):
            texts, encoded, taken = lane.encoding.popleft()
            try:
                new = encoded.result()
            except Exception as exc:  # the encoder failed these texts only
                log.warning("model %s: encoding failed: %r", self.name, exc)
                for text in texts:
                    text.job.fail(exc)
                continue
            self._drop_stopped(texts)  # stopped while encoding: its row joins and leaves at the next step
            self._join(lane, texts, new, taken)

    def _join(self, lane: Lane, taken: list[Text], new: DecoderCache | SlotCache, at: float) -> None:
        """Encoded texts' rows go after the running batch's rows (`at`: when they left the queue)."""
        first = lane.rows
        if lane.cache is None:
            lane.cache = new
        elif isinstance(lane.cache, SlotCache) and isinstance(new, SlotCache):
            lane.cache.join(new)
        elif isinstance(lane.cache, DecoderCache) and isinstance(new, DecoderCache):
            lane.cache.join(new)
        else:  # a lane's texts all want alignments or none: one kind of cache per lane
            raise TypeError(f"cannot join a {type(new).__name__} to a {type(lane.cache).__name__}")
        if lane.alignments:
            lane.cache.alignment_layer = self.translator.alignment_layer
        for r, text in enumerate(taken):
            text.rows = [first + r]
            if text.beam is not None:
                text.beam.parents = []
        lane.texts += taken
        if self.metrics is not None:
            self.metrics.admitted(self.name, texts=len(taken), tokens=sum(len(t.source) for t in taken),
                                  queue_seconds=[at - t.enqueued for t in taken])

    def _step(self, lane: Lane) -> None:
        """Lay the live texts' rows out (beams on their parents, finished rows gone), then one step."""
        cache = lane.cache
        assert cache is not None
        live = [t for t in lane.texts if not t.done]
        if isinstance(cache, SlotCache):  # texts keep their rows where they can (see slots.place)
            starts = place([t.rows[0] if t.rows else None for t in live], [len(t.next_rows()) for t in live])
            live = [t for _, t in sorted(zip(starts, live), key=lambda pair: pair[0])]  # row order
        index: list[int] = []
        for text in live:
            rows = text.next_rows()
            text.rows = list(range(len(index), len(index) + len(rows)))
            index += rows
        if index != list(range(cache.rows)):
            cache.keep(np.asarray(index, dtype=np.int64))
        lane.texts = live
        cache.trim()
        if not live:
            return
        vocab = self.translator.manifest.vocab_size
        eos, bos = self.translator.manifest.eos_id, self.translator.manifest.bos_id
        feed = np.asarray([tok for t in live for tok in t.feed(bos)], dtype=np.int64)
        started = time.monotonic()
        scores = any(scored(t.options) for t in live)  # else the greedy head's logits may come back
        values, ids = cache.step(feed, max(t.top_k(vocab) for t in live), scores)  # (R, K)
        now = time.monotonic()
        generated = 0
        for text in live:
            if text.steps == 0 and self.metrics is not None:
                self.metrics.first_step(self.name, now - text.enqueued)
            start, count = text.rows[0], len(text.rows)
            k = text.top_k(vocab)
            aligns = cache.alignment[start:start + count] if cache.alignment is not None else None
            if text.beam is None:
                self._greedy(text, values[start, :k], ids[start, :k], eos,
                             None if aligns is None else int(aligns[0]))
            elif text.forcing:
                force(text.beam, text.prefix[text.steps], start, text.steps, text.options,
                      int(aligns[0]) if aligns is not None and text.options.return_alignments else None)
                text.done = text.beam.done
            else:
                opts, banned = text.options, text.steps < text.options.min_length
                found = candidates(values[start:start + count, :k], ids[start:start + count, :k],
                                   text.beam.live_lp, count, opts.beam_size, eos, banned)
                advance(text.beam, found[0], start, text.steps, opts, eos,
                        aligns if opts.return_alignments else None)
                text.done = text.beam.done
            text.steps += 1
            if text.job.listener is not None and not text.done:
                self._tell(text)
            if text.done:
                generated += self._finish(text)
        if self.metrics is not None:
            self.metrics.step_done(self.name, rows=cache.rows, seconds=now - started, generated=generated)
        if all(t.done for t in live):
            # The batch ran dry: let it go now, so the loop waits at once (releasing the interpreter to
            # the threads its last answers woke) instead of spending a step boundary on empty rows.
            lane.texts, lane.cache = [], None

    def _tell(self, text: Text) -> None:
        """Hand a text's candidates to its listener; a failing listener fails only its own request."""
        assert text.job.listener is not None
        try:
            text.job.listener(text.index, text.steps, text.candidates(), text.candidate_alignments())
        except Exception as exc:
            log.warning("model %s: step listener failed: %r", self.name, exc)
            text.done = True
            text.job.fail(exc)

    @staticmethod
    def _greedy(text: Text, values: np.ndarray, ids: np.ndarray, eos: int, align: int | None) -> None:
        """One greedy step of one text from its row's top-k (serve.engine.search.greedy_search's rule);
        inside a forced prefix the step takes the prefix's token, unscored."""
        token, gained = greedy_pick(values, ids, text.steps, text.options, eos, text.prefix)
        text.log_prob = np.float32(text.log_prob + gained)
        if token == eos:
            text.done = text.ended = True
            return
        text.tokens.append(token)
        if text.options.return_alignments and align is not None:
            text.alignment.append(align)
        text.done = len(text.tokens) >= text.budget

    def _finish(self, text: Text) -> int:
        """Hand a finished text's hypotheses to its request; returns the best one's length."""
        hyps = text.result()
        for h in hyps:
            h.text = self.translator.tokenizer.decode(h.tokens)
        if not text.job.future.done():
            text.job.finish_row(text.index, hyps)
        return len(hyps[0].tokens) if hyps else 0

    def _report_queue(self) -> None:
        if self.metrics is not None:
            self.metrics.set_queue_depth(self.name, self.queued)
