"""Client of the translation server: the reusable `TranslatorClient` and the `nmt translate` command.

    with TranslatorClient("localhost:50051", auth_token=None, tls_ca=None) as client:
        results = client.translate(["A man is riding a bike."], DecodeOptions(beam_size=4), timeout=10)
        print(results[0].text)

Results are the engine's own dataclasses (nmt.decoding.TranslationResult), so code works the same
against a server or an in-process Translator. Failures raise serve.protocol.errors.TranslatorError, a
grpc.RpcError whose code() keeps the status (e.retryable for UNAVAILABLE / RESOURCE_EXHAUSTED).

    nmt translate "A man is riding a bike." --server localhost:50051 [--beam-size 4] [--n-best 2 --scores]
    nmt translate "A man is riding a bike." --stream               # pieces printed as they are decoded
    nmt translate "Tom rides to Berlin." --keep Tom --keep Berlin --target-prefix "Ein Mann"
    cat input.en | nmt translate --server localhost:50051 > output.de
    nmt translate --split-sentences "A man rides.  A dog runs." --server localhost:50051  # one line out
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from nmt.decoding import DecodeOptions, TranslationResult
from nmt.errors import UserError
from nmt.sentences import SplitTexts
from nmt.v1 import translator_pb2 as pb
from nmt.v1 import translator_pb2_grpc
from serve.protocol.convert import options_to_proto, result_from_proto
from serve.protocol.errors import TranslatorError

MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # the server's limit is what counts; do not be the smaller side
RETRY_ATTEMPTS = 4  # attempts per call (first one included) for UNAVAILABLE; 1 turns retries off


def retry_service_config(attempts: int) -> str:
    """gRPC service config: calls failing with UNAVAILABLE (nothing was translated: a server or balancer
    that is stopping, restarting or has no server left) are sent again after a jittered backoff,
    at most `attempts` times in all. The deadline covers every attempt; other codes are not retried."""
    policy = {"maxAttempts": attempts, "initialBackoff": "0.2s", "maxBackoff": "2s", "backoffMultiplier": 2,
              "retryableStatusCodes": ["UNAVAILABLE"]}
    return json.dumps({"methodConfig": [{"name": [{"service": "nmt.v1.Translator"}], "retryPolicy": policy}]})


@dataclass
class StreamResult:
    """One answer of translate_stream: results, or the error of that request alone."""

    request_id: str
    results: list[TranslationResult] | None
    error: TranslatorError | None = None


class TranslatorClient:
    """A channel to one server. Thread-safe: share one client between threads."""

    def __init__(self, target: str, auth_token: str | None = None, tls_ca: str | Path | bytes | None = None,
                 tls: bool = False, retry_attempts: int = RETRY_ATTEMPTS, user_agent: str | None = None):
        """target "host:port"; tls_ca: PEM root certificate (path or bytes) that signed the server's
        certificate, implies TLS; tls=True uses the system roots; retry_attempts: see RETRY_ATTEMPTS."""
        options: list[tuple[str, str | int]] = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
        if retry_attempts > 1:
            options += [("grpc.enable_retries", 1),
                        ("grpc.service_config", retry_service_config(retry_attempts))]
        if user_agent:
            options.append(("grpc.primary_user_agent", user_agent))
        if tls_ca is not None or tls:
            root = tls_ca if isinstance(tls_ca, bytes) or tls_ca is None else Path(tls_ca).read_bytes()
            creds = grpc.ssl_channel_credentials(root_certificates=root)
            self.channel = grpc.secure_channel(target, creds, options)
        else:
            self.channel = grpc.insecure_channel(target, options)
        self.target = target
        self.metadata = [("authorization", f"Bearer {auth_token}")] if auth_token else []
        self.stub = translator_pb2_grpc.TranslatorStub(self.channel)

    def _request(self, texts: list[str], options: DecodeOptions | None, model: str, source_language: str,
                 target_language: str, request_id: str, text_options: Sequence[pb.TextOptions] = (),
                 keep_terms: Sequence[str] = ()) -> pb.TranslateRequest:
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings, not one string")
        return pb.TranslateRequest(request_id=request_id, texts=texts, model=model,
                                   source_language=source_language, target_language=target_language,
                                   options=options_to_proto(options or DecodeOptions()),
                                   text_options=text_options, keep_terms=keep_terms)

    def translate(self, texts: list[str], options: DecodeOptions | None = None,
                  timeout: float | None = None, *, model: str = "", source_language: str = "",
                  target_language: str = "", request_id: str = "",
                  text_options: Sequence[pb.TextOptions] = (), keep_terms: Sequence[str] = ()
                  ) -> list[TranslationResult]:
        """One result per text, in order; text_options: none or one per text (target prefix, protected
        spans), keep_terms: terms kept verbatim in every text. Raises TranslatorError."""
        request = self._request(texts, options, model, source_language, target_language, request_id,
                                text_options, keep_terms)
        try:
            response = self.stub.Translate(request, timeout=timeout, metadata=self.metadata)
        except grpc.RpcError as e:
            raise TranslatorError.from_rpc_error(e) from None
        return [result_from_proto(t) for t in response.translations]

    def translate_stream(self, batches: Iterable[tuple[str, list[str]]], options: DecodeOptions | None = None,
                         timeout: float | None = None, *, model: str = "", source_language: str = "",
                         target_language: str = "", each_text: pb.TextOptions | None = None,
                         keep_terms: Sequence[str] = ()) -> Iterator[StreamResult]:
        """(request_id, texts) pairs over one stream; answers come in the same order. A request that fails
        alone yields a StreamResult with `error`; a failure of the stream raises TranslatorError.
        `each_text`: TextOptions applied to every text."""
        requests = (self._request(texts, options, model, source_language, target_language, rid,
                                  [each_text] * len(texts) if each_text is not None else (), keep_terms)
                    for rid, texts in batches)
        try:
            for response in self.stub.TranslateStream(requests, timeout=timeout, metadata=self.metadata):
                if response.HasField("error"):
                    from serve.protocol.errors import code_from_number

                    err = TranslatorError(code_from_number(response.error.code), response.error.message)
                    yield StreamResult(response.request_id, None, err)
                else:
                    results = [result_from_proto(t) for t in response.translations]
                    yield StreamResult(response.request_id, results)
        except grpc.RpcError as e:
            raise TranslatorError.from_rpc_error(e) from None

    def translate_incremental(self, text: str, options: DecodeOptions | None = None,
                              timeout: float | None = None, *, model: str = "", source_language: str = "",
                              target_language: str = "", request_id: str = "",
                              text_options: pb.TextOptions | None = None, keep_terms: Sequence[str] = (),
                              interval: int | None = None) -> Iterator[pb.TranslateIncrementalResponse]:
        """One text's translation as it is decoded: the responses' pieces concatenate to the final text
        (the last response, `final`, carries the whole translation). Closing the iterator early cancels
        the call, which stops the decoding. Raises TranslatorError."""
        request = pb.TranslateIncrementalRequest(
            request_id=request_id, text=text, options=options_to_proto(options or DecodeOptions()),
            model=model, source_language=source_language, target_language=target_language,
            text_options=text_options, keep_terms=keep_terms, interval=interval)
        call = self.stub.TranslateIncremental(request, timeout=timeout, metadata=self.metadata)
        try:
            yield from call
        except grpc.RpcError as e:
            raise TranslatorError.from_rpc_error(e) from None
        finally:
            call.cancel()  # no-op once the call is over; stops the server's decoding otherwise

    def model_info(self, timeout: float | None = None) -> pb.GetModelInfoResponse:
        """Models, language pairs and limits of the server."""
        try:
            return self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=timeout, metadata=self.metadata)
        except grpc.RpcError as e:
            raise TranslatorError.from_rpc_error(e) from None

    def reload_model(self, name: str, path: str = "",
                     timeout: float | None = 300.0) -> pb.ReloadModelResponse:
        """Admin: load a new version of model `name` (from `path` on the server, default: its directory)."""
        try:
            return self.stub.ReloadModel(pb.ReloadModelRequest(name=name, path=path), timeout=timeout,
                                         metadata=self.metadata)
        except grpc.RpcError as e:
            raise TranslatorError.from_rpc_error(e) from None

    def health(self, service: str = "", timeout: float | None = 5.0) -> str:
        """The grpc.health.v1 status name, e.g. "SERVING" or "NOT_SERVING". Raises TranslatorError."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self.channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as e:
            raise TranslatorError.from_rpc_error(e) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def wait_ready(self, timeout: float) -> None:
        """Block until the channel connects (TranslatorError UNAVAILABLE after `timeout` seconds)."""
        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise TranslatorError(grpc.StatusCode.UNAVAILABLE, f"no server at {self.target}") from None

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> TranslatorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- nmt translate --------------------------------------------------------------------------------
def add_connection_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", default="localhost:50051", help="HOST:PORT of the server")
    p.add_argument("--tls-ca", type=Path,
                   help="PEM root certificate of the server's certificate (enables TLS)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per call")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="nmt translate", description="Translate texts through a running server "
                                "(one per argument, or one per line of stdin).")
    p.add_argument("texts", nargs="*", help="texts to translate; none: read lines from stdin")
    add_connection_flags(p)
    p.add_argument("--auth-token", default=os.environ.get("NMT_AUTH_TOKEN"),
                   help="bearer token (default: $NMT_AUTH_TOKEN)")
    p.add_argument("--model", default="",
                   help="model name (default: by language pair, else the default model)")
    p.add_argument("--source-language", default="")
    p.add_argument("--target-language", default="")
    p.add_argument("--beam-size", type=int, default=1)
    p.add_argument("--n-best", type=int, default=1, help="hypotheses per text (printed tab-separated)")
    p.add_argument("--length-penalty", type=float, default=DecodeOptions.length_penalty)
    p.add_argument("--max-length-a", type=float, default=DecodeOptions.max_length_a)
    p.add_argument("--max-length-b", type=int, default=DecodeOptions.max_length_b)
    p.add_argument("--min-length", type=int, default=0)
    p.add_argument("--scores", action="store_true", help="print INDEX<TAB>SCORE<TAB>TEXT per hypothesis")
    p.add_argument("--chunk", type=int, default=32, help="texts per request when reading stdin")
    p.add_argument("--split-sentences", action="store_true",
                   help="cut each text into sentences (in --source-language, else the model's source "
                        "language), translate them as rows and rejoin them with the original whitespace")
    p.add_argument("--stream", action="store_true",
                   help="print each translation as it is decoded (one text per call)")
    p.add_argument("--interval", type=int, default=None,
                   help="with --stream and beam search: decoder steps between updates (server default 1)")
    p.add_argument("--target-prefix", default="",
                   help="every translation starts with this target text (decoding continues after it)")
    p.add_argument("--keep", action="append", default=[], metavar="TERM",
                   help="a term kept verbatim in the translation (do not translate); repeatable")
    return p.parse_args(argv)


def print_results(results: list[TranslationResult], first_index: int, scores: bool, n_best: int) -> None:
    for i, result in enumerate(results, first_index):
        if not scores and n_best == 1:
            print(result.text)
            continue
        for h in result.hypotheses:
            print(f"{i}\t{h.score:.4f}\t{h.text}" if scores else f"{i}\t{h.text}")
    sys.stdout.flush()


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    options = DecodeOptions(beam_size=args.beam_size, n_best=args.n_best, length_penalty=args.length_penalty,
                            max_length_a=args.max_length_a, max_length_b=args.max_length_b,
                            min_length=args.min_length, return_scores=args.scores)
    errs = options.errors() + ([] if args.chunk > 0 else ["--chunk must be positive"])
    errs += [] if args.interval is None or args.interval >= 1 else ["--interval must be >= 1"]
    if errs:
        raise UserError("; ".join(errs))
    route = dict(model=args.model, source_language=args.source_language, target_language=args.target_language)
    each = pb.TextOptions(target_prefix=args.target_prefix) if args.target_prefix else None
    try:
        with TranslatorClient(args.server, auth_token=args.auth_token, tls_ca=args.tls_ca) as client:
            lang = split_language(client, args) if args.split_sentences else None
            if args.stream:
                texts = args.texts or (line.rstrip("\n") for line in sys.stdin)
                for text in texts:
                    print_incremental(client.translate_incremental(
                        text, options, args.timeout, text_options=each, keep_terms=args.keep,
                        interval=args.interval, **route))
                return 0
            if args.texts:
                split = SplitTexts(args.texts, lang) if lang is not None else None
                rows = split.sentences if split is not None else args.texts
                per_text = [each] * len(rows) if each is not None else []
                results = client.translate(rows, options, args.timeout, text_options=per_text,
                                           keep_terms=args.keep, **route) if rows else []
                if split is not None:
                    results = split.join(results, options.length_penalty)
                print_results(results, 0, args.scores, args.n_best)
                return 0
            lines = (line.rstrip("\n") for line in sys.stdin)
            chunks = (chunk for chunk in _chunks(lines, args.chunk))
            index = 0
            # Split chunks in input order; one whose lines hold no sentence is printed without a request.
            splits: deque[tuple[str, SplitTexts]] = deque()

            def requests() -> Iterator[tuple[str, list[str]]]:
                for i, chunk in enumerate(chunks):
                    if lang is None:
                        yield str(i), chunk
                        continue
                    splits.append((str(i), SplitTexts(chunk, lang)))
                    if splits[-1][1].sentences:
                        yield str(i), splits[-1][1].sentences

            def flush_rowless(until: str | None) -> int:
                printed = 0
                while splits and splits[0][0] != until:
                    results = splits.popleft()[1].join([], options.length_penalty)
                    print_results(results, index + printed, args.scores, args.n_best)
                    printed += len(results)
                return printed

            # A stream keeps the server's batches full while we print; the deadline covers the whole input.
            for answer in client.translate_stream(requests(), options, each_text=each, keep_terms=args.keep,
                                                  **route):
                if answer.error is not None:
                    raise answer.error
                results = answer.results or []
                if lang is not None:
                    index += flush_rowless(answer.request_id)
                    results = splits.popleft()[1].join(results, options.length_penalty)
                print_results(results, index, args.scores, args.n_best)
                index += len(results)
            flush_rowless(None)
    except TranslatorError as e:
        raise e.user_error(args.server) from None
    return 0


def split_language(client: TranslatorClient, args: argparse.Namespace) -> str:
    """--source-language, else the source language of the model the server picks for these flags."""
    if args.source_language:
        return args.source_language
    models = [m for m in client.model_info(args.timeout).models
              if (not args.model or m.name == args.model)
              and (not args.target_language or m.target_language == args.target_language)]
    chosen = next((m for m in models if m.is_default), models[0] if models else None)
    return chosen.source_language if chosen is not None else "en"  # no match: the server will refuse
def print_incremental(responses: Iterable[pb.TranslateIncrementalResponse]) -> None:
    """The pieces of one translation as they come, on one line."""
    for r in responses:
        sys.stdout.write(r.piece + ("\n" if r.final else ""))
        sys.stdout.flush()


def _chunks(lines: Iterable[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for line in lines:
        chunk.append(line)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
