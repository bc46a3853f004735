"""A text's growing translation as append-only pieces of whole words, from the decoding loop's steps.

The continuous loop (serve.engine.continuous) tells a `PieceStream` a text's candidates after each
decoder step (serve.engine.scheduler.StepListener); the stream turns them into `Update`s a caller
reads from `updates` on its own thread. A piece is text that can no longer change:
  * greedy: the decoded tokens up to the last word boundary (the next token may still extend the
    last word, so it waits);
  * beam: the whole words every candidate shares, the live beams and the finished hypotheses alike,
    so whichever wins at the end starts with them.
The final update adds what is left, so the pieces concatenate to exactly the finished text.
"""

from __future__ import annotations

import os
import queue
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from nmt.pair_tokenizer import BundleTokenizer

# A candidate's text from its tokens and alignment; final=False: the hypothesis may still grow, so
# only what can no longer change (serve.engine.span_align.AlignedSpans.render).
Render = Callable[[Sequence[int], "Sequence[int] | None", bool], str]


@dataclass
class Update:
    piece: str  # new stable text: every piece of a stream concatenates to the final text
    partial: str  # the current best hypothesis' text, stable or not
    step: int  # decoder steps run so far
    final: bool = False


class StreamBroken(Exception):
    """A final text that does not continue the pieces already sent (a tokenizer breaking the rule)."""


def stable_words(texts: list[str]) -> str:
    """The longest run of whole words all texts start with (up to, not including, a word boundary)."""
    common = os.path.commonprefix(texts) if texts else ""
    if all(len(t) > len(common) and t[len(common)] == " " for t in texts):
        return common  # every text has a space right after: the common words are complete
    cut = common.rfind(" ")
    return common[:cut] if cut > 0 else ""


class PieceStream:
    """The StepListener of one streamed text; `interval` throttles beam updates (every that many steps);
    `render`, when given, makes each candidate's text (protected spans placed by alignment)."""

    def __init__(self, tokenizer: BundleTokenizer, interval: int = 1, beam: bool = False,
                 render: Render | None = None):
        if interval < 1:
            raise ValueError(f"interval must be >= 1, got {interval}")
        self.tokenizer, self.interval, self.beam, self.render = tokenizer, interval, beam, render
        self.sent = ""  # the concatenation of the pieces so far
        self.updates: queue.Queue[Update] = queue.Queue()

    def __call__(self, index: int, step: int, candidates: list[list[int]],
                 alignments: list[list[int]] | None = None) -> None:
        if self.beam and step % self.interval:
            return
        if self.render is not None:
            aligns = alignments if alignments is not None else [None] * len(candidates)
            # a trailing space says "a word follows" to stable_words; the partial text has none
            texts = [self.render(c, a, False) for c, a in zip(candidates, aligns)]
        else:
            texts = [self.tokenizer.decode(c) for c in candidates]
        piece = self._advance(stable_words(texts))
        if piece or self.beam:  # greedy: an update per completed word; beam: one per interval
            self.updates.put(Update(piece, texts[0].rstrip(" ") if texts else "", step))

    def _advance(self, stable: str) -> str:
        if len(stable) <= len(self.sent) or not stable.startswith(self.sent):
            return ""
        piece, self.sent = stable[len(self.sent):], stable
        return piece

    def finish(self, text: str, step: int) -> Update:
        """The last update: the rest of the finished text. StreamBroken if it does not continue the pieces."""
        if not text.startswith(self.sent):
            raise StreamBroken(f"finished text {text!r} does not continue the streamed {self.sent!r}")
        piece, self.sent = text[len(self.sent):], text
        return Update(piece, text, step, final=True)
