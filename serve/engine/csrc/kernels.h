/* The kernels of the "nmt" custom ops (nmt_ops.c); shapes and layouts are described there. */
#ifndef NMT_KERNELS_H
#define NMT_KERNELS_H

#include <stdint.h>

#define MAX_HEAD_DIM 512

/* SlotAttention: 0 <= seqlens[r] < L for every row (checked by the caller); scores: L floats. */
void nmt_slot_attention(const float *qkv, float *kc, float *vc, const int32_t *seqlens, float *out,
                        int64_t R, int64_t H, int64_t L, int64_t Dh, float *scores);

/* CrossAttention: scores S floats, keys and values S * Dh floats each (scratch). */
void nmt_cross_attention(const float *q, const float *kc, const float *vc, const int32_t *mask, float *out,
                         int64_t B, int64_t G, int64_t H, int64_t S, int64_t Dh, float *scores,
                         float *keys, float *values);

/* TopK of each row of x (R, V): the k best values and their ids (R, k), best first, ties to the lower id. */
void nmt_top_k(const float *x, int64_t R, int64_t V, int64_t k, float *values, int64_t *ids);

#endif
