/* A llama-family decoder layer's decode step (one new token per sequence) in two calls, for the CPU table
(cpu_decode.py drives it; cpu_native.py builds it with gq.c and fused.c, whose functions it calls).

At batch 1 a layer is some fifteen small torch ops and Python calls around its four weight products; their dispatch,
not their arithmetic, was half of a step (SmolLM2-135M: ~9 ms of ~20). Here the same computation runs in C: the
products are gq.c's (the same function the op table calls, so bit for bit the same), RMSNorm, rotary, the SwiGLU
and the attention are fused.c's; only the bias add and the cache write are new, plain float32 loops.

  attention block: residual += x (or = x in the first layer); h = RMSNorm(residual) * input_norm;
                   qkv = h @ Wqkv^T (+ bias); per-head RMSNorm of q and k (qwen3); rotary on q and k;
                   k and v written to the paged cache at the step's slots; attention of q over the cache;
                   out = attention @ Wo^T  (a partial sum at TP > 1: the caller all-reduces it)
  MLP block:       residual += x; h = RMSNorm(residual) * post_norm; gu = h @ Wgate_up^T;
                   out = (silu(gate) * up) @ Wdown^T  (partial at TP > 1)
decode_layers runs every layer's two blocks in one call where nothing is reduced between them (TP = 1).
*/
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* gq.c and fused.c */
void gq_matmul(const float *x, int64_t M, float *y, const void *w, int nthreads);
void fused_add_rms_norm(const float *x, const float *residual, float *residual_out, const float *w, float eps,
                        int64_t T, int64_t H, float *out);
void fused_rotary(float *x, int64_t T, int64_t heads, int64_t D, int64_t stride, const float *cos_, const float *sin_,
                  int64_t half);
void fused_decode_attention(const float *q, const float *k_cache, const float *v_cache, const int64_t *block_tables,
                            int64_t max_blocks, const int64_t *context_lens, int64_t B, int64_t H, int64_t Hkv,
                            int64_t D, int64_t block_size, float scale, int64_t window, float *out, int nthreads);
void fused_silu_mul(const float *gu, int64_t B, int64_t I, float *act, int nthreads);

typedef struct {
    int64_t hidden, heads, kv_heads, head_dim, inter; /* this rank's heads and intermediate size */
    float eps, scale;                                /* RMSNorm eps (every norm of the layer), attention scale */
    int64_t window;                                  /* sliding window (0: full causal attention) */
    const float *input_norm, *post_norm;             /* [hidden] */
    const float *q_norm, *k_norm;                    /* [head_dim] or null */
    const float *qkv_bias;                           /* [(heads + 2 kv_heads) head_dim] or null */
    const void *qkv, *o, *gate_up, *down;            /* gq_weight */
} decode_layer;

typedef struct {
    int64_t B;                         /* sequences, one token each */
    const float *cos, *sin;            /* [B, half] */
    int64_t half;                      /* rotated dims / 2 */
    const int64_t *slots;              /* [B] flat cache slot of each new token */
    const int64_t *block_tables;       /* [B, max_blocks] */
    int64_t max_blocks;
    const int64_t *context_lens;       /* [B] keys each query sees (its own included) */
    int64_t block_size;
    float *scratch;                    /* decode_scratch_floats(layer, B) floats */
    int nthreads;
} decode_step;

/* floats of scratch one step of B sequences needs for this layer */
int64_t decode_scratch_floats(const decode_layer *l, int64_t B) {
    const int64_t nqkv = (l->heads + 2 * l->kv_heads) * l->head_dim, attn = 2 * l->heads * l->head_dim;
    const int64_t mlp = 3 * l->inter, a = nqkv + attn, m = mlp > a ? mlp : a;
    return B * (l->hidden + m);
}

/* residual += x, or residual = x (first); h = RMSNorm(residual) * w */
static void add_norm(const float *x, float *residual, int first, const float *w, float eps, int64_t B, int64_t H,
                     float *h) {
    if (first) {
        memcpy(residual, x, sizeof(float) * B * H);
        fused_add_rms_norm(residual, NULL, NULL, w, eps, B, H, h);
    } else {
        fused_add_rms_norm(x, residual, residual, w, eps, B, H, h);
    }
}

void decode_attention_block(const decode_layer *l, const decode_step *s, const float *x, float *residual, int first,
                            float *k_cache, float *v_cache, float *out) {
    const int64_t B = s->B, H = l->hidden, D = l->head_dim, nq = l->heads * D, nkv = l->kv_heads * D;
    const int64_t nqkv = nq + 2 * nkv;
    float *h = s->scratch, *qkv = h + B * H, *q = qkv + B * nqkv, *attn = q + B * nq;
    add_norm(x, residual, first, l->input_norm, l->eps, B, H, h);
    gq_matmul(h, B, qkv, l->qkv, s->nthreads);
    for (int64_t b = 0; b < B; b++) {
        float *row = qkv + b * nqkv;
        if (l->qkv_bias)
            for (int64_t j = 0; j < nqkv; j++) row[j] += l->qkv_bias[j];
        if (l->q_norm) fused_add_rms_norm(row, NULL, NULL, l->q_norm, l->eps, l->heads, D, row);
        if (l->k_norm) fused_add_rms_norm(row + nq, NULL, NULL, l->k_norm, l->eps, l->kv_heads, D, row + nq);
    }
    fused_rotary(qkv, B, l->heads, D, nqkv, s->cos, s->sin, s->half);
    fused_rotary(qkv + nq, B, l->kv_heads, D, nqkv, s->cos, s->sin, s->half);
    for (int64_t b = 0; b < B; b++) {
        const float *row = qkv + b * nqkv;
        memcpy(q + b * nq, row, sizeof(float) * nq);
        memcpy(k_cache + s->slots[b] * nkv, row + nq, sizeof(float) * nkv);
        memcpy(v_cache + s->slots[b] * nkv, row + nq + nkv, sizeof(float) * nkv);
    }
    fused_decode_attention(q, k_cache, v_cache, s->block_tables, s->max_blocks, s->context_lens, B, l->heads,
                           l->kv_heads, D, s->block_size, l->scale, l->window, attn, s->nthreads);
    gq_matmul(attn, B, out, l->o, s->nthreads);
}

void decode_mlp_block(const decode_layer *l, const decode_step *s, const float *x, float *residual, float *out) {
    const int64_t B = s->B, H = l->hidden, I = l->inter;
    float *h = s->scratch, *gu = h + B * H, *act = gu + B * 2 * I;
    add_norm(x, residual, 0, l->post_norm, l->eps, B, H, h);
    gq_matmul(h, B, gu, l->gate_up, s->nthreads);
    fused_silu_mul(gu, B, I, act, s->nthreads);
    gq_matmul(act, B, out, l->down, s->nthreads);
}

/* every layer at TP = 1: x [B, hidden] the embeddings in, the last MLP's output out (residual: the sum before it) */
void decode_layers(const decode_layer *const *layers, int64_t n, const decode_step *s, float *const *k_caches,
                   float *const *v_caches, float *x, float *residual, float *tmp) {
    for (int64_t i = 0; i < n; i++) {
        decode_attention_block(layers[i], s, x, residual, i == 0, k_caches[i], v_caches[i], tmp);
        decode_mlp_block(layers[i], s, tmp, residual, x);
    }
}
