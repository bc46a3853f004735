"""Protected spans placed by alignment (serve.engine.span_align): hand-made alignments on the real
tokenizer for each rule, then real translations of the tiny model (greedy and beam): no spans no
change, every span verbatim, and a growing hypothesis never rewrites what it showed."""

from __future__ import annotations

import json

import pytest
from conftest import read_lines

from bench.spans_bench import auto_spans
from nmt.decoding import DecodeOptions
from nmt.pair_tokenizer import PairTokenizer
from serve.engine.span_align import AlignedSpans
from serve.engine.spans import Span, find_terms

SOURCE = "A small Rex runs to the park."
SPANS = find_terms(SOURCE, ["Rex"])


@pytest.fixture(scope="module")
def tok(translator):
    return translator.tokenizer


def target(tok, words: list[str]) -> tuple[list[int], list[list[int]]]:
    """Target ids of the words and, per word, the positions of its ids."""
    ids: list[int] = []
    positions = []
    for w in words:
        piece = tok.encode(w)
        positions.append(list(range(len(ids), len(ids) + len(piece))))
        ids += piece
    return ids, positions


def source_index(tok, text: str, word: str) -> int:
    """The first source id of `word`."""
    start = text.index(word)
    return next(j for j, (s, e) in enumerate(tok.offsets(text)) if s <= start < e)


def aligned_to(tok, words, pointing: dict[int, str]) -> tuple[list[int], list[int]]:
    """Ids of the target words, each word aligned to the source word `pointing` names (else the
    source's first word)."""
    ids, positions = target(tok, words)
    align = [0] * len(ids)
    for w, src_word in pointing.items():
        for j in positions[w]:
            align[j] = source_index(tok, SOURCE, src_word)
    return ids, align


def test_offsets_name_the_text_of_every_source_id(tok):
    text = "Zwei  Hunde, 3 Bälle… und ein Äffchen!"
    offsets = tok.offsets(text)
    assert len(offsets) == len(tok.encode(text))
    assert "".join(text[s:e] for s, e in offsets).replace(" ", "") == text.replace(" ", "")
    assert all(not text[s:e].startswith(" ") for s, e in offsets)


def test_offsets_of_a_pair_tokenizer_keep_the_language_code_whole(tok):
    vocab = {tok.sp.id_to_piece(i): i for i in range(tok.vocab_size)} | {"</s>": 3, "<pad>": 0, "<unk>": 1}
    pair = PairTokenizer(tok.model_proto, tok.model_proto, json.dumps(vocab).encode())
    text = ">>de<< Two dogs."
    offsets = pair.offsets(text)
    assert len(offsets) == len(pair.encode(text)) and offsets[0] == (0, 6)
    rest = "Two dogs."
    assert [text[s:e] for s, e in offsets[1:]] == [rest[s:e] for s, e in tok.offsets(rest)]


def test_the_last_word_of_the_run_aligned_to_a_span_becomes_the_span(tok):
    ids, align = aligned_to(tok, ["Ein", "kleiner", "Hund,", "läuft."], {1: "Rex", 2: "Rex", 3: "runs"})
    a = AlignedSpans.of(SOURCE, SPANS, tok)
    assert a.place(ids, align) == ("Ein kleiner Rex, läuft.", 0)  # glued punctuation stays


def test_a_span_the_model_copied_stays_where_it_is(tok):
    ids, align = aligned_to(tok, ["Ein", "Rex", "läuft", "zum", "Hund."], {4: "Rex"})
    assert AlignedSpans.of(SOURCE, SPANS, tok).place(ids, align) == ("Ein Rex läuft zum Hund.", 0)


def test_a_span_nothing_was_aligned_to_goes_before_the_word_of_what_follows_it(tok):
    ids, align = aligned_to(tok, ["Ein", "kleiner", "läuft."], {2: "runs"})
    assert AlignedSpans.of(SOURCE, SPANS, tok).place(ids, align) == ("Ein kleiner Rex läuft.", 0)


def test_otherwise_before_the_final_punctuation(tok):
    ids, align = aligned_to(tok, ["Ein", "kleiner", "Hund!"], {})
    assert AlignedSpans.of(SOURCE, SPANS, tok).place(ids, align) == ("Ein kleiner Hund Rex!", 1)


def test_words_of_a_forced_prefix_are_never_replaced(tok):
    ids, align = aligned_to(tok, ["Ein", "kleiner", "Hund", "läuft."], {1: "Rex", 2: "Rex", 3: "runs"})
    frozen = len(tok.encode("Ein")) + len(tok.encode("kleiner")) + len(tok.encode("Hund"))
    a = AlignedSpans.of(SOURCE, SPANS, tok, frozen=frozen)
    assert a.render(ids, align) == "Ein kleiner Hund Rex läuft."


def test_a_run_still_growing_is_held_back(tok):
    ids, align = aligned_to(tok, ["Ein", "kleiner", "Hund", "läuft", "schnell"], {1: "Rex", 2: "Rex"})
    a = AlignedSpans.of(SOURCE, SPANS, tok)
    upto = len(ids) - len(tok.encode("schnell"))  # "Ein kleiner Hund läuft", "läuft" still growing
    # "Hund" ends the complete words and is in the run, which "läuft" may still join: only "Ein" shows
    assert a.render(ids[:upto], align[:upto], final=False) == "Ein "
    assert a.render(ids, align, final=False) == "Ein kleiner Rex läuft "
    assert a.render(ids, align) == "Ein kleiner Rex läuft schnell"


@pytest.mark.parametrize("opts", [DecodeOptions(return_alignments=True),
                                  DecodeOptions(beam_size=4, n_best=4, return_alignments=True)],
                         ids=["greedy", "beam"])
def test_real_translations(translator, opts):
    texts = [t for t in read_lines("test_2016_flickr", "en", 400) if auto_spans(t)][:40]
    texts += ["A man named Zorblax rides 2 bikes in Quuxville.", "The dog jumps over 37 fences."]
    hyps = translator.translate_ids(translator.tokenize(texts), opts)
    for text, nbest in zip(texts, hyps):
        assert nbest is not None
        spans = auto_spans(text)
        a = AlignedSpans.of(text, spans, translator.tokenizer)
        plain = AlignedSpans.of(text, [], translator.tokenizer)
        for h in nbest:
            assert plain.render(h.tokens, h.alignment) == h.text  # no spans: the model's text
            final = a.render(h.tokens, h.alignment)
            assert all(text[s.start:s.end] in final for s in spans)
            shown = ""
            for n in range(len(h.tokens) + 1):  # as a stream sees it grow: never rewritten
                now = a.render(h.tokens[:n], h.alignment[:n], final=False).rstrip(" ")
                assert now.startswith(shown) and final.startswith(now), (shown, now, final)
                shown = now


def test_without_an_alignment_every_span_goes_to_the_end(tok):
    a = AlignedSpans.of(SOURCE, [Span(8, 11)], tok)
    ids = tok.encode("Ein Hund läuft.")
    assert a.place(ids, None) == ("Ein Hund läuft Rex.", 1)
    assert a.render(ids, None, final=False) == ""
