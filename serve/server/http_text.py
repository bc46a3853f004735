"""Text handling of the HTTP API: HTML text nodes, language detection, language names.

Plain texts are cut into sentences by nmt.sentences (shared with `nmt translate` and `nmt batch`);
an HTML document's text nodes go through the same splitting, its markup into the layout as written.
"""

from __future__ import annotations

import html
import threading
from html.parser import HTMLParser

from nmt.sentences import Layout, split_text

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


def language_name(code: str) -> str:
    return LANGUAGE_NAMES.get(code, code)


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
