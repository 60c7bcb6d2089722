/* BatchNorm (training mode) fused with the ReLU and the residual add that follow it, for float32
 * channels-last tensors on CPU: selfsup/models/cpu_norm.py builds this file and calls it through ctypes.
 *
 * A channels-last tensor of shape (N, C, H, W) is a matrix of M = N*H*W rows of C channels. Per pass over
 * memory, torch's kernels would read or write the activation 13 times for a BatchNorm, a ReLU and their
 * backward; these read or write it 8 times (5 when there is no residual: the backward then recomputes the
 * ReLU's mask from x instead of reading the output).
 *
 *   y  = relu(x * scale + shift [+ residual])              scale = weight / std, shift = bias - mean * scale
 *   g  = dy where y > 0 (where not(v <= 0): NaN propagates as in torch), else 0
 *   dx = a * g + b * (x - mean) + k                        a, b, k per channel, from sum(g), sum(g * (x - mean))
 *
 * Per-channel sums are accumulated in double, one partial per thread, added in thread order: the result
 * depends on the thread count, not on timing.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

typedef int64_t i64;

/* Thread t's share [*begin, *end) of M rows, for a static split that does not depend on OpenMP's. */
static void share(i64 m, int t, int nt, i64 *begin, i64 *end)
{
    *begin = m * t / nt;
    *end = m * (t + 1) / nt;
}

/* Per-channel sums are added in float over blocks of BLOCK rows, then into double: the float partials stay
 * in L1 and vectorize without a conversion per element (2-3x faster than double throughout). */
#define BLOCK 16

/* Flushes the float block sums fs, fp (c each) into the double sums s, p and zeroes them. */
static void flush(float *fs, float *fp, double *s, double *p, i64 c)
{
    for (i64 j = 0; j < c; j++) {
        s[j] += fs[j];
        p[j] += fp[j];
        fs[j] = fp[j] = 0.0f;
    }
}

/* Two per-channel sums, a and b, accumulated per thread: thread t's float block sums at scratch + 2ct (a, then
 * b), its double sums at partials + 2ct. */
typedef struct {
    double *partials;
    float *scratch;
} sums;

static int sums_alloc(sums *s, int nt, i64 c)
{
    s->partials = calloc((size_t)nt * 2 * c, sizeof(double));
    s->scratch = calloc((size_t)nt * 2 * c, sizeof(float));
    return s->partials && s->scratch;
}

/* Adds the threads' partials in thread order into a and b (c each), frees s, returns 0 (-1 if not ok). */
static int sums_finish(sums *s, int ok, int nt, i64 c, double *a, double *b)
{
    if (ok) {
        memset(a, 0, c * sizeof(double));
        memset(b, 0, c * sizeof(double));
        for (int t = 0; t < nt; t++)
            for (i64 j = 0; j < c; j++) {
                a[j] += s->partials[t * 2 * c + j];
                b[j] += s->partials[t * 2 * c + c + j];
            }
    }
    free(s->scratch);
    free(s->partials);
    return ok ? 0 : -1;
}

/* sum[c] = sum over rows of x - pivot, sq[c] = sum of (x - pivot)^2. With a pivot near the mean (a row of x),
 * E[d^2] - E[d]^2 does not cancel when a channel's mean is large against its spread. Returns 0, or -1 if out
 * of memory. */
int bn_stats(const float *x, const float *pivot, i64 m, i64 c, double *sum, double *sq, int nt)
{
    sums acc;
    int ok = sums_alloc(&acc, nt, c);
    if (ok) {
#pragma omp parallel num_threads(nt)
        {
            int t = omp_get_thread_num();
            i64 begin, end;
            share(m, t, omp_get_num_threads(), &begin, &end);
            double *s = acc.partials + (i64)t * 2 * c, *q = s + c;
            float *restrict fs = acc.scratch + (i64)t * 2 * c, *restrict fq = fs + c;
            for (i64 block = begin; block < end; block += BLOCK) {
                i64 stop = block + BLOCK < end ? block + BLOCK : end;
                for (i64 i = block; i < stop; i++) {
                    const float *restrict row = x + i * c;
                    for (i64 j = 0; j < c; j++) {
                        float v = row[j] - pivot[j];
                        fs[j] += v;
                        fq[j] += v * v;
                    }
                }
                flush(fs, fq, s, q, c);
            }
        }
    }
    return sums_finish(&acc, ok, nt, c, sum, sq);
}

/* y = x * scale + shift (+ residual), then max(., 0) if relu. residual may be NULL; y may alias x. */
void bn_forward(const float *x, const float *residual, const float *scale, const float *shift, float *y,
                i64 m, i64 c, int relu, int nt)
{
#pragma omp parallel num_threads(nt)
    {
        i64 begin, end;
        share(m, omp_get_thread_num(), omp_get_num_threads(), &begin, &end);
        for (i64 i = begin; i < end; i++) {
            const float *xr = x + i * c, *rr = residual ? residual + i * c : NULL;
            float *yr = y + i * c;
            if (rr && relu)
                for (i64 j = 0; j < c; j++) {
                    float v = fmaf(xr[j], scale[j], shift[j]) + rr[j];
                    yr[j] = v < 0.0f ? 0.0f : v;
                }
            else if (rr)
                for (i64 j = 0; j < c; j++)
                    yr[j] = fmaf(xr[j], scale[j], shift[j]) + rr[j];
            else if (relu)
                for (i64 j = 0; j < c; j++) {
                    float v = fmaf(xr[j], scale[j], shift[j]);
                    yr[j] = v < 0.0f ? 0.0f : v;
                }
            else
                for (i64 j = 0; j < c; j++)
                    yr[j] = fmaf(xr[j], scale[j], shift[j]);
        }
    }
}

/* How the ReLU's mask is known in the backward pass. */
enum { NO_RELU = 0, MASK_FROM_X = 1, MASK_FROM_Y = 2 };

/* The ReLU's gradient at one element: dy where the output was not <= 0. MASK_FROM_X recomputes the output
 * from x exactly as bn_forward computed it (no residual); MASK_FROM_Y reads it. */
#define MASKED(mode, dy, x, y, scale, shift) \
    ((mode) == NO_RELU ? (dy) : ((mode) == MASK_FROM_X ? fmaf(x, scale, shift) : (y)) <= 0.0f ? 0.0f : (dy))

static inline __attribute__((always_inline)) void reduce_rows(
    const float *restrict dy, const float *restrict x, const float *restrict y, const float *restrict scale,
    const float *restrict shift, const float *restrict center, float *restrict dres, i64 begin, i64 end, i64 c,
    const int mode,
    float *restrict fs, float *restrict fp, double *s, double *p)
{
    for (i64 block = begin; block < end; block += BLOCK) {
        i64 stop = block + BLOCK < end ? block + BLOCK : end;
        for (i64 i = block; i < stop; i++) {
            const float *restrict dr = dy + i * c, *restrict xr = x + i * c, *restrict yr = y + (y ? i * c : 0);
            float *restrict gr = dres + (dres ? i * c : 0);
            for (i64 j = 0; j < c; j++) {
                float g = MASKED(mode, dr[j], xr[j], yr[j], scale[j], shift[j]);
                if (dres)
                    gr[j] = g;
                fs[j] += g;
                fp[j] += g * (xr[j] - center[j]);
            }
        }
        flush(fs, fp, s, p, c);
    }
}

/* sum_g[c] = sum of g, sum_gx[c] = sum of g * (x - center), and dres = g if dres is not NULL (then y is given).
 * Returns 0, or -1 if out of memory. */
int bn_backward_reduce(const float *dy, const float *x, const float *y, const float *scale, const float *shift,
                       const float *center, float *dres, i64 m, i64 c, int relu, double *sum_g, double *sum_gx, int nt)
{
    sums acc;
    int ok = sums_alloc(&acc, nt, c);
    int mode = !relu ? NO_RELU : y ? MASK_FROM_Y : MASK_FROM_X;
    if (ok) {
#pragma omp parallel num_threads(nt)
        {
            int t = omp_get_thread_num();
            i64 begin, end;
            share(m, t, omp_get_num_threads(), &begin, &end);
            double *s = acc.partials + (i64)t * 2 * c, *p = s + c;
            float *fs = acc.scratch + (i64)t * 2 * c, *fp = fs + c;
            if (mode == NO_RELU)
                reduce_rows(dy, x, NULL, scale, shift, center, NULL, begin, end, c, NO_RELU, fs, fp, s, p);
            else if (mode == MASK_FROM_X)
                reduce_rows(dy, x, NULL, scale, shift, center, NULL, begin, end, c, MASK_FROM_X, fs, fp, s, p);
            else if (dres)
                reduce_rows(dy, x, y, scale, shift, center, dres, begin, end, c, MASK_FROM_Y, fs, fp, s, p);
            else
                reduce_rows(dy, x, y, scale, shift, center, NULL, begin, end, c, MASK_FROM_Y, fs, fp, s, p);
        }
    }
    return sums_finish(&acc, ok, nt, c, sum_g, sum_gx);
}

static inline __attribute__((always_inline)) void input_rows(
    const float *dy, const float *x, const float *y, const float *scale, const float *shift, const float *a,
    const float *b, const float *k, const float *center, float *dx, i64 begin, i64 end, i64 c, const int mode)
{
    for (i64 i = begin; i < end; i++) {
        const float *dr = dy + i * c, *xr = x + i * c, *yr = y + (y ? i * c : 0);
        float *out = dx + i * c;
        for (i64 j = 0; j < c; j++) {
            float g = MASKED(mode, dr[j], xr[j], yr[j], scale[j], shift[j]);
            out[j] = fmaf(a[j], g, fmaf(b[j], xr[j] - center[j], k[j]));
        }
    }
}

/* dx = a * g + b * (x - center) + k, g the masked gradient (y given: the mask is read from it). */
void bn_backward_input(const float *dy, const float *x, const float *y, const float *scale, const float *shift,
                       const float *a, const float *b, const float *k, const float *center, float *dx, i64 m, i64 c,
                       int relu, int nt)
{
    int mode = !relu ? NO_RELU : y ? MASK_FROM_Y : MASK_FROM_X;
#pragma omp parallel num_threads(nt)
    {
        i64 begin, end;
        share(m, omp_get_thread_num(), omp_get_num_threads(), &begin, &end);
        if (mode == NO_RELU)
            input_rows(dy, x, NULL, scale, shift, a, b, k, center, dx, begin, end, c, NO_RELU);
        else if (mode == MASK_FROM_X)
            input_rows(dy, x, NULL, scale, shift, a, b, k, center, dx, begin, end, c, MASK_FROM_X);
        else
            input_rows(dy, x, y, scale, shift, a, b, k, center, dx, begin, end, c, MASK_FROM_Y);
    }
}
