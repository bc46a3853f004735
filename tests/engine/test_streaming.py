"""Streamed pieces from the continuous loop, and protected-span restoring, on the tiny model.

The loop runs without its thread (`thread=False`): the test steps it, so it sees exactly which updates a
step produced and that a cancelled text leaves at the next step boundary.
"""

from __future__ import annotations

import pytest
from conftest import read_lines

from nmt.decoding import Cancelled, DecodeOptions, StopSignal
from serve.engine.continuous import ContinuousScheduler
from serve.engine.spans import Span, check_spans, find_terms, mask
from serve.engine.streaming import PieceStream, StreamBroken, Update, stable_words

OPTIONS = [DecodeOptions(), DecodeOptions(min_length=20), DecodeOptions(beam_size=4, n_best=2),
           DecodeOptions(beam_size=3, length_penalty=0.2, min_length=10)]


@pytest.fixture(scope="module")
def sources(translator) -> list[list[int]]:
    return translator.tokenize(read_lines("test_2016_flickr", "en", 12))


def drain(stream: PieceStream) -> list[Update]:
    out = []
    while not stream.updates.empty():
        out.append(stream.updates.get_nowait())
    return out


@pytest.mark.parametrize("opts", OPTIONS, ids=["greedy", "greedy_long", "beam", "beam_long"])
def test_pieces_concatenate_to_the_translation_and_only_grow_by_whole_words(translator, sources, opts):
    loop = ContinuousScheduler(translator, thread=False)
    streams = [PieceStream(translator.tokenizer, beam=opts.beam_size > 1) for _ in sources]
    futures = []
    for src, stream in zip(sources, streams):  # one joins per step: rows of different ages
        futures.append(loop.submit([src], opts, StopSignal(), listener=stream))
        loop.step_once()
    while not all(f.done() for f in futures):
        loop.step_once()
    several = 0
    for src, stream, future in zip(sources, streams, futures):
        text = future.result(0)[0][0].text
        assert text == translator.translate_ids([src], opts)[0][0].text  # streaming changes nothing
        updates = drain(stream)
        pieces = [u.piece for u in updates] + [stream.finish(text, 99).piece]
        assert "".join(pieces) == text
        for i in range(len(updates)):
            sent = "".join(pieces[:i + 1])
            assert text.startswith(sent)
            assert sent == "" or text[len(sent):][:1] in ("", " ")  # every piece ends at a word boundary
        several += sum(bool(u.piece) for u in updates) >= 2
        if opts.beam_size == 1:
            steps = [u.step for u in updates]
            assert all(u.piece for u in updates) and steps == sorted(steps)
    assert several >= len(sources) // 2  # the pieces really stream, not one final piece


def test_beam_updates_come_every_interval(translator, sources):
    loop = ContinuousScheduler(translator, thread=False)
    stream = PieceStream(translator.tokenizer, interval=3, beam=True)
    opts = DecodeOptions(beam_size=4, min_length=12)
    future = loop.submit([sources[0]], opts, StopSignal(), listener=stream)
    while not future.done():
        loop.step_once()
    steps = [u.step for u in drain(stream)]
    assert steps and all(s % 3 == 0 for s in steps) and steps == list(range(3, 3 * len(steps) + 1, 3))


@pytest.mark.parametrize("opts", [DecodeOptions(min_length=50), DecodeOptions(beam_size=4, min_length=50)],
                         ids=["greedy", "beam"])
def test_a_cancelled_stream_frees_its_rows_within_one_step(translator, sources, opts):
    loop = ContinuousScheduler(translator, thread=False)
    stop, stream = StopSignal(), PieceStream(translator.tokenizer, beam=opts.beam_size > 1)
    other = DecodeOptions(min_length=30)  # still decoding when the stream is cancelled
    kept = loop.submit([sources[1]], other, StopSignal())
    future = loop.submit([sources[0]], opts, stop, listener=stream)
    for _ in range(4):
        loop.step_once()
    assert loop.running == 1 + opts.beam_size and not future.done()
    steps = translator.steps
    stop.set()  # what the RPC's termination callback does
    loop.step_once()
    assert loop.running == 1 and translator.steps == steps + 1  # one step, for the other text only
    with pytest.raises(Cancelled):
        future.result(0)
    while not kept.done():
        loop.step_once()
    assert kept.result(0)[0][0].text == translator.translate_ids([sources[1]], other)[0][0].text


def test_stable_words():
    assert stable_words(["Ein Mann sitzt"]) == "Ein Mann"
    assert stable_words(["Ein Mann sitzt", "Ein Mannschaft"]) == "Ein"
    assert stable_words(["Ein Mann sitzt", "Ein Mann steht"]) == "Ein Mann"
    assert stable_words(["Ein Mann", "Ein Mann sitzt"]) == "Ein"  # the first may end: "Mann" may grow
    assert stable_words(["Ein Mann ", "Ein Mann sitzt"]) == "Ein Mann"
    assert stable_words(["Ein"]) == "" and stable_words(["Ein", "Zwei Hunde"]) == ""


def test_finish_refuses_a_text_that_does_not_continue_the_pieces(translator):
    stream = PieceStream(translator.tokenizer)
    stream.sent = "Ein Mann"
    with pytest.raises(StreamBroken):
        stream.finish("Eine Frau", 3)


def test_spans_restore_the_same_piecewise_as_whole():
    text = 'Tom and Anna walk 3 dogs in Central Park.'
    spans = check_spans(text, find_terms(text, ["Central Park", "Tom", "3"]))
    assert [text[s.start:s.end] for s in spans] == ["Tom", "3", "Central Park"]
    m = mask(text, spans)
    assert m.text == "1 and Anna walk 2 dogs in 4."  # "3" is a word of the text: not a placeholder
    assert m.originals == {"1": "Tom", "2": "3", "4": "Central Park"}
    outputs = ["1 und Anna gehen mit 2 Hunden im 4.", "Anna geht 2 2 Hunde.", "1 geht 2 . 4", "Ein Mann ."]
    for out in outputs:
        whole = m.restorer().restore(out)
        for piece in ("Tom", "3", "Central Park"):
            assert whole.count(piece) == 1, whole
        words = out.split(" ")
        pieces = [words[0]] + [" " + w for w in words[1:]]
        r = m.restorer()
        assert "".join(r.feed(p, final=i == len(pieces) - 1) for i, p in enumerate(pieces)) == whole
    assert m.restorer().restore(outputs[0]) == "Tom und Anna gehen mit 3 Hunden im Central Park."
    assert m.restorer().restore(outputs[3]) == "Ein Mann Tom 3 Central Park ."
    assert mask(text, []).text == text and mask(text, []).restorer().restore("x 1.") == "x 1."


@pytest.mark.parametrize("spans, message", [
    ([Span(0, 99)], r"span \[0, 99\) is not a non-empty range"), ([Span(3, 3)], "not a non-empty range"),
    ([Span(3, 4)], "only whitespace"), ([Span(0, 3), Span(2, 5)], r"\[0, 3\) and \[2, 5\) overlap"),
])
def test_bad_spans(spans, message):
    from nmt.decoding import InvalidRequest

    with pytest.raises(InvalidRequest, match=message):
        check_spans("Tom and Anna", spans)
