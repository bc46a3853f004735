"""Static vs continuous batching, side by side in one run: open-loop latency, saturation, closed-loop gRPC.

    .venv/bin/python -m bench.batching_bench --model-dir B [--threads 2] [--seed 0] [--out FILE.md]

1. Open loop (in-process schedulers over one loaded engine, no gRPC): a seeded mix of short and long
   Multi30k test2016 sentences (one per request) arriving as a Poisson process at several rates, the
   same arrival times for both schedulers. p50/p99 latency of the short requests and of all, and the
   completed sentences per second. Goal: p99 of short requests <= 0.5x static at the same load.
2. Saturation: every request submitted at once; sentences/s. Goal: continuous not lower.
3. Closed loop through `nmt serve --batching MODE` (bench.grpc_bench): 1, 8 and 32 clients, and one
   sentence via gRPC vs the in-process engine. Goals: 32 clients >= 4x one client; gRPC p50 <= 1.15x.
"""

from __future__ import annotations

import argparse
import gzip
import os
import random
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np

from nmt.decoding import DecodeOptions, StopSignal
from nmt.files import atomic_write_text
from serve.engine.continuous import ContinuousScheduler
from serve.engine.packing import DEFAULT_MAX_BATCH_TOKENS
from serve.engine.scheduler import BatchScheduler
from serve.engine.translator import EngineConfig, Translator

MODES = ("static", "continuous")
CONCAT = "continuous-concat"  # the continuous loop on the concatenating decoder (--compare-concat)
INLINE = "continuous-inline"  # the continuous loop encoding newcomers on its own thread (--compare-inline)


def workload(translator: Translator, data_dir: Path, n: int, seed: int) -> list[tuple[str, bool]]:
    """n (sentence, is_short) pairs: 70% of the shortest third of test2016, 30% of the longest third."""
    with gzip.open(data_dir / "test_2016_flickr.en.gz", "rt", encoding="utf-8") as f:
        texts = [line.strip() for line in f if line.strip()]
    ranked = sorted(texts, key=lambda t: len(translator.tokenize([t])[0]))
    third = len(ranked) // 3
    short, long_ = ranked[:third], ranked[-third:]
    rng = random.Random(seed)
    return [(rng.choice(short), True) if rng.random() < 0.7 else (rng.choice(long_), False) for _ in range(n)]


def parse_mode(mode: str) -> tuple[str, int]:
    """`static`, `continuous` or either with a token budget (`continuous:24576`): (scheduler, budget)."""
    name, _, tokens = mode.partition(":")
    return name, int(tokens or DEFAULT_MAX_BATCH_TOKENS)


def make(mode: str, translators: dict[str, Translator]) -> BatchScheduler | ContinuousScheduler:
    """static, continuous, or `continuous:TOKENS` (the continuous loop with another token budget)."""
    if mode == "static":
        return BatchScheduler(translators[mode])
    return ContinuousScheduler(translators[mode], max_batch_tokens=parse_mode(mode)[1],
                               encode_ahead=False if mode == INLINE else None)


def run_load(mode: str, translators: dict[str, Translator], work: list[tuple[str, bool]],
             arrivals: list[float]) -> dict[str, float]:
    """Submit work[i] at arrivals[i] seconds; latency per request, throughput of the whole run."""
    sched = make(mode, translators)
    translator = translators[mode]
    sources = [translator.tokenize([t])[0] for t, _ in work]
    latency = [0.0] * len(work)

    def one(i: int, start: float) -> None:
        sched.submit([sources[i]], DecodeOptions(), StopSignal()).result()
        latency[i] = time.perf_counter() - start

    futures: list[Future] = []
    with ThreadPoolExecutor(128) as pool:  # submitters: the static scheduler may decode on a caller's thread
        t0 = time.perf_counter()
        for i, at in enumerate(arrivals):
            wait = t0 + at - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            futures.append(pool.submit(one, i, time.perf_counter()))
        for f in futures:
            f.result()
        elapsed = time.perf_counter() - t0
    sched.close(60)
    ms = np.array(latency) * 1e3
    short = ms[[s for _, s in work]]
    return {"short_p50": float(np.percentile(short, 50)), "short_p99": float(np.percentile(short, 99)),
            "all_p50": float(np.percentile(ms, 50)), "all_p99": float(np.percentile(ms, 99)),
            "per_s": len(work) / elapsed}


def alternating(translators: dict[str, Translator], work: list[tuple[str, bool]], arrivals: list[float],
                repeats: int) -> dict[str, dict[str, float]]:
    """Each scheduler `repeats` times, in alternating order (a drifting load hits all alike); medians."""
    modes = list(translators)
    runs: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    for r in range(repeats):
        for m in (modes if r % 2 == 0 else modes[::-1]):
            runs[m].append(run_load(m, translators, work, arrivals))
    return {m: {k: float(np.median([x[k] for x in rs])) for k in rs[0]} for m, rs in runs.items()}


def open_loop(translators: dict[str, Translator], work: list[tuple[str, bool]], seed: int, repeats: int
              ) -> list[str]:
    rows = ["| offered load | scheduler | short p50 ms | short p99 ms | all p50 ms | all p99 ms "
            "| sentences/s | short p99 vs static | sentences/s vs static |", "|---" * 9 + "|"]
    saturated = alternating(translators, work, [0.0] * len(work), repeats)
    capacity = min(r["per_s"] for r in saturated.values())
    for m in translators:
        s = saturated[m]
        rows.append(f"| all at once | {m} | {s['short_p50']:.1f} | {s['short_p99']:.1f} "
                    f"| {s['all_p50']:.1f} | {s['all_p99']:.1f} | {s['per_s']:.1f} | "
                    f"| {s['per_s'] / saturated['static']['per_s']:.2f}x |")
    rng = random.Random(seed)
    for fraction in (0.3, 0.6, 0.9):
        rate = fraction * capacity
        gaps = [rng.expovariate(rate) for _ in work]
        arrivals = list(np.cumsum(gaps) - gaps[0])
        results = alternating(translators, work, arrivals, repeats)
        for m in translators:
            r = results[m]
            ratio = r["short_p99"] / results["static"]["short_p99"]
            rows.append(f"| {rate:.0f}/s ({fraction:.0%} of capacity) | {m} | {r['short_p50']:.1f} "
                        f"| {r['short_p99']:.1f} | {r['all_p50']:.1f} | {r['all_p99']:.1f} "
                        f"| {r['per_s']:.1f} | {ratio:.2f}x | |")
    return rows


def closed_loop(bundle: Path, texts: list[str], threads: int | None, duration: float) -> list[str]:
    from bench.grpc_bench import measure

    rows = ["| scheduler | engine p50 ms | gRPC p50 ms | gRPC vs engine | 1 client /s | 8 clients /s "
            "| 32 clients /s | 32 vs 1 |", "|---|---|---|---|---|---|---|---|"]
    for mode in MODES:
        r = measure(bundle, texts, requests=150, duration=duration, intra_op_threads=threads,
                    server_args=("--batching", mode))
        rate = r["sentences_per_s"]
        rows.append(f"| {mode} | {r['engine_p50_ms']:.2f} | {r['grpc_p50_ms']:.2f} "
                    f"| {r['latency_ratio_p50']:.2f}x | {rate[1]:.1f} | {rate[8]:.1f} | {rate[32]:.1f} "
                    f"| {r['speedup'][32]:.2f}x |")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--data-dir", type=Path, default=Path(os.environ.get("NMT_DATA_DIR", "data/multi30k")))
    p.add_argument("--requests", type=int, default=400, help="requests per open-loop row")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    p.add_argument("--duration", type=float, default=8.0, help="seconds per closed-loop throughput row")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=2, help="open-loop runs per row and scheduler (medians)")
    p.add_argument("--skip-grpc", action="store_true", help="open loop only")
    p.add_argument("--out", type=Path, help="also write the tables to this markdown file")
    p.add_argument("--continuous-budget", type=int, action="append", default=[], metavar="TOKENS",
                   help="open loop also as continuous:TOKENS, the continuous loop with this token budget")
    p.add_argument("--compare-concat", action="store_true",
                   help=f"open loop also as {CONCAT}: the continuous loop without the slot decoder")
    p.add_argument("--compare-inline", action="store_true",
                   help=f"open loop also as {INLINE}: the continuous loop encoding newcomers between its "
                        "steps, not on a second thread")
    args = p.parse_args(argv)
    config = EngineConfig(device="cpu", intra_op_threads=args.threads)
    translator = Translator.from_bundle(args.model_dir, config)
    translators = {m: translator for m in MODES}
    if args.compare_concat:
        translators[CONCAT] = Translator.from_bundle(args.model_dir, replace(config, slot_cache=False))
    if args.compare_inline:
        translators[INLINE] = translator
    for tokens in args.continuous_budget:
        translators[f"continuous:{tokens}"] = translator
    work = workload(translator, args.data_dir, args.requests, args.seed)
    load = os.getloadavg()
    lines = [f"Batching benchmark: {args.model_dir}, {args.requests} requests per row, seed {args.seed}, "
             f"{args.threads or 'default'} ORT threads, {os.cpu_count()} cores, load average "
             f"{load[0]:.2f} at start.", "",
             "Open loop (in-process, greedy, one sentence per request; short = the shortest third of "
             f"test2016, 70% of requests; medians of {args.repeats} runs per scheduler, alternating order):",
             ""]
    lines += open_loop(translators, work, args.seed, args.repeats)
    if not args.skip_grpc:
        texts = [t for t, _ in work]
        lines += ["", "Closed loop through `nmt serve --batching MODE` (one-sentence requests):", ""]
        lines += closed_loop(args.model_dir, texts, args.threads, args.duration)
    lines += ["", f"load average at the end: {os.getloadavg()[0]:.2f}"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        atomic_write_text(args.out, text)
    return 0


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    sys.exit(main())
