// The matrix products of a decode step on x86-64 CPUs with AVX2: y[m, n] = x[m, k] . w[n, k] for a few
// float32 rows x and a weight matrix w in its natural row-major layout, stored as bfloat16, float16,
// float32 or int8 with one float32 scale per row. Sums are float32. See kernel.py.
//
// One decode step reads every weight once, so the product is as fast as the weights stream from memory.
// Each thread takes a contiguous range of weight rows and reads them one row at a time (one sequential
// stream per thread, which the hardware prefetcher follows best), multiplying each row with up to
// four rows of x while it is in registers; more rows of x reuse it from the L1 cache.
//
// bfloat16 to float32 is a 16-bit shift: a 32-byte load of 16 bfloat16 values gives the odd ones as
// exact float32 by masking off their low halves and the even ones by shifting left 16 bits. The rows of
// x are rearranged once per call to match (odd elements, then even, in each block of 16).

#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

namespace {

enum Kind { BF16 = 0, F16 = 1, F32 = 2, I8 = 3 };
constexpr int PREFETCH_BYTES = 1024;  // how far ahead of the row being read

template <int KIND>
struct Weights;

template <>
struct Weights<BF16> {
    using T = uint16_t;
    static constexpr bool odd_even = true;
    static inline void load16(const T* w, __m256& a, __m256& b) {
        __m256i v = _mm256_loadu_si256((const __m256i*)w);
        a = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xFFFF0000u)));
        b = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    }
    static inline float one(T v) {
        uint32_t bits = (uint32_t)v << 16;
        float f;
        memcpy(&f, &bits, 4);
        return f;
    }
};

template <>
struct Weights<F16> {
    using T = uint16_t;
    static constexpr bool odd_even = false;
    static inline void load16(const T* w, __m256& a, __m256& b) {
        a = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)w));
        b = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(w + 8)));
    }
    static inline float one(T v) { return _cvtsh_ss(v); }
};

template <>
struct Weights<F32> {
    using T = float;
    static constexpr bool odd_even = false;
    static inline void load16(const T* w, __m256& a, __m256& b) {
        a = _mm256_loadu_ps(w);
        b = _mm256_loadu_ps(w + 8);
    }
    static inline float one(T v) { return v; }
};

template <>
struct Weights<I8> {
    using T = int8_t;
    static constexpr bool odd_even = false;
    static inline void load16(const T* w, __m256& a, __m256& b) {
        __m128i v = _mm_loadu_si128((const __m128i*)w);
        a = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
        b = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(v, v)));
    }
    static inline float one(T v) { return (float)v; }
};

inline float sum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// Rows x[m0, m0 + M) (rearranged: xs) times weight rows [n0, n1), M <= 4. U blocks of 16 per iteration.
template <int KIND, int M, int U>
void tile(const float* x, const float* xs, const typename Weights<KIND>::T* w, const float* scales,
          float* y, int n, int k, int m0, int n0, int n1) {
    using W = Weights<KIND>;
    const int k16 = k & ~15;
    for (int row = n0; row < n1; row++) {
        const typename W::T* wr = w + (size_t)row * k;
        __m256 acc[U][M][2];
        for (int u = 0; u < U; u++)
            for (int i = 0; i < M; i++) acc[u][i][0] = acc[u][i][1] = _mm256_setzero_ps();
        int j = 0;
        for (; j + 16 * U <= k16; j += 16 * U) {
            _mm_prefetch((const char*)(wr + j) + PREFETCH_BYTES, _MM_HINT_T0);
            for (int u = 0; u < U; u++) {
                __m256 a, b;
                W::load16(wr + j + 16 * u, a, b);
                for (int i = 0; i < M; i++) {
                    const float* xr = xs + (size_t)(m0 + i) * k16 + j + 16 * u;
                    acc[u][i][0] = _mm256_fmadd_ps(a, _mm256_loadu_ps(xr), acc[u][i][0]);
                    acc[u][i][1] = _mm256_fmadd_ps(b, _mm256_loadu_ps(xr + 8), acc[u][i][1]);
                }
            }
        }
        for (; j < k16; j += 16) {
            __m256 a, b;
            W::load16(wr + j, a, b);
            for (int i = 0; i < M; i++) {
                const float* xr = xs + (size_t)(m0 + i) * k16 + j;
                acc[0][i][0] = _mm256_fmadd_ps(a, _mm256_loadu_ps(xr), acc[0][i][0]);
                acc[0][i][1] = _mm256_fmadd_ps(b, _mm256_loadu_ps(xr + 8), acc[0][i][1]);
            }
        }
        for (int i = 0; i < M; i++) {
            __m256 total = _mm256_add_ps(acc[0][i][0], acc[0][i][1]);
            for (int u = 1; u < U; u++) total = _mm256_add_ps(total, _mm256_add_ps(acc[u][i][0], acc[u][i][1]));
            float s = sum8(total);
            const float* xr = x + (size_t)(m0 + i) * k;
            for (int t = k16; t < k; t++) s += xr[t] * W::one(wr[t]);
            y[(size_t)(m0 + i) * n + row] = scales ? s * scales[row] : s;
        }
    }
}

// All rows of x times weight rows [n0, n1): each weight row is read from memory once, for the first four
// rows of x, and from the L1 cache for the rest.
template <int KIND>
void rows(const float* x, const float* xs, const typename Weights<KIND>::T* w, const float* scales, float* y,
          int m, int n, int k, int n0, int n1) {
    if (m == 1) {
        tile<KIND, 1, 2>(x, xs, w, scales, y, n, k, 0, n0, n1);
        return;
    }
    for (int row = n0; row < n1; row++) {
        int i = 0;
        for (; i + 4 <= m; i += 4) tile<KIND, 4, 1>(x, xs, w, scales, y, n, k, i, row, row + 1);
        switch (m - i) {
            case 3: tile<KIND, 3, 1>(x, xs, w, scales, y, n, k, i, row, row + 1); break;
            case 2: tile<KIND, 2, 1>(x, xs, w, scales, y, n, k, i, row, row + 1); break;
            case 1: tile<KIND, 1, 1>(x, xs, w, scales, y, n, k, i, row, row + 1); break;
        }
    }
}

template <int KIND>
void product(const float* x, const void* w, const float* scales, float* y, int m, int n, int k) {
    using W = Weights<KIND>;
    const int k16 = k & ~15;
    float* xs = (float*)malloc(sizeof(float) * ((size_t)m * k16 + 1));
    for (int i = 0; i < m; i++) {
        const float* xr = x + (size_t)i * k;
        float* out = xs + (size_t)i * k16;
        for (int j = 0; j < k16; j += 16)
            for (int t = 0; t < 8; t++) {
                out[j + t] = W::odd_even ? xr[j + 2 * t + 1] : xr[j + t];
                out[j + 8 + t] = W::odd_even ? xr[j + 2 * t] : xr[j + 8 + t];
            }
    }
    const typename W::T* wt = (const typename W::T*)w;
    const bool parallel = (size_t)m * n * k >= (1u << 15);
#pragma omp parallel if (parallel)
    {
        const int t = omp_get_thread_num(), threads = omp_get_num_threads();
        const int n0 = (int)((long)n * t / threads), n1 = (int)((long)n * (t + 1) / threads);
        rows<KIND>(x, xs, wt, scales, y, m, n, k, n0, n1);
    }
    free(xs);
}

}  // namespace

extern "C" {

// y[m, n] = x[m, k] . w[n, k] (times scales[n] when given); 0 when done, -1 for an unknown kind.
int vicuna_product(int kind, const float* x, const void* w, const float* scales, float* y, int m, int n, int k) {
    switch (kind) {
        case BF16: product<BF16>(x, w, scales, y, m, n, k); return 0;
        case F16: product<F16>(x, w, scales, y, m, n, k); return 0;
        case F32: product<F32>(x, w, scales, y, m, n, k); return 0;
        case I8: product<I8>(x, w, scales, y, m, n, k); return 0;
    }
    return -1;
}

}
