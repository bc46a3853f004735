"""Checkpoint -> bundle, in a fixed order: build -> export -> validate -> save.

Everything is written into a temporary directory beside the target and renamed into place
only after validation passed, so a crash, a full disk or a failed validation never leaves a
half bundle behind.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort
import torch

from export.fused import fused_decoder, fused_encoder, sort_nodes, unsupported
from export.graphs import DecoderGraph, EncoderGraph, ReorderGraph
from export.validate import validate_graphs
from nmt import bundle as sb
from nmt.errors import EXIT_FAILURE, EXIT_USAGE, UserError
from nmt.pair_tokenizer import BundleTokenizer, PairTokenizer
from train.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from train.model import Transformer

DTYPES = ("fp32", "fp16", "int8")
DEFAULT_OPSET = 17  # well covered by ONNX Runtime's CPU and CUDA kernels and by the TorchScript exporter
OPSETS = range(13, 22)  # the opsets this exporter was checked with
GRAPHS = {"encoder": sb.ENCODER_FILE, "decoder": sb.DECODER_FILE,  # kind -> file (the last one optional)
          "decoder_alignments": sb.DECODER_ALIGNMENTS_FILE, "reorder": sb.REORDER_FILE,
          "decoder_slots": sb.DECODER_SLOTS_FILE}
GRAPH_STYLES = ("auto", "fused", "traced")


class ExportError(UserError):
    """An export that cannot proceed or did not validate; the message is one line for the user."""

    exit_code = EXIT_FAILURE


def example_inputs(model: Transformer, cache_dtype: torch.dtype = torch.float32) -> dict[str, tuple]:
    """Small example inputs per graph. Sizes are deliberately odd (B=2, S=5, P=3) and validation
    uses other sizes, so a dimension the tracer baked in is caught."""
    cfg = model.cfg
    L, H, Dh = cfg.n_decoder_layers, cfg.n_heads, cfg.head_dim
    B, S, P, T = 2, 5, 3, 1
    ids = torch.randint(4, cfg.src_vocab_size, (B, S))  # (B, S)
    src_mask = torch.ones(B, S, dtype=torch.bool)  # (B, S)
    src_mask[1, -2:] = False  # a padded row, so masking is traced through data, not constants
    cache = []
    for _ in range(L):
        cache += [torch.randn(B, H, P, Dh, dtype=cache_dtype) for _ in range(2)]  # self past (B, H, P, Dh)
        cache += [torch.randn(B, H, S, Dh, dtype=cache_dtype) for _ in range(2)]  # cross (B, H, S, Dh)
    decoder = (torch.randint(4, cfg.tgt_vocab_size, (B, T)), torch.full((B, T), P),
               torch.ones(B, T, P + T, dtype=torch.bool), src_mask, *cache, torch.tensor([3]))
    reorder = (torch.tensor([1, 0, 1]), src_mask, *cache)
    return {"encoder": (ids, src_mask), "decoder": decoder, "reorder": reorder}


def export_graphs(model: Transformer, out_dir: Path, opset: int, dtype: str) -> None:
    """The three graphs (float32 maths; fp16/int8 conversion comes after), with the names and
    dynamic axes nmt.bundle defines."""
    L = model.cfg.n_decoder_layers
    ex, axes = example_inputs(model), sb.dynamic_axes(L)
    # The reorder graph only moves data: it is exported directly in the cache's dtype.
    reorder_ex = example_inputs(model, torch.float16)["reorder"] if dtype == "fp16" else ex["reorder"]
    # Folding turns the tied output projection into a second, transposed copy of the embedding
    # (8 MB of the `small` decoder's 28). ORT folds it at load anyway, so fp32/fp16 keep one copy
    # on disk; int8 folds, because dynamic quantization only quantizes weights stored as initializers.
    fold_decoder = dtype == "int8"
    specs = [
        (EncoderGraph(model), ex["encoder"], sb.ENCODER_FILE, [sb.INPUT_IDS, sb.ATTENTION_MASK],
         sb.encoder_output_names(L), axes["encoder"], True),
        (DecoderGraph(model), ex["decoder"], sb.DECODER_FILE, sb.decoder_input_names(L),
         sb.decoder_output_names(L, alignments=True), axes["decoder"], fold_decoder),
        (ReorderGraph(), reorder_ex, sb.REORDER_FILE, sb.reorder_input_names(L),
         sb.reorder_output_names(L), axes["reorder"], True),
    ]
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns about Python ints taken from shapes (head_dim); validation runs other
        # shapes than the example, so a size that really got baked in fails there.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # dynamo=False is deliberate: dynamic_axes
        for module, args, fname, inputs, outputs, dyn, fold in specs:
            torch.onnx.export(module.eval(), args, str(out_dir / fname), input_names=inputs,
                              output_names=outputs, dynamic_axes=dyn, opset_version=opset,
                              do_constant_folding=fold, dynamo=False)


def fused_style(style: str, dtype: str, model: Transformer) -> bool:
    """Whether the encoder and decoder are written with fused ops (export/fused.py).

    auto: for fp32/int8 models the fused writer can express (pre-norm, relu, ...). fp16 stays traced
    by default: its fused kernels run on
    CUDA only, and this exporter validates fp16 on the CPU provider when no GPU is present."""
    if style == "traced":
        return False
    reasons = unsupported(model.cfg)
    if reasons:
        if style == "fused":
            raise ExportError(f"--graphs fused cannot write this model ({', '.join(reasons)}): "
                              f"use --graphs traced or auto", exit_code=EXIT_USAGE)
        return False
    return style == "fused" or dtype != "fp16"


def write_fused(model: Transformer, out_dir: Path, opset: int, slots: bool) -> None:
    """slots: also the slot decoder, for fp32/int8 (its runtime path is the CPU one: ONNX Runtime's
    CUDA GroupQueryAttention takes fp16/bf16 only, and the fp16 bundles keep the traced graphs)."""
    fused_encoder(model, out_dir / sb.ENCODER_FILE, opset)
    fused_decoder(model, out_dir / sb.DECODER_FILE, opset)
    if slots:
        fused_decoder(model, out_dir / sb.DECODER_SLOTS_FILE, opset, slots=True)


def quantize_int8(out_dir: Path) -> None:
    """Dynamic int8 quantization of the MatMul/Gemm weights; IO stays float32.

    Embedding lookups (Gather) stay float32: quantizing them halves the bundle but measurably
    lowered the tiny model's argmax agreement, and a lookup gains no speed from int8."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    for fname in (sb.ENCODER_FILE, sb.DECODER_FILE, sb.DECODER_SLOTS_FILE):
        path = out_dir / fname
        if not path.exists():  # the slot decoder comes with fused graphs only
            continue
        tmp = out_dir / f"{fname}.int8"
        # It logs a pre-processing hint on the root logger for every call; that is for static quantization.
        logging.disable(logging.WARNING)
        try:
            quantize_dynamic(path, tmp, op_types_to_quantize=["MatMul", "Gemm"], weight_type=QuantType.QInt8,
                             per_channel=False,  # per-channel measured no better on our models
                             # the fused graphs' com.microsoft ops have no ONNX shape inference
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        finally:
            logging.disable(logging.NOTSET)
        model = onnx.load(str(tmp))
        # The quantizer sorts nodes by their explicit inputs only: an If whose branch reads a value
        # of the outer graph (the slot decoder's top-k) can land before that value's producer.
        sort_nodes(model.graph)
        onnx.save(model, str(tmp))
        os.replace(tmp, path)


def convert_fp16(out_dir: Path) -> None:
    """fp16 weights and compute for CUDA. The K/V cache is fp16 too (half the memory, no casts per
    step); ids, masks, log_probs and topk_values stay as they are, LogSoftmax/TopK run in fp32."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    keep = {sb.ENCODER_FILE: [], sb.DECODER_FILE: [sb.LOG_PROBS, sb.TOPK_VALUES, sb.CROSS_ATTENTION]}
    for fname, keep_io in keep.items():
        path = out_dir / fname
        m = OnnxModel(convert_float_to_float16(
            onnx.load(str(path)), keep_io_types=keep_io,
            op_block_list=list(DEFAULT_OP_BLOCK_LIST) + ["LogSoftmax", "TopK"]))
        m.topological_sort()  # the converter appends its Cast nodes after their consumers
        onnx.save(m.model, str(path))


def graph_io(path: Path) -> dict[str, list[dict[str, Any]]]:
    """Names, element types and shapes (symbolic axes by name) of a graph's inputs and outputs."""
    g = onnx.load(str(path), load_external_data=False).graph

    def describe(v: onnx.ValueInfoProto) -> dict[str, Any]:
        t = v.type.tensor_type
        shape = [d.dim_param or d.dim_value for d in t.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name
        return {"name": v.name, "dtype": dtype, "shape": shape}

    return {"inputs": [describe(v) for v in g.input], "outputs": [describe(v) for v in g.output]}


def build_manifest(ckpt: dict[str, Any], model: Transformer, out_dir: Path, *, name: str, dtype: str,
                   opset: int, validation: dict[str, Any], export_seconds: float,
                   optimizations: list[str], tokenizer_files: list[str] = [sb.TOKENIZER_FILE],  # noqa: B006
                   ) -> dict[str, Any]:
    cfg, meta = model.cfg, ckpt.get("meta", {})
    graphs = graph_files(out_dir)
    files = [*graphs.values(), *tokenizer_files]
    io = {g: graph_io(out_dir / f) for g, f in graphs.items()}
    cache_dtype = next(i["dtype"] for i in io["decoder"]["inputs"]
                       if i["name"] == sb.past_name(0, "decoder", "key"))
    return {
        "format_version": sb.FORMAT_VERSION,
        "name": name,
        "src_lang": meta.get("src_lang", ckpt.get("train_config", {}).get("src_lang", "")),
        "tgt_lang": meta.get("tgt_lang", ckpt.get("train_config", {}).get("tgt_lang", "")),
        "dtype": dtype,
        "opset": opset,
        "optimizations": optimizations,
        "model": {
            "n_encoder_layers": cfg.n_encoder_layers, "n_decoder_layers": cfg.n_decoder_layers,
            "d_model": cfg.d_model, "n_heads": cfg.n_heads, "head_dim": cfg.head_dim, "d_ff": cfg.d_ff,
            "vocab_size": cfg.tgt_vocab_size, "src_vocab_size": cfg.src_vocab_size,
            "tgt_vocab_size": cfg.tgt_vocab_size, "max_positions": cfg.max_positions,
            "pre_norm": cfg.pre_norm, "share_embeddings": cfg.share_embeddings, "tie_output": cfg.tie_output,
            "parameters": sum(p.numel() for p in model.parameters()),
        },
        "special_ids": {"pad": cfg.pad_id, "unk": cfg.unk_id, "bos": cfg.bos_id, "eos": cfg.eos_id},
        "io_dtypes": {"cache": cache_dtype, "log_probs": "float32", "topk_values": "float32",
                      "ids": "int64", "masks": "bool"},
        "files": {f: {"sha256": sb.sha256_file(out_dir / f), "bytes": (out_dir / f).stat().st_size}
                  for f in files},
        "io": io,
        "validation": validation,
        "training": {"step": ckpt.get("step"), **{k: v for k, v in meta.items() if is_json_scalar(v)}},
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "export_seconds": round(export_seconds, 2),
        "exporter": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__},
    }


def graph_files(out_dir: Path) -> dict[str, str]:
    """The bundle graphs written into out_dir, kind -> file name."""
    return {g: f for g, f in GRAPHS.items() if (out_dir / f).exists()}


def split_alignment_graph(out_dir: Path) -> None:
    """decoder_alignments.onnx = the exported decoder; decoder.onnx = the same without cross_attention."""
    shutil.copyfile(out_dir / sb.DECODER_FILE, out_dir / sb.DECODER_ALIGNMENTS_FILE)
    strip_cross_attention(out_dir / sb.DECODER_FILE)


def strip_cross_attention(path: Path) -> None:
    """Remove the cross_attention output and the nodes only it needs from a decoder graph, in place."""
    model = onnx.load(str(path))
    g = model.graph
    kept_outputs = [o for o in g.output if o.name != sb.CROSS_ATTENTION]
    del g.output[:]
    g.output.extend(kept_outputs)
    needed = {o.name for o in g.output}
    live = []
    for node in reversed(g.node):  # nodes are topologically sorted: walk back from the outputs
        if any(name in needed for name in node.output):
            live.append(node)
            needed.update(node.input)
    del g.node[:]
    g.node.extend(reversed(live))
    onnx.save(model, str(path))


def strip_alignment_output(bundle: Path, out: Path) -> Path:
    """Copy `bundle` to `out` without its alignment graph: a bundle that serves everything but
    alignments (what a bundle without the graph must do)."""
    shutil.copytree(bundle, out)
    (out / sb.DECODER_ALIGNMENTS_FILE).unlink()
    manifest = json.loads((out / sb.MANIFEST_FILE).read_text(encoding="utf-8"))
    del manifest["files"][sb.DECODER_ALIGNMENTS_FILE]
    manifest["io"].pop("decoder_alignments", None)
    write_json(out / sb.MANIFEST_FILE, manifest)
    return out


def is_json_scalar(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool))


def check_target(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not force:
        raise ExportError(f"{out_dir} already exists (use --force to replace it)")
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir} exists and is not a directory")


def make_temp_dir(out_dir: Path) -> Path:
    """The temporary bundle directory, beside the target (same filesystem: the final rename is atomic)."""
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; a bundle is read by whichever user serves it
        return tmp
    except OSError as e:
        raise ExportError(f"cannot write to {out_dir.parent}: {e.strerror or e}") from None


def move_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename the finished bundle into place; an old bundle (--force) is swapped out first, then deleted."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_bundle(checkpoint_path: str | Path, out_dir: str | Path, dtype: str = "fp32", *,
                  opset: int = DEFAULT_OPSET, name: str | None = None, force: bool = False,
                  providers: list[str] | None = None, graphs: str = "auto") -> Path:
    """Export a checkpoint to a validated bundle directory and return its path.

    Raises ExportError (bad arguments, unwritable target, failed validation: nothing written)
    or train.checkpoint.CheckpointError (missing or unreadable checkpoint).
    """
    out_dir = Path(out_dir)
    check_arguments(out_dir, dtype, opset, graphs, force)  # before the slow part
    ckpt = load_checkpoint(checkpoint_path)
    try:
        model, tokenizer = model_from_checkpoint(ckpt)
    except (KeyError, RuntimeError, ValueError) as e:  # config, weights and tokenizer that do not fit
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{checkpoint_path}: cannot rebuild the model ({reason})") from None
    return write_bundle(ckpt, model, tokenizer, out_dir, dtype, opset=opset,
                        name=name or default_name(ckpt, out_dir), providers=providers, graphs=graphs)


def check_arguments(out_dir: Path, dtype: str, opset: int, graphs: str, force: bool) -> None:
    if dtype not in DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if opset not in OPSETS:
        raise ExportError(f"opset {opset} is not supported; choose {OPSETS.start}..{OPSETS.stop - 1}")
    if graphs not in GRAPH_STYLES:
        raise ExportError(f"unknown graphs style {graphs!r}; choose one of {', '.join(GRAPH_STYLES)}")
    check_target(out_dir, force)


def write_bundle(ckpt: dict[str, Any], model: Transformer, tokenizer: BundleTokenizer, out_dir: Path,
                 dtype: str, *, opset: int, name: str, providers: list[str] | None, graphs: str,
                 extra: dict[str, Any] | None = None) -> Path:
    """Export, validate and move a loaded model into place as a bundle (arguments already checked).

    `ckpt` supplies the languages and training meta; `extra` adds manifest fields (an import's origin).
    """
    tmp = make_temp_dir(out_dir)
    try:
        start = time.perf_counter()
        export_graphs(model, tmp, opset, dtype)
        fused = fused_style(graphs, dtype, model)
        if fused:  # the traced encoder and decoder (with its alignment output) are replaced
            write_fused(model, tmp, opset, slots=dtype != "fp16")
        if dtype == "int8":
            quantize_int8(tmp)
        elif dtype == "fp16":
            convert_fp16(tmp)
        split_alignment_graph(tmp)  # decoder.onnx and decoder_alignments.onnx from one graph
        optimizations = [o for o in sb.FUSED_OPTIMIZATIONS if fused and (
            o not in (sb.SLOT_CACHE, sb.SLOT_HOST_ARGMAX) or (tmp / sb.DECODER_SLOTS_FILE).exists())]
        for f in graph_files(tmp).values():
            onnx.checker.check_model(str(tmp / f))
        export_seconds = time.perf_counter() - start
        validation = run_validation(model, tokenizer, tmp, dtype, providers, optimizations)
        if not validation["passed"] and not validation.get("skipped"):
            raise ExportError(f"validation failed ({dtype}): " + "; ".join(validation["failures"]))
        tokenizer_files = save_tokenizer(tokenizer, tmp)
        manifest = build_manifest(ckpt, model, tmp, name=name, dtype=dtype,
                                  opset=opset, validation=validation, export_seconds=export_seconds,
                                  optimizations=optimizations, tokenizer_files=tokenizer_files)
        manifest.update(extra or {})
        write_json(tmp / sb.MANIFEST_FILE, manifest)
        sb.read_manifest(tmp)  # the engine's own reader must accept what we wrote
        move_into_place(tmp, out_dir)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = "no space left on device" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise ExportError(f"cannot write bundle {out_dir}: {reason}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def save_tokenizer(tokenizer: BundleTokenizer, out_dir: Path) -> list[str]:
    """Write the bundle's tokenizer files; returns their names (our one model, or a pair's files)."""
    if isinstance(tokenizer, PairTokenizer):
        return tokenizer.save(out_dir)
    tokenizer.save(out_dir / sb.TOKENIZER_FILE)
    return [sb.TOKENIZER_FILE]


def run_validation(model: Transformer, tokenizer: BundleTokenizer, graph_dir: Path, dtype: str,
                   providers: list[str] | None, optimizations: list[str] = []) -> dict[str, Any]:  # noqa: B006
    """Validate on the given providers; fp16 graphs the CPU provider cannot run are recorded unvalidated."""
    if providers is None and dtype == "fp16":
        cuda = "CUDAExecutionProvider" in usable_providers()
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else None
    start = time.perf_counter()
    try:
        report = validate_graphs(model, tokenizer, graph_dir, dtype, providers,
                                 grouped_cross=sb.GROUPED_CROSS_KV in optimizations)
        report["seconds"] = round(time.perf_counter() - start, 2)
        if dtype == "fp16" and "CUDAExecutionProvider" not in report["providers"]:
            report["note"] = "validated on the CPU provider only; CUDA kernels were not exercised"
        return report
    except Exception as e:  # ORT raises its own exception types for missing kernels
        if dtype != "fp16":
            raise
        return {"passed": False, "skipped": True, "failures": [],
                "reason": f"fp16 graphs need the CUDA execution provider to validate "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:200]})"}


def usable_providers() -> list[str]:
    """Providers that can actually start here (onnxruntime-gpu lists CUDA even without a GPU)."""
    if torch.cuda.is_available():
        return ort.get_available_providers()
    return ["CPUExecutionProvider"]


def default_name(ckpt: dict[str, Any], out_dir: Path) -> str:
    meta = ckpt.get("meta", {})
    if meta.get("src_lang") and meta.get("tgt_lang"):
        return f"{meta['src_lang']}-{meta['tgt_lang']}"
    return out_dir.name


def write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")
