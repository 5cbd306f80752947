/* CPU kernel of int8 weight-only linear layers with one scale per output row (hf_tbn.kernels.native):
 * the compressed embeddings and output heads of hf_tbn.embeddings (docs/embeddings.md).
 *
 * y[m, n] = scale[n] * sum_k x[m, k] w[n, k], x and y float32, w int8 row-major (n, k).
 *
 * Decoding reads each weight once, so the kernel is bound by memory: a quarter of the float32
 * weight's bytes. With AVX-512, 16 weights at a time are widened to float32 and multiplied into
 * one register of partial sums per pair (weight row, row of x), four weight rows at once.
 */
#include <stdint.h>

#if defined(__AVX512F__)
#include <immintrin.h>

#define ROWS 4
#ifndef PREFETCH_ROWS
#define PREFETCH_ROWS 32
#endif

static inline __m512 widen(const int8_t *w) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)w)));
}

/* Weight rows [n0, n0 + count), count <= ROWS, against every row of x. */
static void row_block(const float *x, int64_t m, int64_t k, const int8_t *w, const float *scale, int64_t n0,
                      int64_t count, int64_t n, float *y) {
    const int64_t whole = k - k % 16;
    const __mmask16 tail = (__mmask16)((1u << (k % 16)) - 1u);
    for (int64_t i = 0; i < m; ++i) {
        const float *xs = x + i * k;
        __m512 acc[ROWS];
        for (int r = 0; r < ROWS; ++r) acc[r] = _mm512_setzero_ps();
        for (int64_t j = 0; j < whole; j += 16) {
            const __m512 xv = _mm512_loadu_ps(xs + j);
            for (int r = 0; r < ROWS; ++r) {
                if (r < count) acc[r] = _mm512_fmadd_ps(widen(w + (n0 + r) * k + j), xv, acc[r]);
            }
            if (i == 0 && j % 64 == 0 && n0 + PREFETCH_ROWS + ROWS <= n) { /* the rows a later block reads, from memory */
                for (int r = 0; r < ROWS; ++r) _mm_prefetch((const char *)(w + (n0 + PREFETCH_ROWS + r) * k + j), _MM_HINT_T0);
            }
        }
        if (tail) {
            const __m512 xv = _mm512_maskz_loadu_ps(tail, xs + whole);
            for (int r = 0; r < ROWS && r < count; ++r) {
                const __m128i b = _mm_maskz_loadu_epi8(tail, w + (n0 + r) * k + whole);
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)), xv, acc[r]);
            }
        }
        for (int r = 0; r < ROWS && r < count; ++r) y[i * n + n0 + r] = scale[n0 + r] * _mm512_reduce_add_ps(acc[r]);
    }
}
#else
#define ROWS 1

static void row_block(const float *x, int64_t m, int64_t k, const int8_t *w, const float *scale, int64_t n0,
                      int64_t count, int64_t n, float *y) {
    (void)count;
    for (int64_t i = 0; i < m; ++i) {
        float sum = 0.0f;
        for (int64_t j = 0; j < k; ++j) sum += (float)w[n0 * k + j] * x[i * k + j];
        y[i * n + n0] = scale[n0] * sum;
    }
}
#endif

void int8_rows_linear(const float *x, int64_t m, int64_t k, const int8_t *w, const float *scale, int64_t n, float *y,
                      int threads) {
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
    for (int64_t n0 = 0; n0 < n; n0 += ROWS) {
        row_block(x, m, k, w, scale, n0, n - n0 < ROWS ? n - n0 : ROWS, n, y);
    }
}
