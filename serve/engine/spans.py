"""Protected spans (do-not-translate): parts of a source that come back verbatim in its translation.

Spans are placed by the model's alignment (serve.engine.span_align) when the bundle has the alignment
graph; this module checks spans and finds terms for both, and is the method for bundles without it.
Method here: placeholders. Each protected span of the source is replaced by a placeholder word the model
copies through (numbers: a Multi30k model passes digits through unchanged far more often than names or
made-up tokens; bench/spans_bench.py measures the styles), the text is translated, and each
placeholder found in the output is replaced by its span. A placeholder the model dropped gets its span
inserted before the final punctuation, so every span is in the output; a placeholder it repeated is
kept once. A text without spans is translated as is: no spans, no change.

Restoring works word by word from left to right (`Restorer.feed`), so the pieces of a streamed
translation (cut at word boundaries, serve.engine.streaming) restore to the same text as the whole.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from nmt.decoding import InvalidRequest

# Placeholder styles: a function of the span's number (0, 1, ...) and the text (to avoid its words).
STYLES = ("number", "name", "token")
NAMES = ("Max", "Anna", "Paul", "Lisa", "Tom", "Julia", "Peter", "Maria", "Jan", "Sarah")
DEFAULT_STYLE = "number"
FINAL_PUNCTUATION = re.compile(r"[\s.!?…]*$")


@dataclass(frozen=True)
class Span:
    start: int
    end: int  # exclusive, in code points


def find_terms(text: str, terms: Sequence[str]) -> list[Span]:
    """Every occurrence of each term in the text as a whole word (longest term first where they overlap)."""
    found: list[Span] = []
    for term in sorted({t for t in terms if t.strip()}, key=len, reverse=True):
        for m in re.finditer(r"(?<!\w)" + re.escape(term) + r"(?!\w)", text):
            span = Span(m.start(), m.end())
            if not any(s.start < span.end and span.start < s.end for s in found):
                found.append(span)
    return sorted(found, key=lambda s: s.start)


def check_spans(text: str, spans: Sequence[Span], name: str = "protected_spans") -> list[Span]:
    """Sorted spans; InvalidRequest for one out of the text, empty, blank or overlapping another."""
    ordered = sorted(spans, key=lambda s: (s.start, s.end))
    for i, s in enumerate(ordered):
        if not 0 <= s.start < s.end <= len(text):
            raise InvalidRequest(f"{name}: span [{s.start}, {s.end}) is not a non-empty range of the text "
                                 f"(0 to {len(text)} code points)")
        if not text[s.start:s.end].strip():
            raise InvalidRequest(f"{name}: span [{s.start}, {s.end}) holds only whitespace")
        if i and ordered[i - 1].end > s.start:
            p = ordered[i - 1]
            raise InvalidRequest(f"{name}: spans [{p.start}, {p.end}) and [{s.start}, {s.end}) overlap")
    return ordered


def placeholders(n: int, text: str, style: str = DEFAULT_STYLE) -> list[str]:
    """n distinct placeholder words, none of them a word of the text already."""
    words = set(re.findall(r"\w+", text))
    if style == "number":
        pool = (str(i) for i in range(1, 10 ** 6))
    elif style == "name":
        pool = (f"{name}{'' if r == 0 else r}" for r in range(10 ** 6) for name in NAMES)
    elif style == "token":
        pool = (f"X{i}" for i in range(1, 10 ** 6))
    else:
        raise ValueError(f"unknown placeholder style {style!r}; one of {', '.join(STYLES)}")
    out: list[str] = []
    for candidate in pool:
        if len(out) == n:
            break
        if candidate not in words:
            out.append(candidate)
    return out


@dataclass
class Masked:
    """A source with its spans replaced by placeholders, and what each placeholder stands for."""

    text: str
    originals: dict[str, str] = field(default_factory=dict)  # placeholder -> the span's text

    def restorer(self) -> Restorer:
        return Restorer(dict(self.originals))


def mask(text: str, spans: Sequence[Span], style: str = DEFAULT_STYLE) -> Masked:
    """Replace each (checked, sorted, non-overlapping) span by its own placeholder."""
    if not spans:
        return Masked(text)
    names = placeholders(len(spans), text, style)
    out, last, originals = [], 0, {}
    for name, s in zip(names, spans):
        out += [text[last:s.start], name]
        originals[name] = text[s.start:s.end]
        last = s.end
    out.append(text[last:])
    return Masked("".join(out), originals)


def insert_before_final_punctuation(text: str, items: Sequence[str], after_text: bool = False) -> str:
    """The items (space-separated) put before the text's final punctuation; after_text: text came
    before this one (a streamed piece), so they need a space even at its start."""
    if not items:
        return text
    cut = FINAL_PUNCTUATION.search(text)
    at = cut.start() if cut else len(text)
    lead = " " if at > 0 or after_text else ""  # a word before it, here or in an earlier piece
    return text[:at] + lead + " ".join(items) + text[at:]


class Restorer:
    """Puts the spans back into a translation fed left to right in pieces cut at word boundaries."""

    def __init__(self, originals: dict[str, str]):
        self.left = originals  # placeholders not met yet
        self.used: set[str] = set()
        self.fed = False  # some text was fed already
        self._pattern = (re.compile(r"(\s*)(?<!\w)(" + "|".join(map(re.escape, originals)) + r")(?!\w)")
                         if originals else None)

    def _sub(self, m: re.Match) -> str:
        space, name = m.group(1), m.group(2)
        if name in self.left:
            self.used.add(name)
            return space + self.left.pop(name)
        return "" if name in self.used else m.group(0)  # a repeated placeholder: kept once

    def feed(self, piece: str, final: bool = False) -> str:
        """The piece with its placeholders replaced; the final piece also gets the spans never met."""
        if self._pattern is not None:
            piece = self._pattern.sub(self._sub, piece)
        if final and self.left:
            piece = insert_before_final_punctuation(piece, list(self.left.values()), after_text=self.fed)
            self.left = {}
        self.fed = self.fed or bool(piece)
        return piece

    def restore(self, text: str) -> str:
        return self.feed(text, final=True)
