"""`nmt average RUN_DIR --last N --out FILE`: average the weights of a run's last N step checkpoints.

Averaging the final checkpoints of a run smooths out the noise of the last updates and
usually gains a little BLEU for free (Vaswani et al. average the last 5).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from nmt.errors import UserError


class AverageError(UserError):
    pass


def step_checkpoints(run_dir: Path) -> list[Path]:
    """step_{N}.pt files of a run, oldest first."""
    found = [(int(m.group(1)), p) for p in run_dir.glob("step_*.pt")
             if (m := re.fullmatch(r"step_(\d+)\.pt", p.name))]
    return [p for _, p in sorted(found)]


def average_checkpoints(paths: list[Path]) -> dict[str, Any]:
    """One checkpoint whose float weights are the mean of the given ones (configs must match)."""
    from train.checkpoint import load_checkpoint

    newest = load_checkpoint(paths[-1])
    total = {k: v.double() if v.is_floating_point() else v for k, v in newest["model"].items()}
    for path in paths[:-1]:
        ckpt = load_checkpoint(path)
        if ckpt["model_config"] != newest["model_config"] or ckpt["model"].keys() != total.keys():
            raise AverageError(f"{path}: model differs from {paths[-1]}; cannot average")
        for k, v in ckpt["model"].items():
            if v.is_floating_point():
                total[k] += v.double()
    dtypes = {k: v.dtype for k, v in newest["model"].items()}
    model = {k: (v / len(paths)).to(dtypes[k]) if v.is_floating_point() else v for k, v in total.items()}
    meta = {**newest.get("meta", {}), "averaged_from": [p.name for p in paths]}
    keep = ("format", "format_version", "model_config", "train_config", "tokenizer", "step")
    return {**{k: newest[k] for k in keep}, "model": model, "meta": meta}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="nmt average", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--last", type=int, default=5, help="how many of the newest step checkpoints")
    p.add_argument("--out", type=Path, required=True, help="averaged checkpoint file")
    args = p.parse_args(argv)
    from train.checkpoint import atomic_torch_save

    if args.last < 1:
        raise AverageError(f"--last must be >= 1, got {args.last}")
    paths = step_checkpoints(args.run_dir)
    if len(paths) < args.last:
        raise AverageError(f"{args.run_dir}: only {len(paths)} step_*.pt checkpoints, "
                           f"--last {args.last} asked")
    paths = paths[-args.last:]
    atomic_torch_save(average_checkpoints(paths), args.out)
    print(f"{args.out}: average of {', '.join(p.name for p in paths)}")
    return 0
