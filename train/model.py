"""An encoder-decoder Transformer written from scratch ("Attention Is All You Need").

Shaped for export: `encode` and `decode` are the two ONNX graphs. `decode` takes per-row
positions and a per-row self-attention mask over past+new positions, so rows of different
ages can share a batch, and it returns each layer's present self-attention K/V (the cache).
`cross_kv` computes every decoder layer's encoder-decoder K/V once per source.

Masks are boolean, True = "may attend".
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from train.config import ModelConfig

KV = tuple[Tensor, Tensor]  # (key, value), each (B, H, T, Dh)


def scaled_dot_product_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor,
                                 probs_out: list[Tensor] | None = None) -> Tensor:
    """softmax(Q K^T / sqrt(d_k)) V.  q (B,H,Tq,Dh), k/v (B,H,Tk,Dh), mask broadcastable to (B,H,Tq,Tk).

    probs_out, when given, receives the attention probabilities (B,H,Tq,Tk): the maps and
    alignments look inside without a second code path (the normal path passes None).
    """
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, H, Tq, Tk)
    # A finite minimum (not -inf) keeps a fully masked row (a padded query) free of NaN.
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1)  # (B, H, Tq, Tk)
    if probs_out is not None:
        probs_out.append(probs)
    return probs @ v  # (B, H, Tq, Dh)


def sinusoid_table(n_positions: int, d_model: int, layout: str = "interleaved") -> Tensor:
    """PE[pos, 2i] = sin(pos / 10000^(2i/d)), PE[pos, 2i+1] = cos(pos / 10000^(2i/d)).

    layout "halves" is Marian's: the same sinusoids, sines in the first half and cosines in the
    second, computed in float64 as transformers does (so imported models see identical positions)."""
    if layout == "halves":
        freq = torch.pow(10000.0, torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)  # (ceil(D/2),)
        angles = torch.arange(n_positions, dtype=torch.float64)[:, None] / freq  # (N, ceil(D/2))
        return torch.cat([torch.sin(angles), torch.cos(angles[:, :d_model // 2])], dim=1).float()  # (N, D)
    pos = torch.arange(n_positions, dtype=torch.float32).unsqueeze(1)  # (N, 1)
    div = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    table = torch.zeros(n_positions, d_model)
    table[:, 0::2] = torch.sin(pos * div)
    table[:, 1::2] = torch.cos(pos * div)
    return table  # (N, D)


class PositionalEncoding(nn.Module):
    """Sinusoidal positions looked up per row, so each row can be at its own position."""

    table: Tensor  # (max_positions, D), a buffer

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # Not persistent: the table is a function of the config, the checkpoint need not carry it.
        self.register_buffer("table", sinusoid_table(cfg.max_positions, cfg.d_model, cfg.position_layout),
                             persistent=False)

    def forward(self, positions: Tensor) -> Tensor:
        return self.table[positions]  # (B, T, D)


class MultiHeadAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.k_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.v_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.out_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)

    def split_heads(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, Dh)

    def project_kv(self, x: Tensor) -> KV:
        return self.split_heads(self.k_proj(x)), self.split_heads(self.v_proj(x))

    def attend(self, x: Tensor, kv: KV, mask: Tensor, probs_out: list[Tensor] | None = None) -> Tensor:
        """Queries from x (B,T,D) attend over kv; mask broadcastable to (B,H,T,Tk)."""
        q = self.split_heads(self.q_proj(x))  # (B, H, T, Dh)
        out = scaled_dot_product_attention(q, kv[0], kv[1], mask, probs_out)  # (B, H, T, Dh)
        B, _, T, _ = out.shape
        out = out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, D)
        return self.dropout(self.out_proj(out))


ACTIVATION_MODULES: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "swish": nn.SiLU}


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(cfg.d_model, cfg.d_ff), ACTIVATION_MODULES[cfg.activation](), nn.Dropout(cfg.dropout),
            nn.Linear(cfg.d_ff, cfg.d_model), nn.Dropout(cfg.dropout),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Residual(nn.Module):
    """Residual connection + LayerNorm: pre-norm x + f(LN(x)), or post-norm LN(x + f(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.d_model)
        self.pre_norm = cfg.pre_norm

    def forward(self, x: Tensor, f) -> Tensor:  # noqa: ANN001 - f is any sublayer callable
        if self.pre_norm:
            return x + f(self.norm(x))
        return self.norm(x + f(x))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn = MultiHeadAttention(cfg)
        self.ff = FeedForward(cfg)
        self.res_attn, self.res_ff = Residual(cfg), Residual(cfg)

    def forward(self, x: Tensor, mask: Tensor, probs_out: list[Tensor] | None = None) -> Tensor:
        attn = self.self_attn
        x = self.res_attn(x, lambda h: attn.attend(h, attn.project_kv(h), mask, probs_out))
        return self.res_ff(x, self.ff)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn = MultiHeadAttention(cfg)
        self.cross_attn = MultiHeadAttention(cfg)
        self.ff = FeedForward(cfg)
        self.res_self, self.res_cross, self.res_ff = Residual(cfg), Residual(cfg), Residual(cfg)

    def forward(self, x: Tensor, self_mask: Tensor, src_mask: Tensor, cross: KV,
                past: KV, cross_probs_out: list[Tensor] | None = None) -> tuple[Tensor, KV]:
        present: list[KV] = []

        def self_block(h: Tensor) -> Tensor:
            k, v = self.self_attn.project_kv(h)  # (B, H, T, Dh)
            kv = (torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2))  # (B, H, P+T, Dh)
            present.append(kv)
            return self.self_attn.attend(h, kv, self_mask)

        x = self.res_self(x, self_block)
        x = self.res_cross(x, lambda h: self.cross_attn.attend(h, cross, src_mask, cross_probs_out))
        return self.res_ff(x, self.ff), present[0]


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg.validate()
        self.src_embed = nn.Embedding(cfg.src_vocab_size, cfg.d_model, padding_idx=cfg.pad_id)
        self.tgt_embed = (
            self.src_embed if cfg.share_embeddings
            else nn.Embedding(cfg.tgt_vocab_size, cfg.d_model, padding_idx=cfg.pad_id)
        )
        self.pos = PositionalEncoding(cfg)
        self.dropout = nn.Dropout(cfg.dropout)
        self.encoder_layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_encoder_layers))
        self.decoder_layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_decoder_layers))
        # Pre-norm stacks end with a LayerNorm (their residual stream is never normalised otherwise).
        self.encoder_norm = nn.LayerNorm(cfg.d_model) if cfg.pre_norm else nn.Identity()
        self.decoder_norm = nn.LayerNorm(cfg.d_model) if cfg.pre_norm else nn.Identity()
        self.generator = nn.Linear(cfg.d_model, cfg.tgt_vocab_size, bias=cfg.output_bias)
        self._init_weights()
        if cfg.tie_output:
            self.generator.weight = self.tgt_embed.weight

    def _init_weights(self) -> None:
        for name, p in self.named_parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
        # Embeddings are scaled by sqrt(d) on lookup, so they start at N(0, d^-1/2) as in fairseq.
        for emb in {self.src_embed, self.tgt_embed}:
            nn.init.normal_(emb.weight, mean=0.0, std=self.cfg.d_model ** -0.5)
            with torch.no_grad():
                emb.weight[self.cfg.pad_id].zero_()

    def embed(self, table: nn.Embedding, ids: Tensor, positions: Tensor) -> Tensor:
        scale = math.sqrt(self.cfg.d_model) if self.cfg.embed_scale else 1.0
        x = table(ids) * scale + self.pos(positions)  # (B, T, D)
        return self.dropout(x)

    def encode(self, src_ids: Tensor, src_mask: Tensor, attn_out: list[Tensor] | None = None) -> Tensor:
        """src_ids (B,S) int64, src_mask (B,S) bool -> encoder states (B,S,D).

        attn_out, when given, receives each layer's self-attention probabilities (B,H,S,S).
        """
        B, S = src_ids.shape
        positions = torch.arange(S, device=src_ids.device).unsqueeze(0).expand(B, S)  # (B, S)
        x = self.embed(self.src_embed, src_ids, positions)
        key_mask = src_mask[:, None, None, :]  # (B, 1, 1, S)
        for layer in self.encoder_layers:
            x = layer(x, key_mask, attn_out)
        return self.encoder_norm(x)

    def cross_kv(self, memory: Tensor) -> list[KV]:
        """Every decoder layer's encoder-decoder K/V, computed once per source: (B,H,S,Dh) each."""
        return [cast(DecoderLayer, layer).cross_attn.project_kv(memory) for layer in self.decoder_layers]

    def empty_past(self, batch: int, device: torch.device | None = None, dtype=torch.float32) -> list[KV]:
        shape = (batch, self.cfg.n_heads, 0, self.cfg.head_dim)  # (B, H, 0, Dh)
        return [(torch.zeros(shape, device=device, dtype=dtype),) * 2 for _ in self.decoder_layers]

    def decode(
        self,
        tgt_ids: Tensor,
        positions: Tensor,
        self_attn_mask: Tensor,
        src_mask: Tensor,
        cross: list[KV],
        past: list[KV],
        cross_attn_out: list[Tensor] | None = None,
    ) -> tuple[Tensor, list[KV]]:
        """One decoder pass over new target tokens.

        tgt_ids, positions (B,T) int64; self_attn_mask (B,T,P+T) bool over past+new keys;
        src_mask (B,S) bool; cross / past: per layer K/V.  Returns logits (B,T,V) and each
        layer's present K/V (B,H,P+T,Dh). cross_attn_out, when given, receives each layer's
        encoder-decoder attention probabilities (B,H,T,S).
        """
        x = self.embed(self.tgt_embed, tgt_ids, positions)
        self_mask = self_attn_mask[:, None, :, :]  # (B, 1, T, P+T)
        key_mask = src_mask[:, None, None, :]  # (B, 1, 1, S)
        present: list[KV] = []
        for layer, c, p in zip(self.decoder_layers, cross, past):
            x, kv = layer(x, self_mask, key_mask, c, p, cross_attn_out)
            present.append(kv)
        return self.generator(self.decoder_norm(x)), present

    def forward(self, src_ids: Tensor, src_mask: Tensor, tgt_ids: Tensor) -> Tensor:
        """Teacher-forced training pass: every target position in parallel -> logits (B,T,V)."""
        B, T = tgt_ids.shape
        memory = self.encode(src_ids, src_mask)
        positions = torch.arange(T, device=tgt_ids.device).unsqueeze(0).expand(B, T)  # (B, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=tgt_ids.device).tril()  # (T, T)
        self_mask = causal.unsqueeze(0).expand(B, T, T)  # (B, T, T)
        logits, _ = self.decode(tgt_ids, positions, self_mask, src_mask, self.cross_kv(memory),
                                self.empty_past(B, tgt_ids.device, memory.dtype))
        return logits

    def loss(self, src_ids: Tensor, src_mask: Tensor, tgt_in: Tensor, tgt_out: Tensor,
             label_smoothing: float = 0.0) -> Tensor:
        logits = self(src_ids, src_mask, tgt_in)  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1).float(), tgt_out.flatten(), ignore_index=self.cfg.pad_id,
                               label_smoothing=label_smoothing)
