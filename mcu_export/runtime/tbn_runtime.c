/* Kernels of the hf-tbn microcontroller runtime; see tbn_runtime.h. */
#include "tbn_runtime.h"

#include <stddef.h>

/* +-xv for bit idx of a tile (hf_tbn.tiling bit order). */
#define TBN_RT_BIT_TERM(w, idx, xv) ((((w)[(idx) >> 3] >> ((idx) & 7u)) & 1u) ? (xv) : -(xv))

/* +-x for tile bit k of byte b. */
#define TBN_RT_PM(b, k, xv) ((((b) >> (k)) & 1u) ? (xv) : -(xv))

/* Dot product of x[0, n) with tile bits [first, first + n): whole bytes unrolled, the
 * unaligned head and the tail bit by bit. */
static float tbn_rt_dot_bits(const float *x, uint32_t n, const uint8_t *bits, uint32_t first) {
    float acc = 0.0f;
    uint32_t j = 0;
    for (; j < n && ((first + j) & 7u) != 0; ++j) acc += TBN_RT_BIT_TERM(bits, first + j, x[j]);
    for (; j + 8u <= n; j += 8u) {
        const uint32_t b = bits[(first + j) >> 3];
        acc += TBN_RT_PM(b, 0, x[j]);
        acc += TBN_RT_PM(b, 1, x[j + 1]);
        acc += TBN_RT_PM(b, 2, x[j + 2]);
        acc += TBN_RT_PM(b, 3, x[j + 3]);
        acc += TBN_RT_PM(b, 4, x[j + 4]);
        acc += TBN_RT_PM(b, 5, x[j + 5]);
        acc += TBN_RT_PM(b, 6, x[j + 6]);
        acc += TBN_RT_PM(b, 7, x[j + 7]);
    }
    for (; j < n; ++j) acc += TBN_RT_BIT_TERM(bits, first + j, x[j]);
    return acc;
}

void tbn_rt_linear_bits(const float *x, uint32_t in, uint32_t rows, const uint8_t *bits, float *y) {
    uint32_t r;
    for (r = 0; r < rows; ++r) y[r] = tbn_rt_dot_bits(x, in, bits, r * in);
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

/* Output positions [first, end) along one axis whose input index o * stride + offset is inside [0, in). */
static void tbn_rt_valid(int32_t offset, uint32_t stride, uint32_t in, uint32_t out, uint32_t *first, uint32_t *end) {
    const int32_t last = (int32_t)in - 1 - offset;
    uint32_t f = offset >= 0 ? 0u : ((uint32_t)(-offset) + stride - 1u) / stride;
    uint32_t e = last < 0 ? 0u : (uint32_t)last / stride + 1u;
    e = e < out ? e : out;
    *first = f;
    *end = e > f ? e : f;
}

/* Weight-stationary loop nest: for each output channel and tap, the weight (a tile bit as
 * +-1, or a float) is read once and applied to every output position the tap reaches, so
 * the inner loop has no bounds checks. Each output sums its taps in (ic, ky, kx) order. */
void tbn_rt_conv2d(const float *x, const tbn_rt_geom_t *g, const uint8_t *bits, const float *w, float *y) {
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
                    const float v = bits != NULL ? TBN_RT_BIT_TERM(bits, idx, 1.0f) : w[idx];
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
                   int scale_per_channel, const float *bias) {
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
                dst[r * spatial + s] = y[r * spatial + s] * a + b;
            }
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

/* Max (average = 0) or average pooling over the window, clipped to the input as in torch. */
static void tbn_rt_pool2d(const float *x, const tbn_rt_geom_t *g, int average, int count_include_pad, float *y) {
    uint32_t c, oy, ox;
    for (c = 0; c < g->out_c; ++c) {
        const float *xc = x + (uint32_t)c * g->in_h * g->in_w;
        for (oy = 0; oy < g->out_h; ++oy) {
            for (ox = 0; ox < g->out_w; ++ox) {
                const int32_t y0 = (int32_t)(oy * g->stride_h) - g->pad_h;
                const int32_t x0 = (int32_t)(ox * g->stride_w) - g->pad_w;
                const int32_t padded_y1 = y0 + g->k_h < g->in_h + g->pad_h ? y0 + g->k_h : g->in_h + g->pad_h;
                const int32_t padded_x1 = x0 + g->k_w < g->in_w + g->pad_w ? x0 + g->k_w : g->in_w + g->pad_w;
                int32_t iy, ix, count = 0;
                float acc = 0.0f;
                int first = 1;
                for (iy = y0 < 0 ? 0 : y0; iy < padded_y1 && iy < (int32_t)g->in_h; ++iy) {
                    for (ix = x0 < 0 ? 0 : x0; ix < padded_x1 && ix < (int32_t)g->in_w; ++ix) {
                        const float v = xc[(uint32_t)iy * g->in_w + (uint32_t)ix];
                        if (average) {
                            acc += v;
                        } else if (first || v > acc) {
                            acc = v;
                        }
                        first = 0;
                        ++count;
                    }
                }
                if (average) {
                    const int32_t area = count_include_pad ? (padded_y1 - y0) * (padded_x1 - x0) : count;
                    acc /= (float)area;
                }
                y[(c * g->out_h + oy) * g->out_w + ox] = acc;
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
