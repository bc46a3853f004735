"""Where the engine's time goes per decoder step: ONNX Runtime, host work around it, the Python search.

    python -m bench.profile_engine --bundle bundles/en-de --batch 64 --beam 1

Two passes over the same sentences, after a warm-up:
  1. timers (time.perf_counter) around the engine's three graph runs (`run_with_iobinding` of
     the encoder, decoder and reorder sessions) and around the methods that call them
     (DecoderCache.step / .keep, Runtime.start). Everything in a method that is not its graph
     run is host work (building feeds, IO binding, copying top-k back); everything outside
     those methods is the Python side (search loop, batching, tokenization, detokenization).
     Timers cost well under a microsecond per call, so the split is not distorted.
  2. cProfile over one more run, for the Python functions with the most own time: where to
     look inside the host and loop buckets (cProfile's per-call overhead inflates them, so
     these figures rank functions, the buckets above give the sizes).
Costs are divided by the decoder steps run (Translator.steps), so they read "per step".
The engine runs with shards off (serve.engine.translator.shards): shards run searches on several
threads at once, and timers summed over threads would no longer split one wall time.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import pstats
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BUCKETS = {
    "decoder session run (ORT)": "decoder graph: attention, FFN, projection, log-softmax, top-k",
    "decoder step host work": "feeds, masks, IO binding, top-k to the host (DecoderCache/SlotCache.step)",
    "reorder session run (ORT)": "dropping finished rows / reordering beams on the device",
    "reorder host work": "IO binding of the cache (DecoderCache.keep), moved rows copied (SlotCache.keep)",
    "encoder session run (ORT)": "encoder + cross K/V, once per batch",
    "encoder host work": "padding, empty cache, IO binding (Runtime.start)",
    "Python search loop and the rest": "greedy/beam bookkeeping, batching, tokenize, detokenize",
}


class TimedSession:
    """An InferenceSession whose run_with_iobinding is timed into `totals[label]`."""

    def __init__(self, session: Any, label: str, totals: dict[str, float]):
        self._session, self._label, self._totals = session, label, totals

    def run_with_iobinding(self, binding: Any, *args: Any) -> Any:
        start = time.perf_counter()
        try:
            return self._session.run_with_iobinding(binding, *args)
        finally:
            self._totals[self._label] += time.perf_counter() - start

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)


def timed_method(owner: Any, name: str, label: str,
                 totals: dict[str, float]) -> contextlib.AbstractContextManager:
    """Patch owner.name (class or instance) with a timed wrapper for the duration of a with-block."""
    original = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            totals[label] += time.perf_counter() - start

    @contextlib.contextmanager
    def patched() -> Iterator[None]:
        setattr(owner, name, wrapper)
        try:
            yield
        finally:
            if isinstance(owner, type):
                setattr(owner, name, original)
            else:
                delattr(owner, name)  # back to the class attribute
    return patched()


def run_batches(translator: Any, texts: list[str], batch: int, options: Any) -> None:
    for start in range(0, len(texts), batch):
        translator.translate(texts[start:start + batch], options)


def split_time(translator: Any, texts: list[str], batch: int, options: Any) -> dict[str, Any]:
    """Pass 1: bucket sizes from timers; returns seconds per bucket and the decoder steps run."""
    from serve.engine.runtime import DecoderCache
    from serve.engine.slots import SlotCache, StepBinding

    rt = translator.runtime
    totals: dict[str, float] = defaultdict(float)
    # The slot decoder (the CPU default) counts as the decoder: one of the two runs a given step. Its
    # step is timed around StepBinding.run, whose row parts run side by side (wall time, once).
    sessions = [("encoder", rt.encoder), ("decoder", rt.decoder), ("reorder", rt.reorder)]
    with contextlib.ExitStack() as stack:
        for label, graph in sessions:
            if graph is None:
                continue
            stack.callback(setattr, graph, "session", graph.session)
            graph.session = TimedSession(graph.session, label, totals)
        for cache in (DecoderCache, SlotCache):
            stack.enter_context(timed_method(cache, "step", "step", totals))
            stack.enter_context(timed_method(cache, "keep", "keep", totals))
        stack.enter_context(timed_method(rt, "start", "start", totals))
        stack.enter_context(timed_method(StepBinding, "run", "decoder", totals))
        steps0, start = translator.steps, time.perf_counter()
        run_batches(translator, texts, batch, options)
        wall, steps = time.perf_counter() - start, translator.steps - steps0
    buckets = {
        "decoder session run (ORT)": totals["decoder"],
        "decoder step host work": totals["step"] - totals["decoder"],
        "reorder session run (ORT)": totals["reorder"],
        "reorder host work": totals["keep"] - totals["reorder"],
        "encoder session run (ORT)": totals["encoder"],
        "encoder host work": totals["start"] - totals["encoder"],
        "Python search loop and the rest": wall - totals["step"] - totals["keep"] - totals["start"],
    }
    return {"wall_s": wall, "steps": steps, "seconds": buckets}


def top_functions(translator: Any, texts: list[str], batch: int, options: Any,
                  n: int) -> list[dict[str, Any]]:
    """Pass 2: the n functions with the most own time under cProfile (ORT's run included)."""
    profiler = cProfile.Profile()
    profiler.enable()
    run_batches(translator, texts, batch, options)
    profiler.disable()
    stats = pstats.Stats(profiler, stream=io.StringIO())
    rows = []
    for (file, line, func), (_, calls, own, cum, _) in stats.stats.items():  # type: ignore[attr-defined]
        where = f"{Path(file).parent.name}/{Path(file).name}:{line}" if file != "~" else "built-in"
        rows.append({"function": f"{func} ({where})", "calls": calls, "own_s": own, "cum_s": cum})
    return sorted(rows, key=lambda r: -r["own_s"])[:n]


def profile(bundle: str | Path, texts: list[str], *, batch: int, beam: int, threads: int,
            top: int = 8, greedy_head: bool = True) -> dict[str, Any]:
    """Profile the engine on `texts` (fed `batch` at a time); costs per decoder step, largest first."""
    from nmt.decoding import DecodeOptions
    from serve.engine.translator import EngineConfig, Translator

    config = EngineConfig(device="cpu", intra_op_threads=threads, shards=False,  # see the module doc
                          greedy_head=greedy_head)
    translator = Translator.from_bundle(bundle, config)
    options = DecodeOptions(beam_size=beam)
    run_batches(translator, texts[:batch], batch, options)  # warm-up
    split = split_time(translator, texts, batch, options)
    steps = max(split["steps"], 1)
    costs = [{"cost": k, "us_per_step": 1e6 * v / steps, "share": v / split["wall_s"], "what": BUCKETS[k]}
             for k, v in split["seconds"].items()]
    costs.sort(key=lambda c: -c["us_per_step"])
    return {"tool": "time.perf_counter timers around graph runs + cProfile (own time) for functions; "
                    "shards off",
            "batch": batch, "beam": beam, "threads": threads, "sentences": len(texts),
            "greedy_head": translator.runtime.slot_head is not None,
            "decoder_steps": split["steps"], "wall_s": split["wall_s"], "costs": costs,
            "top_functions": top_functions(translator, texts, batch, options, top)}


def render(p: dict[str, Any]) -> str:
    head = "" if p["beam"] > 1 else (", greedy head" if p.get("greedy_head") else ", no greedy head")
    lines = [f"Engine profile: batch {p['batch']}, beam {p['beam']}{head}, {p['threads']} threads, "
             f"{p['sentences']} sentences, {p['decoder_steps']} decoder steps in {p['wall_s']:.2f} s "
             f"({p['tool']})", "",
             "| cost | µs per step | share | what |", "|---|---|---|---|"]
    lines += [f"| {c['cost']} | {c['us_per_step']:.0f} | {100 * c['share']:.1f}% | {c['what']} |"
              for c in p["costs"]]
    top3 = "; ".join(f"{c['cost']} {c['us_per_step']:.0f} µs" for c in p["costs"][:3])
    lines += ["", f"Three largest costs per step: {top3}.", "", "Most own time under cProfile:", ""]
    lines += [f"- {f['function']}: {f['own_s']:.3f} s own, {f['calls']} calls" for f in p["top_functions"]]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile_engine", description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--test-src", type=Path, help="sentences, one per line (default: Multi30k test, en)")
    p.add_argument("--data-dir", type=Path, help="Multi30k directory (default $NMT_DATA_DIR)")
    p.add_argument("--sentences", type=int, default=256)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--beam", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-greedy-head", action="store_true",
                   help="greedy steps through the full vocabulary projection (EngineConfig.greedy_head off)")
    p.add_argument("--json", action="store_true", help="print the profile as JSON")
    args = p.parse_args(argv)
    from bench.run import BenchError, read_text, test_set

    try:
        for name in ("sentences", "batch", "beam", "threads"):
            if getattr(args, name) < 1:
                raise BenchError(f"--{name} must be at least 1")
        if args.test_src is not None:
            texts = [t for t in read_text(args.test_src) if t.strip()][:args.sentences]
        else:
            ns = argparse.Namespace(test_src=None, data_dir=args.data_dir or Path(default_data_dir()),
                                    split="test_2016_flickr", sentences=args.sentences)
            texts = test_set(ns, "en", "de")[0]
        result = profile(args.bundle, texts, batch=args.batch, beam=args.beam, threads=args.threads,
                         greedy_head=not args.no_greedy_head)
    except Exception as e:  # bad files and bundles: one line, no traceback
        if isinstance(e, BenchError) or type(e).__name__ == "BundleError":
            print(f"profile_engine: {e}", file=sys.stderr)
            return 2
        raise
    print(json.dumps(result) if args.json else render(result))
    return 0


def default_data_dir() -> str:
    import os

    return os.environ.get("NMT_DATA_DIR", "data/multi30k")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
