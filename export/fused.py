"""Decoder and encoder graphs written directly with ONNX Runtime's fused `com.microsoft` ops.

The traced graphs leave ~150 kernels per decoder step: ORT's optimizer cannot find attention or
SkipLayerNorm in them (pre-norm residuals have two consumers, the Where mask and Concat-past do
not match its patterns). These graphs are built from the same weights with
  * MultiHeadAttention: self-attention over past/present (the Q/K/V biases packed into its bias
    input), cross-attention over the encoder's cached K/V with the source padding mask;
  * the residual add, output-projection bias and next LayerNorm as Add + LayerNormalization: ORT's
    fused SkipLayerNormalization (`skip_layernorm=True`) is slower on CPU (16 of 98 ms of a 64-sentence
    encoder batch, against 4 of 88 ms; batch-64 decoding up to 1.28x faster without it, batch 1 the
    same or better: onnxruntime 1.31, bench/results/skip-layernorm.md);
  * the 1/sqrt(head_dim) scale folded into the query projection, sqrt(d_model) into the embedding.
Every op has CPU and CUDA kernels. The IO contract is nmt.bundle's, unchanged, with one
extension recorded in the manifest (`optimizations`): the cross-attention K/V and encoder mask may
hold one row per *source* while the other inputs hold `rows_per_source` rows each (beam search),
the queries of a source's beams are then attended together (a reshape, no copy of the K/V).
The alignment decoder is the same graph with the head-averaged cross-attention probabilities
recomputed beside MHA (which does not return them). Only models of our own shape are written
this way (`unsupported` lists what is not: post-norm, other activations, ...); the others keep
the traced graphs.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from nmt import bundle as sb
from train.config import ModelConfig
from train.model import Transformer

MS = "com.microsoft"
FLOAT, INT64, BOOL = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL


def unsupported(cfg: ModelConfig) -> list[str]:
    """What these graphs cannot express about a model (empty: it can be written fused)."""
    reasons = []
    if not cfg.pre_norm:
        reasons.append("post-norm layers")
    if cfg.activation != "relu":
        reasons.append(f"{cfg.activation} activation")
    if not cfg.embed_scale:
        reasons.append("unscaled embeddings")
    if cfg.output_bias:
        reasons.append("an output bias")
    return reasons


class Builder:
    """Accumulates nodes and initializers; names are made unique by a counter."""

    def __init__(self, skip_layernorm: bool = False) -> None:
        self.skip_layernorm = skip_layernorm
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.n = 0

    def weight(self, name: str, value: np.ndarray | torch.Tensor) -> str:
        if isinstance(value, torch.Tensor):
            value = value.detach().float().numpy()
        value = np.require(value, requirements="C")  # (ascontiguousarray would turn a scalar into (1,))
        self.inits.append(onnx.numpy_helper.from_array(value, name))
        return name

    def const(self, value: list[int]) -> str:
        self.n += 1
        return self.weight(f"const_{self.n}", np.asarray(value, dtype=np.int64))

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, outputs: list[str] | None = None,
           domain: str = "", **attrs: Any) -> list[str]:
        self.n += 1
        outs = outputs or [f"{op_type.lower()}_{self.n}_{j}" for j in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=f"{op_type}_{self.n}",
                                           domain=domain, **attrs))
        return outs

    def one(self, op_type: str, inputs: list[str], domain: str = "", **attrs: Any) -> str:
        return self.op(op_type, inputs, domain=domain, **attrs)[0]

    def skip_norm(self, x: str, skip: str, norm: Any, bias: str | None, prefix: str
                  ) -> tuple[str, str]:
        """LN(x + skip + bias) and the sum itself (the residual stream)."""
        g = self.weight(f"{prefix}.gamma", norm.weight)
        b = self.weight(f"{prefix}.beta", norm.bias)
        if not self.skip_layernorm:
            total = self.one("Add", [self.one("Add", [x, bias]), skip] if bias else [x, skip])
            return self.one("LayerNormalization", [total, g, b], axis=-1, epsilon=norm.eps), total
        inputs = [x, skip, g, b] + ([bias] if bias else [])
        out = self.op("SkipLayerNormalization", inputs, n_out=4, domain=MS, epsilon=norm.eps)
        return out[0], out[3]

    def linear(self, x: str, w: torch.Tensor, b: torch.Tensor | None, prefix: str, scale: float = 1.0) -> str:
        """x @ w.T (+ b); the bias add is a separate Add ORT fuses into the MatMul's epilogue."""
        y = self.one("MatMul", [x, self.weight(f"{prefix}.weight", w.detach().float().T * scale)])
        if b is None:
            return y
        return self.one("Add", [y, self.weight(f"{prefix}.bias", b.detach().float() * scale)])

    def ffn(self, h: str, ff: Any, prefix: str) -> tuple[str, str]:
        """relu(h W1 + b1) W2; returns (pre-bias output, its bias name) for the next SkipLayerNorm."""
        up, down = ff.net[0], ff.net[3]
        a = self.one("Relu", [self.linear(h, up.weight, up.bias, f"{prefix}.ff1")])
        y = self.one("MatMul", [a, self.weight(f"{prefix}.ff2.weight", down.weight.detach().float().T)])
        return y, self.weight(f"{prefix}.ff2.bias", down.bias)

    def packed_qkv(self, h: str, attn: Any, prefix: str, head_dim: int) -> str:
        """h @ [Wq*s; Wk; Wv].T without the biases (MultiHeadAttention adds them), s = 1/sqrt(head_dim)."""
        s = 1.0 / math.sqrt(head_dim)
        w = torch.cat([attn.q_proj.weight * s, attn.k_proj.weight, attn.v_proj.weight], 0)  # (3D, D)
        return self.one("MatMul", [h, self.weight(f"{prefix}.qkv.weight", w.detach().float().T)])

    def packed_bias(self, attn: Any, prefix: str, head_dim: int) -> str:
        """[bq*s, bk, bv] (3D,), the biases of packed_qkv's columns."""
        s = 1.0 / math.sqrt(head_dim)
        bias = torch.cat([attn.q_proj.bias * s, attn.k_proj.bias, attn.v_proj.bias])  # (3D,)
        return self.weight(f"{prefix}.qkv.bias", bias.detach().float())

    def attention(self, qkv: str, attn: Any, prefix: str, heads: int, head_dim: int, extra: list[str],
                  outputs: list[str] | None = None) -> list[str]:
        """MultiHeadAttention over packed Q/K/V (..., 3D) with their biases; `extra` = the optional MHA
        inputs after the bias (key_padding_mask, attention_bias, past_key, past_value)."""
        q, k, v = self.op("Split", [qkv, self.const([attn.q_proj.out_features] * 3)], n_out=3, axis=-1)
        ins = [q, k, v, self.packed_bias(attn, prefix, head_dim)] + extra
        return self.op("MultiHeadAttention", ins, n_out=3 if outputs else 1, outputs=outputs, domain=MS,
                       num_heads=heads, scale=1.0)

    def self_attention(self, h: str, attn: Any, prefix: str, heads: int, head_dim: int,
                       extra: list[str], outputs: list[str] | None = None) -> tuple[str, list[str]]:
        """Packed Q/K/V projection, MultiHeadAttention and the output projection (without its bias)."""
        out = self.attention(self.packed_qkv(h, attn, prefix, head_dim), attn, prefix, heads, head_dim,
                             extra, outputs)
        w_out = self.weight(f"{prefix}.out.weight", attn.out_proj.weight.detach().float().T)
        return self.one("MatMul", [out[0], w_out]), out

    def slot_self_attention(self, h: str, attn: Any, prefix: str, heads: int, head_dim: int,
                            cache: list[str], outputs: list[str]) -> str:
        """Self-attention over a preallocated cache written in place: GroupQueryAttention with as
        many K/V heads as query heads (plain MHA) on the packed, biased Q/K/V; `cache` = past key,
        past value, seqlens_k, total_sequence_length. Per-row lengths, no mask, no concatenation."""
        qkv = self.one("Add", [self.packed_qkv(h, attn, prefix, head_dim),
                               self.packed_bias(attn, prefix, head_dim)])  # (R, 3D)
        qkv = self.one("Reshape", [qkv, self.const([-1, 1, 3 * heads * head_dim])])  # (R, 1, 3D)
        out = self.op("GroupQueryAttention", [qkv, "", "", *cache], outputs=outputs, domain=MS,
                      num_heads=heads, kv_num_heads=heads, scale=1.0)
        out2d = self.one("Reshape", [out[0], self.const([-1, heads * head_dim])])  # (R, D)
        w_out = self.weight(f"{prefix}.out.weight", attn.out_proj.weight.detach().float().T)
        return self.one("MatMul", [out2d, w_out])


def cross_probs(b: Builder, qg: str, key: str, src_bias: str, q: str, heads: int, head_dim: int,
                opset: int) -> str:
    """Head-averaged softmax(q k^T + mask) of one cross-attention layer, as (R, 1, T, S).

    MultiHeadAttention does not return its probabilities, so the alignment graph recomputes them
    beside it from the same scaled queries and K/V; the MHA path that makes the log-probs is
    untouched (the alignment graph's tokens and scores are the plain decoder's, bit for bit)."""
    q4 = b.one("Reshape", [qg, b.const([0, 0, heads, head_dim])])  # (Bc, g*T, H, Dh)
    q4 = b.one("Transpose", [q4], perm=[0, 2, 1, 3])  # (Bc, H, g*T, Dh)
    k_t = b.one("Transpose", [key], perm=[0, 1, 3, 2])  # (Bc, H, Dh, S)
    scores = b.one("Add", [b.one("MatMul", [q4, k_t]), src_bias])  # (Bc, H, g*T, S)
    probs = b.one("Softmax", [scores], axis=-1)
    if opset >= 18:  # ReduceMean takes its axes as an input from opset 18 on
        mean = b.one("ReduceMean", [probs, b.const([1])], keepdims=0)
    else:
        mean = b.one("ReduceMean", [probs], axes=[1], keepdims=0)  # (Bc, g*T, S)
    rows_t = b.one("Slice", [b.one("Shape", [q]), b.const([0]), b.const([2])])  # [R, T]
    src_len = b.one("Slice", [b.one("Shape", [key]), b.const([2]), b.const([3])])  # [S]
    mean = b.one("Reshape", [mean, b.one("Concat", [rows_t, src_len], axis=0)])  # (R, T, S)
    return b.one("Unsqueeze", [mean, b.const([1])])  # (R, 1, T, S)


def fused_decoder(model: Transformer, path: Path, opset: int, skip_layernorm: bool = False,
                  slots: bool = False) -> None:
    """The decoder with nmt.bundle's decoder IO and the alignment output (cross_attention, stripped
    from decoder.onnx by the exporter as for traced graphs), written with fused ops (pre-norm only).
    slots: decoder_slots.onnx instead (nmt.bundle's slot decoder IO; no alignment output). It feeds
    one token per row, so it works on (R, D) matrices: 2-D MatMuls, whose bias adds ONNX Runtime folds
    into Gemm (and the first FFN's ReLU with it). Its TopK runs only for top_k > 2 (beam search):
    ONNX Runtime's TopK takes ~12x numpy's argmax over a (64, 8000) batch, so greedy steps read
    the argmax of log_probs (R, V) on the host (nmt.bundle.SLOT_HOST_ARGMAX)."""
    cfg = model.cfg
    L, H, Dh, D = cfg.n_decoder_layers, cfg.n_heads, cfg.head_dim, cfg.d_model
    b = Builder(skip_layernorm)
    emb = b.weight("tgt_embed.scaled", model.tgt_embed.weight.detach().float() * math.sqrt(D))
    pos = b.weight("positions", model.pos.table)
    if slots:  # one token per row: (R, D) from here on
        tok = b.one("Gather", [emb, b.one("Reshape", [sb.INPUT_IDS, b.const([-1])])])  # (R, D)
        pe = b.one("Gather", [pos, b.one("Reshape", [sb.POSITION_IDS, b.const([-1])])])  # (R, D)
    else:
        tok = b.one("Gather", [emb, sb.INPUT_IDS])  # (R, T, D)
        pe = b.one("Gather", [pos, sb.POSITION_IDS])  # (R, T, D)
    neg = b.weight("mask_fill", np.array(-1e30, np.float32))
    zero = b.weight("zero", np.array(0.0, np.float32))
    if not slots:  # the self-attention mask becomes MHA's additive bias (R, 1, T, P+T), shared by every layer
        self_bias = b.one("Unsqueeze", [b.one("Where", [sb.SELF_ATTENTION_MASK, zero, neg]), b.const([1])])
    src_mask = b.one("Cast", [sb.ENCODER_ATTENTION_MASK], to=TensorProto.INT32)  # (Bc, S)
    # Cross-attention query layout: (Bc, -1, D) where Bc = the cross K/V's rows (see the module doc).
    q_shape = b.one("Concat", [b.one("Slice", [b.one("Shape", [sb.past_name(0, "encoder", "key")]),
                                               b.const([0]), b.const([1])]), b.const([-1, D])], axis=0)
    src_bias = "" if slots else b.one("Unsqueeze", [b.one("Where", [sb.ENCODER_ATTENTION_MASK, zero, neg]),
                                                    b.const([1, 2])])  # (Bc, 1, 1, S), for the alignments
    layers: list[Any] = list(model.decoder_layers)
    align: list[str] = []  # per layer (R, 1, T, S)
    h, x = b.skip_norm(tok, pe, layers[0].res_self.norm, None, "dec.0.ln_self")
    for i, layer in enumerate(layers):
        p = f"dec.{i}"
        presents = [sb.present_name(i, "decoder", w) for w in ("key", "value")]
        past = [sb.past_name(i, "decoder", "key"), sb.past_name(i, "decoder", "value")]
        if slots:
            lengths = [sb.SEQLENS_K, sb.TOTAL_SEQUENCE_LENGTH]
            y = b.slot_self_attention(h, layer.self_attn, f"{p}.self", H, Dh, [*past, *lengths],
                                      [f"{p}.self.out", *presents])
        else:
            y, _ = b.self_attention(h, layer.self_attn, f"{p}.self", H, Dh, ["", self_bias, *past],
                                    [f"{p}.self.out", *presents])
        out_bias = b.weight(f"{p}.self.out.bias", layer.self_attn.out_proj.bias)
        h, x = b.skip_norm(y, x, layer.res_cross.norm, out_bias, f"{p}.ln_cross")
        ca = layer.cross_attn
        q = b.linear(h, ca.q_proj.weight, ca.q_proj.bias, f"{p}.cross.q", 1.0 / math.sqrt(Dh))  # (R, T, D)
        qg = b.one("Reshape", [q, q_shape])  # (Bc, rows_per_source * T, D)
        cross_kv = [sb.past_name(i, "encoder", "key"), sb.past_name(i, "encoder", "value")]
        att = b.one("MultiHeadAttention", [qg, *cross_kv, "", src_mask], domain=MS, num_heads=H, scale=1.0)
        if not slots:
            align.append(cross_probs(b, qg, cross_kv[0], src_bias, q, H, Dh, opset))
        att = b.one("Reshape", [att, b.const([-1, D]) if slots else b.one("Shape", [q])])  # (R, [T,] D)
        y = b.one("MatMul", [att, b.weight(f"{p}.cross.out.weight", ca.out_proj.weight.detach().float().T)])
        nxt = layers[i + 1].res_self.norm if i + 1 < L else model.decoder_norm
        out_bias = b.weight(f"{p}.cross.out.bias", ca.out_proj.bias)
        h, x = b.skip_norm(y, x, layer.res_ff.norm, out_bias, f"{p}.ln_ff")
        y, bias = b.ffn(h, layer.ff, p)
        h, x = b.skip_norm(y, x, nxt, bias, f"{p}.ln_next")
    gen = b.weight("generator.weight", model.generator.weight.detach().float().T)  # (D, V)
    b.op("LogSoftmax", [b.one("MatMul", [h, gen])], outputs=[sb.LOG_PROBS], axis=-1)  # (R, [T,] V)
    if slots:
        conditional_top_k(b)
    else:
        last = b.one("Gather", [sb.LOG_PROBS, b.weight("last", np.array(-1, np.int64))], axis=1)  # (R, V)
        b.op("TopK", [last, sb.TOP_K], outputs=[sb.TOPK_VALUES, sb.TOPK_INDICES], axis=-1)
    if not slots:
        b.op("Concat", align, outputs=[sb.CROSS_ATTENTION], axis=1)  # (R, L, T, S)
    kv: list[str | int] = ["batch", H, "max_len" if slots else "past_len", Dh]
    cross: list[str | int] = ["src_batch", H, "src_len", Dh]
    inputs = [helper.make_tensor_value_info(sb.INPUT_IDS, INT64, ["batch", "new_len"]),
              helper.make_tensor_value_info(sb.POSITION_IDS, INT64, ["batch", "new_len"])]
    if slots:
        inputs += [helper.make_tensor_value_info(sb.SEQLENS_K, TensorProto.INT32, ["batch"]),
                   helper.make_tensor_value_info(sb.TOTAL_SEQUENCE_LENGTH, TensorProto.INT32, [1])]
    else:
        inputs.append(helper.make_tensor_value_info(sb.SELF_ATTENTION_MASK, BOOL,
                                                    ["batch", "new_len", "total_len"]))
    inputs.append(helper.make_tensor_value_info(sb.ENCODER_ATTENTION_MASK, BOOL, ["src_batch", "src_len"]))
    for i in range(L):
        for kind, shape in (("decoder", kv), ("encoder", cross)):
            for w in ("key", "value"):
                inputs.append(helper.make_tensor_value_info(sb.past_name(i, kind, w), FLOAT, shape))
    inputs.append(helper.make_tensor_value_info(sb.TOP_K, INT64, [1]))
    V = cfg.tgt_vocab_size
    lp_shape: list[str | int] = ["batch", V] if slots else ["batch", "new_len", V]
    top_shape: list[str | int | None] = [None, None] if slots else ["batch", "k"]  # slots: (1, 1) for k <= 2
    outputs = [helper.make_tensor_value_info(sb.LOG_PROBS, FLOAT, lp_shape),
               helper.make_tensor_value_info(sb.TOPK_VALUES, FLOAT, top_shape),
               helper.make_tensor_value_info(sb.TOPK_INDICES, INT64, top_shape)]
    present: list[str | int] = ["batch", H, "max_len" if slots else "total_len", Dh]
    outputs += [helper.make_tensor_value_info(sb.present_name(i, "decoder", w), FLOAT, present)
                for i in range(L) for w in ("key", "value")]
    if not slots:
        align_shape: list[str | int] = ["batch", L, "new_len", "src_len"]
        outputs.append(helper.make_tensor_value_info(sb.CROSS_ATTENTION, FLOAT, align_shape))
    save(b, inputs, outputs, path, opset, "nmt fused slot decoder" if slots else "nmt fused decoder")


def conditional_top_k(b: Builder) -> None:
    """topk_values/indices of log_probs (R, V) when top_k > 2, else a (1, 1) placeholder of each."""
    def branch(name: str, nodes: list[onnx.NodeProto]) -> onnx.GraphProto:
        outs = [helper.make_tensor_value_info(f"{n}.{name}", t, None)
                for n, t in ((sb.TOPK_VALUES, FLOAT), (sb.TOPK_INDICES, INT64))]
        return helper.make_graph(nodes, name, [], outs)

    top_outs = [f"{sb.TOPK_VALUES}.top_k", f"{sb.TOPK_INDICES}.top_k"]
    top = branch("top_k", [helper.make_node("TopK", [sb.LOG_PROBS, sb.TOP_K], top_outs, axis=-1)])
    placeholder = branch("host_argmax", [
        helper.make_node("Constant", [], [f"{sb.TOPK_VALUES}.host_argmax"],
                         value=helper.make_tensor("v", FLOAT, [1, 1], [0.0])),
        helper.make_node("Constant", [], [f"{sb.TOPK_INDICES}.host_argmax"],
                         value=helper.make_tensor("i", INT64, [1, 1], [0]))])
    beam = b.one("Greater", [sb.TOP_K, b.const([2])])  # [1] bool
    b.op("If", [beam], outputs=[sb.TOPK_VALUES, sb.TOPK_INDICES], then_branch=top, else_branch=placeholder)


def fused_encoder(model: Transformer, path: Path, opset: int, skip_layernorm: bool = False) -> None:
    """encoder.onnx with nmt.bundle's encoder IO, written with fused ops (pre-norm models only).

    Padding is removed (nmt.bundle.PACKED_ENCODER): the position-wise layers (projections, FFN,
    LayerNorm, residuals) run on the N real tokens as one (N, D) matrix, and only attention sees the
    padded (B, S) layout. A batch of sorted test sentences is about 30% padding, so this is about 30%
    of the encoder's arithmetic. The 2-D MatMuls also let ONNX Runtime fold their bias adds into Gemm.
    Padded positions of the outputs hold a copy of the row's last real token (they are masked
    everywhere downstream)."""
    cfg = model.cfg
    L, H, Dh, D = cfg.n_decoder_layers, cfg.n_heads, cfg.head_dim, cfg.d_model
    b = Builder(skip_layernorm)
    emb = b.weight("src_embed.scaled", model.src_embed.weight.detach().float() * math.sqrt(D))
    pos = b.weight("positions", model.pos.table)
    flat_mask = b.one("Reshape", [sb.ATTENTION_MASK, b.const([-1])])  # (B*S,)
    to_flat = b.one("Reshape", [b.one("NonZero", [flat_mask]), b.const([-1])])  # (N,) real positions
    # to_padded[p] = the flat row of padded position p: its own token, or (padding) the row's last one.
    axis0 = b.weight("axis0", np.array(0, np.int64))
    count = b.one("CumSum", [b.one("Cast", [flat_mask], to=INT64), axis0])  # (B*S,)
    to_padded = b.one("Max", [b.one("Sub", [count, b.const([1])]), b.const([0])])  # (B*S,)
    ids_shape = b.one("Shape", [sb.INPUT_IDS])  # [B, S]
    S = b.one("Slice", [ids_shape, b.const([1]), b.const([2])])  # [S]
    ids = b.one("Gather", [b.one("Reshape", [sb.INPUT_IDS, b.const([-1])]), to_flat])  # (N,)
    tok = b.one("Gather", [emb, ids])  # (N, D)
    pe = b.one("Gather", [pos, b.one("Mod", [to_flat, S])])  # (N, D): position = flat index mod S

    def padded(x: str, width: int | list[int]) -> str:
        """(N, W) real-token rows -> (B, S, *width) with padding (a gather, no zeros to fill)."""
        dims = width if isinstance(width, list) else [width]
        return b.one("Reshape", [b.one("Gather", [x, to_padded]),
                                 b.one("Concat", [ids_shape, b.const(dims)], axis=0)])

    # The key padding mask as one more key column per head, -1e30 at padding, 0 elsewhere (B, S, H, 1);
    # the queries' matching column is 1 (see masked_attention).
    neg = b.one("Where", [sb.ATTENTION_MASK, b.weight("zero", np.array(0.0, np.float32)),
                          b.weight("mask_fill", np.array(-1e30, np.float32))])  # (B, S)
    key_mask = b.one("Expand", [b.one("Unsqueeze", [neg, b.const([2, 3])]),
                                b.one("Concat", [ids_shape, b.const([H, 1])], axis=0)])  # (B, S, H, 1)
    layers: list[Any] = list(model.encoder_layers)
    h, x = b.skip_norm(tok, pe, layers[0].res_attn.norm, None, "enc.0.ln_attn")  # (N, D)
    for i, layer in enumerate(layers):
        p = f"enc.{i}"
        att = masked_attention(b, h, layer.self_attn, f"{p}.self", H, Dh, padded, key_mask)  # (B, S, D)
        att = b.one("Gather", [b.one("Reshape", [att, b.const([-1, D])]), to_flat])  # (N, D)
        y = b.one("MatMul", [att, b.weight(f"{p}.self.out.weight",
                                           layer.self_attn.out_proj.weight.detach().float().T)])
        out_bias = b.weight(f"{p}.self.out.bias", layer.self_attn.out_proj.bias)
        h, x = b.skip_norm(y, x, layer.res_ff.norm, out_bias, f"{p}.ln_ff")
        y, bias = b.ffn(h, layer.ff, p)
        nxt = layers[i + 1].res_attn.norm if i + 1 < len(layers) else model.encoder_norm
        h, x = b.skip_norm(y, x, nxt, bias, f"{p}.ln_next")
    b.op("Identity", [padded(h, D)], outputs=[sb.LAST_HIDDEN_STATE])
    # Every decoder layer's cross K/V from one MatMul on the real tokens: (N, 2*L*D) -> padded
    # (B, S, 2L*H, Dh) -> (B, 2L*H, S, Dh), split into the 2L outputs (B, H, S, Dh).
    ws, bs = [], []
    decoder_layers: list[Any] = list(model.decoder_layers)
    for layer in decoder_layers:
        for proj in (layer.cross_attn.k_proj, layer.cross_attn.v_proj):
            ws.append(proj.weight.detach().float())
            bs.append(proj.bias.detach().float())
    kv = padded(b.linear(h, torch.cat(ws, 0), torch.cat(bs), "cross_kv"), [2 * L * H, Dh])  # (B, S, 2LH, Dh)
    kv = b.one("Transpose", [kv], perm=[0, 2, 1, 3])  # (B, 2L*H, S, Dh)
    names = sb.encoder_output_names(L)[1:]
    b.op("Split", [kv, b.const([H] * (2 * L))], outputs=names, axis=1)  # 2L x (B, H, S, Dh)
    inputs = [helper.make_tensor_value_info(sb.INPUT_IDS, INT64, ["batch", "src_len"]),
              helper.make_tensor_value_info(sb.ATTENTION_MASK, BOOL, ["batch", "src_len"])]
    outputs = [helper.make_tensor_value_info(sb.LAST_HIDDEN_STATE, FLOAT, ["batch", "src_len", D])]
    outputs += [helper.make_tensor_value_info(n, FLOAT, ["batch", H, "src_len", Dh]) for n in names]
    save(b, inputs, outputs, path, opset, "nmt fused encoder")


def masked_attention(b: Builder, h: str, attn: Any, prefix: str, heads: int, head_dim: int,
                     padded: Any, key_mask: str) -> str:
    """Encoder self-attention of the packed tokens h (N, D), as (B, S, D) over the padded layout.

    ONNX Runtime's CPU MultiHeadAttention takes its flash-attention kernel only without a key padding
    mask or bias; with them it runs per (batch, head) GEMMs and a mask pass, about twice as long on a
    64-sentence batch. So the mask travels inside the dot product: every head's queries get one more
    column, always 1 (a zero weight column with bias 1), and its keys the matching column of
    `key_mask` (0 at real tokens, -1e30 at padding). A real key's score is exactly q.k; a padded key's
    is -1e30, whose softmax weight is 0. The projection biases are added by the 2-D MatMuls (ONNX
    Runtime folds them into Gemm), not by MultiHeadAttention. CUDA's MultiHeadAttention takes query
    and key heads wider than the value heads (65 and 64) on its unfused kernel: not yet run on a GPU."""
    D = heads * head_dim
    s = 1.0 / math.sqrt(head_dim)
    w_q = (attn.q_proj.weight.detach().float() * s).T.reshape(D, heads, head_dim)  # (D, H, Dh)
    b_q = (attn.q_proj.bias.detach().float() * s).reshape(heads, head_dim)  # (H, Dh)
    w_q = torch.cat([w_q, torch.zeros(D, heads, 1)], -1).reshape(D, heads * (head_dim + 1))  # (D, H*(Dh+1))
    b_q = torch.cat([b_q, torch.ones(heads, 1)], -1).reshape(-1)  # (H*(Dh+1),)
    q = b.linear(h, w_q.T, b_q, f"{prefix}.q")  # (N, H*(Dh+1))
    k = b.linear(h, attn.k_proj.weight, attn.k_proj.bias, f"{prefix}.k")  # (N, D)
    v = b.linear(h, attn.v_proj.weight, attn.v_proj.bias, f"{prefix}.v")  # (N, D)
    k = b.one("Concat", [padded(k, [heads, head_dim]), key_mask], axis=-1)  # (B, S, H, Dh+1)
    k = b.one("Reshape", [k, b.const([0, 0, heads * (head_dim + 1)])])  # (B, S, H*(Dh+1))
    return b.one("MultiHeadAttention", [padded(q, heads * (head_dim + 1)), k, padded(v, D)], domain=MS,
                 num_heads=heads, scale=1.0)


def sort_nodes(graph: onnx.GraphProto) -> None:
    """Order a graph's nodes topologically, counting the outer values a node's subgraphs read."""
    def reads(node: onnx.NodeProto) -> set[str]:
        names = set(node.input)
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else []):
                made = {o for n in sub.node for o in n.output}
                names |= {i for n in sub.node for i in reads(n)} - made
        return names - {""}

    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    pending = [(node, reads(node)) for node in graph.node]  # each node's reads, computed once
    ordered = []
    while pending:
        i = next((i for i, (_, needs) in enumerate(pending) if needs <= ready), None)
        if i is None:
            raise ValueError(f"graph {graph.name!r} has a cycle or reads a value nothing produces")
        node, _ = pending.pop(i)
        ordered.append(node)
        ready |= set(node.output)
    del graph.node[:]
    graph.node.extend(ordered)


def save(b: Builder, inputs: list, outputs: list, path: Path, opset: int, name: str) -> None:
    graph = helper.make_graph(b.nodes, name, inputs, outputs, initializer=b.inits)
    opsets = [helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)]
    # IR version 8 (not onnx's newest): every ONNX Runtime this project supports loads it.
    model = helper.make_model(graph, opset_imports=opsets, producer_name="nmt.export", ir_version=8)
    onnx.save(model, str(path))
