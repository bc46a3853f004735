/* Attention kernels of the CPU slot decoder, as an ONNX Runtime custom-op library (domain "nmt").
 *
 * Why: at 1 thread ONNX Runtime's CPU GroupQueryAttention and MultiHeadAttention cost 0.5-1.3 us per
 * (row, head) of a decoder step, a third of an int8 step at 32-64 rows (bench/results/attention-share.md).
 * They make a GEMM call, a softmax pass and a second GEMM call per (row, head) for one query. Here a
 * (row, head) is one pass over its keys: dot products, softmax, weighted sum of the values.
 *
 *   SlotAttention(qkv, past_key, past_value, seqlens_k) -> (output, present_key, present_value)
 *     GroupQueryAttention with as many K/V heads as query heads, scale 1, one new token per row:
 *     qkv (R, 1, 3D) packed [q | k | v]; the caches (R, H, L, Dh) hold row r's tokens in slots
 *     0..seqlens_k[r]-1; the new K/V is written at slot seqlens_k[r] and the row attends over slots
 *     0..seqlens_k[r]. present_* are the same buffers as past_* when the caller binds them so (the
 *     slot cache does); otherwise the past is copied into them first.
 *   CrossAttention(query, key, value, key_padding_mask) -> output
 *     MultiHeadAttention (scale 1) on cross K/V in (B, H, S, Dh) with a (B, S) int32 mask (0: padding):
 *     query (B, G, D), G queries per K/V row (a source's beams).
 *
 * serve/engine/native.py rewrites a slot decoder's nodes to these ops, and only where the nodes
 * match exactly these forms. The kernels run on the calling thread.
 *
 * The C API is used through its stable binary interface: OrtApiBase, the OrtCustomOp struct of API
 * version 16 and the positions of the OrtApi functions called. That interface is append-only, so
 * these positions hold in every later ONNX Runtime. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* ---- the parts of the ONNX Runtime C API used here ---- */
typedef struct OrtStatus OrtStatus;
typedef struct OrtApi OrtApi; /* an array of function pointers, see API() */
typedef struct OrtSessionOptions OrtSessionOptions;
typedef struct OrtCustomOpDomain OrtCustomOpDomain;
typedef struct OrtKernelInfo OrtKernelInfo;
typedef struct OrtKernelContext OrtKernelContext;
typedef struct OrtValue OrtValue;
typedef struct OrtTensorTypeAndShapeInfo OrtTensorTypeAndShapeInfo;
typedef struct OrtApiBase {
    const OrtApi *(*GetApi)(uint32_t version);
    const char *(*GetVersionString)(void);
} OrtApiBase;

enum { API_VERSION = 16 };          /* KernelComputeV2: errors come back as statuses */
enum { TYPE_FLOAT = 1, TYPE_INT32 = 6 };     /* ONNXTensorElementDataType */
enum { REQUIRED = 0 };                       /* OrtCustomOpInputOutputCharacteristic */
enum { MEM_DEFAULT = 0 };                    /* OrtMemType */
enum { ORT_FAIL = 1, ORT_INVALID_ARGUMENT = 2 }; /* OrtErrorCode */

typedef struct OrtCustomOp {                 /* the API-version-16 layout */
    uint32_t version;
    void *(*CreateKernel)(const struct OrtCustomOp *, const OrtApi *, const OrtKernelInfo *);
    const char *(*GetName)(const struct OrtCustomOp *);
    const char *(*GetExecutionProviderType)(const struct OrtCustomOp *);
    int (*GetInputType)(const struct OrtCustomOp *, size_t);
    size_t (*GetInputTypeCount)(const struct OrtCustomOp *);
    int (*GetOutputType)(const struct OrtCustomOp *, size_t);
    size_t (*GetOutputTypeCount)(const struct OrtCustomOp *);
    void (*KernelCompute)(void *, OrtKernelContext *);
    void (*KernelDestroy)(void *);
    int (*GetInputCharacteristic)(const struct OrtCustomOp *, size_t);
    int (*GetOutputCharacteristic)(const struct OrtCustomOp *, size_t);
    int (*GetInputMemoryType)(const struct OrtCustomOp *, size_t);
    int (*GetVariadicInputMinArity)(const struct OrtCustomOp *);
    int (*GetVariadicInputHomogeneity)(const struct OrtCustomOp *);
    int (*GetVariadicOutputMinArity)(const struct OrtCustomOp *);
    int (*GetVariadicOutputHomogeneity)(const struct OrtCustomOp *);
    OrtStatus *(*CreateKernelV2)(const struct OrtCustomOp *, const OrtApi *, const OrtKernelInfo *, void **);
    OrtStatus *(*KernelComputeV2)(void *, OrtKernelContext *);
} OrtCustomOp;

/* Positions in OrtApi of the functions called. */
enum {
    CREATE_STATUS = 0, CREATE_CUSTOM_OP_DOMAIN = 26, CUSTOM_OP_DOMAIN_ADD = 27, ADD_CUSTOM_OP_DOMAIN = 28,
    GET_TENSOR_MUTABLE_DATA = 51, GET_DIMENSIONS_COUNT = 61, GET_DIMENSIONS = 62,
    GET_TENSOR_TYPE_AND_SHAPE = 65, KERNEL_CONTEXT_GET_INPUT = 90, KERNEL_CONTEXT_GET_OUTPUT = 91,
    RELEASE_TENSOR_TYPE_AND_SHAPE_INFO = 99,
};
#define API(api, index, type) ((type)((void *const *)(api))[index])

typedef OrtStatus *(*CreateDomainFn)(const char *, OrtCustomOpDomain **);
typedef OrtStatus *(*DomainAddFn)(OrtCustomOpDomain *, const OrtCustomOp *);
typedef OrtStatus *(*AddDomainFn)(OrtSessionOptions *, OrtCustomOpDomain *);
typedef OrtStatus *(*MutableDataFn)(OrtValue *, void **);
typedef OrtStatus *(*DimsCountFn)(const OrtTensorTypeAndShapeInfo *, size_t *);
typedef OrtStatus *(*DimsFn)(const OrtTensorTypeAndShapeInfo *, int64_t *, size_t);
typedef OrtStatus *(*TypeAndShapeFn)(const OrtValue *, OrtTensorTypeAndShapeInfo **);
typedef OrtStatus *(*GetInputFn)(const OrtKernelContext *, size_t, const OrtValue **);
typedef OrtStatus *(*GetOutputFn)(OrtKernelContext *, size_t, const int64_t *, size_t, OrtValue **);
typedef OrtStatus *(*CreateStatusFn)(int, const char *);
typedef void (*ReleaseInfoFn)(OrtTensorTypeAndShapeInfo *);

/* ---- kernels ---- */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
/* One build runs everywhere and uses AVX-512 or AVX2 + FMA where the CPU has them. */
#define VECTOR_CLONES __attribute__((target_clones("arch=skylake-avx512", "arch=haswell", "default")))
#else
#define VECTOR_CLONES
#endif
#define LANES 16
#define MAX_HEAD_DIM 512

/* a . b over n floats, in LANES partial sums (so the loop vectorizes without reassociating). */
static inline float dot(const float *a, const float *b, int64_t n) {
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

/* exp(x) for x <= 0 (softmax after the max is subtracted), about 1 ulp: exp(x) = 2^n exp(r) with
 * |r| <= ln2/2 and a degree-6 polynomial for exp(r). Branch-free so a loop of it vectorizes; below
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

static int use_avx512(int64_t Dh) {
    static int cpu = -1;
    if (cpu < 0) cpu = __builtin_cpu_supports("avx512f") ? 1 : 0;
    return cpu && Dh % 16 == 0 && Dh <= 256;
}
#else
#define HAVE_AVX512_PATH 0
#endif

VECTOR_CLONES
static void head_generic(const float *q, const float *K, const float *V, int64_t n, int64_t Dh, float *s,
                         float *out) {
    for (int64_t t = 0; t < n; t++) s[t] = dot(q, K + t * Dh, Dh);
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

static void slot_attention(const float *qkv, float *kc, float *vc, const int32_t *seqlens, float *out,
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

static void cross_attention(const float *q, const float *kc, const float *vc, const int32_t *mask, float *out,
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

/* ---- the ONNX Runtime glue ---- */
typedef struct {
    const OrtApi *api;
    int cross; /* CrossAttention, else SlotAttention */
} Kernel;

#define CHECK(call)                          \
    do {                                     \
        OrtStatus *status_ = (call);         \
        if (status_) return status_;         \
    } while (0)

static OrtStatus *fail(const OrtApi *api, const char *message) {
    return API(api, CREATE_STATUS, CreateStatusFn)(ORT_INVALID_ARGUMENT, message);
}

/* The tensor's data and dimensions (at most 4; its rank in *rank). */
static OrtStatus *tensor(const OrtApi *api, const OrtValue *value, void **data, int64_t *dims, size_t *rank) {
    OrtTensorTypeAndShapeInfo *info;
    CHECK(API(api, GET_TENSOR_TYPE_AND_SHAPE, TypeAndShapeFn)(value, &info));
    OrtStatus *status = API(api, GET_DIMENSIONS_COUNT, DimsCountFn)(info, rank);
    if (!status && *rank > 4) status = fail(api, "nmt attention: a tensor of more than 4 dimensions");
    if (!status) status = API(api, GET_DIMENSIONS, DimsFn)(info, dims, *rank);
    API(api, RELEASE_TENSOR_TYPE_AND_SHAPE_INFO, ReleaseInfoFn)(info);
    if (status) return status;
    return API(api, GET_TENSOR_MUTABLE_DATA, MutableDataFn)((OrtValue *)value, data);
}

/* Input i's data and dimensions, which must number `rank`. */
static OrtStatus *input(const OrtApi *api, OrtKernelContext *ctx, size_t i, size_t rank, void **data,
                        int64_t *dims) {
    const OrtValue *value;
    size_t got;
    CHECK(API(api, KERNEL_CONTEXT_GET_INPUT, GetInputFn)(ctx, i, &value));
    CHECK(tensor(api, value, data, dims, &got));
    return got == rank ? NULL : fail(api, "nmt attention: an input of the wrong rank");
}

static OrtStatus *output(const OrtApi *api, OrtKernelContext *ctx, size_t i, const int64_t *dims, size_t rank,
                         float **data) {
    OrtValue *value;
    CHECK(API(api, KERNEL_CONTEXT_GET_OUTPUT, GetOutputFn)(ctx, i, dims, rank, &value));
    return API(api, GET_TENSOR_MUTABLE_DATA, MutableDataFn)(value, (void **)data);
}

static OrtStatus *compute_slot(const OrtApi *api, OrtKernelContext *ctx) {
    int64_t qd[4], kd[4], vd[4], ld[4];
    void *qkv, *past_k, *past_v, *lengths;
    CHECK(input(api, ctx, 0, 3, &qkv, qd));     /* (R, 1, 3D) */
    CHECK(input(api, ctx, 1, 4, &past_k, kd));  /* (R, H, L, Dh) */
    CHECK(input(api, ctx, 2, 4, &past_v, vd));
    CHECK(input(api, ctx, 3, 1, &lengths, ld)); /* (R,) */
    const int64_t R = kd[0], H = kd[1], L = kd[2], Dh = kd[3];
    if (qd[0] != R || qd[1] != 1 || qd[2] != 3 * H * Dh || ld[0] != R || memcmp(kd, vd, sizeof kd))
        return fail(api, "SlotAttention: qkv (R, 1, 3*H*Dh), caches (R, H, L, Dh) and seqlens_k (R,) disagree");
    if (Dh > MAX_HEAD_DIM) return fail(api, "SlotAttention: head_dim above 512");
    const int64_t out_dims[3] = {R, 1, H * Dh};
    float *out, *present_k, *present_v;
    CHECK(output(api, ctx, 0, out_dims, 3, &out));
    CHECK(output(api, ctx, 1, kd, 4, &present_k));
    CHECK(output(api, ctx, 2, vd, 4, &present_v));
    const int32_t *len = lengths;
    for (int64_t r = 0; r < R; r++)
        if (len[r] < 0 || len[r] >= L) return fail(api, "SlotAttention: a seqlens_k outside the cache's slots");
    const size_t bytes = (size_t)(R * H * L * Dh) * sizeof(float);
    if (present_k != past_k) memcpy(present_k, past_k, bytes); /* not bound in place: a copy first */
    if (present_v != past_v) memcpy(present_v, past_v, bytes);
    float *scores = malloc((size_t)(L > 0 ? L : 1) * sizeof(float));
    if (!scores) return API(api, CREATE_STATUS, CreateStatusFn)(ORT_FAIL, "SlotAttention: out of memory");
    slot_attention(qkv, present_k, present_v, len, out, R, H, L, Dh, scores);
    free(scores);
    return NULL;
}

static OrtStatus *compute_cross(const OrtApi *api, OrtKernelContext *ctx) {
    int64_t qd[4], kd[4], vd[4], md[4];
    void *q, *k, *v, *mask;
    CHECK(input(api, ctx, 0, 3, &q, qd));     /* (B, G, D) */
    CHECK(input(api, ctx, 1, 4, &k, kd));     /* (B, H, S, Dh) */
    CHECK(input(api, ctx, 2, 4, &v, vd));
    CHECK(input(api, ctx, 3, 2, &mask, md));  /* (B, S) */
    const int64_t B = kd[0], H = kd[1], S = kd[2], Dh = kd[3], G = qd[1];
    if (qd[0] != B || qd[2] != H * Dh || md[0] != B || md[1] != S || memcmp(kd, vd, sizeof kd))
        return fail(api, "CrossAttention: query (B, G, H*Dh), key/value (B, H, S, Dh) and mask (B, S) disagree");
    if (Dh > MAX_HEAD_DIM) return fail(api, "CrossAttention: head_dim above 512");
    float *out;
    CHECK(output(api, ctx, 0, qd, 3, &out));
    float *work = malloc((size_t)(S + 2 * S * Dh + 1) * sizeof(float)); /* scores, gathered K and V */
    if (!work) return API(api, CREATE_STATUS, CreateStatusFn)(ORT_FAIL, "CrossAttention: out of memory");
    cross_attention(q, k, v, mask, out, B, G, H, S, Dh, work, work + S, work + S + S * Dh);
    free(work);
    return NULL;
}

static OrtStatus *compute(void *kernel, OrtKernelContext *ctx) {
    const Kernel *kern = kernel;
    return kern->cross ? compute_cross(kern->api, ctx) : compute_slot(kern->api, ctx);
}

static const char *slot_name(const OrtCustomOp *op) { (void)op; return "SlotAttention"; }
static const char *cross_name(const OrtCustomOp *op) { (void)op; return "CrossAttention"; }
static const char *any_provider(const OrtCustomOp *op) { (void)op; return NULL; } /* NULL: CPU */
static size_t four_inputs(const OrtCustomOp *op) { (void)op; return 4; }
static size_t slot_outputs(const OrtCustomOp *op) { (void)op; return 3; }
static size_t one_output(const OrtCustomOp *op) { (void)op; return 1; }
static int float_type(const OrtCustomOp *op, size_t i) { (void)op; (void)i; return TYPE_FLOAT; }
static int last_is_int32(const OrtCustomOp *op, size_t i) { (void)op; return i == 3 ? TYPE_INT32 : TYPE_FLOAT; }
static int required(const OrtCustomOp *op, size_t i) { (void)op; (void)i; return REQUIRED; }
static int default_memory(const OrtCustomOp *op, size_t i) { (void)op; (void)i; return MEM_DEFAULT; }
static int no_variadic(const OrtCustomOp *op) { (void)op; return 0; }

static OrtStatus *create_kernel(const OrtApi *api, int cross, void **kernel) {
    Kernel *k = malloc(sizeof *k);
    if (!k) return API(api, CREATE_STATUS, CreateStatusFn)(ORT_FAIL, "nmt attention: out of memory");
    k->api = api;
    k->cross = cross;
    *kernel = k;
    return NULL;
}
static OrtStatus *create_slot(const OrtCustomOp *op, const OrtApi *api, const OrtKernelInfo *info, void **kernel) {
    (void)op; (void)info;
    return create_kernel(api, 0, kernel);
}
static OrtStatus *create_cross(const OrtCustomOp *op, const OrtApi *api, const OrtKernelInfo *info, void **kernel) {
    (void)op; (void)info;
    return create_kernel(api, 1, kernel);
}
static void destroy(void *kernel) { free(kernel); }

static const OrtCustomOp SLOT_OP = {
    API_VERSION, NULL, slot_name, any_provider, last_is_int32, four_inputs, float_type, slot_outputs,
    NULL, destroy, required, required, default_memory, no_variadic, no_variadic, no_variadic, no_variadic,
    create_slot, compute};
static const OrtCustomOp CROSS_OP = {
    API_VERSION, NULL, cross_name, any_provider, last_is_int32, four_inputs, float_type, one_output,
    NULL, destroy, required, required, default_memory, no_variadic, no_variadic, no_variadic, no_variadic,
    create_cross, compute};

/* The entry point SessionOptions.register_custom_ops_library calls: the "nmt" domain and its ops. */
__attribute__((visibility("default")))
OrtStatus *RegisterCustomOps(OrtSessionOptions *options, const OrtApiBase *base) {
    const OrtApi *api = base->GetApi(API_VERSION);
    OrtCustomOpDomain *domain;
    CHECK(API(api, CREATE_CUSTOM_OP_DOMAIN, CreateDomainFn)("nmt", &domain));
    CHECK(API(api, CUSTOM_OP_DOMAIN_ADD, DomainAddFn)(domain, &SLOT_OP));
    CHECK(API(api, CUSTOM_OP_DOMAIN_ADD, DomainAddFn)(domain, &CROSS_OP));
    return API(api, ADD_CUSTOM_OP_DOMAIN, AddDomainFn)(options, domain); /* kept for the process */
}
