"""Property-based tests (hypothesis) of request validation and of the engine's batch invariants, on the
tiny bundle: arbitrary input is either served or refused as InvalidRequest / INVALID_ARGUMENT, never a
crash; a text's translation does not depend on its batch mates, their order or the batch packing."""

from __future__ import annotations

import math

import grpc
import pytest
from conftest import read_lines
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nmt.decoding import DecodeOptions, InvalidRequest
from nmt.v1 import translator_pb2 as pb
from serve.protocol.convert import options_from_proto
from serve.server.registry import ModelRegistry
from serve.server.server import ServerConfig, create_server
from serve.server.servicer import Limits
from serve.server.status import status_of

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
                derandomize=True)
SENTENCES = read_lines("test_2016_flickr", "en", 12)
LIMITS = Limits(max_texts=6, max_chars=200)

int32 = st.one_of(st.integers(-(2**31), 2**31 - 1), st.sampled_from([0, 1, 2, 16, 17, -1]))
float32 = st.one_of(st.floats(width=32), st.sampled_from([0.0, -0.0, 1.0, math.inf, -math.inf, math.nan]))
# Text as a protobuf string can carry: any code point but surrogates, astral and control ones included.
text = st.text(st.characters(exclude_categories=["Cs"]), max_size=60)


@st.composite
def decoding_options(draw) -> pb.DecodingOptions:
    """Any combination of set and unset option fields with any int32/float32 value."""
    o = pb.DecodingOptions(return_scores=draw(st.booleans()))
    for name, values in (("beam_size", int32), ("n_best", int32), ("min_length", int32),
                         ("max_length_b", int32), ("length_penalty", float32), ("max_length_a", float32)):
        if draw(st.booleans()):
            setattr(o, name, draw(values))
    return o


@pytest.fixture(scope="module")
def translator(tiny_bundle):
    from serve.engine.translator import EngineConfig, Translator

    return Translator.from_bundle(tiny_bundle, EngineConfig(device="cpu"))


@pytest.fixture(scope="module")
def stub(translator):
    registry = ModelRegistry()
    server, port = create_server(registry, ServerConfig(limits=LIMITS))
    registry.add(translator)
    server.set_serving()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield channel.unary_unary("/nmt.v1.Translator/Translate",
                                  request_serializer=pb.TranslateRequest.SerializeToString,
                                  response_deserializer=pb.TranslateResponse.FromString)
    server.drain(grace=0)


def cheap(o: pb.DecodingOptions) -> pb.DecodingOptions:
    """The same options with the output length bounded, so a valid beam of 16 stays fast."""
    capped = pb.DecodingOptions()
    capped.CopyFrom(o)
    capped.max_length_a, capped.max_length_b = 0.0, 6
    if capped.HasField("min_length") and capped.min_length > 6:
        capped.min_length = 6
    return capped


@settings(max_examples=300, **SETTINGS)
@given(decoding_options())
def test_options_are_accepted_whole_or_refused_as_invalid_request(options):
    try:
        parsed = options_from_proto(options)
    except InvalidRequest as e:
        assert str(e).startswith("invalid options: ")
        assert status_of(e) == (grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return
    assert parsed.validate() is parsed  # what passes the gate is valid for the engine too
    assert math.isfinite(parsed.length_penalty) and math.isfinite(parsed.max_length_a)
    assert 1 <= parsed.n_best <= parsed.beam_size <= 16


@settings(max_examples=40, **SETTINGS)
@given(options=decoding_options())
def test_the_engine_serves_what_validation_lets_through(translator, options):
    try:
        parsed = options_from_proto(cheap(options))
    except InvalidRequest:
        return
    results = translator.translate(["A dog runs."], parsed)
    assert len(results) == 1 and len(results[0].hypotheses) == parsed.n_best


@settings(max_examples=40, **SETTINGS)
@given(texts=st.lists(text, max_size=LIMITS.max_texts + 2),
       options=st.one_of(st.just(pb.DecodingOptions(beam_size=2)), decoding_options()),
       model=st.sampled_from(["", "en-de", "../../etc/passwd", "xx"]))
def test_any_request_is_served_or_invalid_argument(stub, texts, options, model):
    request = pb.TranslateRequest(request_id="p", texts=texts, options=cheap(options), model=model)
    try:
        response = stub(request, timeout=60)
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.code(), e.details())
        assert e.details()
        return
    assert response.request_id == "p" and response.model == "en-de"
    assert len(response.translations) == len(texts)  # one answer per text
    assert all(t.hypotheses and t.text == t.hypotheses[0].text for t in response.translations)


@pytest.fixture(scope="module")
def alone(translator):
    """Each sentence translated on its own, per options: the reference for batch invariance."""
    cache: dict[tuple[int, DecodeOptions], list[tuple[list[int], str]]] = {}

    def get(i: int, options: DecodeOptions) -> list[tuple[list[int], str]]:
        if (i, options) not in cache:
            (hyps,) = translator.translate_ids(translator.tokenize([SENTENCES[i]]), options)
            cache[(i, options)] = [(h.tokens, h.text) for h in hyps]
        return cache[(i, options)]

    return get


@settings(max_examples=25, **SETTINGS)
@given(picks=st.lists(st.integers(0, len(SENTENCES) - 1), min_size=1, max_size=10),
       options=st.sampled_from([DecodeOptions(), DecodeOptions(beam_size=3, n_best=2),
                                DecodeOptions(beam_size=2, length_penalty=0.0, min_length=4)]),
       budget=st.sampled_from([24, 80, 100_000]))
def test_a_translation_does_not_depend_on_its_batch_mates(translator, alone, picks, options, budget):
    """Random subsets, permutations and repeats of real sentences, packed into one or several batches."""
    got = translator.translate_ids(translator.tokenize([SENTENCES[i] for i in picks]), options,
                                   max_batch_tokens=budget)
    assert len(got) == len(picks)  # one answer per text
    for i, hyps in zip(picks, got):  # in input order, each equal to the sentence alone
        assert [(h.tokens, h.text) for h in hyps] == alone(i, options)


@pytest.mark.parametrize("beam_size", [1, 4])
def test_a_huge_length_penalty_is_served_or_refused(stub, beam_size):
    # Found by `nmt stress --seed 10 --requests 10000 --concurrency 64`.
    options = pb.DecodingOptions(beam_size=beam_size, length_penalty=1000.0)
    try:
        stub(pb.TranslateRequest(texts=["A dog runs in the park."], options=options), timeout=60)
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.code(), e.details())
