"""gRPC overhead and dynamic batching, measured: one table, one run.

    .venv/bin/python -m bench.grpc_bench --model-dir bundles/en-de [--device cpu] [--duration 10]

1. Latency of a one-sentence translation: the in-process engine (`Translator.translate`) vs a
   `Translate` RPC to `nmt serve` running in a subprocess on the same machine (p50/p99, same sentences,
   one at a time). Goal: gRPC p50 <= 1.15x the engine.
2. Throughput (sentences/s) with 1, 8 and 32 concurrent clients, each sending one-sentence requests
   back to back for --duration seconds: the scheduler batches concurrent requests. Goal: >= 3x at 32 vs 1.

`measure(...)` returns the figures as a dict for other reports (bench.run).
"""

from __future__ import annotations

import argparse
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from nmt.decoding import DecodeOptions
from serve.protocol.client import TranslatorClient
from serve.protocol.errors import TranslatorError

REPO = Path(__file__).resolve().parents[1]


def percentiles(seconds: list[float]) -> tuple[float, float]:
    ms = np.array(seconds) * 1e3
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def start_server(bundle: Path, device: str, extra: list[str]) -> tuple[subprocess.Popen, str]:
    """`nmt serve` on a free port; returns the process and its target once it is SERVING."""
    proc = subprocess.Popen([sys.executable, "-m", "nmt", "serve", "--model-dir", str(bundle), "--port", "0",
                             "--device", device, "--log-level", "warning", *extra],
                            cwd=REPO, stderr=subprocess.PIPE, text=True)
    stderr: Iterable[str] = proc.stderr or []
    for line in stderr:
        m = re.match(r"nmt serve: listening on ([\d.]+):(\d+)", line)
        if m:
            target = f"127.0.0.1:{m.group(2)}"
            break
    else:
        raise RuntimeError(f"nmt serve did not start (exit {proc.wait()})")
    threading.Thread(target=lambda: [None for _ in stderr], daemon=True).start()  # keep the pipe empty
    with TranslatorClient(target) as client:
        for _ in range(600):
            try:
                if client.health(timeout=1) == "SERVING":
                    return proc, target
            except TranslatorError:
                pass
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("nmt serve never became SERVING")


def interleaved_latency(engine_translate, grpc_translate, texts: list[str], n: int,
                        block: int = 1) -> tuple[list[float], list[float]]:
    """Blocks of `block` sentences through the engine, then the same through gRPC, alternating: a shared
    machine's load drift (which moves both by 10-30% within seconds here) hits both alike. One sentence
    a block by default: the engine's ONNX Runtime pools do not spin after a run (serve.engine.runtime),
    so neither side's threads steal the CPU from the other's next call."""
    for text in texts[:10]:  # warm-up
        engine_translate(text)
        grpc_translate(text)
    engine: list[float] = []
    grpc: list[float] = []
    for first in range(0, n, block):
        chunk = [texts[i % len(texts)] for i in range(first, min(n, first + block))]
        for fn, out in ((engine_translate, engine), (grpc_translate, grpc)):
            for text in chunk:
                start = time.perf_counter()
                fn(text)
                out.append(time.perf_counter() - start)
    return engine, grpc


def throughput(client: TranslatorClient, texts: list[str], clients: int, duration: float,
               options: DecodeOptions) -> float:
    """Sentences per second with `clients` threads sending one-sentence requests back to back."""
    counter = iter(range(10**12))
    lock = threading.Lock()
    done = [0] * clients
    end = time.perf_counter() + duration

    def worker(k: int) -> None:
        while time.perf_counter() < end:
            with lock:
                i = next(counter)
            client.translate([texts[i % len(texts)]], options, timeout=60)
            done[k] += 1

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(worker, range(clients)))
    return sum(done) / (time.perf_counter() - start)


def measure(bundle: Path, texts: list[str], *, device: str = "cpu", requests: int = 200,
            duration: float = 10.0, concurrency: tuple[int, ...] = (1, 8, 32), beam_size: int = 1,
            intra_op_threads: int | None = None, server_args: tuple[str, ...] = ()) -> dict[str, Any]:
    from serve.engine.translator import EngineConfig, Translator

    options = DecodeOptions(beam_size=beam_size)
    threads = [] if intra_op_threads is None else ["--intra-op-threads", str(intra_op_threads)]
    proc, target = start_server(bundle, device, threads + list(server_args))
    try:
        config = EngineConfig(device=device, intra_op_threads=intra_op_threads)
        engine = Translator.from_bundle(bundle, config)
        with TranslatorClient(target) as client:
            engine_lat, grpc_lat = interleaved_latency(lambda t: engine.translate([t], options),
                                                       lambda t: client.translate([t], options, timeout=60),
                                                       texts, requests)
            rates = {c: throughput(client, texts, c, duration, options) for c in concurrency}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    e50, e99 = percentiles(engine_lat)
    g50, g99 = percentiles(grpc_lat)
    return {"device": device, "intra_op_threads": intra_op_threads, "requests": requests,
            "duration_s": duration, "beam_size": beam_size,
            "engine_p50_ms": e50, "engine_p99_ms": e99, "grpc_p50_ms": g50, "grpc_p99_ms": g99,
            "latency_ratio_p50": g50 / e50, "latency_ratio_p99": g99 / e99,
            "sentences_per_s": rates, "speedup": {c: r / rates[concurrency[0]] for c, r in rates.items()}}


def markdown(r: dict[str, Any]) -> str:
    rows = [f"| {name} | {p50:.2f} | {p99:.2f} | {ratio} | | |" for name, p50, p99, ratio in (
        ("engine in-process, 1 sentence", r["engine_p50_ms"], r["engine_p99_ms"], "1.00x"),
        ("gRPC Translate, 1 sentence", r["grpc_p50_ms"], r["grpc_p99_ms"],
         f"{r['latency_ratio_p50']:.2f}x (p99 {r['latency_ratio_p99']:.2f}x)"))]
    rows += [f"| gRPC, {c} concurrent client{'s' * (c > 1)} | | | | {rate:.1f} | {r['speedup'][c]:.2f}x |"
             for c, rate in r["sentences_per_s"].items()]
    head = ["| measurement | p50 ms | p99 ms | latency vs engine | sentences/s | vs 1 client |",
            "|---|---|---|---|---|---|"]
    return "\n".join(head + rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu")
    p.add_argument("--input", type=Path, help="one sentence per line (default: Multi30k test_2016_flickr.en)")
    p.add_argument("--requests", type=int, default=200, help="sequential requests for the latency rows")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per throughput row")
    p.add_argument("--beam-size", type=int, default=1)
    p.add_argument("--intra-op-threads", type=int, help="ONNX Runtime threads, engine and server alike")
    p.add_argument("--server-arg", action="append", default=[], help="extra `nmt serve` flag (repeatable)")
    args = p.parse_args(argv)
    if args.input:
        texts = [t for t in args.input.read_text(encoding="utf-8").splitlines() if t.strip()]
    else:
        import gzip
        import os

        data = Path(os.environ.get("NMT_DATA_DIR", REPO.parent / "shared" / "data" / "multi30k"))
        with gzip.open(data / "test_2016_flickr.en.gz", "rt", encoding="utf-8") as f:
            texts = [line.strip() for line in f if line.strip()]
    result = measure(args.model_dir, texts, device=args.device, requests=args.requests,
                     duration=args.duration, beam_size=args.beam_size,
                     intra_op_threads=args.intra_op_threads, server_args=tuple(args.server_arg))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
