/* One row of x (decoding) on AVX-512; included by tbn_lut.c when the compiler targets AVX-512F.
 *
 * The 16 signed sums of each group of 4 inputs fill one register (a 16-entry table), and one
 * vpermps looks up the nibbles of 16 tile rows at once: a 32-bit gather brings 4 tile bytes
 * (32 inputs) of each of 16 rows, and 8 shifts, lookups and adds consume them. The tables of a
 * 1536-input row take 24 KB, so they stay in the L1 cache while every block of 16 rows reads
 * them. The scalar single-row kernel (tbn_lut_lanes.h, LANES 1) does one lookup per tile byte
 * and row instead.
 */
#include <immintrin.h>

#ifndef PREFETCH_BLOCKS
#define PREFETCH_BLOCKS 2
#endif

/* tables[n][b] = sum_i (bit i of b ? x[4n + i] : -x[4n + i]), n < k / 4. */
static void row_tables_avx512(const float *x, int64_t k, __m512 *tables) {
    const __m512i entry = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512 sign[4];
    for (int i = 0; i < 4; ++i) {
        const __mmask16 set = _mm512_test_epi32_mask(entry, _mm512_set1_epi32(1 << i));
        sign[i] = _mm512_mask_blend_ps(set, _mm512_set1_ps(-1.0f), _mm512_set1_ps(1.0f));
    }
    for (int64_t n = 0; n < k / 4; ++n) {
        const float *xs = x + 4 * n;
        __m512 t = _mm512_mul_ps(sign[0], _mm512_set1_ps(xs[0]));
        for (int i = 1; i < 4; ++i) t = _mm512_fmadd_ps(sign[i], _mm512_set1_ps(xs[i]), t);
        tables[n] = t;
    }
}

/* Tile rows [n0, n0 + count), count <= 16, against the tables: their 16 sums (lanes >= count are 0). */
static __m512 row_block_avx512(const __m512 *tables, const uint8_t *tile, int64_t groups, int64_t n0,
                               int64_t count) {
    const __mmask16 valid = (__mmask16)((1u << count) - 1u);
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    /* Byte offsets of the rows from row n0; lanes past the last row read row n0 and are dropped. */
    const __m512i offsets = _mm512_maskz_mullo_epi32(valid, lane, _mm512_set1_epi32((int)groups));
    const uint8_t *base = tile + n0 * groups;
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    int64_t g = 0;
    for (; g + 4 <= groups; g += 4) { /* 4 tile bytes per row: 8 nibbles, 8 tables */
        const __m512i v = _mm512_i32gather_epi32(offsets, base + g, 1);
        const __m512 *t = tables + 2 * g;
        acc[0] = _mm512_add_ps(acc[0], _mm512_permutexvar_ps(v, t[0]));
        acc[1] = _mm512_add_ps(acc[1], _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), t[1]));
        acc[2] = _mm512_add_ps(acc[2], _mm512_permutexvar_ps(_mm512_srli_epi32(v, 8), t[2]));
        acc[3] = _mm512_add_ps(acc[3], _mm512_permutexvar_ps(_mm512_srli_epi32(v, 12), t[3]));
        acc[0] = _mm512_add_ps(acc[0], _mm512_permutexvar_ps(_mm512_srli_epi32(v, 16), t[4]));
        acc[1] = _mm512_add_ps(acc[1], _mm512_permutexvar_ps(_mm512_srli_epi32(v, 20), t[5]));
        acc[2] = _mm512_add_ps(acc[2], _mm512_permutexvar_ps(_mm512_srli_epi32(v, 24), t[6]));
        acc[3] = _mm512_add_ps(acc[3], _mm512_permutexvar_ps(_mm512_srli_epi32(v, 28), t[7]));
    }
    for (; g < groups; ++g) { /* the last groups % 4 bytes, one at a time */
        uint8_t bytes[16] = {0};
        for (int64_t r = 0; r < count; ++r) bytes[r] = base[r * groups + g];
        const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)bytes));
        acc[0] = _mm512_add_ps(acc[0], _mm512_permutexvar_ps(v, tables[2 * g]));
        acc[1] = _mm512_add_ps(acc[1], _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), tables[2 * g + 1]));
    }
    return _mm512_maskz_mov_ps(valid, _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
}

/* y[i * rows + n] = alpha[i] * (T x)[n] + bias[i * rows + n] for one row x; 0 or -1 (no memory). */
static int lut_row_avx512(const float *x, int64_t k, const uint8_t *tile, int64_t rows, const float *alpha,
                          int64_t p, const float *bias, float *y, int threads) {
    const int64_t groups = k / 8;
    __m512 *tables = scratch_alloc((size_t)(k / 4) * sizeof(__m512));
    if (tables == NULL) return -1;
    row_tables_avx512(x, k, tables);
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
    for (int64_t n0 = 0; n0 < rows; n0 += 16) {
        const int64_t count = rows - n0 < 16 ? rows - n0 : 16;
        const __mmask16 valid = (__mmask16)((1u << count) - 1u);
        if (n0 + PREFETCH_BLOCKS * 16 < rows) { /* a later block's tile bytes, from memory: gathers defeat the prefetcher */
            const uint8_t *ahead = tile + (n0 + PREFETCH_BLOCKS * 16) * groups;
            const int64_t bytes = (rows - n0 - PREFETCH_BLOCKS * 16 < 16 ? rows - n0 - PREFETCH_BLOCKS * 16 : 16) * groups;
            for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch((const char *)(ahead + b), _MM_HINT_T0);
        }
        const __m512 sum = row_block_avx512(tables, tile, groups, n0, count);
        for (int64_t i = 0; i < p; ++i) {
            __m512 out = _mm512_mul_ps(_mm512_set1_ps(alpha[i]), sum);
            if (bias != NULL) out = _mm512_add_ps(out, _mm512_maskz_loadu_ps(valid, bias + i * rows + n0));
            _mm512_mask_storeu_ps(y + i * rows + n0, valid, out);
        }
    }
    return 0;
}
