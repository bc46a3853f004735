"""The three bundle graphs as thin nn.Modules with flat tensor inputs and outputs.

The ONNX exporter wants positional tensors in and a flat tuple out, in exactly the order of
nmt.bundle's name lists. These wrappers only (un)flatten; all the maths lives in train.model.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from train.model import KV, Transformer


def flatten_kv(kvs: list[KV]) -> list[Tensor]:
    """[(k0, v0), (k1, v1), ...] -> [k0, v0, k1, v1, ...]."""
    return [t for kv in kvs for t in kv]


class EncoderGraph(nn.Module):
    """(input_ids, attention_mask) -> (last_hidden_state, present.{i}.encoder.key/value for every layer)."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, ...]:
        memory = self.model.encode(input_ids, attention_mask)  # (B, S, D)
        return (memory, *flatten_kv(self.model.cross_kv(memory)))


class DecoderGraph(nn.Module):
    """One decoding step (or a chunk of new tokens) over a self-attention cache.

    Inputs follow nmt.bundle.decoder_input_names: ids, positions, masks, then per layer the
    self-attention past K/V and the cross-attention K/V, then top_k. Outputs: log_probs of
    every new position, the top_k of the last position, per layer the present K/V, and the
    head-averaged cross-attention of every layer (for alignments; unfetched on a normal step).
    """

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model
        self.n_layers = model.cfg.n_decoder_layers

    def forward(self, input_ids: Tensor, position_ids: Tensor, self_attention_mask: Tensor,
                encoder_attention_mask: Tensor, *cache_and_top_k: Tensor) -> tuple[Tensor, ...]:
        *cache, top_k = cache_and_top_k
        # Per layer the cache comes as (self key, self value, cross key, cross value).
        past = [(cache[4 * i], cache[4 * i + 1]) for i in range(self.n_layers)]
        cross = [(cache[4 * i + 2], cache[4 * i + 3]) for i in range(self.n_layers)]
        cross_probs: list[Tensor] = []  # per layer (B, H, T, S)
        logits, present = self.model.decode(input_ids, position_ids, self_attention_mask,
                                            encoder_attention_mask, cross, past, cross_probs)  # (B, T, V)
        cross_attention = torch.stack([p.mean(dim=1) for p in cross_probs], dim=1)  # (B, L, T, S)
        log_probs = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
        # Only the last position's k best leave the device on a decoding step.
        k = top_k_value(top_k)  # a tensor while tracing keeps k dynamic; torch.topk accepts it
        values, indices = torch.topk(log_probs[:, -1, :], k, dim=-1)  # type: ignore[arg-type]  # (B, k)
        return (log_probs, values, indices, *flatten_kv(present), cross_attention)


def top_k_value(top_k: Tensor) -> Tensor | int:
    """k as the traced graph should see it: a tensor while tracing (so k stays a graph input)."""
    if torch.jit.is_tracing():
        return top_k.reshape(())  # () int64; the exporter turns it back into TopK's K input
    return int(top_k.reshape(()).item())


class ReorderGraph(nn.Module):
    """Gather rows of the encoder mask and every cache tensor (beam reordering, row compaction) on device."""

    def forward(self, index: Tensor, *tensors: Tensor) -> tuple[Tensor, ...]:
        return tuple(t.index_select(0, index) for t in tensors)
