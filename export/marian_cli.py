"""`nmt import-marian MODEL_DIR --out BUNDLE`: a local Hugging Face Marian (OPUS-MT) folder -> a bundle.

    nmt import-marian ~/models/opus-mt-en-de --out bundles/en-de [--dtype int8]

Reads the folder (config.json, weights, source.spm / target.spm, vocab.json), copies the weights
into our Transformer, checks it against the transformers model itself (encoder states,
teacher-forced log-probs, greedy tokens, tokenization), then runs the normal export: graphs,
validation against our PyTorch module, manifest (with `origin` and the source/target tokenizer
pair). Nothing is written unless every check passed.
"""

from __future__ import annotations

import time
from pathlib import Path

import transformers  # noqa: F401  # the `marian` extra; a missing one is reported by nmt.cli

from export.cli import OneLineParser
from export.marian import (
    check_folder,
    compare_with_reference,
    languages,
    load_reference,
    load_tokenizer,
    model_config,
    transfer_weights,
)
from export.pipeline import (
    DEFAULT_OPSET,
    DTYPES,
    GRAPH_STYLES,
    ExportError,
    check_arguments,
    fused_style,
    write_bundle,
)
from export.validate import SENTENCES, torch_threads
from nmt.bundle import read_manifest


def main(argv: list[str]) -> int:
    p = OneLineParser(prog="nmt import-marian",
                      description="Import a local Hugging Face Marian (OPUS-MT) model folder as a bundle.")
    p.add_argument("model_dir", type=Path, help="folder with config.json, weights, source.spm, target.spm, "
                                                "vocab.json (what save_pretrained writes)")
    p.add_argument("--out", required=True, type=Path, help="bundle directory to create")
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="fp32 (default), fp16 (CUDA) or int8")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument("--name", help="model name served under (default: SRC-TGT, else the folder name)")
    p.add_argument("--force", action="store_true", help="replace an existing bundle directory")
    p.add_argument("--graphs", choices=GRAPH_STYLES, default="auto",
                   help="auto (default) and traced write traced graphs: the fused writer does not express "
                        "Marian's post-norm layers; fused is refused")
    args = p.parse_args(argv)
    start = time.perf_counter()
    folder = check_folder(args.model_dir)
    tokenizer = load_tokenizer(folder)
    cfg = model_config(folder, tokenizer)
    check_arguments(args.out, args.dtype, args.opset, args.graphs, args.force)
    hf = load_reference(folder)
    model = transfer_weights(hf, cfg)
    fused_style(args.graphs, args.dtype, model)  # refuses --graphs fused before the slow part
    with torch_threads(1):
        reference = compare_with_reference(model, hf, tokenizer, SENTENCES)
    reference["tokenization_identical"] = same_tokenization(folder.path, tokenizer)
    if not reference["passed"] or not reference["tokenization_identical"]:
        raise ExportError("the imported model does not reproduce transformers: "
                          + "; ".join(reference["failures"] or ["tokenization differs"]))
    src, tgt = languages(folder)
    origin = {"format": "marian", "model_dir": folder.path.resolve().name,
              "architectures": folder.config.get("architectures", []),
              "transformers": transformers.__version__, "reference": reference,
              # the ModelConfig options our presets leave at their defaults
              "model_options": {k: getattr(cfg, k) for k in ("activation", "embed_scale", "position_layout",
                                                             "output_bias", "pre_norm")}}
    out = write_bundle({"meta": {"src_lang": src, "tgt_lang": tgt}, "step": None}, model, tokenizer, args.out,
                       args.dtype, opset=args.opset, name=args.name or (f"{src}-{tgt}" if src and tgt
                                                                      else folder.path.resolve().name),
                       providers=None, graphs=args.graphs,
                       extra={"origin": origin, "tokenizer": tokenizer.manifest_entry()})
    m = read_manifest(out)
    v = m.raw["validation"]
    check = ("not validated: " + v["reason"]) if v.get("skipped") else (
        f"validated: worst {v['worst']['output']} diff {v['worst']['max_abs_diff']:.2g}, "
        f"greedy {v['greedy']['identical']}/{v['greedy']['sentences']} identical")
    print(f"{out}: {m.name} from {folder.path.name} ({m.dtype}, traced), transformers greedy "
          f"{reference['greedy']['identical']}/{reference['sentences']} identical; {check}; "
          f"{time.perf_counter() - start:.1f}s")
    return 0


def same_tokenization(path: Path, tokenizer) -> bool:  # noqa: ANN001 - a PairTokenizer
    """Our tokenizer gives MarianTokenizer's ids (EOS appended) on the validation sentences."""
    import warnings

    from transformers import MarianTokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Recommended: pip install sacremoses"
        theirs = MarianTokenizer.from_pretrained(str(path))
    return all(theirs(s)["input_ids"] == tokenizer.encode(s) + [tokenizer.eos_id] for s in SENTENCES)
