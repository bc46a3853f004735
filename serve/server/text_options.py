"""Per-text request options (nmt.v1 TextOptions, keep_terms): forced target prefixes and protected spans.

`plan_texts` validates them against the model and turns them into what the engine takes: the texts
to translate, forced target ids per text, and how to put the protected spans into each output: by the
model's alignment (serve.engine.span_align; the texts are translated as they are, with alignments)
when the bundle has the alignment graph, else by placeholders (serve.engine.spans). A request without
any is passed through as is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from nmt.decoding import DecodeOptions, Hypothesis, InvalidRequest, check_prefixes
from nmt.v1 import translator_pb2 as pb
from serve.engine.span_align import AlignedSpans
from serve.engine.spans import Masked, Restorer, Span, check_spans, find_terms, mask
from serve.engine.translator import Translator


@dataclass
class TextPlan:
    texts: list[str]  # what the model translates
    prefixes: list[list[int]] | None = None  # forced target ids per text; None: no text has one
    masked: list[Masked] = field(default_factory=list)  # per text: its placeholders
    aligned: list[AlignedSpans | None] = field(default_factory=list)  # per text: spans placed by alignment

    def engine_options(self, options: DecodeOptions) -> DecodeOptions:
        """What to decode with: alignments on when a span is placed by them (the caller's options
        still decide what the answer shows)."""
        return replace(options, return_alignments=True) if any(self.aligned) else options

    def check(self, translator: Translator, sources: list[list[int]], options: DecodeOptions) -> None:
        """InvalidRequest for a prefix outside the target vocabulary or longer than its text's budget."""
        if self.prefixes is not None:
            check_prefixes(self.prefixes, [translator.budget(len(s), options) for s in sources],
                           translator.manifest.vocab_size, name=lambda i: f"text_options[{i}].target_prefix")

    def restorer(self, i: int) -> Restorer:
        return self.masked[i].restorer()

    def streamed(self, i: int, h: Hypothesis) -> str:
        """The final text a stream of text i is told before its placeholders are put back piece by
        piece: spans placed by alignment are already in it (the stream renders them too)."""
        aligned = self.aligned[i]
        return aligned.render(h.tokens, h.alignment) if aligned is not None else h.text

    def render(self, i: int, h: Hypothesis) -> str:
        """The text of a hypothesis of text i with its spans in it (tokens stay the model's)."""
        text = self.streamed(i, h)
        return self.restorer(i).restore(text) if self.masked[i].originals else text

    def restore(self, i: int, hyps: list[Hypothesis]) -> list[Hypothesis]:
        """The hypotheses of text i with its spans in their text; new objects, since a cache or a
        repeated text of the request may share them."""
        if self.aligned[i] is not None or self.masked[i].originals:
            return [replace(h, text=self.render(i, h)) for h in hyps]
        return hyps


def plan_texts(translator: Translator, texts: Sequence[str], options: Sequence[pb.TextOptions],
               keep_terms: Sequence[str]) -> TextPlan:
    """Validate the per-text options (InvalidRequest names the field); see TextPlan.check for the prefixes."""
    if options and len(options) != len(texts):
        raise InvalidRequest(f"text_options has {len(options)} entries for {len(texts)} texts: "
                             f"send none or one per text")
    if any(not t.strip() for t in keep_terms):
        raise InvalidRequest("keep_terms: a term is empty or blank")
    prefixes: list[list[int]] = []
    masked: list[Masked] = []
    aligned: list[AlignedSpans | None] = []
    by_alignment = translator.runtime.has_alignments
    for i, text in enumerate(texts):
        o = options[i] if options else pb.TextOptions()
        name = f"text_options[{i}]"
        if o.target_prefix and o.target_prefix_tokens:
            raise InvalidRequest(f"{name}: set target_prefix or target_prefix_tokens, not both")
        prefixes.append(translator.tokenizer.encode(o.target_prefix) if o.target_prefix
                        else list(o.target_prefix_tokens))
        spans = [Span(s.start, s.end) for s in o.protected_spans]
        if keep_terms:
            spans += [s for s in find_terms(text, keep_terms)
                      if not any(p.start < s.end and s.start < p.end for p in spans)]
        spans = check_spans(text, spans, f"{name}.protected_spans")
        if by_alignment and spans:
            aligned.append(AlignedSpans.of(text, spans, translator.tokenizer, frozen=len(prefixes[-1])))
            masked.append(Masked(text))
        else:
            aligned.append(None)
            masked.append(mask(text, spans))
    return TextPlan([m.text for m in masked], prefixes if any(prefixes) else None, masked, aligned)
