/* Gram matrix of differences from a reference, in one pass over the inputs (float64 accumulation).
 *
 * rv_gram_diff(xs, codes, n, ref, m, out): for n flat arrays xs[0..n) of m elements each (dtype codes:
 * 0 float32, 1 bfloat16, 2 float16, 3 float64), with d_i = x_i - x_ref widened to float64:
 *   out[a * (n-1) + b] = sum_k d_{o_a}[k] d_{o_b}[k]   (o: the indices other than ref, in order)
 *   out[(n-1) * (n-1)] = sum_k x_ref[k]^2
 * Widening float32/bfloat16/float16 to float64 is exact and so is the subtraction, so only the products'
 * summation order differs from a float64 gemm of the explicit differences.
 *
 * Chunk by chunk (a few KiB per input, so the chunk stays in L1), every input's slice is widened once into
 * a small float64 buffer (the differences, then the reference), and register tiles of up to 3 x 3 rows
 * accumulate the products of the lower triangle in 4-lane vectors (GCC/Clang vector extensions: AVX2 with
 * -march=native, SSE2 pairs otherwise). Each chunk's tile sums are added to the totals in a fixed order,
 * so the result depends on the inputs alone, never on threads or timing. Not compiled with -ffast-math:
 * NaN and Inf must propagate to the result, where the caller detects them.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef double v4 __attribute__((vector_size(32)));

#define TB 3 /* tile rows and columns */
#ifndef CHUNK_ELEMS
#define CHUNK_ELEMS 2048 /* per chunk, all inputs together: 16 KiB of float64 rows */
#endif

static inline double as_f64(uint64_t u) {
    double d;
    memcpy(&d, &u, 8);
    return d;
}

static inline double as_f32_wide(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return (double)f;
}

/* float16 -> float64, exact, integer arithmetic only (so a flush-to-zero mode cannot touch subnormals) */
static inline double half_to_f64(uint16_t h) {
    uint64_t e = (h >> 10) & 31u, m = h & 1023u;
    uint64_t bits = e == 31u ? (0x7ffull << 52) | (m << 42) : ((e + 1008u) << 52) | (m << 42);
    double v = e == 0 ? (double)(int32_t)m * 0x1p-24 : as_f64(bits);
    uint64_t u;
    memcpy(&u, &v, 8);
    return as_f64(u | ((uint64_t)(h & 0x8000u) << 48));
}

/* dst[0..c) = x[s..s+c) widened */
static void widen(const void *x, int32_t code, int64_t s, int64_t c, double *restrict dst) {
    switch (code) {
    case 0: {
        const float *p = (const float *)x + s;
        for (int64_t k = 0; k < c; k++) dst[k] = (double)p[k];
        break;
    }
    case 1: {
        const uint16_t *p = (const uint16_t *)x + s;
        for (int64_t k = 0; k < c; k++) dst[k] = as_f32_wide((uint32_t)p[k] << 16);
        break;
    }
    case 2: {
        const uint16_t *p = (const uint16_t *)x + s;
        for (int64_t k = 0; k < c; k++) dst[k] = half_to_f64(p[k]);
        break;
    }
    default: {
        const double *p = (const double *)x + s;
        memcpy(dst, p, (size_t)c * sizeof(double));
        break;
    }
    }
}

static inline double hsum(v4 v) { return (v[0] + v[1]) + (v[2] + v[3]); }

/* t[r * C + c] = sum_k a_r[k] b_c[k] over len (a multiple of 4) elements of 32-byte aligned rows */
#define TILE(R, C)                                                                                       \
    static void tile_##R##x##C(const double *const *a, const double *const *b, int64_t len, double *t) { \
        v4 acc[R][C];                                                                                    \
        memset(acc, 0, sizeof acc);                                                                      \
        for (int64_t k = 0; k < len; k += 4) {                                                           \
            v4 bv[C];                                                                                    \
            for (int c = 0; c < C; c++) bv[c] = *(const v4 *)(b[c] + k);                                 \
            for (int r = 0; r < R; r++) {                                                                \
                v4 av = *(const v4 *)(a[r] + k);                                                         \
                for (int c = 0; c < C; c++) acc[r][c] += av * bv[c];                                     \
            }                                                                                            \
        }                                                                                                \
        for (int r = 0; r < R; r++)                                                                      \
            for (int c = 0; c < C; c++) t[r * C + c] = hsum(acc[r][c]);                                  \
    }
TILE(1, 1)
TILE(1, 2)
TILE(1, 3)
TILE(2, 1)
TILE(2, 2)
TILE(2, 3)
TILE(3, 1)
TILE(3, 2)
TILE(3, 3)

typedef void (*tile_fn)(const double *const *, const double *const *, int64_t, double *);
static const tile_fn TILES[TB][TB] = {
    {tile_1x1, tile_1x2, tile_1x3}, {tile_2x1, tile_2x2, tile_2x3}, {tile_3x1, tile_3x2, tile_3x3}};

/* Returns 0, or -1 when the work buffer cannot be allocated. */
int32_t rv_gram_diff(const void *const *xs, const int32_t *codes, int64_t n, int64_t ref, int64_t m,
                     double *out) {
    int64_t p = n - 1; /* differences */
    int64_t chunk = (CHUNK_ELEMS / n) & ~(int64_t)15; /* about 16 KiB of float64 rows */
    if (chunk < 16) chunk = 16;
    double *buf = NULL;
    const double **rows = malloc((size_t)n * sizeof *rows);
    double *tot = calloc((size_t)(p * p + 1), sizeof(double));
    if (!rows || !tot || posix_memalign((void **)&buf, 64, (size_t)(n * chunk) * sizeof(double))) {
        free(rows);
        free(tot);
        free(buf);
        return -1;
    }
    for (int64_t i = 0; i < n; i++) rows[i] = buf + i * chunk;
    double *refrow = buf + p * chunk;
    double t[TB * TB];
    for (int64_t s = 0; s < m; s += chunk) {
        int64_t c = m - s < chunk ? m - s : chunk;
        int64_t len = (c + 3) & ~(int64_t)3;
        widen(xs[ref], codes[ref], s, c, refrow);
        for (int64_t k = c; k < len; k++) refrow[k] = 0.0;
        for (int64_t i = 0, row = 0; i < n; i++) {
            if (i == ref) continue;
            double *d = buf + row * chunk;
            widen(xs[i], codes[i], s, c, d);
            for (int64_t k = 0; k < c; k++) d[k] -= refrow[k];
            for (int64_t k = c; k < len; k++) d[k] = 0.0;
            row++;
        }
        /* lower triangle of the p x p block, tile by tile */
        for (int64_t i0 = 0; i0 < p; i0 += TB) {
            int64_t ri = p - i0 < TB ? p - i0 : TB;
            for (int64_t j0 = 0; j0 <= i0; j0 += TB) {
                int64_t cj = p - j0 < TB ? p - j0 : TB;
                TILES[ri - 1][cj - 1](rows + i0, rows + j0, len, t);
                for (int64_t r = 0; r < ri; r++)
                    for (int64_t q = 0; q < cj; q++) tot[(i0 + r) * p + j0 + q] += t[r * cj + q];
            }
        }
        tile_1x1(rows + p, rows + p, len, t);
        tot[p * p] += t[0];
    }
    /* the upper triangle mirrors the lower (tiles on the diagonal computed both; keep the lower's) */
    for (int64_t i = 0; i < p; i++) {
        for (int64_t j = 0; j <= i; j++) out[i * p + j] = out[j * p + i] = tot[i * p + j];
    }
    out[p * p] = tot[p * p];
    free(rows);
    free(tot);
    free(buf);
    return 0;
}
