"""The cache of repeats on a batch job: `nmt batch` against one server, cache off vs on, in one run.

    python -m bench.cache_bench --model-dir bundles/en-de [--lines 3000 --pool 1000 --zipf 1.1]

The input: Multi30k train lines drawn with a Zipf-like repetition (rank r drawn with probability
~ 1/r^s from a pool of distinct lines), as repeated boilerplate, UI strings or subtitles repeat;
the real duplicate rate of the train split is measured and printed beside it. Each run starts a
fresh server in a child process (as `nmt serve` would, --cache-size N or none) and times the job
from its first chunk to its last commit; the two outputs must be identical line for line.
"""

from __future__ import annotations

import argparse
import gzip
import multiprocessing as mp
import os
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

from nmt.decoding import DecodeOptions
from nmt.files import atomic_write_text
from serve.jobs.backends import GrpcBackend
from serve.jobs.job import JobConfig, Summary, run_job
from serve.jobs.segments import OrderedOutput, input_identity, read_segments


def serve_until_stopped(model_dir: str, cache_size: int, ports: Any, stop: Any) -> None:
    """Child process: a server on port 0 (with a cache when cache_size > 0); reports its port, then
    the cache's (hits, misses) once `stop` is set."""
    from serve.engine.translator import EngineConfig, Translator
    from serve.server.cache import TranslationCache
    from serve.server.metrics import Metrics
    from serve.server.registry import ModelRegistry
    from serve.server.server import ServerConfig, create_server

    metrics = Metrics()
    cache = TranslationCache(cache_size, metrics) if cache_size else None
    registry = ModelRegistry(metrics=metrics, cache=cache)
    server, port = create_server(registry, ServerConfig(port=0), metrics)
    registry.add(Translator.from_bundle(model_dir, EngineConfig(device="cpu")))
    server.set_serving()
    ports.put(port)
    stop.wait()
    server.stop()
    ports.put((cache.hits, cache.misses) if cache else (0, 0))


def zipf_sample(pool: list[str], n: int, s: float, rng: random.Random) -> list[str]:
    weights = [1.0 / (rank + 1) ** s for rank in range(len(pool))]
    return rng.choices(pool, weights=weights, k=n)


def duplicate_rate(lines: list[str]) -> float:
    """Share of lines that repeat an earlier one (whitespace-normalized): what a cache could answer."""
    return 1 - len({" ".join(line.split()) for line in lines}) / len(lines)


def run(model_dir: str, cache_size: int, source: Path, work: Path, cfg: JobConfig) -> tuple[Summary, Any]:
    ctx = mp.get_context("spawn")
    queue, stop = ctx.Queue(), ctx.Event()
    child = ctx.Process(target=serve_until_stopped, args=(model_dir, cache_size, queue, stop))
    child.start()
    try:
        port = queue.get(timeout=300)
        backend = GrpcBackend([f"127.0.0.1:{port}"], timeout=120, max_retries=5, give_up_after=120)
        out = OrderedOutput.open(work / f"cache{cache_size}.out", input_identity(source), {}, restart=True)
        summary = run_job(read_segments(source, "txt", "text"), backend, out, cfg)
        out.finish()
        backend.close()
    finally:
        stop.set()
    counts = queue.get(timeout=60)
    child.join(timeout=60)
    return summary, counts


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", required=True)
    p.add_argument("--data-dir", default=os.environ.get("NMT_DATA_DIR", "data/multi30k"))
    p.add_argument("--lines", type=int, default=3000, help="segments in the job's input")
    p.add_argument("--pool", type=int, default=1000, help="distinct train lines the input is drawn from")
    p.add_argument("--zipf", type=float, default=1.1, help="repetition exponent s (rank r ~ 1/r^s)")
    p.add_argument("--cache-size", type=int, default=10_000)
    p.add_argument("--chunk-size", type=int, default=32)
    p.add_argument("--in-flight", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="also write the table here (markdown)")
    args = p.parse_args(argv)

    with gzip.open(Path(args.data_dir) / "train.en.gz", "rt", encoding="utf-8") as f:
        train = [line.rstrip("\n") for line in f]
    rng = random.Random(args.seed)
    pool = rng.sample(sorted(set(train)), args.pool)
    lines = zipf_sample(pool, args.lines, args.zipf, rng)
    cfg = JobConfig(fmt="txt", options=DecodeOptions(), chunk_size=args.chunk_size, in_flight=args.in_flight)
    header = [f"Multi30k train.en: {len(train)} lines, duplicate rate {duplicate_rate(train):.2%} (measured)",
              f"job input: {len(lines)} lines drawn Zipf(s={args.zipf}) from {args.pool} distinct lines: "
              f"{len(set(lines))} distinct, duplicate rate {duplicate_rate(lines):.1%}",
              f"greedy, chunk {args.chunk_size}, in flight {args.in_flight}, bundle {args.model_dir}",
              f"load average before: {loadavg()}"]
    print("\n".join(header), flush=True)
    rows, outputs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        source = work / "source.txt"
        source.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        for size in (0, args.cache_size):
            summary, (hits, misses) = run(args.model_dir, size, source, work, cfg)
            outputs.append((work / f"cache{size}.out").read_text(encoding="utf-8"))
            rows.append((f"--cache-size {size}" if size else "no cache", summary, hits, misses))
    assert outputs[0] == outputs[1], "the cache changed a translation"
    base = rows[0][1].seconds
    table = ["| server | segments | seconds | segments/s | cache hits | cache misses | speedup |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, s, hits, misses in rows:
        table.append(f"| {name} | {s.segments} | {s.seconds:.2f} | {s.segments / s.seconds:.1f} | {hits} | "
                     f"{misses} | {base / s.seconds:.2f}x |")
    footer = [f"load average after: {loadavg()}", "outputs identical: yes"]
    print("\n".join(table + footer))
    if args.out:
        body = ["# Cache of repeats on a batch job", "", "    python -m bench.cache_bench "
                + " ".join(sys.argv[1:] if argv is None else argv), ""]
        atomic_write_text(args.out, "\n".join(body + [f"- {h}" for h in header] + [""] + table + [""]
                                              + [f"- {f}" for f in footer]) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
