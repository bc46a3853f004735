"""The running batch of the continuous loop (serve.engine.continuous): its texts and their search state."""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from nmt.decoding import DecodeOptions, Hypothesis
from serve.engine.runtime import DecoderCache
from serve.engine.scheduler import Job
from serve.engine.search import Beam, hypothesis
from serve.engine.slots import SlotCache


@dataclass(eq=False)
class Text:
    """One text of a request in the running batch: its rows in the cache and its search state."""

    job: Job
    index: int  # which text of the job
    source: list[int]
    budget: int
    enqueued: float
    beam: Beam | None = None  # beam search state; None for greedy
    prefix: list[int] = field(default_factory=list)  # forced target ids: the first len(prefix) steps
    rows: list[int] = field(default_factory=list)  # its rows in the cache, in order
    tokens: list[int] = field(default_factory=list)  # greedy: generated ids so far (EOS excluded)
    alignment: list[int] = field(default_factory=list)
    log_prob: np.float32 = field(default_factory=lambda: np.float32(0))
    steps: int = 0
    done: bool = False
    ended: bool = False  # greedy: stopped on EOS

    @property
    def options(self) -> DecodeOptions:
        return self.job.options

    @property
    def forcing(self) -> bool:
        """The next step is one of the forced prefix (its token is known, not searched)."""
        return self.steps < len(self.prefix)

    def candidates(self) -> list[list[int]]:
        """The current best hypothesis first, then every other that may still win (see StepListener)."""
        if self.beam is None:
            return [self.tokens]
        return self.beam.live + [h.tokens for h in self.beam.finished]

    def candidate_alignments(self) -> list[list[int]] | None:
        """The alignments of `candidates()`, when the request asked for them."""
        if not self.options.return_alignments:
            return None
        if self.beam is None:
            return [self.alignment]
        return self.beam.live_align + [h.alignment or [] for h in self.beam.finished]

    def top_k(self, vocab: int) -> int:
        """How many of a step's best tokens this text reads (as its own batch would ask for)."""
        banned = self.steps < self.options.min_length
        if self.beam is None:
            return 2 if banned else 1
        return min(2 * self.options.beam_size + banned, vocab)

    def next_rows(self) -> list[int]:
        """The cache rows this text continues from at the next step (a beam: its parents)."""
        if self.beam is None or not self.beam.parents:
            return self.rows
        return self.beam.parents

    def feed(self, bos: int) -> list[int]:
        if self.beam is None:
            return [self.tokens[-1] if self.tokens else bos]
        return [t[-1] if t else bos for t in self.beam.live]

    def result(self) -> list[Hypothesis]:
        if self.beam is None:
            return [hypothesis(self.tokens, self.log_prob, self.ended, self.options,
                               self.alignment if self.options.return_alignments else None)]
        ranked = sorted(self.beam.finished, key=lambda h: -h.score)  # stable, as serve.engine.search
        return ranked[:self.options.n_best]


class Lane:
    """One running batch: its cache and the texts in it, in cache-row order."""

    def __init__(self, alignments: bool):
        self.alignments = alignments
        self.cache: DecoderCache | SlotCache | None = None
        self.texts: list[Text] = []
        self.deferred = 0  # step boundaries the queue head waited for a group to gather
        # Texts taken from the queue whose sources the encoder thread is encoding, oldest first, with
        # when they were taken: they count against the budget and join at the first boundary after.
        self.encoding: deque[tuple[list[Text], Future, float]] = deque()

    def pending(self) -> list[Text]:
        """The texts being encoded."""
        return [t for texts, _, _ in self.encoding for t in texts]

    def live(self) -> bool:
        """Some row of the batch is still decoding."""
        return any(not t.done for t in self.texts)

    @property
    def rows(self) -> int:
        return self.cache.rows if self.cache is not None else 0
