"""Protected spans on Multi30k test sentences: what each method costs and how often spans survive.

    python -m bench.spans_bench --bundle BUNDLE [--split test_2016_flickr] [--out bench/results/spans.md]

Spans are picked automatically: numbers (digits) and capitalized words not at the start of the sentence
(runs of them form one span, e.g. "Boston Terrier"). For the alignment method (serve.engine.span_align,
the default) and every placeholder style (serve.engine.spans):
  * sentences without spans: BLEU of the protected path (no spans -> the text is translated as is)
    against the plain translation, and how many outputs are identical;
  * sentences with spans: how often every span was placed by the model (copied, at the word aligned
    to it or before the word aligned to its source neighbour; placeholders: the model copied every
    placeholder) rather than by the fallback (before the final punctuation), how often every span is
    verbatim in the final output, and BLEU against the references, with and without protection.
Greedy decoding on the engine (ONNX Runtime, CPU).
"""

from __future__ import annotations

import argparse
import gzip
import os
import re
from pathlib import Path

from nmt.decoding import DecodeOptions
from nmt.files import atomic_write_text
from serve.engine.span_align import AlignedSpans
from serve.engine.spans import STYLES, Span, check_spans, mask
from serve.engine.translator import EngineConfig, Translator

WORD = re.compile(r"\S+")


def auto_spans(text: str) -> list[Span]:
    """Digits anywhere and capitalized words after the first word, trailing punctuation left out."""
    spans: list[Span] = []
    for i, m in enumerate(WORD.finditer(text)):
        word = m.group().rstrip(".,;:!?\"')")
        start = m.start() + len(m.group()) - len(m.group().lstrip("\"'("))
        end = m.start() + len(word)
        if end <= start:
            continue
        core = text[start:end]
        if re.fullmatch(r"\d+([.,]\d+)?", core) or (i > 0 and core[:1].isupper()):
            if spans and text[spans[-1].end:start] == " " and not re.fullmatch(r"\d+", core):
                spans[-1] = Span(spans[-1].start, end)  # "Boston Terrier": one name
            else:
                spans.append(Span(start, end))
    return spans


def read(data_dir: Path, split: str, lang: str) -> list[str]:
    with gzip.open(data_dir / f"{split}.{lang}.gz", "rt", encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def bleu(hyps: list[str], refs: list[str]) -> float:
    import sacrebleu

    return sacrebleu.corpus_bleu(hyps, [refs]).score


def translate(translator: Translator, texts: list[str]) -> list[str]:
    sources = translator.tokenize(texts)
    return [h[0].text for h in translator.translate_ids(sources, DecodeOptions()) if h is not None]


def protected(translator: Translator, texts: list[str], spans: list[list[Span]], style: str
              ) -> tuple[list[str], list[bool]]:
    """Final outputs, and per text whether the model copied every placeholder itself."""
    masked = [mask(t, check_spans(t, s), style) for t, s in zip(texts, spans)]
    raw = translate(translator, [m.text for m in masked])
    copied = [all(re.search(r"(?<!\w)" + re.escape(p) + r"(?!\w)", out) for p in m.originals)
              for m, out in zip(masked, raw)]
    return [m.restorer().restore(out) for m, out in zip(masked, raw)], copied


def by_alignment(translator: Translator, texts: list[str], spans: list[list[Span]]
                 ) -> tuple[list[str], list[bool]]:
    """Final outputs, and per text whether every span was placed by the model (copied or aligned)."""
    hyps = translator.translate_ids(translator.tokenize(texts), DecodeOptions(return_alignments=True))
    placed = [AlignedSpans.of(t, check_spans(t, s), translator.tokenizer).place(h[0].tokens, h[0].alignment)
              if s else (h[0].text, 0) for t, s, h in zip(texts, spans, hyps) if h is not None]
    return [text for text, _ in placed], [fallback == 0 for _, fallback in placed]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.spans_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", required=True)
    p.add_argument("--data-dir", default=os.environ.get("NMT_DATA_DIR", "../shared/data/multi30k"))
    p.add_argument("--split", default="test_2016_flickr")
    p.add_argument("--limit", type=int, default=0, help="first N sentences only (0 = all)")
    p.add_argument("--out", default="", help="also write the table (markdown) here")
    args = p.parse_args(argv)
    translator = Translator.from_bundle(args.bundle, EngineConfig(device="cpu"))
    src, ref = read(Path(args.data_dir), args.split, "en"), read(Path(args.data_dir), args.split, "de")
    if args.limit:
        src, ref = src[:args.limit], ref[:args.limit]
    spans = [auto_spans(t) for t in src]
    if all(spans) or not any(spans):
        raise SystemExit("spans_bench: need sentences both with and without automatic spans; use more")
    plain = translate(translator, src)
    without = [i for i, s in enumerate(spans) if not s]
    with_ = [i for i, s in enumerate(spans) if s]
    n_spans = sum(len(spans[i]) for i in with_)
    base_with = bleu([plain[i] for i in with_], [ref[i] for i in with_])
    base_without = bleu([plain[i] for i in without], [ref[i] for i in without])
    rows = []
    for style in ("alignment", *STYLES):
        run = by_alignment if style == "alignment" else \
            lambda tr, texts, sp, style=style: protected(tr, texts, sp, style)
        out_without, _ = run(translator, [src[i] for i in without], [[] for _ in without])
        out_with, copied = run(translator, [src[i] for i in with_], [spans[i] for i in with_])
        kept = sum(all(src[i][s.start:s.end] in out for s in spans[i]) for i, out in zip(with_, out_with))
        identical = sum(a == plain[i] for i, a in zip(without, out_without))
        rows.append((style, bleu(out_without, [ref[i] for i in without]) - base_without,
                     f"{identical}/{len(without)}", f"{100 * sum(copied) / len(with_):.1f}",
                     f"{100 * kept / len(with_):.1f}", bleu(out_with, [ref[i] for i in with_]), base_with))
    lines = [f"Bundle {args.bundle} ({translator.name}), Multi30k {args.split}: {len(src)} sentences, "
             f"{len(with_)} with {n_spans} automatic spans (digits, capitalized words after the first).",
             "", "| method | BLEU change, no spans | identical, no spans | placed by the model % | "
             "spans verbatim % | BLEU with spans | BLEU unprotected |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {s if s == 'alignment' else 'placeholder: ' + s} | {d:+.2f} | {i} | {c} | {k} | {b:.2f} "
              f"| {u:.2f} |" for s, d, i, c, k, b, u in rows]
    table = "\n".join(lines)
    print(table)
    if args.out:
        atomic_write_text(Path(args.out), table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
