"""`nmt evaluate CHECKPOINT`: sacreBLEU (detokenized, cased) of greedy and beam decoding on a split."""

from __future__ import annotations

import argparse
from pathlib import Path

from nmt.decoding import DecodeOptions, InvalidRequest
from train.data import SPLITS, load_multi30k


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nmt evaluate", description=__doc__)
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--data-dir", type=Path, help="local Multi30k copy (default: $NMT_DATA_DIR or download)")
    p.add_argument("--split", default="test_2016_flickr", choices=SPLITS)
    p.add_argument("--src-lang", help="default: the checkpoint's")
    p.add_argument("--tgt-lang", help="default: the checkpoint's")
    p.add_argument("--beam", type=int, default=4, help="beam size of the beam row (1 = greedy only)")
    p.add_argument("--length-penalty", type=float, default=1.0)
    p.add_argument("--limit", type=int, help="first N sentences only")
    p.add_argument("--output", type=Path, help="write the beam (or greedy) translations here")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from train.checkpoint import load_checkpoint, model_from_checkpoint
    from train.final_weights import METRIC, score

    ckpt = load_checkpoint(args.checkpoint)
    model, tokenizer = model_from_checkpoint(ckpt)
    meta = ckpt.get("meta", {})
    src_lang = args.src_lang or meta.get("src_lang", "en")
    tgt_lang = args.tgt_lang or meta.get("tgt_lang", "de")
    src, ref = load_multi30k(args.split, src_lang, tgt_lang, args.data_dir)
    if args.limit is not None and args.limit < 1:
        raise InvalidRequest(f"--limit must be >= 1, got {args.limit}")
    src, ref = src[:args.limit], ref[:args.limit]
    runs = [("greedy", DecodeOptions(length_penalty=args.length_penalty))]
    if args.beam > 1:
        beam = DecodeOptions(beam_size=args.beam, length_penalty=args.length_penalty)
        runs.append((f"beam {args.beam}", beam))
    for _, opts in runs:
        opts.validate()
    print(f"{args.checkpoint}: step {ckpt.get('step')}, {src_lang}->{tgt_lang}, {args.split}, "
          f"{len(src)} sentences, {torch.get_num_threads()} CPU threads")
    hyps: list[str] = []
    for name, opts in runs:
        bleu, seconds, hyps = score(model, tokenizer, (src, ref), opts)
        print(f"{name:>8}: {bleu}  ({seconds:.1f}s, {len(src) / seconds:.1f} sent/s)")
    print(f"signature: {METRIC.get_signature()}")
    if args.output:
        from nmt.files import atomic_write_bytes
        atomic_write_bytes(args.output, "".join(h + "\n" for h in hyps).encode())
    return 0
