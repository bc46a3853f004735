"""TranslateIncremental, forced target prefixes and protected spans through a real server on port 0,
the real client and `nmt translate` in a subprocess."""

from __future__ import annotations

import subprocess
import sys
import time

import grpc
import pytest
from conftest import REPO, read_lines
from test_grpc import running

from nmt.decoding import DecodeOptions
from nmt.v1 import translator_pb2 as pb
from serve.protocol.errors import TranslatorError
from serve.server.registry import BatchingConfig

TEXTS = read_lines("test_2016_flickr", "en", 8)
BEAM = DecodeOptions(beam_size=4, n_best=2, return_scores=True)


@pytest.fixture(scope="module")
def translator(tiny_bundle):
    from serve.engine.translator import EngineConfig, Translator

    return Translator.from_bundle(tiny_bundle, EngineConfig(device="cpu"))


@pytest.fixture(scope="module")
def served(translator):
    with running(translator) as s:
        yield s


def streamed(client, text, options, **kw):
    responses = list(client.translate_incremental(text, options, timeout=60, **kw))
    assert [r.final for r in responses] == [False] * (len(responses) - 1) + [True]
    return responses


@pytest.mark.parametrize("options", [DecodeOptions(), DecodeOptions(min_length=15), BEAM],
                         ids=["greedy", "greedy_long", "beam"])
def test_streamed_pieces_concatenate_to_the_translation(served, options):
    _, _, client = served
    several = 0
    for text in TEXTS:
        want = client.translate([text], options, timeout=60)[0]
        responses = streamed(client, text, options)
        assert "".join(r.piece for r in responses) == want.text
        final = responses[-1]
        assert final.translation.text == want.text and final.partial == want.text
        assert [h.text for h in final.translation.hypotheses] == [h.text for h in want.hypotheses]
        assert [list(h.tokens) for h in final.translation.hypotheses] == [h.tokens for h in want.hypotheses]
        several += len(responses) >= 3
    assert several >= len(TEXTS) // 2


def test_static_scheduler_streams_one_final_piece(translator):
    with running(translator, BatchingConfig(mode="static")) as (_, _, client):
        responses = streamed(client, TEXTS[0], DecodeOptions())
        assert len(responses) == 1 and responses[0].piece == client.translate(TEXTS[:1])[0].text


def test_cancelled_stream_stops_decoding(served, translator):
    server, _, client = served
    before = translator.steps
    options = DecodeOptions(beam_size=4, min_length=200, max_length_a=10, max_length_b=200)
    responses = client.translate_incremental(TEXTS[0], options, timeout=60, interval=1)
    first = next(responses)  # decoding is under way
    assert not first.final
    responses.close()  # the client cancels the call
    sample = server.metrics.registry.get_sample_value
    labels = {"method": "TranslateIncremental", "model": "en-de", "code": "CANCELLED"}
    deadline = time.monotonic() + 10
    while not sample("nmt_requests_total", labels) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sample("nmt_requests_total", labels) == 1
    stopped_at = translator.steps
    time.sleep(0.2)
    assert translator.steps == stopped_at and server.registry.models[0].scheduler.running == 0
    assert stopped_at - before < translator.max_source_tokens - 1  # stopped before the end


@pytest.mark.parametrize("options", [DecodeOptions(), BEAM], ids=["greedy", "beam"])
def test_target_prefix_as_text_or_ids_equals_the_engine(served, translator, options):
    _, _, client = served
    prefixes = ["Ein Hund", "Zwei", "Eine Frau mit"]
    ids = [translator.tokenizer.encode(p) for p in prefixes]
    sources = translator.tokenize(TEXTS[:3])
    want = translator.translate_ids(sources, options, prefixes=ids)
    by_text = client.translate(TEXTS[:3], options, timeout=60,
                               text_options=[pb.TextOptions(target_prefix=p) for p in prefixes])
    by_ids = client.translate(TEXTS[:3], options, timeout=60,
                              text_options=[pb.TextOptions(target_prefix_tokens=i) for i in ids])
    for w, a, b, p in zip(want, by_text, by_ids, prefixes):
        assert a.text.startswith(p) and a.text == b.text == w[0].text
        assert [h.tokens for h in a.hypotheses] == [h.tokens for h in w]
    responses = streamed(client, TEXTS[0], options, text_options=pb.TextOptions(target_prefix=prefixes[0]))
    assert "".join(r.piece for r in responses) == want[0][0].text


def test_protected_spans_and_terms_come_back_verbatim(served):
    _, _, client = served
    texts = ["A man named Zorblax rides a bike in Quuxville.", "The dog jumps over 37 fences.",
             "Two children play in the park."]
    spans = [pb.TextOptions(protected_spans=[pb.Span(start=12, end=19)]), pb.TextOptions(), pb.TextOptions()]
    got = client.translate(texts, timeout=60, text_options=spans, keep_terms=["Quuxville", "37"])
    assert "Zorblax" in got[0].text and "Quuxville" in got[0].text and "37" in got[1].text
    assert got[2].text == client.translate(texts[2:], timeout=60)[0].text  # no spans: no change
    for opts in (DecodeOptions(), BEAM):
        responses = streamed(client, texts[0], opts, text_options=spans[0], keep_terms=["Quuxville"])
        assert "".join(r.piece for r in responses) == client.translate(
            texts[:1], opts, timeout=60, text_options=spans[:1], keep_terms=["Quuxville"])[0].text


def test_spans_are_placed_by_alignment_which_the_answer_shows_only_when_asked(served, translator):
    _, _, client = served
    text = "A man named Zorblax rides 2 bikes."
    each = [pb.TextOptions(protected_spans=[pb.Span(start=12, end=19)]),
            pb.TextOptions(protected_spans=[pb.Span(start=26, end=27)])]
    got = client.translate([text, text], timeout=60, text_options=each)  # one text, two different spans
    assert "Zorblax" in got[0].text and "2" in got[1].text
    assert all(h.alignment is None for r in got for h in r.hypotheses)  # not asked for
    asked = client.translate([text], DecodeOptions(return_alignments=True), timeout=60, text_options=each[:1])
    assert asked[0].text == got[0].text and asked[0].hypotheses[0].alignment
    plain = translator.translate([text], DecodeOptions())[0].hypotheses[0]
    assert got[0].hypotheses[0].tokens == plain.tokens  # the source was translated as it is


def test_a_bundle_without_alignments_places_spans_by_placeholders(tiny_bundle, translator, tmp_path):
    from export.pipeline import strip_alignment_output
    from serve.engine.translator import EngineConfig, Translator
    from serve.server.text_options import plan_texts

    text = "A man named Zorblax rides a bike."
    each = [pb.TextOptions(protected_spans=[pb.Span(start=12, end=19)])]
    aligned = plan_texts(translator, [text], each, [])
    assert aligned.texts == [text] and aligned.engine_options(DecodeOptions()).return_alignments
    plain = Translator.from_bundle(strip_alignment_output(tiny_bundle, tmp_path / "plain"),
                                   EngineConfig(device="cpu", warmup=False))
    masked = plan_texts(plain, [text], each, [])
    assert masked.texts[0] != text and "Zorblax" not in masked.texts[0]
    assert not masked.engine_options(DecodeOptions()).return_alignments
    with running(plain) as (_, _, client):
        assert "Zorblax" in client.translate([text], timeout=60, text_options=each)[0].text


@pytest.mark.parametrize("request_kw, message", [
    (dict(text_options=[pb.TextOptions(target_prefix="Ein " * 40)]),
     "text_options[0].target_prefix is 40 tokens"),
    (dict(text_options=[pb.TextOptions(target_prefix_tokens=[3])]), "outside the target vocabulary"),
    (dict(text_options=[pb.TextOptions(target_prefix_tokens=[10 ** 6])]), "outside the target vocabulary"),
    (dict(text_options=[pb.TextOptions(target_prefix="Ein", target_prefix_tokens=[5])]), "not both"),
    (dict(text_options=[pb.TextOptions(protected_spans=[pb.Span(start=2, end=500)])]),
     "text_options[0].protected_spans: span [2, 500) is not a non-empty range"),
    (dict(text_options=[pb.TextOptions(protected_spans=[pb.Span(start=0, end=3), pb.Span(start=2, end=5)])]),
     "overlap"),
    (dict(text_options=[pb.TextOptions(), pb.TextOptions()]), "text_options has 2 entries for 1 texts"),
    (dict(keep_terms=[" "]), "keep_terms: a term is empty or blank"),
])
def test_bad_text_options_are_invalid_argument(served, request_kw, message):
    _, _, client = served
    with pytest.raises(TranslatorError) as e:
        client.translate(["A dog runs."], timeout=30, **request_kw)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in e.value.details()
    single = dict(request_kw)
    if "text_options" in single:
        if len(single["text_options"]) != 1:
            return
        single["text_options"] = single["text_options"][0]
    with pytest.raises(TranslatorError) as e:
        list(client.translate_incremental("A dog runs.", timeout=30, **single))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in e.value.details()


def test_bad_interval_and_options_of_a_stream(served):
    _, _, client = served
    for kw, message in [(dict(interval=0), "interval must be >= 1"),
                        (dict(options=DecodeOptions(beam_size=0)), "beam_size")]:
        with pytest.raises(TranslatorError) as e:
            list(client.translate_incremental("A dog runs.", timeout=30, **kw))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in e.value.details()


def nmt_translate(port: int, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nmt", "translate", "--server", f"127.0.0.1:{port}", *args],
                          cwd=REPO, input=stdin, capture_output=True, text=True, timeout=120)


def test_translate_cli_stream_prefix_and_keep(served):
    _, port, client = served
    out = nmt_translate(port, "--stream", *TEXTS[:2])
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [r.text for r in client.translate(TEXTS[:2], timeout=60)]
    out = nmt_translate(port, "--stream", "--beam-size", "3", "--interval", "2", stdin=TEXTS[2] + "\n")
    assert out.stdout.splitlines() == [client.translate(TEXTS[2:3], DecodeOptions(beam_size=3))[0].text]
    out = nmt_translate(port, "--target-prefix", "Ein Hund", "--keep", "Zorblax", "Zorblax sleeps.")
    assert out.returncode == 0, out.stderr
    line = out.stdout.strip()
    assert line.startswith("Ein Hund") and "Zorblax" in line
    piped = nmt_translate(port, "--target-prefix", "Ein Hund", "--keep", "Zorblax", stdin="Zorblax sleeps.\n")
    assert piped.stdout.strip() == line
    bad = nmt_translate(port, "--target-prefix", "Ein " * 40, "A dog.")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "INVALID_ARGUMENT: text_options[0].target_prefix is 40 tokens long" in bad.stderr
