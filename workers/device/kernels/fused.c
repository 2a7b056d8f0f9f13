/* Fused float32 ops of the CPU table's decode path (cpu.py calls them; cpu_native.py builds this file with gq.c).

Each replaces a chain of small torch ops whose dispatch, not arithmetic, is the cost at batch 1 (about 5 us an op
on this machine's kind, against a few hundred nanoseconds of work): RMSNorm with its residual add, rotary
embedding, and attention of one query per sequence over its paged KV cache. Semantics are base.py TorchOps's,
in float32; sums run in another order (`omp simd` reductions), so results differ by float32 rounding
(tests/workers/device/test_cpu_fused.py).
*/
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

/* out [T, H] = x / sqrt(mean(x^2) + eps) * w; with residual (not null): residual += x first, normalised, and
   residual_out holds the sum */
void fused_add_rms_norm(const float *x, const float *residual, float *residual_out, const float *w, float eps,
                        int64_t T, int64_t H, float *out) {
    for (int64_t t = 0; t < T; t++) {
        const float *xr = x + t * H;
        float *o = out + t * H;
        const float *src = xr;
        if (residual) {
            float *r = residual_out + t * H;
            for (int64_t j = 0; j < H; j++) r[j] = xr[j] + residual[t * H + j];
            src = r;
        }
        float ss = 0;
#pragma omp simd reduction(+ : ss)
        for (int64_t j = 0; j < H; j++) ss += src[j] * src[j];
        const float inv = 1.0f / sqrtf(ss / (float)H + eps);
        for (int64_t j = 0; j < H; j++) o[j] = src[j] * inv * w[j];
    }
}

/* rotate-half (NeoX/HF) in place on x [T, heads, D] (rows `stride` floats apart per token), the first R = 2 * half
   dims: (x1, x2) -> (x1 c - x2 s, x2 c + x1 s); cos/sin [T, half] */
void fused_rotary(float *x, int64_t T, int64_t heads, int64_t D, int64_t stride, const float *cos_, const float *sin_,
                  int64_t half) {
    for (int64_t t = 0; t < T; t++) {
        const float *c = cos_ + t * half, *s = sin_ + t * half;
        for (int64_t h = 0; h < heads; h++) {
            float *v = x + t * stride + h * D;
            for (int64_t i = 0; i < half; i++) {
                const float x1 = v[i], x2 = v[i + half];
                v[i] = x1 * c[i] - x2 * s[i];
                v[i + half] = x2 * c[i] + x1 * s[i];
            }
        }
    }
}

/* one query per sequence: q [B, H, D] over the keys j < context_lens[b] (and j > ctx - 1 - window where window > 0)
   of sequence b's blocks (block_tables [B, max_blocks], caches [num_blocks, block_size, Hkv, D]), GQA (query head
   h reads KV head h / (H / Hkv)) -> out [B, H, D] = softmax(scale q k^T) v */
void fused_decode_attention(const float *q, const float *k_cache, const float *v_cache, const int64_t *block_tables,
                            int64_t max_blocks, const int64_t *context_lens, int64_t B, int64_t H, int64_t Hkv,
                            int64_t D, int64_t block_size, float scale, int64_t window, float *out, int nthreads) {
    const int64_t group = H / Hkv, row = Hkv * D; /* floats per cached token */
    int64_t max_ctx = 1;
    for (int64_t b = 0; b < B; b++) max_ctx = context_lens[b] > max_ctx ? context_lens[b] : max_ctx;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1 && B * H * max_ctx * D >= 65536)
    {
        float *p = malloc(sizeof(float) * max_ctx);
#pragma omp for schedule(static) collapse(2)
        for (int64_t b = 0; b < B; b++)
            for (int64_t h = 0; h < H; h++) {
                const int64_t ctx = context_lens[b], first = window > 0 && ctx > window ? ctx - window : 0;
                const float *qv = q + (b * H + h) * D;
                const int64_t *table = block_tables + b * max_blocks;
                const int64_t kvh = h / group;
                float mx = -INFINITY;
                for (int64_t j = first; j < ctx; j++) {
                    const float *kv = k_cache + (table[j / block_size] * block_size + j % block_size) * row + kvh * D;
                    float dot = 0;
#pragma omp simd reduction(+ : dot)
                    for (int64_t d = 0; d < D; d++) dot += qv[d] * kv[d];
                    p[j] = dot * scale;
                    mx = p[j] > mx ? p[j] : mx;
                }
                float sum = 0;
                for (int64_t j = first; j < ctx; j++) {
                    p[j] = expf(p[j] - mx);
                    sum += p[j];
                }
                float *o = out + (b * H + h) * D;
                for (int64_t d = 0; d < D; d++) o[d] = 0;
                for (int64_t j = first; j < ctx; j++) {
                    const float *vv = v_cache + (table[j / block_size] * block_size + j % block_size) * row + kvh * D;
                    const float pj = p[j] / sum;
#pragma omp simd
                    for (int64_t d = 0; d < D; d++) o[d] += pj * vv[d];
                }
            }
        free(p);
    }
}
