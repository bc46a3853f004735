/* Kernels of the CPU slot decoder, as an ONNX Runtime custom-op library (domain "nmt").
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
 *   ConditionalTopK(x, top_k) -> (values, ids), attribute min_k
 *     TopK (last axis, largest, sorted: ties to the lower id) of x (R, V) when top_k >= min_k, else
 *     (1, 1) zeros: the slot decoder's If on top_k (greedy steps take their argmax on the host). One
 *     pass per row that compares 16 values at a time with the k-th best so far: ONNX Runtime's TopK
 *     (6-7 us per 8000-wide row) and the If around it cost more than the log-softmax before them.
 *   LogSoftmaxTopK(logits, top_k) -> (values, ids)
 *     TopK of LogSoftmax(logits) (R, V) for any top_k, without writing the log-probs: the top k of the
 *     logits, then one pass of exp for each row's log-sum-exp. In place of the LogSoftmax and the
 *     ConditionalTopK where nothing else reads the log-probs (beam search reads only the top 2k).
 *   ProjectionTopK(h, w8, scale, sums, bounds, w, bias, top_k) -> (values, ids)
 *     the top_k best of h (R, K) . w^T + bias, w (V, K): the values (R, k) are the float32 logits,
 *     found through int8 estimates with error bounds (projection.c); the slot decoder's greedy head,
 *     in place of the vocabulary MatMul, LogSoftmax and top-k, when a step needs no scores.
 *
 * serve/engine/native.py rewrites a slot decoder's nodes to these ops, and only where the nodes
 * match exactly these forms. The kernels run on the calling thread.
 *
 * The C API is used through its stable binary interface (ort_api.h); the kernels are in kernels.c. */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"
#include "ort_api.h"

/* ---- the ONNX Runtime glue ---- */
enum { SLOT, CROSS, TOP_K, LOG_SOFTMAX_TOP_K, PROJECTION };
#define MAX_TOP_K 64 /* ProjectionTopK's k: greedy asks for 1 or 2 */

typedef struct {
    const OrtApi *api;
    int op;        /* which of the three */
    int64_t min_k; /* ConditionalTopK: top-k only for top_k >= min_k */
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
    if (!status && *rank > 4) status = fail(api, "nmt ops: a tensor of more than 4 dimensions");
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
    return got == rank ? NULL : fail(api, "nmt ops: an input of the wrong rank");
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
    nmt_slot_attention(qkv, present_k, present_v, len, out, R, H, L, Dh, scores);
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
    nmt_cross_attention(q, k, v, mask, out, B, G, H, S, Dh, work, work + S, work + S + S * Dh);
    free(work);
    return NULL;
}

/* ConditionalTopK (log_softmax 0) and LogSoftmaxTopK (log_softmax 1, min_k 1). */
static OrtStatus *compute_top_k(const OrtApi *api, OrtKernelContext *ctx, int64_t min_k, int log_softmax) {
    int64_t xd[4], kd[4];
    void *x, *top_k;
    CHECK(input(api, ctx, 0, 2, &x, xd));     /* (R, V) */
    CHECK(input(api, ctx, 1, 1, &top_k, kd)); /* [k] */
    const int64_t R = xd[0], V = xd[1], k = kd[0] == 1 ? *(const int64_t *)top_k : -1;
    if (k < 1 || k > V) return fail(api, "top-k: top_k must be one number in [1, the row length]");
    const int64_t dims[2] = {k >= min_k ? R : 1, k >= min_k ? k : 1}; /* (1, 1): a placeholder */
    float *values;
    int64_t *ids;
    CHECK(output(api, ctx, 0, dims, 2, &values));
    CHECK(output(api, ctx, 1, dims, 2, (float **)&ids));
    if (k < min_k) {
        values[0] = 0.0f;
        ids[0] = 0;
    } else if (log_softmax) {
        nmt_log_softmax_top_k(x, R, V, k, values, ids);
    } else {
        nmt_top_k(x, R, V, k, values, ids);
    }
    return NULL;
}

static OrtStatus *compute_projection(const OrtApi *api, OrtKernelContext *ctx) {
    int64_t hd[4], wd[4], sd[4], ud[4], bd[4], fd[4], cd[4], kd[4];
    void *h, *w8, *scale, *sums, *bounds, *w, *bias, *top_k;
    CHECK(input(api, ctx, 0, 2, &h, hd));      /* (R, K) */
    CHECK(input(api, ctx, 1, 4, &w8, wd));     /* (Vp/16, Kp/4, 16, 4) */
    CHECK(input(api, ctx, 2, 1, &scale, sd));  /* (Vp,) */
    CHECK(input(api, ctx, 3, 1, &sums, ud));   /* (Vp,) */
    CHECK(input(api, ctx, 4, 2, &bounds, bd)); /* (3, Vp) */
    CHECK(input(api, ctx, 5, 2, &w, fd));      /* (V, K) */
    CHECK(input(api, ctx, 6, 1, &bias, cd));   /* (V,) */
    CHECK(input(api, ctx, 7, 1, &top_k, kd));  /* [k] */
    const int64_t R = hd[0], K = hd[1], V = fd[0], Vp = wd[0] * 16, Kp = wd[1] * 4;
    if (K < 1 || V < 1 || fd[1] != K || wd[2] != 16 || wd[3] != 4 || Vp < V || Vp >= V + 16 || Kp < K ||
        Kp >= K + 4 || sd[0] != Vp || ud[0] != Vp || bd[0] != 3 || bd[1] != Vp || cd[0] != V)
        return fail(api, "ProjectionTopK: h (R, K), w8 (Vp/16, Kp/4, 16, 4), scale and sums (Vp,), bounds "
                         "(3, Vp), w (V, K) and bias (V,) disagree (Vp, Kp: V, K rounded up to 16 and 4)");
    if (K > 65536) return fail(api, "ProjectionTopK: K above 65536 (the int32 estimates could overflow)");
    const int64_t k = kd[0] == 1 ? *(const int64_t *)top_k : -1;
    if (k < 1 || k > V || k > MAX_TOP_K)
        return fail(api, "ProjectionTopK: top_k must be one number in [1, 64] and at most the vocabulary");
    const int64_t dims[2] = {R, k};
    float *values;
    int64_t *ids;
    CHECK(output(api, ctx, 0, dims, 2, &values));
    CHECK(output(api, ctx, 1, dims, 2, (float **)&ids));
    const NmtProjection P = {w8, scale, sums, bounds, w, bias, V, K, Vp, Kp};
    if (nmt_projection_top_k(&P, h, R, k, values, ids))
        return API(api, CREATE_STATUS, CreateStatusFn)(ORT_FAIL, "ProjectionTopK: out of memory");
    return NULL;
}

static OrtStatus *compute(void *kernel, OrtKernelContext *ctx) {
    const Kernel *kern = kernel;
    switch (kern->op) {
    case SLOT: return compute_slot(kern->api, ctx);
    case CROSS: return compute_cross(kern->api, ctx);
    case PROJECTION: return compute_projection(kern->api, ctx);
    case LOG_SOFTMAX_TOP_K: return compute_top_k(kern->api, ctx, 1, 1);
    default: return compute_top_k(kern->api, ctx, kern->min_k, 0);
    }
}

static const char *slot_name(const OrtCustomOp *op) { (void)op; return "SlotAttention"; }
static const char *cross_name(const OrtCustomOp *op) { (void)op; return "CrossAttention"; }
static const char *top_k_name(const OrtCustomOp *op) { (void)op; return "ConditionalTopK"; }
static const char *log_softmax_top_k_name(const OrtCustomOp *op) { (void)op; return "LogSoftmaxTopK"; }
static const char *projection_name(const OrtCustomOp *op) { (void)op; return "ProjectionTopK"; }
static const char *any_provider(const OrtCustomOp *op) { (void)op; return NULL; } /* NULL: CPU */
static size_t four_inputs(const OrtCustomOp *op) { (void)op; return 4; }
static size_t slot_outputs(const OrtCustomOp *op) { (void)op; return 3; }
static size_t one_output(const OrtCustomOp *op) { (void)op; return 1; }
static size_t two_inputs(const OrtCustomOp *op) { (void)op; return 2; }
static int values_and_k(const OrtCustomOp *op, size_t i) { (void)op; return i == 0 ? TYPE_FLOAT : TYPE_INT64; }
static int top_k_outputs(const OrtCustomOp *op, size_t i) { (void)op; return i == 1 ? TYPE_INT64 : TYPE_FLOAT; }
static size_t eight_inputs(const OrtCustomOp *op) { (void)op; return 8; }
static int projection_inputs(const OrtCustomOp *op, size_t i) {
    (void)op;
    static const int types[8] = {TYPE_FLOAT, TYPE_INT8, TYPE_FLOAT, TYPE_INT32, TYPE_FLOAT, TYPE_FLOAT, TYPE_FLOAT,
                                 TYPE_INT64};
    return i < 8 ? types[i] : TYPE_FLOAT;
}
static size_t two_outputs(const OrtCustomOp *op) { (void)op; return 2; }
static int float_type(const OrtCustomOp *op, size_t i) { (void)op; (void)i; return TYPE_FLOAT; }
static int last_is_int32(const OrtCustomOp *op, size_t i) { (void)op; return i == 3 ? TYPE_INT32 : TYPE_FLOAT; }
static int required(const OrtCustomOp *op, size_t i) { (void)op; (void)i; return REQUIRED; }
static int default_memory(const OrtCustomOp *op, size_t i) { (void)op; (void)i; return MEM_DEFAULT; }
static int no_variadic(const OrtCustomOp *op) { (void)op; return 0; }

static OrtStatus *create_kernel(const OrtApi *api, int op, const OrtKernelInfo *info, void **kernel) {
    int64_t min_k = 1;
    if (op == TOP_K)
        CHECK(API(api, KERNEL_INFO_GET_ATTRIBUTE_INT64, AttributeInt64Fn)(info, "min_k", &min_k));
    Kernel *k = malloc(sizeof *k);
    if (!k) return API(api, CREATE_STATUS, CreateStatusFn)(ORT_FAIL, "nmt ops: out of memory");
    k->api = api;
    k->op = op;
    k->min_k = min_k;
    *kernel = k;
    return NULL;
}
/* CreateKernelV2 of each op: its Kernel, with the op's attributes read. */
#define CREATE(fn, which)                                                                                \
    static OrtStatus *fn(const OrtCustomOp *op, const OrtApi *api, const OrtKernelInfo *info, void **kernel) { \
        (void)op;                                                                                        \
        return create_kernel(api, which, info, kernel);                                                  \
    }
CREATE(create_slot, SLOT)
CREATE(create_cross, CROSS)
CREATE(create_top_k, TOP_K)
CREATE(create_log_softmax_top_k, LOG_SOFTMAX_TOP_K)
CREATE(create_projection, PROJECTION)
static void destroy(void *kernel) { free(kernel); }

/* An op of API version 16: its name, input and output types and counts, and its CreateKernelV2; every
 * input and output required, on the CPU, computed by compute(). */
#define CUSTOM_OP(name, input_types, inputs, output_types, outputs, create)                                  \
    {API_VERSION, NULL, name, any_provider, input_types, inputs, output_types, outputs, NULL, destroy,        \
     required, required, default_memory, no_variadic, no_variadic, no_variadic, no_variadic, create, compute}
static const OrtCustomOp SLOT_OP = CUSTOM_OP(slot_name, last_is_int32, four_inputs, float_type, slot_outputs,
                                             create_slot);
static const OrtCustomOp CROSS_OP = CUSTOM_OP(cross_name, last_is_int32, four_inputs, float_type, one_output,
                                              create_cross);
static const OrtCustomOp TOP_K_OP = CUSTOM_OP(top_k_name, values_and_k, two_inputs, top_k_outputs, two_outputs,
                                              create_top_k);
static const OrtCustomOp LOG_SOFTMAX_TOP_K_OP = CUSTOM_OP(log_softmax_top_k_name, values_and_k, two_inputs,
                                                          top_k_outputs, two_outputs, create_log_softmax_top_k);
static const OrtCustomOp PROJECTION_OP = CUSTOM_OP(projection_name, projection_inputs, eight_inputs, top_k_outputs,
                                                   two_outputs, create_projection);

/* The entry point SessionOptions.register_custom_ops_library calls: the "nmt" domain and its ops. */
__attribute__((visibility("default")))
OrtStatus *RegisterCustomOps(OrtSessionOptions *options, const OrtApiBase *base) {
    const OrtApi *api = base->GetApi(API_VERSION);
    if (!api) return NULL; /* an ONNX Runtime older than 1.16: no ops, the graph fails to load and the
                              engine falls back to the graph as exported (serve.engine.runtime) */
    OrtCustomOpDomain *domain;
    CHECK(API(api, CREATE_CUSTOM_OP_DOMAIN, CreateDomainFn)("nmt", &domain));
    CHECK(API(api, CUSTOM_OP_DOMAIN_ADD, DomainAddFn)(domain, &SLOT_OP));
    CHECK(API(api, CUSTOM_OP_DOMAIN_ADD, DomainAddFn)(domain, &CROSS_OP));
    CHECK(API(api, CUSTOM_OP_DOMAIN_ADD, DomainAddFn)(domain, &TOP_K_OP));
    CHECK(API(api, CUSTOM_OP_DOMAIN_ADD, DomainAddFn)(domain, &LOG_SOFTMAX_TOP_K_OP));
    CHECK(API(api, CUSTOM_OP_DOMAIN_ADD, DomainAddFn)(domain, &PROJECTION_OP));
    return API(api, ADD_CUSTOM_OP_DOMAIN, AddDomainFn)(options, domain); /* kept for the process */
}
