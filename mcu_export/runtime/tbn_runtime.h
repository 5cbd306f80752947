/* Kernels of the hf-tbn microcontroller runtime (portable C99, float32, no malloc).
 *
 * A tiled layer is computed with the compute-reuse identity: the kernel applies the
 * out/p-row tile ONCE, writing its rows at the start of the output buffer, then
 * tbn_rt_copies() turns them in place into the p scaled copies (plus bias).
 * Tile bits follow hf_tbn.tiling: element j is bit (j % 8) of byte (j / 8), set = +1.
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

/* y[r] = sum_j T[r][j] x[j] for the rows of a +-1 tile (bits) or a float32 weight. */
void tbn_rt_linear_bits(const float *x, uint32_t in, uint32_t rows, const uint8_t *bits, float *y);
void tbn_rt_linear_f32(const float *x, uint32_t in, uint32_t rows, const float *w, float *y);

/* Convolution of x (in_c, in_h, in_w) with the g->out_c rows of a tile (bits, w NULL)
 * or of a float32 weight (w, bits NULL). */
void tbn_rt_conv2d(const float *x, const tbn_rt_geom_t *g, const uint8_t *bits, const float *w, float *y);

/* In place: y holds rows*spatial tile outputs; writes the p copies, copy i scaled by
 * scale[i] (scale_per_channel = 0) or channel c by scale[c] (= 1, BatchNorm folded),
 * then adds bias[c] when bias is not NULL. scale NULL means 1 (dense layers). */
void tbn_rt_copies(float *y, uint32_t rows, uint32_t spatial, uint32_t p, const float *scale,
                   int scale_per_channel, const float *bias);

/* In place: y[c][s] = y[c][s] * scale[c] + shift[c] (a BatchNorm not folded into a layer). */
void tbn_rt_affine(float *y, uint32_t channels, uint32_t spatial, const float *scale, const float *shift);

void tbn_rt_relu(float *y, uint32_t n);

/* Pooling over the g->k_h x g->k_w window (out_c == in_c). count_include_pad as in torch. */
void tbn_rt_maxpool2d(const float *x, const tbn_rt_geom_t *g, float *y);
void tbn_rt_avgpool2d(const float *x, const tbn_rt_geom_t *g, int count_include_pad, float *y);

void tbn_rt_copy(const float *src, float *dst, uint32_t n);

#endif /* TBN_RUNTIME_H */
