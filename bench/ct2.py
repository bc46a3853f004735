"""Our checkpoint as a CTranslate2 model, built with CTranslate2's own spec API.

CTranslate2 is the fastest MT runtime on CPU, so it is the bar our engine is measured
against. The conversion maps every tensor of train/model.py onto `TransformerSpec`
explicitly (sinusoid table, norm placement, fused projections), so the comparison runs the
same weights; `bench.run` proves it by asserting token-equal greedy output against PyTorch.

Decoding options mirror ours: the source gets </s>, the target starts with <s>, EOS may be
produced at step 0 (CTranslate2 forbids it by default), and the per-sentence length limit
int(a * src_len + b), capped at max_positions - 1, counts the EOS.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import ctranslate2
import numpy as np

from nmt.errors import EXIT_FAILURE, UserError
from nmt.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer

# CTranslate2 finds the special tokens by name; SentencePiece names ids 0..3 like this.
SPECIAL_PIECES = {PAD_ID: "<pad>", UNK_ID: "<unk>", BOS_ID: "<s>", EOS_ID: "</s>"}
if TYPE_CHECKING:  # ctranslate2.specs imports torch: only conversion needs it, not translation
    from ctranslate2.specs import common_spec, transformer_spec

LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default; CTranslate2 would otherwise use 1e-6


class ConversionError(UserError):
    """The checkpoint cannot be expressed as a CTranslate2 Transformer: the message says why."""

    exit_code = EXIT_FAILURE


def _np(t) -> np.ndarray:  # noqa: ANN001 - a torch tensor; torch is imported by the caller, not here
    return t.detach().cpu().float().numpy().copy()


def _linear(spec: common_spec.LinearSpec, *layers) -> None:  # noqa: ANN002 - nn.Linear modules
    """Set a linear spec from one nn.Linear, or fuse several along the output axis (QKV, KV)."""
    spec.weight = np.concatenate([_np(m.weight) for m in layers])  # (sum(out), in)
    if layers[0].bias is not None:
        spec.bias = np.concatenate([_np(m.bias) for m in layers])


def _layer_norm(spec: common_spec.LayerNormSpec, norm) -> None:  # noqa: ANN001 - nn.LayerNorm
    spec.gamma, spec.beta = _np(norm.weight), _np(norm.bias)


def _feed_forward(spec: transformer_spec.FeedForwardSpec, residual, ff) -> None:  # noqa: ANN001
    _layer_norm(spec.layer_norm, residual.norm)
    _linear(spec.linear_0, ff.net[0])  # d_model -> d_ff, then ReLU
    _linear(spec.linear_1, ff.net[3])  # d_ff -> d_model


def _self_attention(spec, residual, attn) -> None:  # noqa: ANN001
    _layer_norm(spec.layer_norm, residual.norm)
    _linear(spec.linear[0], attn.q_proj, attn.k_proj, attn.v_proj)  # fused QKV
    _linear(spec.linear[1], attn.out_proj)


def _cross_attention(spec, residual, attn) -> None:  # noqa: ANN001
    _layer_norm(spec.layer_norm, residual.norm)
    _linear(spec.linear[0], attn.q_proj)
    _linear(spec.linear[1], attn.k_proj, attn.v_proj)  # fused KV over the encoder states
    _linear(spec.linear[2], attn.out_proj)


def vocabulary(tokenizer: Tokenizer) -> list[str]:
    pieces = [tokenizer.sp.id_to_piece(i) for i in range(tokenizer.vocab_size)]
    wrong = {i: pieces[i] for i, name in SPECIAL_PIECES.items() if pieces[i] != name}
    if wrong:
        raise ConversionError(f"tokenizer special pieces {wrong} differ from {SPECIAL_PIECES}")
    if len(set(pieces)) != len(pieces):
        raise ConversionError("tokenizer has duplicate pieces; CTranslate2 maps tokens by name")
    return pieces


def build_spec(model, tokenizer: Tokenizer) -> transformer_spec.TransformerSpec:  # noqa: ANN001 - Transformer
    """A TransformerSpec holding the weights of our `train.model.Transformer`."""
    from ctranslate2.specs import common_spec, transformer_spec

    cfg = model.cfg
    if cfg.src_vocab_size != cfg.tgt_vocab_size or cfg.src_vocab_size != tokenizer.vocab_size:
        raise ConversionError(f"vocab sizes src={cfg.src_vocab_size} tgt={cfg.tgt_vocab_size} "
                              f"tokenizer={tokenizer.vocab_size} must agree (one joint vocabulary)")
    spec = transformer_spec.TransformerSpec.from_config(
        (cfg.n_encoder_layers, cfg.n_decoder_layers), cfg.n_heads, pre_norm=cfg.pre_norm,
        activation=common_spec.Activation.RELU,
    )
    table = _np(model.pos.table)  # (max_positions, d_model): our sinusoids, not CTranslate2's own
    enc, dec = spec.encoder, spec.decoder
    enc.embeddings[0].weight = _np(model.src_embed.weight)
    dec.embeddings.weight = _np(model.tgt_embed.weight)
    # Both sides multiply embeddings by sqrt(d_model) before adding positions, as we do.
    enc.scale_embeddings = dec.scale_embeddings = True
    enc.position_encodings.encodings = table
    dec.position_encodings.encodings = table
    if cfg.pre_norm:  # only pre-norm stacks have (and CTranslate2 only expects) a final norm
        _layer_norm(enc.layer_norm, model.encoder_norm)
        _layer_norm(dec.layer_norm, model.decoder_norm)
    for layer_spec, layer in zip(enc.layer, model.encoder_layers):
        _self_attention(layer_spec.self_attention, layer.res_attn, layer.self_attn)
        _feed_forward(layer_spec.ffn, layer.res_ff, layer.ff)
    for layer_spec, layer in zip(dec.layer, model.decoder_layers):
        _self_attention(layer_spec.self_attention, layer.res_self, layer.self_attn)
        _cross_attention(layer_spec.attention, layer.res_cross, layer.cross_attn)
        _feed_forward(layer_spec.ffn, layer.res_ff, layer.ff)
    _linear(dec.projection, model.generator)

    spec.config.layer_norm_epsilon = LAYER_NORM_EPS
    spec.config.add_source_eos = True  # source = pieces + </s>, as our engine encodes it
    spec.config.decoder_start_token = SPECIAL_PIECES[BOS_ID]
    vocab = vocabulary(tokenizer)
    spec.register_source_vocabulary(vocab)
    spec.register_target_vocabulary(vocab)
    spec.validate()
    return spec


def convert_checkpoint(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Write a float32 CTranslate2 model of a checkpoint to out_dir (int8 is chosen at load time).

    The model directory is built next to out_dir and renamed into place, so a crash never
    leaves a half-written model that a later run would load.
    """
    from train.checkpoint import load_checkpoint, model_from_checkpoint  # torch only when converting

    model, tokenizer = model_from_checkpoint(load_checkpoint(checkpoint))
    spec = build_spec(model, tokenizer)
    spec.optimize(quantization="float32")  # aliases the tied embedding/projection matrices
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    spec.save(str(tmp))
    (tmp / "tokenizer.model").write_bytes(tokenizer.model_proto)
    tmp.rename(out)
    return out


def max_decoding_length(src_len: int, max_length_a: float, max_length_b: int, max_positions: int) -> int:
    """Our limit on generated tokens (EOS included); src_len counts the source EOS."""
    return min(int(max_length_a * src_len + max_length_b), max_positions - 1)


@dataclass
class CT2Output:
    tokens: list[int]  # target ids without BOS/EOS, as our Hypothesis.tokens
    text: str


class CT2Translator:
    """CTranslate2 translating texts with our tokenizer and our length semantics."""

    def __init__(self, model_dir: str | Path, max_positions: int, *, compute_type: str = "float32",
                 threads: int = 1):
        self.tokenizer = Tokenizer.load(Path(model_dir) / "tokenizer.model")
        self.max_positions = max_positions
        self.translator = ctranslate2.Translator(str(model_dir), device="cpu", compute_type=compute_type,
                                                 intra_threads=threads, inter_threads=1)

    def translate(self, texts: list[str], *, beam_size: int = 1, length_penalty: float = 1.0,
                  max_length_a: float = 1.5, max_length_b: int = 10) -> list[CT2Output]:
        """One CTranslate2 batch. Each sentence keeps its own length limit: the batch runs to the
        largest and longer outputs are cut back, which is exact for greedy (rows are independent)."""
        sp = self.tokenizer.sp
        ids = self.tokenizer.encode_batch(texts)
        limits = [max_decoding_length(len(s) + 1, max_length_a, max_length_b, self.max_positions)
                  for s in ids]
        too_long = [i for i, s in enumerate(ids) if len(s) + 1 > self.max_positions]
        if too_long:
            raise ValueError(f"sentences {too_long} exceed max_positions={self.max_positions} tokens")
        results = self.translator.translate_batch(
            [self.tokenizer.pieces(s) for s in ids], beam_size=beam_size, length_penalty=length_penalty,
            max_decoding_length=max(limits, default=1), min_decoding_length=0, max_input_length=0,
            return_end_token=True,
        )
        outputs = []
        for res, limit in zip(results, limits):
            toks = [sp.piece_to_id(p) for p in res.hypotheses[0]][:limit]  # limit counts the EOS
            if toks and toks[-1] == EOS_ID:
                toks = toks[:-1]
            outputs.append(CT2Output(toks, self.tokenizer.decode(toks)))
        return outputs
