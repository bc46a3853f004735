/* The kernels of the "nmt" custom ops (nmt_ops.c); shapes and layouts are described there. */
#ifndef NMT_KERNELS_H
#define NMT_KERNELS_H

#include <stdint.h>

#define MAX_HEAD_DIM 512
#define LANES 16

/* a . b over n floats, in LANES partial sums (so the loop vectorizes without reassociating). */
static inline float nmt_dot(const float *a, const float *b, int64_t n) {
    float part[LANES] = {0};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int j = 0; j < LANES; j++) part[j] += a[i + j] * b[i + j];
    float tail = 0.0f;
    for (; i < n; i++) tail += a[i] * b[i];
    for (int w = LANES / 2; w; w /= 2)
        for (int j = 0; j < w; j++) part[j] += part[j + w];
    return part[0] + tail;
}

/* Keep (v, id) among the `have` best so far (values descending; k at most): after every kept value >= v,
 * so that equal values keep index order; a value that does not beat the k-th is dropped (NaN too).
 * Inline: the top-k scans keep `have` in a register (as a call, the 256-row top-8 ran 4x slower). */
static inline void nmt_keep_best(float v, int64_t id, int64_t k, int64_t *have, float *values, int64_t *ids) {
    if (*have == k && !(v > values[k - 1])) return;
    int64_t at = *have < k ? *have : k - 1;
    while (at > 0 && values[at - 1] < v) {
        values[at] = values[at - 1];
        ids[at] = ids[at - 1];
        at--;
    }
    values[at] = v;
    ids[at] = id;
    if (*have < k) (*have)++;
}

/* SlotAttention: 0 <= seqlens[r] < L for every row (checked by the caller); scores: L floats. */
void nmt_slot_attention(const float *qkv, float *kc, float *vc, const int32_t *seqlens, float *out,
                        int64_t R, int64_t H, int64_t L, int64_t Dh, float *scores);

/* CrossAttention: scores S floats, keys and values S * Dh floats each (scratch). */
void nmt_cross_attention(const float *q, const float *kc, const float *vc, const int32_t *mask, float *out,
                         int64_t B, int64_t G, int64_t H, int64_t S, int64_t Dh, float *scores,
                         float *keys, float *values);

/* TopK of each row of x (R, V): the k best values and their ids (R, k), best first, ties to the lower id. */
void nmt_top_k(const float *x, int64_t R, int64_t V, int64_t k, float *values, int64_t *ids);

/* The same of LogSoftmax(x) (last axis), without writing it: the top k of x, less each row's
 * log-sum-exp. */
void nmt_log_softmax_top_k(const float *x, int64_t R, int64_t V, int64_t k, float *values, int64_t *ids);

/* ProjectionTopK (projection.c): W (V, K) float32 with its int8 copy and the bound's norms. */
typedef struct {
    const int8_t *w8;     /* (Vp/16, Kp/4, 16, 4) */
    const float *scale;   /* (Vp,) W[v] ~ scale[v] * w8 row v */
    const int32_t *sums;  /* (Vp,) sum of w8 row v */
    const float *bounds;  /* (3, Vp) |W[v] - scale[v] * w8 row v|, |scale[v] * w8 row v|, a bias allowance */
    const float *w;       /* (V, K) */
    const float *bias;    /* (V,) */
    int64_t V, K, Vp, Kp;
} NmtProjection;

/* The k best of h (R, K) . W^T + bias per row, best first, ties to the lower id; 1 if out of memory. */
int nmt_projection_top_k(const NmtProjection *P, const float *h, int64_t R, int64_t k, float *values,
                         int64_t *ids);

/* 1 where the estimates run on AVX-512 VNNI (else portable loops, several times slower). */
int nmt_projection_fast(void);

#endif
