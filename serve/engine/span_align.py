"""Protected spans placed by the model's own alignment: the default method for bundles that carry the
alignment graph (serve.engine.spans has the placeholder method for those that do not).

The source is translated as it is, with alignments (per target token, the source token its decoder
step attended most, serve.engine.runtime). Then, word by word from the left:
  * a target word that starts the span's text is the model copying it: kept, the span is placed;
  * otherwise the first run of consecutive target words aligned to a span (most of a word's letter
    tokens point into it) has its last word replaced by the span's text: the earlier words of a run
    are mostly articles and adjectives the model wrote while looking at the span ("ein Boston
    Terrier" from "Ein[0] Skateboardfahrer[0]", span 0 = "Boston Terrier");
  * a span no word was aligned to goes before the first word aligned to the source word right after
    it (the model often drops a name but translates its noun: "an open Apple laptop" -> "offenen
    Apple Laptop"), else before the final punctuation, so every span is in the output.
Punctuation glued to a replaced word stays; words of a forced target prefix are the caller's and are
never replaced. Why not placeholders: a model trained on real text rarely copies a made-up token (a
Multi30k model writes "3" as "drei"), so every span ended up at the end of its sentence
(bench/spans_bench.py measures both).

Rendering a word depends only on the words up to the end of its run, so a growing hypothesis
rendered without its last word and without a run that may still go on never changes as it grows:
streamed pieces (serve.engine.streaming) stay append-only.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from nmt.pair_tokenizer import SPIECE_UNDERLINE, BundleTokenizer
from serve.engine.spans import Span, insert_before_final_punctuation

WORD_CHAR = re.compile(r"\w")


@dataclass
class Word:
    start: int  # first token
    end: int  # one past its last token
    core: tuple[int, int] | None  # tokens with a letter or digit (None: punctuation only)


def words_of(pieces: Sequence[str]) -> list[Word]:
    """Target tokens grouped into words: a word starts at a piece with SentencePiece's word mark."""
    bounds = [j for j, p in enumerate(pieces) if j == 0 or p.startswith(SPIECE_UNDERLINE)] + [len(pieces)]
    out = []
    for a, b in zip(bounds, bounds[1:]):
        core = [j for j in range(a, b) if WORD_CHAR.search(pieces[j])]
        out.append(Word(a, b, (core[0], core[-1] + 1) if core else None))
    return out


@dataclass
class AlignedSpans:
    """One source text, its protected spans, and which span each source id falls in."""

    text: str
    spans: list[Span]
    owners: list[int | None]  # per source id (the appended EOS included): index of its span, or None
    tokenizer: BundleTokenizer
    frozen: int = 0  # target tokens of a forced prefix: the caller's words, never replaced
    nexts: list[int | None] = field(default_factory=list)  # per source id: the span it comes right after
    # Decoded token prefixes: a stream renders its growing candidates at every step, and they share
    # their prefixes, so each is decoded once (the render costs a handful of decodes, not one per token).
    _decoded: dict[tuple[int, ...], str] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, text: str, spans: Sequence[Span], tokenizer: BundleTokenizer, frozen: int = 0
           ) -> AlignedSpans:
        ranges = tokenizer.offsets(text)
        for j in range(len(ranges) - 2, -1, -1):  # a lone word mark ("▁" before "R e x") goes with its word
            if ranges[j][0] == ranges[j][1]:
                ranges[j] = ranges[j + 1]
        owners: list[int | None] = [next((k for k, s in enumerate(spans) if a < s.end and s.start < b), None)
                                    for a, b in ranges]
        nexts: list[int | None] = [None] * (len(owners) + 1)
        for k in range(len(spans)):
            j = max((j for j, o in enumerate(owners) if o == k), default=len(owners)) + 1
            while j < len(owners) and owners[j] is None:  # the source word right after the span
                nexts[j] = k
                if j + 1 < len(owners) and ranges[j] != ranges[j + 1]:
                    break
                j += 1
        return cls(text, list(spans), owners + [None], tokenizer, frozen, nexts)

    def _decode(self, tokens: tuple[int, ...]) -> str:
        text = self._decoded.get(tokens)
        if text is None:
            text = self._decoded[tokens] = self.tokenizer.decode(tokens)
        return text

    def span_text(self, k: int) -> str:
        return self.text[self.spans[k].start:self.spans[k].end]

    def _copied(self, core: str, placed: set[int]) -> int | None:
        """The span not placed yet whose text starts with this word: the model wrote it itself."""
        return next((k for k in range(len(self.spans))
                     if k not in placed and core and self.span_text(k).split()[0] == core), None)

    def _owner(self, word: Word, alignment: Sequence[int], owners: list[int | None] | None = None
               ) -> int | None:
        """The span most of the word's letter tokens are aligned to (at least half of them); `owners`:
        another map of source ids to spans (`nexts`)."""
        owners = self.owners if owners is None else owners
        if word.core is None:
            return None
        ks = [owners[alignment[j]] if 0 <= alignment[j] < len(owners) else None
              for j in range(*word.core)]
        best = max(ks, key=lambda k: (ks.count(k), k is not None))  # ties: the first
        return best if best is not None and 2 * ks.count(best) >= len(ks) else None

    def render(self, tokens: Sequence[int], alignment: Sequence[int] | None, final: bool = True) -> str:
        """The translation of `tokens` with the spans in it. Not final: a hypothesis still growing, so
        only what can no longer change, then a space when a word follows it."""
        return self.place(tokens, alignment, final)[0]

    def place(self, tokens: Sequence[int], alignment: Sequence[int] | None, final: bool = True
              ) -> tuple[str, int]:
        """`render`, and how many spans went to the fallback place (no word copied or aligned)."""
        tokens = list(tokens)
        prefixes = [self._decode(tuple(tokens[:j])) for j in range(len(tokens) + 1)]
        text = prefixes[-1]
        missing = [self.span_text(k) for k in range(len(self.spans))]
        if alignment is None or len(alignment) != len(tokens) or not all(map(text.startswith, prefixes)):
            # no usable alignment (or a tokenizer whose prefixes do not decode to prefixes): fallback only
            return (insert_before_final_punctuation(text, missing), len(missing)) if final else ("", 0)
        at = [len(t) for t in prefixes]  # at[j]: where token j's text (its space included) starts
        words = words_of(self.tokenizer.pieces(tokens))
        shown = words if final else words[:-1]  # a growing hypothesis' last word may still grow
        parts = [text[at[w.start]:at[w.end]] for w in shown]  # each with its leading space
        cores = [text[at[w.core[0]]:at[w.core[1]]].strip() if w.core else "" for w in shown]
        owners = [None if w.start < self.frozen else self._owner(w, alignment) for w in shown]
        nexts = [None if w.start < self.frozen else self._owner(w, alignment, self.nexts) for w in shown]
        placed: set[int] = set()
        cut, i = len(shown), 0  # cut: how many words to show (a run still open is held back)
        while i < len(shown):
            copied = self._copied(cores[i], placed)
            k = owners[i]
            n = nexts[i]
            if copied is None and k is None and n is not None and n not in placed:
                # the word translating what follows the span in the source: the span goes before it
                lead = len(parts[i]) - len(parts[i].lstrip())
                parts[i] = parts[i][:lead] + self.span_text(n) + " " + parts[i][lead:]
                placed.add(n)
                i += 1
                continue
            if copied is not None or k is None or k in placed:
                placed.update([] if copied is None else [copied])
                i += 1
                continue
            j = i  # the run: consecutive words aligned to span k
            while j + 1 < len(shown) and owners[j + 1] == k and self._copied(cores[j + 1], placed) is None:
                j += 1
            if not final and j == len(shown) - 1:
                cut = i  # the next word may still join the run, which moves where the span goes
                break
            if j + 1 < len(shown) and self._copied(cores[j + 1], placed) == k:
                i = j + 1  # the model writes the span right after the run: its own copy places it
                continue
            w = shown[j]
            assert w.core is not None
            letters = text[at[w.core[0]]:at[w.core[1]]]
            head = parts[j][:at[w.core[0]] - at[w.start] + len(letters) - len(letters.lstrip())]
            parts[j] = head + self.span_text(k) + text[at[w.core[1]]:at[w.end]]
            placed.add(k)
            i = j + 1
        rendered = "".join(parts[:cut])
        if not final:
            return (rendered + " " if cut < len(words) and rendered else rendered), 0
        left = [m for k, m in enumerate(missing) if k not in placed]
        return insert_before_final_punctuation(rendered, left), len(left)
