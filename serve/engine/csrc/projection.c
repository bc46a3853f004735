/* ProjectionTopK's kernel (nmt_ops.c): the k best entries of each row of h . W^T + b, exactly, without
 * reading all of W in float32.
 *
 * Why: the vocabulary projection (K x V floats, 8 MB for the small model) is about 40% of a float32 slot
 * decoder step, at 1 row (where a step streams every weight from L3) and at 64 rows (where it is 40% of
 * the arithmetic). A greedy step needs only the best token (two below min_length) and no log-softmax when
 * the caller asked for no scores. So:
 *   1. an estimate a_v of every logit from int8 copies of h (per row) and W (per vocabulary row),
 *      u8 x s8 dot products (AVX-512 VNNI where the CPU has it): a quarter of the bytes and of the work;
 *   2. a bound e_v with |logit_v - a_v| <= e_v, from Cauchy-Schwarz:
 *        h.w - sh*sw*(qh.qw) = h.(w - sw*qw) + (h - sh*qh).(sw*qw)
 *        |...| <= |h| |w - sw*qw| + |h - sh*qh| |sw*qw|
 *      the two norms per vocabulary row are precomputed (the `bounds` input), the two per row here,
 *      widened for float rounding (see `bound_terms`), and computed with the estimates while the
 *      int32 sums are still in registers;
 *   3. T = the k-th largest a_v - e_v: a v with a_v + e_v < T has k entries above it, so the top k are
 *      among the candidates a_v + e_v >= T (about 1.2 per row on the trained model at k = 1);
 *   4. the candidates' logits in float32 (h . w_v + b_v) and their top k, ties to the lower id.
 * The result is the top k of the float32 logits, whatever the estimates; only the number of candidates
 * depends on them. A row with a NaN or infinity scores every entry in float32.
 *
 * Layouts: w8 (Vp/16, Kp/4, 16, 4) int8: panel p holds vocabulary rows 16p..16p+15, and for each group
 * of 4 inputs their 16 x 4 bytes, the operand order of vpdpbusd. Vp, Kp: V, K rounded up to 16 and 4,
 * the padding zero. h is quantized to qh in [-127, 127] and fed as qh + 128 (unsigned): the sums of
 * each vocabulary row's int8 weights (`sums`) take the 128 back out. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

#define CHUNK 32 /* rows whose bounds are held at once: 32 x Vp floats (1 MB at V = 8000) in L2 */

/* float32 rounding allowances for the bound (see bound_terms): generous, they widen e_v by about 1%. */
#define REL_NORMS 0x1p-10f    /* the four norms are rounded float32 values of float64 sums */
#define REL_ESTIMATE 0x1p-18f /* a_v: int32 -> float, scale products, the bias add (bounds[2] holds
                                 2 * REL_ESTIMATE * |b_v|, see native.projection_weights) */

/* A row's quantization and bound coefficients: e_v = c_dw * bounds[0][v] + c_wn * bounds[1][v] + bounds[2][v]. */
typedef struct {
    float sh;   /* h ~ sh * qh */
    float c_dw, c_wn;
    int finite; /* 0: NaN or infinity in h, every entry scored in float32 */
} RowStats;

/* Quantize one row (u: Kp bytes, qh + 128) and compute its bound coefficients.
 *  - |h| and |h - sh*qh| are float64 sums rounded to float32, as are the per-vocabulary norms: REL_NORMS.
 *  - The float32 logit computed later (dot_f32 + b) differs from the exact h.w_v + b_v by at most
 *    K * 2^-24 * |h| |w_v| with |w_v| <= dw_v + wn_v: K * 2^-23 * |h| on both coefficients (a factor 2 spare).
 *  - a_v's own rounding, REL_ESTIMATE * (|a_v| + |b_v|), with |a_v - b_v| <= (|h| + |h - sh*qh|) * wn_v:
 *    REL_ESTIMATE * (|h| + |h - sh*qh|) on c_wn, the rest in bounds[2]. */
static RowStats bound_terms(const float *h, int64_t K, int64_t Kp, uint8_t *u) {
    RowStats s = {1.0f, 0.0f, 0.0f, 1};
    float amax = 0.0f;
    for (int64_t k = 0; k < K; k++) {
        const float a = fabsf(h[k]);
        if (!(a <= 3.0e38f)) {
            s.finite = 0;
            return s;
        }
        amax = a > amax ? a : amax;
    }
    s.sh = amax > 0.0f ? amax / 127.0f : 1.0f;
    const float inv = 1.0f / s.sh;
    double hn = 0.0, dn = 0.0;
    for (int64_t k = 0; k < K; k++) {
        float q = nearbyintf(h[k] * inv);
        q = q > 127.0f ? 127.0f : (q < -127.0f ? -127.0f : q);
        u[k] = (uint8_t)(int)(q + 128.0f);
        const double d = (double)h[k] - (double)s.sh * (double)q; /* exact: both products fit a double */
        hn += (double)h[k] * h[k];
        dn += d * d;
    }
    for (int64_t k = K; k < Kp; k++) u[k] = 128; /* qh = 0 on the padding */
    const float h_norm = (float)sqrt(hn), d_norm = (float)sqrt(dn);
    const float rounding = (float)K * 0x1p-23f * h_norm;
    s.c_dw = h_norm * (1.0f + REL_NORMS) + rounding;
    s.c_wn = d_norm * (1.0f + REL_NORMS) + rounding + REL_ESTIMATE * (h_norm + d_norm);
    return s;
}

/* Where the bounds of a chunk of rows go: upper[m][v] = a_v + e_v (-inf past V), lower[m][v] = a_v - e_v
 * (when k > 1), best[m][lane]: the largest lower bound seen in that lane. */
typedef struct {
    const NmtProjection *P;
    const RowStats *stats;
    float *upper, *lower, *best;
} Bounds;

/* ---- portable: int32 sums into acc (rows, Vp), then the bounds ---- */

static void estimate_portable(const uint8_t *u, int64_t rows, int64_t Kp, const int8_t *w8, int64_t panels,
                              int32_t *acc, int64_t Vp) {
    const int64_t groups = Kp / 4;
    for (int64_t m = 0; m < rows; m++)
        for (int64_t p = 0; p < panels; p++) {
            int32_t sum[16] = {0};
            const int8_t *w = w8 + p * groups * 64;
            for (int64_t g = 0; g < groups; g++)
                for (int j = 0; j < 16; j++)
                    for (int i = 0; i < 4; i++) sum[j] += (int32_t)u[m * Kp + 4 * g + i] * w[g * 64 + 4 * j + i];
            memcpy(acc + m * Vp + 16 * p, sum, sizeof sum);
        }
}

static void bounds_portable(const Bounds *b, int64_t m, const int32_t *acc) {
    const NmtProjection *P = b->P;
    const RowStats *s = b->stats + m;
    const float *dw = P->bounds, *wn = dw + P->Vp, *slack = wn + P->Vp;
    float *upper = b->upper + m * P->Vp, *best = b->best + 16 * m;
    for (int64_t v = 0; v < P->Vp; v++) {
        if (v >= P->V) {
            upper[v] = -INFINITY;
            continue;
        }
        const float a = (float)(acc[v] - 128 * P->sums[v]) * (s->sh * P->scale[v]) + P->bias[v];
        const float e = s->c_dw * dw[v] + s->c_wn * wn[v] + slack[v];
        upper[v] = a + e;
        if (b->lower) b->lower[m * P->Vp + v] = a - e;
        best[v % 16] = a - e > best[v % 16] ? a - e : best[v % 16];
    }
}

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define HAVE_VNNI_PATH 1

#define VNNI __attribute__((target("avx512f,avx512bw,avx512vnni")))

/* The bounds of row m's entries v..v+15 from their int32 sums, while those are in a register. */
VNNI static inline void finish(const Bounds *b, int64_t m, int64_t v, __m512i sums) {
    const NmtProjection *P = b->P;
    const RowStats *s = b->stats + m;
    const __mmask16 live = P->V - v >= 16 ? 0xFFFF : (__mmask16)((1u << (P->V - v)) - 1);
    const __m512i dot = _mm512_sub_epi32(sums, _mm512_slli_epi32(_mm512_loadu_si512(P->sums + v), 7));
    const __m512 scale = _mm512_mul_ps(_mm512_set1_ps(s->sh), _mm512_loadu_ps(P->scale + v));
    const __m512 a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, _mm512_maskz_loadu_ps(live, P->bias + v));
    const float *dw = P->bounds + v, *wn = dw + P->Vp, *slack = wn + P->Vp;
    const __m512 e = _mm512_fmadd_ps(_mm512_set1_ps(s->c_dw), _mm512_loadu_ps(dw),
                                     _mm512_fmadd_ps(_mm512_set1_ps(s->c_wn), _mm512_loadu_ps(wn), _mm512_loadu_ps(slack)));
    const __m512 lo = _mm512_sub_ps(a, e);
    const __m512 none = _mm512_set1_ps(-INFINITY);
    _mm512_storeu_ps(b->upper + m * P->Vp + v, _mm512_mask_blend_ps(live, none, _mm512_add_ps(a, e)));
    if (b->lower) _mm512_storeu_ps(b->lower + m * P->Vp + v, _mm512_mask_blend_ps(live, none, lo));
    float *best = b->best + 16 * m;
    _mm512_storeu_ps(best, _mm512_mask_max_ps(_mm512_loadu_ps(best), live, _mm512_loadu_ps(best), lo));
}

/* c += a (u8) . b (s8), in place: through the intrinsic GCC copied every accumulator between registers
 * (and some to the stack) at each step, which halved the kernel's speed. */
#define DP(c, a, b) __asm__("vpdpbusd %2, %1, %0" : "+v"(c) : "v"(a), "vm"(b))

/* Four rows (u: 4 rows of Kp bytes) against four panels from v: 16 accumulators in registers, per group
 * of 4 inputs one 64-byte load per panel and one 4-byte broadcast per row. */
VNNI static void estimate_4x4(const uint8_t *u, int64_t Kp, const int8_t *w, const Bounds *b, int64_t m,
                              int64_t v) {
    const int64_t groups = Kp / 4, stride = groups * 64;
    __m512i c00 = _mm512_setzero_si512(), c01 = c00, c02 = c00, c03 = c00, c10 = c00, c11 = c00, c12 = c00,
            c13 = c00, c20 = c00, c21 = c00, c22 = c00, c23 = c00, c30 = c00, c31 = c00, c32 = c00, c33 = c00;
    for (int64_t g = 0; g < groups; g++) {
        const int8_t *p = w + g * 64;
        const __m512i b0 = _mm512_loadu_si512(p), b1 = _mm512_loadu_si512(p + stride),
                      b2 = _mm512_loadu_si512(p + 2 * stride), b3 = _mm512_loadu_si512(p + 3 * stride);
        int32_t word;
        memcpy(&word, u + 4 * g, 4);
        __m512i a = _mm512_set1_epi32(word);
        DP(c00, a, b0); DP(c01, a, b1); DP(c02, a, b2); DP(c03, a, b3);
        memcpy(&word, u + Kp + 4 * g, 4);
        a = _mm512_set1_epi32(word);
        DP(c10, a, b0); DP(c11, a, b1); DP(c12, a, b2); DP(c13, a, b3);
        memcpy(&word, u + 2 * Kp + 4 * g, 4);
        a = _mm512_set1_epi32(word);
        DP(c20, a, b0); DP(c21, a, b1); DP(c22, a, b2); DP(c23, a, b3);
        memcpy(&word, u + 3 * Kp + 4 * g, 4);
        a = _mm512_set1_epi32(word);
        DP(c30, a, b0); DP(c31, a, b1); DP(c32, a, b2); DP(c33, a, b3);
    }
    finish(b, m, v, c00); finish(b, m, v + 16, c01); finish(b, m, v + 32, c02); finish(b, m, v + 48, c03);
    finish(b, m + 1, v, c10); finish(b, m + 1, v + 16, c11); finish(b, m + 1, v + 32, c12); finish(b, m + 1, v + 48, c13);
    finish(b, m + 2, v, c20); finish(b, m + 2, v + 16, c21); finish(b, m + 2, v + 32, c22); finish(b, m + 2, v + 48, c23);
    finish(b, m + 3, v, c30); finish(b, m + 3, v + 16, c31); finish(b, m + 3, v + 32, c32); finish(b, m + 3, v + 48, c33);
}

/* One row against four panels (the rows left over, and batch 1: bound by reading the weights). */
VNNI static void estimate_1x4(const uint8_t *u, int64_t Kp, const int8_t *w, const Bounds *b, int64_t m, int64_t v) {
    const int64_t groups = Kp / 4, stride = groups * 64;
    __m512i c0 = _mm512_setzero_si512(), c1 = c0, c2 = c0, c3 = c0;
    for (int64_t g = 0; g < groups; g++) {
        const int8_t *p = w + g * 64;
        int32_t word;
        memcpy(&word, u + 4 * g, 4);
        const __m512i a = _mm512_set1_epi32(word);
        DP(c0, a, _mm512_loadu_si512(p));
        DP(c1, a, _mm512_loadu_si512(p + stride));
        DP(c2, a, _mm512_loadu_si512(p + 2 * stride));
        DP(c3, a, _mm512_loadu_si512(p + 3 * stride));
    }
    finish(b, m, v, c0); finish(b, m, v + 16, c1); finish(b, m, v + 32, c2); finish(b, m, v + 48, c3);
}

/* One row against one panel (the last panels when they are not a multiple of four). */
VNNI static void estimate_1x1(const uint8_t *u, int64_t Kp, const int8_t *w, const Bounds *b, int64_t m, int64_t v) {
    __m512i c = _mm512_setzero_si512();
    for (int64_t g = 0; g < Kp / 4; g++) {
        int32_t word;
        memcpy(&word, u + 4 * g, 4);
        DP(c, _mm512_set1_epi32(word), _mm512_loadu_si512(w + g * 64));
    }
    finish(b, m, v, c);
}

/* Panels outermost, four at a time (16 KB of weights at K = 256, in L1 while every row passes). */
VNNI static void estimate_vnni(const uint8_t *u, int64_t rows, int64_t Kp, const int8_t *w8, int64_t panels,
                               const Bounds *b) {
    const int64_t panel_bytes = Kp * 16;
    int64_t p = 0;
    for (; p + 4 <= panels; p += 4) {
        const int8_t *w = w8 + p * panel_bytes;
        int64_t m = 0;
        for (; m + 4 <= rows; m += 4) estimate_4x4(u + m * Kp, Kp, w, b, m, 16 * p);
        for (; m < rows; m++) estimate_1x4(u + m * Kp, Kp, w, b, m, 16 * p);
    }
    for (; p < panels; p++)
        for (int64_t m = 0; m < rows; m++) estimate_1x1(u + m * Kp, Kp, w8 + p * panel_bytes, b, m, 16 * p);
}

/* The ids v with upper[v] >= T, ascending, into `out`; returns how many. */
VNNI static int64_t candidates_avx512(const float *upper, int64_t Vp, float T, int64_t *out) {
    int64_t n = 0;
    const __m512 t = _mm512_set1_ps(T);
    for (int64_t v = 0; v < Vp; v += 16) {
        __mmask16 hit = _mm512_cmp_ps_mask(_mm512_loadu_ps(upper + v), t, _CMP_GE_OQ);
        while (hit) {
            out[n++] = v + __builtin_ctz(hit);
            hit &= hit - 1;
        }
    }
    return n;
}

static int cpu_has_vnni(void) {
    static int cpu = -1; /* a race here only computes the same answer twice */
    /* NMT_NATIVE_PORTABLE: the portable loops on any CPU (tests/engine/test_native.py runs them so) */
    if (cpu < 0)
        cpu = __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw") &&
              !getenv("NMT_NATIVE_PORTABLE");
    return cpu;
}
#else
#define HAVE_VNNI_PATH 0
static int cpu_has_vnni(void) { return 0; }
#endif

__attribute__((visibility("default"))) int nmt_projection_fast(void) { return cpu_has_vnni(); }

/* ---- selection ---- */

/* Row m's top k from its bounds: the threshold T, the candidates, their float32 logits. */
static void select_row(const Bounds *b, int64_t m, const float *h, int64_t k, int64_t *picked, float *values,
                       int64_t *ids) {
    const NmtProjection *P = b->P;
    const int64_t V = P->V, K = P->K, Vp = P->Vp;
    const float *upper = b->upper + m * Vp;
    int64_t have = 0, n = 0;
    if (!b->stats[m].finite) { /* every entry in float32; a NaN never beats a kept value, as in TopK */
        for (int64_t v = 0; v < V; v++)
            nmt_keep_best(nmt_dot(h, P->w + v * K, K) + P->bias[v], v, k, &have, values, ids);
        return;
    }
    float T = -INFINITY;
    if (k == 1) {
        for (int j = 0; j < 16; j++) T = b->best[16 * m + j] > T ? b->best[16 * m + j] : T;
    } else { /* the k-th largest lower bound (below min_length: k = 2) */
        for (int64_t v = 0; v < V; v++) nmt_keep_best(b->lower[m * Vp + v], v, k, &have, values, ids);
        T = values[k - 1];
        have = 0;
    }
#if HAVE_VNNI_PATH
    if (cpu_has_vnni()) n = candidates_avx512(upper, Vp, T, picked);
    else
#endif
        for (int64_t v = 0; v < V; v++)
            if (upper[v] >= T) picked[n++] = v;
    for (int64_t j = 0; j < n; j++) {
        const int64_t v = picked[j];
        nmt_keep_best(nmt_dot(h, P->w + v * K, K) + P->bias[v], v, k, &have, values, ids);
    }
}

int nmt_projection_top_k(const NmtProjection *P, const float *h, int64_t R, int64_t k, float *values,
                         int64_t *ids) {
    const int64_t Vp = P->Vp, Kp = P->Kp, rows_max = R < CHUNK ? R : CHUNK;
    const int fast = cpu_has_vnni();
    /* scratch: bounds (upper; lower for k > 1), lane maxima, candidates, int32 sums (portable loops
     * only), row statistics, quantized rows */
    const size_t floats = (size_t)(rows_max * Vp) * (k > 1 ? 2 : 1) + (size_t)(16 * rows_max);
    const size_t bytes = floats * sizeof(float) + (size_t)Vp * sizeof(int64_t) +
                         (fast ? 0 : (size_t)(rows_max * Vp) * sizeof(int32_t)) +
                         (size_t)rows_max * sizeof(RowStats) + (size_t)(rows_max * Kp);
    char *work = malloc(bytes);
    if (!work) return 1;
    float *upper = (float *)work, *lower = k > 1 ? upper + rows_max * Vp : NULL;
    float *best = upper + rows_max * Vp * (k > 1 ? 2 : 1);
    int64_t *picked = (int64_t *)(best + 16 * rows_max);
    int32_t *acc = (int32_t *)(picked + Vp); /* used only without VNNI */
    RowStats *stats = (RowStats *)(acc + (fast ? 0 : rows_max * Vp));
    uint8_t *u = (uint8_t *)(stats + rows_max);
    const Bounds b = {P, stats, upper, lower, best};
    for (int64_t r0 = 0; r0 < R; r0 += CHUNK) {
        const int64_t rows = R - r0 < CHUNK ? R - r0 : CHUNK;
        for (int64_t m = 0; m < rows; m++) stats[m] = bound_terms(h + (r0 + m) * P->K, P->K, Kp, u + m * Kp);
        for (int64_t j = 0; j < 16 * rows; j++) best[j] = -INFINITY;
#if HAVE_VNNI_PATH
        if (fast) {
            estimate_vnni(u, rows, Kp, P->w8, Vp / 16, &b);
        } else
#endif
        {
            estimate_portable(u, rows, Kp, P->w8, Vp / 16, acc, Vp);
            for (int64_t m = 0; m < rows; m++) bounds_portable(&b, m, acc + m * Vp);
        }
        for (int64_t m = 0; m < rows; m++)
            select_row(&b, m, h + (r0 + m) * P->K, k, picked, values + (r0 + m) * k, ids + (r0 + m) * k);
    }
    free(work);
    return 0;
}
