"""`nmt batch INPUT OUTPUT`: translate a file through servers or an in-process bundle, resumably.

The input is cut into chunks of --chunk-size segments; at most --in-flight segments are being
translated (or finished and waiting for an earlier chunk) at any time. Chunks complete in any
order and are committed to OUTPUT.partial in input order (see serve/jobs/segments.py for the crash
safety). A segment the backend rejects (INVALID_ARGUMENT, e.g. too long) is reported on stderr
with its line number and handled by --on-error:
  fail         exit 1 naming the first bad line; no output is left behind
  skip         txt: an empty line; jsonl: the record with an "error" field and no "translation"
               (either way the output keeps one line per input line, so line numbers stay aligned)
  copy-source  the source text as its translation (jsonl also gets the "error" field)
Empty (or blank) segments translate to an empty line without a model call.
--split-sentences cuts each segment into sentences (nmt.sentences) sent as rows of the chunk's
requests and rejoined with the original whitespace: still one output line per input line, and a
commit still covers whole lines, so a resume works as without it. A segment with an invalid
sentence is handled by --on-error as a whole.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import re
import sys
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from nmt.bundle import BundleError
from nmt.decoding import DecodeOptions, InvalidRequest, TranslationResult
from nmt.errors import UserError
from nmt.sentences import Layout, join_results, split_text
from serve.jobs.backends import Backend, EngineBackend, GrpcBackend
from serve.jobs.segments import (
    InputError,
    OrderedOutput,
    Outcome,
    Segment,
    detect_format,
    format_line,
    hypothesis_of_line,
    input_identity,
    read_output_lines,
    read_segments,
    read_text_lines,
    scan_input,
)

POLICIES = ("fail", "skip", "copy-source")


class SegmentFailed(UserError):
    """An invalid segment under --on-error fail."""


@dataclass
class JobConfig:
    fmt: str  # 'txt' or 'jsonl'
    text_field: str = "text"
    id_field: str = "id"
    options: DecodeOptions = field(default_factory=DecodeOptions)
    with_scores: bool = False
    on_error: str = "fail"
    chunk_size: int = 32
    in_flight: int = 128
    split_language: str | None = None  # cut segments into sentences in this language (None: whole lines)


@dataclass
class ChunkResult:
    first_line: int
    lines: list[str]  # formatted output lines, one per segment
    source_tokens: int = 0
    target_tokens: int = 0
    errors: list[tuple[Segment, str]] = field(default_factory=list)


@dataclass
class Summary:
    segments: int = 0  # translated by this run (a resume skips the committed ones)
    resumed_from: int = 0
    source_tokens: int = 0
    target_tokens: int = 0
    errors: int = 0
    retries: int = 0
    seconds: float = 0.0

    def lines(self) -> list[str]:
        rate = self.segments / self.seconds if self.seconds > 0 else 0.0
        tok_rate = self.target_tokens / self.seconds if self.seconds > 0 else 0.0
        resumed = f" (resumed after {self.resumed_from})" if self.resumed_from else ""
        return [f"segments: {self.segments}{resumed}, errors: {self.errors}, retries: {self.retries}",
                f"tokens: {self.source_tokens} source, {self.target_tokens} target",
                f"wall time: {self.seconds:.2f}s, {rate:.1f} segments/s, {tok_rate:.0f} target tokens/s"]


# ----------------------------------------------------------------------------- one chunk


def translate_isolating(backend: Backend, texts: list[str],
                        options: DecodeOptions) -> list[TranslationResult | InvalidRequest]:
    """Translate a chunk; if the backend rejects it, translate one by one to find the bad segments."""
    if not texts:
        return []
    try:
        return list(backend.translate(texts, options))
    except InvalidRequest as e:
        if len(texts) == 1:
            return [e]
    return [r for t in texts for r in translate_isolating(backend, [t], options)]


def segment_message(msg: str) -> str:
    """Backends name a text by its index in the request ("texts[0] is ..."), which means nothing
    next to a line number; name it 'the segment' instead."""
    return re.sub(r"^(texts?\[\d+\]|text \d+|source \d+) ", "the segment ", msg)


def layout_of(text: str, rows: list[str], cfg: JobConfig) -> Layout:
    """Add the rows of one segment to `rows`: its sentences, or the whole text as one row."""
    if cfg.split_language is not None:
        return split_text(text, cfg.split_language, rows)
    rows.append(text)
    return [len(rows) - 1]


def translate_chunk(backend: Backend, segments: list[Segment], cfg: JobConfig) -> ChunkResult:
    rows: list[str] = []
    layouts = {i: layout_of(s.text, rows, cfg) for i, s in enumerate(segments) if s.text.strip()}
    # Requests of at most chunk_size rows, so splitting never makes a request larger than without it.
    answers = [r for k in range(0, len(rows), cfg.chunk_size)
               for r in translate_isolating(backend, rows[k:k + cfg.chunk_size], cfg.options)]
    outcomes = {i: Outcome(translation="", score=0.0) for i in range(len(segments)) if i not in layouts}
    result = ChunkResult(segments[0].line, [])
    for i, layout in layouts.items():
        mine = [answers[p] for p in layout if isinstance(p, int)]
        bad = next((r for r in mine if isinstance(r, InvalidRequest)), None)
        if bad is not None:
            msg = segment_message(str(bad))
            result.errors.append((segments[i], msg))
            copy = segments[i].text if cfg.on_error == "copy-source" else None
            outcomes[i] = Outcome(translation=copy, error=msg)
            continue
        # Every row of this segment is a result now; the whole line's row stays as the engine scored it.
        r = cast(TranslationResult, mine[0]) if cfg.split_language is None else join_results(
            layout, cast(list[TranslationResult], answers), cfg.options.length_penalty)
        best = r.hypotheses[0]
        outcomes[i] = Outcome(translation=best.text, score=best.score)
        result.source_tokens += r.source_tokens
        result.target_tokens += len(best.tokens)
    result.lines = [format_line(s, outcomes[i], cfg.fmt, cfg.with_scores) for i, s in enumerate(segments)]
    return result


# ----------------------------------------------------------------------------- the job


def chunked(segments: Iterable[Segment], size: int) -> Iterator[list[Segment]]:
    it = iter(segments)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def describe(seg: Segment, id_field: str) -> str:
    if seg.record is not None and id_field in seg.record:
        return f"line {seg.line} (id {seg.record[id_field]!r})"
    return f"line {seg.line}"


def run_job(segments: Iterable[Segment], backend: Backend, out: OrderedOutput, cfg: JobConfig,
            progress=None) -> Summary:
    """Translate every segment into `out` with a bounded window of chunks; returns this run's figures."""
    summary = Summary(resumed_from=out.committed_lines)
    window = max(1, math.ceil(cfg.in_flight / cfg.chunk_size))  # chunks in flight or awaiting their turn
    first_failure: tuple[Segment, str] | None = None
    start = time.perf_counter()
    pool = ThreadPoolExecutor(window, thread_name_prefix="nmt-batch")
    pending: set[Future[ChunkResult]] = set()

    def settle() -> None:
        """Wait for at least one chunk, then account for and hand in every finished one."""
        nonlocal pending, first_failure
        done, pending = wait(pending, return_when=FIRST_COMPLETED)
        for fut in done:
            chunk = fut.result()
            for seg, msg in chunk.errors:
                if cfg.on_error != "fail":  # under fail, the one error line comes at the end
                    where = describe(seg, cfg.id_field)
                    print(f"nmt batch: {where}: {msg} ({cfg.on_error})", file=sys.stderr)
                if first_failure is None or seg.line < first_failure[0].line:
                    first_failure = (seg, msg)
            summary.segments += len(chunk.lines)
            summary.source_tokens += chunk.source_tokens
            summary.target_tokens += chunk.target_tokens
            summary.errors += len(chunk.errors)
            out.add(chunk.first_line, chunk.lines)
            if progress is not None:
                progress.update(len(chunk.lines))

    try:
        for chunk in chunked(segments, cfg.chunk_size):
            while len(pending) + out.waiting >= window:
                settle()
            if first_failure is not None and cfg.on_error == "fail":
                break
            pending.add(pool.submit(translate_chunk, backend, chunk, cfg))
        while pending:
            settle()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    if first_failure is not None and cfg.on_error == "fail":
        seg, msg = first_failure
        raise SegmentFailed(f"{describe(seg, cfg.id_field)}: {msg} (use --on-error skip or copy-source "
                            "to translate the rest)")
    summary.retries = backend.retries
    summary.seconds = time.perf_counter() - start
    return summary


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nmt batch", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Rerunning the same command after a crash resumes where it stopped; OUTPUT.partial and "
               "OUTPUT.state.json hold the work in progress.")
    p.add_argument("input", help="text file (one segment per line) or JSON Lines; gzip accepted")
    p.add_argument("output", help="written atomically when the job ends; a name ending in .gz is gzipped")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--server", action="append", metavar="HOST:PORT", help="a server (repeat for several)")
    src.add_argument("--model-dir", help="translate in this process with this bundle")
    p.add_argument("--device", default="auto", help="engine device with --model-dir (auto, cpu, cuda)")
    p.add_argument("--format", choices=("auto", "txt", "jsonl"), default="auto")
    p.add_argument("--id-field", default="id", help="JSONL field naming a record in messages")
    p.add_argument("--text-field", default="text", help="JSONL field holding the source text")
    p.add_argument("--beam-size", type=int, default=1)
    p.add_argument("--length-penalty", type=float, default=DecodeOptions.length_penalty,
                   help="beam search: scores are divided by ((5 + length) / 6) ** this (0 = raw log-prob)")
    p.add_argument("--scores", action="store_true", help="add the hypothesis score (txt: score<TAB>text)")
    p.add_argument("--chunk-size", type=int, default=32, help="segments per request")
    p.add_argument("--in-flight", type=int, default=128, help="segments translated at once (bounded memory)")
    p.add_argument("--on-error", choices=POLICIES, default="fail", help="what an invalid segment becomes")
    p.add_argument("--split-sentences", action="store_true",
                   help="cut segments into sentences, translate them as rows, rejoin each line with its "
                        "original whitespace (language: --split-language, else the model's source language)")
    p.add_argument("--split-language", help="language code for --split-sentences")
    p.add_argument("--reference", help="reference translations (one per line): print sacreBLEU and chrF")
    p.add_argument("--auth-token", default=os.environ.get("NMT_AUTH_TOKEN"),
                   help="bearer token for the servers (default: $NMT_AUTH_TOKEN)")
    p.add_argument("--tls-ca", help="CA certificate (PEM) to reach the servers over TLS")
    p.add_argument("--timeout", type=float, default=60.0, help="deadline of one request, seconds")
    p.add_argument("--retries", type=int, default=5,
                   help="retries of a request answered RESOURCE_EXHAUSTED or DEADLINE_EXCEEDED")
    p.add_argument("--give-up-after", type=float, default=600.0,
                   help="fail (resumably) when no server has answered for this many seconds")
    p.add_argument("--restart", action="store_true", help="discard a previous run's partial output")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p


def check_args(args: argparse.Namespace) -> None:
    for name in ("chunk_size", "in_flight"):
        if getattr(args, name) < 1:
            raise InvalidRequest(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.retries < 0 or args.timeout <= 0 or args.give_up_after <= 0:
        raise InvalidRequest("--retries must be >= 0, --timeout and --give-up-after > 0")
    DecodeOptions(beam_size=args.beam_size, length_penalty=args.length_penalty).validate()
    if not Path(args.input).is_file():
        raise InputError(f"{args.input}: no such file")
    for target in args.server or []:
        host, _, port = target.rpartition(":")
        if not host or not port.isdigit():
            raise InvalidRequest(f"--server {target!r}: expected HOST:PORT")
    if Path(args.output).resolve() == Path(args.input).resolve():
        raise InvalidRequest("OUTPUT is the INPUT file; write the translation elsewhere")
    if args.model_dir and not Path(args.model_dir).is_dir():
        raise BundleError(f"{args.model_dir}: no such directory")
    if args.split_language is not None and not (args.split_sentences and args.split_language.strip()):
        raise InvalidRequest("--split-language needs --split-sentences and a language code")


def make_backend(args: argparse.Namespace) -> Backend:
    if args.model_dir:
        return EngineBackend(args.model_dir, device=args.device)
    return GrpcBackend(args.server, timeout=args.timeout, max_retries=args.retries,
                       give_up_after=args.give_up_after, auth_token=args.auth_token, tls_ca=args.tls_ca)


def score_against_reference(output: Path, reference: list[str], cfg: JobConfig) -> list[str]:
    import sacrebleu

    hyps = [hypothesis_of_line(line, cfg.fmt, cfg.with_scores) for line in read_output_lines(output)]
    return [str(sacrebleu.corpus_bleu(hyps, [reference])), str(sacrebleu.corpus_chrf(hyps, [reference]))]


def run_command(args: argparse.Namespace, backend: Backend | None = None) -> int:
    """The job; `backend` replaces the one the flags name (a wrapped engine in tests)."""
    check_args(args)
    options = DecodeOptions(beam_size=args.beam_size, length_penalty=args.length_penalty,
                            return_scores=args.scores)
    cfg = JobConfig(fmt=detect_format(args.input, args.format), text_field=args.text_field,
                    id_field=args.id_field, options=options, with_scores=args.scores, on_error=args.on_error,
                    chunk_size=min(args.chunk_size, args.in_flight), in_flight=args.in_flight)
    total = scan_input(args.input, cfg.fmt, cfg.text_field)
    reference = read_text_lines(args.reference) if args.reference else None
    if reference is not None and len(reference) != total:
        raise InputError(f"{args.reference}: {len(reference)} lines, but the input has {total} segments")
    # Everything that changes the output bytes; a resume must match it exactly.
    job_options = {"format": cfg.fmt, "text_field": cfg.text_field, "beam_size": args.beam_size,
                   "length_penalty": args.length_penalty,
                   "scores": cfg.with_scores, "on_error": cfg.on_error,
                   "backend": f"model-dir:{Path(args.model_dir).resolve()}" if args.model_dir else "servers"}
    if args.split_sentences:  # only then: the state of a job without it stays as it was
        job_options["split_sentences"] = args.split_language or "source language of the model"
    out = OrderedOutput.open(args.output, input_identity(args.input), job_options, restart=args.restart)
    try:
        backend = backend or make_backend(args)
        try:
            if args.split_sentences:
                cfg.split_language = args.split_language or backend.source_language()
            from tqdm import tqdm

            with tqdm(total=total, initial=out.committed_lines, unit="seg", file=sys.stderr,
                      disable=args.no_progress, dynamic_ncols=True, mininterval=0.5) as bar:
                segments = read_segments(args.input, cfg.fmt, cfg.text_field, skip=out.committed_lines)
                summary = run_job(segments, backend, out, cfg, progress=bar)
            report = backend.report()
        finally:
            backend.close()
        out.finish()
    except (SegmentFailed, OSError):
        out.discard()  # the same command would fail again (or the disk is full): leave nothing behind
        raise
    except BaseException:
        if out.committed_lines == 0:
            out.discard()
        else:
            out.close()  # keep real progress for a resume
        raise
    for line in summary.lines() + report:
        print(line)
    if reference is not None:
        for line in score_against_reference(Path(args.output), reference, cfg):
            print(line)
    return 0


def main(argv: list[str], backend: Backend | None = None) -> int:
    """`nmt batch`; errors reach the user through nmt.cli (one line, exit code)."""
    return run_command(build_parser().parse_args(argv), backend)
