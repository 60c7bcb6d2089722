/* Winograd F(4x4, 3x3) transforms for float32 channels-last tensors on CPU: selfsup/models/cpu_conv.py calls
 * them through ctypes (library built by selfsup/models/cpu_kernels.py) in place of a gather, a copy and a
 * 36x36 GEMM per transform. Each reads its input once and writes its output once.
 *
 * Tiles: tile t = (image b, tile row ti, tile column tj), row-major, th = ceil(h / 4), tw = ceil(w / 4). Tile t
 * covers output rows 4 ti .. 4 ti + 3 and reads input rows 4 ti - 1 .. 4 ti + 4 (padding 1: zeros outside).
 * A transformed tensor is 36 planes (p, q) of tiles x channels: plane (p * 6 + q) at offset (p * 6 + q) * tiles * c.
 * The matrices are Lavin & Gray's with points 0, +-1, +-2, as _TRANSFORMS[4] in cpu_conv.py:
 *   B^T = [4 0 -5 0 1 0; 0 -4 -4 1 1 0; 0 4 -4 -1 1 0; 0 -2 -1 2 1 0; 0 2 -1 -2 1 0; 0 4 0 -5 0 1]
 *   A^T = [1 1 1 1 1 0; 0 1 -1 2 -2 0; 0 1 1 4 4 0; 0 1 -1 8 -8 1]
 */
#include <stdint.h>
#include <string.h>
#include <omp.h>

typedef int64_t i64;

#define CB 64 /* channels per block: a tile's 6 x 6 x CB values stay in L1 */

/* r[0..5] = B^T d for d[0..5] (stride s between the d's and between the r's), per channel k < n. */
#define BT_APPLY(r, rs, d, ds, n)                                                                   \
    for (int k = 0; k < (n); k++) {                                                                 \
        float d0 = d[0 * ds + k], d1 = d[1 * ds + k], d2 = d[2 * ds + k], d3 = d[3 * ds + k];       \
        float d4 = d[4 * ds + k], d5 = d[5 * ds + k];                                               \
        r[0 * rs + k] = 4.0f * d0 - 5.0f * d2 + d4;                                                 \
        r[1 * rs + k] = -4.0f * d1 - 4.0f * d2 + d3 + d4;                                           \
        r[2 * rs + k] = 4.0f * d1 - 4.0f * d2 - d3 + d4;                                            \
        r[3 * rs + k] = -2.0f * d1 - d2 + 2.0f * d3 + d4;                                           \
        r[4 * rs + k] = 2.0f * d1 - d2 - 2.0f * d3 + d4;                                            \
        r[5 * rs + k] = 4.0f * d1 - 5.0f * d3 + d5;                                                 \
    }

/* o[0..3] = A^T m for m[0..5]. */
#define AT_APPLY(o, os, m, ms, n)                                                                   \
    for (int k = 0; k < (n); k++) {                                                                 \
        float m0 = m[0 * ms + k], m1 = m[1 * ms + k], m2 = m[2 * ms + k], m3 = m[3 * ms + k];       \
        float m4 = m[4 * ms + k], m5 = m[5 * ms + k];                                               \
        o[0 * os + k] = m0 + m1 + m2 + m3 + m4;                                                     \
        o[1 * os + k] = m1 - m2 + 2.0f * m3 - 2.0f * m4;                                            \
        o[2 * os + k] = m1 + m2 + 4.0f * m3 + 4.0f * m4;                                            \
        o[3 * os + k] = m1 - m2 + 8.0f * m3 - 8.0f * m4 + m5;                                       \
    }

/* u[0..5] = A g for g[0..3] (the adjoint of A^T). */
#define A_APPLY(u, us, g, gs, n)                                                                    \
    for (int k = 0; k < (n); k++) {                                                                 \
        float g0 = g[0 * gs + k], g1 = g[1 * gs + k], g2 = g[2 * gs + k], g3 = g[3 * gs + k];       \
        u[0 * us + k] = g0;                                                                         \
        u[1 * us + k] = g0 + g1 + g2 + g3;                                                          \
        u[2 * us + k] = g0 - g1 + g2 - g3;                                                          \
        u[3 * us + k] = g0 + 2.0f * g1 + 4.0f * g2 + 8.0f * g3;                                     \
        u[4 * us + k] = g0 - 2.0f * g1 + 4.0f * g2 - 8.0f * g3;                                     \
        u[5 * us + k] = g3;                                                                         \
    }

static void tile_of(i64 t, i64 th, i64 tw, i64 *b, i64 *ti, i64 *tj)
{
    *b = t / (th * tw);
    *ti = (t / tw) % th;
    *tj = t % tw;
}

/* dst[i][j][0..cb) (i, j < size; CB floats apart) = channels c0.. of x (n, h, w, c) at image b, row row0 + i,
 * column col0 + j; zeros outside the image. */
static void load_patch(float *dst, int size, const float *x, i64 b, i64 h, i64 w, i64 c, i64 row0, i64 col0,
                       i64 c0, int cb)
{
    for (int i = 0; i < size; i++)
        for (int j = 0; j < size; j++) {
            float *out = dst + (i * size + j) * CB;
            i64 row = row0 + i, col = col0 + j;
            if (row >= 0 && row < h && col >= 0 && col < w)
                memcpy(out, x + ((b * h + row) * w + col) * c + c0, cb * sizeof(float));
            else
                memset(out, 0, cb * sizeof(float));
        }
}

/* Column q of a transformed tile: r[p][0..cb) into plane (p, q) of out (planes `plane` floats apart). */
static void store_column(float *out, i64 plane, i64 t, i64 c, i64 c0, int q, float r[6][CB], int cb)
{
    for (int p = 0; p < 6; p++)
        memcpy(out + (p * 6 + q) * plane + t * c + c0, r[p], cb * sizeof(float));
}

/* V = B^T d B for every 6 x 6 input tile d of x (n, h, w, c). */
void winograd4_input(const float *x, i64 n, i64 h, i64 w, i64 c, float *v, int nt)
{
    i64 th = (h + 3) / 4, tw = (w + 3) / 4, tiles = n * th * tw, plane = tiles * c;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (i64 t = 0; t < tiles; t++) {
        float d[6][6][CB], u[6][6][CB], r[6][CB];
        i64 b, ti, tj;
        tile_of(t, th, tw, &b, &ti, &tj);
        for (i64 c0 = 0; c0 < c; c0 += CB) {
            int cb = c - c0 < CB ? (int)(c - c0) : CB;
            load_patch(&d[0][0][0], 6, x, b, h, w, c, ti * 4 - 1, tj * 4 - 1, c0, cb);
            for (int i = 0; i < 6; i++) { /* along columns: u[i][q] = sum_j B^T[q][j] d[i][j] */
                float *ui = &u[i][0][0];
                const float *di = &d[i][0][0];
                BT_APPLY(ui, CB, di, CB, cb);
            }
            for (int q = 0; q < 6; q++) { /* along rows: V[p][q] = sum_i B^T[p][i] u[i][q] */
                float *rr = &r[0][0];
                const float *uq = &u[0][q][0];
                BT_APPLY(rr, CB, uq, 6 * CB, cb);
                store_column(v, plane, t, c, c0, q, r, cb);
            }
        }
    }
}

/* y (n, h, w, k) = A^T M A for every tile, cropped to h x w. */
void winograd4_output(const float *m, i64 n, i64 h, i64 w, i64 k, float *y, int nt)
{
    i64 th = (h + 3) / 4, tw = (w + 3) / 4, tiles = n * th * tw, plane = tiles * k;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (i64 t = 0; t < tiles; t++) {
        float mm[6][6][CB], s[6][4][CB], o[4][CB];
        i64 b, ti, tj;
        tile_of(t, th, tw, &b, &ti, &tj);
        for (i64 c0 = 0; c0 < k; c0 += CB) {
            int cb = k - c0 < CB ? (int)(k - c0) : CB;
            for (int p = 0; p < 6; p++)
                for (int q = 0; q < 6; q++)
                    memcpy(mm[p][q], m + (p * 6 + q) * plane + t * k + c0, cb * sizeof(float));
            for (int p = 0; p < 6; p++) { /* along q: s[p][j] = sum_q A^T[j][q] M[p][q] */
                float *sp = &s[p][0][0];
                const float *mp = &mm[p][0][0];
                AT_APPLY(sp, CB, mp, CB, cb);
            }
            for (int j = 0; j < 4; j++) { /* along p: y[i][j] = sum_p A^T[i][p] s[p][j] */
                float *oo = &o[0][0];
                const float *sj = &s[0][j][0];
                AT_APPLY(oo, CB, sj, 4 * CB, cb);
                i64 col = tj * 4 + j;
                if (col >= w)
                    continue;
                for (int i = 0; i < 4; i++) {
                    i64 row = ti * 4 + i;
                    if (row < h)
                        memcpy(y + ((b * h + row) * w + col) * k + c0, o[i], cb * sizeof(float));
                }
            }
        }
    }
}

/* out = A g A^T for every 4 x 4 tile g of y's gradient (n, h, w, k), zero outside h x w: the adjoint of
 * winograd4_output, the gradient of M. */
void winograd4_output_adjoint(const float *g, i64 n, i64 h, i64 w, i64 k, float *out, int nt)
{
    i64 th = (h + 3) / 4, tw = (w + 3) / 4, tiles = n * th * tw, plane = tiles * k;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (i64 t = 0; t < tiles; t++) {
        float gg[4][4][CB], u[4][6][CB], r[6][CB];
        i64 b, ti, tj;
        tile_of(t, th, tw, &b, &ti, &tj);
        for (i64 c0 = 0; c0 < k; c0 += CB) {
            int cb = k - c0 < CB ? (int)(k - c0) : CB;
            load_patch(&gg[0][0][0], 4, g, b, h, w, k, ti * 4, tj * 4, c0, cb);
            for (int i = 0; i < 4; i++) { /* along columns: u[i][q] = sum_j A^T[j][q] g[i][j] */
                float *ui = &u[i][0][0];
                const float *gi = &gg[i][0][0];
                A_APPLY(ui, CB, gi, CB, cb);
            }
            for (int q = 0; q < 6; q++) { /* along rows: out[p][q] = sum_i A^T[i][p] u[i][q] */
                float *rr = &r[0][0];
                const float *uq = &u[0][q][0];
                A_APPLY(rr, CB, uq, 6 * CB, cb);
                store_column(out, plane, t, k, c0, q, r, cb);
            }
        }
    }
}
