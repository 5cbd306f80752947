/* The lookup-table kernel for blocks of LANES rows of x; included by tbn_lut.c once per LANES.
 *
 * Expects LANES, WIDE_TABLE_ROWS and NAME(base) (base suffixed with the lane count) to be defined.
 */

#if LANES == 1 /* a plain float: GCC keeps one-element vectors in memory, not registers */
typedef float NAME(vec);
#define LANE(v, l) (v)
#else
typedef float NAME(vec) __attribute__((vector_size(LANES * sizeof(float)), aligned(LANES * sizeof(float))));
#define LANE(v, l) (v)[l]
#endif

/* The tables of one byte of tile (8 inputs x[0..8)): nibble tables t[0..16) for x[0..4) and
 * t[16..32) for x[4..8), t[b] = sum_i (bit i of b ? x[i] : -x[i]); when wide, also the byte
 * table t[32 + b] = t[b & 15] + t[16 + (b >> 4)]. */
static void NAME(build_tables)(const NAME(vec) *x, NAME(vec) *t, int wide) {
    for (int h = 0; h < 2; ++h) {
        const NAME(vec) *xs = x + 4 * h;
        const NAME(vec) lo[4] = {-xs[0] - xs[1], xs[0] - xs[1], xs[1] - xs[0], xs[0] + xs[1]};
        const NAME(vec) hi[4] = {-xs[2] - xs[3], xs[2] - xs[3], xs[3] - xs[2], xs[2] + xs[3]};
        for (int b = 0; b < 16; ++b) t[16 * h + b] = lo[b & 3] + hi[b >> 2];
    }
    if (wide) {
        for (int hi = 0; hi < 16; ++hi) {
            for (int lo = 0; lo < 16; ++lo) t[32 + 16 * hi + lo] = t[lo] + t[16 + hi];
        }
    }
}

/* The signed sum of the 8 inputs of tile byte b: one lookup (wide) or two. */
static inline NAME(vec) NAME(lookup)(const NAME(vec) *t, unsigned b, int wide) {
    return wide ? t[32 + b] : t[b & 15] + t[16 + (b >> 4)];
}

/* Outputs of x rows [m0, m0 + lanes), lanes <= LANES; see tbn_lut_linear. 0 or -1 (no memory). */
static int NAME(lut_block)(const float *x, int64_t m0, int64_t lanes, int64_t k, int64_t ldx, const uint8_t *tile,
                           int64_t rows, const float *alpha, int64_t p, const float *bias, float *y, int64_t ldy,
                           int threads) {
    const int64_t groups = k / 8;
    const int wide = rows >= WIDE_TABLE_ROWS;
    const int64_t entries = wide ? 32 + 256 : 32; /* tables per byte of tile */
    /* Bytes whose tables are built at once: CHUNK_BYTES of tables, so that they stay in the L2 cache. */
    const int64_t chunk_groups = CHUNK_BYTES / (entries * (int64_t)sizeof(NAME(vec)));
    NAME(vec) *xt = scratch_alloc((size_t)(k + rows + chunk_groups * entries) * sizeof(NAME(vec)));
    if (xt == NULL) return -1;
    NAME(vec) *acc = xt + k;
    NAME(vec) *tables = acc + rows;
    float *xt_values = (float *)xt;
    if (lanes < LANES) memset(xt, 0, (size_t)k * sizeof(NAME(vec)));
    for (int64_t l = 0; l < lanes; ++l) {
        const float *xs = x + (m0 + l) * ldx;
        for (int64_t j = 0; j < k; ++j) xt_values[j * LANES + l] = xs[j];
    }
    memset(acc, 0, (size_t)rows * sizeof(NAME(vec)));
    for (int64_t g0 = 0; g0 < groups; g0 += chunk_groups) {
        const int64_t chunk = groups - g0 < chunk_groups ? groups - g0 : chunk_groups;
#pragma omp parallel num_threads(threads) if (threads > 1)
        {
#pragma omp for schedule(static)
            for (int64_t g = 0; g < chunk; ++g) NAME(build_tables)(xt + 8 * (g0 + g), tables + entries * g, wide);
#pragma omp for schedule(static)
            for (int64_t n0 = 0; n0 < rows; n0 += ROW_BLOCK) {
                /* ROW_BLOCK rows at once: independent sums keep the adders busy instead of one
                 * add waiting for the previous one. */
                const int64_t count = rows - n0 < ROW_BLOCK ? rows - n0 : ROW_BLOCK;
                const uint8_t *row = tile + n0 * groups + g0;
                NAME(vec) sum[ROW_BLOCK];
                if (count == ROW_BLOCK) {
                    for (int r = 0; r < ROW_BLOCK; ++r) sum[r] = acc[n0 + r];
                    for (int64_t g = 0; g < chunk; ++g) {
                        const NAME(vec) *t = tables + entries * g;
                        for (int r = 0; r < ROW_BLOCK; ++r) sum[r] += NAME(lookup)(t, row[r * groups + g], wide);
                    }
                    for (int r = 0; r < ROW_BLOCK; ++r) acc[n0 + r] = sum[r];
                } else {
                    for (int64_t r = 0; r < count; ++r) {
                        sum[0] = acc[n0 + r];
                        for (int64_t g = 0; g < chunk; ++g) {
                            sum[0] += NAME(lookup)(tables + entries * g, row[r * groups + g], wide);
                        }
                        acc[n0 + r] = sum[0];
                    }
                }
            }
        }
    }
    for (int64_t l = 0; l < lanes; ++l) {
        float *out = y + (m0 + l) * ldy;
        for (int64_t i = 0; i < p; ++i) {
            const float a = alpha[i];
            float *copy = out + i * rows;
            if (bias == NULL) {
                for (int64_t n = 0; n < rows; ++n) copy[n] = a * LANE(acc[n], l);
            } else {
                const float *b = bias + i * rows;
                for (int64_t n = 0; n < rows; ++n) copy[n] = a * LANE(acc[n], l) + b[n];
            }
        }
    }
    return 0;
}

#undef LANE
