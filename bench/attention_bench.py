"""What alignments cost: the engine with return_alignments off vs on, and off vs a decoder graph
without the cross_attention output at all (the graph as exported before alignments existed).

    python -m bench.attention_bench --bundle bundles/en-de --sentences 64 --threads 2

Three engines on the same bundle, timed interleaved on the same sentences (Multi30k test, en):
  * no-output: a copy of the bundle without its alignment graph (decoder_alignments.onnx), i.e. a
    bundle that cannot produce alignments at all: the normal path must cost the same as this;
  * off: the bundle as exported, return_alignments=False (the normal path);
  * on: return_alignments=True.
Per decoding mode, batch-1 latency (median over sentences of the best of --repeats runs) and
one batched pass (tokens/s, best of --repeats).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.run import read_text
from export.pipeline import strip_alignment_output
from nmt import bundle as sb
from nmt.decoding import DecodeOptions
from serve.engine.translator import EngineConfig, Translator


def best_time(engine: Translator, texts: list[str], opts: DecodeOptions, repeats: int) -> float:
    """Seconds of the fastest of `repeats` translations of `texts` in one call."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        engine.translate(texts, opts)
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.attention_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--sentences", type=int, default=64)
    p.add_argument("--latency-sentences", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--beam", type=int, default=4, help="beam size of the beam rows")
    p.add_argument("--data-dir", type=Path, default=Path(os.environ.get("NMT_DATA_DIR", "data/multi30k")))
    args = p.parse_args(argv)
    if not (args.bundle / sb.MANIFEST_FILE).is_file():
        print(f"attention_bench: {args.bundle}: not a model bundle", file=sys.stderr)
        return 2
    texts = [t for t in read_text(args.data_dir / "test_2016_flickr.en.gz") if t.strip()][:args.sentences]
    with tempfile.TemporaryDirectory() as tmp:
        plain = strip_alignment_output(args.bundle, Path(tmp) / "no-output")

        def load(path: Path) -> Translator:
            return Translator.from_bundle(path, EngineConfig(device="cpu", intra_op_threads=args.threads,
                                          inter_op_threads=1))

        engines = {"no-output": load(plain), "off": load(args.bundle), "on": load(args.bundle)}
        print(f"{len(texts)} sentences, {args.threads} threads, provider {engines['off'].provider}")
        print(f"{'mode':<10} {'what':<22} {'no-output':>10} {'off':>10} {'on':>10} {'on/off':>7}")
        for mode, beam in (("greedy", 1), (f"beam {args.beam}", args.beam)):
            opts = {name: DecodeOptions(beam_size=beam, return_alignments=name == "on") for name in engines}
            latency: dict[str, list[float]] = {name: [] for name in engines}
            for text in texts[:args.latency_sentences]:
                for name, eng in engines.items():  # interleaved: the same load on every engine
                    latency[name].append(best_time(eng, [text], opts[name], args.repeats))
            ms = {n: 1000 * statistics.median(v) for n, v in latency.items()}
            print(f"{mode:<10} {'batch-1 latency (ms)':<22} {ms['no-output']:>10.2f} {ms['off']:>10.2f} "
                  f"{ms['on']:>10.2f} {ms['on'] / ms['off']:>7.2f}")
            tps = {}
            for name, eng in engines.items():
                tokens = sum(len(r.hypotheses[0].tokens) + 1 for r in eng.translate(texts, opts[name]))
                tps[name] = tokens / best_time(eng, texts, opts[name], args.repeats)
            print(f"{mode:<10} {'batched tokens/s':<22} {tps['no-output']:>10.0f} {tps['off']:>10.0f} "
                  f"{tps['on']:>10.0f} {tps['on'] / tps['off']:>7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
