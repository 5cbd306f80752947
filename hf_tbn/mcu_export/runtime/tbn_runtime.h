/* Kernels of the hf-tbn microcontroller runtime (portable C99, float32, no malloc, no libc).
 *
 * A tiled layer is computed with the compute-reuse identity: the kernel applies the
 * out/p-row tile ONCE, writing its rows at the start of the output buffer, then
 * tbn_rt_copies() turns them in place into the p scaled copies (plus bias).
 *
 * Tile layout: row r of the tile (one output of the out/p rows) holds the signs of its
 * `in` weights (Linear: in features in order; Conv2d: column by column, see
 * tbn_rt_conv2d_tile) in stride = ceil(in / 16) uint16 values, element j being bit (j % 16) of
 * value (j / 16), set = +1: the hf_tbn.tiling bit order read as little-endian halfwords, each
 * row padded to whole halfwords (nothing to pad when in % 16 == 0). The tile is never decoded
 * bit by bit: for each group of 4 inputs the kernel builds the table of their 16 signed sums,
 * once, and every tile row adds one entry per nibble (TBN_RT_NIBBLE); for a linear layer of a
 * few rows, where building tables dominates, 4-entry tables of each pair of inputs and one
 * entry per 2 bits (TBN_RT_PAIR). The exporter picks the kind per layer from its row count.
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

/* Convolution of x (in_c, in_h, in_w) with the g->out_c rows of a tile. The window's values at one
 * input column, (ky, ic) for the k_h rows an output row reads, are its column: for `chunk` output
 * positions of an output row at a time, the nibble tables of the padded input columns they read
 * (`groups` tables of 4 values, zeros above or below the input and after the k_h * in_c values;
 * all zeros for a padding column) are built once into scratch and serve every window that reads
 * them. A tile row holds, for each kx, the 4 * groups bits of its column in the same (ky, ic)
 * order, so the window is one lookup run of k_w * groups nibbles (with dil_w > 1, whose columns
 * are apart, one run per kx: the exporter then rounds groups up to whole halfwords). Scratch:
 * 4 * groups floats for the column being built, then ((chunk - 1) * stride_w + (k_w - 1) * dil_w
 * + 1) * 16 * groups floats of tables. */
void tbn_rt_conv2d_tile(const float *x, const tbn_rt_geom_t *g, const uint16_t *tile, uint32_t groups,
                        uint32_t chunk, float *scratch, float *y);

/* Convolution of x with a float32 weight (g->out_c, in_c, k_h, k_w). */
void tbn_rt_conv2d_f32(const float *x, const tbn_rt_geom_t *g, const float *w, float *y);

/* In place: y holds rows*spatial tile outputs; writes the p copies, copy i scaled by
 * scale[i] (scale_per_channel = 0) or channel c by scale[c] (= 1, BatchNorm folded),
 * then adds bias[c] when bias is not NULL, then (relu != 0) clamps at 0: a ReLU that follows
 * the layer, fused. scale NULL means 1 (dense layers). */
void tbn_rt_copies(float *y, uint32_t rows, uint32_t spatial, uint32_t p, const float *scale,
                   int scale_per_channel, const float *bias, int relu);

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
