"""The gRPC service against a real server on port 0 serving the tiny bundle through the real engine."""

from __future__ import annotations

import contextlib
import math
import subprocess
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from conftest import read_lines
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from nmt.decoding import DecodeOptions
from nmt.v1 import translator_pb2 as pb
from serve.protocol.client import TranslatorClient
from serve.protocol.errors import TranslatorError
from serve.server.metrics import Metrics
from serve.server.registry import BatchingConfig, ModelRegistry
from serve.server.server import ServerConfig, create_server
from serve.server.servicer import Limits

TEXTS = read_lines("test_2016_flickr", "en", 16)
BEAM = DecodeOptions(beam_size=4, n_best=2, return_scores=True)


@pytest.fixture(scope="module")
def translator(tiny_bundle):
    from serve.engine.translator import EngineConfig, Translator

    return Translator.from_bundle(tiny_bundle, EngineConfig(device="cpu"))


@contextlib.contextmanager
def running(translator=None, batching=None, metrics=None, **config):
    """A started server (SERVING once `translator` is added) and a client to it."""
    registry = ModelRegistry(batching or BatchingConfig(), metrics or Metrics())
    cfg = ServerConfig(**{"limits": Limits(max_texts=8, max_chars=500), **config})
    server, port = create_server(registry, cfg)
    if translator is not None:
        registry.add(translator)
        server.set_serving()
    client = TranslatorClient(f"127.0.0.1:{port}")
    try:
        yield server, port, client
    finally:
        client.close()
        server.drain(grace=0)


@pytest.fixture(scope="module")
def served(translator):
    with running(translator) as (server, port, client):
        yield server, port, client


@pytest.fixture(scope="module")
def slow_batching(translator):
    """A scheduler that lets the queue fill for a second: requests sit queued, deterministically."""
    batching = BatchingConfig(mode="static", max_batch_tokens=100_000, max_delay=1.0, max_queue=8,
                              always_wait=True)
    with running(translator, batching) as s:
        yield s


def same_results(got, want, scores: bool) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.source_tokens == w.source_tokens
        assert [h.text for h in g.hypotheses] == [h.text for h in w.hypotheses]
        assert [h.tokens for h in g.hypotheses] == [h.tokens for h in w.hypotheses]
        for gh, wh in zip(g.hypotheses, w.hypotheses):
            if scores:
                assert gh.score == pytest.approx(wh.score, abs=1e-4)
                assert gh.log_prob == pytest.approx(wh.log_prob, abs=1e-4)
            else:
                assert math.isnan(gh.score)


@pytest.mark.parametrize("options", [DecodeOptions(), BEAM], ids=["greedy", "beam4-nbest2"])
def test_translations_equal_the_engine(served, translator, options):
    _, _, client = served
    got = client.translate(TEXTS[:8], options, timeout=30)
    same_results(got, translator.translate(TEXTS[:8], options), options.return_scores)
    assert len({r.text for r in got}) > 4  # a real model: varied output, not a constant


def test_concurrent_clients_get_their_own_answers(translator):
    """8 client threads with different texts and options: batched together, answered un-mixed."""
    options = [DecodeOptions(), DecodeOptions(beam_size=2, n_best=2, return_scores=True)]
    want = {(i, o): translator.translate([TEXTS[i]], options[o]) for i in range(len(TEXTS)) for o in (0, 1)}
    metrics = Metrics()
    with running(translator, BatchingConfig(max_delay=0.05), metrics=metrics) as (_, port, client):
        def work(worker: int) -> list[tuple[int, int, object]]:
            out = []
            for k in range(6):
                i, o = (worker * 5 + k * 3) % len(TEXTS), (worker + k) % 2
                got = client.translate([TEXTS[i]], options[o], timeout=30, request_id=f"{worker}-{k}")
                out.append((i, o, got))
            return out

        with ThreadPoolExecutor(8) as pool:
            answers = [a for chunk in pool.map(work, range(8)) for a in chunk]
    assert len(answers) == 48
    for i, o, got in answers:
        same_results(got, want[(i, o)], o == 1)
    sample = metrics.registry.get_sample_value
    assert sample("nmt_batch_texts_sum", {"model": "en-de"}) == 48
    assert sample("nmt_batch_texts_count", {"model": "en-de"}) < 48  # requests shared batches


def test_stream_answers_in_order_and_isolates_a_bad_request(served, translator):
    _, _, client = served
    batches = [("a", TEXTS[0:3]), ("bad", []), ("b", TEXTS[3:5]), ("c", TEXTS[5:6])]
    answers = list(client.translate_stream(batches, BEAM, timeout=30))
    assert [a.request_id for a in answers] == ["a", "bad", "b", "c"]
    assert answers[1].error.code() == grpc.StatusCode.INVALID_ARGUMENT and answers[1].results is None
    for (rid, texts), answer in zip(batches, answers):
        if rid != "bad":
            same_results(answer.results, translator.translate(texts, BEAM), True)


def test_model_info(served, translator):
    _, _, client = served
    info = client.model_info(timeout=10)
    m, man = info.models[0], translator.manifest
    assert (m.name, m.source_language, m.target_language, m.is_default) == ("en-de", "en", "de", True)
    assert (m.d_model, m.n_heads, m.vocab_size) == (man.d_model, man.n_heads, man.vocab_size)
    assert m.dtype == man.dtype
    assert m.provider == "CPUExecutionProvider" and m.max_source_tokens == translator.max_source_tokens
    pairs = [(p.source_language, p.target_language, p.model) for p in info.language_pairs]
    assert pairs == [("en", "de", "en-de")]
    assert (info.limits.max_texts, info.limits.max_chars) == (8, 500)


def test_several_models_routed_by_name_or_language_pair(translator, tiny_bundle, tmp_path):
    """A second bundle (the same weights relabelled en->fr) beside the first: requests reach the one named."""
    import json
    import shutil

    from serve.engine.translator import EngineConfig, Translator

    other = tmp_path / "en-fr"
    shutil.copytree(tiny_bundle, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest.update(name="en-fr", tgt_lang="fr")
    (other / "manifest.json").write_text(json.dumps(manifest))
    with running(translator) as (server, _, client):
        server.registry.add(Translator.from_bundle(other, EngineConfig(device="cpu")))
        info = client.model_info(timeout=10)
        assert [(m.name, m.is_default) for m in info.models] == [("en-de", True), ("en-fr", False)]
        assert [p.target_language for p in info.language_pairs] == ["de", "fr"]
        served_by = {}
        for route in (dict(), dict(model="en-fr"), dict(target_language="fr"), dict(source_language="en"),
                      dict(source_language="en", target_language="de")):
            served_by[tuple(route.values())] = client.stub.Translate(
                pb.TranslateRequest(texts=["A dog."], **route), timeout=10).model
        assert served_by == {(): "en-de", ("en-fr",): "en-fr", ("fr",): "en-fr", ("en",): "en-de",
                             ("en", "de"): "en-de"}
        with pytest.raises(TranslatorError) as e:
            client.translate(["A dog."], timeout=10, source_language="de", target_language="en")
        assert e.value.details() == "unknown language pair de->en; served: en->de, en->fr"
        with pytest.raises(ValueError, match="two bundles are named 'en-fr'"):
            server.registry.add(Translator.from_bundle(other, EngineConfig(device="cpu", warmup=False)))


def raw_call(port: int, payload: bytes) -> grpc.RpcError:
    """Send bytes that are not a valid TranslateRequest."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary("/nmt.v1.Translator/Translate", request_serializer=lambda b: b,
                                   response_deserializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as e:
            call(payload, timeout=10)
    return e.value


BAD_REQUESTS = {
    "no texts": (dict(texts=[]), "texts is empty"),
    "too many texts": (dict(texts=["a"] * 9), "too many texts: 9, at most 8"),
    "too many characters": (dict(texts=["ok", "x" * 501]), "texts[1] is 501 characters long, at most 500"),
    "too many tokens": (dict(texts=["a b c d " * 60]),
                        "tokens long (end of sentence included), model 'en-de' accepts at most"),
    "beam size": (dict(texts=["a"], options=pb.DecodingOptions(beam_size=0)), "beam_size must be in [1, 16]"),
    "n_best above beam": (dict(texts=["a"], options=pb.DecodingOptions(beam_size=2, n_best=3)), "n_best"),
    "nan penalty": (dict(texts=["a"], options=pb.DecodingOptions(length_penalty=float("nan"))),
                    "length_penalty must be a finite number"),
    "negative min_length": (dict(texts=["a"], options=pb.DecodingOptions(min_length=-1)), "min_length"),
    "unknown model": (dict(texts=["a"], model="xx-yy"), "unknown model 'xx-yy'; served: en-de"),
    "unknown pair": (dict(texts=["a"], source_language="fr"), "unknown language pair fr->*"),
    "model/pair mismatch": (dict(texts=["a"], model="en-de", target_language="fr"), "translates en->de"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_status_and_message(served, case):
    _, _, client = served
    fields, message = BAD_REQUESTS[case]
    with pytest.raises(grpc.RpcError) as e:
        client.stub.Translate(pb.TranslateRequest(**fields), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in e.value.details()


@pytest.mark.parametrize("payload,message", [
    (b"\xff\xff\xff\xff", "request is not a valid nmt.v1.TranslateRequest"),
    (b"\x12\x02\xc3\x28", "request is not a valid nmt.v1.TranslateRequest"),  # texts[0]: invalid UTF-8
], ids=["garbage", "invalid-utf8"])
def test_malformed_protobuf_is_invalid_argument(served, payload, message):
    _, port, client = served
    err = raw_call(port, payload)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and message in err.details()
    assert client.translate(["A dog."], timeout=10)[0].text  # still serving


def test_full_queue_is_resource_exhausted(slow_batching, translator):
    server, _, client = slow_batching
    scheduler = server.registry.models[0].scheduler
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(client.translate, TEXTS[:8], None, 30)
        deadline = time.monotonic() + 10
        while scheduler.queued < 8 and time.monotonic() < deadline:
            time.sleep(0.005)
        with pytest.raises(TranslatorError) as e:
            client.translate(TEXTS[8:9], timeout=30)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and e.value.retryable
        assert "queue" in e.value.details() and "full" in e.value.details()
        same_results(first.result(), translator.translate(TEXTS[:8]), False)  # the accepted one is served


def test_short_deadline_is_deadline_exceeded_and_the_work_is_dropped(slow_batching):
    server, _, client = slow_batching
    scheduler = server.registry.models[0].scheduler
    steps = server.registry.models[0].translator.steps
    with pytest.raises(TranslatorError) as e:
        client.translate(TEXTS[:4], timeout=0.2)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    time.sleep(1.2)  # past the scheduler's fill delay: it has looked at the expired rows
    assert scheduler.queued == 0
    assert server.registry.models[0].translator.steps == steps  # dropped before decoding
    assert client.health() == "SERVING"
    assert client.translate(TEXTS[:1], timeout=30)[0].text


def test_cancelled_request_stops_decoding(served, translator):
    """Measured in decoder steps, not time: after the cancel no further step runs."""
    server, _, client = served
    # min_length keeps EOS away, so this would decode max_positions - 1 = 127 steps if left alone.
    options = pb.DecodingOptions(beam_size=8, min_length=200, max_length_a=10, max_length_b=200)
    request = pb.TranslateRequest(texts=TEXTS[:8], options=options)
    before = translator.steps
    call = client.stub.Translate.future(request, timeout=60)
    while translator.steps < before + 3:
        time.sleep(0.001)
    call.cancel()
    deadline = time.monotonic() + 10
    sample = server.metrics.registry.get_sample_value
    labels = {"method": "Translate", "model": "en-de", "code": "CANCELLED"}
    while not sample("nmt_requests_total", labels) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sample("nmt_requests_total", labels) == 1
    stopped_at = translator.steps
    time.sleep(0.2)
    assert translator.steps == stopped_at  # nothing runs on after the cancellation
    assert stopped_at - before < translator.max_source_tokens - 1  # and it stopped before the end
    assert client.translate(TEXTS[:1], timeout=30)[0].text


def test_health_transitions_and_drain(translator):
    metrics = Metrics()
    batching = BatchingConfig(mode="static", max_delay=0.5, always_wait=True)
    with running(None, batching, metrics) as (server, port, client):
        assert client.health() == "NOT_SERVING"
        assert client.health("nmt.v1.Translator") == "NOT_SERVING"
        with pytest.raises(TranslatorError) as e:
            client.translate(["A dog."], timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "loading" in e.value.details()
        server.registry.add(translator)
        server.set_serving()
        assert client.health() == "SERVING" and client.health("nmt.v1.Translator") == "SERVING"

        # What a load balancer watching health sees.
        watch = health_pb2_grpc.HealthStub(client.channel).Watch(health_pb2.HealthCheckRequest(), timeout=30)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        with ThreadPoolExecutor(1) as pool:  # accepted before the drain: sits queued for 0.5 s
            accepted = pool.submit(client.translate, TEXTS[:3], None, 30)
            while server.registry.models[0].scheduler.queued < 3:
                time.sleep(0.005)
            drainer = threading.Thread(target=server.drain, args=(10,))
            drainer.start()
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            time.sleep(0.05)
            with pytest.raises(TranslatorError) as e:  # new work is refused
                client.translate(["A dog."], timeout=10)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            same_results(accepted.result(), translator.translate(TEXTS[:3]), False)
            drainer.join(5)
            assert not drainer.is_alive()  # the open Watch stream is not waited for


def test_reflection_lists_the_service(served):
    _, port, _ = served
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        responses = stub.ServerReflectionInfo(iter([request]))
        names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"nmt.v1.Translator", "grpc.health.v1.Health"} <= names


def test_metrics_endpoint_exposes_the_counters(translator):
    metrics = Metrics()
    with running(translator, metrics=metrics) as (_, _, client):
        http = metrics.serve_http(0, "127.0.0.1")
        try:
            client.translate(TEXTS[:2], timeout=30)
            with pytest.raises(TranslatorError):
                client.translate([], timeout=30)
            body = urllib.request.urlopen(f"http://127.0.0.1:{http.server_port}/metrics", timeout=10).read()
        finally:
            http.shutdown()
    text = body.decode()
    assert 'nmt_requests_total{code="OK",method="Translate",model="en-de"} 1.0' in text
    assert 'nmt_requests_total{code="INVALID_ARGUMENT",method="Translate",model=""} 1.0' in text
    for name in ("nmt_request_seconds_bucket", "nmt_queue_seconds_count", "nmt_compute_seconds_count",
                 "nmt_batch_texts_sum", 'nmt_queue_depth{model="en-de"}', "nmt_source_tokens_total",
                 "nmt_generated_tokens_total"):
        assert name in text


def test_auth_token_required_except_for_health(translator):
    with running(translator, auth_token="s3cret") as (_, port, anonymous):
        assert anonymous.health() == "SERVING"  # probes need no token
        calls = [lambda c: c.translate(["A dog."], timeout=10), lambda c: c.model_info(timeout=10),
                 lambda c: list(c.translate_stream([("a", ["A dog."])], timeout=10))]
        with TranslatorClient(f"127.0.0.1:{port}", auth_token="wrong") as wrong:
            for client in (anonymous, wrong):
                for call in calls:
                    with pytest.raises(TranslatorError) as e:
                        call(client)
                    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with TranslatorClient(f"127.0.0.1:{port}", auth_token="s3cret") as good:
            assert good.translate(["A dog."], timeout=10)[0].text
            assert good.model_info(timeout=10).models[0].name == "en-de"


def test_tls_with_a_self_signed_certificate(translator, tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    with running(translator, tls_cert=cert.read_bytes(), tls_key=key.read_bytes()) as (_, port, plain):
        with TranslatorClient(f"localhost:{port}", tls_ca=cert) as client:
            assert client.translate(["A dog."], timeout=10)[0].text
            assert client.health() == "SERVING"
        with pytest.raises(TranslatorError) as e:  # plaintext against TLS: no connection
            plain.translate(["A dog."], timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
