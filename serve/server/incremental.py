"""nmt.v1.Translator/TranslateIncremental: one text's growing translation, streamed as it is decoded.

The request is checked as the equivalent one-text TranslateRequest (same limits, options, routing and
messages). A `PieceStream` (serve.engine.streaming) listens to the text's decoder steps in the
continuous loop; this generator forwards its updates (protected spans placed by alignment in the stream's own
rendering, or placeholders put back word by word),
then answers the finished translation, marked final. The static scheduler never calls the listener:
there the stream is the final response alone. The RPC's end (cancelled, deadline) sets the request's
stop signal, which drops its row at the loop's next step boundary.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import TYPE_CHECKING

import grpc

from nmt.decoding import InvalidRequest, StopSignal
from nmt.v1 import translator_pb2 as pb
from serve.engine.streaming import PieceStream, Update
from serve.protocol.convert import Malformed
from serve.server.status import status_of

if TYPE_CHECKING:
    from serve.server.servicer import Call, TranslatorServicer

POLL_SECONDS = 0.05  # how often the generator looks at the request's future between updates


def as_translate_request(r: pb.TranslateIncrementalRequest) -> pb.TranslateRequest:
    """The one-text TranslateRequest that asks for the same translation."""
    return pb.TranslateRequest(request_id=r.request_id, texts=[r.text], options=r.options, model=r.model,
                               source_language=r.source_language, target_language=r.target_language,
                               text_options=[r.text_options] if r.HasField("text_options") else [],
                               keep_terms=r.keep_terms)


def translate_incremental(servicer: TranslatorServicer, request: pb.TranslateIncrementalRequest | Malformed,
                          context: grpc.ServicerContext) -> Iterator[pb.TranslateIncrementalResponse]:
    from serve.server.servicer import Call, stop_signal

    if isinstance(request, Malformed):
        raise InvalidRequest(request.error)
    single = as_translate_request(request)
    call = Call("TranslateIncremental", single)
    recorded = threading.Event()

    def record(code: grpc.StatusCode, error: str = "") -> None:
        if not recorded.is_set():  # once: by the generator, or by the future of a call that ended early
            recorded.set()
            servicer._record(call, code, error)

    try:
        yield from _stream(servicer, request, single, call, stop_signal(context), record)
    except Exception as exc:
        record(*status_of(exc))
        raise
    record(grpc.StatusCode.OK)


def _stream(servicer: TranslatorServicer, request: pb.TranslateIncrementalRequest,
            single: pb.TranslateRequest, call: Call, stop: StopSignal,
            record: Callable[..., None]) -> Iterator[pb.TranslateIncrementalResponse]:
    interval = request.interval if request.HasField("interval") else 1
    if interval < 1:
        raise InvalidRequest(f"interval must be >= 1 decoder step, got {interval}")
    p = servicer._prepare(single)
    call.model = p.model.name
    aligned = p.plan.aligned[0]
    pieces = PieceStream(p.model.translator.tokenizer, interval, beam=p.options.beam_size > 1,
                         render=aligned.render if aligned is not None else None)
    restorer = p.plan.restorer(0)  # placeholders put back piece by piece (none when placed by alignment)
    future, p.version = p.model.scheduler.submit_on(p.sources, p.plan.engine_options(p.options), stop,
                                                    prefixes=p.plan.prefixes, listener=pieces)
    # A cancelled call is not resumed by grpc: its outcome is recorded when the loop drops the text.
    def ended(f: Future) -> None:
        exc = f.exception()
        if exc is not None:
            record(*status_of(exc))

    future.add_done_callback(ended)

    def answer(u: Update) -> pb.TranslateIncrementalResponse:
        # The partial text is restored on its own: it may be revised, the pieces may not.
        partial = p.plan.restorer(0).restore(u.partial) if p.plan.masked[0].originals else u.partial
        return pb.TranslateIncrementalResponse(
            request_id=request.request_id, piece=restorer.feed(u.piece, final=u.final), partial=partial,
            step=u.step, final=u.final, model=p.model.name, model_version=p.version)

    step = 0
    while True:
        finished = future.done()  # read first: the loop puts a text's updates before finishing it
        try:
            update = pieces.updates.get(timeout=0 if finished else POLL_SECONDS)
        except queue.Empty:
            if finished:
                break
            continue
        step = update.step
        yield answer(update)
    hyps = future.result()  # raises the request's Cancelled / DeadlineExceeded / failure
    best = hyps[0][0]
    last = answer(pieces.finish(p.plan.streamed(0, best), max(step, len(best.tokens))))
    last.translation.CopyFrom(servicer._response(single, p, hyps).translations[0])
    yield last
