/* Kernels of the hf-tbn microcontroller runtime; see tbn_runtime.h. */
#include "tbn_runtime.h"

#include <stddef.h>

/* The weight term of one multiply-accumulate: a +-1 tile bit or a float32 weight. */
#define TBN_RT_BIT_TERM(w, idx, xv) ((((w)[(idx) >> 3] >> ((idx) & 7u)) & 1u) ? (xv) : -(xv))
#define TBN_RT_F32_TERM(w, idx, xv) ((w)[idx] * (xv))

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

/* One convolution loop nest, instantiated for both weight kinds. */
#define TBN_RT_DEFINE_CONV2D(NAME, WTYPE, TERM)                                           \
    void NAME(const float *x, const tbn_rt_geom_t *g, const WTYPE *w, float *y) {         \
        uint32_t oc, oy, ox, ic, ky, kx;                                                  \
        const uint32_t taps = (uint32_t)g->in_c * g->k_h * g->k_w;                        \
        for (oc = 0; oc < g->out_c; ++oc) {                                               \
            for (oy = 0; oy < g->out_h; ++oy) {                                           \
                for (ox = 0; ox < g->out_w; ++ox) {                                       \
                    float acc = 0.0f;                                                     \
                    for (ic = 0; ic < g->in_c; ++ic) {                                    \
                        const float *xc = x + (uint32_t)ic * g->in_h * g->in_w;           \
                        for (ky = 0; ky < g->k_h; ++ky) {                                 \
                            int32_t iy = (int32_t)(oy * g->stride_h + ky * g->dil_h) - g->pad_h; \
                            uint32_t idx = oc * taps + (ic * g->k_h + ky) * g->k_w;       \
                            if (iy < 0 || iy >= (int32_t)g->in_h) continue;              \
                            for (kx = 0; kx < g->k_w; ++kx, ++idx) {                      \
                                int32_t ix = (int32_t)(ox * g->stride_w + kx * g->dil_w) - g->pad_w; \
                                if (ix < 0 || ix >= (int32_t)g->in_w) continue;          \
                                acc += TERM(w, idx, xc[(uint32_t)iy * g->in_w + (uint32_t)ix]); \
                            }                                                             \
                        }                                                                 \
                    }                                                                     \
                    y[(oc * g->out_h + oy) * g->out_w + ox] = acc;                        \
                }                                                                         \
            }                                                                             \
        }                                                                                 \
    }

TBN_RT_DEFINE_CONV2D(tbn_rt_conv2d_bits, uint8_t, TBN_RT_BIT_TERM)
TBN_RT_DEFINE_CONV2D(tbn_rt_conv2d_f32, float, TBN_RT_F32_TERM)

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
