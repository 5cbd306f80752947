/* CPU kernel of packed TBN linear layers: tile products by byte lookup tables (hf_tbn.kernels.native).
 *
 * y[m, i * rows + n] = alpha[i] * sum_k s(n, k) x[m, k] + bias[i * rows + n], s = +-1 from the
 * tile bits (hf_tbn.tiling order: LSB first, set bit = +1), tile row n starting at bit
 * (row0 + n) * K with K % 8 == 0, so every row starts on a byte.
 *
 * The out/p tile products are computed once and written p times. A tile byte covers 8 inputs;
 * for each group of 8 inputs the 256 signed sums (or, for few tile rows, the 16 of each half)
 * are tabulated once per block of rows of x (16 rows as one vector; a single row of x,
 * decoding, as scalars), and each tile byte then adds its table entry: one vector add per 8
 * weights instead of 8 multiply-adds per row of x.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define CHUNK_BYTES (256 * 1024)
#define ROW_BLOCK 8
/* Tile rows from which one 256-entry byte table per byte position (one lookup per tile byte,
 * 256 more entries to build) beats two 16-entry nibble tables (two lookups per byte). For 16
 * rows of x an entry is a vector add and store, as dear as a lookup: 256 + rows = 2 rows at
 * 224 rows. For a single row the 256 entries are 16 vector adds and stores (about 50
 * instructions), against 3 saved per tile row: paid back from 16 rows. */
#define WIDE_TABLE_ROWS_16 224
#define WIDE_TABLE_ROWS_1 16
#define ALIGNMENT 64

/* Per calling thread scratch space, grown on demand (calls are frequent and small: no malloc each). */
static _Thread_local void *scratch;
static _Thread_local size_t scratch_bytes;

static void *scratch_alloc(size_t bytes) {
    bytes = (bytes + ALIGNMENT - 1) / ALIGNMENT * ALIGNMENT;
    if (bytes > scratch_bytes) {
        free(scratch);
        scratch = aligned_alloc(ALIGNMENT, bytes);
        scratch_bytes = scratch == NULL ? 0 : bytes;
    }
    return scratch;
}

#define NAME(base) base##_16
#define LANES 16
#define WIDE_TABLE_ROWS WIDE_TABLE_ROWS_16
#include "tbn_lut_lanes.h"
#undef WIDE_TABLE_ROWS
#undef LANES
#undef NAME

#define NAME(base) base##_1
#define LANES 1
#define WIDE_TABLE_ROWS WIDE_TABLE_ROWS_1
#include "tbn_lut_lanes.h"
#undef WIDE_TABLE_ROWS
#undef LANES
#undef NAME

#if defined(__AVX512F__)
#include "tbn_lut_avx512.h"
/* Blocks of fewer rows of x than this go row by row through the AVX-512 single-row kernel (measured:
 * see docs/kernels.md): a whole small input, or the ragged last block of a larger one. */
#define AVX512_ROWS 8
#endif

/* Rows [m0, m0 + lanes) of x, lanes <= 16: the kernel that suits the block's size. */
static int lut_block(const float *x, int64_t m0, int64_t lanes, int64_t k, int64_t ldx, const uint8_t *tile,
                     int64_t rows, const float *alpha, int64_t p, const float *bias, float *y, int64_t ldy,
                     int threads) {
#if defined(__AVX512F__)
    if (lanes < AVX512_ROWS) {
        for (int64_t r = m0; r < m0 + lanes; ++r) {
            const int status = lut_row_avx512(x + r * ldx, k, tile, rows, alpha, p, bias, y + r * ldy, threads);
            if (status) return status;
        }
        return 0;
    }
#endif
    return lanes == 1 ? lut_block_1(x, m0, 1, k, ldx, tile, rows, alpha, p, bias, y, ldy, threads)
                      : lut_block_16(x, m0, lanes, k, ldx, tile, rows, alpha, p, bias, y, ldy, threads);
}

/* 0 on success, -1 when scratch memory cannot be allocated, -2 when k is not a multiple of 8. */
int tbn_lut_linear(const float *x, int64_t m, int64_t k, int64_t ldx, const uint8_t *bits, int64_t rows,
                   int64_t row0, const float *alpha, int64_t p, const float *bias, float *y, int64_t ldy,
                   int threads) {
    if (k % 8 != 0) return -2;
    const uint8_t *tile = bits + row0 * (k / 8);
    for (int64_t m0 = 0; m0 < m; m0 += 16) {
        const int status = lut_block(x, m0, m - m0 < 16 ? m - m0 : 16, k, ldx, tile, rows, alpha, p, bias, y, ldy,
                                     threads);
        if (status) return status;
    }
    return 0;
}
