"""Engine variants side by side in ONE process, interleaved: what each speed lever buys.

    python -m bench.levers --variant traced=bundles/traced --variant fused=bundles/fused \
        --variant fused-spin=bundles/fused:spin --threads 1 --data-dir data/multi30k

On a shared machine absolute timings drift with the load, so the variants run round-robin (each
sentence, and each batch of a pass, on every variant back to back, the order turning) and the
table's ratios are what to read. Rows:
batch-1 latency (median over sentences of the per-sentence median) and batch-64 generated
tokens/s, greedy and beam 4. `same` says whether a variant's tokens equal the first variant's
(fp32 variants must agree; int8 ones need not).

A variant is NAME=BUNDLE[:flag,...]; flags switch one engine lever off or on for that variant:
  spin      ORT worker threads spin waiting for work between runs (ORT's default; the engine's is off)
  expand    beam search copies the cross-attention K/V per beam (as before grouped_cross_kv was used)
  concat    the concatenating decoder instead of the bundle's slot decoder (as before slot_cache)
  whole     every slot decoder step runs whole on the session's threads (as before row parts and shards)
  unsharded a batch is searched whole, its steps split by rows (as before shards)
  stock     the slot decoder's attention and top-k on ONNX Runtime's kernels, not serve.engine.native's
  nohead    greedy steps through the full vocabulary projection and log-softmax, not the greedy head
            (serve.engine.native.greedy_head: these rows ask for no scores)
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.run import read_text
from nmt.bundle import read_manifest
from nmt.decoding import DecodeOptions
from nmt.pair_tokenizer import load_bundle_tokenizer
from serve.engine.runtime import Runtime
from serve.engine.translator import EngineConfig, Translator

FLAGS = ("spin", "expand", "concat", "whole", "unsharded", "stock", "nohead")
MODES = [("greedy", 1), ("beam 4", 4)]


@dataclass
class Variant:
    name: str
    translator: Translator
    times: dict[str, list[float]] = field(default_factory=dict)
    tokens: dict[str, list[list[int]]] = field(default_factory=dict)


def load_variant(spec: str, threads: int) -> Variant:
    name, _, rest = spec.partition("=")
    path, _, flag_text = rest.partition(":")
    flags = [f for f in flag_text.split(",") if f]
    bad = [f for f in flags if f not in FLAGS]
    if not name or not path or bad:
        raise SystemExit(f"bad --variant {spec!r}: expected NAME=BUNDLE[:{','.join(FLAGS)}]")
    manifest = read_manifest(path)
    spinning = None if "spin" in flags else False
    runtime = Runtime(Path(path), manifest, "cpu", threads, None, "all", allow_spinning=spinning,
                      slot_cache="concat" not in flags, native_kernels="stock" not in flags,
                      greedy_head="nohead" not in flags)
    runtime.grouped_cross = runtime.grouped_cross and "expand" not in flags
    if "whole" in flags:
        runtime.slot_parts = None
    tokenizer = load_bundle_tokenizer(path, manifest.raw)
    config = EngineConfig(device="cpu", shards="unsharded" not in flags)
    translator = Translator(runtime, manifest, tokenizer, config)
    translator.warmup()
    return Variant(name, translator)


def timed(fn: Callable[[], list[list[int]]]) -> tuple[float, list[list[int]]]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def run(variants: list[Variant], texts: list[str], n_latency: int, repeats: int, batch: int) -> None:
    for mode, beam in MODES:
        opts = DecodeOptions(beam_size=beam)
        for v in variants:  # warm-up of this mode's shapes
            v.translator.translate(texts[:batch], opts)

        def decode(v: Variant, chunk: list[str], opts: DecodeOptions = opts) -> list[list[int]]:
            return [r.hypotheses[0].tokens for r in v.translator.translate(chunk, opts)]

        per_sentence: dict[str, list[float]] = {v.name: [] for v in variants}
        for text in texts[:n_latency]:
            samples: dict[str, list[float]] = {v.name: [] for v in variants}
            for _ in range(repeats):
                for v in variants:
                    samples[v.name].append(timed(lambda: decode(v, [text]))[0])  # noqa: B023
            for v in variants:
                per_sentence[v.name].append(statistics.median(samples[v.name]))
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # shortest-first batches
        batches = [[texts[i] for i in order[s:s + batch]] for s in range(0, len(order), batch)]
        passes: dict[str, list[float]] = {v.name: [] for v in variants}
        for rep in range(repeats):
            seconds = {v.name: 0.0 for v in variants}
            outs: dict[str, list[list[int]]] = {v.name: [] for v in variants}
            for i, chunk in enumerate(batches):
                # Every batch on every variant back to back, the order turning each time: drift on
                # a shared host then hits all variants alike (a whole pass per variant did not).
                turn = (i + rep) % len(variants)
                for v in variants[turn:] + variants[:turn]:
                    s, got = timed(lambda: decode(v, chunk))  # noqa: B023
                    seconds[v.name] += s
                    outs[v.name] += got
            for v in variants:
                passes[v.name].append(seconds[v.name])
                v.tokens[mode] = outs[v.name]
        for v in variants:
            n_tokens = sum(map(len, v.tokens[mode]))
            v.times[f"{mode} b1 ms"] = [1000 * statistics.median(per_sentence[v.name])]
            v.times[f"{mode} b{batch} tok/s"] = [n_tokens / statistics.median(passes[v.name])]


def table(variants: list[Variant], batch: int) -> str:
    cols = [f"{m} b1 ms" for m, _ in MODES] + [f"{m} b{batch} tok/s" for m, _ in MODES]
    base = variants[0]
    lines = ["| variant | " + " | ".join(cols) + " | same tokens as " + base.name + " |",
             "|---" * (len(cols) + 2) + "|"]
    for v in variants:
        cells = []
        for c in cols:
            x, b = v.times[c][0], base.times[c][0]
            ratio = (b / x) if c.endswith("ms") else (x / b)  # > 1: faster than the first variant
            cells.append(f"{x:.2f} ({ratio:.2f}×)" if c.endswith("ms") else f"{x:.0f} ({ratio:.2f}×)")
        same = all(v.tokens[m] == base.tokens[m] for m, _ in MODES)
        lines.append(f"| {v.name} | " + " | ".join(cells) + f" | {'yes' if same else 'no'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.levers", description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", action="append", required=True, help="NAME=BUNDLE[:flag,...] (repeat)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads of every variant")
    p.add_argument("--sentences", type=int, default=128, help="test sentences for the batched pass")
    p.add_argument("--latency-sentences", type=int, default=16, help="sentences timed one by one")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--data-dir", type=Path, default=Path(os.environ.get("NMT_DATA_DIR", "data/multi30k")))
    args = p.parse_args(argv)
    texts = read_text(args.data_dir / "test_2016_flickr.en.gz")[:args.sentences]
    variants = [load_variant(s, args.threads) for s in args.variant]
    load_before = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else []
    run(variants, texts, min(args.latency_sentences, len(texts)), args.repeats, args.batch)
    load_after = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else []
    print(f"threads {args.threads}, {len(texts)} sentences (batch {args.batch}), "
          f"{args.latency_sentences} timed one by one, {args.repeats} repeats; "
          f"load average before {' '.join(load_before)}, "
          f"after {' '.join(load_after)}")
    print(table(variants, args.batch))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
