"""Faults and hostile input beyond the service and process tests: every way a client can walk away stops
decoding within one step; a bundle that loads wrong leaves nothing listening; `nmt export` on a full disk
leaves nothing behind; the bearer token guards every RPC but health; no request reaches the filesystem."""

from __future__ import annotations

import json
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from conftest import read_lines
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import serve.server.servicer
from nmt.v1 import translator_pb2 as pb
from serve.server.registry import ModelRegistry
from serve.server.server import ServerConfig, create_server

REPO = Path(__file__).resolve().parents[2]
NMT = [sys.executable, "-m", "nmt"]
TEXTS = read_lines("test_2016_flickr", "en", 8)
# min_length keeps EOS away: left alone this decodes max_positions - 1 steps.
LONG = pb.TranslateRequest(texts=TEXTS, options=pb.DecodingOptions(beam_size=4, min_length=500,
                                                                   max_length_a=10, max_length_b=500))


@pytest.fixture(scope="module")
def translator(tiny_bundle):
    from serve.engine.translator import EngineConfig, Translator

    return Translator.from_bundle(tiny_bundle, EngineConfig(device="cpu"))


@pytest.fixture(scope="module")
def server(translator):
    registry = ModelRegistry()
    srv, port = create_server(registry, ServerConfig())
    registry.add(translator)
    srv.set_serving()
    yield srv, port
    srv.drain(grace=0)


class StepEvent(threading.Event):
    """A request's stop event that notes the engine's step counter when the server learns the RPC ended."""

    def __init__(self, translator):
        super().__init__()
        self.translator, self.steps_at_set = translator, None

    def set(self) -> None:
        if self.steps_at_set is None:
            self.steps_at_set = self.translator.steps
        super().set()


def wait_until(condition, timeout: float = 30) -> bool:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(0.002)
    return True


@pytest.mark.parametrize("how", ["future.cancel", "channel.close", "stream.cancel"])
def test_a_client_walking_away_stops_decoding_within_one_step(server, translator, monkeypatch, how):
    _, port = server
    events: list[StepEvent] = []
    real = serve.server.servicer.stop_signal

    def recording(context):
        stop = real(context)
        stop.event = StepEvent(translator)
        events.append(stop.event)
        return stop

    monkeypatch.setattr(serve.server.servicer, "stop_signal", recording)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    before = translator.steps
    if how == "stream.cancel":
        call = channel.stream_stream("/nmt.v1.Translator/TranslateStream",
                                     request_serializer=pb.TranslateRequest.SerializeToString,
                                     response_deserializer=pb.TranslateResponse.FromString)(iter([LONG]))
    else:
        call = channel.unary_unary("/nmt.v1.Translator/Translate",
                                   request_serializer=pb.TranslateRequest.SerializeToString,
                                   response_deserializer=pb.TranslateResponse.FromString).future(LONG)
    assert wait_until(lambda: translator.steps >= before + 3)  # decoding is under way
    call.cancel() if how != "channel.close" else channel.close()
    assert wait_until(lambda: events and events[0].is_set())  # the server noticed
    settled = -1
    while settled != translator.steps:  # until no step ran for 0.3 s
        settled = translator.steps
        time.sleep(0.3)
    stopped_at = events[0].steps_at_set
    assert translator.steps - stopped_at <= 1  # at most the step already running
    assert translator.steps - before < translator.max_source_tokens - 1  # well before the natural end
    channel.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mismatched_copy(bundle: Path, to: Path) -> Path:
    """A bundle whose files pass their checksums but whose manifest describes another model."""
    shutil.copytree(bundle, to)
    manifest = json.loads((to / "manifest.json").read_text())
    manifest["name"] = "en-de-mismatched"
    manifest["model"]["n_decoder_layers"] += 1
    (to / "manifest.json").write_text(json.dumps(manifest))
    return to


@pytest.mark.parametrize("good_first", [False, True], ids=["alone", "after-a-good-bundle"])
def test_a_bundle_that_fails_to_load_leaves_nothing_listening(tiny_bundle, tmp_path, good_first):
    bad = mismatched_copy(tiny_bundle, tmp_path / "bad")
    dirs = [tiny_bundle, bad] if good_first else [bad]
    port = free_port()
    cmd = [*NMT, "serve", "--port", str(port), "--log-level", "error"]
    out = subprocess.run(cmd + [a for d in dirs for a in ("--model-dir", str(d))], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert out.stderr.splitlines()[-1].startswith(f"nmt serve: cannot load {bad}: "), out.stderr
    assert "graph lacks inputs" in out.stderr and "Traceback" not in out.stderr
    with socket.socket() as s:  # nothing listens any more, not even the models that did load
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_export_on_a_full_disk_is_one_line_and_leaves_nothing(tiny_checkpoint, tmp_path):
    """RLIMIT_FSIZE stands in for a full disk: every write past 200 KB fails with EFBIG."""
    def small_disk() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = subprocess.run([*NMT, "export", str(tiny_checkpoint), "--out", str(out_dir / "bundle")], cwd=REPO,
                          capture_output=True, text=True, timeout=300, preexec_fn=small_disk)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nmt export: ") and "File too large" in lines[0], lines
    assert list(out_dir.iterdir()) == []  # no bundle, no temporary directory


@pytest.fixture(scope="module")
def guarded(translator):
    registry = ModelRegistry()
    srv, port = create_server(registry, ServerConfig(auth_token="s3cret"))
    registry.add(translator)
    srv.set_serving()
    yield port
    srv.drain(grace=0)


def raw_rpc(channel: grpc.Channel, path: str, streaming: bool, metadata: list) -> grpc.StatusCode:
    """Call any method with garbage bytes: the token must be checked before the request is parsed."""
    try:
        if streaming:
            list(channel.stream_stream(path)(iter([b"\xff\xfe"]), timeout=10, metadata=metadata))
        else:
            channel.unary_unary(path)(b"\xff\xfe", timeout=10, metadata=metadata)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def test_token_guards_every_rpc_the_server_offers_but_health(guarded):
    good = [("authorization", "Bearer s3cret")]
    with grpc.insecure_channel(f"127.0.0.1:{guarded}") as channel:
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        listing = reflection_pb2.ServerReflectionRequest(list_services="")
        with pytest.raises(grpc.RpcError) as e:  # reflection is an RPC like any other
            list(reflect.ServerReflectionInfo(iter([listing]), timeout=10))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        answer = list(reflect.ServerReflectionInfo(iter([listing]), timeout=10, metadata=good))
        services = {s.name for s in answer[0].list_services_response.service}
        assert services == {"nmt.v1.Translator", "grpc.health.v1.Health",
                            "grpc.reflection.v1alpha.ServerReflection"}
        methods = [(f"/{m.full_name.rsplit('.', 1)[0]}/{m.name}", m.client_streaming or m.server_streaming)
                   for name in services - {"grpc.health.v1.Health"}
                   for m in descriptor_of(name).methods]
        assert len(methods) == 6  # the five nmt.v1 methods and reflection
        for metadata in ([], [("authorization", "Bearer wrong")], [("authorization", "bearer s3cret")],
                         [("authorization", "s3cret")], [("authorization", "Bearer s3cret ")]):
            for path, streaming in methods:
                assert raw_rpc(channel, path, streaming, metadata) == grpc.StatusCode.UNAUTHENTICATED, path
        translate = "/nmt.v1.Translator/Translate"
        assert raw_rpc(channel, translate, False, good) == grpc.StatusCode.INVALID_ARGUMENT
        health = health_pb2_grpc.HealthStub(channel)  # probes need no token, for Check and Watch alike
        serving = health_pb2.HealthCheckResponse.SERVING
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == serving
        watch = health.Watch(health_pb2.HealthCheckRequest(service="nmt.v1.Translator"), timeout=10)
        assert next(watch).status == serving
        watch.cancel()


def descriptor_of(service: str):
    from google.protobuf import descriptor_pool

    if service == "nmt.v1.Translator":
        return pb.DESCRIPTOR.services_by_name["Translator"]
    return descriptor_pool.Default().FindServiceByName(service)


class FileWatch:
    """Python-level file opens and directory listings of this process, via an audit hook."""

    def __init__(self):
        self.recording, self.seen = False, []
        sys.addaudithook(self._hook)

    def _hook(self, event: str, args: tuple) -> None:
        if self.recording and event in ("open", "os.listdir", "os.scandir", "os.chdir"):
            self.seen.append(str(args[0]))


def test_no_request_reaches_the_filesystem(server, tiny_bundle):
    _, port = server
    names = ["../../etc/passwd", "/etc/passwd", str(tiny_bundle), str(tiny_bundle / "manifest.json"),
             "file:///etc/passwd", "en-de/../../etc", "~root", "\x00en-de", "%2e%2e%2fetc"]
    requests = [pb.TranslateRequest(texts=["A dog."], **{field: name})
                for name in names for field in ("model", "source_language", "target_language")]
    watch = FileWatch()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary("/nmt.v1.Translator/Translate",
                                   request_serializer=pb.TranslateRequest.SerializeToString)

        def codes() -> list[grpc.StatusCode]:
            out = []
            for request in requests:
                with pytest.raises(grpc.RpcError) as e:
                    call(request, timeout=10)
                out.append(e.value.code())
            return out

        assert set(codes()) <= {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}  # warms up too
        watch.recording = True
        assert set(codes()) <= {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}
        served = watch.seen[:]
        (tiny_bundle / "manifest.json").read_bytes()  # the watch does see an open
        watch.recording = False
    assert served == [] and watch.seen == [str(tiny_bundle / "manifest.json")]


def test_garbage_bytes_to_model_info_are_invalid_argument(server):
    _, port = server
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        with pytest.raises(grpc.RpcError) as e:
            channel.unary_unary("/nmt.v1.Translator/GetModelInfo")(b"\xff\xff\xff", timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


class RunsCodeWhenUnpickled:
    """A pickle payload: unpickling it would create `marker` (any code could run the same way)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_checkpoint_that_would_run_code_is_refused_unrun(tiny_checkpoint, tmp_path, capsys):
    import torch

    from export import cli as export_cli
    from nmt.cli import run_command
    from train.checkpoint import load_checkpoint

    ckpt = load_checkpoint(tiny_checkpoint)
    marker = tmp_path / "pwned"
    ckpt["meta"] = {"note": RunsCodeWhenUnpickled(marker)}
    evil = tmp_path / "evil.pt"
    torch.save(ckpt, evil)
    rc = run_command("export", export_cli.main, [str(evil), "--out", str(tmp_path / "bundle")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "not a readable checkpoint" in err[0], err
    assert not marker.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["evil.pt"]
