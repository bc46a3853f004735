"""`nmt train`: train a Transformer on Multi30k or any parallel corpus.

Every configuration problem (unknown preset or key, bad value, missing file, incompatible
flags) is collected and reported at once on one line, before anything slow happens.
Multi-GPU: `torchrun --nproc-per-node N -m nmt.cli train ...` (or the `nmt` script under torchrun).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nmt.errors import UserError
from train.config import (
    PRESETS,
    ModelConfig,
    TrainConfig,
    model_config_from_dict,
    preset,
    train_config_from_dict,
)
from train.data import LANGS, SPLITS

if TYPE_CHECKING:
    from train.final_weights import FinalSpec

FIELD_TYPES = {f.name: str(f.type) for cls in (ModelConfig, TrainConfig) for f in dataclasses.fields(cls)}


def parse_value(key: str, text: str) -> Any:
    """A --set value converted to its config field's type (ValueError names the key)."""
    kind = FIELD_TYPES[key]
    try:
        if kind == "bool":
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return text.lower() in ("true", "1", "yes")
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
        if kind.startswith("tuple"):
            return tuple(float(x) for x in text.split(","))
        return text
    except ValueError:
        raise ValueError(f"--set {key}={text}: expected a {kind}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nmt train", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small", help=f"model/training preset: {', '.join(PRESETS)}")
    p.add_argument("--out", required=True, type=Path, help="run directory (checkpoints, tokenizer, metrics)")
    p.add_argument("--data-dir", type=Path, help="local Multi30k copy (default: $NMT_DATA_DIR or download)")
    p.add_argument("--src-lang", help="source language (Multi30k: en, de, fr)")
    p.add_argument("--tgt-lang", help="target language")
    p.add_argument("--train-src", type=Path, help="custom corpus: source file (.gz allowed)")
    p.add_argument("--train-tgt", type=Path, help="custom corpus: target file aligned with --train-src")
    p.add_argument("--train-tsv", type=Path, help="custom corpus: source<TAB>target lines")
    p.add_argument("--valid-src", type=Path, help="validation source file")
    p.add_argument("--valid-tgt", type=Path, help="validation target file")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    p.add_argument("--max-minutes", type=float,
                   help="stop after this many minutes of training (validation and saving not counted; "
                   "a resumed run continues the same budget)")
    p.add_argument("--resume", action="store_true", help="continue RUN_DIR/last.pt exactly where it stopped")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any model/train config field, e.g. --set lr=5e-4 --set d_model=128")
    p.add_argument("--test-split", choices=(*SPLITS, "none"),
                   help="Multi30k split reported at the end of the run (default: test_2016_flickr)")
    p.add_argument("--test-src", type=Path, help="custom corpus: test source file reported at the end")
    p.add_argument("--test-tgt", type=Path, help="custom corpus: test references aligned with --test-src")
    p.add_argument("--final-beam", type=int, default=4,
                   help="beam size of the final test report (1 = greedy)")
    p.add_argument("--skip-final", action="store_true",
                   help="no final stage (final.pt chosen on validation, test report)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"),
                   help="mixed precision on CUDA (ignored on CPU)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def train_config_errors(tc: TrainConfig, mc: ModelConfig, multi30k: bool) -> list[str]:
    errs = []
    for name in ("max_tokens", "grad_accum", "max_steps", "eval_every", "save_every", "log_every",
                 "vocab_size", "eval_bleu_sentences"):
        if getattr(tc, name) < 1:
            errs.append(f"{name} must be >= 1, got {getattr(tc, name)}")
    if tc.lr <= 0:
        errs.append(f"lr must be positive, got {tc.lr}")
    if tc.warmup_steps < 0 or tc.max_minutes < 0 or tc.keep_last < 0:
        errs.append("warmup_steps, max_minutes and keep_last must be >= 0")
    if not 0.0 <= tc.label_smoothing < 1.0:
        errs.append(f"label_smoothing must be in [0, 1), got {tc.label_smoothing}")
    if not 2 <= tc.max_len <= mc.max_positions:
        errs.append(f"max_len must be in [2, max_positions={mc.max_positions}], got {tc.max_len}")
    if tc.vocab_size < 10:
        errs.append(f"vocab_size must be at least 10, got {tc.vocab_size}")
    if not tc.joint_vocab:
        errs.append("joint_vocab=false is not supported: a checkpoint carries one (joint) tokenizer")
    if multi30k:
        errs += [f"{side} language {lang!r} is not in Multi30k ({', '.join(LANGS)})"
                 for side, lang in (("source", tc.src_lang), ("target", tc.tgt_lang)) if lang not in LANGS]
    if tc.src_lang == tc.tgt_lang:
        errs.append(f"source and target language are both {tc.src_lang!r}")
    return errs


def corpus_errors(args: argparse.Namespace) -> list[str]:
    errs = []
    if args.train_tsv and (args.train_src or args.train_tgt):
        errs.append("give either --train-tsv or --train-src/--train-tgt, not both")
    if bool(args.train_src) != bool(args.train_tgt):
        errs.append("--train-src and --train-tgt go together")
    if bool(args.valid_src) != bool(args.valid_tgt):
        errs.append("--valid-src and --valid-tgt go together")
    if bool(args.test_src) != bool(args.test_tgt):
        errs.append("--test-src and --test-tgt go together")
    if args.test_src and args.test_split not in (None, "none"):
        errs.append("give either --test-split (Multi30k) or --test-src/--test-tgt, not both")
    if args.test_split not in (None, "none") and (args.train_tsv or args.train_src):
        errs.append("--test-split names a Multi30k split; a custom corpus takes --test-src/--test-tgt")
    if args.final_beam < 1:
        errs.append(f"--final-beam must be >= 1, got {args.final_beam}")
    for flag in ("data_dir", "train_src", "train_tgt", "train_tsv", "valid_src", "valid_tgt", "test_src",
                 "test_tgt"):
        path = getattr(args, flag)
        if path is not None and not path.exists():
            errs.append(f"--{flag.replace('_', '-')} {path}: does not exist")
    return errs


def configure(args: argparse.Namespace) -> tuple[ModelConfig, TrainConfig, list[str]]:
    """The (model, train) configs the flags ask for, and every error found on the way."""
    errs: list[str] = []
    overrides: dict[str, Any] = {}
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep:
            errs.append(f"--set {item}: expected KEY=VALUE")
        elif key not in FIELD_TYPES:
            errs.append(f"--set {key}: unknown config field")
        else:
            try:
                overrides[key] = parse_value(key, value)
            except ValueError as e:
                errs.append(str(e))
    budgets = {k: v for k, v in (("max_steps", args.max_steps), ("max_minutes", args.max_minutes),
                                  ("src_lang", args.src_lang), ("tgt_lang", args.tgt_lang)) if v is not None}
    last = args.out / "last.pt"
    if args.resume and last.is_file():  # a resumed run keeps its configs; only budgets may change
        from train.checkpoint import load_checkpoint
        ckpt = load_checkpoint(last)
        mc = model_config_from_dict(ckpt["model_config"])
        tc = dataclasses.replace(train_config_from_dict(ckpt["train_config"]),
                                 **{k: v for k, v in budgets.items() if k in ("max_steps", "max_minutes")})
        return mc, tc, errs + corpus_errors(args)
    if args.preset not in PRESETS:
        errs.append(f"unknown preset {args.preset!r} (choose {', '.join(PRESETS)})")
        mc, tc = ModelConfig(), TrainConfig()
    else:
        try:
            mc, tc = preset(args.preset, **{**overrides, **budgets})
        except TypeError as e:
            errs.append(f"bad config value: {e}")
            mc, tc = ModelConfig(), TrainConfig()
    multi30k = not (args.train_tsv or args.train_src)
    return mc, tc, errs + mc.errors() + train_config_errors(tc, mc, multi30k) + corpus_errors(args)


def final_spec(args: argparse.Namespace, tc: TrainConfig) -> FinalSpec:
    """The final report's test set, read before training so a missing file fails fast."""
    from train.data import load_multi30k, read_parallel
    from train.final_weights import FinalSpec

    test, name = None, ""
    if args.test_src:
        test, name = read_parallel(args.test_src, args.test_tgt), str(args.test_src)
    elif not (args.train_tsv or args.train_src) and args.test_split != "none":
        split = args.test_split or "test_2016_flickr"
        test = load_multi30k(split, tc.src_lang, tc.tgt_lang, args.data_dir)
        name = f"Multi30k {split} {tc.src_lang}->{tc.tgt_lang}"
    return FinalSpec(test_name=name, test=test, beam_size=args.final_beam)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    mc, tc, errs = configure(args)
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            errs.append("--device cuda: no CUDA device is available")
    if errs:
        raise UserError(f"invalid configuration: {'; '.join(errs)}")
    final = None if args.skip_final else final_spec(args, tc)
    from train.trainer import RunSpec, Trainer
    spec = RunSpec(out=args.out, data_dir=args.data_dir, train_src=args.train_src,
                   train_tgt=args.train_tgt, train_tsv=args.train_tsv, valid_src=args.valid_src,
                   valid_tgt=args.valid_tgt,
                   device=args.device, amp=args.amp, resume=args.resume, progress=not args.no_progress)
    trainer = Trainer(mc, tc, spec)
    last = trainer.fit()
    if not trainer.is_main:
        return 0
    print(f"step {trainer.step}: {last} (best val BLEU {max(trainer.best_bleu, 0.0):.2f}, "
          f"{trainer.tokens_seen} target tokens in {trainer.elapsed / 60:.1f} training minutes)", flush=True)
    if final is not None:
        from train.final_weights import final_report
        summary = {"steps": trainer.step, "training_seconds": round(trainer.elapsed, 3),
                   "target_tokens": trainer.tokens_seen}
        final_report(trainer.model, trainer.tokenizer, args.out, trainer.valid, final, summary,
                     lambda: trainer.weights(final=True))
    return 0
