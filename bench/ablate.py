"""What each part of the training recipe buys: the `small` preset against one change at a time.

    python -m bench.ablate --data-dir DIR --out runs/ablate --minutes 14 --parallel 2 --threads 1

Every variant is `nmt train --preset small` with one or two `--set` overrides, trained for the
same budget of training minutes (`--max-minutes` counts optimizer steps only) and scored at the
end on the whole Multi30k validation set (greedy, detokenized cased sacreBLEU); there is no
periodic validation, which would only cost wall-clock time.
Test sets are never used here: the recipe is tuned on validation only.

`--parallel 2 --threads 1` runs two variants at a time on one core each: variants that ran side
by side shared the machine equally. A finished variant (its metrics hold the final validation) is
not trained again, so an interrupted ablation resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from nmt.files import atomic_write_text

# (name, what changed, --set overrides). The first row is the reference every delta is taken from.
VARIANTS: list[tuple[str, str, list[str]]] = [
    ("recipe", "the small preset as shipped", []),
    ("seed", "same recipe, another seed: the noise level", ["seed=2"]),
    ("peak-lr", "peak learning rate 7e-4 instead of 1.5e-3", ["lr=7e-4"]),
    ("warmup", "warmup 2000 steps instead of 400", ["warmup_steps=2000"]),
    ("no-smoothing", "label smoothing 0 instead of 0.1", ["label_smoothing=0"]),
    ("dropout", "dropout 0.3 instead of 0.1", ["dropout=0.3"]),
    ("vocab-16k", "joint vocabulary 16k instead of 8k", ["vocab_size=16000"]),
    ("d512", "wider model: d_model 512, 8 heads, ffn 2048", ["d_model=512", "n_heads=8", "d_ff=2048"]),
    ("d128", "narrower model: d_model 128, ffn 512", ["d_model=128", "d_ff=512"]),
    ("post-norm", "post-norm (the original paper) instead of pre-norm", ["pre_norm=false"]),
    ("untied", "separate source, target and output embeddings",
     ["share_embeddings=false", "tie_output=false"]),
    ("batch-8k", "8192 tokens per batch instead of 4096", ["max_tokens=8192"]),
]
# Validation only at the very end, on every validation sentence; no step checkpoints in between.
FIXED = ["eval_every=1000000", "save_every=1000000", "eval_bleu_sentences=100000"]


def train_command(out: Path, data_dir: Path, minutes: float, sets: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "nmt", "train", "--preset", "small", "--out", str(out),
           "--data-dir", str(data_dir), "--max-minutes", str(minutes), "--no-progress", "--skip-final"]
    for s in FIXED + sets:
        cmd += ["--set", s]
    return cmd


def result(run: Path) -> dict | None:
    """The run's final figures, or None when it has not finished its final validation."""
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        return None
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line]
    evals = [r for r in rows if "val_bleu" in r]
    if not evals:
        return None
    last = evals[-1]
    speeds = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    return {"steps": last["step"], "train_s": last["time_s"], "val_loss": last["val_loss"],
            "val_bleu": last["val_bleu"], "tokens_per_s": sum(speeds) / len(speeds) if speeds else 0.0}


def run_all(variants: list[tuple[str, str, list[str]]], args: argparse.Namespace) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    todo = [v for v in variants if result(args.out / v[0]) is None]
    running: list[tuple[str, subprocess.Popen, float]] = []
    while todo or running:
        while todo and len(running) < args.parallel:
            name, _, sets = todo.pop(0)
            run = args.out / name
            run.mkdir(parents=True, exist_ok=True)
            log = open(run / "train.log", "w")  # noqa: SIM115 - closed with the process
            proc = subprocess.Popen(train_command(run, args.data_dir, args.minutes, sets), env=env,
                                    stdout=log, stderr=subprocess.STDOUT)
            log.close()
            running.append((name, proc, time.monotonic()))
            print(f"started {name}", flush=True)
        time.sleep(2)
        for item in list(running):
            name, proc, t0 = item
            if proc.poll() is not None:
                running.remove(item)
                state = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}, see train.log)"
                print(f"{name}: {state} in {time.monotonic() - t0:.0f}s", flush=True)


def table(variants: list[tuple[str, str, list[str]]], out: Path) -> str:
    rows = [(name, what, result(out / name)) for name, what, _ in variants]
    ref = rows[0][2]
    lines = ["| variant | change | steps | target tok/s | val loss | val BLEU | Δ BLEU |",
             "|---|---|---|---|---|---|---|"]
    for name, what, r in rows:
        if r is None:
            lines.append(f"| {name} | {what} | — | — | — | not run | — |")
            continue
        delta = f"{r['val_bleu'] - ref['val_bleu']:+.2f}" if ref and name != rows[0][0] else ""
        lines.append(f"| {name} | {what} | {r['steps']} | {r['tokens_per_s']:.0f} | {r['val_loss']:.3f} "
                     f"| {r['val_bleu']:.2f} | {delta} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ablate", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, default=Path(os.environ.get("NMT_DATA_DIR", "data/multi30k")))
    p.add_argument("--out", type=Path, required=True, help="one run directory per variant under here")
    p.add_argument("--minutes", type=float, default=14.0, help="training minutes per variant")
    p.add_argument("--parallel", type=int, default=1, help="variants trained at the same time")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads per variant")
    p.add_argument("--only", nargs="+", metavar="NAME", help="these variants (and the reference row)")
    p.add_argument("--table-only", action="store_true",
                   help="print the table of finished runs, train nothing")
    args = p.parse_args(argv)
    names = [v[0] for v in VARIANTS]
    unknown = sorted(set(args.only or []) - set(names))
    if unknown or args.parallel < 1 or args.threads < 1 or args.minutes <= 0:
        print(f"ablate: unknown variants {unknown} (choose {', '.join(names)})" if unknown
              else "ablate: --parallel, --threads and --minutes must be positive", file=sys.stderr)
        return 2
    if not (args.data_dir / "train.en.gz").is_file():
        print(f"ablate: {args.data_dir}: no Multi30k here (train.en.gz missing)", file=sys.stderr)
        return 2
    chosen = [v for v in VARIANTS if not args.only or v[0] in args.only or v[0] == names[0]]
    if not args.table_only:
        run_all(chosen, args)
    text = (f"{args.minutes:g} training minutes per variant, {args.threads} thread(s) each, "
            f"{args.parallel} at a time; validation: Multi30k val, greedy, sacreBLEU.\n\n"
            + table(chosen, args.out))
    atomic_write_text(args.out / "ablation.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
