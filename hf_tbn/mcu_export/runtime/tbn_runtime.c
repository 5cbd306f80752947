/* Kernels of the hf-tbn microcontroller runtime; see tbn_runtime.h. */
#include "tbn_runtime.h"

#include <stddef.h>

/* t[v] = sum_i (bit i of v ? x[i] : -x[i]) for the 16 nibbles v: 8 sums of pairs, and
 * t[15 - v] = -t[v] for the other 8. */
static inline void tbn_rt_nibble_table(const float *x, float *t) {
    const float s01 = x[0] + x[1], d01 = x[0] - x[1], s23 = x[2] + x[3], d23 = x[2] - x[3];
    const float t15 = s01 + s23, t14 = s23 - d01, t13 = d01 + s23, t12 = s23 - s01;
    const float t11 = s01 - d23, t9 = d01 - d23, t7 = s01 + d23, t5 = d01 + d23;
    t[0] = -t15;
    t[1] = -t14;
    t[2] = -t13;
    t[3] = -t12;
    t[4] = -t11;
    t[5] = t5;
    t[6] = -t9;
    t[7] = t7;
    t[8] = -t7;
    t[9] = t9;
    t[10] = -t5;
    t[11] = t11;
    t[12] = t12;
    t[13] = t13;
    t[14] = t14;
    t[15] = t15;
}

/* t[v] for the 4 pairs v of signs of x[0], x[1]: -x0 - x1, x0 - x1, x1 - x0, x0 + x1. */
static inline void tbn_rt_pair_table(const float *x, float *t) {
    const float s = x[0] + x[1], d = x[0] - x[1];
    t[0] = -s;
    t[1] = d;
    t[2] = -d;
    t[3] = s;
}

/* Tables of the inputs x[0, n) and of zeros after them up to whole halfwords (16 inputs), so that
 * a row's padding bits add nothing: for TBN_RT_NIBBLE the 16 sums t[16 q + v] of each group q
 * of 4 inputs, for TBN_RT_PAIR the 4 sums t[4 q + v] of each pair q. */
static void tbn_rt_tables(const float *x, uint32_t n, int kind, float *t) {
    const uint32_t group = kind == TBN_RT_PAIR ? 2u : 4u, end = (n + 15u) / 16u * 16u;
    float padded[4];
    uint32_t i = 0, j;
    if (kind == TBN_RT_PAIR) {
        for (; i + 2u <= n; i += 2u, t += 4) tbn_rt_pair_table(x + i, t);
    } else {
        for (; i + 4u <= n; i += 4u, t += 16) tbn_rt_nibble_table(x + i, t);
    }
    for (; i < end; i += group, t += 1u << group) {
        for (j = 0; j < group; ++j) padded[j] = i + j < n ? x[i + j] : 0.0f;
        if (kind == TBN_RT_PAIR) {
            tbn_rt_pair_table(padded, t);
        } else {
            tbn_rt_nibble_table(padded, t);
        }
    }
}

/* acc += the 4 nibble lookups of halfword v in the tables tb[0 .. 64). */
#define TBN_RT_HALFWORD(acc, tb, v)              \
    do {                                         \
        (acc) += (tb)[(v) & 15u];                \
        (acc) += (tb)[16u + (((v) >> 4) & 15u)]; \
        (acc) += (tb)[32u + (((v) >> 8) & 15u)]; \
        (acc) += (tb)[48u + ((v) >> 12)];        \
    } while (0)

/* acc += the 8 pair lookups of halfword v in the tables tb[0 .. 32). */
#define TBN_RT_HALFWORD_PAIRS(acc, tb, v)        \
    do {                                         \
        (acc) += (tb)[(v) & 3u];                 \
        (acc) += (tb)[4u + (((v) >> 2) & 3u)];   \
        (acc) += (tb)[8u + (((v) >> 4) & 3u)];   \
        (acc) += (tb)[12u + (((v) >> 6) & 3u)];  \
        (acc) += (tb)[16u + (((v) >> 8) & 3u)];  \
        (acc) += (tb)[20u + (((v) >> 10) & 3u)]; \
        (acc) += (tb)[24u + (((v) >> 12) & 3u)]; \
        (acc) += (tb)[28u + ((v) >> 14)];        \
    } while (0)

/* y[r * y_step] (+)= tile row r applied to the tables t: `lookups` table entries, one per BITS
 * inputs (nibble tables: 16 entries per 4 inputs; pair tables: 4 per 2, cheaper to build, for few
 * rows). HALFWORD adds the lookups of one halfword of the row, whose tables take ENTRIES floats; a
 * row is `stride` halfwords, read four at a time while it lasts (2-4% fewer instructions on the
 * MLP's 49-halfword rows), then lookup by lookup for the last part of a halfword. */
#define TBN_RT_LOOKUP(name, HALFWORD, ENTRIES, BITS)                                                          \
    static void name(const float *t, uint32_t lookups, const uint16_t *tile, uint32_t stride, uint32_t rows,  \
                     float *y, uint32_t y_step, int accumulate) {                                             \
        const uint32_t halfwords = lookups / (16u / (BITS)), tail = lookups % (16u / (BITS));                 \
        uint32_t r, k;                                                                                        \
        for (r = 0; r < rows; ++r, tile += stride, y += y_step) {                                             \
            const uint16_t *w = tile;                                                                         \
            const float *tb = t;                                                                              \
            float acc = accumulate ? *y : 0.0f;                                                               \
            for (k = halfwords; k >= 4u; k -= 4u, w += 4, tb += 4u * (ENTRIES)) {                             \
                const uint32_t v0 = w[0], v1 = w[1], v2 = w[2], v3 = w[3];                                    \
                HALFWORD(acc, tb, v0);                                                                        \
                HALFWORD(acc, tb + (ENTRIES), v1);                                                            \
                HALFWORD(acc, tb + 2u * (ENTRIES), v2);                                                       \
                HALFWORD(acc, tb + 3u * (ENTRIES), v3);                                                       \
            }                                                                                                 \
            for (; k != 0; --k, tb += (ENTRIES)) {                                                            \
                const uint32_t v = *w++;                                                                      \
                HALFWORD(acc, tb, v);                                                                         \
            }                                                                                                 \
            if (tail != 0u) {                                                                                 \
                uint32_t v = *w;                                                                              \
                for (k = tail; k != 0; --k, v >>= (BITS), tb += 1u << (BITS)) acc += tb[v & ((1u << (BITS)) - 1u)]; \
            }                                                                                                 \
            *y = acc;                                                                                         \
        }                                                                                                     \
    }

TBN_RT_LOOKUP(tbn_rt_lookup_nibble, TBN_RT_HALFWORD, 64u, 4u)
TBN_RT_LOOKUP(tbn_rt_lookup_pair, TBN_RT_HALFWORD_PAIRS, 32u, 2u)

void tbn_rt_linear_tile(const float *x, uint32_t in, uint32_t rows, const uint16_t *tile, int kind, uint32_t chunk,
                        float *tables, float *y) {
    const uint32_t stride = (in + 15u) / 16u;
    uint32_t h0;
    for (h0 = 0; h0 < stride; h0 += chunk) {
        const uint32_t n = in - 16u * h0 < 16u * chunk ? in - 16u * h0 : 16u * chunk;
        const uint32_t lookups = (n + 15u) / 16u * (kind == TBN_RT_PAIR ? 8u : 4u); /* whole halfwords */
        tbn_rt_tables(x + 16u * h0, n, kind, tables);
        if (kind == TBN_RT_PAIR) {
            tbn_rt_lookup_pair(tables, lookups, tile + h0, stride, rows, y, 1u, h0 != 0u);
        } else {
            tbn_rt_lookup_nibble(tables, lookups, tile + h0, stride, rows, y, 1u, h0 != 0u);
        }
    }
}

void tbn_rt_linear_f32(const float *x, uint32_t in, uint32_t rows, const float *w, float *y) {
    uint32_t r, j;
    for (r = 0; r < rows; ++r, w += in) {
        float acc = 0.0f;
        for (j = 0; j < in; ++j) {
            acc += w[j] * x[j];
        }
        y[r] = acc;
    }
}

/* The o in [first, end), o < out, whose index o * stride + offset along one axis is inside [0, in):
 * output positions for a tap, or taps for an output position. */
static void tbn_rt_valid(int32_t offset, uint32_t stride, uint32_t in, uint32_t out, uint32_t *first, uint32_t *end) {
    const int32_t last = (int32_t)in - 1 - offset;
    uint32_t f = offset >= 0 ? 0u : ((uint32_t)(-offset) + stride - 1u) / stride;
    uint32_t e = last < 0 ? 0u : (uint32_t)last / stride + 1u;
    e = e < out ? e : out;
    *first = f;
    *end = e > f ? e : f;
}

/* y[r * plane + ox] for the out_w windows of one output row when a window is one run of at most 4
 * nibbles (e.g. a first layer's single channel, 3x3): a tile row's table offsets then stay in
 * registers along the output row, window ox starting `step` floats of tables after window ox - 1. */
static void tbn_rt_short_rows(const float *t, uint32_t step, uint32_t nibbles, const uint16_t *tile, uint32_t stride,
                              uint32_t rows, uint32_t out_w, float *y, uint32_t plane) {
    uint32_t r, ox;
    for (r = 0; r < rows; ++r, tile += stride, y += plane) {
        const uint32_t v = *tile;
        const uint32_t o0 = v & 15u, o1 = 16u + ((v >> 4) & 15u), o2 = 32u + ((v >> 8) & 15u), o3 = 48u + (v >> 12);
        const float *tb = t;
        for (ox = 0; ox < out_w; ++ox, tb += step) {
            float acc = tb[o0];
            if (nibbles > 1u) acc += tb[o1];
            if (nibbles > 2u) acc += tb[o2];
            if (nibbles > 3u) acc += tb[o3];
            y[ox] = acc;
        }
    }
}

void tbn_rt_conv2d_tile(const float *x, const tbn_rt_geom_t *g, const uint16_t *tile, uint32_t groups,
                        uint32_t chunk, float *scratch, float *y) {
    const uint32_t in_plane = (uint32_t)g->in_h * g->in_w, plane = (uint32_t)g->out_h * g->out_w;
    const uint32_t column = 16u * groups;                          /* floats of one input column's tables */
    const uint32_t stride = ((uint32_t)g->k_w * groups + 3u) / 4u; /* halfwords of a tile row */
    const uint32_t reach = (uint32_t)(g->k_w - 1u) * g->dil_w + 1u;  /* padded columns one window spans */
    const int short_rows = g->dil_w == 1u && g->k_w * groups <= 4u;
    float *const v = scratch, *const ring = scratch + 4u * groups;
    uint32_t oy, ox0, ox, c, ky, ic, kx, i;
    for (i = 0; i < 4u * groups; ++i) v[i] = 0.0f;
    for (oy = 0; oy < g->out_h; ++oy) {
        const int32_t iy0 = (int32_t)(oy * g->stride_h) - g->pad_h;
        uint32_t ky0, ky1;
        tbn_rt_valid(iy0, g->dil_h, g->in_h, g->k_h, &ky0, &ky1);
        for (ox0 = 0; ox0 < g->out_w; ox0 += chunk) {
            const uint32_t n = g->out_w - ox0 < chunk ? g->out_w - ox0 : chunk;
            const uint32_t c_first = ox0 * g->stride_w, c_end = (ox0 + n - 1u) * g->stride_w + reach;
            /* ring[c - c_first]: the tables of padded input column c, zeros for a padding column */
            for (c = c_first; c < c_end; ++c) {
                float *const t = ring + (c - c_first) * column;
                if (c < g->pad_w || c >= (uint32_t)g->pad_w + g->in_w) {
                    for (i = 0; i < column; ++i) t[i] = 0.0f;
                    continue;
                }
                /* v: the window column (ky, ic) at input column c - pad_w, zeros above / below the input */
                for (ky = 0; ky < g->k_h; ++ky) {
                    float *const vk = v + ky * g->in_c;
                    if (ky < ky0 || ky >= ky1) {
                        for (ic = 0; ic < g->in_c; ++ic) vk[ic] = 0.0f;
                    } else {
                        const float *const xp = x + (uint32_t)(iy0 + (int32_t)(ky * g->dil_h)) * g->in_w + c - g->pad_w;
                        for (ic = 0; ic < g->in_c; ++ic) vk[ic] = xp[ic * in_plane];
                    }
                }
                for (i = 0; i < groups; ++i) tbn_rt_nibble_table(v + 4u * i, t + 16u * i);
            }
            if (short_rows) {
                tbn_rt_short_rows(ring, g->stride_w * column, g->k_w * groups, tile, stride, g->out_c, n,
                                  y + oy * g->out_w + ox0, plane);
                continue;
            }
            for (ox = ox0; ox < ox0 + n; ++ox) {
                const uint32_t c0 = ox * g->stride_w; /* padded column of the window's first tap */
                uint32_t kx0 = 0, kx1 = g->k_w, span;
                if (groups % 4u == 0u) { /* columns of whole halfwords: the run can skip the padding columns */
                    uint32_t first, end;
                    tbn_rt_valid((int32_t)c0 - g->pad_w, g->dil_w, g->in_w, g->k_w, &first, &end);
                    kx0 = first < end ? first : 0u;
                    kx1 = first < end ? end : g->k_w;
                }
                span = g->dil_w == 1u ? kx1 - kx0 : 1u;
                for (kx = kx0; kx < kx1; kx += span) {
                    tbn_rt_lookup_nibble(ring + (c0 - c_first + kx * g->dil_w) * column, span * groups,
                                         tile + kx * groups / 4u, stride, g->out_c, y + oy * g->out_w + ox, plane,
                                         kx != kx0);
                }
            }
        }
    }
}

/* Weight-stationary loop nest: for each output channel and tap, the weight is read once
 * and applied to every output position the tap reaches, so the inner loop has no bounds
 * checks. Each output sums its taps in (ic, ky, kx) order. */
void tbn_rt_conv2d_f32(const float *x, const tbn_rt_geom_t *g, const float *w, float *y) {
    const uint32_t plane = (uint32_t)g->out_h * g->out_w, in_plane = (uint32_t)g->in_h * g->in_w;
    uint32_t oc, ic, ky, kx, oy, ox, idx = 0;
    for (oc = 0; oc < g->out_c; ++oc) {
        float *yc = y + oc * plane;
        for (ox = 0; ox < plane; ++ox) yc[ox] = 0.0f;
        for (ic = 0; ic < g->in_c; ++ic) {
            const float *xc = x + ic * in_plane;
            for (ky = 0; ky < g->k_h; ++ky) {
                const int32_t off_y = (int32_t)(ky * g->dil_h) - g->pad_h;
                uint32_t oy0, oy1;
                tbn_rt_valid(off_y, g->stride_h, g->in_h, g->out_h, &oy0, &oy1);
                for (kx = 0; kx < g->k_w; ++kx, ++idx) {
                    const int32_t off_x = (int32_t)(kx * g->dil_w) - g->pad_w;
                    const float v = w[idx];
                    uint32_t ox0, ox1;
                    tbn_rt_valid(off_x, g->stride_w, g->in_w, g->out_w, &ox0, &ox1);
                    for (oy = oy0; oy < oy1; ++oy) {
                        const float *xr = xc + (uint32_t)((int32_t)(oy * g->stride_h) + off_y) * g->in_w;
                        float *yr = yc + oy * g->out_w;
                        for (ox = ox0; ox < ox1; ++ox) {
                            yr[ox] += v * xr[(int32_t)(ox * g->stride_w) + off_x];
                        }
                    }
                }
            }
        }
    }
}

void tbn_rt_copies(float *y, uint32_t rows, uint32_t spatial, uint32_t p, const float *scale,
                   int scale_per_channel, const float *bias, int relu) {
    const uint32_t block = rows * spatial;
    uint32_t i = p;
    /* Last copy first: copies i >= 1 never overlap the tile rows in y[0, block), and
     * copy 0 rewrites each element from itself, so the whole update is in place. */
    while (i-- > 0) {
        float *dst = y + i * block;
        uint32_t r, s;
        for (r = 0; r < rows; ++r) {
            const uint32_t c = i * rows + r;
            const float a = scale == NULL ? 1.0f : scale[scale_per_channel ? c : i];
            const float b = bias == NULL ? 0.0f : bias[c];
            for (s = 0; s < spatial; ++s) {
                const float v = y[r * spatial + s] * a + b;
                dst[r * spatial + s] = relu && v < 0.0f ? 0.0f : v;
            }
        }
    }
}

void tbn_rt_combine(const float *x, uint32_t block, uint32_t p, const float *alpha, float *y) {
    uint32_t i, j;
    for (j = 0; j < block; ++j) {
        y[j] = alpha[0] * x[j];
    }
    for (i = 1; i < p; ++i) {
        const float a = alpha[i];
        const float *xi = x + i * block;
        for (j = 0; j < block; ++j) {
            y[j] += a * xi[j];
        }
    }
}

void tbn_rt_affine(float *y, uint32_t channels, uint32_t spatial, const float *scale, const float *shift) {
    uint32_t c, s;
    for (c = 0; c < channels; ++c) {
        for (s = 0; s < spatial; ++s) {
            y[c * spatial + s] = y[c * spatial + s] * scale[c] + shift[c];
        }
    }
}

void tbn_rt_relu(float *y, uint32_t n) {
    uint32_t i;
    for (i = 0; i < n; ++i) {
        if (y[i] < 0.0f) y[i] = 0.0f;
    }
}

/* Max (average = 0) or average pooling over the window, clipped to the input as in torch (which
 * keeps every window at least one input wide: padding is at most half the kernel). */
static void tbn_rt_pool2d(const float *x, const tbn_rt_geom_t *g, int average, int count_include_pad, float *y) {
    const int32_t in_h = (int32_t)g->in_h, in_w = (int32_t)g->in_w;
    uint32_t c, oy, ox;
    for (c = 0; c < g->out_c; ++c) {
        const float *xc = x + c * (uint32_t)in_h * (uint32_t)in_w;
        for (oy = 0; oy < g->out_h; ++oy) {
            const int32_t y0 = (int32_t)(oy * g->stride_h) - g->pad_h;
            const int32_t padded_y1 = y0 + g->k_h < in_h + g->pad_h ? y0 + g->k_h : in_h + g->pad_h;
            const int32_t ya = y0 < 0 ? 0 : y0, yb = padded_y1 < in_h ? padded_y1 : in_h;
            for (ox = 0; ox < g->out_w; ++ox, ++y) {
                const int32_t x0 = (int32_t)(ox * g->stride_w) - g->pad_w;
                const int32_t padded_x1 = x0 + g->k_w < in_w + g->pad_w ? x0 + g->k_w : in_w + g->pad_w;
                const int32_t xa = x0 < 0 ? 0 : x0, xb = padded_x1 < in_w ? padded_x1 : in_w;
                const float *xr = xc + ya * in_w;
                float acc = average ? 0.0f : xr[xa];
                int32_t iy, ix;
                if (average) {
                    for (iy = ya; iy < yb; ++iy, xr += in_w) {
                        for (ix = xa; ix < xb; ++ix) acc += xr[ix];
                    }
                    *y = acc / (float)(count_include_pad ? (padded_y1 - y0) * (padded_x1 - x0) : (yb - ya) * (xb - xa));
                } else {
                    for (iy = ya; iy < yb; ++iy, xr += in_w) {
                        for (ix = xa; ix < xb; ++ix) acc = xr[ix] > acc ? xr[ix] : acc;
                    }
                    *y = acc;
                }
            }
        }
    }
}

void tbn_rt_maxpool2d(const float *x, const tbn_rt_geom_t *g, float *y) {
    tbn_rt_pool2d(x, g, 0, 0, y);
}

void tbn_rt_avgpool2d(const float *x, const tbn_rt_geom_t *g, int count_include_pad, float *y) {
    tbn_rt_pool2d(x, g, 1, count_include_pad, y);
}

void tbn_rt_copy(const float *src, float *dst, uint32_t n) {
    uint32_t i;
    for (i = 0; i < n; ++i) dst[i] = src[i];
}
