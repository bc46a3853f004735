"""The end of a training run: choose the final weights on validation, then report the test set.

Candidates are the weights at the last step and the averages of the last k step checkpoints
(k = 2 .. keep_last): averaging smooths out the noise of the final updates. The candidate with the
highest greedy sacreBLEU on the whole validation set becomes RUN_DIR/final.pt; only then is the
test set decoded (greedy and beam), so the test set never influences a choice. Everything is
printed with the sacreBLEU signature and written to RUN_DIR/final.json.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sacrebleu
import torch

from nmt.decoding import DecodeOptions
from nmt.files import atomic_write_text
from nmt.tokenizer import Tokenizer
from train.average import average_checkpoints, step_checkpoints
from train.checkpoint import atomic_torch_save
from train.decode import translate
from train.model import Transformer

Pairs = tuple[list[str], list[str]]


@dataclass(frozen=True)
class FinalSpec:
    """What to report at the end of a run."""

    test_name: str  # printed name of the test set, e.g. "test_2016_flickr en->de"
    test: Pairs | None  # (sources, references); None = choose the final weights only
    beam_size: int = 4  # the beam row of the report (1 = greedy only)
    length_penalty: float = 1.0


# Detokenized, cased corpus BLEU with sacreBLEU's defaults (13a tokenization): comparable numbers.
METRIC = sacrebleu.BLEU()


def score(model: Transformer, tokenizer: Tokenizer, pairs: Pairs,
          opts: DecodeOptions) -> tuple[Any, float, list[str]]:
    """(sacreBLEU corpus score of pairs' translated sources against their references, seconds,
    the translations)."""
    start = time.perf_counter()
    with torch.no_grad():
        hyps = translate(model, tokenizer, pairs[0], opts)
    return METRIC.corpus_score(hyps, [pairs[1]]), time.perf_counter() - start, hyps


def choose_weights(model: Transformer, tokenizer: Tokenizer, run_dir: Path,
                   valid: Pairs) -> tuple[dict[str, Any] | None, list[dict[str, Any]], int]:
    """Load the best candidate into `model`; returns (its averaged checkpoint, or None for the last
    step's weights; one row per candidate with its validation BLEU; the chosen row's index)."""
    last_weights = {k: v.clone() for k, v in model.state_dict().items()}
    steps = step_checkpoints(run_dir)
    model.eval()
    rows: list[dict[str, Any]] = []
    best: tuple[float, dict[str, Any] | None, int] = (-1.0, None, 0)
    for k in range(1, len(steps) + 1):
        averaged = average_checkpoints(steps[-k:]) if k > 1 else None
        model.load_state_dict(averaged["model"] if averaged else last_weights)
        bleu, seconds, _ = score(model, tokenizer, valid, DecodeOptions())
        rows.append({"candidate": "last step" if k == 1 else f"average of last {k}",
                     "checkpoints": [p.name for p in steps[-k:]], "val_bleu": round(bleu.score, 2),
                     "seconds": round(seconds, 1)})
        if bleu.score > best[0]:  # ties keep the fewer checkpoints
            best = (bleu.score, averaged, k - 1)
    _, chosen, index = best
    model.load_state_dict(chosen["model"] if chosen else last_weights)
    return chosen, rows, index


def final_report(model: Transformer, tokenizer: Tokenizer, run_dir: Path, valid: Pairs, spec: FinalSpec,
                 summary: dict[str, Any], make_weights: Any) -> dict[str, Any]:
    """Choose, save RUN_DIR/final.pt, decode the test set, print and write RUN_DIR/final.json.

    `make_weights()` builds the weights-only checkpoint of the model's current state (the trainer
    knows its configs and metadata); `summary` (steps, training minutes) goes into the report.
    """
    report: dict[str, Any] = dict(summary)
    if valid[0] and step_checkpoints(run_dir):
        chosen, rows, index = choose_weights(model, tokenizer, run_dir, valid)
        report["candidates"] = rows
        best = rows[index]
        report["final"] = best["candidate"]
        print("final weights (greedy validation BLEU): "
              + ", ".join(f"{r['candidate']} {r['val_bleu']:.2f}" for r in rows)
              + f" -> {best['candidate']}", flush=True)
    else:
        chosen, report["final"] = None, "last step"
    weights = make_weights()
    if chosen is not None:
        weights["meta"] = {**weights.get("meta", {}), "averaged_from": chosen["meta"]["averaged_from"]}
    atomic_torch_save(weights, run_dir / "final.pt")
    report["checkpoint"] = str(run_dir / "final.pt")
    if spec.test is not None:
        report["test"] = test_scores(model, tokenizer, spec)
    atomic_write_text(run_dir / "final.json", json.dumps(report, indent=2) + "\n")
    return report


def test_scores(model: Transformer, tokenizer: Tokenizer, spec: FinalSpec) -> dict[str, Any]:
    assert spec.test is not None
    modes = [("greedy", DecodeOptions(length_penalty=spec.length_penalty))]
    if spec.beam_size > 1:
        modes.append((f"beam {spec.beam_size}",
                      DecodeOptions(beam_size=spec.beam_size, length_penalty=spec.length_penalty)))
    out: dict[str, Any] = {"set": spec.test_name, "sentences": len(spec.test[0])}
    print(f"{spec.test_name}, {len(spec.test[0])} sentences, final weights:", flush=True)
    for name, opts in modes:
        bleu, seconds, _ = score(model, tokenizer, spec.test, opts)
        out[name] = {"bleu": round(bleu.score, 2), "score": str(bleu), "seconds": round(seconds, 1)}
        print(f"  {name:>8}: {bleu}", flush=True)
    out["signature"] = signature = str(METRIC.get_signature())
    print(f"  signature: {signature}", flush=True)
    return out
