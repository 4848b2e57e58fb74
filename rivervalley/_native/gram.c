/* Gram matrix of differences from a reference, in one pass over the inputs (float64 accumulation).
 *
 * rv_gram_diff(xs, codes, n, ref, m, out): for n flat arrays xs[0..n) of m elements each (dtype codes:
 * 0 float32, 1 bfloat16, 2 float16, 3 float64), with d_i = x_i - x_ref widened to float64:
 *   out[a * (n-1) + b] = sum_k d_{o_a}[k] d_{o_b}[k]   (o: the indices other than ref, in order)
 *   out[(n-1) * (n-1)] = sum_k x_ref[k]^2
 * Widening float32/bfloat16/float16 to float64 is exact and so is the subtraction, so only the products'
 * summation order differs from a float64 gemm of the explicit differences.
 *
 * Chunk by chunk (16 KiB of float64 for all inputs together, so the chunk stays in L1), every input's
 * slice is widened once into a small float64 buffer (the differences, then the reference), the next
 * chunk's inputs are prefetched, and register tiles of up to 3 x 3 rows (triangles on the diagonal)
 * accumulate the products of the lower triangle in 4-lane vectors (GCC/Clang vector extensions: AVX2 with
 * -march=native, SSE2 pairs otherwise): N(N-1)/2 + 1 products per element, no float64 copy in memory.
 * Each chunk's tile sums are added to the totals in a fixed order, so the result depends on the inputs
 * alone, never on threads or timing. Not compiled with -ffast-math: NaN and Inf must propagate to the
 * result, where the caller detects them.
 *
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

/* dst[k] = x[s + k] widened, minus ref[k] unless ref is NULL, for k < c: one pass, vectorised per dtype */
#define WIDEN(T, EXPR)                                                          \
    do {                                                                        \
        const T *p = (const T *)x + s;                                          \
        if (ref)                                                                \
            for (int64_t k = 0; k < c; k++) dst[k] = (EXPR) - ref[k];           \
        else                                                                    \
            for (int64_t k = 0; k < c; k++) dst[k] = (EXPR);                    \
    } while (0)

static void widen(const void *x, int32_t code, int64_t s, int64_t c, const double *restrict ref,
                  double *restrict dst) {
    switch (code) {
    case 0: WIDEN(float, (double)p[k]); break;
    case 1: WIDEN(uint16_t, as_f32_wide((uint32_t)p[k] << 16)); break;
    case 2: WIDEN(uint16_t, half_to_f64(p[k])); break;
    default: WIDEN(double, p[k]); break;
    }
}

/* Keeps a loaded vector in a register: otherwise GCC folds the loads into the FMAs' memory operands, which
 * loads every row once per product (12 loads per 9 FMAs in a 3 x 3 tile, not 6) and the loads then bound
 * the loop. */
#if defined(__GNUC__) && defined(__AVX__)
#define KEEP(v) __asm__("" : "+x"(v))
#else
#define KEEP(v) (void)0
#endif

static inline double hsum(v4 v) { return (v[0] + v[1]) + (v[2] + v[3]); }

/* t[r * C + c] = sum_k a_r[k] b_c[k] over len (a multiple of 16) elements of 32-byte aligned rows. U sets
 * of accumulators take turns (U = 4, 2, 1 for tiles of up to 2, 4, 9 products): an FMA waits about 4
 * cycles for the previous one on its accumulator, so a tile needs about 8 in flight to keep 2 FMA units
 * busy. */
#define TILE(NAME, R, C, U)                                                                              \
    static void NAME(const double *const *a, const double *const *b, int64_t len, double *t) {           \
        v4 acc[U][R][C];                                                                                 \
        memset(acc, 0, sizeof acc);                                                                      \
        for (int64_t k = 0; k < len; k += 4 * U) {                                                       \
            for (int u = 0; u < U; u++) {                                                                \
                v4 av[R], bv[C];                                                                         \
                for (int c = 0; c < C; c++) {                                                            \
                    bv[c] = *(const v4 *)(b[c] + k + 4 * u);                                             \
                    KEEP(bv[c]);                                                                         \
                }                                                                                        \
                for (int r = 0; r < R; r++) {                                                            \
                    av[r] = *(const v4 *)(a[r] + k + 4 * u);                                             \
                    KEEP(av[r]);                                                                         \
                }                                                                                        \
                for (int r = 0; r < R; r++)                                                              \
                    for (int c = 0; c < C; c++) acc[u][r][c] += av[r] * bv[c];                           \
            }                                                                                            \
        }                                                                                                \
        for (int r = 0; r < R; r++)                                                                      \
            for (int c = 0; c < C; c++) {                                                                \
                v4 sum = acc[0][r][c];                                                                   \
                for (int u = 1; u < U; u++) sum += acc[u][r][c];                                         \
                t[r * C + c] = hsum(sum);                                                                \
            }                                                                                            \
    }
TILE(tile_1x1, 1, 1, 4)
TILE(tile_1x2, 1, 2, 4)
TILE(tile_1x3, 1, 3, 2)
TILE(tile_2x1, 2, 1, 4)
TILE(tile_2x2, 2, 2, 2)
TILE(tile_2x3, 2, 3, 1)
TILE(tile_3x1, 3, 1, 2)
TILE(tile_3x2, 3, 2, 1)
TILE(tile_3x3, 3, 3, 1)

/* A tile on the diagonal (a == b): only the entries c <= r, t[r * R + c]. Written out: an accumulator
 * array with unused entries is kept in memory by GCC. */
static void diag_1(const double *const *a, const double *const *b, int64_t len, double *t) {
    tile_1x1(a, b, len, t);
}

static void diag_2(const double *const *a, const double *const *b, int64_t len, double *t) {
    (void)b;
    v4 s00 = {0}, s10 = {0}, s11 = {0}, r00 = {0}, r10 = {0}, r11 = {0};
    for (int64_t k = 0; k < len; k += 8) {
        v4 x0 = *(const v4 *)(a[0] + k), x1 = *(const v4 *)(a[1] + k);
        v4 y0 = *(const v4 *)(a[0] + k + 4), y1 = *(const v4 *)(a[1] + k + 4);
        s00 += x0 * x0;
        s10 += x1 * x0;
        s11 += x1 * x1;
        r00 += y0 * y0;
        r10 += y1 * y0;
        r11 += y1 * y1;
    }
    t[0] = hsum(s00 + r00), t[2] = hsum(s10 + r10), t[3] = hsum(s11 + r11);
}

static void diag_3(const double *const *a, const double *const *b, int64_t len, double *t) {
    (void)b;
    v4 s00 = {0}, s10 = {0}, s11 = {0}, s20 = {0}, s21 = {0}, s22 = {0};
    for (int64_t k = 0; k < len; k += 4) {
        v4 x0 = *(const v4 *)(a[0] + k), x1 = *(const v4 *)(a[1] + k), x2 = *(const v4 *)(a[2] + k);
        s00 += x0 * x0;
        s10 += x1 * x0;
        s11 += x1 * x1;
        s20 += x2 * x0;
        s21 += x2 * x1;
        s22 += x2 * x2;
    }
    t[0] = hsum(s00), t[3] = hsum(s10), t[4] = hsum(s11);
    t[6] = hsum(s20), t[7] = hsum(s21), t[8] = hsum(s22);
}

typedef void (*tile_fn)(const double *const *, const double *const *, int64_t, double *);
static const tile_fn TILES[TB][TB] = {
    {tile_1x1, tile_1x2, tile_1x3}, {tile_2x1, tile_2x2, tile_2x3}, {tile_3x1, tile_3x2, tile_3x3}};
static const tile_fn DIAG[TB] = {diag_1, diag_2, diag_3};

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
    static const int64_t sizes[4] = {4, 2, 2, 8};
    for (int64_t s = 0; s < m; s += chunk) {
        int64_t c = m - s < chunk ? m - s : chunk;
        int64_t len = (c + 15) & ~(int64_t)15;
        widen(xs[ref], codes[ref], s, c, NULL, refrow);
        for (int64_t k = c; k < len; k++) refrow[k] = 0.0;
        for (int64_t i = 0, row = 0; i < n; i++) {
            if (i == ref) continue;
            double *d = buf + row * chunk;
            widen(xs[i], codes[i], s, c, refrow, d);
            for (int64_t k = c; k < len; k++) d[k] = 0.0;
            row++;
        }
        /* the next chunk's inputs, fetched from memory while the tiles work on this one */
        if (s + chunk < m) {
            int64_t cn = m - s - chunk < chunk ? m - s - chunk : chunk;
            for (int64_t i = 0; i < n; i++) {
                const char *q = (const char *)xs[i] + (s + chunk) * sizes[codes[i] & 3];
                for (int64_t off = 0; off < cn * sizes[codes[i] & 3]; off += 64) __builtin_prefetch(q + off);
            }
        }
        /* lower triangle of the p x p block, tile by tile */
        for (int64_t i0 = 0; i0 < p; i0 += TB) {
            int64_t ri = p - i0 < TB ? p - i0 : TB;
            for (int64_t j0 = 0; j0 <= i0; j0 += TB) {
                int64_t cj = p - j0 < TB ? p - j0 : TB;
                int diag = i0 == j0;
                (diag ? DIAG[ri - 1] : TILES[ri - 1][cj - 1])(rows + i0, rows + j0, len, t);
                for (int64_t r = 0; r < ri; r++)
                    for (int64_t q = 0; q < (diag ? r + 1 : cj); q++)
                        tot[(i0 + r) * p + j0 + q] += t[r * cj + q];
            }
        }
        tile_1x1(rows + p, rows + p, len, t);
        tot[p * p] += t[0];
    }
    /* the upper triangle mirrors the lower */
    for (int64_t i = 0; i < p; i++) {
        for (int64_t j = 0; j <= i; j++) out[i * p + j] = out[j * p + i] = tot[i * p + j];
    }
    out[p * p] = tot[p * p];
    free(rows);
    free(tot);
    free(buf);
    return 0;
}
