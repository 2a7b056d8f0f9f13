/* Fused float32 ops of the CPU table's decode path (cpu.py calls them; cpu_native.py builds this file with gq.c).

Each replaces a chain of small torch ops whose dispatch, not arithmetic, is the cost at batch 1 (about 5 us an op
on this machine's kind, against a few hundred nanoseconds of work): RMSNorm with its residual add, rotary
embedding, SwiGLU's silu(gate) * up, and attention of one query per sequence over its paged KV cache. Semantics
are base.py TorchOps's, in float32; sums run in another order (`omp simd` reductions) and e^x is a polynomial
within 1 ulp (exp_simd), so results differ by float32 rounding (tests/workers/device/test_cpu_fused.py).
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

/* e^x for vectorised loops (libm's expf is a call per value): Cephes' expf, x = n ln 2 + r (ln 2 in two parts), e^r
   a polynomial, 2^n into the exponent: within 0.97 ulp of e^x on [-87.3, 88.37] (measured against double exp at
   every 1e-4), clamped outside (e^-87.3 ~ 1e-38; 2^128 would overflow the exponent). */
static inline float exp_simd(float x) {
    x = x < -87.3f ? -87.3f : x > 88.37f ? 88.37f : x;
    const float n = nearbyintf(x * 1.44269504088896341f);
    const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    union {
        int32_t i;
        float f;
    } two_n = {.i = ((int32_t)n + 127) << 23};
    return p * two_n.f;
}

/* act [B, I] = silu(gate) * up of gu [B, 2I] (gate | up per row) */
void fused_silu_mul(const float *gu, int64_t B, int64_t I, float *act, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1 && B * I >= 16384)
    for (int64_t b = 0; b < B; b++) {
        const float *g = gu + b * 2 * I, *u = g + I;
        float *a = act + b * I;
#pragma omp simd
        for (int64_t i = 0; i < I; i++) a[i] = g[i] / (1.0f + exp_simd(-g[i])) * u[i];
    }
}

#define MAX_GROUP 16 /* query heads a KV head serves, taken together (GQA); more go in turns */
/* cached rows read ahead: a head's row is a few cache lines, too short a run for the hardware's prefetcher, and
   the attention of 16 sequences stalled on its loads (perf: most of its samples on the instructions after them) */
#define PREFETCH_ROWS 4

static inline void prefetch_row(const float *p, int64_t D) {
    for (int64_t d = 0; d < D; d += 16) __builtin_prefetch(p + d);
}

/* key j0's row of a sequence's cache (its block from `table`, at float `offset` within a row of `row` floats), and
   in *end the first key past j0's block (or ctx): the rows j0 .. *end - 1 follow it `row` floats apart */
static inline const float *block_rows(const float *cache, const int64_t *table, int64_t j0, int64_t ctx,
                                      int64_t block_size, int64_t row, int64_t offset, int64_t *end) {
    const int64_t blk = j0 / block_size, stop = (blk + 1) * block_size;
    *end = stop < ctx ? stop : ctx;
    return cache + (table[blk] * block_size + j0 - blk * block_size) * row + offset;
}

/* one query per sequence: q [B, H, D] over the keys j < context_lens[b] (and j > ctx - 1 - window where window > 0)
   of sequence b's blocks (block_tables [B, max_blocks], caches [num_blocks, block_size, Hkv, D]), GQA (query head
   h reads KV head h / (H / Hkv)) -> out [B, H, D] = softmax(scale q k^T) v. Per (sequence, KV head): its query heads
   together, each cached row read once for all of them, block by block (no division per key). */
void fused_decode_attention(const float *q, const float *k_cache, const float *v_cache, const int64_t *block_tables,
                            int64_t max_blocks, const int64_t *context_lens, int64_t B, int64_t H, int64_t Hkv,
                            int64_t D, int64_t block_size, float scale, int64_t window, float *out, int nthreads) {
    const int64_t group = H / Hkv, row = Hkv * D; /* floats per cached token */
    int64_t max_ctx = 1;
    for (int64_t b = 0; b < B; b++) max_ctx = context_lens[b] > max_ctx ? context_lens[b] : max_ctx;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1 && B * H * max_ctx * D >= 8192)
    {
        float *scores = malloc(sizeof(float) * MAX_GROUP * max_ctx);
#pragma omp for schedule(static) collapse(2)
        for (int64_t b = 0; b < B; b++)
            for (int64_t kvh = 0; kvh < Hkv; kvh++) {
                const int64_t ctx = context_lens[b], first = window > 0 && ctx > window ? ctx - window : 0;
                const int64_t *table = block_tables + b * max_blocks;
                for (int64_t h0 = 0; h0 < group; h0 += MAX_GROUP) {
                    const int64_t G = group - h0 < MAX_GROUP ? group - h0 : MAX_GROUP, n = ctx - first;
                    const float *qv = q + (b * H + kvh * group + h0) * D;
                    float *o = out + (b * H + kvh * group + h0) * D, sums[MAX_GROUP];
                    for (int64_t j0 = first, j1; j0 < ctx; j0 = j1) { /* q k^T, a block's keys at a time */
                        const float *kv = block_rows(k_cache, table, j0, ctx, block_size, row, kvh * D, &j1);
                        for (int64_t j = j0; j < j1; j++, kv += row) {
                            if (j + PREFETCH_ROWS < j1) prefetch_row(kv + PREFETCH_ROWS * row, D);
                            for (int64_t g = 0; g < G; g++) {
                                const float *qg = qv + g * D;
                                float dot = 0;
#pragma omp simd reduction(+ : dot)
                                for (int64_t d = 0; d < D; d++) dot += qg[d] * kv[d];
                                scores[g * max_ctx + j - first] = dot * scale;
                            }
                        }
                    }
                    for (int64_t g = 0; g < G; g++) { /* softmax of each head's scores */
                        float *p = scores + g * max_ctx, mx = -INFINITY, sum = 0;
                        for (int64_t j = 0; j < n; j++) mx = p[j] > mx ? p[j] : mx;
#pragma omp simd reduction(+ : sum)
                        for (int64_t j = 0; j < n; j++) {
                            p[j] = exp_simd(p[j] - mx);
                            sum += p[j];
                        }
                        sums[g] = 1.0f / sum;
                        for (int64_t d = 0; d < D; d++) o[g * D + d] = 0;
                    }
                    for (int64_t j0 = first, j1; j0 < ctx; j0 = j1) { /* p v */
                        const float *vv = block_rows(v_cache, table, j0, ctx, block_size, row, kvh * D, &j1);
                        for (int64_t j = j0; j < j1; j++, vv += row) {
                            if (j + PREFETCH_ROWS < j1) prefetch_row(vv + PREFETCH_ROWS * row, D);
                            for (int64_t g = 0; g < G; g++) {
                                const float pj = scores[g * max_ctx + j - first] * sums[g];
                                float *og = o + g * D;
#pragma omp simd
                                for (int64_t d = 0; d < D; d++) og[d] += pj * vv[d];
                            }
                        }
                    }
                }
            }
        free(scores);
    }
}
