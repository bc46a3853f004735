"""Text handling of the HTTP API: sentence splitting, HTML text nodes, language detection.

Our models are trained on single sentences, so a request's text is cut into sentences, each
translated as one row, and put back with the original whitespace and markup around them. A text
becomes a *layout*: literal pieces (whitespace, markup) and indices into the list of sentences.

    sentences: list[str] = []
    layout = split_text("A man.  A dog.", "en", sentences)  # sentences == ["A man.", "A dog."]
    render(layout, ["Ein Mann.", "Ein Hund."])                 # "Ein Mann.  Ein Hund."
"""

from __future__ import annotations

import html
import re
import threading
from collections.abc import Callable
from html.parser import HTMLParser

import pysbd

Layout = list[str | int]  # literal text, or the index of a sentence to translate

# English names of the codes a bundle is likely to carry (anything else shows as its code).
LANGUAGE_NAMES = {
    "ar": "Arabic", "bg": "Bulgarian", "cs": "Czech", "da": "Danish", "de": "German", "el": "Greek",
    "en": "English", "es": "Spanish", "et": "Estonian", "fa": "Persian", "fi": "Finnish", "fr": "French",
    "he": "Hebrew", "hi": "Hindi", "hu": "Hungarian", "id": "Indonesian", "it": "Italian", "ja": "Japanese",
    "ko": "Korean", "lt": "Lithuanian", "lv": "Latvian", "nl": "Dutch", "no": "Norwegian", "pl": "Polish",
    "pt": "Portuguese", "ro": "Romanian", "ru": "Russian", "sk": "Slovak", "sl": "Slovenian",
    "sv": "Swedish", "tr": "Turkish", "uk": "Ukrainian", "vi": "Vietnamese", "zh": "Chinese",
}

SKIP_TAGS = frozenset({"script", "style", "code"})  # their content is never translated
_EDGES = re.compile(r"^(\s*)(.*?)(\s*)$", re.S)
_WORDY = re.compile(r"[^\W\d_]")  # a letter of any script


def language_name(code: str) -> str:
    return LANGUAGE_NAMES.get(code, code)


def _spans(line: str, lang: str) -> list[tuple[int, int]]:
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


def render(layout: Layout, translations: list[str], escape: Callable[[str], str] = lambda s: s) -> str:
    return "".join(p if isinstance(p, str) else escape(translations[p]) for p in layout)


def escape_text(s: str) -> str:
    return html.escape(s, quote=False)


class _HtmlLayout(HTMLParser):
    """Markup passes through as written; text nodes outside SKIP_TAGS become sentences."""

    def __init__(self, lang: str, sentences: list[str]):
        super().__init__(convert_charrefs=True)
        self.lang, self.sentences = lang, sentences
        self.layout: Layout = []
        self.skipping: dict[str, int] = {}

    def _raw(self, text: str | None) -> None:
        if text:
            self.layout.append(text)

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in SKIP_TAGS:
            self.skipping[tag] = self.skipping.get(tag, 0) + 1
        self._raw(self.get_starttag_text())

    def handle_startendtag(self, tag: str, attrs: list) -> None:
        self._raw(self.get_starttag_text())

    def handle_endtag(self, tag: str) -> None:
        if self.skipping.get(tag):
            self.skipping[tag] -= 1
        self._raw(f"</{tag}>")

    def handle_data(self, data: str) -> None:
        if self.cdata_elem is not None:  # <script>/<style> content arrives as written
            self._raw(data)
        elif any(self.skipping.values()) or not data.strip():
            self._raw(escape_text(data))
        else:
            self.layout += split_text(data, self.lang, self.sentences, escape_text)

    def handle_comment(self, data: str) -> None:
        self._raw(f"<!--{data}-->")

    def handle_decl(self, decl: str) -> None:
        self._raw(f"<!{decl}>")

    def handle_pi(self, data: str) -> None:
        self._raw(f"<?{data}>")

    def unknown_decl(self, data: str) -> None:
        self._raw(f"<![{data}]>")


def split_html(text: str, lang: str, sentences: list[str]) -> Layout:
    """Like split_text for an HTML document or fragment; render it with escape=escape_text."""
    parser = _HtmlLayout(lang, sentences)
    parser.feed(text)
    parser.close()
    return parser.layout


class Detector:
    """Language identification with py3langid, whose model ships inside the package (nothing is
    downloaded). Loaded on first use (about a second); thread-safe."""

    def __init__(self) -> None:
        self._identifier = None
        self._lock = threading.Lock()

    def _get(self):
        with self._lock:
            if self._identifier is None:
                from py3langid.langid import MODEL_FILE, LanguageIdentifier

                self._identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
            return self._identifier

    def rank(self, text: str, allowed: list[str]) -> list[tuple[str, float]]:
        """(language, confidence 0-100) among `allowed`, best first. Restricting the model's normalised
        probabilities to a subset and renormalising equals a model trained on that subset alone."""
        if not allowed:
            return []
        scores = dict(self._get().rank(text))
        known = {lang: float(scores[lang]) for lang in allowed if lang in scores}
        total = sum(known.values())
        if not known or total <= 0:
            return [(allowed[0], 0.0)]
        ranked = sorted(known.items(), key=lambda kv: -kv[1])
        return [(lang, round(100 * p / total, 2)) for lang, p in ranked]
