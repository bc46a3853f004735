"""Uncached PyTorch greedy vs the cached ONNX Runtime engine, side by side on the same weights.

    python -m bench.engine_bench --bundle bundles/en-de --checkpoint runs/small/final.pt --sentences 128

Both systems decode the same Multi30k test sentences (or --test-src) greedily in one process,
one after the other, with the same thread count: batch-1 latency (median over sentences of the
median of --repeats runs; one run for the slow uncached loop) and batch-64 throughput
(generated tokens/s, shortest-first batches),
plus the engine/PyTorch ratio. Measurement and the two systems are those of `nmt bench`
(bench.run); this script is the engine's own two-row table. --profile adds the engine's
per-step cost split (bench.profile_engine) at batch 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from bench.run import BenchError, read_text
from bench.worker import BATCH, RowSpec, engine_system, measure, torch_system

ROWS = [RowSpec("PyTorch uncached greedy", "torch-uncached"), RowSpec("ORT engine cached greedy", "engine")]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.engine_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, required=True, help="fp32 bundle exported from --checkpoint")
    p.add_argument("--checkpoint", type=Path, required=True, help="the checkpoint the bundle came from")
    p.add_argument("--sentences", type=int, default=128, help="test sentences for the batch-64 pass")
    p.add_argument("--latency-sentences", type=int, default=32, help="sentences timed one by one")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions per measurement")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads of both runtimes")
    p.add_argument("--test-src", type=Path, help="sentences, one per line (default: Multi30k test, en)")
    p.add_argument("--data-dir", type=Path, default=Path(os.environ.get("NMT_DATA_DIR", "data/multi30k")))
    p.add_argument("--profile", action="store_true", help="also print the engine's per-step cost split")
    args = p.parse_args(argv)
    for name in ("sentences", "latency_sentences", "repeats", "threads"):
        if getattr(args, name) < 1:
            raise BenchError(f"--{name.replace('_', '-')} must be at least 1")
    for path in (args.bundle, args.checkpoint):
        if not path.exists():
            raise BenchError(f"{path}: no such file or directory")
    return args


def load_texts(args: argparse.Namespace) -> list[str]:
    path = args.test_src or args.data_dir / "test_2016_flickr.en.gz"
    texts = [t for t in read_text(path) if t.strip()][:args.sentences]
    if not texts:
        raise BenchError(f"{path}: no non-empty sentences")
    return texts


def run(args: argparse.Namespace) -> dict[str, Any]:
    texts = load_texts(args)
    paths = {"checkpoint": str(args.checkpoint), "bundle_fp32": str(args.bundle)}
    n_latency = min(args.latency_sentences, len(texts))
    results = {}
    for row in ROWS:
        uncached = row.system == "torch-uncached"
        system = torch_system if uncached else engine_system
        # The uncached loop is the slow row by far: one timed pass is enough for it (as in `nmt bench`).
        repeats = 1 if uncached else args.repeats
        results[row.name] = measure({row.name: system(row, paths, args.threads)}, texts, n_latency, repeats,
                                    BATCH)[row.name]
    torch_out, ort_out = (results[r.name]["outputs"] for r in ROWS)
    same = sum(a[0] == b[0] for a, b in zip(torch_out, ort_out))
    return {"rows": results, "sentences": len(texts), "latency_sentences": n_latency,
            "identical_outputs": same, "threads": args.threads}


def render(r: dict[str, Any]) -> str:
    torch_row, ort_row = (r["rows"][row.name] for row in ROWS)
    lines = [
        f"{r['sentences']} sentences ({r['latency_sentences']} timed one by one), {r['threads']} threads, "
        f"greedy; identical token outputs: {r['identical_outputs']}/{r['sentences']}", "",
        "| system | batch 1 median latency (ms) | batch 64 tokens/s |",
        "|---|---|---|",
    ]
    for row in ROWS:
        m = r["rows"][row.name]
        lines.append(f"| {row.name} | {m['latency_ms']:.2f} | {m['tokens_per_s']:.0f} |")
    lines.append(f"| speed-up (engine vs PyTorch) | {torch_row['latency_ms'] / ort_row['latency_ms']:.1f}x "
                 f"| {ort_row['tokens_per_s'] / torch_row['tokens_per_s']:.1f}x |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    try:
        args = parse_args(argv)
        result = run(args)
    except BenchError as e:
        print(f"engine_bench: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # unreadable bundle or checkpoint: one line, no traceback
        if type(e).__name__ in ("BundleError", "CheckpointError"):
            print(f"engine_bench: {e}", file=sys.stderr)
            return 2
        raise
    print(render(result))
    if args.profile:
        from bench.profile_engine import profile
        from bench.profile_engine import render as render_profile

        texts = load_texts(args)[:args.latency_sentences]
        print()
        print(render_profile(profile(args.bundle, texts, batch=1, beam=1, threads=args.threads)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
