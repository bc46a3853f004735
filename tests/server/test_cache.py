"""The cache of repeats: identical answers, the LRU bound, hit/miss metrics, off by default, per version."""

from __future__ import annotations

import contextlib

import pytest
from conftest import read_lines

from nmt.decoding import DecodeOptions, Hypothesis
from nmt.errors import UserError
from serve.protocol.client import TranslatorClient
from serve.server.cache import TranslationCache
from serve.server.cli import build_config, parse_args
from serve.server.metrics import Metrics
from serve.server.registry import ModelRegistry
from serve.server.reload import Reloader
from serve.server.server import ServerConfig, create_server

TEXTS = read_lines("test_2016_flickr", "en", 10)
FULL = DecodeOptions(beam_size=4, n_best=3, return_scores=True, return_alignments=True)


@pytest.fixture(scope="module")
def translator(tiny_bundle):
    from serve.engine.translator import EngineConfig, Translator

    return Translator.from_bundle(tiny_bundle, EngineConfig(device="cpu"))


@contextlib.contextmanager
def serving(translator, cache_size: int | None):
    metrics = Metrics()
    cache = TranslationCache(cache_size, metrics) if cache_size else None
    registry = ModelRegistry(metrics=metrics, cache=cache)
    registry.add(translator)
    server, port = create_server(registry, ServerConfig(port=0, auth_token="t"), metrics,
                                 Reloader(registry, metrics=metrics, idle=0.1))
    server.set_serving()
    client = TranslatorClient(f"127.0.0.1:{port}", auth_token="t")
    try:
        yield client, metrics, cache
    finally:
        client.close()
        server.drain(grace=0)


def counted(metrics: Metrics, name: str, model: str) -> float:
    return metrics.registry.get_sample_value(f"nmt_cache_{name}_total", {"model": model}) or 0.0


def answers(client: TranslatorClient, texts: list[str], options: DecodeOptions) -> list:
    """The raw response messages: every field the caller sees (texts, tokens, scores, alignments)."""
    from nmt.v1 import translator_pb2 as pb
    from serve.protocol.convert import options_to_proto

    request = pb.TranslateRequest(texts=texts, options=options_to_proto(options))
    return list(client.stub.Translate(request, timeout=60, metadata=client.metadata).translations)


def test_hits_are_identical_to_decoding_and_counted(translator):
    steps_of = lambda: translator.steps  # noqa: E731  decoder steps run: a hit runs none
    with serving(translator, None) as (plain, _, _):
        want = answers(plain, TEXTS, FULL)
    with serving(translator, 100) as (client, metrics, cache):
        first = answers(client, TEXTS, FULL)
        steps = steps_of()
        second = answers(client, TEXTS, FULL)
        assert steps_of() == steps  # answered without decoding
        assert first == second == want  # n-best, scores and alignments included
        assert all(len(t.hypotheses) == 3 and t.hypotheses[0].HasField("score") for t in second)
        name = translator.name
        assert (counted(metrics, "hits", name), counted(metrics, "misses", name)) == (10, 10)
        assert len(cache) == 10
        greedy = answers(client, TEXTS[:3], DecodeOptions())  # other options: another key
        assert counted(metrics, "misses", name) == 13 and steps_of() > steps
        assert [t.text for t in greedy] == [r.text for r in translator.translate(TEXTS[:3])]


def test_the_normalized_source_is_the_key_and_repeats_in_a_request_decode_once(translator):
    with serving(translator, 100) as (client, metrics, cache):
        texts = [TEXTS[0], "  " + TEXTS[0].replace(" ", "   ") + " ", TEXTS[1], TEXTS[0]]
        assert translator.tokenize(texts[:1]) == translator.tokenize(texts[1:2])  # same after normalization
        got = [r.text for r in client.translate(texts, timeout=60)]
        want = [r.text for r in translator.translate(texts)]
        assert got == want
        name = translator.name
        assert (counted(metrics, "misses", name), counted(metrics, "hits", name)) == (2, 2)
        assert len(cache) == 2


def test_a_forced_prefix_is_part_of_the_key(translator):
    from nmt.v1 import translator_pb2 as pb

    with serving(translator, 100) as (client, metrics, cache):
        plain = client.translate(TEXTS[:1], timeout=60)[0]
        prefix = pb.TextOptions(target_prefix="Ein Hund")
        forced = client.translate(TEXTS[:1], timeout=60, text_options=[prefix])[0]
        again = client.translate(TEXTS[:1], timeout=60, text_options=[prefix])[0]
        assert forced.text != plain.text and again.text == forced.text  # not the prefix-less entry
        assert client.translate(TEXTS[:1], timeout=60)[0].text == plain.text
        name = translator.name
        assert (counted(metrics, "misses", name), counted(metrics, "hits", name)) == (2, 2)
        assert len(cache) == 2


def test_the_bound_is_kept_least_recently_used_first(translator):
    with serving(translator, 3) as (client, metrics, cache):
        for text in TEXTS[:3]:
            client.translate([text], timeout=60)
        client.translate([TEXTS[0]], timeout=60)  # TEXTS[0] used again: TEXTS[1] is now the oldest
        client.translate([TEXTS[3]], timeout=60)  # a fourth entry evicts TEXTS[1]
        assert len(cache) == 3 and cache.evictions == 1
        assert metrics.registry.get_sample_value("nmt_cache_evictions_total") == 1
        assert metrics.registry.get_sample_value("nmt_cache_entries") == 3
        hits = counted(metrics, "hits", translator.name)
        client.translate([TEXTS[0], TEXTS[2], TEXTS[3]], timeout=60)
        assert counted(metrics, "hits", translator.name) == hits + 3
        client.translate([TEXTS[1]], timeout=60)  # evicted: decoded again
        assert counted(metrics, "hits", translator.name) == hits + 3


def test_lru_unit():
    cache = TranslationCache(2)
    a, b, c = ([Hypothesis(text=t, tokens=[i], score=0.0, log_prob=0.0)] for i, t in enumerate("abc"))
    cache.put("a", a)
    cache.put("b", b)
    assert cache.get("a") == a  # a is now the most recent
    cache.put("c", c)
    assert cache.get("b") is None and cache.get("a") == a and cache.get("c") == c and len(cache) == 2
    with pytest.raises(ValueError):
        TranslationCache(0)


def test_off_by_default(translator):
    assert parse_args(["--model-dir", "x"]).cache_size == 0
    assert ModelRegistry().cache is None
    with serving(translator, None) as (client, metrics, _):
        client.translate(TEXTS[:2], timeout=60)
        steps = translator.steps
        client.translate(TEXTS[:2], timeout=60)
        assert translator.steps > steps  # decoded again
        assert counted(metrics, "hits", translator.name) == 0 == counted(metrics, "misses", translator.name)
    with pytest.raises(UserError, match="--cache-size must be >= 0"):
        build_config(parse_args(["--model-dir", "x", "--cache-size", "-1"]))


def test_a_reload_misses_the_old_versions_entries(translator, tiny_bundle_v2):
    from serve.engine.translator import EngineConfig, Translator

    v2 = Translator.from_bundle(tiny_bundle_v2, EngineConfig(device="cpu"))
    want = [r.text for r in v2.translate(TEXTS[:4])]
    assert want != [r.text for r in translator.translate(TEXTS[:4])]
    with serving(translator, 100) as (client, metrics, cache):
        client.translate(TEXTS[:4], timeout=60)
        assert client.reload_model(translator.name, str(tiny_bundle_v2)).reloaded
        misses = counted(metrics, "misses", translator.name)
        assert [r.text for r in client.translate(TEXTS[:4], timeout=60)] == want
        assert counted(metrics, "misses", translator.name) == misses + 4
        assert len(cache) == 8  # both versions' entries; the old ones age out
