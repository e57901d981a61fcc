// Device helpers shared by every softmax-kernels CUDA kernel: compute types, NaN/-inf-safe
// maths, 128-bit vector loads and stores with a scalar tail, warp / block reductions and the
// online (max, sum) merge.
//
// The sources are compiled at run time by NVRTC (CuPy RawModule, -std=c++17) and by nvcc in
// kernels/cuda/check.py, so this header uses nothing but the CUDA built-ins and the two
// half-precision headers (no host-only headers, no <cmath>, no <limits>).
//
// The three row strategies (template argument STRATEGY; chosen on the host by
// softmax_kernels.backends.cupy_backend.plan_launch):
//   WARP_ROWS  (a)  a warp, or LANES lanes of one, per row; the row lives in registers.
//   BLOCK_SMEM (b)  a block per row; the row lives in dynamic shared memory.
//   ONLINE     (c)  a block per row; pass 1 folds the row into an online (max, sum),
//                   pass 2 reads it again to write the result.
// (a) and (b) read each input element once and write each output element once; (c) reads twice.

#ifndef SOFTMAX_KERNELS_COMMON_CUH
#define SOFTMAX_KERNELS_COMMON_CUH

#include <cuda_fp16.h>
#include <cuda_bf16.h>

#define SK_WARP_ROWS 0
#define SK_BLOCK_SMEM 1
#define SK_ONLINE 2

// Threads per block of strategy (a): 4 warps. Blocks of (b) and (c) have up to 512 threads.
#define SK_WARP_BLOCK_THREADS 128
#define SK_MAX_BLOCK_THREADS 512

// Launch bounds per strategy: (a) is launched with 128 threads, (b) and (c) with up to 512.
// MIN_BLOCKS sets ptxas's register budget, 65536 / (threads x MIN_BLOCKS): 128 registers for
// (a) with 4 blocks and for (b)/(c) with 1 (room for 4 batched 16-byte loads per operand), 255
// for the (a) cross-entropy kernels with soft targets (2 blocks; two rows of up to 32 values per
// lane). Left to its own heuristics ptxas sometimes spills a loop invariant at 40 registers.
#define SK_LAUNCH_BOUNDS(STRATEGY, MIN_BLOCKS) \
    __launch_bounds__((STRATEGY) == SK_WARP_ROWS ? SK_WARP_BLOCK_THREADS : SK_MAX_BLOCK_THREADS, \
                      MIN_BLOCKS)
#define SK_MIN_BLOCKS(STRATEGY) ((STRATEGY) == SK_WARP_ROWS ? 4 : 1)

// Dynamic shared memory of strategy (b), sized by the host (16-byte aligned for vector access).
extern __shared__ __align__(16) unsigned char sk_dyn_smem[];

namespace sk {

constexpr int WARP = 32;
constexpr unsigned FULL_MASK = 0xffffffffu;
// Full packs each thread of (b)/(c) loads before using any: several 16-byte loads in flight.
constexpr int BATCH = 4;

typedef long long idx_t;

// ---------------------------------------------------------------------------------------------
// Compute type: half types are computed in float32, float64 in float64.

template <typename T>
struct AccOf {
    typedef float type;
};
template <>
struct AccOf<double> {
    typedef double type;
};
template <typename T>
using acc_t = typename AccOf<T>::type;

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
struct Convert;
template <>
struct Convert<float> {
    static __device__ __forceinline__ float from(float v) { return v; }
};
template <>
struct Convert<double> {
    static __device__ __forceinline__ double from(double v) { return v; }
};
template <>
struct Convert<__half> {
    static __device__ __forceinline__ __half from(float v) { return __float2half_rn(v); }
};
template <>
struct Convert<__nv_bfloat16> {
    static __device__ __forceinline__ __nv_bfloat16 from(float v) { return __float2bfloat16_rn(v); }
};

// ---------------------------------------------------------------------------------------------
// Maths in the compute type. Accurate expf/logf (no fast-math intrinsics): the kernels are
// memory-bound, and float32 results must stay within 1e-6 + 1e-5 |ref|.

__device__ __forceinline__ float sk_exp(float v) { return expf(v); }
__device__ __forceinline__ double sk_exp(double v) { return exp(v); }
__device__ __forceinline__ float sk_log(float v) { return logf(v); }
__device__ __forceinline__ double sk_log(double v) { return log(v); }
// fmax drops a NaN operand; a NaN element still reaches every row sum (exp(NaN - m) = NaN), so
// the whole row comes out NaN, as in NumPy.
__device__ __forceinline__ float sk_max(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double sk_max(double a, double b) { return fmax(a, b); }

// 1 / x without the IEEE division's slow-path subroutine call (a call makes ptxas save live
// registers to the stack): the hardware approximation refined by one (float) or two (double)
// Newton steps, within about one unit in the last place. 0, +-inf and NaN map as 1 / x does.
__device__ __forceinline__ float sk_rcp(float x) {
    float r;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    if (r - r == 0.0f && r != 0.0f) {  // finite, non-zero: refine
        r = fmaf(r, fmaf(-x, r, 1.0f), r);
    }
    return r;
}
__device__ __forceinline__ double sk_rcp(double x) {
    double r;
    asm("rcp.approx.ftz.f64 %0, %1;" : "=d"(r) : "d"(x));
    if (r - r == 0.0 && r != 0.0) {
        r = fma(r, fma(-x, r, 1.0), r);
        r = fma(r, fma(-x, r, 1.0), r);
    }
    return r;
}

template <typename A>
__device__ __forceinline__ A neg_inf();
template <>
__device__ __forceinline__ float neg_inf<float>() { return __int_as_float(0xff800000); }
template <>
__device__ __forceinline__ double neg_inf<double>() {
    return __longlong_as_double(0xfff0000000000000ULL);
}
template <typename A>
__device__ __forceinline__ A quiet_nan();
template <>
__device__ __forceinline__ float quiet_nan<float>() { return __int_as_float(0x7fffffff); }
template <>
__device__ __forceinline__ double quiet_nan<double>() {
    return __longlong_as_double(0x7ff8000000000000ULL);
}

template <typename A>
__device__ __forceinline__ bool is_finite(A v) {
    return v - v == A(0);  // false for +-inf (inf - inf = NaN) and NaN
}

// exp(a - m) for the online merge, with exp(-inf - m) = 0 even when m = -inf (an all -inf
// partial must not turn into exp(NaN)); +inf - +inf stays NaN, as the direct formula gives.
template <typename A>
__device__ __forceinline__ A exp_rel(A a, A m) {
    return a == neg_inf<A>() ? A(0) : sk_exp(a - m);
}

// Online softmax statistics: running maximum m and sum s = sum(exp(v - m)).
template <typename A>
struct Online {
    A m;
    A s;
    __device__ __forceinline__ void init() {
        m = neg_inf<A>();
        s = A(0);
    }
    // Merge another (m2, s2): m = max(m, m2), s = s exp(m_old - m) + s2 exp(m2 - m).
    __device__ __forceinline__ void merge(A m2, A s2) {
        const A mn = sk_max(m, m2);
        s = s * exp_rel(m, mn) + s2 * exp_rel(m2, mn);
        m = mn;
    }
};

// ---------------------------------------------------------------------------------------------
// 128-bit vector access with a per-row shift.
//
// VEC = 16 / sizeof(T) elements make one 16-byte pack. A row whose start is not 16-byte aligned
// (odd row lengths, views) is still read in aligned packs: with shift = (row address mod 16) /
// sizeof(T), pack k covers columns k * VEC - shift .. k * VEC - shift + VEC - 1, so its address
// is aligned; the first and the last pack are partial and go element by element (the "tail").
// The host passes vec_ok = 1 only when every operand's rows have the same address mod 16 as x's
// (equal base residues and row-stride residues, checked at run time), so one shift serves all
// of a row's operands; otherwise vec_ok = 0, the shift is 0 and every access is scalar. Masks
// (1 byte per element) have their own flag, mask_vec.

template <typename T>
struct Vec {
    static constexpr int value = 16 / int(sizeof(T));
};

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
    T v[N];
};

// The row's shift in elements (0 on the scalar path).
template <typename T>
__device__ __forceinline__ int row_shift(const T* row, bool vec_ok) {
    return vec_ok ? int((reinterpret_cast<unsigned long long>(row) & 15ull) / sizeof(T)) : 0;
}

// Column c lies in the row [0, n): one unsigned comparison.
__device__ __forceinline__ bool in_row(int c, int n) { return unsigned(c) < unsigned(n); }
__device__ __forceinline__ bool in_row(idx_t c, idx_t n) {
    return static_cast<unsigned long long>(c) < static_cast<unsigned long long>(n);
}

// Number of packs covering a row of n columns with this shift.
template <int VEC, typename I>
__device__ __forceinline__ I row_packs(I n, int shift) {
    return (n + shift + VEC - 1) / VEC;
}

// Load the pack starting at column c0 (may be negative in a row's first pack); elements outside
// [0, n) are not read and come back as zero bits.
template <int VEC, typename T, typename I>
__device__ __forceinline__ void load_raw(const T* row, I c0, I n, bool vec_ok,
                                         Pack<T, VEC>& raw) {
    if (vec_ok && c0 >= 0 && c0 + VEC <= n) {
        raw = *reinterpret_cast<const Pack<T, VEC>*>(row + c0);
    } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
            const I c = c0 + i;
            raw.v[i] = in_row(c, n) ? row[c] : Convert<T>::from(acc_t<T>(0));
        }
    }
}

template <int VEC, typename T>
__device__ __forceinline__ void raw_to_acc(const Pack<T, VEC>& raw, acc_t<T> (&v)[VEC]) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) v[i] = to_acc(raw.v[i]);
}

template <int VEC, typename T, typename I>
__device__ __forceinline__ void load_acc(const T* row, I c0, I n, bool vec_ok,
                                         acc_t<T> (&v)[VEC]) {
    Pack<T, VEC> raw;
    load_raw<VEC>(row, c0, n, vec_ok, raw);
    raw_to_acc<VEC>(raw, v);
}

// Store VEC values (converted to T) at columns c0..; columns outside [0, n) untouched.
template <int VEC, typename T, typename I>
__device__ __forceinline__ void store_acc(T* row, I c0, I n, bool vec_ok,
                                          const acc_t<T> (&v)[VEC]) {
    if (vec_ok && c0 >= 0 && c0 + VEC <= n) {
        Pack<T, VEC> raw;
#pragma unroll
        for (int i = 0; i < VEC; ++i) raw.v[i] = Convert<T>::from(v[i]);
        *reinterpret_cast<Pack<T, VEC>*>(row + c0) = raw;
    } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
            const I c = c0 + i;
            if (in_row(c, n)) row[c] = Convert<T>::from(v[i]);
        }
    }
}

// Store a pack known to lie inside the row on the vector path (16-byte aligned).
template <int VEC, typename T>
__device__ __forceinline__ void store_full(T* dst, const acc_t<T> (&v)[VEC]) {
    Pack<T, VEC> raw;
#pragma unroll
    for (int i = 0; i < VEC; ++i) raw.v[i] = Convert<T>::from(v[i]);
    *reinterpret_cast<Pack<T, VEC>*>(dst) = raw;
}

// Mask bytes (bool) for the VEC columns at c0; false outside [0, n).
template <int VEC, typename I>
__device__ __forceinline__ void load_keep(const unsigned char* row, I c0, I n, bool mask_vec,
                                          bool (&keep)[VEC]) {
    if (mask_vec && c0 >= 0 && c0 + VEC <= n) {
        const Pack<unsigned char, VEC> raw =
            *reinterpret_cast<const Pack<unsigned char, VEC>*>(row + c0);
#pragma unroll
        for (int i = 0; i < VEC; ++i) keep[i] = raw.v[i] != 0;
    } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
            const I c = c0 + i;
            keep[i] = in_row(c, n) && row[c] != 0;
        }
    }
}

// z = scale * x for one pack of a softmax forward, in place: -inf where the mask is 0, where
// the pack is not live, or (unless `full`) outside [0, n). `any` records whether some entry
// was kept (a row with none gives all 0 / all -inf). Shared by the three strategies.
template <int VEC, typename A, typename I>
__device__ __forceinline__ void scale_and_mask(A (&v)[VEC], A scale, const unsigned char* mk,
                                               bool has_mask, bool mask_vec, I c0, I n,
                                               bool live, bool full, int& any) {
    bool keep[VEC];
    if (live && has_mask) {
        load_keep<VEC>(mk, c0, n, mask_vec, keep);
    } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) keep[i] = true;
    }
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
        const bool kept = live && (full || in_row(c0 + i, n)) && keep[i];
        any |= kept;
        v[i] = kept ? scale * v[i] : neg_inf<A>();
    }
}

// ---------------------------------------------------------------------------------------------
// Pack loops of strategies (b) and (c): a block walks a row's packs, thread t owning packs
// k = t, t + nt, t + 2 nt, ... (nt = blockDim.x) in every pass, so shared-memory slots need no
// barrier between passes. Full packs (inside [0, n), vector path) go BATCH at a time with
// several 16-byte loads in flight and no per-element checks; partial packs (a misaligned row's
// first and last, or every pack on the scalar path) go one at a time, element by element.

template <int VEC, typename I>
struct Packs {
    I np;       // packs covering the row
    I lo, hi;   // full packs: lo <= k < hi (none on the scalar path)
    int shift;
    __device__ __forceinline__ Packs(I n, int shift_, bool vec_ok) : shift(shift_) {
        np = row_packs<VEC>(n, shift);
        if (vec_ok) {
            lo = shift > 0 ? 1 : 0;
            hi = (n + shift) / VEC;
            if (hi < lo) hi = lo;
        } else {
            lo = hi = 0;
        }
    }
    __device__ __forceinline__ I c0(I k) const { return k * VEC - shift; }
};

// load(b, k) for the NB full packs of a step, then use(b, k) for each.
template <int NB, int VEC, typename I, typename L, typename U>
__device__ __forceinline__ void for_full_packs(const Packs<VEC, I>& p, L&& load, U&& use) {
    const I nt = blockDim.x;
    for (I kb = threadIdx.x; kb < p.hi; kb += NB * nt) {
#pragma unroll
        for (int b = 0; b < NB; ++b) {
            const I k = kb + b * nt;
            if (k >= p.lo && k < p.hi) load(b, k);
        }
#pragma unroll
        for (int b = 0; b < NB; ++b) {
            const I k = kb + b * nt;
            if (k >= p.lo && k < p.hi) use(b, k);
        }
    }
}

// f(k) for this thread's partial packs: every pack on the scalar path, else at most the row's
// first (k = 0) and last (k = hi).
template <int VEC, typename I, typename F>
__device__ __forceinline__ void for_partial_packs(const Packs<VEC, I>& p, bool vec_ok, F&& f) {
    const I nt = blockDim.x, t = threadIdx.x;
    if (!vec_ok) {
        for (I k = t; k < p.np; k += nt) f(k);
        return;
    }
    if (p.lo > 0 && t == 0) f(I(0));
    if (p.hi < p.np && p.hi % nt == t) f(p.hi);
}

// Compute-type values to and from shared memory in 16-byte pieces (slots are multiples of VEC
// and the buffer is 16-byte aligned).
template <int VEC, typename A>
__device__ __forceinline__ void smem_store(A* dst, const A (&v)[VEC]) {
    constexpr int CH = (VEC * int(sizeof(A)) >= 16) ? 16 / int(sizeof(A)) : VEC;
#pragma unroll
    for (int k = 0; k < VEC; k += CH) {
        Pack<A, CH> p;
#pragma unroll
        for (int j = 0; j < CH; ++j) p.v[j] = v[k + j];
        *reinterpret_cast<Pack<A, CH>*>(dst + k) = p;
    }
}

template <int VEC, typename A>
__device__ __forceinline__ void smem_load(const A* src, A (&v)[VEC]) {
    constexpr int CH = (VEC * int(sizeof(A)) >= 16) ? 16 / int(sizeof(A)) : VEC;
#pragma unroll
    for (int k = 0; k < VEC; k += CH) {
        const Pack<A, CH> p = *reinterpret_cast<const Pack<A, CH>*>(src + k);
#pragma unroll
        for (int j = 0; j < CH; ++j) v[k + j] = p.v[j];
    }
}

// ---------------------------------------------------------------------------------------------
// Reductions. Each is a fixed tree, so results are bitwise the same run to run (no atomics).

// Over groups of WIDTH consecutive lanes (WIDTH a power of two <= 32); every lane of the warp
// must call it (the shuffles name the full warp), and every lane of a group gets the result.
template <int WIDTH, typename A>
__device__ __forceinline__ A group_max(A v) {
#pragma unroll
    for (int off = WIDTH / 2; off > 0; off >>= 1) {
        v = sk_max(v, __shfl_xor_sync(FULL_MASK, v, off, WIDTH));
    }
    return v;
}

template <int WIDTH, typename A>
__device__ __forceinline__ A group_sum(A v) {
#pragma unroll
    for (int off = WIDTH / 2; off > 0; off >>= 1) v += __shfl_xor_sync(FULL_MASK, v, off, WIDTH);
    return v;
}

template <int WIDTH>
__device__ __forceinline__ int group_or(int v) {
#pragma unroll
    for (int off = WIDTH / 2; off > 0; off >>= 1) v |= __shfl_xor_sync(FULL_MASK, v, off, WIDTH);
    return v;
}

template <typename A>
__device__ __forceinline__ void warp_online(Online<A>& o) {
#pragma unroll
    for (int off = WARP / 2; off > 0; off >>= 1) {
        const A m2 = __shfl_xor_sync(FULL_MASK, o.m, off);
        const A s2 = __shfl_xor_sync(FULL_MASK, o.s, off);
        o.merge(m2, s2);
    }
}

// Block-wide reductions for (b) and (c): every thread of the block calls them and gets the
// result. red is static shared scratch of at least N * 32 values. Each warp folds the per-warp
// partials itself, in the same order, so every thread holds the same bits.
template <typename A>
__device__ __forceinline__ A block_max(A v, A* red) {
    v = group_max<WARP>(v);
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    const int n_warps = blockDim.x / WARP;
    __syncthreads();  // the previous reduction's readers are done with red
    if (lane == 0) red[warp] = v;
    __syncthreads();
    return group_max<WARP>(lane < n_warps ? red[lane] : neg_inf<A>());
}

template <int N, typename A>
__device__ __forceinline__ void block_sum(A (&v)[N], A* red) {
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    const int n_warps = blockDim.x / WARP;
#pragma unroll
    for (int k = 0; k < N; ++k) v[k] = group_sum<WARP>(v[k]);
    __syncthreads();
    if (lane == 0) {
#pragma unroll
        for (int k = 0; k < N; ++k) red[k * WARP + warp] = v[k];
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < N; ++k) v[k] = group_sum<WARP>(lane < n_warps ? red[k * WARP + lane] : A(0));
}

template <typename A>
__device__ __forceinline__ void block_online(Online<A>& o, A* red) {
    warp_online(o);
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    const int n_warps = blockDim.x / WARP;
    __syncthreads();
    if (lane == 0) {
        red[warp] = o.m;
        red[WARP + warp] = o.s;
    }
    __syncthreads();
    if (lane < n_warps) {
        o.m = red[lane];
        o.s = red[WARP + lane];
    } else {
        o.init();
    }
    warp_online(o);
}

// Grid-stride row loops: (a) hands rows to warps, (b) and (c) to blocks.
__device__ __forceinline__ idx_t global_warp() {
    return (idx_t(blockIdx.x) * blockDim.x + threadIdx.x) / WARP;
}
__device__ __forceinline__ idx_t grid_warps() { return idx_t(gridDim.x) * blockDim.x / WARP; }

}  // namespace sk

#endif  // SOFTMAX_KERNELS_COMMON_CUH
