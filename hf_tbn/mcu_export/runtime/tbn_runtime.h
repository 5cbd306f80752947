/* Kernels of the hf-tbn microcontroller runtime (portable C99, float32, no malloc, no libc).
 *
 * A tiled layer is computed with the compute-reuse identity: the kernel applies the
 * out/p-row tile ONCE, writing its rows at the start of the output buffer, then
 * tbn_rt_copies() turns them in place into the p scaled copies (plus bias).
 *
 * Tile layout: row r of the tile (one output of the out/p rows) holds the signs of its
 * `in` weights (Linear: in features; Conv2d: in_c * k_h * k_w in PyTorch's weight order)
 * in stride = ceil(in / 16) uint16 values, element j being bit (j % 16) of value (j / 16),
 * set = +1: the hf_tbn.tiling bit order read as little-endian halfwords, each row padded to
 * whole halfwords (nothing to pad when in % 16 == 0). The tile is never decoded bit by bit:
 * for each group of 4 inputs the kernel builds the table of their 16 signed sums, once, and
 * every tile row adds one entry per nibble (TBN_RT_NIBBLE); for a few rows, where building
 * tables dominates, 4-entry tables of each pair of inputs and one entry per 2 bits
 * (TBN_RT_PAIR). The exporter picks the kind per layer from its row count.
 */
#ifndef TBN_RUNTIME_H
#define TBN_RUNTIME_H

#include <stdint.h>

/* Geometry of a 2-D convolution or pooling window over a CHW tensor (batch 1). */
typedef struct {
    uint16_t in_c, in_h, in_w;
    uint16_t out_c, out_h, out_w;
    uint16_t k_h, k_w, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
} tbn_rt_geom_t;

/* Table kinds of the tile kernels, and the floats of tables 16 inputs need. */
#define TBN_RT_NIBBLE 0
#define TBN_RT_PAIR 1
#define TBN_RT_TABLE_FLOATS(kind) ((kind) == TBN_RT_PAIR ? 32u : 64u) /* per 16 inputs */

/* y[r] = sum_j T[r][j] x[j] for the rows of a tile. The tables of 16 * chunk inputs at a
 * time go to `tables` (chunk * TBN_RT_TABLE_FLOATS(kind) floats). */
void tbn_rt_linear_tile(const float *x, uint32_t in, uint32_t rows, const uint16_t *tile, int kind, uint32_t chunk,
                        float *tables, float *y);

/* y[r] = sum_j w[r][j] x[j] for a float32 weight. */
void tbn_rt_linear_f32(const float *x, uint32_t in, uint32_t rows, const float *w, float *y);

/* Convolution of x (in_c, in_h, in_w) with the g->out_c rows of a tile: per output position
 * the input patch (in = in_c * k_h * k_w floats) is gathered into scratch, the tables of
 * the whole patch follow it (ceil(in / 16) * TBN_RT_TABLE_FLOATS(kind) floats). */
void tbn_rt_conv2d_tile(const float *x, const tbn_rt_geom_t *g, const uint16_t *tile, int kind, float *scratch,
                        float *y);

/* The same convolution for in_c % 16 == 0, the tile's rows in (kx, ky, ic) order: for each output row
 * the nibble tables of the k_h input rows' pixels are built once into `ring` (k_h * in_w * 4 * in_c
 * floats) and serve every tap that reads them; a tile row meets them in runs of adjacent taps. */
void tbn_rt_conv2d_tile_pixels(const float *x, const tbn_rt_geom_t *g, const uint16_t *tile, float *ring, float *y);

/* Convolution of x with a float32 weight (g->out_c, in_c, k_h, k_w). */
void tbn_rt_conv2d_f32(const float *x, const tbn_rt_geom_t *g, const float *w, float *y);

/* In place: y holds rows*spatial tile outputs; writes the p copies, copy i scaled by
 * scale[i] (scale_per_channel = 0) or channel c by scale[c] (= 1, BatchNorm folded),
 * then adds bias[c] when bias is not NULL. scale NULL means 1 (dense layers). */
void tbn_rt_copies(float *y, uint32_t rows, uint32_t spatial, uint32_t p, const float *scale,
                   int scale_per_channel, const float *bias);

/* The input tile layout's first step: y[j] = sum_i alpha[i] x[i * block + j] for j < block, over
 * the p blocks of x (Linear: in / p features each; Conv2d: in_c / p channels of a CHW tensor). */
void tbn_rt_combine(const float *x, uint32_t block, uint32_t p, const float *alpha, float *y);

/* In place: y[c][s] = y[c][s] * scale[c] + shift[c] (a BatchNorm not folded into a layer). */
void tbn_rt_affine(float *y, uint32_t channels, uint32_t spatial, const float *scale, const float *shift);

void tbn_rt_relu(float *y, uint32_t n);

/* Pooling over the g->k_h x g->k_w window (out_c == in_c). count_include_pad as in torch. */
void tbn_rt_maxpool2d(const float *x, const tbn_rt_geom_t *g, float *y);
void tbn_rt_avgpool2d(const float *x, const tbn_rt_geom_t *g, int count_include_pad, float *y);

void tbn_rt_copy(const float *src, float *dst, uint32_t n);

#endif /* TBN_RUNTIME_H */
