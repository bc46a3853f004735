"""Validation of the slot decoder (decoder_slots.onnx) against PyTorch, rows of different ages.

The slot decoder writes each row's new K/V in place into preallocated buffers, at the row's own
length (nmt.bundle, SLOT_CACHE). The check feeds teacher-forced targets with row b starting
`b` steps late (a row that joins a running batch), its slot 0 first holding what an idle row
wrote there, and compares every row's top-k at its own position with PyTorch's full pass.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from nmt import bundle as sb
from train.model import Transformer


def check_slot_decoder(model: Transformer, sess: ort.InferenceSession, src_mask: torch.Tensor, cross: list,
                       targets: torch.Tensor, top_k: int) -> dict[str, Any]:
    """Max abs diff of log_probs and topk_values, argmax and top-k id agreement, over every fed
    (row, position)."""
    cfg = model.cfg
    B, T = targets.shape
    top_k = max(top_k, 3)  # the graph's top-k branch (SLOT_HOST_ARGMAX: below 3, a placeholder)
    with torch.inference_mode():
        positions = torch.arange(T).unsqueeze(0).expand(B, T)  # (B, T)
        causal = torch.ones(T, T, dtype=torch.bool).tril().expand(B, T, T)  # (B, T, T)
        logits, _ = model.decode(targets, positions, causal, src_mask, cross, model.empty_past(B))
        ref_lp = torch.log_softmax(logits.float(), dim=-1).numpy()  # (B, T, V)
    shape = (B, cfg.n_heads, T + 2, cfg.head_dim)  # (B, H, max_len, Dh): more slots than needed
    buffers = {sb.past_name(i, "decoder", w): ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, np.float32))
               for i in range(cfg.n_decoder_layers) for w in ("key", "value")}
    feeds: dict[str, Any] = {sb.ENCODER_ATTENTION_MASK: src_mask.numpy(),
                             sb.TOP_K: np.array([top_k], np.int64)}
    for i, kv in enumerate(cross):
        for w, t in zip(("key", "value"), kv):
            feeds[sb.past_name(i, "encoder", w)] = t.numpy().astype(np.float32)
    start = np.arange(B)  # (B,) row b joins at step b
    lp_diff = val_diff = 0.0
    agree = topk_agree = fed = 0
    for step in range(T + B - 1):
        length = np.clip(step - start, 0, T - 1)  # (B,) tokens each row holds before this step
        active = (step >= start) & (step - start < T)  # (B,)
        tokens = targets.numpy()[np.arange(B), length]  # (B,) idle rows feed their first token
        feeds.update({sb.INPUT_IDS: tokens.reshape(B, 1), sb.POSITION_IDS: length.reshape(B, 1),
                      sb.SEQLENS_K: length.astype(np.int32),
                      sb.TOTAL_SEQUENCE_LENGTH: np.array([length.max() + 1], np.int32)})
        binding = sess.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        for name, buf in buffers.items():
            binding.bind_ortvalue_input(name, buf)
            binding.bind_ortvalue_output(name.replace("past_key_values", "present"), buf)
        for name in (sb.LOG_PROBS, sb.TOPK_VALUES, sb.TOPK_INDICES):  # greedy reads log_probs, beams top-k
            binding.bind_output(name, "cpu")
        sess.run_with_iobinding(binding)
        outs = binding.get_outputs()  # in binding order: the cache buffers, then these three
        log_probs = outs[-3].numpy().reshape(B, -1)  # (B, V)
        values, indices = outs[-2].numpy(), outs[-1].numpy()  # (B, k) each: top_k > 2 here
        rows = np.flatnonzero(active)
        ref = ref_lp[rows, length[rows]]  # (n, V)
        ref_idx = np.argsort(-ref, axis=-1, kind="stable")[:, :top_k]  # (n, k) lowest id first on ties
        val_diff = max(val_diff, float(np.abs(values[rows] - np.take_along_axis(ref, ref_idx, -1)).max()))
        lp_diff = max(lp_diff, float(np.abs(log_probs[rows] - ref).max()))
        agree += int((log_probs[rows].argmax(-1) == ref.argmax(-1)).sum())
        topk_agree += int((indices[rows] == ref_idx).all(-1).sum())
        fed += len(rows)
    diffs = {f"decoder_slots.{sb.LOG_PROBS}": lp_diff, f"decoder_slots.{sb.TOPK_VALUES}": val_diff}
    return {"max_abs_diff": diffs, "argmax_agreement": agree / fed, "topk_index_agreement": topk_agree / fed}
