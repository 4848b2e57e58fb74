/* Fused Gaussian-noise kernels for the rivervalley simulator (CPU).
 *
 * Normals come from a counter-based generator: Philox4x32-10 (Salmon et al., SC'11; the generator behind
 * cuRAND's and torch's CUDA randn) followed by the Box-Muller transform in float32. Each normal is a pure
 * function of (key, draw, row, column), so results never depend on how rows are split across threads.
 *
 * Column layout: columns are taken in tiles of 64. In tile T, column j = T*64 + 16*k + l (l < 16, k < 4)
 * is word k of Philox block (T*16 + l); the counter of block (b, row, draw) is {b, row, draw_lo, draw_hi}
 * and the key {key_lo, key_hi}. Words (0, 1) give the normals k = 0, 1 (r cos θ, r sin θ) and words (2, 3)
 * give k = 2, 3, with u1 = ((w0 >> 8) + 1) 2^-24 in (0, 1], r = sqrt(-2 ln u1), θ = 2π (w1 >> 8) 2^-24.
 * The 24-bit uniforms bound |z| by sqrt(2 ln 2^24) = 5.77 (as torch's float32 randn).
 *
 * Compile with -ffast-math (so that logf vectorises through glibc's libmvec) but link without
 * it: linking with -ffast-math would add crtfastmath.o, which flushes denormals for the whole process.
 * rivervalley/_native/__init__.py does both.
 */
#include <math.h>
#include <stdint.h>

#define LANES 16
#define TILE (4 * LANES)
#define PHILOX_M0 0xD2511F53u
#define PHILOX_M1 0xCD9E8D57u
#define PHILOX_W0 0x9E3779B9u
#define PHILOX_W1 0xBB67AE85u

/* One Philox4x32-10 block: ctr[4], key[2] -> out[4]. Exported for the known-answer test. */
void rv_philox4x32_10(const uint32_t *ctr, const uint32_t *key, uint32_t *out) {
    uint32_t c0 = ctr[0], c1 = ctr[1], c2 = ctr[2], c3 = ctr[3], k0 = key[0], k1 = key[1];
    for (int r = 0; r < 10; r++) {
        uint64_t p0 = (uint64_t)PHILOX_M0 * c0, p1 = (uint64_t)PHILOX_M1 * c2;
        uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1 ^ k0, n2 = (uint32_t)(p0 >> 32) ^ c3 ^ k1;
        c0 = n0;
        c1 = (uint32_t)p1;
        c2 = n2;
        c3 = (uint32_t)p0;
        k0 += PHILOX_W0;
        k1 += PHILOX_W1;
    }
    out[0] = c0;
    out[1] = c1;
    out[2] = c2;
    out[3] = c3;
}

/* cos and sin of the angle 2π m / 2^24 for a 24-bit integer m. The quadrant comes exactly from the top
 * bits of m, leaving x in [-π/4, π/4) for Cephes' single-precision minimax polynomials (sinf.c, cosf.c;
 * error about 1 ulp). Measured 1.6x faster here than libmvec's vector sinf + cosf, which compute their
 * own range reduction. */
static inline void cos_sin_turn(uint32_t m, float *c, float *s) {
    uint32_t q = (m + (1u << 21)) >> 22;                /* nearest quarter turn, 0..4 */
    int32_t r = (int32_t)m - (int32_t)(q << 22);         /* in [-2^21, 2^21) */
    float x = (float)r * (6.283185307179586f * 0x1p-24f), x2 = x * x;
    float sn = x + x * x2 * (-1.6666654611e-1f + x2 * (8.3321608736e-3f + x2 * -1.9515295891e-4f));
    float cs = 1.0f - 0.5f * x2 +
               x2 * x2 * (4.166664568298827e-2f + x2 * (-1.388731625493765e-3f + x2 * 2.443315711809948e-5f));
    q &= 3u;
    float cq = (q & 1u) ? sn : cs, sq = (q & 1u) ? cs : sn;   /* rotate by q quarter turns */
    *c = (q == 1u || q == 2u) ? -cq : cq;
    *s = (q >= 2u) ? -sq : sq;
}

/* The 64 normals of tile `tile` of row `row`, in column order, into z[64]. */
static inline void tile_normals(float *restrict z, uint32_t tile, uint32_t row, uint32_t d_lo, uint32_t d_hi,
                                uint32_t key_lo, uint32_t key_hi) {
    uint32_t c0[LANES], c1[LANES], c2[LANES], c3[LANES];
#pragma omp simd
    for (int l = 0; l < LANES; l++) {
        c0[l] = tile * LANES + (uint32_t)l;
        c1[l] = row;
        c2[l] = d_lo;
        c3[l] = d_hi;
    }
    uint32_t k0 = key_lo, k1 = key_hi;
    for (int r = 0; r < 10; r++) {
#pragma omp simd
        for (int l = 0; l < LANES; l++) {
            uint64_t p0 = (uint64_t)PHILOX_M0 * c0[l], p1 = (uint64_t)PHILOX_M1 * c2[l];
            uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1[l] ^ k0, n2 = (uint32_t)(p0 >> 32) ^ c3[l] ^ k1;
            c0[l] = n0;
            c1[l] = (uint32_t)p1;
            c2[l] = n2;
            c3[l] = (uint32_t)p0;
        }
        k0 += PHILOX_W0;
        k1 += PHILOX_W1;
    }
    const float scale = 0x1p-24f;
#pragma omp simd
    for (int l = 0; l < LANES; l++) {
        float ra = sqrtf(-2.0f * logf((float)((c0[l] >> 8) + 1u) * scale));
        float rb = sqrtf(-2.0f * logf((float)((c2[l] >> 8) + 1u) * scale));
        float ca, sa, cb, sb;
        cos_sin_turn(c1[l] >> 8, &ca, &sa);
        cos_sin_turn(c3[l] >> 8, &cb, &sb);
        z[l] = ra * ca;
        z[LANES + l] = ra * sa;
        z[2 * LANES + l] = rb * cb;
        z[3 * LANES + l] = rb * sb;
    }
}

/* Out-of-place results (checkpoint slots, written once and not read back soon) are stored with
 * non-temporal stores where the CPU has them, so that writing a slot does not first read it into cache. */
#if defined(__AVX__)
#include <immintrin.h>
#define STREAMABLE(p) (((uintptr_t)(p) & 31u) == 0)
#define STREAM_FENCE() _mm_sfence()
static inline void stream_tile_f64(double *o, const double *w) {
    for (int t = 0; t < TILE; t += 4) _mm256_stream_pd(o + t, _mm256_loadu_pd(w + t));
}
static inline void stream_tile_f32(float *o, const float *w) {
    for (int t = 0; t < TILE; t += 8) _mm256_stream_ps(o + t, _mm256_loadu_ps(w + t));
}
#else
#define STREAMABLE(p) 0
#define STREAM_FENCE() ((void)0)
static inline void stream_tile_f64(double *o, const double *w) {
    for (int t = 0; t < TILE; t++) o[t] = w[t];
}
static inline void stream_tile_f32(float *o, const float *w) {
    for (int t = 0; t < TILE; t++) o[t] = w[t];
}
#endif

/* Denormals are flushed inside every kernel (and the caller's setting restored), so that a row gives the
 * same numbers on whichever thread runs it: the simulator flushes them in its own thread only. */
#if defined(__SSE__)
#include <xmmintrin.h>
#define FTZ_BEGIN() unsigned int rv_csr = _mm_getcsr(); _mm_setcsr(rv_csr | 0x8040u);
#define FTZ_END() _mm_setcsr(rv_csr)
#else
#define FTZ_BEGIN()
#define FTZ_END() ((void)0)
#endif

/* The updates below are written with explicit fused multiply-adds where the CPU has them. Left to itself,
 * gcc (-ffast-math, -ffp-contract=fast) contracts `a x + b + c z` into FMAs separately in each copy of a
 * loop that it makes: the vector body, its narrower vector epilogue and the scalar loop it keeps for
 * operands that might alias (the loop is versioned on a run-time overlap check of x's row against the
 * coefficient vectors). Those copies contracted differently, so a row whose buffer happened to lie just
 * after a coefficient vector in memory (and a tail column) came out 1 ulp off from the same row elsewhere:
 * the numbers depended on where the allocator put the tensors, not only on (key, draw, row, column).
 * fma() is one operation that gcc never splits nor re-associates, so every copy rounds alike; without
 * hardware FMA there is no contraction to differ (test_native checks packed vs separate tensors). */
#if defined(__FP_FAST_FMA)
#define RV_FMA_double(a, b, c) fma((a), (b), (c))
#else
#define RV_FMA_double(a, b, c) ((a) * (b) + (c))
#endif
#if defined(__FP_FAST_FMAF)
#define RV_FMA_float(a, b, c) fmaf((a), (b), (c))
#else
#define RV_FMA_float(a, b, c) ((a) * (b) + (c))
#endif
#define RV_FMA(T, a, b, c) RV_FMA_##T(a, b, c)

#define ROW_LOOP(...)                                                                                        \
    FTZ_BEGIN()                                                                                              \
    uint32_t d_lo = (uint32_t)draw, d_hi = (uint32_t)(draw >> 32);                                           \
    uint32_t key_lo = (uint32_t)key, key_hi = (uint32_t)(key >> 32);                                         \
    float z[TILE];                                                                                           \
    for (int64_t i = row0; i < row1; i++) {                                                                  \
        for (int64_t j0 = 0; j0 < cols; j0 += TILE) {                                                        \
            tile_normals(z, (uint32_t)(j0 / TILE), (uint32_t)i, d_lo, d_hi, key_lo, key_hi);                 \
            int64_t n = cols - j0 < TILE ? cols - j0 : TILE;                                                 \
            __VA_ARGS__                                                                                      \
        }                                                                                                    \
    }                                                                                                        \
    FTZ_END();

/* out[i, j] = normal(key, draw, i, j) for rows row0..row1-1 (row stride ld). */
void rv_normal_f32(float *out, int64_t ld, int64_t row0, int64_t row1, int64_t cols, uint64_t key,
                   uint64_t draw) {
    ROW_LOOP(float *o = out + i * ld + j0; for (int64_t t = 0; t < n; t++) o[t] = z[t];)
}

void rv_normal_f64(double *out, int64_t ld, int64_t row0, int64_t row1, int64_t cols, uint64_t key,
                   uint64_t draw) {
    ROW_LOOP(double *o = out + i * ld + j0; for (int64_t t = 0; t < n; t++) o[t] = (double)z[t];)
}


/* n SGD steps in place on rows row0..row1 of x, step t with learning rate lrs[t] and draw draw0 + t:
 *   x <- (1 - lr h) x + lr g - lr sd normal(key, draw0 + t, i, j),
 * i.e. x - lr (h x - g + sd xi) for the gradient h x - g of the unrotated quadratic with noise std sd.
 * Each row runs all n steps while it sits in L1, and the rows are independent, so threads need no
 * synchronisation between steps. When copy is not NULL the final rows are also streamed to copy. */
#define SGD_KERNEL(NAME, T, STREAM)                                                                          \
    void NAME(T *x, int64_t ld_x, T *copy, int64_t ld_copy, const T *h, const T *g, const T *sd,              \
              const double *lrs, int64_t n, int64_t row0, int64_t row1, int64_t cols, uint64_t key,           \
              uint64_t draw0) {                                                                              \
        FTZ_BEGIN()                                                                                          \
        uint32_t key_lo = (uint32_t)key, key_hi = (uint32_t)(key >> 32);                                     \
        float z[TILE];                                                                                       \
        for (int64_t i = row0; i < row1; i++) {                                                              \
            T *xr = x + i * ld_x;                                                                            \
            for (int64_t t = 0; t < n; t++) {                                                                \
                uint64_t draw = draw0 + (uint64_t)t;                                                         \
                const T lr = (T)lrs[t];                                                                      \
                for (int64_t j0 = 0; j0 < cols; j0 += TILE) {                                                \
                    tile_normals(z, (uint32_t)(j0 / TILE), (uint32_t)i, (uint32_t)draw, (uint32_t)(draw >> 32),\
                                 key_lo, key_hi);                                                            \
                    int64_t m = cols - j0 < TILE ? cols - j0 : TILE;                                         \
                    T *xi = xr + j0;                                                                         \
                    const T *hj = h + j0, *gj = g + j0, *sj = sd + j0;                                       \
                    for (int64_t u = 0; u < m; u++)                                                          \
                        xi[u] = RV_FMA(T, -lr * sj[u], (T)z[u], RV_FMA(T, 1 - lr * hj[u], xi[u], lr * gj[u])); \
                }                                                                                            \
            }                                                                                                \
            if (copy != 0) {                                                                                 \
                T *o = copy + i * ld_copy;                                                                   \
                int64_t j0 = 0;                                                                              \
                if (STREAMABLE(o))                                                                           \
                    for (; j0 + TILE <= cols; j0 += TILE) STREAM(o + j0, xr + j0);                           \
                for (; j0 < cols; j0++) o[j0] = xr[j0];                                                      \
            }                                                                                                \
        }                                                                                                    \
        STREAM_FENCE();                                                                                      \
        FTZ_END();                                                                                           \
    }

SGD_KERNEL(rv_sgd_steps_f64, double, stream_tile_f64)
SGD_KERNEL(rv_sgd_steps_f32, float, stream_tile_f32)

/* n equal exact AR(1) jumps in place on rows row0..row1 of x, jump k with draw draw0 + k:
 *   x <- a x + b + c normal(key, draw0 + k, i, j),
 * the result of jump k streamed to out + i ld_out + k ld_slot (checkpoint slot k) unless out is NULL. As
 * in the SGD kernel, each row goes through all n jumps while it sits in L1, with no synchronisation between
 * jumps. With n = 1 this is also the single fused update x <- a x + b + c xi. */
#define JUMPS_KERNEL(NAME, T, STREAM)                                                                        \
    void NAME(T *x, int64_t ld_x, T *out, int64_t ld_out, int64_t ld_slot, const T *a, const T *b, const T *c, \
              int64_t n, int64_t row0, int64_t row1, int64_t cols, uint64_t key, uint64_t draw0) {             \
        FTZ_BEGIN()                                                                                          \
        uint32_t key_lo = (uint32_t)key, key_hi = (uint32_t)(key >> 32);                                     \
        float z[TILE];                                                                                       \
        for (int64_t i = row0; i < row1; i++) {                                                              \
            T *xr = x + i * ld_x;                                                                            \
            for (int64_t k = 0; k < n; k++) {                                                                \
                uint64_t draw = draw0 + (uint64_t)k;                                                         \
                T *o = out != 0 ? out + i * ld_out + k * ld_slot : 0;                                        \
                int stream = o != 0 && STREAMABLE(o);                                                        \
                for (int64_t j0 = 0; j0 < cols; j0 += TILE) {                                                \
                    tile_normals(z, (uint32_t)(j0 / TILE), (uint32_t)i, (uint32_t)draw, (uint32_t)(draw >> 32),\
                                 key_lo, key_hi);                                                            \
                    int64_t m = cols - j0 < TILE ? cols - j0 : TILE;                                         \
                    T *xi = xr + j0;                                                                         \
                    const T *aj = a + j0, *bj = b + j0, *cj = c + j0;                                        \
                    for (int64_t u = 0; u < m; u++) xi[u] = RV_FMA(T, cj[u], (T)z[u], RV_FMA(T, aj[u], xi[u], bj[u])); \
                    if (stream && m == TILE) {                                                               \
                        STREAM(o + j0, xi);                                                                  \
                    } else if (o != 0) {                                                                     \
                        for (int64_t u = 0; u < m; u++) o[j0 + u] = xi[u];                                   \
                    }                                                                                        \
                }                                                                                            \
            }                                                                                                \
        }                                                                                                    \
        STREAM_FENCE();                                                                                      \
        FTZ_END();                                                                                           \
    }

JUMPS_KERNEL(rv_ar1_jumps_f64, double, stream_tile_f64)
JUMPS_KERNEL(rv_ar1_jumps_f32, float, stream_tile_f32)
