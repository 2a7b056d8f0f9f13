/* Group-quantized weight x float32 activation products for the CPU op table (cpu_gq.py builds and loads it).

A weight [N, K] holds unsigned integers u (bits 4, 5, 6 or 8 wide) with a scale s and an optional zero z per
group of `group` values along K (16, or a multiple of 32); the effective weight is (u + lo) * s + z, exactly the
checkpoint's (GGUF: gguf_groups.py's q * scale + zero with q = u + lo). Storage per row, by chunks of 32 along K:
  nib  [N, K/2]  uint8: byte j of chunk c holds u[32c + j] & 15 (low nibble) and u[32c + 16 + j] & 15 (high),
                 the order of GGUF's Q4_0/Q4_1/Q5_0 blocks;
  hb   [N, K/8 * (bits - 4)] uint8, bits 5 and 6: per chunk, one little-endian 32-bit word per bit plane
                 (bit j = bit 4 (plane 0) or 5 (plane 1) of u[32c + j]);
  q8   [N, K] int8, bits 8: the values themselves (lo is then 0 and u signed);
  scale, zero [N, K/group] float32, float16 or bfloat16 (sdtype 0, 1, 2).
The product holds each activation row per 32 values along K as int16, x ~ d xq (quantize_x), sums integer
products exactly (AVX2: madd_epi16; batch 1's row pairs 512 bits wide where AVX-512 BW/DQ is, the same sums) and
scales them:
  y[m, n] = sum_c d_c * sum_{g in c} s_g * dot_g(u_n, xq_m) + sum_g (lo s_g + z_g) * xs_g
(c: chunks of 32, g: the weight's groups, xs_g = d_c * the group's sum of xq). Against x @ W^T on the dequantized
weight it differs by the rounding of x to 15 bits of its chunk's largest value, and float32 rounding.
Rows (gq_rows) are dequantized as gguf-py does, (float)(u + lo) * s then + z, with no contraction
(-ffp-contract=off): bit for bit its values.
*/
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

typedef struct {
    const uint8_t *nib, *hb;
    const int8_t *q8;
    const void *scale, *zero;
    int64_t N, K;
    int bits, group, lo, sdtype;
} gq_weight;

static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 31, man = h & 1023, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: normalise */
            int e = -1;
            do {
                e++;
                man <<= 1;
            } while (!(man & 1024));
            bits = sign | (uint32_t)(127 - 15 - e) << 23 | (man & 1023) << 13;
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | man << 13;
    } else {
        bits = sign | (exp + 127 - 15) << 23 | man << 13;
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline float load_scale(const void *p, int sdtype, int64_t i) {
    if (sdtype == 0) return ((const float *)p)[i];
#ifdef __F16C__
    if (sdtype == 1) return _cvtsh_ss(((const uint16_t *)p)[i]);
#else
    if (sdtype == 1) return half_to_float(((const uint16_t *)p)[i]);
#endif
    uint32_t bits = (uint32_t)((const uint16_t *)p)[i] << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* u[0..31] of chunk c of row n, as int32 */
static inline void chunk_values(const gq_weight *w, int64_t n, int64_t c, int32_t *u) {
    if (w->bits == 8) {
        const int8_t *q = w->q8 + n * w->K + 32 * c;
        for (int j = 0; j < 32; j++) u[j] = q[j];
        return;
    }
    const uint8_t *b = w->nib + n * (w->K / 2) + 16 * c;
    for (int j = 0; j < 16; j++) {
        u[j] = b[j] & 15;
        u[j + 16] = b[j] >> 4;
    }
    int planes = w->bits - 4;
    const uint8_t *h = w->hb + n * (w->K / 8) * planes + 4 * planes * c;
    for (int p = 0; p < planes; p++) {
        uint32_t word;
        memcpy(&word, h + 4 * p, 4);
        for (int j = 0; j < 32; j++) u[j] |= (int32_t)((word >> j) & 1) << (4 + p);
    }
}

/* Activations x [M, K] as the product reads them: int16 per chunk of 32 along K, x ~ d xq with d = amax / 32767,
   xq = round(x / d): 15 bits of each chunk's largest value (int8, llama.cpp's Q8_0, moved SmolLM2's logits 3.5x
   further from fp32 than bf16 activations do: tests/workers/models/test_dense_vs_hf.py). d [M, K/32];
   xs [M, K/group] = d * the group's sum of xq (the zero and lo terms' factor) */
typedef struct {
    int16_t *xq;
    float *d, *xs;
} quantized_x;

static void quantize_x(const float *x, int64_t M, int64_t K, int group, quantized_x *qx) {
    int64_t chunks = K / 32, G = K / group;
    for (int64_t m = 0; m < M; m++) {
        for (int64_t c = 0; c < chunks; c++) {
            const float *xc = x + m * K + 32 * c;
            float amax = 0;
            for (int j = 0; j < 32; j++) amax = fabsf(xc[j]) > amax ? fabsf(xc[j]) : amax;
            float id = amax > 0 ? 32767.0f / amax : 0.0f;
            qx->d[m * chunks + c] = amax / 32767.0f;
            for (int j = 0; j < 32; j++) qx->xq[m * K + 32 * c + j] = (int16_t)nearbyintf(xc[j] * id);
        }
        for (int64_t g = 0; g < G; g++) { /* over the group's chunks (a group of 16: half of one) */
            float xs = 0;
            for (int64_t k0 = g * group; k0 < (g + 1) * group; k0 += 16) {
                int32_t sum = 0;
                for (int j = 0; j < 16; j++) sum += qx->xq[m * K + k0 + j];
                xs += qx->d[m * chunks + k0 / 32] * (float)sum;
            }
            qx->xs[m * G + g] = xs;
        }
    }
}

#if defined(__AVX2__) && defined(__FMA__)
/* 8 scales from i on, as float32 */
static inline __m256 load_scales8(const void *p, int sdtype, int64_t i) {
    if (sdtype == 0) return _mm256_loadu_ps((const float *)p + i);
    const __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)p + i));
    if (sdtype == 1) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
#endif

/* the zero and lo terms of row n for activation rows m0..m0+mt: sum_g (lo s_g + z_g) xs[m, g] */
#define MT 8 /* activation rows per pass over a weight row */

static inline void zero_terms(const gq_weight *w, int64_t n, const float *xs, int64_t m0, int mt, float *out) {
    const int64_t G = w->K / w->group, row = n * G;
    if (w->lo == 0 && !w->zero) return;
    int64_t g = 0;
#if defined(__AVX2__) && defined(__FMA__)
    if (G >= 8) {
        __m256 acc[MT];
        for (int i = 0; i < mt; i++) acc[i] = _mm256_setzero_ps();
        const __m256 lo = _mm256_set1_ps((float)w->lo);
        for (; g + 8 <= G; g += 8) {
            __m256 c = _mm256_mul_ps(lo, load_scales8(w->scale, w->sdtype, row + g));
            if (w->zero) c = _mm256_add_ps(c, load_scales8(w->zero, w->sdtype, row + g));
            for (int i = 0; i < mt; i++)
                acc[i] = _mm256_fmadd_ps(c, _mm256_loadu_ps(xs + (m0 + i) * G + g), acc[i]);
        }
        for (int i = 0; i < mt; i++) {
            float lanes[8];
            _mm256_storeu_ps(lanes, acc[i]);
            for (int j = 0; j < 8; j++) out[i] += lanes[j];
        }
    }
#endif
    for (; g < G; g++) {
        float c = (float)w->lo * load_scale(w->scale, w->sdtype, row + g);
        if (w->zero) c += load_scale(w->zero, w->sdtype, row + g);
        for (int i = 0; i < mt; i++) out[i] += c * xs[(m0 + i) * G + g];
    }
}


/* the integer part of y[m0..m0+mt, n] for one weight row n, portable C */
__attribute__((unused)) static void row_generic(const gq_weight *w, int64_t n, const quantized_x *qx, int64_t m0,
                                                int mt, float *acc) {
    int64_t K = w->K, G = K / w->group, chunks = K / 32;
    int32_t u[32];
    for (int i = 0; i < mt; i++) acc[i] = 0;
    for (int64_t c = 0; c < chunks; c++) {
        chunk_values(w, n, c, u);
        for (int half = 0; half < 2; half++) {
            int64_t k0 = 32 * c + 16 * half;
            float s = load_scale(w->scale, w->sdtype, n * G + k0 / w->group);
            for (int i = 0; i < mt; i++) {
                const int16_t *xq = qx->xq + (m0 + i) * K + k0;
                int32_t dot = 0;
                for (int j = 0; j < 16; j++) dot += xq[j] * u[16 * half + j];
                acc[i] += (float)dot * (s * qx->d[(m0 + i) * chunks + c]);
            }
        }
    }
}

#if defined(__AVX2__) && defined(__FMA__)
/* 32 bytes, 0x00 or 0xff: byte j set where bit j of word is (llama.cpp's bytes_from_bits_32) */
static inline __m256i bytes_from_bits(uint32_t word) {
    const __m256i shuf = _mm256_setr_epi64x(0x0000000000000000, 0x0101010101010101, 0x0202020202020202,
                                            0x0303030303030303);
    const __m256i bit = _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe);
    __m256i r = _mm256_shuffle_epi8(_mm256_set1_epi32((int)word), shuf);
    r = _mm256_or_si256(r, bit);
    return _mm256_cmpeq_epi8(r, _mm256_set1_epi64x(-1));
}

/* chunk c of a row's values as 32 bytes (k = 0..31): nib/hb/q8 are the row's */
static inline __attribute__((always_inline)) __m256i chunk_bytes(const uint8_t *nib, const uint8_t *hb,
                                                                 const int8_t *q8, int64_t c, const int BITS) {
    if (BITS == 8) return _mm256_loadu_si256((const __m256i *)(q8 + 32 * c));
    const __m128i b = _mm_loadu_si128((const __m128i *)(nib + 16 * c));
    __m256i u = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(b, 4), b), _mm256_set1_epi8(15));
    for (int p = 0; p < (BITS >= 5) + (BITS == 6); p++) {
        uint32_t word;
        memcpy(&word, hb + 4 * (BITS - 4) * c + 4 * p, 4);
        u = _mm256_or_si256(u, _mm256_and_si256(bytes_from_bits(word), _mm256_set1_epi8((char)(16 << p))));
    }
    return u;
}

/* the chunk's bytes as int16, k = 0..15 and 16..31 (signed for 8 bits, unsigned below) */
static inline __attribute__((always_inline)) void chunk_words(__m256i u, __m256i *u0, __m256i *u1, const int BITS) {
    *u0 = BITS == 8 ? _mm256_cvtepi8_epi16(_mm256_castsi256_si128(u)) : _mm256_cvtepu8_epi16(_mm256_castsi256_si128(u));
    *u1 = BITS == 8 ? _mm256_cvtepi8_epi16(_mm256_extracti128_si256(u, 1)) : _mm256_cvtepu8_epi16(_mm256_extracti128_si256(u, 1));
}

/* row n's nibbles, and its bit planes (bits 5 and 6; else none), as the SIMD row functions read them */
static inline const uint8_t *row_nib(const gq_weight *w, int64_t n) { return w->nib + n * (w->K / 2); }
static inline const uint8_t *row_hb(const gq_weight *w, int64_t n, const int BITS) {
    return BITS == 5 || BITS == 6 ? w->hb + n * (w->K / 8) * (BITS - 4) : 0;
}

static inline float hsum(__m256 a) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
}

/* BITS, GROUP16 and the row count are constants at each call site (the dispatch below): the decode is
   specialised and the accumulators stay in registers */
static inline __attribute__((always_inline)) void row_avx2(const gq_weight *w, int64_t n, const quantized_x *qx,
                                                           int64_t m0, const int mt, float *out, const int BITS,
                                                           const int GROUP16) {
    const int64_t K = w->K, G = K / w->group, chunks = K / 32, per_group = GROUP16 ? 1 : w->group / 32;
    const uint8_t *nib = row_nib(w, n), *hb = row_hb(w, n, BITS);
    const int8_t *q8 = BITS == 8 ? w->q8 + n * K : 0;
    __m256 acc[MT];
    for (int i = 0; i < mt; i++) acc[i] = _mm256_setzero_ps();
    for (int64_t c = 0, g = 0, left = per_group; c < chunks; c++) { /* g: the chunk's group, left: chunks to its end */
        const __m256i u = chunk_bytes(nib, hb, q8, c, BITS); /* 32 bytes: the chunk's values, k = 0..31 */
        __m256i u0, u1;
        chunk_words(u, &u0, &u1, BITS);
        if (GROUP16) { /* a scale per half chunk */
            const __m256 s0 = _mm256_set1_ps(load_scale(w->scale, w->sdtype, n * G + 2 * c));
            const __m256 s1 = _mm256_set1_ps(load_scale(w->scale, w->sdtype, n * G + 2 * c + 1));
            for (int i = 0; i < mt; i++) {
                const int16_t *xq = qx->xq + (m0 + i) * K + 32 * c;
                const __m256 d = _mm256_set1_ps(qx->d[(m0 + i) * chunks + c]);
                const __m256i p0 = _mm256_madd_epi16(u0, _mm256_loadu_si256((const __m256i *)xq)); /* [8] int32 */
                const __m256i p1 = _mm256_madd_epi16(u1, _mm256_loadu_si256((const __m256i *)(xq + 16)));
                acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_mul_ps(s0, d), acc[i]);
                acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), _mm256_mul_ps(s1, d), acc[i]);
            }
        } else {
            const __m256 s = _mm256_set1_ps(load_scale(w->scale, w->sdtype, n * G + g));
            if (--left == 0) { /* no division in the loop: it costs more than the chunk */
                g++;
                left = per_group;
            }
            for (int i = 0; i < mt; i++) {
                const int16_t *xq = qx->xq + (m0 + i) * K + 32 * c;
                const __m256i p0 = _mm256_madd_epi16(u0, _mm256_loadu_si256((const __m256i *)xq));
                const __m256i p1 = _mm256_madd_epi16(u1, _mm256_loadu_si256((const __m256i *)(xq + 16)));
                const __m256 sd = _mm256_mul_ps(s, _mm256_set1_ps(qx->d[(m0 + i) * chunks + c]));
                acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(p0, p1)), sd, acc[i]); /* exact: < 2^31 */
            }
        }
    }
    for (int i = 0; i < mt; i++) out[i] = hsum(acc[i]);
}

/* rows n and n + 1 against one activation row m, groups of 32 or more: row_avx2's arithmetic for each row,
   operation for operation (the same sums, bit for bit), with the activation's loads and scale shared and two
   independent chains of FMAs. At batch 1 a row of K = 576 is 18 chunks: one chain of dependent FMAs plus the
   per-row work bound the product, not the memory (SmolLM2's 4-bit layers ran at 9 GB/s, its 8-bit head at 29). */
static inline __attribute__((always_inline)) void row_pair_avx2(const gq_weight *w, int64_t n, const quantized_x *qx,
                                                                int64_t m, float *out, const int BITS) {
    const int64_t K = w->K, G = K / w->group, chunks = K / 32, per_group = w->group / 32;
    const uint8_t *nib0 = row_nib(w, n), *nib1 = row_nib(w, n + 1);
    const uint8_t *hb0 = row_hb(w, n, BITS), *hb1 = row_hb(w, n + 1, BITS);
    const int8_t *q80 = BITS == 8 ? w->q8 + n * K : 0, *q81 = BITS == 8 ? q80 + K : 0;
    const int16_t *xq = qx->xq + m * K;
    const float *d = qx->d + m * chunks;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    for (int64_t c = 0, g = 0, left = per_group; c < chunks; c++) {
        __m256i a0, a1, b0, b1;
        chunk_words(chunk_bytes(nib0, hb0, q80, c, BITS), &a0, &a1, BITS);
        chunk_words(chunk_bytes(nib1, hb1, q81, c, BITS), &b0, &b1, BITS);
        const __m256 s0 = _mm256_set1_ps(load_scale(w->scale, w->sdtype, n * G + g));
        const __m256 s1 = _mm256_set1_ps(load_scale(w->scale, w->sdtype, (n + 1) * G + g));
        if (--left == 0) {
            g++;
            left = per_group;
        }
        const __m256i x0 = _mm256_loadu_si256((const __m256i *)(xq + 32 * c));
        const __m256i x1 = _mm256_loadu_si256((const __m256i *)(xq + 32 * c + 16));
        const __m256 dc = _mm256_set1_ps(d[c]);
        const __m256i p0 = _mm256_add_epi32(_mm256_madd_epi16(a0, x0), _mm256_madd_epi16(a1, x1));
        const __m256i p1 = _mm256_add_epi32(_mm256_madd_epi16(b0, x0), _mm256_madd_epi16(b1, x1));
        acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_mul_ps(s0, dc), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), _mm256_mul_ps(s1, dc), acc1);
    }
    out[0] = hsum(acc0);
    out[1] = hsum(acc1);
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__)
/* chunk c of a row's values as 32 int16 (k = 0..31), 4-6 bits: the 16 nibble bytes widened twice over, the second
   copy shifted to its high nibbles, the bit planes added in under a mask */
static inline __attribute__((always_inline)) __m512i chunk_words512(const uint8_t *nib, const uint8_t *hb, int64_t c,
                                                                    const int BITS) {
    const __m512i shift = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(4), 1); /* 0 x16, 4 x16 */
    const __m128i b = _mm_loadu_si128((const __m128i *)(nib + 16 * c));
    __m512i u = _mm512_cvtepu8_epi16(_mm256_broadcastsi128_si256(b));
    u = _mm512_and_si512(_mm512_srlv_epi16(u, shift), _mm512_set1_epi16(15));
    for (int p = 0; p < (BITS >= 5) + (BITS == 6); p++) {
        uint32_t word;
        memcpy(&word, hb + 4 * (BITS - 4) * c + 4 * p, 4);
        /* the bit is clear below: + is | */
        u = _mm512_mask_add_epi16(u, (__mmask32)word, u, _mm512_set1_epi16((short)(16 << p)));
    }
    return u;
}

/* row_pair_avx2 with 512-bit integer products: each row's 32 products of a chunk in one madd (16 int32 lanes),
   folded to row_pair_avx2's 8 lanes (lane l + lane l + 8: the same integers, exactly), and both rows' float steps
   in one register (row n in lanes 0-7, n + 1 in 8-15), lane for lane row_pair_avx2's operations: the same sums,
   bit for bit (tests/workers/quant/test_gguf_groups.py builds both and compares). */
static inline __attribute__((always_inline)) void row_pair_avx512(const gq_weight *w, int64_t n, const quantized_x *qx,
                                                                  int64_t m, float *out, const int BITS) {
    const int64_t K = w->K, G = K / w->group, chunks = K / 32, per_group = w->group / 32;
    const uint8_t *nib0 = row_nib(w, n), *nib1 = row_nib(w, n + 1);
    const uint8_t *hb0 = row_hb(w, n, BITS), *hb1 = row_hb(w, n + 1, BITS);
    const int16_t *xq = qx->xq + m * K;
    const float *d = qx->d + m * chunks;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t c = 0, g = 0, left = per_group; c < chunks; c++) {
        const __m512i x = _mm512_loadu_si512((const void *)(xq + 32 * c));
        const __m512i p0 = _mm512_madd_epi16(chunk_words512(nib0, hb0, c, BITS), x); /* [16] int32 */
        const __m512i p1 = _mm512_madd_epi16(chunk_words512(nib1, hb1, c, BITS), x);
        const __m512i lo = _mm512_shuffle_i64x2(p0, p1, 0x44), hi = _mm512_shuffle_i64x2(p0, p1, 0xee);
        const float s0 = load_scale(w->scale, w->sdtype, n * G + g) * d[c];
        const float s1 = load_scale(w->scale, w->sdtype, (n + 1) * G + g) * d[c];
        if (--left == 0) {
            g++;
            left = per_group;
        }
        const __m512 sd = _mm512_insertf32x8(_mm512_set1_ps(s0), _mm256_set1_ps(s1), 1);
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(lo, hi)), sd, acc);
    }
    out[0] = hsum(_mm512_castps512_ps256(acc));
    out[1] = hsum(_mm512_extractf32x8_ps(acc, 1));
}
#define ROW_PAIR row_pair_avx512
#define SIMD_BITS 512
#else
#define ROW_PAIR row_pair_avx2
#define SIMD_BITS 256
#endif

static void row_pair_simd(const gq_weight *w, int64_t n, const quantized_x *qx, int64_t m, float *out) {
    switch (w->bits) {
    case 4: ROW_PAIR(w, n, qx, m, out, 4); break;
    case 5: ROW_PAIR(w, n, qx, m, out, 5); break;
    default: ROW_PAIR(w, n, qx, m, out, 6); break;
    }
}

#define ROW_CASE(B, G16)                                                                                               \
    switch (mt) {                                                                                                      \
    case 1: row_avx2(w, n, qx, m0, 1, acc, B, G16); break;                                                           \
    case 2: row_avx2(w, n, qx, m0, 2, acc, B, G16); break;                                                           \
    case 4: row_avx2(w, n, qx, m0, 4, acc, B, G16); break;                                                           \
    default: row_avx2(w, n, qx, m0, 8, acc, B, G16); break;                                                          \
    }
static void row_simd(const gq_weight *w, int64_t n, const quantized_x *qx, int64_t m0, int mt, float *acc) {
    switch (w->bits * 2 + (w->group == 16)) {
    case 8: ROW_CASE(4, 0); break;
    case 9: ROW_CASE(4, 1); break;
    case 10: ROW_CASE(5, 0); break;
    case 11: ROW_CASE(5, 1); break;
    case 12: ROW_CASE(6, 0); break;
    case 13: ROW_CASE(6, 1); break;
    case 16: ROW_CASE(8, 0); break;
    default: ROW_CASE(8, 1); break;
    }
}
#define SIMD SIMD_BITS
#else
#define row_simd row_generic
#define SIMD 0
#endif

/* the vector width the products were built for: 512 (AVX2 + FMA, and AVX-512 BW/DQ for batch 1's row pairs), 256
   (AVX2 + FMA) or 0 (portable C) */
int gq_simd(void) { return SIMD; }

static void matmul(const gq_weight *w, const float *x, int64_t M, float *y, int64_t ldy, int nthreads) {
    int64_t K = w->K, G = K / w->group;
    quantized_x qx = {malloc(sizeof(int16_t) * (M * K + 1)), malloc(sizeof(float) * (M * (K / 32) + 1)),
                      malloc(sizeof(float) * (M * G + 1))};
    quantize_x(x, M, K, w->group, &qx);
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1 && w->N * (K / 32) * M >= 4096)
    for (int64_t nb = 0; nb < w->N; nb += 16) {
        int64_t ne = nb + 16 < w->N ? nb + 16 : w->N;
        for (int64_t m0 = 0, mt; m0 < M; m0 += mt) {
            /* tiles of 8, 4, 2 or 1 activation rows (the specialisations row_simd has: fewer builds, same speed) */
            mt = M - m0 >= 8 ? 8 : M - m0 >= 4 ? 4 : M - m0 >= 2 ? 2 : 1;
            for (int64_t n = nb; n < ne; n++) {
                float acc[MT];
#if SIMD
                /* two weight rows at a time (row_pair_avx2) for 4-6 bits: 2.3x on a 3072 x 576 4-bit row block at
                   batch 1; slower for int8 rows (24-77% here: their loads, not a chain, bound them) */
                if (mt == 1 && w->bits != 8 && w->group != 16 && n + 1 < ne) {
                    row_pair_simd(w, n, &qx, m0, acc);
                    zero_terms(w, n, qx.xs, m0, 1, acc);
                    zero_terms(w, n + 1, qx.xs, m0, 1, acc + 1);
                    y[m0 * ldy + n] = acc[0];
                    y[m0 * ldy + n + 1] = acc[1];
                    n++;
                    continue;
                }
#endif
                row_simd(w, n, &qx, m0, mt, acc);
                zero_terms(w, n, qx.xs, m0, mt, acc);
                for (int i = 0; i < mt; i++) y[(m0 + i) * ldy + n] = acc[i];
            }
        }
    }
    free(qx.xq);
    free(qx.d);
    free(qx.xs);
}

/* y [M, N] = x [M, K] @ W^T */
void gq_matmul(const float *x, int64_t M, float *y, const gq_weight *w, int nthreads) { matmul(w, x, M, y, w->N, nthreads); }

/* MoE: rows of expert e of x [M, K] (sorted by expert, counts[e] each) times expert e of the stacked w [E, N, K]
   (w->N, w->K: one expert's) -> y [M, N]; rows past sum(counts) are left as they are */
void gq_grouped_matmul(const float *x, int64_t M, float *y, const int64_t *counts, int64_t E, const gq_weight *w,
                       int nthreads) {
    const int64_t N = w->N, K = w->K, G = K / w->group, esize = w->sdtype == 0 ? 4 : 2;
    const int64_t planes = w->bits == 5 || w->bits == 6 ? w->bits - 4 : 0;
    int64_t start = 0;
    for (int64_t e = 0; e < E && start < M; e++) {
        int64_t count = counts[e] < M - start ? counts[e] : M - start;
        if (count > 0) {
            gq_weight we = *w;
            we.nib = w->nib ? w->nib + e * N * (K / 2) : 0;
            we.hb = planes ? w->hb + e * N * (K / 8) * planes : 0;
            we.q8 = w->q8 ? w->q8 + e * N * K : 0;
            we.scale = (const char *)w->scale + e * N * G * esize;
            we.zero = w->zero ? (const char *)w->zero + e * N * G * esize : 0;
            matmul(&we, x + start * K, count, y + start * N, N, nthreads);
        }
        start += count;
    }
}

/* out [T, K] = rows ids [T] of the effective weight, gguf-py's values ((float)(u + lo) * s + z, uncontracted) */
void gq_rows(const int64_t *ids, int64_t T, float *out, const gq_weight *w, int nthreads) {
    const int64_t K = w->K, G = K / w->group;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1 && T >= 64)
    for (int64_t t = 0; t < T; t++) {
        int64_t n = ids[t];
        int32_t u[32];
        for (int64_t c = 0; c < K / 32; c++) {
            chunk_values(w, n, c, u);
            for (int j = 0; j < 32; j++) {
                int64_t k = 32 * c + j;
                float v = (float)(u[j] + w->lo) * load_scale(w->scale, w->sdtype, n * G + k / w->group);
                if (w->zero) v = v + load_scale(w->zero, w->sdtype, n * G + k / w->group);
                out[t * K + k] = v;
            }
        }
    }
}
