"""`nmt bench`: PyTorch, our engine, CTranslate2 and gRPC side by side on the same weights and sentences.

    nmt bench --checkpoint runs/small/final.pt --threads 2

Every row runs in a fresh worker process (`python -m bench.worker`, job as JSON on stdin,
result as JSON on stdout), for two reasons: peak RSS (ru_maxrss) is a high-water mark that
cannot be reset inside one process, so only a fresh process gives each row its own figure; and
one runtime's thread pools and allocator caches must not slow the next one down. The RSS
figure (VmHWM) is therefore everything that row needs: interpreter, imports, model, decoding.

Per row: warm-up (excluded), batch-1 latency (each of the first --latency-sentences sentences
--repeats times, median per sentence, then median over sentences), and batch-64 throughput
(all sentences, shortest-first batches of 64, --repeats passes, median). Tokens/s counts
generated tokens without EOS. The first throughput pass gives the outputs scored for BLEU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench import report
from bench.worker import BATCH, RowSpec
from nmt.errors import UserError

REPO = Path(__file__).resolve().parents[1]
BLEU_TOLERANCE = 0.1  # fp32 greedy rows run the same weights and algorithm: BLEU may only differ by noise
UNCACHED = "PyTorch uncached greedy"  # the speed baseline: the Annotated Transformer loop
REFERENCE = "PyTorch cached greedy"  # the token and BLEU reference (same tokens as UNCACHED, batched)
WORKER_TIMEOUT_S = 1800

ROWS = [
    RowSpec(UNCACHED, "torch-uncached"),
    RowSpec(REFERENCE, "torch-cached"),
    RowSpec("engine fp32 greedy", "engine", "fp32", 1),
    RowSpec("engine int8 greedy", "engine", "int8", 1),
    RowSpec("engine fp32 beam 4", "engine", "fp32", 4),
    RowSpec("engine int8 beam 4", "engine", "int8", 4),
    RowSpec("CT2 fp32 greedy", "ct2", "fp32", 1),
    RowSpec("CT2 int8 greedy", "ct2", "int8", 1),
    RowSpec("CT2 fp32 beam 4", "ct2", "fp32", 4),
    RowSpec("CT2 int8 beam 4", "ct2", "int8", 4),
]
CT2_BASELINES = {1: "CT2 fp32 greedy", 4: "CT2 fp32 beam 4"}


def run_worker(module: str, args: list[str], job: dict[str, Any] | None, threads: int) -> dict[str, Any]:
    """Run `python -m module args` in a fresh process (job as JSON on stdin, JSON result on stdout);
    a crash becomes an 'error' entry, never a lost run."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    try:
        proc = subprocess.run([sys.executable, "-m", module, *args], input=json.dumps(job or {}),
                              capture_output=True, text=True, env=env, cwd=REPO, timeout=WORKER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {WORKER_TIMEOUT_S} s"}
    lines = proc.stdout.strip().splitlines()
    try:  # the result is the last line: a library printing to stdout must not lose the row
        return json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        last = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        return {"error": f"worker died: {last}"}


def measure_job(paths: dict[str, str], texts: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """What every measuring worker is told besides its row(s)."""
    return {"paths": paths, "threads": args.threads, "repeats": args.repeats, "texts": texts,
            "latency_sentences": min(args.latency_sentences, len(texts))}


def run_row(row: RowSpec, paths: dict[str, str], texts: list[str],
            args: argparse.Namespace) -> dict[str, Any]:
    job = {"kind": "row", "row": asdict(row), **measure_job(paths, texts, args)}
    return run_worker("bench.worker", [], job, args.threads)


def run_pair(rows: list[RowSpec], paths: dict[str, str], texts: list[str],
             args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Rows measured in one worker, interleaved (--paired): each row's result; a crash fails them all."""
    job = {"kind": "pair", "rows": [asdict(r) for r in rows], **measure_job(paths, texts, args)}
    result = run_worker("bench.worker", [], job, args.threads)
    if result.get("error") or set(result.get("rows", {})) != {r.name for r in rows}:
        return {r.name: {"error": result.get("error", "the paired worker returned no result")} for r in rows}
    return result["rows"]


def units(specs: list[RowSpec], paired: bool) -> list[list[RowSpec]]:
    """What each worker measures: one row, or (paired) an engine row together with the CT2 row of the
    same precision and search when both are selected."""
    out: list[list[RowSpec]] = []
    taken: set[str] = set()
    for spec in specs:
        if spec.name in taken:
            continue
        mate = next((m for m in specs if paired and spec.system == "engine" and m.system == "ct2"
                     and (m.precision, m.beam) == (spec.precision, spec.beam)), None)
        out.append([spec] if mate is None else [spec, mate])
        taken.update(s.name for s in out[-1])
    return out


def merge_rounds(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from its rounds: the median of each timing, the highest peak RSS, the first round's
    outputs (every round decodes the same sentences); a failed round fails the row."""
    failed = [r for r in results if r.get("error")]
    if failed or len(results) == 1:
        return failed[0] if failed else results[0]
    row = dict(results[0])
    for key in ("latency_ms", "latency_p90_ms", "tokens_per_s", "throughput_s"):
        values = [r[key] for r in results if r.get(key) is not None]
        row[key] = statistics.median(values) if values else None
    rss = [r["peak_rss_mib"] for r in results if r.get("peak_rss_mib") is not None]
    row["peak_rss_mib"] = max(rss) if rss else None  # None: paired rows share one process
    row["rounds"] = {key: [r.get(key) for r in results] for key in ("latency_ms", "tokens_per_s")}
    return row


def run_grpc(bundle: str, texts: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """gRPC vs in-process latency and concurrent throughput (bench.grpc_bench) of the fp32 greedy engine."""
    job = {"kind": "grpc", "bundle": bundle, "texts": texts, "threads": args.threads,
           "requests": args.grpc_requests, "duration": args.grpc_duration}
    result = run_worker("bench.worker", [], job, args.threads)
    for key in ("sentences_per_s", "speedup"):  # JSON made the client counts strings
        if isinstance(result.get(key), dict):
            result[key] = {int(c): v for c, v in result[key].items()}
    return result


def run_profiles(bundle: str, texts: list[str], args: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    """Per-step engine profiles (bench.profile_engine) at batch 1 and batch 64, greedy fp32."""
    src = tmp / "profile.src"
    src.write_text("\n".join(texts) + "\n", encoding="utf-8")
    out = []
    for batch, n in ((1, min(args.latency_sentences, len(texts))), (BATCH, min(4 * BATCH, len(texts)))):
        flags = ["--bundle", bundle, "--test-src", str(src), "--sentences", str(n), "--batch", str(batch),
                 "--threads", str(args.threads), "--json"]
        out.append(run_worker("bench.profile_engine", flags, None, args.threads))
    return out


# --------------------------------------------------------------------------------------------
# Parent side: inputs, artifacts, rows, scoring, checks, report.
# --------------------------------------------------------------------------------------------

class BenchError(UserError):
    """A problem with the user's input: printed as one line, exit code 2."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="nmt bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, help="checkpoint (PyTorch rows, CTranslate2 conversion, "
                   "bundles exported from it when --bundle/--bundle-int8 are not given)")
    p.add_argument("--bundle", type=Path, help="fp32 bundle (default: exported from --checkpoint)")
    p.add_argument("--bundle-int8", type=Path, help="int8 bundle (default: exported from --checkpoint)")
    p.add_argument("--test-src", type=Path, help="source sentences, one per line")
    p.add_argument("--test-ref", type=Path, help="reference translations, one per line")
    p.add_argument("--data-dir", type=Path, default=Path(os.environ.get("NMT_DATA_DIR", "data/multi30k")),
                   help="Multi30k directory (default split test_2016_flickr; $NMT_DATA_DIR)")
    p.add_argument("--split", default="test_2016_flickr")
    p.add_argument("--sentences", type=int, default=1000, help="test sentences used (default 1000)")
    p.add_argument("--latency-sentences", type=int, default=30,
                   help="sentences timed one by one (also all the uncached PyTorch loop decodes)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads of every runtime")
    p.add_argument("--repeats", type=int, default=3, help="timed repetitions (medians are reported)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every row this many times, round-robin in alternating order (medians reported): "
                        "on a host whose speed drifts, rows compared are then measured at the same times")
    p.add_argument("--paired", action="store_true",
                   help="measure each engine row in one process with the CT2 row of the same precision and "
                        "search, interleaved per batch and per latency pass: their ratio then does not "
                        "depend on how the host's speed drifts between rows (no peak RSS for those rows)")
    p.add_argument("--out-dir", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--skip-grpc", action="store_true", help="leave out the gRPC measurements")
    p.add_argument("--grpc-requests", type=int, default=200, help="sequential one-sentence requests timed")
    p.add_argument("--grpc-duration", type=float, default=10.0, help="seconds per concurrency level")
    p.add_argument("--skip-profile", action="store_true", help="leave out the per-step engine profile")
    p.add_argument("--rows", help="comma-separated subset of rows to run (default: all)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("sentences", "latency_sentences", "threads", "repeats", "rounds", "grpc_requests"):
        if getattr(args, name) < 1:
            raise BenchError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.grpc_duration <= 0:
        raise BenchError(f"--grpc-duration must be positive, got {args.grpc_duration}")
    if (args.test_src is None) != (args.test_ref is None):
        raise BenchError("--test-src and --test-ref go together")
    if args.checkpoint is None and args.bundle is None:
        raise BenchError("give --checkpoint (all rows) or at least --bundle (engine rows only)")
    return args


def read_text(path: Path) -> list[str]:
    import gzip

    if not path.is_file():
        raise BenchError(f"{path}: no such file")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def test_set(args: argparse.Namespace, src_lang: str, tgt_lang: str) -> tuple[list[str], list[str], str]:
    if args.test_src is not None:
        src_path, ref_path = args.test_src, args.test_ref
    else:
        src_path = args.data_dir / f"{args.split}.{src_lang}.gz"
        ref_path = args.data_dir / f"{args.split}.{tgt_lang}.gz"
    src, ref = read_text(src_path), read_text(ref_path)
    if len(src) != len(ref):
        raise BenchError(f"{src_path} has {len(src)} lines but {ref_path} has {len(ref)}")
    keep = [i for i in range(len(src)) if src[i].strip()][:args.sentences]
    if not keep:
        raise BenchError(f"{src_path}: no non-empty sentences")
    return [src[i] for i in keep], [ref[i] for i in keep], str(src_path)


def select_rows(args: argparse.Namespace) -> list[RowSpec]:
    rows = list(ROWS)
    if args.checkpoint is None:  # bundles only: the engine rows we have bundles for
        rows = [r for r in rows if r.system == "engine" and (r.precision == "fp32" or args.bundle_int8)]
    if args.rows:
        wanted = [w.strip() for w in args.rows.split(",") if w.strip()]
        unknown = [w for w in wanted if w not in {r.name for r in ROWS}]
        if unknown:
            raise BenchError(f"unknown rows {unknown}; rows are: {', '.join(r.name for r in ROWS)}")
        rows = [r for r in rows if r.name in wanted]
    return rows


def prepare(args: argparse.Namespace, rows: list[RowSpec],
            tmp: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Paths the workers need, exporting bundles and converting to CTranslate2 only for rows that run;
    and the language pair (checkpoint meta, else the bundle manifest)."""
    paths: dict[str, str] = {}
    langs = {"src_lang": "en", "tgt_lang": "de"}
    if args.checkpoint is not None:
        from train.checkpoint import load_checkpoint

        ckpt = load_checkpoint(args.checkpoint)
        langs.update({k: ckpt.get("meta", {}).get(k, v) for k, v in langs.items()})
        paths["checkpoint"] = str(args.checkpoint)
        paths["max_positions"] = str(ckpt["model_config"]["max_positions"])
    else:
        from nmt.bundle import read_manifest

        manifest = read_manifest(args.bundle)
        langs = {"src_lang": manifest.src_lang, "tgt_lang": manifest.tgt_lang}
    for dtype, given in (("fp32", args.bundle), ("int8", args.bundle_int8)):
        if given is None and any(r.system == "engine" and r.precision == dtype for r in rows):
            from export.pipeline import export_bundle

            log(f"exporting the {dtype} bundle from {args.checkpoint}")
            given = export_bundle(args.checkpoint, tmp / f"bundle-{dtype}", dtype)
        if given is not None:
            paths[f"bundle_{dtype}"] = str(given)
    if any(r.system == "ct2" for r in rows):
        from bench.ct2 import convert_checkpoint

        log("converting the checkpoint to CTranslate2")
        paths["ct2"] = str(convert_checkpoint(args.checkpoint, tmp / "ct2"))
    return paths, langs


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def main(argv: list[str]) -> int:
    """`nmt bench`; errors reach the user through nmt.cli (one line, exit code)."""
    return bench(parse_args(argv))


def bench(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    notes: list[str] = []
    load_avg = [round(x, 2) for x in os.getloadavg()]  # timings on a busy machine are not comparable
    with tempfile.TemporaryDirectory(prefix="nmt-bench-") as tmpdir:
        specs = select_rows(args)
        paths, langs = prepare(args, specs, Path(tmpdir))
        texts, refs, label = test_set(args, langs["src_lang"], langs["tgt_lang"])
        runs: dict[str, list[dict[str, Any]]] = {spec.name: [] for spec in specs}
        plan = units(specs, args.paired)
        for round_ in range(args.rounds):  # round-robin: drift on the host hits every row alike
            for unit in plan if round_ % 2 == 0 else plan[::-1]:
                spec = unit[0]
                n = min(args.latency_sentences, len(texts)) if spec.system == "torch-uncached" else len(texts)
                of = f" (round {round_ + 1}/{args.rounds})" if args.rounds > 1 else ""
                log(f"{' + '.join(s.name for s in unit)}: {n} sentences{of}")
                got = (run_pair(unit, paths, texts, args) if len(unit) > 1
                       else {spec.name: run_row(spec, paths, texts, args)})
                for name, result in got.items():
                    runs[name].append(result)
                    if result.get("error"):
                        log(f"{name} FAILED: {result['error']}")
        rows = [{**asdict(spec), **merge_rounds(runs[spec.name])} for spec in specs]
        grpc, profiles = None, []
        if "bundle_fp32" in paths and not args.skip_grpc:
            log("gRPC: in-process vs gRPC latency, 1/8/32 concurrent clients")
            grpc = run_grpc(paths["bundle_fp32"], texts, args)
        if "bundle_fp32" in paths and not args.skip_profile:
            log("profiling the engine per decoder step")
            profiles = run_profiles(paths["bundle_fp32"], texts, args, Path(tmpdir))
    report.score(rows, refs, REFERENCE)
    failures = report.check(rows, texts, REFERENCE, CT2_BASELINES[1], BLEU_TOLERANCE)
    extras = [("gRPC", grpc or {})] + [("engine profile", p) for p in profiles]
    failures += [f"{what}: {r['error']}" for what, r in extras if r.get("error")]
    report.add_ratios(rows, CT2_BASELINES, UNCACHED)
    matchups = report.matchups(rows)
    if args.checkpoint is None:
        notes.append("no checkpoint given: PyTorch and CTranslate2 rows left out")
    if not any(r["name"] == REFERENCE and r.get("outputs") for r in rows):
        notes.append(f"token parity and BLEU agreement NOT checked: the {REFERENCE} row did not run")
    notes += report.method_notes(UNCACHED, REFERENCE, args.paired)
    meta = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": report.machine(),
            "threads": args.threads, "sentences": len(texts),
            "latency_sentences": min(args.latency_sentences, len(texts)), "repeats": args.repeats,
            "rounds": args.rounds, "paired": args.paired, "test_src": label, "versions": report.versions(),
            "load_average": load_avg,
            "wall_s": round(time.perf_counter() - started, 1)}
    for r in rows:  # outputs stay out of the JSON: the texts are reproducible, the file stays small
        r.pop("outputs", None)
    result = {"meta": meta, "rows": rows, "matchups": matchups, "grpc": grpc, "profiles": profiles,
              "failures": failures, "notes": notes}
    md_path, js_path = report.write_report(result, args.out_dir)
    print(report.markdown(result))
    log(f"wrote {md_path} and {js_path} in {meta['wall_s']} s")
    for f in failures:
        print(f"FAIL: {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
