// The matrix products of a decode step on x86-64 CPUs with AVX2: y[m, n] = x[m, k] . w[n, k] for a few
// float32 rows x and a weight matrix w in its natural row-major layout, stored as bfloat16, float16,
// float32 or int8 with one float32 scale per row. Sums are float32. See kernel.py.
//
// One decode step reads every weight once, so the product is as fast as the weights stream from memory.
// Each thread takes a contiguous range of weight rows and reads it at several places at once (see
// `tile`), multiplying each weight row with up to four rows of x while it is in registers.
//
// bfloat16 to float32 is a 16-bit shift: a 32-byte load of 16 bfloat16 values gives the odd ones as
// exact float32 by masking off their low halves and the even ones by shifting left 16 bits. The rows of
// x are rearranged once per call to match (odd elements, then even, in each block of 16).
//
// On CPUs with AVX512-BF16 (and no AMX), bfloat16 and int8 weights take another way for any number of
// rows (`product_dot`): the rows of x rounded to bfloat16, and the CPU's bfloat16 dot products.

#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <numeric>
#include <type_traits>
#include <vector>

#ifdef _WIN32
// Windows' C runtime has no aligned_alloc (MinGW's g++ refused this file), and a block _aligned_malloc
// gives must go back through _aligned_free: there every block of this file is taken and given back so.
#include <malloc.h>
#define aligned_alloc(alignment, size) _aligned_malloc((size), (alignment))
#define malloc(size) _aligned_malloc((size), 16)
#define free(block) _aligned_free(block)
#endif

namespace {

enum Kind { BF16 = 0, F16 = 1, F32 = 2, I8 = 3, PACKED = 4, PACKED_I8 = 5 };  // PACKED: in blocks (see BLOCK)
constexpr int PREFETCH_BYTES = 1024;  // how far ahead of the row being read
constexpr int FEW_ROWS = 4;          // up to this many rows of x, one pass over each weight row
constexpr int CHUNK_ROWS = 512;      // rows of x per pass over the weights
constexpr int BLOCK = 16;            // weight rows per block of packed weights (PACKED, PACKED_I8)

// 8 values from memory as float32: float32, float16, or int8 (a load and a widening).
inline __m256 load8(const float* w) { return _mm256_loadu_ps(w); }
inline __m256 load8(const uint16_t* w) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)w)); }  // float16
inline __m256 load8(const int8_t* w) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)w))); }

template <int KIND>
struct Weights;

template <>
struct Weights<BF16> {
    using T = uint16_t;
    static constexpr bool odd_even = true;
    static inline void load16(const T* w, __m256& a, __m256& b) {
        __m256i v = _mm256_loadu_si256((const __m256i*)w);
        asm("" : "+x"(v));  // one load: else gcc loads the same 32 bytes again for the mask
        a = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xFFFF0000u)));
        b = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    }
    static inline float one(T v) {
        uint32_t bits = (uint32_t)v << 16;
        float f;
        memcpy(&f, &bits, 4);
        return f;
    }
    static inline T from(float f) {  // rounded to nearest even, as PyTorch rounds
        uint32_t bits;
        memcpy(&bits, &f, 4);
        if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;  // NaN
        return (T)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
    }
};

template <>
struct Weights<F16> {
    using T = uint16_t;
    static constexpr bool odd_even = false;
    static inline void load16(const T* w, __m256& a, __m256& b) { a = load8(w), b = load8(w + 8); }
    static inline float one(T v) { return _cvtsh_ss(v); }
    static inline T from(float f) { return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT); }
};

template <>
struct Weights<F32> {
    using T = float;
    static constexpr bool odd_even = false;
    static inline void load16(const T* w, __m256& a, __m256& b) { a = load8(w), b = load8(w + 8); }
    static inline float one(T v) { return v; }
    static inline T from(float f) { return f; }
};

template <>
struct Weights<I8> {
    using T = int8_t;
    static constexpr bool odd_even = false;
    static inline void load16(const T* w, __m256& a, __m256& b) { a = load8(w), b = load8(w + 8); }
    static inline float one(T v) { return (float)v; }
};

inline float sum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// The largest of x[0, n) (-inf when n is 0), in independent 8-lane maxima; `nan` tells whether any value
// is NaN (the maximum then ignores them).
inline float row_max(const float* x, int n, bool& nan) {
    __m256 top[4], unordered = _mm256_setzero_ps();
    for (auto& t : top) t = _mm256_set1_ps(-INFINITY);
    int i = 0;
    for (; i + 32 <= n; i += 32)
        for (int u = 0; u < 4; u++) {
            const __m256 v = _mm256_loadu_ps(x + i + 8 * u);
            top[u] = _mm256_max_ps(top[u], v);
            unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        }
    float lanes[8], best = -INFINITY;
    _mm256_storeu_ps(lanes, _mm256_max_ps(_mm256_max_ps(top[0], top[1]), _mm256_max_ps(top[2], top[3])));
    for (float v : lanes) best = v > best ? v : best;
    nan = !_mm256_testz_ps(unordered, unordered);
    for (; i < n; i++) nan |= x[i] != x[i], best = x[i] > best ? x[i] : best;
    return best;
}

// e^x for x <= 0 (scores minus their maximum): 2^n * e^r with |r| <= ln(2)/2, a degree-6 polynomial
// for e^r (relative error ~2e-7); below -87 the result is 0.
inline __m256 exp_nonpositive(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);  // ln 2, high part
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187e-06f), r);    // and low part
    __m256 p = _mm256_set1_ps(1.0f / 720);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

// silu(a) * b, 8 values at once: a / (1 + e^-a), computed as a e / (1 + e) with e = e^-|a| where a < 0
// (e^-a would overflow).
inline __m256 silu_times(__m256 a, __m256 b) {
    const __m256 e = exp_nonpositive(_mm256_or_ps(a, _mm256_set1_ps(-0.0f)));
    const __m256 top = _mm256_blendv_ps(a, _mm256_mul_ps(a, e), a);  // a e where a's sign bit is set
    return _mm256_mul_ps(_mm256_div_ps(top, _mm256_add_ps(_mm256_set1_ps(1.0f), e)), b);
}

// What a layer does to its rows before a product and with the result (see vicuna_product).
struct Around {
    const float* norm;  // RMS-normalize each row, then scale by norm[k] (nullptr: no)
    float eps;
    bool gated;  // rows of 2k values: silu(first half) * second half is multiplied
    bool add;    // add the product to y (a residual connection) instead of storing it
};

// One row as it is multiplied: x (k values, or 2k when gated) gated and normalized into out.
inline void prepare(const float* x, float* out, int k, const Around& around) {
    if (around.gated) {
        int j = 0;
        for (; j + 8 <= k; j += 8)
            _mm256_storeu_ps(out + j, silu_times(_mm256_loadu_ps(x + j), _mm256_loadu_ps(x + k + j)));
        if (j < k) {  // the last few through the same arithmetic
            float a[8] = {0}, b[8] = {0}, r[8];
            for (int t = 0; j + t < k; t++) a[t] = x[j + t], b[t] = x[k + j + t];
            _mm256_storeu_ps(r, silu_times(_mm256_loadu_ps(a), _mm256_loadu_ps(b)));
            for (int t = 0; j + t < k; t++) out[j + t] = r[t];
        }
    } else {
        memcpy(out, x, sizeof(float) * k);
    }
    if (around.norm) {  // the mean square in double precision, 8 values at a time in two sums (with one
        // sum, value by value, each addition waiting for the one before, a 16-row step took ~1.6% longer)
        __m256d sum0 = _mm256_setzero_pd(), sum1 = _mm256_setzero_pd();
        int j = 0;
        for (; j + 8 <= k; j += 8) {
            const __m256 v = _mm256_loadu_ps(out + j);
            const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
            const __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
            sum0 = _mm256_fmadd_pd(lo, lo, sum0), sum1 = _mm256_fmadd_pd(hi, hi, sum1);
        }
        double parts[4];
        _mm256_storeu_pd(parts, _mm256_add_pd(sum0, sum1));
        double squares = (parts[0] + parts[1]) + (parts[2] + parts[3]);
        for (; j < k; j++) squares += (double)out[j] * out[j];
        const float scale = (float)(1.0 / sqrt(squares / k + around.eps));
        for (int j = 0; j < k; j++) out[j] = out[j] * scale * around.norm[j];
    }
}

// Rows x[m0, m0 + M) (rearranged: xs) times weight rows: `count` steps, each reading the rows first + r,
// first + part + r, ..., first + (S - 1) part + r at once. S places in memory read side by side keep
// more memory requests in flight than one sequential stream does: on a 2-core AVX2 EPYC one row at a
// time streamed bfloat16 weights at ~17 GB/s, two or four places at once at ~24 GB/s (a plain
// one-stream read of memory: ~20 GB/s).
template <int KIND, int M, int S>
void tile(const float* x, const float* xs, const typename Weights<KIND>::T* w, const float* scales,
          float* y, int n, int k, int m0, int first, int part, int count, bool add) {
    using W = Weights<KIND>;
    constexpr int H = S * M <= 6 ? 2 : 1;  // sums per (place, row of x): as many as the registers hold
    const int k16 = k & ~15;
    for (int r = 0; r < count; r++) {
        const typename W::T* wr[S];
        for (int s = 0; s < S; s++) wr[s] = w + (size_t)(first + s * part + r) * k;
        __m256 acc[S][M][H];
        for (int s = 0; s < S; s++)
            for (int i = 0; i < M; i++)
                for (int h = 0; h < H; h++) acc[s][i][h] = _mm256_setzero_ps();
        for (int j = 0; j < k16; j += 16) {
            if (S < 4 && (j & 31) == 0)
                for (int s = 0; s < S; s++) _mm_prefetch((const char*)(wr[s] + j) + PREFETCH_BYTES, _MM_HINT_T0);
            for (int s = 0; s < S; s++) {
                __m256 a, b;
                W::load16(wr[s] + j, a, b);
                for (int i = 0; i < M; i++) {
                    const float* xr = xs + (size_t)(m0 + i) * k16 + j;
                    acc[s][i][0] = _mm256_fmadd_ps(a, _mm256_loadu_ps(xr), acc[s][i][0]);
                    acc[s][i][H - 1] = _mm256_fmadd_ps(b, _mm256_loadu_ps(xr + 8), acc[s][i][H - 1]);
                }
            }
        }
        for (int s = 0; s < S; s++) {
            const int row = first + s * part + r;
            for (int i = 0; i < M; i++) {
                float sum = sum8(H == 2 ? _mm256_add_ps(acc[s][i][0], acc[s][i][H - 1]) : acc[s][i][0]);
                const float* xr = x + (size_t)(m0 + i) * k;
                for (int t = k16; t < k; t++) sum += xr[t] * W::one(wr[s][t]);
                float& out = y[(size_t)(m0 + i) * n + row];
                out = (add ? out : 0.0f) + (scales ? sum * scales[row] : sum);
            }
        }
    }
}

// Weight rows [n0, n1) in S streams (the rows left over, one at a time).
template <int KIND, int M, int S>
void streams(const float* x, const float* xs, const typename Weights<KIND>::T* w, const float* scales, float* y,
             int n, int k, int m0, int n0, int n1, bool add) {
    const int part = S > 1 ? (n1 - n0) / S : 0;
    if (part > 0) tile<KIND, M, S>(x, xs, w, scales, y, n, k, m0, n0, part, part, add);
    const int rest = n0 + S * part;
    if (rest < n1) tile<KIND, M, 1>(x, xs, w, scales, y, n, k, m0, rest, 0, n1 - rest, add);
}

// All rows of x times weight rows [n0, n1). Up to four rows of x: each weight row is read from memory
// once (one row of x: at four places at once, two to four rows: at two).
// More rows, too long for a panel (k over 16384): each weight row is read from memory once, for
// the first four rows of x, and from the L1 cache for the rest.
template <int KIND>
void rows(const float* x, const float* xs, const typename Weights<KIND>::T* w, const float* scales, float* y,
          int m, int n, int k, int n0, int n1, bool add) {
    switch (m) {
        case 1: streams<KIND, 1, 4>(x, xs, w, scales, y, n, k, 0, n0, n1, add); return;
        case 2: streams<KIND, 2, 2>(x, xs, w, scales, y, n, k, 0, n0, n1, add); return;
        case 3: streams<KIND, 3, 2>(x, xs, w, scales, y, n, k, 0, n0, n1, add); return;
        case 4: streams<KIND, 4, 2>(x, xs, w, scales, y, n, k, 0, n0, n1, add); return;
    }
    for (int row = n0; row < n1; row++) {
        int i = 0;
        for (; i + 4 <= m; i += 4) tile<KIND, 4, 1>(x, xs, w, scales, y, n, k, i, row, 0, 1, add);
        switch (m - i) {
            case 3: tile<KIND, 3, 1>(x, xs, w, scales, y, n, k, i, row, 0, 1, add); break;
            case 2: tile<KIND, 2, 1>(x, xs, w, scales, y, n, k, i, row, 0, 1, add); break;
            case 1: tile<KIND, 1, 1>(x, xs, w, scales, y, n, k, i, row, 0, 1, add); break;
        }
    }
}

// Many rows (5 and more): compute-bound, so each block of 16 weight rows is converted to float32 once
// and transposed into a panel [k][16] that stays in cache, and an outer-product micro-kernel multiplies
// it by up to 6 rows of x at a time (x rearranged once per call into [k][rows] tiles): per k, two panel
// loads and one broadcast per row feed 2 FMAs per row, 12 accumulators in registers. While the first
// tile of a block runs, the thread's next weight block is prefetched, so converting it reads the cache.
// int8 sums are multiplied by their weight rows' scales as they are stored.
constexpr int PANEL = 16;  // weight rows per panel
constexpr int TILE = 6;    // rows of x per micro-kernel call

// float32, float16 and int8: 8 values of each of 8 rows, converted, then an 8x8 transpose in registers.
template <int KIND>
void fill_panel(const typename Weights<KIND>::T* w, int k, int n0, int count, float* panel) {
    int j = 0;
    if (count == PANEL) {
        const typename Weights<KIND>::T* rows = w + (size_t)n0 * k;
        for (; j + 8 <= k; j += 8)
            for (int half = 0; half < 2; half++) {
                __m256 v[8];
                for (int i = 0; i < 8; i++) v[i] = load8(rows + (size_t)(half * 8 + i) * k + j);
                const __m256 a0 = _mm256_unpacklo_ps(v[0], v[1]), a1 = _mm256_unpackhi_ps(v[0], v[1]);
                const __m256 a2 = _mm256_unpacklo_ps(v[2], v[3]), a3 = _mm256_unpackhi_ps(v[2], v[3]);
                const __m256 a4 = _mm256_unpacklo_ps(v[4], v[5]), a5 = _mm256_unpackhi_ps(v[4], v[5]);
                const __m256 a6 = _mm256_unpacklo_ps(v[6], v[7]), a7 = _mm256_unpackhi_ps(v[6], v[7]);
                const __m256 b0 = _mm256_shuffle_ps(a0, a2, 0x44), b1 = _mm256_shuffle_ps(a0, a2, 0xEE);
                const __m256 b2 = _mm256_shuffle_ps(a1, a3, 0x44), b3 = _mm256_shuffle_ps(a1, a3, 0xEE);
                const __m256 b4 = _mm256_shuffle_ps(a4, a6, 0x44), b5 = _mm256_shuffle_ps(a4, a6, 0xEE);
                const __m256 b6 = _mm256_shuffle_ps(a5, a7, 0x44), b7 = _mm256_shuffle_ps(a5, a7, 0xEE);
                const __m256 t[8] = {_mm256_permute2f128_ps(b0, b4, 0x20), _mm256_permute2f128_ps(b1, b5, 0x20),
                                     _mm256_permute2f128_ps(b2, b6, 0x20), _mm256_permute2f128_ps(b3, b7, 0x20),
                                     _mm256_permute2f128_ps(b0, b4, 0x31), _mm256_permute2f128_ps(b1, b5, 0x31),
                                     _mm256_permute2f128_ps(b2, b6, 0x31), _mm256_permute2f128_ps(b3, b7, 0x31)};
                for (int u = 0; u < 8; u++) _mm256_store_ps(panel + (size_t)(j + u) * PANEL + half * 8, t[u]);
            }
    }
    for (; j < k; j++)
        for (int c = 0; c < PANEL; c++)
            panel[(size_t)j * PANEL + c] = c < count ? Weights<KIND>::one(w[(size_t)(n0 + c) * k + j]) : 0.0f;
}

// bfloat16: a pair of values (j, j + 1) of a row is one 32-bit unit; 4x4 transposes of such units in
// each 128-bit lane give, per unit vector (8 rows), the values at j (shift left 16) and j + 1 (mask).
template <>
void fill_panel<BF16>(const uint16_t* w, int k, int n0, int count, float* panel) {
    int j = 0;
    if (count == PANEL) {
        const uint16_t* rows = w + (size_t)n0 * k;
        const __m256i high = _mm256_set1_epi32((int)0xFFFF0000u);
        for (; j + 8 <= k; j += 8) {
            float* out = panel + (size_t)j * PANEL;
            for (int half = 0; half < 2; half++) {
                const uint16_t* r = rows + (size_t)half * 8 * k + j;
                __m256i v[4];
                for (int i = 0; i < 4; i++)
                    v[i] = _mm256_inserti128_si256(
                        _mm256_castsi128_si256(_mm_loadu_si128((const __m128i*)(r + (size_t)i * k))),
                        _mm_loadu_si128((const __m128i*)(r + (size_t)(i + 4) * k)), 1);
                __m256i a0 = _mm256_unpacklo_epi32(v[0], v[1]), a1 = _mm256_unpackhi_epi32(v[0], v[1]);
                __m256i a2 = _mm256_unpacklo_epi32(v[2], v[3]), a3 = _mm256_unpackhi_epi32(v[2], v[3]);
                __m256i t[4] = {_mm256_unpacklo_epi64(a0, a2), _mm256_unpackhi_epi64(a0, a2),
                                _mm256_unpacklo_epi64(a1, a3), _mm256_unpackhi_epi64(a1, a3)};
                for (int u = 0; u < 4; u++) {
                    _mm256_store_si256((__m256i*)(out + (2 * u) * PANEL + half * 8), _mm256_slli_epi32(t[u], 16));
                    _mm256_store_si256((__m256i*)(out + (2 * u + 1) * PANEL + half * 8), _mm256_and_si256(t[u], high));
                }
            }
        }
    }
    for (; j < k; j++)
        for (int c = 0; c < PANEL; c++)
            panel[(size_t)j * PANEL + c] = c < count ? Weights<BF16>::one(w[(size_t)(n0 + c) * k + j]) : 0.0f;
}

// 16 sums of a row of y (times the weight rows' scales, for int8) stored or added there.
inline void store16(__m256 lo, __m256 hi, float* y, int count, bool add, const float* scales) {
    if (scales && count == PANEL) {
        lo = _mm256_mul_ps(lo, _mm256_loadu_ps(scales));
        hi = _mm256_mul_ps(hi, _mm256_loadu_ps(scales + 8));
    }
    if (count == PANEL) {
        _mm256_storeu_ps(y, add ? _mm256_add_ps(_mm256_loadu_ps(y), lo) : lo);
        _mm256_storeu_ps(y + 8, add ? _mm256_add_ps(_mm256_loadu_ps(y + 8), hi) : hi);
        return;
    }
    float tmp[PANEL];
    _mm256_storeu_ps(tmp, lo);
    _mm256_storeu_ps(tmp + 8, hi);
    for (int c = 0; c < count; c++) y[c] = (add ? y[c] : 0.0f) + (scales ? tmp[c] * scales[c] : tmp[c]);
}

// y[m0 .. m0 + R) x [n0, n0 + count) from the x tile a [k][R] and the panel; every 2 k, requests the next
// `lines` cache lines from `ahead` on, until `ahead_end`. The accumulators are named variables: gcc
// keeps them in registers, where an array was spilled to the stack.
template <int R>
__attribute__((always_inline)) inline void micro(const float* a, const float* panel, float* y, int n, int k, int m0,
                                                 int n0, int count, const char* ahead, const char* ahead_end, int lines, bool add,
                                                 const float* scales) {
    const __m256 z = _mm256_setzero_ps();
    __m256 c00 = z, c01 = z, c10 = z, c11 = z, c20 = z, c21 = z, c30 = z, c31 = z, c40 = z, c41 = z, c50 = z, c51 = z;
#define VICUNA_ROW(i, lo, hi)                       \
    if (R > i) {                                    \
        __m256 b = _mm256_broadcast_ss(a + i);      \
        lo = _mm256_fmadd_ps(b, p0, lo);            \
        hi = _mm256_fmadd_ps(b, p1, hi);            \
    }
#define VICUNA_STEP()                                                                     \
    {                                                                                     \
        __m256 p0 = _mm256_load_ps(panel), p1 = _mm256_load_ps(panel + 8);                \
        VICUNA_ROW(0, c00, c01) VICUNA_ROW(1, c10, c11) VICUNA_ROW(2, c20, c21)           \
        VICUNA_ROW(3, c30, c31) VICUNA_ROW(4, c40, c41) VICUNA_ROW(5, c50, c51)           \
        panel += PANEL;                                                                   \
        a += R;                                                                           \
    }
    int j = 0;
    for (; j + 2 <= k; j += 2) {
        for (int l = 0; l < lines; l++, ahead += 64)
            if (ahead < ahead_end) _mm_prefetch(ahead, _MM_HINT_T0);
        VICUNA_STEP() VICUNA_STEP()
    }
    if (j < k) VICUNA_STEP()
#undef VICUNA_STEP
#undef VICUNA_ROW
    float* row = y + (size_t)m0 * n + n0;
    store16(c00, c01, row, count, add, scales);
    if (R > 1) store16(c10, c11, row + (size_t)n, count, add, scales);
    if (R > 2) store16(c20, c21, row + (size_t)2 * n, count, add, scales);
    if (R > 3) store16(c30, c31, row + (size_t)3 * n, count, add, scales);
    if (R > 4) store16(c40, c41, row + (size_t)4 * n, count, add, scales);
    if (R > 5) store16(c50, c51, row + (size_t)5 * n, count, add, scales);
}

thread_local float* panel_buffer = nullptr;  // one panel per thread, kept for the next call

template <int KIND>
void many_rows(const float* tiles, const typename Weights<KIND>::T* w, const float* scales, float* y, int m, int n,
               int k, int b0, int b1, bool add) {
    if (!panel_buffer) panel_buffer = (float*)aligned_alloc(64, sizeof(float) * PANEL * 16384);
    float* panel = panel_buffer;
    for (int b = b0; b < b1; b++) {
        const int n0 = b * PANEL, count = n - n0 < PANEL ? n - n0 : PANEL;
        fill_panel<KIND>(w, k, n0, count, panel);
        const char* ahead = nullptr;
        const char* ahead_end = nullptr;
        const int lines = sizeof(typename Weights<KIND>::T) > 2 ? 2 : 1;  // a block in k / 2 requests
        if (b + 1 < b1) {
            const int next = n0 + PANEL, rows = n - next < PANEL ? n - next : PANEL;
            ahead = (const char*)(w + (size_t)next * k);
            ahead_end = ahead + (size_t)rows * k * sizeof(typename Weights<KIND>::T);
        }
        const float* sc = scales ? scales + n0 : nullptr;
        for (int m0 = 0; m0 < m;) {
            const int r = m - m0 < TILE ? m - m0 : TILE;
            const float* a = tiles + (size_t)m0 * k;
            switch (r) {
                case 6: micro<6>(a, panel, y, n, k, m0, n0, count, ahead, ahead_end, lines, add, sc); break;
                case 5: micro<5>(a, panel, y, n, k, m0, n0, count, ahead, ahead_end, lines, add, sc); break;
                case 4: micro<4>(a, panel, y, n, k, m0, n0, count, ahead, ahead_end, lines, add, sc); break;
                case 3: micro<3>(a, panel, y, n, k, m0, n0, count, ahead, ahead_end, lines, add, sc); break;
                case 2: micro<2>(a, panel, y, n, k, m0, n0, count, ahead, ahead_end, lines, add, sc); break;
                default: micro<1>(a, panel, y, n, k, m0, n0, count, ahead, ahead_end, lines, add, sc); break;
            }
            ahead = ahead_end;  // the next block is requested during the first tile only
            m0 += r;
        }
    }
}

// Room for n floats at a 64-byte boundary (a cache line): 32-byte loads from it never straddle two lines.
inline float* floats(size_t n) { return (float*)aligned_alloc(64, (sizeof(float) * n + 63) / 64 * 64); }

// Rows x[0, m) times w into y, with what the layer does around the product (`around`). The rows are
// first prepared (gated, normalized) and rearranged for the kernels: x as [k][rows] tiles of TILE rows
// for the panels, else each row in the order load16 gives a block's values. More than four rows: once,
// split between the threads; up to four: each thread prepares its own copy (a few thousand values:
// cheaper than making the threads wait for each other twice).
template <int KIND>
void product(const float* x, const void* w, const float* scales, float* y, int m, int n, int k,
             const Around& around) {
    using W = Weights<KIND>;
    const bool parallel = (size_t)m * n * k >= (1u << 15), prepared = around.norm || around.gated;
    const bool panels = m > FEW_ROWS && k <= 16384, shared = m > FEW_ROWS;
    const size_t width = around.gated ? 2 * (size_t)k : k, k16 = k & ~15, row = panels ? k : k16;
    float* shared_in = shared && prepared ? (float*)malloc(sizeof(float) * m * k) : nullptr;
    float* shared_xs = shared ? floats(m * row + 1) : nullptr;
#pragma omp parallel if (parallel)
    {
        const int t = omp_get_thread_num(), threads = omp_get_num_threads();
        float* in = shared ? shared_in : prepared ? (float*)malloc(sizeof(float) * m * k) : nullptr;
        float* xs = shared ? shared_xs : floats(m * row + 1);
        auto prepare_row = [&](int i) {
            if (prepared) prepare(x + i * width, in + (size_t)i * k, k, around);
        };
        const float* rows_in = prepared ? in : x;  // rows of k values either way
        auto rearrange_row = [&](int i) {
            const float* xr = rows_in + (size_t)i * k;
            float* out = xs + i * k16;
            for (size_t j = 0; j < k16; j += 16)
                for (int v = 0; v < 8; v++) {
                    out[j + v] = W::odd_even ? xr[j + 2 * v + 1] : xr[j + v];
                    out[j + 8 + v] = W::odd_even ? xr[j + 2 * v] : xr[j + 8 + v];
                }
        };
        if (shared) {
#pragma omp for schedule(static)
            for (int i = 0; i < m; i++) prepare_row(i);
            if (panels) {
#pragma omp for schedule(static)
                for (int m0 = 0; m0 < m; m0 += TILE) {
                    const int r = m - m0 < TILE ? m - m0 : TILE;
                    float* out = xs + (size_t)m0 * k;
                    for (int j = 0; j < k; j++)
                        for (int i = 0; i < r; i++) out[(size_t)j * r + i] = rows_in[(size_t)(m0 + i) * k + j];
                }
            } else {
#pragma omp for schedule(static)
                for (int i = 0; i < m; i++) rearrange_row(i);
            }
        } else {
            for (int i = 0; i < m; i++) prepare_row(i), rearrange_row(i);
        }
        const typename W::T* wt = (const typename W::T*)w;
        if (panels) {
            const int blocks = (n + PANEL - 1) / PANEL;
            many_rows<KIND>(xs, wt, scales, y, m, n, k, (int)((long)blocks * t / threads),
                            (int)((long)blocks * (t + 1) / threads), around.add);
        } else {
            const int n0 = (int)((long)n * t / threads), n1 = (int)((long)n * (t + 1) / threads);
            rows<KIND>(rows_in, xs, wt, scales, y, m, n, k, n0, n1, around.add);
        }
        if (!shared) {
            free(in);
            free(xs);
        }
    }
    free(shared_in);
    free(shared_xs);
}

// bfloat16 and int8 weights on CPUs with AVX512-BF16 (`dot_bf16`): the rows of x are rounded to bfloat16
// (as PyTorch rounds them for a bfloat16 product) and `vdpbf16ps` multiplies 32 pairs of values and adds
// them into 16 float32 sums in one instruction, reading the weights as stored, row-major (int8 widened to
// bfloat16, which holds every int8 value exactly). A tile is R rows of x by 4 weight rows: 4R vectors of
// partial sums along k, each summed across its lanes at the end (`lane_sums`). Built for such CPUs only
// (the target attribute), chosen at run time; compilers that do not know AVX512-BF16 and AMX by name
// (before gcc 11 and clang 16) build the kernel without it.
#if (defined(__clang__) && __clang_major__ >= 16) || (!defined(__clang__) && __GNUC__ >= 11)
#define VICUNA_DOT 1
#define VICUNA_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

constexpr int DOT_COLUMNS = 4;  // weight rows per tile

// Whether the bfloat16 and int8 products use AVX512-BF16: on such CPUs, except those with AMX (whose tile
// units PyTorch's kernels use for many bfloat16 rows), unless set otherwise (vicuna_dot_bf16).
int dot_bf16_on = -1;  // -1: not yet decided
bool dot_bf16() {
    if (dot_bf16_on < 0)
        dot_bf16_on = __builtin_cpu_supports("avx512bf16") && !__builtin_cpu_supports("amx-bf16") ? 1 : 0;
    return dot_bf16_on == 1;
}

// One vector of the sums of 16 vectors' lanes: lane i = the sum of v[i]'s 16 lanes. Halves added to
// halves, then quarters, then pairs within each 128-bit lane: 46 instructions for 16 sums.
VICUNA_AVX512_BF16 __attribute__((always_inline)) inline __m512 lane_sums(const __m512* v) {
    __m512 h[8], q[4];
    for (int i = 0; i < 8; i++)  // [v[2i]'s 8 partial sums | v[2i + 1]'s]
        h[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                             _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
    for (int i = 0; i < 4; i++)  // 128-bit lane L: v[4i + L]'s 4 partial sums
        q[i] = _mm512_add_ps(_mm512_shuffle_f32x4(h[2 * i], h[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(h[2 * i], h[2 * i + 1], 0xDD));
    const __m512 a = _mm512_add_ps(_mm512_unpacklo_ps(q[0], q[1]), _mm512_unpackhi_ps(q[0], q[1]));
    const __m512 b = _mm512_add_ps(_mm512_unpacklo_ps(q[2], q[3]), _mm512_unpackhi_ps(q[2], q[3]));
    // lane L: the sums of v[L], v[4 + L], v[8 + L], v[12 + L]
    const __m512 c = _mm512_add_ps(_mm512_shuffle_ps(a, b, 0x44), _mm512_shuffle_ps(a, b, 0xEE));
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), c);
}

// 32 weights from w (those in `mask`, the others zero) as bfloat16: as stored, or int8 widened (exactly).
VICUNA_AVX512_BF16 __attribute__((always_inline)) inline __m512bh load32(const uint16_t* w, __mmask32 mask) {
    return (__m512bh)_mm512_maskz_loadu_epi16(mask, w);
}
VICUNA_AVX512_BF16 __attribute__((always_inline)) inline __m512bh load32(const int8_t* w, __mmask32 mask) {
    const __m256i v = _mm256_maskz_loadu_epi8(mask, w);
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(v)));
    const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(v, 1)));
    return _mm512_cvtne2ps_pbh(hi, lo);
}

// y[m0 .. m0 + R) x [n0 + c stride] for c < count <= 4, from the rows of x xb (bfloat16, `kp` apart, zero
// past k) and the weight rows `rows` (as stored, or int8 widened to bfloat16: see `load32`; past count,
// any row, whose sums are dropped); the sums times scales[n0 + c stride] where there are scales (int8
// weights). At each step `lines` cache lines from `ahead` on are requested from memory, up to
// `ahead_end` (`ahead` moves on). The sums are named variables: in an array, gcc stored them to memory
// at every step.
template <int R, typename T>
VICUNA_AVX512_BF16 void dot_tile(const uint16_t* xb, int kp, const T* const* rows, int k, int n0, int stride,
                                 int count, const float* scales, float* y, int n, int m0, bool add,
                                 const char*& ahead, const char* ahead_end, int lines) {
    static_assert(DOT_COLUMNS == 4, "a tile's sums are written out for 4 weight rows");
    const __m512 z = _mm512_setzero_ps();
    __m512 s00 = z, s01 = z, s02 = z, s03 = z, s10 = z, s11 = z, s12 = z, s13 = z;
    __m512 s20 = z, s21 = z, s22 = z, s23 = z, s30 = z, s31 = z, s32 = z, s33 = z;
    const T *w0 = rows[0], *w1 = rows[1], *w2 = rows[2], *w3 = rows[3];
    const uint16_t* x = xb + (size_t)m0 * kp;
#define VICUNA_DOT_ROW(i, a0, a1, a2, a3)                                                       \
    if (R > i) {                                                                              \
        const __m512bh a = (__m512bh)_mm512_load_si512(x + (size_t)i * kp + j);               \
        a0 = _mm512_dpbf16_ps(a0, a, b0), a1 = _mm512_dpbf16_ps(a1, a, b1);                   \
        a2 = _mm512_dpbf16_ps(a2, a, b2), a3 = _mm512_dpbf16_ps(a3, a, b3);                   \
    }
#define VICUNA_DOT_STEP(mask)                                                                 \
    {                                                                                         \
        const __m512bh b0 = load32(w0 + j, mask), b1 = load32(w1 + j, mask);                  \
        const __m512bh b2 = load32(w2 + j, mask), b3 = load32(w3 + j, mask);                  \
        VICUNA_DOT_ROW(0, s00, s01, s02, s03) VICUNA_DOT_ROW(1, s10, s11, s12, s13)           \
        VICUNA_DOT_ROW(2, s20, s21, s22, s23) VICUNA_DOT_ROW(3, s30, s31, s32, s33)           \
    }
    int j = 0;
    if (ahead < ahead_end) {
        for (; j + 32 <= k; j += 32) {
            for (int l = 0; l < lines && ahead < ahead_end; l++, ahead += 64) _mm_prefetch(ahead, _MM_HINT_T0);
            VICUNA_DOT_STEP(~(__mmask32)0)
        }
    } else {
        for (; j + 32 <= k; j += 32) VICUNA_DOT_STEP(~(__mmask32)0)
    }
    if (j < k) VICUNA_DOT_STEP((__mmask32)((1ull << (k - j)) - 1))
#undef VICUNA_DOT_STEP
#undef VICUNA_DOT_ROW
    const __m512 all[16] = {s00, s01, s02, s03, s10, s11, s12, s13, s20, s21, s22, s23, s30, s31, s32, s33};
    float sums[16];
    _mm512_storeu_ps(sums, lane_sums(all));
    for (int i = 0; i < R; i++) {
        float* out = y + (size_t)(m0 + i) * n + n0;
        for (int c = 0; c < count; c++) {
            const float sum = scales ? sums[4 * i + c] * scales[n0 + c * stride] : sums[4 * i + c];
            out[c * stride] = (add ? out[c * stride] : 0.0f) + sum;
        }
    }
}

// Every row of x times the weight rows `rows` (see `dot_tile`), 4 rows of x at a time.
template <typename T>
VICUNA_AVX512_BF16 void dot_rows(const uint16_t* xb, int kp, const T* const* rows, int k, int n0, int stride,
                                 int count, const float* scales, float* y, int m, int n, bool add,
                                 const char*& ahead, const char* ahead_end, int lines) {
    for (int m0 = 0; m0 < m; m0 += 4) {
#define VICUNA_DOT_TILE(R) \
    dot_tile<R>(xb, kp, rows, k, n0, stride, count, scales, y, n, m0, add, ahead, ahead_end, lines)
        switch (std::min(4, m - m0)) {
            case 4: VICUNA_DOT_TILE(4); break;
            case 3: VICUNA_DOT_TILE(3); break;
            case 2: VICUNA_DOT_TILE(2); break;
            case 1: VICUNA_DOT_TILE(1); break;
        }
#undef VICUNA_DOT_TILE
    }
}

// One row of x, prepared (gated, normalized) and rounded to bfloat16 into xb (kp values, zero past k).
VICUNA_AVX512_BF16 void round_row(const float* x, float* in, uint16_t* xb, int k, int kp, const Around& around) {
    if (around.norm || around.gated) prepare(x, in, k, around), x = in;
    int j = 0;
    for (; j + 16 <= k; j += 16)
        _mm256_store_si256((__m256i*)(xb + j), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x + j)));
    if (j < k) {
        const __m512 tail = _mm512_maskz_loadu_ps((__mmask16)((1u << (k - j)) - 1), x + j);
        _mm256_store_si256((__m256i*)(xb + j), (__m256i)_mm512_cvtneps_pbh(tail));
        j += 16;
    }
    for (; j < kp; j++) xb[j] = 0;
}

// The rows of x as the dot products take them, inside a parallel region: prepared (gated, normalized) and
// rounded to bfloat16, `kp` apart (`round_row`). More than FEW_ROWS rows are split between the threads
// into `shared` (m rows, allocated by the caller before the region); up to FEW_ROWS, each thread rounds
// them all into a copy of its own (a few thousand values: cheaper than making the threads wait for each
// other), which the caller frees. Returns the rows.
VICUNA_AVX512_BF16 uint16_t* rounded_rows(const float* x, int m, int k, int kp, uint16_t* shared,
                                         const Around& around) {
    const size_t width = around.gated ? 2 * (size_t)k : k;
    float* in = around.norm || around.gated ? floats(k) : nullptr;
    uint16_t* xb = shared ? shared : (uint16_t*)aligned_alloc(64, sizeof(uint16_t) * (size_t)m * kp);
    if (shared) {
#pragma omp for schedule(static)
        for (int i = 0; i < m; i++) round_row(x + i * width, in, xb + (size_t)i * kp, k, kp, around);
    } else {
        for (int i = 0; i < m; i++) round_row(x + i * width, in, xb + (size_t)i * kp, k, kp, around);
    }
    free(in);
    return xb;
}

// int8 weight rows as bfloat16 (exact: 8 bits of precision), for `dot_tile`: rows[c] (k values) into
// out + c pitch, zero from k to pitch.
VICUNA_AVX512_BF16 void widen_rows(const int8_t* const* rows, int count, int k, uint16_t* out, size_t pitch) {
    for (int c = 0; c < count; c++)
        for (int j = 0; j < (int)pitch; j += 32) {
            const __mmask32 mask = j + 32 <= k ? ~(__mmask32)0 : j < k ? (__mmask32)((1ull << (k - j)) - 1) : 0;
            _mm512_store_si512(out + c * pitch + j, (__m512i)load32(rows[c] + j, mask));
        }
}

// `product` for bfloat16 or int8 weights on AVX512-BF16. The rows are rounded once (`rounded_rows`), then
// each thread takes a range of tiles of weight rows and multiplies each with every row of x, 4 rows at a
// time, while it is in the L1 cache. int8 tiles are first widened to bfloat16 into a buffer there, once
// for all rows of x.
template <int KIND>
VICUNA_AVX512_BF16 void product_dot(const float* x, const void* weights, const float* scales, float* y, int m, int n,
                                    int k, const Around& around) {
    using T = typename Weights<KIND>::T;
    const T* w = (const T*)weights;
    const int kp = (k + 31) & ~31;
    const bool parallel = (size_t)m * n * k >= (1u << 15);
    uint16_t* shared_xb = m > FEW_ROWS ? (uint16_t*)aligned_alloc(64, sizeof(uint16_t) * (size_t)m * kp) : nullptr;
#pragma omp parallel if (parallel)
    {
        const int t = omp_get_thread_num(), threads = omp_get_num_threads();
        uint16_t* xb = rounded_rows(x, m, k, kp, shared_xb, around);
        const bool widen = KIND == I8 && m > 4;  // int8 tiles widened once into `wide` for every group
        uint16_t* wide = widen ? (uint16_t*)aligned_alloc(64, sizeof(uint16_t) * DOT_COLUMNS * kp) : nullptr;
        const char* ahead = nullptr;  // weights requested from memory while tiles run, up to ahead_end
        const char* ahead_end = nullptr;
        int lines = 0;  // lines requested at each step
        // weight rows n0 + c stride (c < count) times every row of x, 4 rows of x at a time; int8 weights
        // widened as they are loaded (one group of rows of x: 1.9-2x faster than AVX2 for 2-4 rows), or
        // once into `wide` (more groups: 1.1-1.35x faster than widening them for each group)
        auto tile = [&](int n0, int stride, int count) {
            const T* at[DOT_COLUMNS];
            for (int c = 0; c < DOT_COLUMNS; c++) at[c] = w + (size_t)(n0 + (c < count ? c : 0) * stride) * k;
            const uint16_t* widened[DOT_COLUMNS];
            if (widen) {
                widen_rows((const int8_t* const*)at, DOT_COLUMNS, k, wide, kp);
                for (int c = 0; c < DOT_COLUMNS; c++) widened[c] = wide + c * kp;
            }
            if (widen)
                dot_rows(xb, kp, widened, k, n0, stride, count, scales, y, m, n, around.add, ahead, ahead_end, lines);
            else
                dot_rows(xb, kp, at, k, n0, stride, count, scales, y, m, n, around.add, ahead, ahead_end, lines);
        };
        if (m == 1 && KIND == BF16) {  // the thread's weight rows at four places at once (see `tile`)
            const int r0 = (int)((long)n * t / threads), r1 = (int)((long)n * (t + 1) / threads);
            const int part = (r1 - r0) / DOT_COLUMNS;
            for (int r = 0; r < part; r++) tile(r0 + r, part, DOT_COLUMNS);
            for (int r = r0 + DOT_COLUMNS * part; r < r1; r += DOT_COLUMNS) tile(r, 1, std::min(DOT_COLUMNS, r1 - r));
        } else {  // 4 weight rows at a time, each multiplied by every row of x while in the L1 cache. Four
            // places at once were ~1.08x faster for one row of bfloat16 weights, even for 2 rows, and
            // slower from 3 rows on (1.05-1.12x) and for int8 weights.
            const int tiles = (n + DOT_COLUMNS - 1) / DOT_COLUMNS;
            const int b0 = (int)((long)tiles * t / threads), b1 = (int)((long)tiles * (t + 1) / threads);
            // While a tile of weight rows is multiplied by the groups of 4 rows of x, the tile two on is
            // requested from memory, spread over the groups' steps (4 / groups lines a step, rounded up).
            // Requested all during the first group, a 16-row product took ~1.25x longer.
            lines = (DOT_COLUMNS + (m + 3) / 4 - 1) / ((m + 3) / 4);
            for (int b = b0; b < b1; b++) {
                const int n0 = b * DOT_COLUMNS, next = std::min(n, n0 + 2 * DOT_COLUMNS);
                ahead = (const char*)(w + (size_t)next * k);
                ahead_end = (const char*)(w + (size_t)std::min(n, next + DOT_COLUMNS) * k);
                tile(n0, 1, std::min(DOT_COLUMNS, n - n0));
            }
        }
        free(wide);
        if (xb != shared_xb) free(xb);
    }
    free(shared_xb);
}

// bfloat16 and int8 weights packed for the dot products (`vicuna_pack`): each block of 16 weight rows,
// [16][k] as stored, becomes [k/2][16][2], the values 2j and 2j + 1 of its 16 rows side by side, so that
// one 64-byte load (int8: 32 bytes, widened) holds a pair of values of 16 rows. `vdpbf16ps` of that and
// a row of x's pair j, broadcast to every lane, adds to the sums of 16 outputs at once, each in its own
// lane: at the end they are stored as they are, where the row-major tiles above sum each output across
// the lanes of a vector (3 shuffles and adds per output on top of k/32 dot products). A tile is R rows
// of x by C blocks: per pair of k, C loads of weights and R broadcasts of x for R C dot products. On a
// 2-core Zen 5 EPYC a 16-row decode step's products (built-in model, weights read from memory) took
// 1.4-1.65x less time than with the row-major tiles (~5.5 against 7.5-9 ms: ~800 against ~500 GFLOP/s;
// the CPU's dot products peak at ~1,000); one to eight rows of bfloat16 about as long as before. Rows
// past the last whole block (n % 16) stay row-major at the end and go through `dot_tile`.

// A pair of values of each of 16 rows (32 values: one step of a packed block) as bfloat16: as stored, or
// int8 widened (exactly).
VICUNA_AVX512_BF16 __attribute__((always_inline)) inline __m512bh load_pairs(const uint16_t* w) {
    return (__m512bh)_mm512_loadu_si512(w);
}
VICUNA_AVX512_BF16 __attribute__((always_inline)) inline __m512bh load_pairs(const int8_t* w) {
    return load32(w, ~(__mmask32)0);
}

// y[m0 .. m0 + R) x the outputs of C packed blocks, the first at `blocks` (outputs from n0 on), each
// `stride` blocks after the one before, from the rows of x xb (bfloat16, `kp` apart); the sums times
// the weight rows' scales where there are scales (int8). At each step `lines` cache lines from `ahead`
// on are requested from memory, up to ahead_end.
template <int R, int C, typename T>
VICUNA_AVX512_BF16 __attribute__((always_inline)) inline void packed_tile(
    const uint16_t* xb, int kp, const T* blocks, int k, const float* scales, float* y, int n, int n0, int stride,
    int m0, bool add, const char*& ahead, const char* ahead_end, int lines) {
    const int pairs = k / 2;
    __m512 acc[R][C];
#pragma GCC unroll 8
    for (int r = 0; r < R; r++)
#pragma GCC unroll 4
        for (int c = 0; c < C; c++) acc[r][c] = _mm512_setzero_ps();
    const uint32_t* x = (const uint32_t*)(xb + (size_t)m0 * kp);
    for (int j = 0; j < pairs; j++) {
        for (int l = 0; l < lines && ahead < ahead_end; l++, ahead += 64) _mm_prefetch(ahead, _MM_HINT_T0);
        __m512bh v[C];
#pragma GCC unroll 4
        for (int c = 0; c < C; c++) v[c] = load_pairs(blocks + ((size_t)c * stride * pairs + j) * 2 * BLOCK);
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) {
            const __m512bh a = (__m512bh)_mm512_set1_epi32((int)x[(size_t)r * (kp / 2) + j]);
#pragma GCC unroll 4
            for (int c = 0; c < C; c++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], a, v[c]);
        }
    }
#pragma GCC unroll 4
    for (int c = 0; c < C; c++) {
        const int col = n0 + BLOCK * c * stride;
        const __m512 scale = scales ? _mm512_loadu_ps(scales + col) : _mm512_set1_ps(1.0f);
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) {  // one rounding or two the same way in every instantiation (a
            // compiler may fuse a product and a sum in one and not another: 8-bit batches then differed)
            float* out = y + (size_t)(m0 + r) * n + col;
            const __m512 before = add ? _mm512_loadu_ps(out) : _mm512_setzero_ps();
            const __m512 sum = acc[r][c];
            _mm512_storeu_ps(out, scales ? _mm512_fmadd_ps(sum, scale, before) : _mm512_add_ps(before, sum));
        }
    }
}

constexpr int TILE_BLOCKS = 2;  // packed blocks per tile

// Every row of x times C packed blocks (as for `packed_tile`), ROWS rows of x at a time (at most 16 sums
// in registers); the tile at `ahead` (ahead_end: its end) requested from memory meanwhile, `lines` cache
// lines a step.
template <int C, typename T>
VICUNA_AVX512_BF16 void packed_blocks(const uint16_t* xb, int kp, const T* blocks, int k, const float* scales,
                                      float* y, int m, int n, int n0, int stride, bool add, const char* ahead,
                                      const char* ahead_end, int lines) {
    constexpr int ROWS = 16 / C < 8 ? 16 / C : 8;
    for (int m0 = 0; m0 < m; m0 += ROWS) {
#define VICUNA_PACKED_TILE(R) \
    packed_tile<R, C>(xb, kp, blocks, k, scales, y, n, n0, stride, m0, add, ahead, ahead_end, lines)
        switch (std::min(ROWS, m - m0)) {
            case 8: if constexpr (ROWS >= 8) VICUNA_PACKED_TILE(8); break;
            case 7: if constexpr (ROWS >= 7) VICUNA_PACKED_TILE(7); break;
            case 6: if constexpr (ROWS >= 6) VICUNA_PACKED_TILE(6); break;
            case 5: if constexpr (ROWS >= 5) VICUNA_PACKED_TILE(5); break;
            case 4: VICUNA_PACKED_TILE(4); break;
            case 3: VICUNA_PACKED_TILE(3); break;
            case 2: VICUNA_PACKED_TILE(2); break;
            case 1: VICUNA_PACKED_TILE(1); break;
        }
#undef VICUNA_PACKED_TILE
    }
}

// `product` for packed weights (see BLOCK): bfloat16, or int8 with scales. The rows are rounded once
// (`rounded_rows`). One row of x (two of bfloat16), memory-bound: each thread reads its range of blocks
// at several places at once, as `tile` does (bfloat16 at four, int8 at two). In order, a one-row
// bfloat16 decode step took 1.2x longer (each product starts with none of its weights on the way, where
// several places keep several streams going from the start); at four places it is 0.93-0.95x the
// row-major way's time. int8, whose widening adds work, took 1.05-1.07x the row-major way's time at
// four places and 0.9-1.02x at two. From 3 rows of bfloat16 on, four places were 1.0-1.1x slower than in
// order. Otherwise each thread takes a range of tiles of TILE_BLOCKS blocks, multiplies each with every
// row of x (8 at a time; int8 widened as loaded, or, for more than 8 rows, once into a buffer that stays
// in cache) and meanwhile requests the next tile from memory (without the requests, 16 rows' products
// took 1.4-2x longer). The thread with the last tile then multiplies the rows past the last block.
template <int KIND>
VICUNA_AVX512_BF16 void product_packed(const float* x, const void* weights, const float* scales, float* y, int m,
                                       int n, int k, const Around& around) {
    using T = typename Weights<KIND>::T;
    const T* w = (const T*)weights;
    const int kp = (k + 31) & ~31, blocks = n / BLOCK, tiles = (blocks + TILE_BLOCKS - 1) / TILE_BLOCKS;
    const size_t block_size = (size_t)BLOCK * k;
    const bool parallel = (size_t)m * n * k >= (1u << 15);
    uint16_t* shared_xb = m > FEW_ROWS ? (uint16_t*)aligned_alloc(64, sizeof(uint16_t) * (size_t)m * kp) : nullptr;
#pragma omp parallel if (parallel)
    {
        const int t = omp_get_thread_num(), threads = omp_get_num_threads();
        uint16_t* xb = rounded_rows(x, m, k, kp, shared_xb, around);
        const char* none = nullptr;
        auto at_places = [&](auto places) {  // the thread's blocks read at that many places at once
            constexpr int P = decltype(places)::value;
            const int r0 = (int)((long)blocks * t / threads), r1 = (int)((long)blocks * (t + 1) / threads);
            const int part = (r1 - r0) / P;
            for (int r = 0; r < part; r++)
                packed_blocks<P>(xb, kp, w + (r0 + r) * block_size, k, scales, y, m, n, (r0 + r) * BLOCK, part,
                                 around.add, none, none, 0);
            for (int b = r0 + P * part; b < r1; b++)
                packed_blocks<1>(xb, kp, w + b * block_size, k, scales, y, m, n, b * BLOCK, 1, around.add, none,
                                 none, 0);
        };
        if (KIND == BF16 && m <= 2) {
            at_places(std::integral_constant<int, 4>());
        } else if (KIND == I8 && m == 1) {
            at_places(std::integral_constant<int, 2>());
        } else {
            const int passes = (m + 7) / 8, steps = passes * (k / 2);
            const bool widen = KIND == I8 && passes > 1;
            const size_t wide_size = sizeof(uint16_t) * TILE_BLOCKS * block_size;
            uint16_t* wide = widen ? (uint16_t*)aligned_alloc(64, wide_size) : nullptr;
            const size_t tile_bytes = TILE_BLOCKS * block_size * sizeof(T);
            const int lines = (int)((tile_bytes / 64 + steps - 1) / steps);  // the next tile over the steps
            const int t0 = (int)((long)tiles * t / threads), t1 = (int)((long)tiles * (t + 1) / threads);
            for (int i = t0; i < t1; i++) {
                const int b0 = i * TILE_BLOCKS, count = std::min(TILE_BLOCKS, blocks - b0);
                const T* tile = w + b0 * block_size;
                const char* ahead = (const char*)(tile + TILE_BLOCKS * block_size);
                const char* ahead_end = i + 1 < t1 ? ahead + tile_bytes : ahead;
                auto run = [&](auto* from) {
                    if (count == TILE_BLOCKS)
                        packed_blocks<TILE_BLOCKS>(xb, kp, from, k, scales, y, m, n, b0 * BLOCK, 1, around.add, ahead,
                                                   ahead_end, lines);
                    else
                        for (int c = 0; c < count; c++)
                            packed_blocks<1>(xb, kp, from + c * block_size, k, scales, y, m, n, (b0 + c) * BLOCK, 1,
                                             around.add, ahead, ahead, 0);
                };
                if (widen) {
                    for (size_t j = 0; j < count * block_size; j += 32)
                        _mm512_store_si512(wide + j, (__m512i)load_pairs(tile + j));
                    run((const uint16_t*)wide);
                } else {
                    run(tile);
                }
            }
            free(wide);
        }
        if (t == threads - 1) {  // the rows past the last block, row-major
            for (int n0 = blocks * BLOCK; n0 < n; n0 += DOT_COLUMNS) {
                const int count = std::min(DOT_COLUMNS, n - n0);
                const T* at[DOT_COLUMNS];
                for (int c = 0; c < DOT_COLUMNS; c++) at[c] = w + (size_t)(n0 + (c < count ? c : 0)) * k;
                dot_rows(xb, kp, at, k, n0, 1, count, scales, y, m, n, around.add, none, none, 0);
            }
        }
        if (xb != shared_xb) free(xb);
    }
    free(shared_xb);
}

#else
#define VICUNA_DOT 0
bool dot_bf16() { return false; }
template <int KIND>
void product_dot(const float* x, const void* w, const float* scales, float* y, int m, int n, int k, const Around& a) {
    product<KIND>(x, w, scales, y, m, n, k, a);  // never chosen: dot_bf16() is false
}
template <int KIND>
void product_packed(const float*, const void*, const float*, float*, int, int, int, const Around&) {}  // never chosen
#endif

// Decode attention: for each row and KV head, the group of query heads that share it attend to the row's
// first `length` cached positions. Scores and their softmax in float32; one call for every row and head,
// each row over its own length (no padding, no mask). Up to three query heads of a group go through the
// keys and the values together, so that each key and value is loaded and converted once for all of them;
// positions are taken in spans that stay in the L1 cache while every head and block of the head reads
// them. When there are fewer (row, KV head) pairs than a share for every thread, each pair's positions
// are split into pieces that the threads take separately, and the pieces' softmaxes are combined.

constexpr int SPAN = 64;   // positions at a time
constexpr int AHEAD = 16;  // positions ahead of the one read, requested from memory

// Requests the cache lines of one position's `bytes` (a key or a value) from memory.
inline void request(const void* row, int bytes) {
    for (int line = 0; line < bytes; line += 64) _mm_prefetch((const char*)row + line, _MM_HINT_T0);
}

// Scores of G query heads (qs: G x dim, scaled, in load16 order) against the keys of positions [p0, p1):
// out[g * stride + p - p0]. Each key is loaded once for the G heads; a block of positions at a time (8, 4
// or 2 for 1, 2 or 3 heads), the queries' 16 values at a time in registers. The sums are named variables
// (gcc keeps them in registers, where it stored an array back to memory at every position).
template <int KIND, int G>
void score(const float* qs, const typename Weights<KIND>::T* keys, long step, int p0, int p1, int dim, float* out,
           int stride) {
    using W = Weights<KIND>;
    constexpr int P = G == 1 ? 8 : G == 2 ? 4 : 2;
    const int row_bytes = dim * sizeof(typename W::T);
    const __m256 z = _mm256_setzero_ps();
    // four sums of 8 lanes each, in one vector of 4
    auto four = [](__m256 x0, __m256 x1, __m256 x2, __m256 x3) {
        const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(x0, x1), _mm256_hadd_ps(x2, x3));
        return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
    };
    float* o0 = out;
    float* o1 = out + stride;
    float* o2 = out + 2 * (size_t)stride;
    int p = p0;
    for (; p + P <= p1; p += P) {
        __m256 a00 = z, a01 = z, a02 = z, a03 = z, a04 = z, a05 = z, a06 = z, a07 = z;
        __m256 a10 = z, a11 = z, a12 = z, a13 = z, a20 = z, a21 = z;
        __m256 a14, a15, a16, a17, a22, a23, a24, a25, a26, a27;  // named by the macro below, never used
        for (int i = 0; i < P; i++) request(keys + (size_t)(p + i + AHEAD) * step, row_bytes);  // keys AHEAD on
        for (int d = 0; d < dim; d += 16) {
            const __m256 q00 = _mm256_loadu_ps(qs + d), q01 = _mm256_loadu_ps(qs + d + 8);
            const __m256 q10 = G > 1 ? _mm256_loadu_ps(qs + dim + d) : z;
            const __m256 q11 = G > 1 ? _mm256_loadu_ps(qs + dim + d + 8) : z;
            const __m256 q20 = G > 2 ? _mm256_loadu_ps(qs + 2 * dim + d) : z;
            const __m256 q21 = G > 2 ? _mm256_loadu_ps(qs + 2 * dim + d + 8) : z;
#define VICUNA_KEY(i)                                                                                             \
    if (P > i) {                                                                                                  \
        __m256 lo, hi;                                                                                            \
        W::load16(keys + (size_t)(p + i) * step + d, lo, hi);                                                     \
        a0##i = _mm256_fmadd_ps(hi, q01, _mm256_fmadd_ps(lo, q00, a0##i));                                         \
        if (G > 1) a1##i = _mm256_fmadd_ps(hi, q11, _mm256_fmadd_ps(lo, q10, a1##i));                               \
        if (G > 2) a2##i = _mm256_fmadd_ps(hi, q21, _mm256_fmadd_ps(lo, q20, a2##i));                               \
    }
            VICUNA_KEY(0) VICUNA_KEY(1) VICUNA_KEY(2) VICUNA_KEY(3)
            VICUNA_KEY(4) VICUNA_KEY(5) VICUNA_KEY(6) VICUNA_KEY(7)
#undef VICUNA_KEY
        }
        const int at = p - p0;
        if (G == 1) {
            const __m256 t0 = _mm256_hadd_ps(_mm256_hadd_ps(a00, a01), _mm256_hadd_ps(a02, a03));
            const __m256 t1 = _mm256_hadd_ps(_mm256_hadd_ps(a04, a05), _mm256_hadd_ps(a06, a07));
            _mm256_storeu_ps(o0 + at, _mm256_add_ps(_mm256_permute2f128_ps(t0, t1, 0x20),
                                                    _mm256_permute2f128_ps(t0, t1, 0x31)));
        } else if (G == 2) {
            _mm_storeu_ps(o0 + at, four(a00, a01, a02, a03));
            _mm_storeu_ps(o1 + at, four(a10, a11, a12, a13));
        } else {
            const __m128 s01 = four(a00, a01, a10, a11), s2 = four(a20, a21, a20, a21);
            _mm_storel_pi((__m64*)(o0 + at), s01);
            _mm_storeh_pi((__m64*)(o1 + at), s01);
            _mm_storel_pi((__m64*)(o2 + at), s2);
        }
    }
    for (; p < p1; p++)
        for (int g = 0; g < G; g++) {
            __m256 acc = z;
            for (int d = 0; d < dim; d += 16) {
                __m256 lo, hi;
                W::load16(keys + (size_t)p * step + d, lo, hi);
                acc = _mm256_fmadd_ps(hi, _mm256_loadu_ps(qs + g * dim + d + 8),
                                      _mm256_fmadd_ps(lo, _mm256_loadu_ps(qs + g * dim + d), acc));
            }
            out[(size_t)g * stride + (p - p0)] = sum8(acc);
        }
}

// acc[g][0 .. 16 B) += sum over positions p in [p0, p1) of weights[g * stride + p - p0] * values[p][0 .. 16 B),
// in load16 order: each block of values is loaded once for the G heads (G B <= 4, named sums as above).
// `first`: the call that reads each position's first block, which requests the values AHEAD positions on.
template <int KIND, int G, int B>
void weigh(const float* weights, int stride, const typename Weights<KIND>::T* values, long step, int p0, int p1,
           float* acc, int dim, bool first) {
    using W = Weights<KIND>;
    const __m256 z = _mm256_setzero_ps();
    __m256 s00 = z, s01 = z, s02 = z, s03 = z, s04 = z, s05 = z, s06 = z, s07 = z;  // head 0, blocks 0-3
    __m256 s10 = z, s11 = z, s12 = z, s13 = z, s20 = z, s21 = z;                    // heads 1, 2
#define VICUNA_SUMS(X)                                                                                 \
    X(s00, 0, 0) X(s01, 0, 8) X(s10, 1, 0) X(s11, 1, 8) X(s20, 2, 0) X(s21, 2, 8) X(s02, 0, 16) \
    X(s03, 0, 24) X(s12, 1, 16) X(s13, 1, 24) X(s04, 0, 32) X(s05, 0, 40) X(s06, 0, 48) X(s07, 0, 56)
#define VICUNA_USED(g, at) (G > g && 16 * B > at)
#define VICUNA_LOAD(v, g, at) if (VICUNA_USED(g, at)) v = _mm256_loadu_ps(acc + g * dim + at);
    VICUNA_SUMS(VICUNA_LOAD)
    const int row_bytes = dim * sizeof(typename W::T);
    for (int p = p0; p < p1; p++) {
        const typename W::T* row = values + (size_t)p * step;
        if (first) request(row + AHEAD * step, row_bytes);
        const __m256 w0 = _mm256_broadcast_ss(weights + (p - p0));
        const __m256 w1 = G > 1 ? _mm256_broadcast_ss(weights + stride + (p - p0)) : z;
        const __m256 w2 = G > 2 ? _mm256_broadcast_ss(weights + 2 * (size_t)stride + (p - p0)) : z;
        __m256 lo, hi;
#define VICUNA_FMA(v, g, at)                                                                              \
    if (VICUNA_USED(g, at)) {                                                                             \
        if (g == 0 && at % 16 == 0) W::load16(row + at, lo, hi);                                          \
        v = _mm256_fmadd_ps(w##g, at % 16 ? hi : lo, v);                                                  \
    }
        VICUNA_SUMS(VICUNA_FMA)
    }
#define VICUNA_STORE(v, g, at) if (VICUNA_USED(g, at)) _mm256_storeu_ps(acc + g * dim + at, v);
    VICUNA_SUMS(VICUNA_STORE)
#undef VICUNA_SUMS
#undef VICUNA_USED
#undef VICUNA_LOAD
#undef VICUNA_FMA
#undef VICUNA_STORE
}

// `weigh` over the next min(B, left) blocks of 16 values from d on (B: at most what the registers hold for G
// heads); answers how many it took.
template <int KIND, int G, int B>
int weigh_blocks(const float* weights, int stride, const typename Weights<KIND>::T* values, long step, int p0, int p1,
                 float* acc, int dim, int d, int left) {
    if constexpr (B > 1) {
        if (left < B) return weigh_blocks<KIND, G, B - 1>(weights, stride, values, step, p0, p1, acc, dim, d, left);
    }
    weigh<KIND, G, B>(weights, stride, values + d, step, p0, p1, acc + d, dim, d == 0);
    return B;
}

// acc (G x dim, load16 order) += the values of positions [p0, p1) weighed by G heads' weights (row stride
// `stride`, from p0), as many blocks of 16 at a time as the registers hold.
template <int KIND, int G>
void heads_values(const float* weights, int stride, const typename Weights<KIND>::T* values, long step, int p0, int p1,
                  float* acc, int dim) {
    constexpr int B = 4 / G > 2 ? 4 : 4 / G;  // G B <= 4: 2 G B sums in registers
    for (int d = 0; d < dim;)
        d += 16 * weigh_blocks<KIND, G, B>(weights, stride, values, step, p0, p1, acc, dim, d, (dim - d) / 16);
}

// One piece of a (row, KV head) pair: the group's query heads q (rotated, group x dim) over the cached
// positions [p0, p1): for each head g, the largest score top[g], the sum of the scores' exponentials
// (minus top) total[g], and out[g] = the values weighed by those exponentials, not yet divided by the
// sum (divided when `normalize`). scores: group x (p1 - p0) floats; acc: group x dim.
template <int KIND>
void attend_piece(const float* q, const typename Weights<KIND>::T* keys, const typename Weights<KIND>::T* values,
                  long step, int p0, int p1, int group, int dim, bool normalize, float* out, float* top, float* total,
                  float* scores, float* acc) {
    using W = Weights<KIND>;
    const float scale = 1.0f / sqrtf((float)dim);
    const int length = p1 - p0;
    for (int p = p0; p < p1 && p < p0 + AHEAD; p++) {  // the first keys and values, while the queries are arranged
        request(keys + (size_t)p * step, dim * sizeof(typename W::T));
        request(values + (size_t)p * step, dim * sizeof(typename W::T));
    }
    float qs[8 * 256];  // the group's queries, scaled, in the order load16 gives a block's values
    for (int g = 0; g < group; g++)
        for (int d = 0; d < dim; d += 16)
            for (int t = 0; t < 8; t++) {
                const float* qr = q + (size_t)g * dim + d;
                qs[g * dim + d + t] = scale * (W::odd_even ? qr[2 * t + 1] : qr[t]);
                qs[g * dim + d + 8 + t] = scale * (W::odd_even ? qr[2 * t] : qr[8 + t]);
            }
    // the group in sets of at most three heads, as even as can be: 4 = 2 + 2, 7 = 3 + 2 + 2
    int sets = (group + 2) / 3, first[3], size[3];
    for (int c = 0, g = 0; c < sets; c++) {
        size[c] = (group - g) / (sets - c);
        first[c] = g;
        g += size[c];
    }
    auto each_set = [&](auto&& run) {
        for (int c = 0; c < sets; c++) {
            switch (size[c]) {
                case 1: run(std::integral_constant<int, 1>{}, first[c]); break;
                case 2: run(std::integral_constant<int, 2>{}, first[c]); break;
                default: run(std::integral_constant<int, 3>{}, first[c]); break;
            }
        }
    };
    for (int s0 = p0; s0 < p1; s0 += SPAN) {
        const int s1 = s0 + SPAN < p1 ? s0 + SPAN : p1;
        each_set([&](auto G, int g0) {
            score<KIND, G>(qs + g0 * dim, keys, step, s0, s1, dim, scores + (size_t)g0 * length + (s0 - p0), length);
        });
    }
    for (int g = 0; g < group; g++) {
        float* s = scores + (size_t)g * length;
        bool nan;
        const float best = row_max(s, length, nan);
        __m256 sum = _mm256_setzero_ps();
        int p = 0;
        for (; p + 8 <= length; p += 8) {
            __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(s + p), _mm256_set1_ps(best)));
            _mm256_storeu_ps(s + p, e);
            sum = _mm256_add_ps(sum, e);
        }
        float all = sum8(sum);
        if (p < length) {
            float rest[8] = {0}, e[8];
            for (int i = 0; p + i < length; i++) rest[i] = s[p + i] - best;
            _mm256_storeu_ps(e, exp_nonpositive(_mm256_loadu_ps(rest)));
            for (int i = 0; p + i < length; i++) s[p + i] = e[i], all += e[i];
        }
        top[g] = best;
        total[g] = all;
    }
    memset(acc, 0, sizeof(float) * group * dim);
    for (int s0 = p0; s0 < p1; s0 += SPAN) {
        const int s1 = s0 + SPAN < p1 ? s0 + SPAN : p1;
        each_set([&](auto G, int g0) {
            heads_values<KIND, G>(scores + (size_t)g0 * length + (s0 - p0), length, values, step, s0, s1,
                                  acc + g0 * dim, dim);
        });
    }
    for (int g = 0; g < group; g++) {
        const float inv = normalize ? 1.0f / total[g] : 1.0f;
        const float* a = acc + g * dim;
        float* o = out + (size_t)g * dim;
        for (int d = 0; d < dim; d += 16)
            for (int t = 0; t < 8; t++) {
                o[d + (W::odd_even ? 2 * t + 1 : t)] = inv * a[d + t];
                o[d + (W::odd_even ? 2 * t : 8 + t)] = inv * a[d + 8 + t];
            }
    }
}

template <int KIND>
void attend(const float* mixed, const float* rope, int rope_positions, void* keys, void* values, const long* strides,
            const int* positions, float* out, int rows, int heads, int kv_heads, int dim) {
    using W = Weights<KIND>;
    const int group = heads / kv_heads, width = (heads + 2 * kv_heads) * dim, half = dim / 2;
    int longest = 0;
    for (int r = 0; r < rows; r++) longest = positions[r] + 1 > longest ? positions[r] + 1 : longest;
    const int pairs = rows * kv_heads;
    const bool parallel = pairs * (long)longest * group * dim >= 8192;
    // pieces per pair: so that the threads get equal numbers of pieces, none shorter than a few spans
    const int threads = parallel ? omp_get_max_threads() : 1;
    const int most = std::min(64, (longest + 4 * SPAN - 1) / (4 * SPAN));
    const int pieces = std::max(1, std::min(threads / std::gcd(pairs, threads), most));
    const size_t each = (size_t)group * dim;  // a pair's query heads, or output
    // Rows that share one cache row (row stride 0: a prompt's tokens, each at its own position) read each
    // other's keys and values, so all are stored before any row attends; so are pieces' queries.
    const bool first = pieces > 1 || (strides[0] == 0 && rows > 1);
    float* rotated = first ? (float*)malloc(sizeof(float) * pairs * each) : nullptr;
    float* parts = pieces > 1 ? (float*)malloc(sizeof(float) * pairs * pieces * (each + 2 * group)) : nullptr;
    auto cache_at = [&](int pair, void* base) {
        const int r = pair / kv_heads, h = pair % kv_heads;
        return (typename W::T*)base + (size_t)r * strides[0] + (size_t)h * strides[1];
    };
    // rotates the pair's q heads into q, k too, and stores k and v in the cache at the row's position
    auto rotate_store = [&](int pair, float* q) {
        const int r = pair / kv_heads, h = pair % kv_heads, at = positions[r];
        const float* row = mixed + (size_t)r * width;
        const float* cos = rope + (size_t)at * dim;
        const float* sin = rope + ((size_t)rope_positions + at) * dim;  // first half negated
        auto rotate = [&](const float* x, float* y) {  // y = x cos + (x's halves swapped) sin
            for (int d = 0; d < half; d++) y[d] = x[d] * cos[d] + x[d + half] * sin[d];
            for (int d = half; d < dim; d++) y[d] = x[d] * cos[d] + x[d - half] * sin[d];
        };
        float k[256];
        for (int g = 0; g < group; g++) rotate(row + (size_t)(h * group + g) * dim, q + g * dim);
        rotate(row + (size_t)(heads + h) * dim, k);
        const float* v = row + (size_t)(heads + kv_heads + h) * dim;
        typename W::T* key_cache = cache_at(pair, keys);
        typename W::T* value_cache = cache_at(pair, values);
        for (int d = 0; d < dim; d++) {
            key_cache[(size_t)at * strides[2] + d] = W::from(k[d]);
            value_cache[(size_t)at * strides[2] + d] = W::from(v[d]);
        }
    };
#pragma omp parallel if (parallel)
    {
        const int widest = (longest + pieces - 1) / pieces;  // positions in a piece, at most
        float* scores = (float*)malloc(sizeof(float) * (size_t)group * widest);
        float* acc = (float*)malloc(sizeof(float) * each);
        float q[8 * 256];
        if (first) {
#pragma omp for schedule(static)
            for (int i = 0; i < pairs; i++) rotate_store(i, rotated + i * each);
        }
#pragma omp for schedule(static)
        for (int i = 0; i < pairs * pieces; i++) {
            const int pair = i / pieces, piece = i % pieces, length = positions[pair / kv_heads] + 1;
            const float* qp = q;
            if (first)
                qp = rotated + pair * each;
            else
                rotate_store(pair, q);
            const int p0 = (int)((long)length * piece / pieces), p1 = (int)((long)length * (piece + 1) / pieces);
            float* o = pieces > 1 ? parts + (size_t)i * (each + 2 * group) : out + (size_t)pair * each;
            float top[8], total[8];
            if (p1 > p0) {
                attend_piece<KIND>(qp, cache_at(pair, keys), cache_at(pair, values), strides[2], p0, p1, group, dim,
                                   pieces == 1, o, top, total, scores, acc);
            } else {
                for (int g = 0; g < group; g++) top[g] = -INFINITY, total[g] = 0.0f;
                memset(o, 0, sizeof(float) * each);
            }
            if (pieces > 1)
                for (int g = 0; g < group; g++) o[each + g] = top[g], o[each + group + g] = total[g];
        }
        if (pieces > 1) {
#pragma omp for schedule(static)
            for (int pair = 0; pair < pairs; pair++) {
                const float* part = parts + (size_t)pair * pieces * (each + 2 * group);
                const size_t size = each + 2 * group;
                for (int g = 0; g < group; g++) {
                    float best = -INFINITY, all = 0.0f, factor[64];
                    for (int c = 0; c < pieces; c++) best = part[c * size + each + g] > best ? part[c * size + each + g] : best;
                    for (int c = 0; c < pieces; c++) {
                        const float t = part[c * size + each + g];
                        factor[c] = t == -INFINITY ? 0.0f : expf(t - best);
                        all += factor[c] * part[c * size + each + group + g];
                    }
                    float* o = out + (size_t)pair * each + g * dim;
                    for (int d = 0; d < dim; d++) {
                        float sum = 0.0f;
                        for (int c = 0; c < pieces; c++) sum += factor[c] * part[c * size + g * dim + d];
                        o[d] = sum / all;
                    }
                }
            }
        }
        free(scores);
        free(acc);
    }
    free(rotated);
    free(parts);
}

// An embedding value v (a stored value times its row's scale, where int8 rows have scales) as PyTorch's
// lookup gives it: int8 ones rounded to the model's dtype (`round`: BF16, F16, or anything else for none).
inline float looked_up(float v, bool scaled, int round) {
    return !scaled          ? v
           : round == BF16 ? Weights<BF16>::one(Weights<BF16>::from(v))
           : round == F16  ? Weights<F16>::one(Weights<F16>::from(v))
                           : v;
}

// Row `token` of an embedding table as float32. int8 rows are multiplied by their scale and rounded to
// the model's dtype (see `looked_up`).
template <int KIND>
void embed_row(const void* table, const float* scales, int hidden, int token, int round, float* out) {
    const typename Weights<KIND>::T* row = (const typename Weights<KIND>::T*)table + (size_t)token * hidden;
    const float scale = scales ? scales[token] : 1.0f;
    for (int j = 0; j < hidden; j++) out[j] = looked_up(Weights<KIND>::one(row[j]) * scale, scales, round);
}

// Row `token` of a packed table [n, k] (BF16 or I8 as stored; the output head's, which is also the
// embedding table) as float32, as `embed_row` gives it: value j of row 16 b + l is the (2 l + j % 2)-th
// of pair j / 2 in block b. Rows past the last block are row-major, where they would be unpacked.
template <int KIND>
void embed_packed(const void* table, const float* scales, int n, int k, int token, int round, float* out) {
    const typename Weights<KIND>::T* values = (const typename Weights<KIND>::T*)table;
    const int block = token / BLOCK, lane = token % BLOCK;
    const float scale = scales ? scales[token] : 1.0f;
    for (int j = 0; j < k; j++) {
        const size_t at = block < n / BLOCK ? (((size_t)block * (k / 2) + j / 2) * BLOCK + lane) * 2 + j % 2
                                            : (size_t)token * k + j;
        out[j] = looked_up(Weights<KIND>::one(values[at]) * scale, scales, round);
    }
}

}  // namespace

extern "C" {

// y[m, n] = x[m, k] . w[n, k] (times scales[n] when given); 0 when done, -1 for an unknown kind.
// What a layer does around its products comes along: with `gated`, x is [m, 2k] and the rows multiplied
// are silu(x[:, :k]) * x[:, k:] (the MLP's gate and up halves); with `norm`, they are first
// RMS-normalized and scaled by norm[k] (eps added to the mean square); with `accumulate`, the product is
// added to y (a residual connection) instead of stored.
int vicuna_product(int kind, const float* x, const void* w, const float* scales, float* y, int m, int n, int k,
                   const float* norm, float eps, int gated, int accumulate) {
    const bool dot = dot_bf16();  // bfloat16 and int8 weights with AVX512-BF16
    if (kind < BF16 || kind > PACKED_I8 || (kind >= PACKED && (!dot || k % 2))) return -1;
    const Around around = {norm, eps, gated != 0, accumulate != 0};
    const size_t width = gated ? 2 * (size_t)k : k;
    for (int m0 = 0; m0 < m; m0 += CHUNK_ROWS) {  // a long prompt in chunks: bounded scratch memory
        const int rows = m - m0 < CHUNK_ROWS ? m - m0 : CHUNK_ROWS;
        const float* xc = x + m0 * width;
        float* yc = y + (size_t)m0 * n;
        switch (kind) {
            case BF16: (dot ? product_dot<BF16> : product<BF16>)(xc, w, scales, yc, rows, n, k, around); break;
            case F16: product<F16>(xc, w, scales, yc, rows, n, k, around); break;
            case F32: product<F32>(xc, w, scales, yc, rows, n, k, around); break;
            case I8: (dot ? product_dot<I8> : product<I8>)(xc, w, scales, yc, rows, n, k, around); break;
            case PACKED: product_packed<BF16>(xc, w, scales, yc, rows, n, k, around); break;
            case PACKED_I8: product_packed<I8>(xc, w, scales, yc, rows, n, k, around); break;
        }
    }
    return 0;
}

// Weights w [n, k], bfloat16 (kind PACKED) or int8 (PACKED_I8), packed in place (see BLOCK): each block
// of 16 rows as [k/2][16][2], in the memory its rows took, by way of a copy of the block; the rows past
// the last block stay as they are. 0 when done, -1 for another kind or an odd k.
int vicuna_pack(int kind, void* w, int n, int k) {
    if ((kind != PACKED && kind != PACKED_I8) || k % 2 || n < 0) return -1;
    auto pack = [&](auto* units) {  // a pair of values is one unit: uint32_t (bfloat16), uint16_t (int8)
        using U = std::remove_pointer_t<decltype(units)>;
        const int pairs = k / 2, blocks = n / BLOCK;
#pragma omp parallel
        {
            U* rows = (U*)malloc(sizeof(U) * BLOCK * pairs);
#pragma omp for schedule(static)
            for (int b = 0; b < blocks; b++) {
                U* block = units + (size_t)b * BLOCK * pairs;
                memcpy(rows, block, sizeof(U) * BLOCK * pairs);
                for (int j = 0; j < pairs; j++)
                    for (int l = 0; l < BLOCK; l++) block[(size_t)j * BLOCK + l] = rows[(size_t)l * pairs + j];
            }
            free(rows);
        }
    };
    if (kind == PACKED)
        pack((uint32_t*)w);
    else
        pack((uint16_t*)w);
    return 0;
}

// Whether bfloat16 and int8 products use the CPU's AVX512-BF16 dot products (1) or AVX2 (0). `wanted` 0 or 1
// sets it for the process (1 only where the CPU has them); -1 only asks.
int vicuna_dot_bf16(int wanted) {
#if VICUNA_DOT
    if (wanted >= 0) dot_bf16_on = wanted && __builtin_cpu_supports("avx512bf16") ? 1 : 0;
#endif
    return dot_bf16() ? 1 : 0;
}

// The calling thread's OpenMP team size for the kernel's work (`wanted` > 0 sets it); answers it.
int vicuna_threads(int wanted) {
    if (wanted > 0) omp_set_num_threads(wanted);
    return omp_get_max_threads();
}

// One decode step's attention for every row: mixed [rows, (heads + 2 kv_heads) dim] holds each row's
// new q, k and v heads (float32); q and k are rotated with rope [2, rope_positions, dim] (cos, then sin
// with its first half negated) at the row's position, k and v are stored in the cache there (keys and
// values: [rows, kv_heads, positions, dim] with the given element strides for row, head and position,
// dim contiguous), and each group of query heads attends to positions 0 .. positions[row] of its KV head.
// out: [rows, heads dim] float32. 0 when done, -1 for an unknown kind or a shape it does not take
// (dim a multiple of 16 up to 256, up to 8 query heads per KV head).
int vicuna_attend(int kind, const float* mixed, const float* rope, int rope_positions, void* keys, void* values,
                  long row_stride, long head_stride, long position_stride, const int* positions, float* out,
                  int rows, int heads, int kv_heads, int dim) {
    const long strides[3] = {row_stride, head_stride, position_stride};
    const int group = kv_heads > 0 ? heads / kv_heads : 0;
    if (dim % 16 || dim > 256 || group < 1 || group > 8 || group * kv_heads != heads) return -1;
    switch (kind) {
        case BF16:
            attend<BF16>(mixed, rope, rope_positions, keys, values, strides, positions, out, rows, heads, kv_heads, dim);
            return 0;
        case F16:
            attend<F16>(mixed, rope, rope_positions, keys, values, strides, positions, out, rows, heads, kv_heads, dim);
            return 0;
        case F32:
            attend<F32>(mixed, rope, rope_positions, keys, values, strides, positions, out, rows, heads, kv_heads, dim);
            return 0;
    }
    return -1;
}

// One decode step of a LLaMA-family model for every row, all layers in one call (no Python between the
// products: the calling thread keeps running without the GIL for the whole step).
// weights, kinds, scales: per layer qkv (fused), o, gate_up (fused), down, then the output head;
// norms: per layer the attention and MLP RMSNorm weights, then the final norm; tokens[row]: the row's
// token, looked up in the embedding table embed [vocab, hidden] (kind embed_kind; int8 rows with
// embed_scales, rounded to the model's dtype embed_round, see embed_row); the KV cache (kind
// cache_kind) is one tensor [layers, 2, rows, kv_heads, positions, dim] with the element strides
// cache_strides (layer, keys/values, row, head, position); positions[row]: where the row's new token
// goes; logits [logit_rows, vocab] float32: those of the last logit_rows rows. With a row stride of 0 in
// cache_strides the rows are one prompt's tokens in one cache row, each at its own position (a prefill:
// logit_rows 1). 0 when done, -1 for a kind or shape the kernel does not take.
int vicuna_decode(const int* kinds, const void* const* weights, const float* const* scales,
                  const float* const* norms, float eps, int layers, int hidden, int inter, int vocab,
                  int heads, int kv_heads, int dim, const float* rope, int rope_positions, int cache_kind,
                  void* cache, const long* cache_strides, int embed_kind, const void* embed,
                  const float* embed_scales, int embed_round, const int* tokens, const int* positions,
                  float* logits, int rows, int logit_rows) {
    if (logit_rows < 1 || logit_rows > rows || embed_kind < BF16 || embed_kind > PACKED_I8) return -1;
    const int width = (heads + 2 * kv_heads) * dim, attended = heads * dim;
    const size_t element = cache_kind == F32 ? 4 : 2;
    float* x = (float*)malloc(sizeof(float) * (size_t)rows * hidden);
    for (int r = 0; r < rows; r++) {
        float* row = x + (size_t)r * hidden;
        switch (embed_kind) {
            case BF16: embed_row<BF16>(embed, embed_scales, hidden, tokens[r], embed_round, row); break;
            case F16: embed_row<F16>(embed, embed_scales, hidden, tokens[r], embed_round, row); break;
            case F32: embed_row<F32>(embed, embed_scales, hidden, tokens[r], embed_round, row); break;
            case I8: embed_row<I8>(embed, embed_scales, hidden, tokens[r], embed_round, row); break;
            case PACKED: embed_packed<BF16>(embed, embed_scales, vocab, hidden, tokens[r], embed_round, row); break;
            case PACKED_I8: embed_packed<I8>(embed, embed_scales, vocab, hidden, tokens[r], embed_round, row); break;
        }
    }
    float* mixed = (float*)malloc(sizeof(float) * (size_t)rows * width);
    float* out = (float*)malloc(sizeof(float) * (size_t)rows * attended);
    float* gate_up = (float*)malloc(sizeof(float) * (size_t)rows * 2 * inter);
    int status = 0;
    for (int i = 0; i < layers && !status; i++) {
        const int* kind = kinds + 4 * i;
        const void* const* w = weights + 4 * i;
        const float* const* sc = scales + 4 * i;
        char* keys = (char*)cache + (size_t)i * cache_strides[0] * element;
        char* values = keys + (size_t)cache_strides[1] * element;
        status |= vicuna_product(kind[0], x, w[0], sc[0], mixed, rows, width, hidden, norms[2 * i], eps, 0, 0);
        status |= vicuna_attend(cache_kind, mixed, rope, rope_positions, keys, values, cache_strides[2],
                                cache_strides[3], cache_strides[4], positions, out, rows, heads, kv_heads, dim);
        status |= vicuna_product(kind[1], out, w[1], sc[1], x, rows, hidden, attended, nullptr, 0.0f, 0, 1);
        status |= vicuna_product(kind[2], x, w[2], sc[2], gate_up, rows, 2 * inter, hidden, norms[2 * i + 1], eps,
                                 0, 0);
        status |= vicuna_product(kind[3], gate_up, w[3], sc[3], x, rows, hidden, inter, nullptr, 0.0f, 1, 1);
    }
    if (!status)
        status = vicuna_product(kinds[4 * layers], x + (size_t)(rows - logit_rows) * hidden, weights[4 * layers],
                                scales[4 * layers], logits, logit_rows, vocab, hidden, norms[2 * layers], eps, 0, 0);
    free(x);
    free(mixed);
    free(out);
    free(gate_up);
    return status ? -1 : 0;
}

// A token drawn from softmax(x / temperature), given u uniform in [0, 1): the first index at which the
// running sum of e_i = exp((x_i - max) / temperature) passes u times their total (inverse-CDF sampling;
// -inf values have e_i = 0 and are never drawn). Each block of 8 e_i is summed as a vector and the
// blocks' sums are added in order in double precision, for the total and for the search alike, which
// goes value by value only inside the block where the target falls. -1 where there is no distribution (a
// NaN, or every value -inf) or the arguments are out of range.
int vicuna_sample(const float* x, int n, float temperature, double u) {
    if (n < 1 || !(temperature > 0) || !(u >= 0 && u < 1)) return -1;
    const int blocks = (n + 7) / 8;
    thread_local std::vector<float> e, sums;
    e.resize((size_t)blocks * 8);
    sums.resize(blocks);
    auto load = [&](int b) {  // the 8 values from 8 b on, -inf past the end
        if (8 * b + 8 <= n) return _mm256_loadu_ps(x + 8 * b);
        float tail[8];
        for (int i = 0; i < 8; i++) tail[i] = 8 * b + i < n ? x[8 * b + i] : -INFINITY;
        return _mm256_loadu_ps(tail);
    };
    bool nan;
    const float top = row_max(x, n, nan);
    if (nan || top == -INFINITY) return -1;
    const __m256 minus_inf = _mm256_set1_ps(-INFINITY);
    const __m256 shift = _mm256_set1_ps(top), inverse = _mm256_set1_ps(1.0f / temperature);
    double total = 0.0;
    for (int b = 0; b < blocks; b++) {
        const __m256 v = load(b);
        const __m256 ev = _mm256_and_ps(exp_nonpositive(_mm256_mul_ps(_mm256_sub_ps(v, shift), inverse)),
                                        _mm256_cmp_ps(v, minus_inf, _CMP_NEQ_OQ));
        _mm256_storeu_ps(e.data() + 8 * (size_t)b, ev);
        sums[b] = sum8(ev);
        total += sums[b];
    }
    const double target = u * total;
    double running = 0.0;
    int last = -1;  // the last index with e_i > 0 so far: where rounding leaves the target unpassed
    for (int b = 0; b < blocks; b++) {
        if (running + sums[b] > target) {
            for (int j = 8 * b; j < 8 * b + 8 && j < n; j++) {
                if (e[j] <= 0.0f) continue;
                running += e[j];
                last = j;
                if (running > target) return j;
            }
            return last;
        }
        running += sums[b];
        for (int j = 8 * b; j < 8 * b + 8 && j < n; j++) last = e[j] > 0.0f ? j : last;
    }
    return last;
}

// The index of the largest of x[0, n) (the first of equal ones; the first NaN where there is one, as
// NumPy and PyTorch answer): greedy decoding's pick from a row of logits. Two passes (the maximum, by
// `row_max`, then where it first is) run ~4x faster than one pass carrying indices.
int vicuna_argmax(const float* x, int n) {
    bool nan;
    const float best = row_max(x, n, nan);
    if (nan) {
        for (int j = 0; j < n; j++)
            if (x[j] != x[j]) return j;
    }
    const __m256 wanted = _mm256_set1_ps(best);
    int j = 0;
    for (; j + 8 <= n; j += 8) {
        const int mask = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + j), wanted, _CMP_EQ_OQ));
        if (mask) return j + __builtin_ctz(mask);
    }
    for (; j < n; j++)
        if (x[j] == best) return j;
    return 0;
}

}
