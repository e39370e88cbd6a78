/* W8A8 linear on CPU: y[m, n] = x[m, :] . W[n, :] with the int8 weight W [N, K] (row-major, one float scale
 * per output row) and each input row quantized on the fly to unsigned 8 bits, as tramontane.models.quant's
 * fbgemm path quantizes it, so that both give bit-identical outputs:
 *   a = max_k |x[m, k]|; R = the least value >= a of the grid {2^e, 1.4142137 * 2^e} (at least 2^-100);
 *   scale = float(2R / 127), zero point zp = round_half_even(R / (2R / 127)) (64), both in double;
 *   q[k] = clamp(round_half_even(fma(x[k], 1 / scale, zp)), 0, 255), i.e. 0..128 since |x| <= R;
 *   y[m, n] = float(sum_k q[k] W[n, k] - zp * colsum[n]) * (scale * wscale[n])
 * The integer sums are exact (pairs of u8 x s8 products fit in int16 because q <= 128), so the order of
 * summation does not matter and the result does not depend on the other rows, the thread count or the
 * instruction set. The AVX2 path does 4 output rows (and 2 input rows) per pass; the portable path is plain C.
 * Non-finite inputs give unspecified (finite) outputs, as in fbgemm.
 * Built at run time by tramontane.models.native (the system C compiler, -O3 -march=native -fopenmp). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

static const double SQRT2_UP = 1.4142136573791504; /* the least float32 >= sqrt(2) */
static const double MIN_BOUND = 7.888609052210118e-31; /* 2^-100 */

static double activation_bound(double a) {
    if (!isfinite(a)) return 1.0; /* what the Python grid function gives for inf and nan */
    int e;
    double mantissa = frexp(a, &e);
    if (mantissa == 0.5) return a;
    double low = ldexp(SQRT2_UP, e - 1);
    return a <= low ? low : ldexp(1.0, e);
}

static void quantize_row(const float* x, int64_t K, uint8_t* q, float* scale, int32_t* zp) {
    float a = 0.f;
    int nan = 0;
    for (int64_t k = 0; k < K; ++k) {
        float v = fabsf(x[k]);
        nan |= isnan(v);
        a = v > a ? v : a;
    }
    double R = activation_bound(nan ? NAN : (double)a);
    if (R < MIN_BOUND) R = MIN_BOUND;
    double step = 2.0 * R / 127.0;
    float s = (float)step, inv = 1.0f / s;
    int32_t z = (int32_t)nearbyint(R / step);
    float zf = (float)z;
    for (int64_t k = 0; k < K; ++k) {
        float t = nearbyintf(fmaf(x[k], inv, zf));
        q[k] = (uint8_t)(t >= 0.f ? (t <= 255.f ? t : 255.f) : 0.f); /* nan -> 0 */
    }
    *scale = s;
    *zp = z;
}

static inline float finish(int32_t acc, int32_t zp, int32_t colsum, float scale, float wscale) {
    return (float)(acc - zp * colsum) * (scale * wscale);
}

static int32_t dot_u8_s8(const uint8_t* q, const int8_t* w, int64_t from, int64_t K) {
    int32_t s = 0;
    for (int64_t k = from; k < K; ++k) s += q[k] * w[k];
    return s;
}

#ifdef __AVX2__
static inline int32_t hsum(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

/* acc += the 16 pairwise sums of q * w (u8 x s8 -> int16, exact here) summed again into 8 int32 */
static inline __m256i dot32(__m256i acc, __m256i q, const int8_t* w, __m256i ones) {
    __m256i pairs = _mm256_maddubs_epi16(q, _mm256_loadu_si256((const __m256i*)w));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, ones));
}

/* Rows 4 at a time share each load of the input; at one input row the weights stream from memory, so they are
 * prefetched ahead (3 KiB measured best on an AVX2 EPYC). */
#define PREFETCH 3072

static void block4(const uint8_t* q, const int32_t* zp, const float* scale, int64_t M, int64_t K,
                   const int8_t* w, int64_t n0, int64_t N, const float* wscale, const int32_t* colsum, float* y) {
    const __m256i ones = _mm256_set1_epi16(1);
    const int8_t* w0 = w + n0 * K;
    const int8_t *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
    const int64_t kv = K & ~(int64_t)31;
    int64_t m = 0;
    for (; m + 2 <= M; m += 2) {
        const uint8_t *qa = q + m * K, *qb = qa + K;
        __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
        for (int64_t k = 0; k < kv; k += 32) {
            __m256i va = _mm256_loadu_si256((const __m256i*)(qa + k));
            __m256i vb = _mm256_loadu_si256((const __m256i*)(qb + k));
            a0 = dot32(a0, va, w0 + k, ones); b0 = dot32(b0, vb, w0 + k, ones);
            a1 = dot32(a1, va, w1 + k, ones); b1 = dot32(b1, vb, w1 + k, ones);
            a2 = dot32(a2, va, w2 + k, ones); b2 = dot32(b2, vb, w2 + k, ones);
            a3 = dot32(a3, va, w3 + k, ones); b3 = dot32(b3, vb, w3 + k, ones);
        }
        int32_t acc[2][4] = {
            {hsum(a0) + dot_u8_s8(qa, w0, kv, K), hsum(a1) + dot_u8_s8(qa, w1, kv, K),
             hsum(a2) + dot_u8_s8(qa, w2, kv, K), hsum(a3) + dot_u8_s8(qa, w3, kv, K)},
            {hsum(b0) + dot_u8_s8(qb, w0, kv, K), hsum(b1) + dot_u8_s8(qb, w1, kv, K),
             hsum(b2) + dot_u8_s8(qb, w2, kv, K), hsum(b3) + dot_u8_s8(qb, w3, kv, K)}};
        for (int r = 0; r < 2; ++r)
            for (int j = 0; j < 4; ++j)
                y[(m + r) * N + n0 + j] = finish(acc[r][j], zp[m + r], colsum[n0 + j], scale[m + r], wscale[n0 + j]);
    }
    if (m < M) {
        const uint8_t* qa = q + m * K;
        __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t k = 0; k < kv; k += 32) {
            _mm_prefetch((const char*)(w0 + k + PREFETCH), _MM_HINT_T0);
            _mm_prefetch((const char*)(w1 + k + PREFETCH), _MM_HINT_T0);
            _mm_prefetch((const char*)(w2 + k + PREFETCH), _MM_HINT_T0);
            _mm_prefetch((const char*)(w3 + k + PREFETCH), _MM_HINT_T0);
            __m256i va = _mm256_loadu_si256((const __m256i*)(qa + k));
            a0 = dot32(a0, va, w0 + k, ones);
            a1 = dot32(a1, va, w1 + k, ones);
            a2 = dot32(a2, va, w2 + k, ones);
            a3 = dot32(a3, va, w3 + k, ones);
        }
        int32_t acc[4] = {hsum(a0) + dot_u8_s8(qa, w0, kv, K), hsum(a1) + dot_u8_s8(qa, w1, kv, K),
                          hsum(a2) + dot_u8_s8(qa, w2, kv, K), hsum(a3) + dot_u8_s8(qa, w3, kv, K)};
        for (int j = 0; j < 4; ++j)
            y[m * N + n0 + j] = finish(acc[j], zp[m], colsum[n0 + j], scale[m], wscale[n0 + j]);
    }
}
#endif

/* The output rows n0 .. n0 + count - 1 for every input row, one output row at a time. */
static void rows_portable(const uint8_t* q, const int32_t* zp, const float* scale, int64_t M, int64_t K,
                          const int8_t* w, int64_t n0, int64_t count, int64_t N, const float* wscale,
                          const int32_t* colsum, float* y) {
    for (int64_t n = n0; n < n0 + count; ++n)
        for (int64_t m = 0; m < M; ++m)
            y[m * N + n] = finish(dot_u8_s8(q + m * K, w + n * K, 0, K), zp[m], colsum[n], scale[m], wscale[n]);
}

/* x [M, K] float32, w [N, K] int8, wscale [N] float32, colsum [N] int32 (sum_k w[n, k]), y [M, N] float32.
 * Returns 0, or -1 when the work buffer cannot be allocated. */
int tramontane_w8a8_linear(const float* x, int64_t M, int64_t K, const int8_t* w, int64_t N,
                           const float* wscale, const int32_t* colsum, float* y, int threads) {
    uint8_t* work = malloc((size_t)M * (sizeof(float) + sizeof(int32_t) + (size_t)K));
    if (!work) return -1;
    float* scale = (float*)work;
    int32_t* zp = (int32_t*)(work + M * sizeof(float));
    uint8_t* q = work + M * (sizeof(float) + sizeof(int32_t));
    #pragma omp parallel for num_threads(threads) schedule(static) if (M > 8)
    for (int64_t m = 0; m < M; ++m) quantize_row(x + m * K, K, q + m * K, scale + m, zp + m);
    const int64_t blocks = (N + 3) / 4;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
        const int64_t n0 = 4 * b, count = N - n0 < 4 ? N - n0 : 4;
#ifdef __AVX2__
        if (count == 4) {
            block4(q, zp, scale, M, K, w, n0, N, wscale, colsum, y);
            continue;
        }
#endif
        rows_portable(q, zp, scale, M, K, w, n0, count, N, wscale, colsum, y);
    }
    free(work);
    return 0;
}

/* 1 when this build has the AVX2 path, 0 for the portable one. */
int tramontane_w8a8_has_avx2(void) {
#ifdef __AVX2__
    return 1;
#else
    return 0;
#endif
}
