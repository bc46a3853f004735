"""Sentence splitting of long texts, shared by the HTTP API, `nmt translate` and `nmt batch`.

Our models are trained on single sentences, so a text is cut into sentences (pysbd, rule-based, no
model to download), each translated as one row, and put back with the original whitespace (and, for
HTML, markup) around them. A text becomes a *layout*: literal pieces and indices into the list of
sentences to translate.

    sentences: list[str] = []
    layout = split_text("A man.  A dog.", "en", sentences)  # sentences == ["A man.", "A dog."]
    render(layout, ["Ein Mann.", "Ein Hund."])                 # "Ein Mann.  Ein Hund."
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from nmt.decoding import Hypothesis, TranslationResult, normalised_score

Layout = list[str | int]  # literal text, or the index of a sentence to translate

_EDGES = re.compile(r"^(\s*)(.*?)(\s*)$", re.S)
_WORDY = re.compile(r"[^\W\d_]")  # a letter of any script


def _spans(line: str, lang: str) -> list[tuple[int, int]]:
    import pysbd  # only the callers that split pay for its import

    # A Segmenter keeps the text it works on in itself: one per call, so threads never share one.
    seg = pysbd.Segmenter(language=lang if lang in pysbd.languages.LANGUAGE_CODES else "en",
                          clean=False, char_span=True)
    return [(s.start, s.end) for s in seg.segment(line)]


def split_text(text: str, lang: str, sentences: list[str],
               escape: Callable[[str], str] = lambda s: s) -> Layout:
    """Append `text`'s sentences to `sentences`; returns its layout. Lines never join into one sentence;
    `escape` applies to the literal pieces (HTML text nodes keep their entities escaped)."""
    layout: Layout = []
    for n, line in enumerate(text.split("\n")):
        if n:
            layout.append("\n")
        if not line.strip():
            layout.append(escape(line))
            continue
        pos = 0
        for start, end in _spans(line, lang):
            start = max(start, pos)
            if start > pos:  # characters the splitter left out stay as they were
                layout.append(escape(line[pos:start]))
            lead, core, trail = _EDGES.match(line[start:end]).groups()  # type: ignore[union-attr]
            if _WORDY.search(core):  # punctuation or symbols alone are kept, not translated
                layout += [escape(lead), len(sentences), escape(trail)]
                sentences.append(core)
            else:
                layout.append(escape(lead + core + trail))
            pos = max(pos, end)
        if pos < len(line):
            layout.append(escape(line[pos:]))
    return [p for p in layout if p != ""]


def render(layout: Layout, translations: Sequence[str], escape: Callable[[str], str] = lambda s: s) -> str:
    return "".join(p if isinstance(p, str) else escape(translations[p]) for p in layout)


def join_results(layout: Layout, results: Sequence[TranslationResult],
                 length_penalty: float) -> TranslationResult:
    """One text's result from the results of every sentence (`results[i]` for sentence i of the layout).

    Hypothesis k joins the k-th hypothesis of each sentence (its last when it has fewer). Its score
    is the one a single hypothesis of the joined tokens would get: the summed log-probability,
    normalised over every sentence's tokens and end of sentence. A text with no sentence (blank,
    or symbols only) is its own translation."""
    mine = sorted({p for p in layout if isinstance(p, int)})
    if not mine:
        return TranslationResult([Hypothesis(render(layout, []), [], 0.0, 0.0)], 0)
    hyps = []
    for k in range(max(len(results[i].hypotheses) for i in mine)):
        picked = {i: results[i].hypotheses[min(k, len(results[i].hypotheses) - 1)] for i in mine}
        texts = [picked[i].text if i in picked else "" for i in range(max(mine) + 1)]
        tokens = [t for i in mine for t in picked[i].tokens]
        log_prob = sum(h.log_prob for h in picked.values())
        score = normalised_score(log_prob, len(tokens) + len(mine), length_penalty)
        hyps.append(Hypothesis(render(layout, texts), tokens, score, log_prob))
    return TranslationResult(hyps, sum(results[i].source_tokens for i in mine))


class SplitTexts:
    """Several texts cut into one list of sentences: translate `sentences` as rows, then `join`."""

    def __init__(self, texts: Sequence[str], lang: str):
        self.sentences: list[str] = []
        self.layouts = [split_text(t, lang, self.sentences) for t in texts]

    def join(self, results: Sequence[TranslationResult], length_penalty: float) -> list[TranslationResult]:
        """One result per text, from one result per sentence (in the order of `sentences`)."""
        return [join_results(layout, results, length_penalty) for layout in self.layouts]
