"""nmt.v1.Translator over the registry: request validation, scheduling, responses.

Messages are converted in serve.protocol.convert. Handlers raise plain exceptions; the status
interceptor (serve.server.status) turns them into status codes, so no handler maps errors itself.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc

from nmt.decoding import Cancelled, DecodeOptions, Hypothesis, InvalidRequest, StopSignal, check_sources
from nmt.v1 import translator_pb2 as pb
from serve.protocol.convert import SERVICE, Malformed, hypothesis_to_proto, lenient, options_from_proto
from serve.server.metrics import Metrics
from serve.server.registry import ModelRegistry, ServedModel
from serve.server.status import status_of
from serve.server.text_options import TextPlan, plan_texts

log = logging.getLogger("nmt.serve")

STREAM_WINDOW = 8  # requests of one stream in flight at once: pipelining without unbounded buffering


@dataclass(frozen=True)
class Limits:
    max_texts: int = 64  # texts per request
    max_chars: int = 2000  # characters per text
    max_message_bytes: int = 4 * 1024 * 1024  # per request and response message


@dataclass
class Prepared:
    """A validated request: its model, source ids and options."""

    model: ServedModel
    sources: list[list[int]]
    options: DecodeOptions
    plan: TextPlan  # per-text prefixes and protected spans
    version: str = ""  # the model version that took the texts (set on submission: a reload may intervene)


@dataclass
class StreamItem:
    """One request of a stream, handed from the reader thread to the answering generator."""

    request: pb.TranslateRequest | Malformed
    started: float
    prepared: Prepared | None = None
    future: Future | None = None  # resolves to the hypotheses, when the request was accepted
    error: Exception | None = None  # why it was not


@dataclass
class Call:
    """What the record of one answered request needs beyond its status."""

    method: str
    request: pb.TranslateRequest | Malformed
    started: float = field(default_factory=time.monotonic)
    model: str = ""


# -- request checks shared by every front door (gRPC here, HTTP in serve.server.http_api) ----------
def check_texts(texts: list[str], limits: Limits, name: str = "texts") -> None:
    """Count and length limits of one request's texts; InvalidRequest names the first one broken."""
    n = len(texts)
    if n == 0:
        raise InvalidRequest(f"{name} is empty: send at least one text")
    if n > limits.max_texts:
        raise InvalidRequest(f"too many texts: {n}, at most {limits.max_texts} per request")
    for i, text in enumerate(texts):
        if len(text) > limits.max_chars:
            raise InvalidRequest(f"{name}[{i}] is {len(text)} characters long, at most {limits.max_chars}")


def tokenize_checked(model: ServedModel, texts: list[str]) -> list[list[int]]:
    """Source ids of each text for `model`; InvalidRequest for one longer than the model accepts."""
    sources = model.translator.tokenize(texts)
    check_sources(sources, model.translator.max_source_tokens, name="texts[{}]".format, model=model.name)
    return sources


# -- the service ------------------------------------------------------------------------------------
class TranslatorServicer:
    def __init__(self, registry: ModelRegistry, limits: Limits, metrics: Metrics):
        self.registry, self.limits, self.metrics = registry, limits, metrics

    def _prepare(self, request: pb.TranslateRequest | Malformed) -> Prepared:
        """Validate a request. InvalidRequest names the problem."""
        if isinstance(request, Malformed):
            raise InvalidRequest(request.error)
        check_texts(list(request.texts), self.limits)
        options = options_from_proto(request.options)
        model = self.registry.resolve(request.model, request.source_language, request.target_language)
        plan = plan_texts(model.translator, list(request.texts), request.text_options, request.keep_terms)
        sources = tokenize_checked(model, plan.texts)
        plan.check(model.translator, sources, options)
        return Prepared(model, sources, options, plan)

    def _response(self, request: pb.TranslateRequest, p: Prepared,
                  hyps: list[list[Hypothesis]]) -> pb.TranslateResponse:
        hyps = [p.plan.restore(i, h) for i, h in enumerate(hyps)]
        translations = [pb.Translation(text=h[0].text, source_tokens=len(s),
                                       hypotheses=[hypothesis_to_proto(x, p.options) for x in h])
                        for s, h in zip(p.sources, hyps)]
        return pb.TranslateResponse(request_id=request.request_id, model=p.model.name,
                                    translations=translations, model_version=p.version)

    @contextmanager
    def _recorded(self, call: Call) -> Iterator[Call]:
        """Record the request's outcome (metrics and a log line); exceptions pass on unchanged."""
        try:
            yield call
        except Exception as exc:
            self._record(call, *status_of(exc))
            raise
        self._record(call, grpc.StatusCode.OK)

    def _record(self, call: Call, code: grpc.StatusCode, error: str = "") -> None:
        seconds = time.monotonic() - call.started
        self.metrics.request_done(call.method, call.model, code.name, seconds)
        req = call.request
        rid, texts = ("", 0) if isinstance(req, Malformed) else (req.request_id, len(req.texts))
        line = "%s id=%r model=%s texts=%d status=%s latency_ms=%.1f%s"
        args = (call.method, rid, call.model or "-", texts, code.name, seconds * 1e3,
                f" error={error!r}" if error else "")
        if code in (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED):
            log.debug(line, *args)
        else:
            log.warning(line, *args)

    def Translate(self, request: pb.TranslateRequest | Malformed,
                  context: grpc.ServicerContext) -> pb.TranslateResponse:
        """See translator.proto."""
        with self._recorded(Call("Translate", request)) as call:
            p = self._prepare(request)
            call.model = p.model.name
            future, p.version = p.model.scheduler.submit_on(p.sources, p.plan.engine_options(p.options),
                                                            stop_signal(context), prefixes=p.plan.prefixes)
            hyps = future.result()
            assert not isinstance(request, Malformed)  # _prepare refused it
            return self._response(request, p, hyps)

    def TranslateStream(self, requests: Iterator[pb.TranslateRequest | Malformed],
                        context: grpc.ServicerContext) -> Iterator[pb.TranslateResponse]:
        """See translator.proto. A reader thread submits requests (at most STREAM_WINDOW ahead, waiting
        for queue room rather than failing), the generator answers them in order."""
        stop = stop_signal(context)
        pending: queue.Queue[StreamItem | None] = queue.Queue(maxsize=STREAM_WINDOW)

        def put(item: StreamItem | None) -> bool:
            while not stop.event.is_set():
                try:
                    pending.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def read() -> None:
            try:
                for request in requests:
                    item = StreamItem(request, time.monotonic())
                    try:
                        item.prepared = p = self._prepare(request)
                        item.future, p.version = p.model.scheduler.submit_on(
                            p.sources, p.plan.engine_options(p.options), stop, block=True,
                            prefixes=p.plan.prefixes)
                    except Exception as exc:
                        item.error = exc
                    if not put(item):
                        return
            except Exception:  # the stream broke (cancelled, deadline): the generator sees `stop`
                pass
            finally:
                put(None)

        threading.Thread(target=read, name="stream-reader", daemon=True).start()
        while True:
            try:
                next_item = pending.get(timeout=0.1)
            except queue.Empty:
                if stop.stopped(time.monotonic()):
                    raise stop.error(time.monotonic()) from None
                continue
            if next_item is None:
                return
            yield self._stream_answer(next_item)

    def _stream_answer(self, item: StreamItem) -> pb.TranslateResponse:
        """A stream item's response; a failed item is answered in-band, with its status in `error`."""
        p = item.prepared
        call = Call("TranslateStream", item.request, item.started, p.model.name if p else "")
        try:
            with self._recorded(call):
                if item.error is not None:
                    raise item.error
                assert p is not None and item.future is not None
                assert not isinstance(item.request, Malformed)
                return self._response(item.request, p, item.future.result())
        except Cancelled:  # the whole stream's deadline or cancellation ends the RPC
            raise
        except Exception as exc:
            code, message = status_of(exc)
            rid = "" if isinstance(item.request, Malformed) else item.request.request_id
            return pb.TranslateResponse(request_id=rid, error=pb.Error(code=code.value[0], message=message))

    def TranslateIncremental(self, request: pb.TranslateIncrementalRequest | Malformed,
                             context: grpc.ServicerContext) -> Iterator[pb.TranslateIncrementalResponse]:
        """See translator.proto and serve.server.incremental."""
        from serve.server.incremental import translate_incremental

        yield from translate_incremental(self, request, context)

    def GetModelInfo(self, request: pb.GetModelInfoRequest | Malformed,
                     context: grpc.ServicerContext) -> pb.GetModelInfoResponse:
        """See translator.proto."""
        if isinstance(request, Malformed):
            raise InvalidRequest(request.error)
        response = pb.GetModelInfoResponse(limits=pb.Limits(
            max_texts=self.limits.max_texts, max_chars=self.limits.max_chars,
            max_message_bytes=self.limits.max_message_bytes))
        seen = set()
        for i, served in enumerate(self.registry.models):
            t, m = served.translator, served.translator.manifest
            response.models.append(pb.ModelInfo(
                name=t.name, source_language=t.src_lang, target_language=t.tgt_lang, d_model=m.d_model,
                n_heads=m.n_heads, n_encoder_layers=m.n_encoder_layers, n_decoder_layers=m.n_decoder_layers,
                vocab_size=m.vocab_size, max_source_tokens=t.max_source_tokens, dtype=m.dtype,
                provider=t.provider, is_default=i == 0, version=served.version))
            if (t.src_lang, t.tgt_lang) not in seen:
                seen.add((t.src_lang, t.tgt_lang))
                response.language_pairs.append(pb.LanguagePair(source_language=t.src_lang,
                                                               target_language=t.tgt_lang, model=t.name))
        return response


def stop_signal(context: grpc.ServicerContext) -> StopSignal:
    """A StopSignal set when the RPC ends (cancelled, deadline, finished) and carrying its deadline."""
    remaining = context.time_remaining()
    stop = StopSignal(deadline=None if remaining is None else time.monotonic() + remaining)
    if not context.add_callback(stop.set):  # the RPC has already ended
        stop.set()
    return stop


def generic_handler(servicer: TranslatorServicer) -> grpc.GenericRpcHandler:
    """The service's handlers with lenient request parsing (see the module docstring)."""
    def respond(msg: Any) -> bytes:
        return msg.SerializeToString()

    return grpc.method_handlers_generic_handler(SERVICE, {
        "Translate": grpc.unary_unary_rpc_method_handler(
            servicer.Translate, request_deserializer=lenient(pb.TranslateRequest),
            response_serializer=respond),
        "TranslateStream": grpc.stream_stream_rpc_method_handler(
            servicer.TranslateStream, request_deserializer=lenient(pb.TranslateRequest),
            response_serializer=respond),
        "TranslateIncremental": grpc.unary_stream_rpc_method_handler(
            servicer.TranslateIncremental, request_deserializer=lenient(pb.TranslateIncrementalRequest),
            response_serializer=respond),
        "GetModelInfo": grpc.unary_unary_rpc_method_handler(
            servicer.GetModelInfo, request_deserializer=lenient(pb.GetModelInfoRequest),
            response_serializer=respond),
    })
