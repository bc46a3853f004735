"""The worker side of `nmt bench`: build one system (PyTorch, the engine or CTranslate2), measure it,
report JSON. Run as `python -m bench.worker` with the job as JSON on stdin; the result is the last
line of stdout. bench/run.py explains why every row gets a fresh process.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BATCH = 64
Output = tuple[list[int], str]  # (target ids without BOS/EOS, detokenized text)


@dataclass(frozen=True)
class RowSpec:
    name: str
    system: str  # torch-uncached | torch-cached | engine | ct2
    precision: str = "fp32"  # fp32 | int8
    beam: int = 1


def torch_system(row: RowSpec, paths: dict[str, str], threads: int) -> Callable[[list[str]], list[Output]]:
    import torch

    from nmt.decoding import DecodeOptions
    from train.checkpoint import load_checkpoint, model_from_checkpoint
    from train.decode import greedy_decode, greedy_decode_cached, source_ids

    torch.set_num_threads(threads)
    model, tok = model_from_checkpoint(load_checkpoint(paths["checkpoint"]))
    opts, eos = DecodeOptions(), model.cfg.eos_id

    def run(texts: list[str]) -> list[Output]:
        srcs = [source_ids(tok, t, eos) for t in texts]
        if row.system == "torch-uncached":  # the textbook loop decodes one source at a time
            hyps = [greedy_decode(model, s, opts) for s in srcs]
        else:
            hyps = greedy_decode_cached(model, srcs, opts)
        return [(h.tokens, tok.decode(h.tokens)) for h in hyps]
    return run


def engine_system(row: RowSpec, paths: dict[str, str], threads: int) -> Callable[[list[str]], list[Output]]:
    from nmt.decoding import DecodeOptions
    from serve.engine.translator import EngineConfig, Translator

    translator = Translator.from_bundle(paths[f"bundle_{row.precision}"], EngineConfig(device="cpu",
                                        intra_op_threads=threads))
    opts = DecodeOptions(beam_size=row.beam)

    def run(texts: list[str]) -> list[Output]:
        return [(r.hypotheses[0].tokens, r.text) for r in translator.translate(texts, opts)]
    return run


def ct2_system(row: RowSpec, paths: dict[str, str], threads: int) -> Callable[[list[str]], list[Output]]:
    from bench.ct2 import CT2Translator

    compute_type = {"fp32": "float32", "int8": "int8"}[row.precision]
    translator = CT2Translator(paths["ct2"], int(paths["max_positions"]), compute_type=compute_type,
                               threads=threads)

    def run(texts: list[str]) -> list[Output]:
        return [(o.tokens, o.text) for o in translator.translate(texts, beam_size=row.beam)]
    return run


SYSTEMS = {"torch-uncached": torch_system, "torch-cached": torch_system, "engine": engine_system,
           "ct2": ct2_system}


def turned(names: list[str], turn: int) -> list[str]:
    """names rotated by `turn`: which system goes first changes from one sentence or batch to the next."""
    turn %= len(names)
    return names[turn:] + names[:turn]


def measure(runs: dict[str, Callable[[list[str]], list[Output]]], texts: list[str], n_latency: int,
            repeats: int, batch: int) -> dict[str, dict[str, Any]]:
    """Warm-up, batch-1 latency and batched throughput of each system; outputs in input order.

    Several systems (`nmt bench --paired`) are measured interleaved, the order turning, so that the
    host's speed, which drifts by more than the gaps measured, is the same for all of them: each
    batch of a throughput pass runs on every system back to back, and each repeat of the latency
    sentences runs on every system in turn. Not sentence by sentence: a sentence takes ~10 ms, and
    one runtime's weights and buffers pushed out of the caches by the other's made the engine's int8
    greedy batch-1 latency 12-13 ms against 8-11 ms alone, while passes in turn left both as alone.
    With batch 1 (a system that decodes one source at a time) the latency pass over all texts
    is also the throughput pass.
    """
    names = list(runs)
    for run in runs.values():  # warm-up: allocations, thread pools, lazy initialisation
        run(texts[:min(8, len(texts))])
        run(texts[:1])
    outputs: dict[str, list[Output | None]] = {n: [None] * len(texts) for n in names}
    times: dict[str, list[list[float]]] = {n: [[] for _ in texts[:n_latency]] for n in names}
    for rep in range(repeats):
        for n in turned(names, rep):
            for i, text in enumerate(texts[:n_latency]):
                start = time.perf_counter()
                outputs[n][i] = runs[n]([text])[0]
                times[n][i].append(time.perf_counter() - start)
    per_sentence = {n: [statistics.median(t) for t in times[n]] for n in names}
    seconds = {n: sum(per_sentence[n]) for n in names}
    if batch > 1:
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # same shortest-first batches for all
        batches = [order[s:s + batch] for s in range(0, len(order), batch)]
        pass_times: dict[str, list[float]] = {n: [] for n in names}
        for rep in range(repeats):
            spent = dict.fromkeys(names, 0.0)
            for b, idx in enumerate(batches):
                for n in turned(names, b + rep):
                    start = time.perf_counter()
                    got = runs[n]([texts[i] for i in idx])
                    spent[n] += time.perf_counter() - start
                    if rep == 0:  # the batched outputs are the ones scored
                        for i, out in zip(idx, got):
                            outputs[n][i] = out
            for n in names:
                pass_times[n].append(spent[n])
        seconds = {n: statistics.median(pass_times[n]) for n in names}
    return {n: figures(outputs[n], per_sentence[n], seconds[n]) for n in names}


def figures(outputs: list[Output | None], per_sentence: list[float], seconds: float) -> dict[str, Any]:
    n_tokens = sum(len(o[0]) for o in outputs if o is not None)
    ranked = sorted(per_sentence)
    return {
        "latency_ms": 1000 * statistics.median(ranked),
        "latency_p90_ms": 1000 * ranked[int(0.9 * (len(ranked) - 1))],
        "tokens_per_s": n_tokens / seconds if seconds > 0 else None,
        "throughput_s": seconds,
        "generated_tokens": n_tokens,
        "outputs": outputs,
    }


def worker(job: dict[str, Any]) -> dict[str, Any]:
    if job["kind"] == "grpc":
        from bench.grpc_bench import measure as grpc_measure

        return grpc_measure(Path(job["bundle"]), job["texts"], device="cpu", requests=job["requests"],
                            duration=job["duration"], beam_size=1, intra_op_threads=job["threads"])
    if job["kind"] == "pair":  # systems measured in one process, interleaved (nmt bench --paired)
        rows = [RowSpec(**r) for r in job["rows"]]
        runs = {row.name: SYSTEMS[row.system](row, job["paths"], job["threads"]) for row in rows}
        results = measure(runs, job["texts"], job["latency_sentences"], job["repeats"], BATCH)
        for result in results.values():
            result["batch"] = BATCH
            result["peak_rss_mib"] = None  # one process for all of them: no row has its own
            result["paired_with"] = [row.name for row in rows]
        return {"rows": results}
    row = RowSpec(**job["row"])
    start = time.perf_counter()
    run = SYSTEMS[row.system](row, job["paths"], job["threads"])
    load_s = time.perf_counter() - start
    texts, n_latency = job["texts"], job["latency_sentences"]
    if row.system == "torch-uncached":
        # The textbook loop re-runs the decoder over the whole prefix for every token, one source
        # at a time: the latency sentences, timed once each, are all it needs (and can afford).
        result = measure({row.name: run}, texts[:n_latency], n_latency, 1, 1)[row.name]
    else:
        result = measure({row.name: run}, texts, n_latency, job["repeats"], BATCH)[row.name]
    result["load_s"] = load_s
    result["batch"] = 1 if row.system == "torch-uncached" else BATCH
    result["peak_rss_mib"] = peak_rss_mib()
    return result


def peak_rss_mib() -> float:
    """This process's peak resident set size.

    VmHWM belongs to the address space the worker got at exec; ru_maxrss would not do, as Linux
    carries the parent's high-water mark (torch loaded, bundles exported) across fork + exec.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB; elsewhere the best there is


def worker_main() -> int:
    job = json.loads(sys.stdin.read())
    try:
        result = worker(job)
    except Exception as e:  # the parent turns this into a FAILED row, the other rows still run
        result = {"error": f"{type(e).__name__}: {e}"}
    sys.stdout.write("\n" + json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(worker_main())
