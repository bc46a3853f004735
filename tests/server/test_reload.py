"""Model reload without downtime: the ReloadModel RPC under continuous load, refused bundles, SIGHUP."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import grpc
import pytest
from conftest import read_lines
from test_server_process import ServerProcess, metric, wait_serving

from nmt.bundle import ENCODER_FILE, MANIFEST_FILE, read_manifest
from nmt.decoding import DecodeOptions, StopSignal
from nmt.files import sha256_file
from nmt.v1 import translator_pb2 as pb
from serve.protocol.client import TranslatorClient
from serve.protocol.errors import TranslatorError
from serve.server.metrics import Metrics
from serve.server.registry import ModelRegistry
from serve.server.reload import Reloader
from serve.server.server import ServerConfig, create_server

TEXTS = read_lines("test_2016_flickr", "en", 24)
TOKEN = "reload-token"


@pytest.fixture(scope="module")
def engines(tiny_bundle, tiny_bundle_v2):
    from serve.engine.translator import EngineConfig, Translator

    return (Translator.from_bundle(tiny_bundle, EngineConfig(device="cpu")),
            Translator.from_bundle(tiny_bundle_v2, EngineConfig(device="cpu")))


@pytest.fixture(scope="module")
def expected(engines):
    """Per text: the fp32 (old) and v2 (new) translations, which the reload test tells apart."""
    old, new = ([r.text for r in e.translate(TEXTS)] for e in engines)
    assert old != new, "the two bundles translate every test text alike: the switch would not show"
    return old, new


def broken_copy(bundle: Path, out: Path, keep_checksums: bool) -> Path:
    """A copy of `bundle` with a truncated encoder; keep_checksums: the manifest updated to match, so
    the checksums pass and the load itself fails."""
    shutil.copytree(bundle, out)
    enc = out / ENCODER_FILE
    enc.write_bytes(enc.read_bytes()[:1000])
    if keep_checksums:
        import json

        raw = json.loads((out / MANIFEST_FILE).read_text())
        raw["files"][ENCODER_FILE] = {"sha256": sha256_file(enc), "bytes": enc.stat().st_size}
        (out / MANIFEST_FILE).write_text(json.dumps(raw))
    return out


@contextlib.contextmanager
def reloadable(bundle: Path, token: str | None = TOKEN):
    from serve.engine.translator import EngineConfig, Translator

    metrics = Metrics()
    registry = ModelRegistry(metrics=metrics)
    engine = EngineConfig(device="cpu")
    first = registry.add(Translator.from_bundle(bundle, engine))
    reloader = Reloader(registry, engine, {first.name: bundle}, metrics, idle=0.2)
    server, port = create_server(registry, ServerConfig(port=0, auth_token=token), metrics, reloader)
    server.set_serving()
    client = TranslatorClient(f"127.0.0.1:{port}", auth_token=token)
    try:
        yield server, client, first.name
    finally:
        client.close()
        server.drain(grace=0)


def test_a_replaced_version_releases_its_sessions_after_its_last_request(tiny_bundle, tiny_bundle_v2):
    with reloadable(tiny_bundle) as (server, client, name):
        old = server.registry.models[0].translator
        before = client.translate(TEXTS[:2], timeout=30)
        assert client.reload_model(name, str(tiny_bundle_v2)).reloaded
        deadline = time.monotonic() + 20
        while hasattr(old.runtime.decoder, "session") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(hasattr(g, "session") for g in (old.runtime.encoder, old.runtime.decoder,
                                                       old.runtime.reorder))
        new = server.registry.models[0].translator
        assert new is not old and hasattr(new.runtime.decoder, "session")
        after = client.translate(TEXTS[:2], timeout=30)  # served by the new version
        assert [r.text for r in after] == [r.text for r in new.translate(TEXTS[:2])]
        assert [r.text for r in after] != [r.text for r in before]


def versions(client: TranslatorClient) -> list[str]:
    return [m.version for m in client.model_info(timeout=10).models]


def test_reload_under_load_fails_no_request_and_switches_versions(tiny_bundle, tiny_bundle_v2, expected):
    old, new = expected
    done: list[tuple[float, int, list[str]]] = []  # (sent at, first text, outputs)
    errors: list[Exception] = []
    stop = threading.Event()
    with reloadable(tiny_bundle) as (server, client, name):
        assert versions(client) == [read_manifest(tiny_bundle).checksum]

        def load(worker: int) -> None:
            i = worker
            while not stop.is_set():
                start = (i * 3) % (len(TEXTS) - 3)
                sent = time.monotonic()
                try:
                    done.append((sent, start, [r.text for r in client.translate(TEXTS[start:start + 3],
                                                                              timeout=30)]))
                except Exception as e:  # any failure at all fails the test
                    errors.append(e)
                i += 4

        workers = [threading.Thread(target=load, args=(w,)) for w in range(4)]
        for w in workers:
            w.start()
        time.sleep(1.5)
        response = client.reload_model(name, str(tiny_bundle_v2))
        swapped = time.monotonic()
        time.sleep(1.5)
        stop.set()
        for w in workers:
            w.join()
        info = versions(client)
    assert not errors, errors[:3]
    new_version = read_manifest(tiny_bundle_v2).checksum
    assert response.reloaded and response.version == new_version == info[0]
    assert response.previous_version == read_manifest(tiny_bundle).checksum != new_version
    before = [(s, out) for sent, s, out in done if sent < swapped - 0.5]
    after = [(s, out) for sent, s, out in done if sent > swapped]
    assert before and after, (len(before), len(after))
    for s, out in before + after:  # a request is answered by one version, whole
        assert out in (old[s:s + 3], new[s:s + 3])
    assert all(out == old[s:s + 3] for s, out in before)
    assert all(out == new[s:s + 3] for s, out in after)


def test_each_response_names_the_version_that_translated_it(tiny_bundle, tiny_bundle_v2, expected):
    def answered(client: TranslatorClient) -> list[tuple[str, str]]:
        """(model_version, text) of a Translate, a TranslateStream and a TranslateIncremental answer."""
        md = client.metadata
        one = client.stub.Translate(pb.TranslateRequest(texts=TEXTS[:1]), timeout=30, metadata=md)
        streamed = next(iter(client.stub.TranslateStream(iter([pb.TranslateRequest(texts=TEXTS[:1])]),
                                                         timeout=30, metadata=md)))
        final = list(client.stub.TranslateIncremental(pb.TranslateIncrementalRequest(text=TEXTS[0]),
                                                      timeout=30, metadata=md))[-1]
        return [(one.model_version, one.translations[0].text),
                (streamed.model_version, streamed.translations[0].text),
                (final.model_version, final.translation.text)]

    with reloadable(tiny_bundle) as (server, client, name):
        before = versions(client)
        assert before == [read_manifest(tiny_bundle).checksum]
        assert answered(client) == [(before[0], expected[0][0])] * 3
        client.reload_model(name, str(tiny_bundle_v2))
        after = versions(client)
        assert after == [read_manifest(tiny_bundle_v2).checksum] != before
        assert answered(client) == [(after[0], expected[1][0])] * 3


@pytest.mark.parametrize("keep_checksums", [False, True], ids=["checksum-mismatch", "unloadable-onnx"])
def test_a_broken_bundle_is_refused_and_the_old_one_keeps_serving(tiny_bundle, tmp_path, expected,
                                                                 keep_checksums):
    broken = broken_copy(tiny_bundle, tmp_path / "broken", keep_checksums)
    with reloadable(tiny_bundle) as (server, client, name):
        before = versions(client)
        with pytest.raises(TranslatorError) as e:
            client.reload_model(name, str(broken))
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert ("checksum mismatch" if not keep_checksums else "cannot serve") in e.value.details()
        assert str(broken) in e.value.details()
        assert versions(client) == before
        assert [r.text for r in client.translate(TEXTS[:4], timeout=30)] == expected[0][:4]
        refused = server.metrics.registry.get_sample_value("nmt_reloads_total",
                                                           {"model": name, "outcome": "refused"})
        assert refused == 1


def test_reload_needs_the_token_and_a_matching_bundle(tiny_bundle, tmp_path):
    other = tmp_path / "renamed"
    shutil.copytree(tiny_bundle, other)
    import json

    raw = json.loads((other / MANIFEST_FILE).read_text())
    raw["name"] = "someone-else"
    (other / MANIFEST_FILE).write_text(json.dumps(raw))
    with reloadable(tiny_bundle) as (server, client, name):
        cases = [(name, str(other), "holds model 'someone-else'"), ("nope", "", "unknown model 'nope'"),
                 ("", "", "name is empty"), (name, str(tmp_path / "missing"), "not a model bundle")]
        for model, path, message in cases:
            with pytest.raises(TranslatorError) as e:
                client.reload_model(model, path)
            assert e.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION)
            assert message in e.value.details(), e.value.details()
        unchanged = client.reload_model(name)  # the directory it came from, not changed since
        assert not unchanged.reloaded and unchanged.version == unchanged.previous_version
    with reloadable(tiny_bundle) as (server, client, name):
        stranger = TranslatorClient(client.target, auth_token="wrong")
        with pytest.raises(TranslatorError) as e:
            stranger.reload_model(name)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        stranger.close()
    with reloadable(tiny_bundle, token=None) as (server, client, name):
        with pytest.raises(TranslatorError) as e:
            client.reload_model(name)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and "--auth-token" in e.value.details()


def test_a_request_that_resolved_the_old_version_after_it_closed_goes_to_the_new_one(tiny_bundle,
                                                                                     tiny_bundle_v2,
                                                                                     expected):
    from serve.engine.translator import EngineConfig, Translator

    registry = ModelRegistry()
    straggler = registry.add(Translator.from_bundle(tiny_bundle, EngineConfig(device="cpu")))
    old, new = registry.replace(Translator.from_bundle(tiny_bundle_v2, EngineConfig(device="cpu")), idle=0.1)
    assert old is straggler and registry.models == [new]
    deadline = time.monotonic() + 10
    while straggler.scheduler.inner._thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)  # the old version's loop has closed
    assert not straggler.scheduler.inner._thread.is_alive()
    sources = straggler.translator.tokenize(TEXTS[:4])  # same tokenizer in both bundles: handed over
    future, version = straggler.scheduler.submit_on(sources, DecodeOptions(), StopSignal())
    assert [h[0].text for h in future.result(timeout=30)] == expected[1][:4]
    assert version == new.version != straggler.version  # the version that ran it, not the one asked
    registry.close(timeout=10)


def test_sighup_reloads_a_changed_bundle_directory(tiny_bundle, tiny_bundle_v2, tmp_path, expected):
    live = tmp_path / "live"
    shutil.copytree(tiny_bundle, live)
    server = ServerProcess("--model-dir", str(live), "--port", "0", "--metrics-port", "0", "--device", "cpu")
    try:
        port, metrics_port = server.ports()
        client = TranslatorClient(f"127.0.0.1:{port}")
        wait_serving(client)
        assert versions(client) == [read_manifest(tiny_bundle).checksum]
        os.kill(server.proc.pid, signal.SIGHUP)  # unchanged: nothing reloaded
        deadline = time.monotonic() + 30
        while metric(metrics_port, 'nmt_reloads_total{{model="{}",outcome="unchanged"}}'.format(read_manifest(
                tiny_bundle).name)) < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        shutil.rmtree(live)
        shutil.copytree(tiny_bundle_v2, live)
        os.kill(server.proc.pid, signal.SIGHUP)
        new_version = read_manifest(tiny_bundle_v2).checksum
        deadline = time.monotonic() + 60
        while versions(client) != [new_version] and time.monotonic() < deadline:
            assert [r.text for r in client.translate(TEXTS[:3], timeout=30)] in (expected[0][:3],
                                                                                expected[1][:3])
            time.sleep(0.1)
        assert versions(client) == [new_version], server.stderr
        assert [r.text for r in client.translate(TEXTS, timeout=30)] == expected[1]
        assert "reloaded" in server.stderr and server.proc.poll() is None
        client.close()
    finally:
        server.stop()
