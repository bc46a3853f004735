/* The kernels of nmt_ops.c's ops (see kernels.h): plain C, with AVX-512 paths for the attention heads
 * and the top-k's scan where the CPU has it. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
/* One build runs everywhere and uses AVX-512 or AVX2 + FMA where the CPU has them. */
#define VECTOR_CLONES __attribute__((target_clones("arch=skylake-avx512", "arch=haswell", "default")))
#else
#define VECTOR_CLONES
#endif

/* exp(x) for x <= 0 (softmax after the max is subtracted), about 1 ulp: exp(x) = 2^n exp(r) with
 * |r| <= ln2/2 and exp(r) ~ 1 + r + r^2 p(r), p of degree 5. Branch-free so a loop of it vectorizes; below
 * -87 it returns exp(-87) ~ 1.6e-38, which adds nothing to a sum that holds a 1. */
static inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;
    const float n = floorf(x * 1.44269504088896341f + 0.5f);
    const float r = x - n * 0.693359375f + n * 2.12194440e-4f; /* ln2 split in two: r stays exact */
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    const float y = p * r * r + r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return y * scale;
}

/* out (Dh) = softmax(s) . V for the n scores s (overwritten) and the n rows of V (Dh floats each). */
static inline void softmax_values(float *s, const float *V, int64_t n, int64_t Dh, float *out) {
    float m = -INFINITY;
    for (int64_t t = 0; t < n; t++) m = s[t] > m ? s[t] : m;
    for (int64_t t = 0; t < n; t++) s[t] = exp_nonpositive(s[t] - m);
    float sum = 0.0f;
    for (int64_t t = 0; t < n; t++) sum += s[t];
    float acc[MAX_HEAD_DIM];
    for (int64_t d = 0; d < Dh; d++) acc[d] = 0.0f;
    for (int64_t t = 0; t < n; t++) {
        const float w = s[t], *v = V + t * Dh;
        for (int64_t d = 0; d < Dh; d++) acc[d] += w * v[d];
    }
    const float inv = 1.0f / sum;
    for (int64_t d = 0; d < Dh; d++) out[d] = acc[d] * inv;
}

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define HAVE_AVX512_PATH 1

/* The same head with AVX-512 (head_dim a multiple of 16, at most 256): four keys' dot products at a
 * time (their horizontal sums overlap), exp 16 scores at a time, the value sum in registers. About
 * twice the generic loop's speed, which spends its time in per-key horizontal sums and scalar exps. */
__attribute__((target("avx512f"))) static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(y, n);
}

__attribute__((target("avx512f")))
static void head_avx512(const float *q, const float *K, const float *V, int64_t n, int64_t Dh, float *s,
                        float *out) {
    const int64_t C = Dh / 16;
    int64_t t = 0;
    for (; t + 4 <= n; t += 4) {
        const float *k0 = K + t * Dh, *k1 = k0 + Dh, *k2 = k1 + Dh, *k3 = k2 + Dh;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t c = 0; c < Dh; c += 16) {
            const __m512 qv = _mm512_loadu_ps(q + c);
            a0 = _mm512_fmadd_ps(qv, _mm512_loadu_ps(k0 + c), a0);
            a1 = _mm512_fmadd_ps(qv, _mm512_loadu_ps(k1 + c), a1);
            a2 = _mm512_fmadd_ps(qv, _mm512_loadu_ps(k2 + c), a2);
            a3 = _mm512_fmadd_ps(qv, _mm512_loadu_ps(k3 + c), a3);
        }
        s[t] = _mm512_reduce_add_ps(a0);
        s[t + 1] = _mm512_reduce_add_ps(a1);
        s[t + 2] = _mm512_reduce_add_ps(a2);
        s[t + 3] = _mm512_reduce_add_ps(a3);
    }
    for (; t < n; t++) {
        __m512 a = _mm512_setzero_ps();
        for (int64_t c = 0; c < Dh; c += 16) a = _mm512_fmadd_ps(_mm512_loadu_ps(q + c), _mm512_loadu_ps(K + t * Dh + c), a);
        s[t] = _mm512_reduce_add_ps(a);
    }
    __m512 mv = _mm512_set1_ps(-INFINITY);
    for (t = 0; t < n; t += 16) {
        const __mmask16 live = n - t >= 16 ? 0xFFFF : (__mmask16)((1u << (n - t)) - 1);
        mv = _mm512_mask_max_ps(mv, live, mv, _mm512_maskz_loadu_ps(live, s + t));
    }
    const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mv));
    __m512 sv = _mm512_setzero_ps();
    for (t = 0; t < n; t += 16) {
        const __mmask16 live = n - t >= 16 ? 0xFFFF : (__mmask16)((1u << (n - t)) - 1);
        const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, s + t), m));
        _mm512_mask_storeu_ps(s + t, live, e);
        sv = _mm512_mask_add_ps(sv, live, sv, e);
    }
    const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sv));
    __m512 acc[16];
    for (int64_t c = 0; c < C; c++) acc[c] = _mm512_setzero_ps();
    if (C == 4) { /* head_dim 64: the accumulators stay in registers */
        __m512 a0 = acc[0], a1 = acc[1], a2 = acc[2], a3 = acc[3];
        for (t = 0; t < n; t++) {
            const __m512 w = _mm512_set1_ps(s[t]);
            const float *v = V + t * 64;
            a0 = _mm512_fmadd_ps(w, _mm512_loadu_ps(v), a0);
            a1 = _mm512_fmadd_ps(w, _mm512_loadu_ps(v + 16), a1);
            a2 = _mm512_fmadd_ps(w, _mm512_loadu_ps(v + 32), a2);
            a3 = _mm512_fmadd_ps(w, _mm512_loadu_ps(v + 48), a3);
        }
        acc[0] = a0, acc[1] = a1, acc[2] = a2, acc[3] = a3;
    } else {
        for (t = 0; t < n; t++) {
            const __m512 w = _mm512_set1_ps(s[t]);
            for (int64_t c = 0; c < C; c++) acc[c] = _mm512_fmadd_ps(w, _mm512_loadu_ps(V + t * Dh + 16 * c), acc[c]);
        }
    }
    for (int64_t c = 0; c < C; c++) _mm512_storeu_ps(out + 16 * c, _mm512_mul_ps(acc[c], inv));
}

static int cpu_has_avx512(void) {
    static int cpu = -1; /* a race here only computes the same answer twice */
    /* NMT_NATIVE_PORTABLE: the portable loops on any CPU (tests/engine/test_native.py runs them so) */
    if (cpu < 0) cpu = __builtin_cpu_supports("avx512f") && !getenv("NMT_NATIVE_PORTABLE") ? 1 : 0;
    return cpu;
}

static int use_avx512(int64_t Dh) { return cpu_has_avx512() && Dh % 16 == 0 && Dh <= 256; }

/* top_k_row's scan with AVX-512: 16 values compared with the k-th best at a time, a lane that beats it
 * inserted (nmt_keep_best) in index order. */

__attribute__((target("avx512f")))
static void top_k_avx512(const float *x, int64_t n, int64_t k, float *values, int64_t *ids) {
    int64_t have = 0;
    for (int64_t start = 0; start < n; start += 16) {
        const __mmask16 live = n - start >= 16 ? 0xFFFF : (__mmask16)((1u << (n - start)) - 1);
        const __m512 v = _mm512_maskz_loadu_ps(live, x + start);
        const float worst = have == k ? values[k - 1] : -INFINITY;
        __mmask16 beats = have == k ? _mm512_mask_cmp_ps_mask(live, v, _mm512_set1_ps(worst), _CMP_GT_OQ) : live;
        while (beats) {
            const int j = __builtin_ctz(beats);
            beats &= beats - 1;
            if (have < k || x[start + j] > values[k - 1])
                nmt_keep_best(x[start + j], start + j, k, &have, values, ids);
        }
    }
}

/* sum of exp(x[i] - m) over n floats (m >= every x[i]), 16 at a time. */
__attribute__((target("avx512f")))
static float sum_exp_avx512(const float *x, int64_t n, float m) {
    const __m512 mv = _mm512_set1_ps(m);
    __m512 s = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 live = n - i >= 16 ? 0xFFFF : (__mmask16)((1u << (n - i)) - 1);
        s = _mm512_mask_add_ps(s, live, s, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, x + i), mv)));
    }
    return _mm512_reduce_add_ps(s);
}
#else
#define HAVE_AVX512_PATH 0
#endif

VECTOR_CLONES
static void head_generic(const float *q, const float *K, const float *V, int64_t n, int64_t Dh, float *s,
                         float *out) {
    for (int64_t t = 0; t < n; t++) s[t] = nmt_dot(q, K + t * Dh, Dh);
    softmax_values(s, V, n, Dh, out);
}

/* One (row, head): out = softmax(q . K[t] for t < n) . V, s a scratch of n floats. */
static void head(const float *q, const float *K, const float *V, int64_t n, int64_t Dh, float *s, float *out) {
#if HAVE_AVX512_PATH
    if (use_avx512(Dh)) {
        head_avx512(q, K, V, n, Dh, s, out);
        return;
    }
#endif
    head_generic(q, K, V, n, Dh, s, out);
}

void nmt_slot_attention(const float *qkv, float *kc, float *vc, const int32_t *seqlens, float *out,
                          int64_t R, int64_t H, int64_t L, int64_t Dh, float *scores) {
    const int64_t D = H * Dh;
    for (int64_t r = 0; r < R; r++) {
        const int64_t p = seqlens[r]; /* 0 <= p < L, checked by the caller */
        const float *q = qkv + r * 3 * D, *k_new = q + D, *v_new = q + 2 * D;
        for (int64_t h = 0; h < H; h++) {
            float *K = kc + (r * H + h) * L * Dh, *V = vc + (r * H + h) * L * Dh; /* (L, Dh) */
            memcpy(K + p * Dh, k_new + h * Dh, Dh * sizeof(float));
            memcpy(V + p * Dh, v_new + h * Dh, Dh * sizeof(float));
            head(q + h * Dh, K, V, p + 1, Dh, scores, out + r * D + h * Dh);
        }
    }
}

void nmt_cross_attention(const float *q, const float *kc, const float *vc, const int32_t *mask, float *out,
                            int64_t B, int64_t G, int64_t H, int64_t S, int64_t Dh, float *scores,
                            float *keys, float *values) {
    const int64_t D = H * Dh;
    for (int64_t b = 0; b < B; b++) {
        const int32_t *m = mask + b * S;
        int64_t n = 0, prefix = 0; /* unmasked keys; how many of them lead the row */
        for (int64_t s = 0; s < S; s++) {
            n += m[s] != 0;
            prefix += m[s] != 0 && prefix == s;
        }
        const int gather = n > 0 && n < S && prefix != n; /* padding inside the row: copy the keys out */
        if (n == 0) n = S; /* a fully masked row attends to every key, as MultiHeadAttention's does */
        for (int64_t h = 0; h < H; h++) {
            const float *K = kc + (b * H + h) * S * Dh, *V = vc + (b * H + h) * S * Dh; /* (S, Dh) */
            if (gather) {
                for (int64_t s = 0, j = 0; s < S; s++)
                    if (m[s]) {
                        memcpy(keys + j * Dh, K + s * Dh, Dh * sizeof(float));
                        memcpy(values + j * Dh, V + s * Dh, Dh * sizeof(float));
                        j++;
                    }
                K = keys;
                V = values;
            }
            for (int64_t g = 0; g < G; g++) {
                head(q + (b * G + g) * D + h * Dh, K, V, n, Dh, scores, out + (b * G + g) * D + h * Dh);
            }
        }
    }
}


/* ---- top-k of the log-probabilities ---- */

/* The k best of x (n floats) into values/ids, best first and the lower index first among equal values
 * (ONNX TopK's order), in one pass: only a value that beats the k-th best so far is inserted. */
static void top_k_row(const float *x, int64_t n, int64_t k, float *values, int64_t *ids) {
#if HAVE_AVX512_PATH
    if (cpu_has_avx512()) {
        top_k_avx512(x, n, k, values, ids);
        return;
    }
#endif
    int64_t have = 0;
    for (int64_t i = 0; i < n; i++)
        if (have < k || x[i] > values[k - 1]) nmt_keep_best(x[i], i, k, &have, values, ids); /* rarely */
}

void nmt_top_k(const float *x, int64_t R, int64_t V, int64_t k, float *values, int64_t *ids) {
    for (int64_t r = 0; r < R; r++) top_k_row(x + r * V, V, k, values + r * k, ids + r * k);
}

VECTOR_CLONES
static float sum_exp_generic(const float *x, int64_t n, float m) {
    float s = 0.0f;
    for (int64_t i = 0; i < n; i++) s += exp_nonpositive(x[i] - m);
    return s;
}

void nmt_log_softmax_top_k(const float *x, int64_t R, int64_t V, int64_t k, float *values, int64_t *ids) {
    for (int64_t r = 0; r < R; r++) {
        const float *row = x + r * V;
        float *best = values + r * k;
        top_k_row(row, V, k, best, ids + r * k);
        const float m = best[0]; /* the row's maximum: its best value */
#if HAVE_AVX512_PATH
        const float sum = cpu_has_avx512() ? sum_exp_avx512(row, V, m) : sum_exp_generic(row, V, m);
#else
        const float sum = sum_exp_generic(row, V, m);
#endif
        const float log_sum = logf(sum);
        for (int64_t j = 0; j < k; j++) best[j] = (best[j] - m) - log_sum; /* as LogSoftmax: x - max - log(sum) */
    }
}
