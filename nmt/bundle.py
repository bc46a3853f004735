"""The bundle contract: file names, graph IO names and the manifest. One module owns them.

export/ writes bundles with these names; the engine checks a loaded session against them
and reads the per-layer names from the session and the manifest (not from copied constants).

Encoder graph (`encoder.onnx`)
  in : input_ids [batch, src_len] int64, attention_mask [batch, src_len] bool
  out: last_hidden_state [batch, src_len, d_model],
       present.{i}.encoder.key / .value [batch, heads, src_len, head_dim]  (every decoder layer's cross K/V)
  Padded positions of the outputs are unspecified (masked wherever they are read).
Decoder graph (`decoder.onnx`), one graph for every step (first step with past_len = 0)
  in : input_ids, position_ids [batch, new_len] int64,
       self_attention_mask [batch, new_len, past_len + new_len] bool,
       encoder_attention_mask [batch, src_len] bool,
       past_key_values.{i}.decoder.key / .value [batch, heads, past_len, head_dim],
       past_key_values.{i}.encoder.key / .value [batch, heads, src_len, head_dim],
       top_k [1] int64
  out: log_probs [batch, new_len, vocab],
       topk_values / topk_indices [batch, top_k]  (of the last position: all a step needs on the host),
       present.{i}.decoder.key / .value [batch, heads, past_len + new_len, head_dim]
Alignment decoder (`decoder_alignments.onnx`, optional): the same graph with one more output,
       cross_attention [batch, n_layers, new_len, src_len]  (encoder-decoder attention averaged over
       heads, per layer); the engine runs it only for requests that ask for alignments
Slot decoder (`decoder_slots.onnx`, optional, bundles listing SLOT_CACHE): the decoder with a
  self-attention cache preallocated per row and written in place (GroupQueryAttention, CPU kernel)
  in : input_ids, position_ids [batch, 1], seqlens_k [batch] int32 (tokens row r already holds),
       total_sequence_length [1] int32 (max seqlens_k + 1), encoder_attention_mask,
       past_key_values.{i}.decoder.key / .value [batch, heads, max_len, head_dim]  (row r's tokens in
       slots 0..seqlens_k[r]-1; bound to the same buffers as present.{i}.decoder.*, which gain the new
       token at slot seqlens_k[r]), past_key_values.{i}.encoder.*, top_k
  out: log_probs, topk_values, topk_indices, present.{i}.decoder.key / .value (the past buffers);
       in bundles listing SLOT_HOST_ARGMAX, log_probs is [batch, vocab] and the top-k outputs are
       computed only for top_k > 2 (else they are a (1, 1) placeholder: greedy search reads its
       argmax, or best two, from log_probs on the host)
Reorder graph (`reorder.onnx`): a gather on the batch axis, so beams and finished rows are
  reordered/dropped where the cache lives (on the GPU) without a host round trip.
  in : index [new_batch] int64, and every cache tensor of the decoder plus encoder_attention_mask
  out: "reordered." + each of those names
Manifest (`manifest.json`, written by export.pipeline)
  format_version, name, src_lang, tgt_lang, dtype (fp32|fp16|int8), opset,
  optimizations [fused_attention, grouped_cross_kv, slot_cache, ...] (optional; see FUSED_OPTIMIZATIONS),
  model {n_encoder_layers, n_decoder_layers, d_model, n_heads, head_dim, vocab_size, max_positions, ...},
  special_ids {pad, unk, bos, eos}, files {file: {sha256, bytes}},
  io {graph: {inputs, outputs: [{name, dtype, shape}]}}, io_dtypes {cache, log_probs, ...}
  (fp16 bundles keep the K/V cache in float16; log_probs/topk_values are float32 in every dtype),
  validation {passed, max_abs_diff per output, argmax_agreement, greedy, ...}, training {step, ...},
  created_at, exporter {torch, onnx, onnxruntime}.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nmt.errors import UserError
from nmt.files import sha256_file

FORMAT_VERSION = 1

# Optimizations a bundle may carry, listed in the manifest's `optimizations` (absent = none: bundles
# written before the field existed). Neither changes the graph contract for an engine that ignores it.
FUSED_ATTENTION = "fused_attention"  # encoder/decoder written with com.microsoft MultiHeadAttention +
# SkipLayerNormalization, the attention scale folded into the query projection (export/fused.py)
GROUPED_CROSS_KV = "grouped_cross_kv"  # the decoder also accepts cross K/V and encoder mask with one row
# per source while the other inputs hold rows_per_source rows each (consecutive rows = one source's beams)
SLOT_CACHE = "slot_cache"  # the bundle also has decoder_slots.onnx (see above): rows of any age share a
# step without padding, join and leave without copying the cache
PACKED_ENCODER = "packed_encoder"  # the encoder removes padding: its position-wise layers run on the real
# tokens only (padded output positions hold copies of the row's last token)
SLOT_HOST_ARGMAX = "slot_host_argmax"  # the slot decoder works on (rows, d_model); its top-k outputs are
# computed for top_k > 2 only, greedy steps take the argmax of log_probs [rows, vocab] on the host
KEY_MASK_COLUMN = "key_mask_column"  # the encoder's self-attention takes its key padding mask as one more
# key column per head (queries: a column of ones), so ONNX Runtime's CPU flash-attention kernel runs it
FUSED_OPTIMIZATIONS = (FUSED_ATTENTION, GROUPED_CROSS_KV, SLOT_CACHE, PACKED_ENCODER, SLOT_HOST_ARGMAX,
                       KEY_MASK_COLUMN)
KNOWN_OPTIMIZATIONS = frozenset(FUSED_OPTIMIZATIONS)

ENCODER_FILE = "encoder.onnx"
DECODER_FILE = "decoder.onnx"
# The same decoder plus the cross_attention output: ONNX Runtime computes every output of a graph
# whether it is fetched or not, so alignments get their own graph and a normal step never pays.
DECODER_ALIGNMENTS_FILE = "decoder_alignments.onnx"
REORDER_FILE = "reorder.onnx"
DECODER_SLOTS_FILE = "decoder_slots.onnx"
TOKENIZER_FILE = "tokenizer.model"
MANIFEST_FILE = "manifest.json"

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
LAST_HIDDEN_STATE = "last_hidden_state"
POSITION_IDS = "position_ids"
SELF_ATTENTION_MASK = "self_attention_mask"
ENCODER_ATTENTION_MASK = "encoder_attention_mask"
TOP_K = "top_k"
LOG_PROBS = "log_probs"
TOPK_VALUES = "topk_values"
TOPK_INDICES = "topk_indices"
CROSS_ATTENTION = "cross_attention"
REORDER_INDEX = "index"
SEQLENS_K = "seqlens_k"
TOTAL_SEQUENCE_LENGTH = "total_sequence_length"
REORDERED_PREFIX = "reordered."


def past_name(layer: int, kind: str, which: str) -> str:
    """kind: 'decoder' (self-attention cache) or 'encoder' (cross-attention K/V); which: 'key'/'value'."""
    return f"past_key_values.{layer}.{kind}.{which}"


def present_name(layer: int, kind: str, which: str) -> str:
    return f"present.{layer}.{kind}.{which}"


def cache_names(n_layers: int) -> list[str]:
    """Every cache input of the decoder, per layer: self key, self value, cross key, cross value."""
    kinds = ("decoder", "encoder")
    return [past_name(i, k, w) for i in range(n_layers) for k in kinds for w in ("key", "value")]


def encoder_output_names(n_layers: int) -> list[str]:
    cross = [present_name(i, "encoder", w) for i in range(n_layers) for w in ("key", "value")]
    return [LAST_HIDDEN_STATE] + cross


def decoder_input_names(n_layers: int) -> list[str]:
    names = [INPUT_IDS, POSITION_IDS, SELF_ATTENTION_MASK, ENCODER_ATTENTION_MASK]
    return names + cache_names(n_layers) + [TOP_K]


def slot_decoder_input_names(n_layers: int) -> list[str]:
    names = [INPUT_IDS, POSITION_IDS, SEQLENS_K, TOTAL_SEQUENCE_LENGTH, ENCODER_ATTENTION_MASK]
    return names + cache_names(n_layers) + [TOP_K]


def decoder_output_names(n_layers: int, alignments: bool = False) -> list[str]:
    """The decoder's outputs; with alignments, those of decoder_alignments.onnx (cross_attention last)."""
    return [LOG_PROBS, TOPK_VALUES, TOPK_INDICES] + [
        present_name(i, "decoder", w) for i in range(n_layers) for w in ("key", "value")] + (
        [CROSS_ATTENTION] if alignments else [])


def reorder_input_names(n_layers: int) -> list[str]:
    return [REORDER_INDEX, ENCODER_ATTENTION_MASK] + cache_names(n_layers)


def reorder_output_names(n_layers: int) -> list[str]:
    return [REORDERED_PREFIX + n for n in reorder_input_names(n_layers)[1:]]


def dynamic_axes(n_layers: int) -> dict[str, dict[str, dict[int, str]]]:
    """Dynamic axes per graph, as torch.onnx.export wants them."""
    enc_kv = {0: "batch", 2: "src_len"}
    enc = {INPUT_IDS: {0: "batch", 1: "src_len"}, ATTENTION_MASK: {0: "batch", 1: "src_len"},
           LAST_HIDDEN_STATE: {0: "batch", 1: "src_len"}}
    enc.update({n: enc_kv for n in encoder_output_names(n_layers)[1:]})
    dec: dict[str, dict[int, str]] = {
        INPUT_IDS: {0: "batch", 1: "new_len"}, POSITION_IDS: {0: "batch", 1: "new_len"},
        SELF_ATTENTION_MASK: {0: "batch", 1: "new_len", 2: "total_len"},
        ENCODER_ATTENTION_MASK: {0: "batch", 1: "src_len"},
        LOG_PROBS: {0: "batch", 1: "new_len"},
        TOPK_VALUES: {0: "batch", 1: "k"}, TOPK_INDICES: {0: "batch", 1: "k"},
        CROSS_ATTENTION: {0: "batch", 2: "new_len", 3: "src_len"},
    }
    for i in range(n_layers):
        for w in ("key", "value"):
            dec[past_name(i, "decoder", w)] = {0: "batch", 2: "past_len"}
            dec[past_name(i, "encoder", w)] = enc_kv
            dec[present_name(i, "decoder", w)] = {0: "batch", 2: "total_len"}
    # Reorder: inputs have `batch` rows, outputs the index's `new_batch` rows.
    reo: dict[str, dict[int, str]] = {REORDER_INDEX: {0: "new_batch"}}
    for name in reorder_input_names(n_layers)[1:]:
        axes = {a: n for a, n in dec[name].items() if a != 0}
        reo[name] = {0: "batch", **axes}
        reo[REORDERED_PREFIX + name] = {0: "new_batch", **axes}
    return {"encoder": enc, "decoder": dec, "reorder": reo}


class BundleError(UserError):
    """A bundle that cannot be served: the message names the file and the problem."""


@dataclass
class Manifest:
    """manifest.json as a dataclass; `raw` keeps every field (training meta, validation, ...)."""

    format_version: int
    name: str
    src_lang: str
    tgt_lang: str
    dtype: str
    opset: int
    n_encoder_layers: int
    n_decoder_layers: int
    d_model: int
    n_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int
    pad_id: int
    unk_id: int
    bos_id: int
    eos_id: int
    files: dict[str, dict[str, Any]]
    raw: dict[str, Any] = field(default_factory=dict, repr=False)
    optimizations: frozenset[str] = frozenset()

    @property
    def checksum(self) -> str:
        """The bundle's version: SHA-256 of the manifest, which holds every file's SHA-256 and settings."""
        canonical = json.dumps(self.raw, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


REQUIRED_KEYS = ("format_version", "name", "src_lang", "tgt_lang", "dtype", "opset", "model", "special_ids",
                 "files")


def read_manifest(bundle_dir: str | Path, verify_checksums: bool = True) -> Manifest:
    """Read and check a bundle's manifest: format version, required keys, files present, SHA-256."""
    d = Path(bundle_dir)
    path = d / MANIFEST_FILE
    if not path.is_file():
        raise BundleError(f"{d}: not a model bundle ({MANIFEST_FILE} missing)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{path}: invalid JSON ({e})") from None
    missing = [k for k in REQUIRED_KEYS if k not in raw]
    if missing:
        raise BundleError(f"{path}: missing keys {', '.join(missing)}")
    if raw["format_version"] != FORMAT_VERSION:
        raise BundleError(f"{path}: format_version {raw['format_version']} is not supported "
                          f"(this server reads {FORMAT_VERSION})")
    problems = []
    for fname, info in raw["files"].items():
        # A bundle lists plain file names: a path that leaves the directory is not ours to read.
        if Path(fname).name != fname or fname in ("", ".", ".."):
            problems.append(f"{fname!r} is not a plain file name")
            continue
        fpath = d / fname
        if not fpath.is_file():
            problems.append(f"{fname} missing")
        elif verify_checksums and sha256_file(fpath) != info.get("sha256"):
            problems.append(f"{fname} checksum mismatch (corrupted or replaced)")
    if problems:
        raise BundleError(f"{d}: " + "; ".join(problems))
    m, s = raw["model"], raw["special_ids"]
    optimizations = raw.get("optimizations", [])
    if not isinstance(optimizations, list) or not set(optimizations) <= KNOWN_OPTIMIZATIONS:
        unknown = (sorted(set(optimizations) - KNOWN_OPTIMIZATIONS) if isinstance(optimizations, list)
                   else optimizations)
        raise BundleError(f"{path}: format_version {raw['format_version']} bundle lists optimizations "
                          f"{unknown} this server does not know")
    try:
        return Manifest(
            format_version=raw["format_version"], name=raw["name"], src_lang=raw["src_lang"],
            tgt_lang=raw["tgt_lang"], dtype=raw["dtype"], opset=raw["opset"],
            n_encoder_layers=m["n_encoder_layers"], n_decoder_layers=m["n_decoder_layers"],
            d_model=m["d_model"], n_heads=m["n_heads"], head_dim=m["head_dim"], vocab_size=m["vocab_size"],
            max_positions=m["max_positions"], pad_id=s["pad"], unk_id=s["unk"], bos_id=s["bos"],
            eos_id=s["eos"], files=raw["files"], raw=raw, optimizations=frozenset(optimizations),
        )
    except KeyError as e:
        raise BundleError(f"{path}: missing key {e}") from None
