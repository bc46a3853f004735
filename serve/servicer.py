"""nmt.v1.Translator over the registry: protobuf messages <-> engine dataclasses, validation, errors.

Requests are parsed here rather than by grpc, so a malformed message is an INVALID_ARGUMENT naming
the problem (grpc's own parser would answer INTERNAL). Every failure goes through serve.errors.status_of.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from nmt.v1 import translator_pb2 as pb
from serve.errors import status_of
from serve.metrics import Metrics
from serve.registry import ModelRegistry, ServedModel
from serve.scheduler import stopped_error
from serve.types import Cancelled, DecodeOptions, Hypothesis, InvalidRequest, StopSignal, TranslationResult

log = logging.getLogger("nmt.serve")

SERVICE = "nmt.v1.Translator"
STREAM_WINDOW = 8  # requests of one stream in flight at once: pipelining without unbounded buffering


@dataclass(frozen=True)
class Limits:
    max_texts: int = 64  # texts per request
    max_chars: int = 2000  # characters per text
    max_message_bytes: int = 4 * 1024 * 1024  # per request and response message


# -- messages <-> dataclasses ---------------------------------------------------------------------
def options_from_proto(o: pb.DecodingOptions) -> DecodeOptions:
    """DecodingOptions -> DecodeOptions; unset fields take DecodeOptions' defaults. InvalidRequest if bad."""
    d = DecodeOptions()
    beam = o.beam_size if o.HasField("beam_size") else d.beam_size
    opts = DecodeOptions(
        beam_size=beam,
        length_penalty=o.length_penalty if o.HasField("length_penalty") else d.length_penalty,
        n_best=o.n_best if o.HasField("n_best") else d.n_best,
        max_length_a=o.max_length_a if o.HasField("max_length_a") else d.max_length_a,
        max_length_b=o.max_length_b if o.HasField("max_length_b") else d.max_length_b,
        min_length=o.min_length if o.HasField("min_length") else d.min_length,
        return_scores=o.return_scores, return_alignments=o.return_alignments)
    errs = opts.errors()
    errs += [f"{name} must be a finite number" for name in ("length_penalty", "max_length_a")
             if not math.isfinite(getattr(opts, name))]
    if errs:
        raise InvalidRequest("invalid options: " + "; ".join(errs))
    return opts


def options_to_proto(o: DecodeOptions) -> pb.DecodingOptions:
    return pb.DecodingOptions(beam_size=o.beam_size, length_penalty=o.length_penalty, n_best=o.n_best,
                              max_length_a=o.max_length_a, max_length_b=o.max_length_b,
                              min_length=o.min_length, return_scores=o.return_scores,
                              return_alignments=o.return_alignments)


def hypothesis_to_proto(h: Hypothesis, options: DecodeOptions) -> pb.Hypothesis:
    msg = pb.Hypothesis(text=h.text, tokens=h.tokens)
    if options.return_scores:
        msg.score, msg.log_prob = h.score, h.log_prob
    if options.return_alignments and h.alignment:
        msg.alignment.extend(h.alignment)
    return msg


def result_from_proto(t: pb.Translation) -> TranslationResult:
    """Translation -> TranslationResult; scores not returned by the server are NaN."""
    hyps = [Hypothesis(text=h.text, tokens=list(h.tokens),
                       score=h.score if h.HasField("score") else math.nan,
                       log_prob=h.log_prob if h.HasField("log_prob") else math.nan,
                       alignment=list(h.alignment) or None) for h in t.hypotheses]
    return TranslationResult(hypotheses=hyps, source_tokens=t.source_tokens)


class Malformed:
    """What the lenient deserializer hands over for bytes that are not a valid message."""

    def __init__(self, error: str):
        self.error = error


def lenient(message_cls: Any):
    def parse(data: bytes) -> Any:
        try:
            return message_cls.FromString(data)
        except (DecodeError, ValueError) as e:
            return Malformed(f"request is not a valid {message_cls.DESCRIPTOR.full_name}: {e}")
    return parse


# -- request checks shared by every front door (gRPC here, HTTP in serve.http_api) -------------------
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
    longest = model.translator.max_source_tokens
    for i, ids in enumerate(sources):
        if len(ids) > longest:
            raise InvalidRequest(f"texts[{i}] is {len(ids)} tokens long (end of sentence included), "
                                 f"model {model.name!r} accepts at most {longest}")
    return sources


# -- the service ------------------------------------------------------------------------------------
class TranslatorServicer:
    def __init__(self, registry: ModelRegistry, limits: Limits, metrics: Metrics):
        self.registry, self.limits, self.metrics = registry, limits, metrics

    def _prepare(self, request: Any) -> tuple[ServedModel, list[list[int]], DecodeOptions]:
        """Validate a request; returns its model, source ids and options. InvalidRequest names the problem."""
        if isinstance(request, Malformed):
            raise InvalidRequest(request.error)
        check_texts(list(request.texts), self.limits)
        options = options_from_proto(request.options)
        model = self.registry.resolve(request.model, request.source_language, request.target_language)
        return model, tokenize_checked(model, list(request.texts)), options

    def _response(self, request: Any, model: ServedModel, sources: list[list[int]], options: DecodeOptions,
                  hyps: list[list[Hypothesis]]) -> pb.TranslateResponse:
        translations = [pb.Translation(text=h[0].text, source_tokens=len(s),
                                       hypotheses=[hypothesis_to_proto(x, options) for x in h])
                        for s, h in zip(sources, hyps)]
        return pb.TranslateResponse(request_id=request.request_id, model=model.name,
                                    translations=translations)

    def _record(self, method: str, request: Any, model: str, code: grpc.StatusCode, started: float,
                error: str = "") -> None:
        seconds = time.monotonic() - started
        self.metrics.request_done(method, model, code.name, seconds)
        rid = "" if isinstance(request, Malformed) else request.request_id
        texts = 0 if isinstance(request, Malformed) else len(request.texts)
        line = "%s id=%r model=%s texts=%d status=%s latency_ms=%.1f%s"
        args = (method, rid, model or "-", texts, code.name, seconds * 1e3,
                f" error={error!r}" if error else "")
        if code in (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED):
            log.debug(line, *args)
        else:
            log.warning(line, *args)

    def Translate(self, request: Any, context: grpc.ServicerContext) -> pb.TranslateResponse:
        """See translator.proto."""
        started, model_name = time.monotonic(), ""
        try:
            model, sources, options = self._prepare(request)
            model_name = model.name
            stop = stop_signal(context)
            hyps = model.scheduler.submit(sources, options, stop).result()
            response = self._response(request, model, sources, options, hyps)
        except Exception as exc:
            code, message = status_of(exc)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("Translate failed")
            self._record("Translate", request, model_name, code, started, message)
            context.abort(code, message)
        self._record("Translate", request, model_name, grpc.StatusCode.OK, started)
        return response

    def TranslateStream(self, requests: Iterator[Any],
                        context: grpc.ServicerContext) -> Iterator[pb.TranslateResponse]:
        """See translator.proto. A reader thread submits requests (at most STREAM_WINDOW ahead, waiting
        for queue room rather than failing), the generator answers them in order."""
        stop = stop_signal(context)
        pending: queue.Queue = queue.Queue(maxsize=STREAM_WINDOW)

        def put(item: Any) -> bool:
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
                    started = time.monotonic()
                    item: tuple  # (request, started, model, sources, options, future or exception)
                    try:
                        model, sources, options = self._prepare(request)
                        future = model.scheduler.submit(sources, options, stop, block=True)
                        item = (request, started, model, sources, options, future)
                    except Exception as exc:
                        item = (request, started, None, None, None, exc)
                    if not put(item):
                        return
            except Exception:  # the stream broke (cancelled, deadline): the generator sees `stop`
                pass
            finally:
                put(None)

        threading.Thread(target=read, name="stream-reader", daemon=True).start()
        while True:
            try:
                item = pending.get(timeout=0.1)
            except queue.Empty:
                if stop.stopped(time.monotonic()):
                    exc = stopped_error(stop, time.monotonic())
                    context.abort(*status_of(exc))
                continue
            if item is None:
                return
            yield self._stream_answer(item, context)

    def _stream_answer(self, item: tuple, context: grpc.ServicerContext) -> pb.TranslateResponse:
        request, started, model, sources, options, outcome = item
        try:
            if isinstance(outcome, Exception):
                raise outcome
            hyps = outcome.result()
            response = self._response(request, model, sources, options, hyps)
        except Exception as exc:
            code, message = status_of(exc)
            self._record("TranslateStream", request, model.name if model else "", code, started, message)
            if isinstance(exc, Cancelled):  # the whole stream's deadline or cancellation
                context.abort(code, message)
            rid = "" if isinstance(request, Malformed) else request.request_id
            return pb.TranslateResponse(request_id=rid, error=pb.Error(code=code.value[0], message=message))
        self._record("TranslateStream", request, model.name, grpc.StatusCode.OK, started)
        return response

    def GetModelInfo(self, request: Any, context: grpc.ServicerContext) -> pb.GetModelInfoResponse:
        """See translator.proto."""
        if isinstance(request, Malformed):
            context.abort(*status_of(InvalidRequest(request.error)))
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
                provider=t.provider, is_default=i == 0))
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
        "GetModelInfo": grpc.unary_unary_rpc_method_handler(
            servicer.GetModelInfo, request_deserializer=lenient(pb.GetModelInfoRequest),
            response_serializer=respond),
    })
