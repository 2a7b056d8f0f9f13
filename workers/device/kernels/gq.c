/* Group-quantized weight x float32 activation products for the CPU op table (cpu_gq.py builds and loads it).

A weight [N, K] holds unsigned integers u (bits 4, 5, 6 or 8 wide) with a scale s and an optional zero z per
group of `group` values along K (16, or a multiple of 32); the effective weight is (u + lo) * s + z, exactly the
checkpoint's (GGUF: gguf_groups.py's q * scale + zero with q = u + lo).

Storage is tiled for the product: rows in blocks of 16 (N padded to a multiple of 16 with zero rows), each block
by chunks of 32 values along K, and within a chunk by pairs of neighbouring values (pair p: k = 2p, 2p + 1). A
pair of a block is 32 int16 lanes, lane j = 2r + (k & 1) for the block's row r: one vector register, which one
integer multiply-add against the activation's pair (broadcast) turns into 16 rows' partial sums. Per block b and
chunk c (at = b * K/32 + c):
  nib  uint8, 256 bytes at 256 at: four groups of 64 bytes, group t as 32 little-endian uint16 lanes whose nibble
       q (bits 4q..4q+3) is u & 15 of pair p = 4t + q at the lane's row and parity (bits 4, 5, 6);
  hb   uint8, bits 5 and 6: 64 bytes per bit plane at 64 (at * planes + plane): 32 uint16 lanes, bit p of a lane
       bit 4 + plane of its value in pair p;
  q8   int8, bits 8: 512 bytes at 512 at: pair p's 32 lanes as bytes at 32p + j (lo is then 0 and u signed);
  scale, zero [N/16, K/group, 16] float32, float16 or bfloat16 (sdtype 0, 1, 2): a group's 16 rows together.
The product holds each activation row per 32 values along K as int16, x ~ d xq (quantize_x), sums integer
products exactly (AVX-512 VNNI's dpwssd, or madd_epi16 and an add: the same integers) for 16 rows at once (8 per
register under AVX2), and scales them lane by lane, row n's order the same at any batch size:
  f = 0; for each group g, for each chunk c of it (or half chunk, groups of 16):
      f = fma((float) sum_k u_n,k xq_m,k, s_g * d_c, f)
    then, where lo or z is not zero: f = fma(lo s_g + z_g, xs_g, f)
(xs_g = d_c * the group's sum of xq). Against x @ W^T on the dequantized weight it differs by the rounding of x to
15 bits of its chunk's largest value, and float32 rounding. The portable C build sums in the same order without
contraction (its float results may differ by rounding). Rows (gq_rows) are dequantized as gguf-py does,
(float)(u + lo) * s then + z, with no contraction (-ffp-contract=off): bit for bit its values.
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

#define TILE 16 /* weight rows per block */
#define MT 8    /* activation rows per pass over a block */

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

static inline int planes_of(int bits) { return bits == 5 || bits == 6 ? bits - 4 : 0; }

/* where row n's scale (and zero) of group g is */
static inline int64_t scale_at(const gq_weight *w, int64_t n, int64_t g) {
    return (n / TILE * (w->K / w->group) + g) * TILE + n % TILE;
}

/* u[0..31] of chunk c of row n, as int32 */
static inline void chunk_values(const gq_weight *w, int64_t n, int64_t c, int32_t *u) {
    const int64_t at = n / TILE * (w->K / 32) + c;
    const int r = (int)(n % TILE), planes = planes_of(w->bits);
    for (int k = 0; k < 32; k++) {
        const int p = k / 2, j = 2 * r + k % 2; /* the value's pair and lane */
        if (w->bits == 8) {
            u[k] = w->q8[512 * at + 32 * p + j];
            continue;
        }
        uint16_t lane;
        memcpy(&lane, w->nib + 256 * at + 64 * (p / 4) + 2 * j, 2);
        int32_t v = (lane >> (4 * (p % 4))) & 15;
        for (int pl = 0; pl < planes; pl++) {
            memcpy(&lane, w->hb + 64 * (at * planes + pl) + 2 * j, 2);
            v |= ((lane >> p) & 1) << (4 + pl);
        }
        u[k] = v;
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

/* q int8 [R, K] (R whole blocks of TILE rows, K a multiple of 32) -> the tiled layout of the header, u = q - lo:
   bits 8: q8 [R K] (lo 0); else nib [R K / 2] and, bits 5 and 6, hb [R K / 8 (bits - 4)] */
void gq_pack(const int8_t *q, int64_t R, int64_t K, int bits, int lo, uint8_t *nib, uint8_t *hb, int8_t *q8,
             int nthreads) {
    const int64_t chunks = K / 32, blocks = R / TILE;
    const int planes = planes_of(bits);
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1 && R * K >= (1 << 20))
    for (int64_t b = 0; b < blocks; b++) {
        for (int64_t c = 0; c < chunks; c++) {
            const int64_t at = b * chunks + c;
            uint16_t lanes[4][2 * TILE] = {{0}}, plane[2][2 * TILE] = {{0}};
            for (int r = 0; r < TILE; r++) {
                const int8_t *row = q + (b * TILE + r) * K + 32 * c;
                for (int k = 0; k < 32; k++) {
                    const int p = k / 2, j = 2 * r + k % 2;
                    if (bits == 8) {
                        q8[512 * at + 32 * p + j] = row[k];
                        continue;
                    }
                    const int u = row[k] - lo;
                    lanes[p / 4][j] |= (uint16_t)((u & 15) << (4 * (p % 4)));
                    for (int pl = 0; pl < planes; pl++) plane[pl][j] |= (uint16_t)(((u >> (4 + pl)) & 1) << p);
                }
            }
            if (bits == 8) continue;
            memcpy(nib + 256 * at, lanes, 256);
            for (int pl = 0; pl < planes; pl++) memcpy(hb + 64 * (at * planes + pl), plane[pl], 64);
        }
    }
}

/* where a block's chunk c and group g start: the weight's pointers at block b */
typedef struct {
    const uint8_t *nib, *hb;
    const int8_t *q8;
    int64_t scales; /* index of the block's group 0 row 0 */
} block_at;

static inline block_at block(const gq_weight *w, int64_t b) {
    const int64_t chunks = w->K / 32, planes = planes_of(w->bits);
    block_at a = {w->nib ? w->nib + 256 * b * chunks : 0, planes ? w->hb + 64 * planes * b * chunks : 0,
                  w->q8 ? w->q8 + 512 * b * chunks : 0, b * (w->K / w->group) * TILE};
    return a;
}

/* rows of block b (up to N) for activation rows 0..M-1, portable C: the SIMD build's order, uncontracted */
__attribute__((unused)) static void block_generic(const gq_weight *w, int64_t b, const quantized_x *qx, int64_t M,
                                                  float *y, int64_t ldy) {
    const int64_t K = w->K, G = K / w->group, chunks = K / 32;
    const int halves = w->group == 16 ? 2 : 1, zero_terms = w->lo != 0 || w->zero;
    int32_t u[32];
    for (int64_t n = b * TILE; n < (b + 1) * TILE && n < w->N; n++) {
        for (int64_t m = 0; m < M; m++) {
            float f = 0;
            for (int64_t c = 0; c < chunks; c++) {
                chunk_values(w, n, c, u);
                for (int h = 0; h < halves; h++) {
                    const int span = 32 / halves, k0 = span * h;
                    const int64_t g = (32 * c + k0) / w->group, at = scale_at(w, n, g);
                    int32_t dot = 0;
                    for (int j = k0; j < k0 + span; j++) dot += u[j] * qx->xq[m * K + 32 * c + j];
                    const float s = load_scale(w->scale, w->sdtype, at);
                    f = f + (float)dot * (s * qx->d[m * chunks + c]);
                    if (zero_terms && (32 * c + k0 + span) % w->group == 0) {
                        float cz = (float)w->lo * s;
                        if (w->zero) cz = cz + load_scale(w->zero, w->sdtype, at);
                        f = f + cz * qx->xs[m * G + g];
                    }
                }
            }
            y[m * ldy + n] = f;
        }
    }
}

#if defined(__AVX2__) && defined(__FMA__)
/* One vector of lanes: 16 (AVX-512 BW/DQ) or 8 (AVX2) rows' int32 sums or float results; the same operations lane
   for lane in either width, so the two builds' products are equal bit for bit (a test builds both). */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__)
#define LANES 16
typedef __m512i vi;
typedef __m512 vf;
static inline vi vi_zero(void) { return _mm512_setzero_si512(); }
static inline vi vi_load(const void *p) { return _mm512_loadu_si512(p); }
static inline vi vi_and(vi a, vi b) { return _mm512_and_si512(a, b); }
static inline vi vi_or(vi a, vi b) { return _mm512_or_si512(a, b); }
static inline vi vi_add(vi a, vi b) { return _mm512_add_epi32(a, b); }
static inline vi vi_set16(int v) { return _mm512_set1_epi16((short)v); }
static inline vi vi_srl16(vi a, const int s) { return _mm512_srli_epi16(a, s); }
static inline vi vi_sll16(vi a, const int s) { return _mm512_slli_epi16(a, s); }
static inline vi vi_widen8(const int8_t *p) { return _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)p)); }
/* acc + the lanes' pairs times the activation pair at x (two int16), exactly */
static inline vi vi_dot(vi acc, vi w, const int16_t *x) {
    int32_t pair;
    memcpy(&pair, x, 4);
#ifdef __AVX512VNNI__
    return _mm512_dpwssd_epi32(acc, w, _mm512_set1_epi32(pair));
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(w, _mm512_set1_epi32(pair)));
#endif
}
static inline vf vf_zero(void) { return _mm512_setzero_ps(); }
static inline vf vf_set1(float v) { return _mm512_set1_ps(v); }
static inline vf vf_cvt(vi a) { return _mm512_cvtepi32_ps(a); }
static inline vf vf_mul(vf a, vf b) { return _mm512_mul_ps(a, b); }
static inline vf vf_add(vf a, vf b) { return _mm512_add_ps(a, b); }
static inline vf vf_fma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline void vf_store(float *p, vf a) { _mm512_storeu_ps(p, a); }
static inline vf vf_scales(const void *p, int sdtype, int64_t i) { /* LANES scales from i, as float32 */
    if (sdtype == 0) return _mm512_loadu_ps((const float *)p + i);
    const __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i));
    if (sdtype == 1) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
#define SIMD_BITS 512
#else
#define LANES 8
typedef __m256i vi;
typedef __m256 vf;
static inline vi vi_zero(void) { return _mm256_setzero_si256(); }
static inline vi vi_load(const void *p) { return _mm256_loadu_si256((const __m256i *)p); }
static inline vi vi_and(vi a, vi b) { return _mm256_and_si256(a, b); }
static inline vi vi_or(vi a, vi b) { return _mm256_or_si256(a, b); }
static inline vi vi_add(vi a, vi b) { return _mm256_add_epi32(a, b); }
static inline vi vi_set16(int v) { return _mm256_set1_epi16((short)v); }
static inline vi vi_srl16(vi a, const int s) { return _mm256_srli_epi16(a, s); }
static inline vi vi_sll16(vi a, const int s) { return _mm256_slli_epi16(a, s); }
static inline vi vi_widen8(const int8_t *p) { return _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)p)); }
static inline vi vi_dot(vi acc, vi w, const int16_t *x) {
    int32_t pair;
    memcpy(&pair, x, 4);
#ifdef __AVXVNNI__
    return _mm256_dpwssd_avx_epi32(acc, w, _mm256_set1_epi32(pair));
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(w, _mm256_set1_epi32(pair)));
#endif
}
static inline vf vf_zero(void) { return _mm256_setzero_ps(); }
static inline vf vf_set1(float v) { return _mm256_set1_ps(v); }
static inline vf vf_cvt(vi a) { return _mm256_cvtepi32_ps(a); }
static inline vf vf_mul(vf a, vf b) { return _mm256_mul_ps(a, b); }
static inline vf vf_add(vf a, vf b) { return _mm256_add_ps(a, b); }
static inline vf vf_fma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline void vf_store(float *p, vf a) { _mm256_storeu_ps(p, a); }
static inline vf vf_scales(const void *p, int sdtype, int64_t i) {
    if (sdtype == 0) return _mm256_loadu_ps((const float *)p + i);
    const __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)p + i));
    if (sdtype == 1) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
#define SIMD_BITS 256
#endif

/* pair p of a chunk as LANES rows' int16 pairs: v the nibble group holding it (loaded at p % 4 == 0), hv the bit
   planes */
static inline __attribute__((always_inline)) vi pair_values(vi v, const vi *hv, const int8_t *q8, const int p,
                                                           const int BITS) {
    if (BITS == 8) return vi_widen8(q8 + 32 * p);
    const int q = p % 4;
    vi u = q == 3 ? vi_srl16(v, 12) : vi_and(q ? vi_srl16(v, 4 * q) : v, vi_set16(15));
    for (int pl = 0; pl < (BITS >= 5) + (BITS == 6); pl++) { /* bit p of the plane to bit 4 + pl */
        const int by = 4 + pl - p;
        const vi bit = by >= 0 ? vi_sll16(hv[pl], by) : vi_srl16(hv[pl], -by);
        u = vi_or(u, vi_and(bit, vi_set16(16 << pl)));
    }
    return u;
}

/* rows LANES h .. of block b (their lanes of it) times activation rows m0..m0+MTc-1 -> y. BITS, G16 (groups of 16)
   and MTc are constants at each call site (the dispatch below): the loops unroll and the sums stay in registers;
   each activation row sums into NACC vectors (independent chains where the rows are few). */
static inline __attribute__((always_inline)) void tile(const gq_weight *w, int64_t b, int h, const quantized_x *qx,
                                                       int64_t m0, const int MTc, float *y, int64_t ldy,
                                                       const int BITS, const int G16) {
    const int64_t K = w->K, G = K / w->group, chunks = K / 32, per_group = G16 ? 1 : w->group / 32;
    const int NACC = MTc >= 8 ? 1 : MTc >= 4 ? 2 : 4, planes = (BITS >= 5) + (BITS == 6);
    const int zero_terms = w->lo != 0 || w->zero;
    const block_at a = block(w, b);
    const uint8_t *nib = BITS == 8 ? 0 : a.nib + 4 * LANES * h; /* this half's lanes: 2 LANES int16 */
    const uint8_t *hb = planes ? a.hb + 4 * LANES * h : 0;
    const int8_t *q8 = BITS == 8 ? a.q8 + 2 * LANES * h : 0;
    const int64_t s0 = a.scales + LANES * h;
    const int16_t *xq = qx->xq + m0 * K;
    const vf lo = vf_set1((float)w->lo);
    vf f[MT];
#pragma GCC unroll 8
    for (int i = 0; i < MTc; i++) f[i] = vf_zero();
    for (int64_t c = 0, g = 0, left = per_group; c < chunks; c++) {
        vi acc[MT][4], v = vi_zero(), hv[2] = {vi_zero(), vi_zero()};
#pragma GCC unroll 8
        for (int i = 0; i < MTc; i++)
#pragma GCC unroll 4
            for (int k = 0; k < NACC; k++) acc[i][k] = vi_zero();
#pragma GCC unroll 2
        for (int pl = 0; pl < planes; pl++) hv[pl] = vi_load(hb + 64 * (c * planes + pl));
#pragma GCC unroll 16
        for (int p = 0; p < 16; p++) {
            if (BITS != 8 && p % 4 == 0) v = vi_load(nib + 256 * c + 64 * (p / 4));
            const vi u = pair_values(v, hv, q8 + 512 * c, p, BITS);
#pragma GCC unroll 8
            for (int i = 0; i < MTc; i++) acc[i][p % NACC] = vi_dot(acc[i][p % NACC], u, xq + i * K + 32 * c + 2 * p);
            if (!((G16 && p == 7) || p == 15)) continue;
            /* the end of a group (groups of 16), or of the chunk: its float step */
            const int64_t gg = G16 ? 2 * c + (p == 15) : g;
            const vf s = vf_scales(w->scale, w->sdtype, s0 + TILE * gg);
#pragma GCC unroll 8
            for (int i = 0; i < MTc; i++) {
                vi sum = acc[i][0];
#pragma GCC unroll 4
                for (int k = 1; k < NACC; k++) sum = vi_add(sum, acc[i][k]);
#pragma GCC unroll 4
                for (int k = 0; k < NACC; k++) acc[i][k] = vi_zero();
                const vf sd = vf_mul(s, vf_set1(qx->d[(m0 + i) * chunks + c]));
                f[i] = vf_fma(vf_cvt(sum), sd, f[i]);
            }
            if (zero_terms && (G16 || left == 1)) { /* the group's last chunk */
                vf cz = vf_mul(lo, s);
                if (w->zero) cz = vf_add(cz, vf_scales(w->zero, w->sdtype, s0 + TILE * gg));
#pragma GCC unroll 8
                for (int i = 0; i < MTc; i++) f[i] = vf_fma(cz, vf_set1(qx->xs[(m0 + i) * G + gg]), f[i]);
            }
        }
        if (!G16 && --left == 0) { /* no division in the loop: it costs more than the chunk */
            g++;
            left = per_group;
        }
    }
    const int64_t n0 = b * TILE + LANES * h, valid = w->N - n0;
#pragma GCC unroll 8
    for (int i = 0; i < MTc; i++) {
        if (valid >= LANES) {
            vf_store(y + (m0 + i) * ldy + n0, f[i]);
        } else {
            float lanes[LANES];
            vf_store(lanes, f[i]);
            memcpy(y + (m0 + i) * ldy + n0, lanes, sizeof(float) * valid);
        }
    }
}

#define TILE_CASE(B, G16)                                                                                              \
    switch (mt) {                                                                                                      \
    case 1: tile(w, b, h, qx, m0, 1, y, ldy, B, G16); break;                                                           \
    case 2: tile(w, b, h, qx, m0, 2, y, ldy, B, G16); break;                                                           \
    case 4: tile(w, b, h, qx, m0, 4, y, ldy, B, G16); break;                                                           \
    default: tile(w, b, h, qx, m0, 8, y, ldy, B, G16); break;                                                          \
    }
static void block_simd(const gq_weight *w, int64_t b, const quantized_x *qx, int64_t M, float *y, int64_t ldy) {
    for (int h = 0; h < TILE / LANES && b * TILE + LANES * h < w->N; h++) {
        for (int64_t m0 = 0, mt; m0 < M; m0 += mt) {
            /* tiles of 8, 4, 2 or 1 activation rows (the specialisations tile has: fewer builds, same speed) */
            mt = M - m0 >= 8 ? 8 : M - m0 >= 4 ? 4 : M - m0 >= 2 ? 2 : 1;
            switch (w->bits * 2 + (w->group == 16)) {
            case 8: TILE_CASE(4, 0); break;
            case 9: TILE_CASE(4, 1); break;
            case 10: TILE_CASE(5, 0); break;
            case 11: TILE_CASE(5, 1); break;
            case 12: TILE_CASE(6, 0); break;
            case 13: TILE_CASE(6, 1); break;
            case 16: TILE_CASE(8, 0); break;
            default: TILE_CASE(8, 1); break;
            }
        }
    }
}
#define block_product block_simd
#define SIMD SIMD_BITS
#else
#define block_product block_generic
#define SIMD 0
#endif

/* the vector width the products were built for: 512 (AVX-512 BW/DQ and FMA), 256 (AVX2 + FMA) or 0 (portable C) */
int gq_simd(void) { return SIMD; }

static void matmul(const gq_weight *w, const float *x, int64_t M, float *y, int64_t ldy, int nthreads) {
    int64_t K = w->K, G = K / w->group, blocks = (w->N + TILE - 1) / TILE;
    quantized_x qx = {malloc(sizeof(int16_t) * (M * K + 1)), malloc(sizeof(float) * (M * (K / 32) + 1)),
                      malloc(sizeof(float) * (M * G + 1))};
    quantize_x(x, M, K, w->group, &qx);
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1 && w->N * (K / 32) * M >= 4096)
    for (int64_t b = 0; b < blocks; b++) block_product(w, b, &qx, M, y, ldy);
    free(qx.xq);
    free(qx.d);
    free(qx.xs);
}

/* y [M, N] = x [M, K] @ W^T */
void gq_matmul(const float *x, int64_t M, float *y, const gq_weight *w, int nthreads) { matmul(w, x, M, y, w->N, nthreads); }

/* MoE: rows of expert e of x [M, K] (sorted by expert, counts[e] each) times expert e of the stacked w [E, N, K]
   (w->N, w->K: one expert's; each expert's rows padded to whole blocks) -> y [M, N]; rows past sum(counts) are
   left as they are */
void gq_grouped_matmul(const float *x, int64_t M, float *y, const int64_t *counts, int64_t E, const gq_weight *w,
                       int nthreads) {
    const int64_t N = w->N, K = w->K, G = K / w->group, esize = w->sdtype == 0 ? 4 : 2;
    const int64_t blocks = (N + TILE - 1) / TILE, rows = blocks * TILE; /* an expert's blocks, padded rows */
    int64_t start = 0;
    for (int64_t e = 0; e < E && start < M; e++) {
        int64_t count = counts[e] < M - start ? counts[e] : M - start;
        if (count > 0) {
            gq_weight we = *w;
            const block_at a = block(w, e * blocks);
            we.nib = a.nib;
            we.hb = a.hb;
            we.q8 = a.q8;
            we.scale = (const char *)w->scale + e * rows * G * esize;
            we.zero = w->zero ? (const char *)w->zero + e * rows * G * esize : 0;
            matmul(&we, x + start * K, count, y + start * N, N, nthreads);
        }
        start += count;
    }
}

/* out [T, K] = rows ids [T] of the effective weight, gguf-py's values ((float)(u + lo) * s + z, uncontracted) */
void gq_rows(const int64_t *ids, int64_t T, float *out, const gq_weight *w, int nthreads) {
    const int64_t K = w->K;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1 && T >= 64)
    for (int64_t t = 0; t < T; t++) {
        int64_t n = ids[t];
        int32_t u[32];
        for (int64_t c = 0; c < K / 32; c++) {
            chunk_values(w, n, c, u);
            for (int j = 0; j < 32; j++) {
                int64_t k = 32 * c + j, at = scale_at(w, n, k / w->group);
                float v = (float)(u[j] + w->lo) * load_scale(w->scale, w->sdtype, at);
                if (w->zero) v = v + load_scale(w->zero, w->sdtype, at);
                out[t * K + k] = v;
            }
        }
    }
}
