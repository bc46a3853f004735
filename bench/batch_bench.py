"""Batch-job throughput: segments/s of `nmt batch` on a Multi30k split, in-process engine vs one gRPC server.

    python -m bench.batch_bench --model-dir bundles/en-de [--split test_2016_flickr] [--limit 0] \
        [--batching static,continuous[:TOKENS]] [--threads 1]

Both runs translate the same file with the same bundle, chunk size and in-flight window; the
server runs in a child process on a free loopback port (as `nmt serve` would), so the figure
includes protobuf, the network stack and the server's dynamic batching. Model loading is not
timed: the clock covers the job from the first chunk to the last commit.
"""

from __future__ import annotations

import argparse
import gzip
import multiprocessing as mp
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from bench.batching_bench import parse_mode
from nmt.decoding import DecodeOptions
from serve.jobs.backends import Backend, EngineBackend, GrpcBackend
from serve.jobs.job import JobConfig, run_job
from serve.jobs.segments import OrderedOutput, input_identity, read_segments


def serve_forever(model_dir: str, device: str, mode: str, threads: int | None, ports: Any, stop: Any) -> None:
    """Child process: one server on port 0 with the bundle; reports its port, runs until `stop`.
    mode: continuous or static, optionally with the batch token budget (`continuous:24576`)."""
    from serve.engine.translator import EngineConfig, Translator
    from serve.server.registry import BatchingConfig, ModelRegistry
    from serve.server.server import ServerConfig, create_server

    name, budget = parse_mode(mode)
    registry = ModelRegistry(BatchingConfig(mode=name, max_batch_tokens=budget))
    server, port = create_server(registry, ServerConfig(port=0))
    registry.add(Translator.from_bundle(model_dir, EngineConfig(device=device, intra_op_threads=threads)))
    server.set_serving()
    ports.put(port)
    stop.wait()
    server.stop()


def time_job(name: str, backend: Backend, source: Path, work: Path, cfg: JobConfig) -> float:
    out = OrderedOutput.open(work / f"{name}.out", input_identity(source), {"bench": name}, restart=True)
    summary = run_job(read_segments(source, "txt", "text"), backend, out, cfg)
    out.finish()
    rate = summary.segments / summary.seconds
    print(f"{name:<11} {summary.segments} segments in {summary.seconds:.2f}s: {rate:.1f} segments/s, "
          f"{summary.target_tokens / summary.seconds:.0f} target tokens/s, retries {summary.retries}")
    return rate


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", required=True)
    p.add_argument("--data-dir", default=os.environ.get("NMT_DATA_DIR", "data/multi30k"))
    p.add_argument("--split", default="test_2016_flickr")
    p.add_argument("--lang", default=None, help="source language (default: the bundle's)")
    p.add_argument("--limit", type=int, default=0, help="first N segments only (0 = the whole split)")
    p.add_argument("--device", default="auto")
    p.add_argument("--beam-size", type=int, default=1)
    p.add_argument("--chunk-size", type=int, default=32)
    p.add_argument("--in-flight", type=int, default=128)
    p.add_argument("--batching", default="continuous",
                   help="the server's scheduler(s), comma-separated: continuous, static, each optionally "
                        "with its batch token budget (continuous:24576)")
    p.add_argument("--threads", type=int, default=None,
                   help="ONNX Runtime intra-op threads (engine and server)")
    args = p.parse_args(argv)
    modes = [m for m in args.batching.split(",") if m]
    if not modes or any(not re.fullmatch(r"(continuous|static)(:[1-9]\d*)?", m) for m in modes):
        raise SystemExit(f"--batching: expected continuous and/or static[:TOKENS], got {args.batching!r}")

    from nmt.bundle import read_manifest

    lang = args.lang or read_manifest(args.model_dir, verify_checksums=False).src_lang
    with gzip.open(Path(args.data_dir) / f"{args.split}.{lang}.gz", "rt", encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f]
    lines = lines[:args.limit] if args.limit else lines
    cfg = JobConfig(fmt="txt", options=DecodeOptions(beam_size=args.beam_size), chunk_size=args.chunk_size,
                    in_flight=args.in_flight)
    print(f"{args.split}.{lang}: {len(lines)} segments, beam {args.beam_size}, chunk {args.chunk_size}, "
          f"in flight {args.in_flight}, bundle {args.model_dir}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        source = work / "source.txt"
        source.write_text("".join(line + "\n" for line in lines), encoding="utf-8")

        engine = EngineBackend(args.model_dir, device=args.device, intra_op_threads=args.threads)
        local = time_job("in-process", engine, source, work, cfg)
        del engine  # free its sessions before the server loads its own
        served = {m: time_served(m, args, source, work, cfg) for m in modes}
    for m, rate in served.items():
        print(f"server ({m}) / in-process: {rate / local:.2f}")
    return 0


def time_served(mode: str, args: argparse.Namespace, source: Path, work: Path, cfg: JobConfig) -> float:
    ctx = mp.get_context("spawn")
    ports, stop = ctx.Queue(), ctx.Event()
    child = ctx.Process(target=serve_forever,
                        args=(args.model_dir, args.device, mode, args.threads, ports, stop))
    child.start()
    try:
        port = ports.get(timeout=120)
        remote = GrpcBackend([f"127.0.0.1:{port}"], timeout=60, max_retries=5, give_up_after=60)
        rate = time_job(f"server {mode}", remote, source, work, cfg)
        remote.close()
    finally:
        stop.set()
        child.join(timeout=30)
    return rate


if __name__ == "__main__":
    raise SystemExit(main())
