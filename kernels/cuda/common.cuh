// Device helpers shared by every softmax-kernels CUDA kernel: compute types, the exponential
// on a prescaled argument, 128-bit vector loads and stores with a scalar tail, warp / row-group
// / block reductions, and the grid-wide reduction through a ticket counter.
//
// The sources are compiled at run time by NVRTC (CuPy RawModule, -std=c++17) and by nvcc in
// kernels/cuda/check.py, so this header uses nothing but the CUDA built-ins and the two
// half-precision headers (no host-only headers, no <cmath>, no <limits>). The few inline-PTX
// intrinsics live in one block below; tests/test_cupy_backend.py compiles the same sources on
// the CPU with SK_HOST_EMULATION defined and supplies them there.
//
// The row strategies (template argument STRATEGY, or their own kernels for (d); chosen on the
// host by softmax_kernels.backends.cupy_backend.plan_launch):
//   WARP_ROWS  (a)  LANES lanes of a warp per row; the row lives in registers.
//   BLOCK_SMEM (b)  a group of G threads per row (G = 32..256 of a 256-thread block, so a block
//                   holds 256 / G rows); the row lives in dynamic shared memory.
//   ONLINE     (c)  a 256-thread block per row; pass 1 folds the row into an online (max, sum),
//                   pass 2 reads it again to write the result.
//   SPLIT      (d)  a row cut into segments (SegPacks below), a 256-thread block per (row,
//                   segment), two launches: (c)'s pass 1 over the segment into a workspace of
//                   partials, then a merge of the row's partials in a fixed order and (c)'s
//                   pass 2 over the segment (the *_split_kernel kernels).
// (a) and (b) read each input element once and write each output element once; (c) and (d) read
// twice (cross-entropy without a gradient: once).
//
// Hot loops: every loop that walks a row's elements carries a `// sk:hot packs=P` marker on its
// `for` line, P being the 16-byte packs one thread handles per iteration; kernels/cuda/check.py
// finds these loops in the SASS through the line table and reports their instructions per
// element (and fails above its bound). Loops without the marker are cold paths (the partial
// first / last pack of a row, rows skipped without reading, the NaN-row fallback).

#ifndef SOFTMAX_KERNELS_COMMON_CUH
#define SOFTMAX_KERNELS_COMMON_CUH

#ifndef SK_HOST_EMULATION
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#endif

#define SK_WARP_ROWS 0
#define SK_BLOCK_SMEM 1
#define SK_ONLINE 2

// Threads per block: (a) 4 warps, (b) and (c) 8 warps.
#define SK_WARP_BLOCK_THREADS 128
#define SK_BLOCK_THREADS 256

// Launch bounds: MIN_BLOCKS sets ptxas's register budget, 65536 / (threads x MIN_BLOCKS):
// (a) 128 threads x 4 blocks -> at most 128 registers (a row of up to 32 values per lane plus the
// row's scalars; soft cross-entropy, with twice the row, asks for 2 blocks); (b) and (c) 256
// threads x 2 blocks -> at most 128 registers: a batch of 4 packs converted to the compute type
// (32 floats for half types), the row's running sums and scalars; at 85 (3 blocks) ptxas
// spills. Two blocks of 8 warps with 4 16-byte loads in flight per thread keep 32 KB in flight
// per SM (an H100 needs about 25 KB to cover its latency at full bandwidth); strategy (b) is
// limited by shared memory before registers from 16 KB of row per block.
#define SK_LAUNCH_BOUNDS_MIN(STRATEGY, MIN_BLOCKS)                                             \
    __launch_bounds__((STRATEGY) == SK_WARP_ROWS ? SK_WARP_BLOCK_THREADS : SK_BLOCK_THREADS,      \
                      MIN_BLOCKS)
#define SK_MIN_BLOCKS(STRATEGY) ((STRATEGY) == SK_WARP_ROWS ? 4 : 2)
#define SK_LAUNCH_BOUNDS(STRATEGY) SK_LAUNCH_BOUNDS_MIN(STRATEGY, SK_MIN_BLOCKS(STRATEGY))

// Partial sums of the grid-wide reductions (cross-entropy's "sum" / "mean"): one slot per block
// and value; the host caps reducing grids at this many blocks (cupy_backend.WS_PARTIALS).
#define SK_WS_PARTIALS 8192

#ifndef SK_HOST_EMULATION
// Dynamic shared memory of strategy (b), sized by the host (16-byte aligned for vector access).
extern __shared__ __align__(16) unsigned char sk_dyn_smem[];
#endif

namespace sk {

constexpr int WARP = 32;
constexpr unsigned FULL_MASK = 0xffffffffu;
// Elements each thread of (b)/(c) loads before using any (batch_packs below): several 16-byte
// loads in flight, and the loop's own instructions spread over as many elements.
constexpr int BATCH_ELEMS = 32;
// Most warps of a (b)/(c) block: reduction scratch is sized by it.
constexpr int MAX_WARPS = SK_BLOCK_THREADS / WARP;

typedef long long idx_t;

// ---------------------------------------------------------------------------------------------
// Device intrinsics (inline PTX), in one place.

#ifndef SK_HOST_EMULATION
// 2^a, one MUFU.EX2: relative error about 2 ulp; flushes results below 2^-126 to 0.
__device__ __forceinline__ float sk_ex2(float a) {
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(a));
    return r;
}
// log2(a), one MUFU.LG2: absolute error about 2^-22 near a = 1, relative 2^-22 elsewhere.
__device__ __forceinline__ float sk_lg2(float a) {
    float r;
    asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(a));
    return r;
}
__device__ __forceinline__ float sk_rcp_approx(float x) {
    float r;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
}
__device__ __forceinline__ double sk_rcp_approx(double x) {
    double r;
    asm("rcp.approx.ftz.f64 %0, %1;" : "=d"(r) : "d"(x));
    return r;
}
// Barrier `id` (1..15; 0 is __syncthreads's) over `n` threads (a multiple of 32): the row
// groups of strategy (b) synchronise without waiting for the other rows of their block.
__device__ __forceinline__ void sk_bar(int id, int n) {
    asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(n) : "memory");
}
// A load that bypasses L1 (other blocks' partial sums, written on other SMs).
__device__ __forceinline__ double sk_load_cg(const double* p) { return __ldcg(p); }
// One 16-byte global store (STG.128), L2 only (.cg: outputs are not read back through L1).
// NVVM splits a plain store of a Pack of half types, even punned through uint4, into 2-element
// stores; the intrinsic keeps the pack whole and is a store like any other for the compiler.
__device__ __forceinline__ void sk_st128(void* p, uint4 u) {
    __stcg(reinterpret_cast<uint4*>(p), u);
}
#endif

// Thread-block clusters (sm_90; strategy (e), the *_cluster_kernel kernels only, which the host
// compiles and launches on devices of compute capability 9.0 and above). The kernels declare
// their cluster shape at compile time (__cluster_dims__: CuPy has no run-time cluster launch,
// cupy/cupy#8780), so an ordinary launch of a grid that is a multiple of C runs as clusters of
// C consecutive blocks. The CPU emulation supplies these with its own cluster of threads.
#ifndef SK_HOST_EMULATION
// (the attribute is an error below sm_90 even on a template never instantiated there: the
// sm_80 module has no cluster kernel, so it gets none)
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#define SK_CLUSTER_DIMS(C)
#else
#define SK_CLUSTER_DIMS(C) __cluster_dims__(C, 1, 1)
#endif
// This block's rank in its cluster (0 .. C - 1).
__device__ __forceinline__ unsigned sk_cluster_rank() {
    unsigned r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
    return r;
}
// Every thread of every block of the cluster: shared-memory writes before it (release) are
// visible to the cluster's reads after it (acquire); __syncthreads' block barrier included.
__device__ __forceinline__ void sk_cluster_sync() {
    asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;"
                 ::: "memory");
}
// The address of the same shared-memory object in block `rank` of the cluster (distributed
// shared memory), as a generic pointer: ordinary loads through it read the partner's copy.
template <typename V>
__device__ __forceinline__ const V* sk_map_rank(const V* p, unsigned rank) {
    unsigned long long r;
    asm volatile("mapa.u64 %0, %1, %2;" : "=l"(r) : "l"(p), "r"(rank));
    return reinterpret_cast<const V*>(r);
}
#endif

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

// Type of row sums whose terms may cancel (the backward's dot(dy, y) and sum(dy)): float64 for
// float32 and float64 data (a float32 sum of a zero-mean dy keeps an error of ~eps sqrt(n) |dy|,
// above float32's bound from a few thousand columns), float32 for half types (their bound,
// 1e-3, is far above float32's rounding).
template <typename T>
struct SumOf {
    typedef float type;
};
template <>
struct SumOf<float> {
    typedef double type;
};
template <>
struct SumOf<double> {
    typedef double type;
};
template <typename T>
using sum_t = typename SumOf<T>::type;

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
// Maths in the compute type.
//
// exp_shifted(zs) = exp(zs) for an argument from which the row maximum was already subtracted
// (zs = z - m <= 0): float32 as 2^(zs log2 e) on MUFU.EX2, 3 instructions. Subtracting m first
// keeps the product's rounding relative to |zs|, so exp's relative error stays below about
// 2.4e-7 + 4e-8 |zs|, within float32's 1e-6 + 1e-5 |ref| wherever the result is not negligible
// (|zs| < 87). float64 keeps the accurate exp(). Per-row quantities (log s, expm1 of the target)
// use the accurate library functions: they run once per row.

constexpr float LOG2E_F = 1.4426950408889634f;

__device__ __forceinline__ float exp_shifted(float zs) { return sk_ex2(zs * LOG2E_F); }
__device__ __forceinline__ double exp_shifted(double zs) { return exp(zs); }

// log(s) of a row sum s >= 1 (it holds exp(0) of the maximum), once per row: float32 as
// lg2.approx times ln 2 (2 instructions; absolute error below 2e-7 near s = 1, relative 2^-22
// elsewhere, within float32's 1e-6 + 1e-5 |ref| for every quantity built on it); float64 log().
constexpr float LN2_F = 0.6931471805599453f;
__device__ __forceinline__ float sk_log(float v) { return sk_lg2(v) * LN2_F; }
__device__ __forceinline__ double sk_log(double v) { return log(v); }
// expm1(d) for d <= 0 (d = log p_t, giving -(1 - p_t) without rounding p_t first), once per
// row: float32 as a degree-7 Taylor polynomial for |d| < 0.3 (truncation below 2e-9 |d|) and
// 2^(d log2 e) - 1 beyond (no cancellation there: 1 - e^d > 0.25); float64 expm1().
__device__ __forceinline__ float sk_expm1(float d) {
    float p = fmaf(d, 1.0f / 7.0f, 1.0f);
    p = fmaf(d * (1.0f / 6.0f), p, 1.0f);
    p = fmaf(d * (1.0f / 5.0f), p, 1.0f);
    p = fmaf(d * (1.0f / 4.0f), p, 1.0f);
    p = fmaf(d * (1.0f / 3.0f), p, 1.0f);
    p = fmaf(d * 0.5f, p, 1.0f);
    const float small = d * p;
    const float big = sk_ex2(d * LOG2E_F) - 1.0f;
    return fabsf(d) < 0.3f ? small : big;
}
__device__ __forceinline__ double sk_expm1(double v) { return expm1(v); }
__device__ __forceinline__ float sk_tanh(float v) { return tanhf(v); }
__device__ __forceinline__ double sk_tanh(double v) { return tanh(v); }
__device__ __forceinline__ float fma_acc(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double fma_acc(double a, double b, double c) { return fma(a, b, c); }
// fmax drops a NaN operand; a NaN element still reaches every row sum (exp(NaN - m) = NaN), so
// the whole row comes out NaN, as in NumPy.
__device__ __forceinline__ float sk_max(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double sk_max(double a, double b) { return fmax(a, b); }

// 1 / x without the IEEE division's slow-path subroutine call (a call makes ptxas save live
// registers to the stack): the hardware approximation refined by one (float) or two (double)
// Newton steps, within about one unit in the last place. 0, +-inf and NaN map as 1 / x does.
__device__ __forceinline__ float sk_rcp(float x) {
    float r = sk_rcp_approx(x);
    if (r - r == 0.0f && r != 0.0f) {  // finite, non-zero: refine
        r = fmaf(r, fmaf(-x, r, 1.0f), r);
    }
    return r;
}
__device__ __forceinline__ double sk_rcp(double x) {
    double r = sk_rcp_approx(x);
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

// The reference every row sum is taken relative to: the row maximum, or 0 for a row whose
// maximum is -inf (all -inf, or nothing kept), so that exp(-inf - ref) = 0 and no -inf - -inf
// NaN appears. Applied once per row; the per-element code never tests for -inf.
template <typename A>
__device__ __forceinline__ A row_ref(A m) {
    return m == neg_inf<A>() ? A(0) : m;
}

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
// (1 byte per element) have their own flag, mask_vec. Strategy (a) has a FAST instance for rows
// made of whole packs only (vec_ok, no shift, n a multiple of VEC, mask in step): no tail.

template <typename T>
struct Vec {
    static constexpr int value = 16 / int(sizeof(T));
};

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
    T v[N];
};

// Full packs per batch: BATCH_ELEMS elements (4 packs of a half type, 8 of float32), at most
// 32 / sizeof(T) packs (float64: 4, for its registers), half as many with two operands.
template <typename T>
__device__ constexpr int batch_packs(bool two_operands) {
    const int by_elems = BATCH_ELEMS / Vec<T>::value, cap = 32 / int(sizeof(T));
    const int nb = by_elems < cap ? by_elems : cap;
    return two_operands ? nb / 2 : nb;
}

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

// 16-byte loads and stores go through uint4 (one LDG.128 / STG.128): a Pack of half types is a
// struct of 8 class objects, whose copy the compiler may otherwise split into 8 scalar accesses.
template <int VEC, typename T>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* p) {
    static_assert(sizeof(Pack<T, VEC>) == 16, "a pack is 16 bytes");
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    Pack<T, VEC> r;
    *reinterpret_cast<uint4*>(&r) = u;
    return r;
}

// (shared memory)
template <int VEC, typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, VEC>& r) {
    static_assert(sizeof(Pack<T, VEC>) == 16, "a pack is 16 bytes");
    *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(&r);
}

// (global memory)
template <int VEC, typename T>
__device__ __forceinline__ void store_pack_global(T* p, const Pack<T, VEC>& r) {
    static_assert(sizeof(Pack<T, VEC>) == 16, "a pack is 16 bytes");
    sk_st128(p, *reinterpret_cast<const uint4*>(&r));
}

// Load the pack starting at column c0 (may be negative in a row's first pack); elements outside
// [0, n) are not read and come back as zero bits.
template <int VEC, typename T, typename I>
__device__ __forceinline__ void load_raw(const T* row, I c0, I n, bool vec_ok,
                                         Pack<T, VEC>& raw) {
    if (vec_ok && c0 >= 0 && c0 + VEC <= n) {
        raw = load_pack<VEC>(row + c0);
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

// float16 pairs convert together (__half22float2 on each packed 32-bit word).
template <>
__device__ __forceinline__ void raw_to_acc<8, __half>(const Pack<__half, 8>& raw, float (&v)[8]) {
    const __half2* h = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const float2 f = __half22float2(h[j]);
        v[2 * j] = f.x;
        v[2 * j + 1] = f.y;
    }
}

// bfloat16 is float32's upper half: one shift or mask per element on the packed 32-bit words
// (__bfloat162float goes through a 16-bit register first: two instructions per element).
template <>
__device__ __forceinline__ void raw_to_acc<8, __nv_bfloat16>(const Pack<__nv_bfloat16, 8>& raw,
                                                             float (&v)[8]) {
    const uint4 u = *reinterpret_cast<const uint4*>(&raw);
    const unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        v[2 * j] = __uint_as_float(w[j] << 16);
        v[2 * j + 1] = __uint_as_float(w[j] & 0xffff0000u);
    }
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
        store_pack_global<VEC>(row + c0, raw);
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
    store_pack_global<VEC>(dst, raw);
}

// Mask bytes (bool) for the VEC columns at c0 as a bit set (bit i: column c0 + i kept); 0
// outside [0, n). FULL: the pack lies inside the row and the mask's bytes line up (one load).
template <int VEC, bool FULL, typename I>
__device__ __forceinline__ unsigned load_keep(const unsigned char* row, I c0, I n,
                                              bool mask_vec) {
    unsigned bits = 0;
    if (FULL || (mask_vec && c0 >= 0 && c0 + VEC <= n)) {
        const Pack<unsigned char, VEC> raw =
            *reinterpret_cast<const Pack<unsigned char, VEC>*>(row + c0);
#pragma unroll
        for (int i = 0; i < VEC; ++i) bits |= (raw.v[i] != 0 ? 1u : 0u) << i;
    } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
            const I c = c0 + i;
            bits |= (in_row(c, n) && row[c] != 0 ? 1u : 0u) << i;
        }
    }
    return bits;
}

// Shared-memory slots per row buffer of strategy (b): every pack of a row, whatever its shift.
// The host sizes the dynamic shared memory with the same formula (smem_slots in
// cupy_backend.py).
template <int VEC>
__device__ __forceinline__ int smem_slots(int n_cols, bool vec_ok) {
    return ((n_cols + VEC - 1) / VEC + (vec_ok ? 1 : 0)) * VEC;
}

// ---------------------------------------------------------------------------------------------
// Pack loops of strategies (b) and (c): a group of nt threads walks a row's packs, thread t
// owning packs k = t, t + nt, t + 2 nt, ... in every pass, so shared-memory slots need no
// barrier between passes. Full packs (inside [0, n), vector path) go NB at a time with
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

// One segment of a row's packs (the split strategy (d): a row cut into segments handled by
// different blocks): the row's packs [k0, k1) seen as packs 0 .. np - 1 of their own, with the
// same members as Packs, so the pack loops above walk a segment as they walk a row. Segment
// boundaries are pack boundaries of the row (k * VEC - shift in columns: inside a 16-byte pack
// of column space when the row is shifted, never inside a pack of memory), so each pack belongs
// to one segment, and only the row's own partial packs (its first, its last) are partial here:
// segment pack 0 when the segment holds row pack 0 and that is partial (lo = 1), segment pack
// hi when it holds the row's partial last pack.
template <int VEC, typename I>
struct SegPacks {
    I np;       // packs of the segment (0: an empty segment past the row's end)
    I lo, hi;   // full packs: lo <= k < hi (none on the scalar path)
    int shift;
    I base;     // the segment's first pack in the row
    __device__ __forceinline__ SegPacks(const Packs<VEC, I>& pk, I k0, I k1, bool vec_ok)
        : shift(pk.shift), base(k0) {
        if (k1 > pk.np) k1 = pk.np;
        np = k1 > k0 ? k1 - k0 : I(0);
        lo = hi = 0;
        if (vec_ok && np > 0) {
            lo = k0 < pk.lo ? pk.lo - k0 : I(0);
            const I h = (pk.hi < k1 ? pk.hi : k1) - k0;
            hi = h < lo ? lo : h;
        }
    }
    __device__ __forceinline__ I c0(I k) const { return (k + base) * VEC - shift; }
};

// Who walks a row: thread t of nt (a (b) row group, or a whole (c) block).
struct Walker {
    int t, nt;
};

// The first full pack of thread t (pack 0 is partial, and thread 0's, when lo = 1).
template <typename PK>
__device__ __forceinline__ auto first_full(const PK& p, Walker w) -> decltype(p.hi) {
    typedef decltype(p.hi) I;
    return I(w.t) < p.lo ? I(w.t) + I(w.nt) : I(w.t);
}

// load(b, k) for the NB full packs of a batch, then use(b, k) for each: NB 16-byte loads in
// flight per thread, no bounds check inside a batch. Thread t owns the packs k = t (mod nt),
// in this loop as in the others, so a thread finds its own packs in shared memory. Whole
// batches run in the hot loop; the fewer than NB full packs left to a thread at the end of its
// row go one at a time (at most NB - 1 packs per thread and row: cold for the count).
template <int NB, typename PK, typename L, typename U>
__device__ __forceinline__ void for_full_packs(const PK& p, Walker w, L&& load, U&& use) {
    typedef decltype(p.hi) I;
    const I nt = w.nt;
    I kb = first_full(p, w);
#pragma unroll 1
    for (; kb + (NB - 1) * nt < p.hi; kb += NB * nt) {  // sk:hot packs=NB
#pragma unroll
        for (int b = 0; b < NB; ++b) load(b, kb + b * nt);
#pragma unroll
        for (int b = 0; b < NB; ++b) use(b, kb + b * nt);
    }
#pragma unroll 1
    for (; kb < p.hi; kb += nt) {  // sk:cold {
        load(0, kb);
        use(0, kb);
    }  // sk:cold }
}

// for_full_packs for strategy (b), whose first batch was loaded ahead by prefetch_batch (while
// the group reduced the previous row).
template <int NB, typename PK, typename L, typename U>
__device__ __forceinline__ void for_full_packs_prefetched(const PK& p, Walker w, L&& load,
                                                          U&& use) {
    typedef decltype(p.hi) I;
    const I nt = w.nt;
    I kb = first_full(p, w);
    if (kb + (NB - 1) * nt < p.hi) {  // the prefetched batch
#pragma unroll
        for (int b = 0; b < NB; ++b) use(b, kb + b * nt);
        kb += NB * nt;
    }
#pragma unroll 1
    for (; kb + (NB - 1) * nt < p.hi; kb += NB * nt) {  // sk:hot packs=NB
#pragma unroll
        for (int b = 0; b < NB; ++b) load(b, kb + b * nt);
#pragma unroll
        for (int b = 0; b < NB; ++b) use(b, kb + b * nt);
    }
#pragma unroll 1
    for (; kb < p.hi; kb += nt) {  // sk:cold {
        load(0, kb);
        use(0, kb);
    }  // sk:cold }
}

// The first batch of a row's full packs (what for_full_packs_prefetched's first batch uses),
// when this thread has a whole one.
template <int NB, typename PK, typename L>
__device__ __forceinline__ void prefetch_batch(const PK& p, Walker w, L&& load) {
    typedef decltype(p.hi) I;
    const I nt = w.nt;
    const I kb = first_full(p, w);
    if (kb + (NB - 1) * nt < p.hi) {
#pragma unroll
        for (int b = 0; b < NB; ++b) load(b, kb + b * nt);
    }
}

// f(k) for this thread's partial packs: every pack on the scalar path, else at most the row's
// first (k = 0) and last (k = hi). Cold for the instruction count: at most two per row on the
// vector path (the scalar path, for operands whose rows are not in step, is the slow fallback).
template <typename PK, typename F>
__device__ __forceinline__ void for_partial_packs(const PK& p, bool vec_ok, Walker w,
                                                  F&& f) {  // sk:cold {
    typedef decltype(p.hi) I;
    const I nt = w.nt, t = w.t;
    if (!vec_ok) {
#pragma unroll 1
        for (I k = t; k < p.np; k += nt) f(k);
        return;
    }
    if (p.lo > 0 && t == 0) f(I(0));
    if (p.hi < p.np && p.hi % nt == t) f(p.hi);
}  // sk:cold }

// A compile-time bool for generic lambdas: f(k, Bool<true>()) lets f's body test
// decltype(full)::value in `if constexpr`.
template <bool B>
struct Bool {
    static constexpr bool value = B;
};

// f(k, full) for every pack of this thread, one at a time (passes over shared memory: no
// latency to hide, so no batching): the full packs in the hot loop (full = Bool<true>: no
// bounds checks), then the partial ones (Bool<false>). Thread t owns packs k = t (mod nt).
// (PK: Packs, or SegPacks for a cluster block's segment.)
template <typename PK, typename F>
__device__ __forceinline__ void for_smem_packs(const PK& p, bool vec_ok, Walker w, F&& f) {
    typedef decltype(p.hi) I;
    const I first = I(w.t) < p.lo ? I(w.t) + I(w.nt) : I(w.t);
#pragma unroll 1
    for (I k = first; k < p.hi; k += w.nt) f(k, Bool<true>());  // sk:hot packs=1
    for_partial_packs(p, vec_ok, w, [&](I k) { f(k, Bool<false>()); });
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
// Reductions. Each is a fixed tree, so results are bitwise the same run to run.

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
__device__ __forceinline__ unsigned group_or(unsigned v) {
#pragma unroll
    for (int off = WIDTH / 2; off > 0; off >>= 1) v |= __shfl_xor_sync(FULL_MASK, v, off, WIDTH);
    return v;
}

// A row group of strategies (b) and (c): G threads (a multiple of 32) starting at a multiple of
// G; reductions go through warp shuffles, then red (static shared scratch of N * MAX_WARPS
// values, indexed by the block's warp number, so groups never share a slot) with the group's
// own named barrier (none for a single warp). Every thread of the group calls them and gets the
// same bits: each folds the per-warp partials itself, in warp order.
struct Group {
    int g;       // group number in the block
    int G;       // threads per group
    int t;       // thread number in the group
    __device__ __forceinline__ void sync() const {
        if (G > WARP) sk_bar(1 + g, G);
    }
    __device__ __forceinline__ Walker walker() const { return Walker{t, G}; }
};

template <int N, typename A>
__device__ __forceinline__ void group_sum_n(const Group& gr, A (&v)[N], A* red) {
#pragma unroll
    for (int k = 0; k < N; ++k) v[k] = group_sum<WARP>(v[k]);
    if (gr.G <= WARP) return;
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    const int w0 = (gr.g * gr.G) / WARP, nw = gr.G / WARP;
    gr.sync();  // the previous reduction's readers are done with red
    if (lane == 0) {
#pragma unroll
        for (int k = 0; k < N; ++k) red[k * MAX_WARPS + warp] = v[k];
    }
    gr.sync();
#pragma unroll
    for (int k = 0; k < N; ++k) {
        A s = red[k * MAX_WARPS + w0];
        for (int j = 1; j < nw; ++j) s += red[k * MAX_WARPS + w0 + j];
        v[k] = s;
    }
}

template <typename A>
__device__ __forceinline__ A group_max_all(const Group& gr, A v, A* red) {
    v = group_max<WARP>(v);
    if (gr.G <= WARP) return v;
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    const int w0 = (gr.g * gr.G) / WARP, nw = gr.G / WARP;
    gr.sync();
    if (lane == 0) red[warp] = v;
    gr.sync();
    A m = red[w0];
    for (int j = 1; j < nw; ++j) m = sk_max(m, red[w0 + j]);
    return m;
}

__device__ __forceinline__ unsigned group_or_all(const Group& gr, unsigned v, unsigned* red) {
    v = group_or<WARP>(v);
    if (gr.G <= WARP) return v;
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    const int w0 = (gr.g * gr.G) / WARP, nw = gr.G / WARP;
    gr.sync();
    if (lane == 0) red[warp] = v;
    gr.sync();
    unsigned r = 0;
    for (int j = 0; j < nw; ++j) r |= red[w0 + j];
    return r;
}

// A (b) row group of this block: G = min(row_threads, blockDim.x) threads (the host plans G;
// the CPU emulation runs smaller blocks).
__device__ __forceinline__ Group row_group(int row_threads) {
    const int G = row_threads < int(blockDim.x) ? row_threads : int(blockDim.x);
    return Group{int(threadIdx.x) / G, G, int(threadIdx.x) % G};
}

// The whole block as one group (strategy (c), and the end-of-kernel reductions).
__device__ __forceinline__ Group whole_block() {
    return Group{0, int(blockDim.x), int(threadIdx.x)};
}

// Sum over the whole block, every thread calling it; thread 0 (and every thread) gets the
// result. Uses __syncthreads (the block's barrier 0).
template <int N>
__device__ __forceinline__ void block_sum_d(double (&v)[N], double* red) {
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    const int nw = (blockDim.x + WARP - 1) / WARP;
#pragma unroll
    for (int k = 0; k < N; ++k) v[k] = group_sum<WARP>(v[k]);
    __syncthreads();
    if (lane == 0) {
#pragma unroll
        for (int k = 0; k < N; ++k) red[k * MAX_WARPS + warp] = v[k];
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < N; ++k) {
        double s = red[k * MAX_WARPS];
        for (int j = 1; j < nw; ++j) s += red[k * MAX_WARPS + j];
        v[k] = s;
    }
    __syncthreads();
}

// Grid-wide sums of N values per block without a second launch or a memset: each block writes
// its partials (slot [k * SK_WS_PARTIALS + blockIdx.x] of ws_partials), then takes a ticket
// (atomicAdd on the counter after a __threadfence, so its partials are visible first); the last
// block to finish sums every block's partials in block order (a fixed tree: bitwise the same
// result run to run, whichever block finishes last), calls finish(totals) on thread 0 and resets
// the counter to 0 for the next call on this stream. Every thread of every block must call it.
template <int N, typename F>
__device__ __forceinline__ void grid_sum_and_finish(double (&v)[N], unsigned* counter,
                                                    double* ws_partials, F&& finish) {
    __shared__ double red[N * MAX_WARPS];
    __shared__ unsigned last;
    block_sum_d<N>(v, red);
    if (threadIdx.x == 0) {
#pragma unroll
        for (int k = 0; k < N; ++k) ws_partials[k * SK_WS_PARTIALS + blockIdx.x] = v[k];
        __threadfence();
        const unsigned ticket = atomicAdd(counter, 1u);
        last = ticket == gridDim.x - 1 ? 1u : 0u;
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    double tot[N];
#pragma unroll
    for (int k = 0; k < N; ++k) {
        double s = 0.0;
        for (unsigned b = threadIdx.x; b < gridDim.x; b += blockDim.x) {
            s += sk_load_cg(ws_partials + k * SK_WS_PARTIALS + b);
        }
        tot[k] = s;
    }
    block_sum_d<N>(tot, red);
    if (threadIdx.x == 0) {
        finish(tot);
        *counter = 0u;
    }
}

// Grid-stride row loops: (a) hands rows to warps.
__device__ __forceinline__ idx_t global_warp() {
    return (idx_t(blockIdx.x) * blockDim.x + threadIdx.x) / WARP;
}
__device__ __forceinline__ idx_t grid_warps() { return idx_t(gridDim.x) * blockDim.x / WARP; }

}  // namespace sk

#endif  // SOFTMAX_KERNELS_COMMON_CUH
