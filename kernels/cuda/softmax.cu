// softmax / log_softmax forward and backward over the rows of 2-D arrays.
//
// Forward:   v = scale * x (masked entries -inf),  m = max(v),  s = sum(exp(v - m))
//            softmax: y = exp(v - m) / s           log_softmax: y = (v - m) - log(s)
//            A row whose mask keeps nothing gives all 0 / all -inf; otherwise NaN and -inf
//            flow through the formulas exactly as in the NumPy reference (an all -inf row, or a
//            NaN anywhere, makes the row NaN).
// Backward:  softmax:     dx = scale * (dy - dot(dy, y)) * y
//            log_softmax: dx = scale * (dy - exp(y) * sum(dy))
//
// Memory traffic per row of n: forward reads n (+ n mask bytes) and writes n; backward reads
// 2 x n and writes n. Strategy (c) (ONLINE) reads the inputs a second time (log_softmax
// backward: dy only).
//
// Arguments are the rows' base pointers and row strides in elements (the last axis has unit
// stride); rows are indexed with 64-bit offsets. The output may be the input's own memory
// (out=x): every element of a row is read before any element of that row is written.

#include "common.cuh"

namespace sk {

// ---------------------------------------------------------------------------------------------
// (a) WARP_ROWS: LANES lanes per row (32 / LANES rows per warp); lane l holds the packs
// k = p * LANES + l, p = 0..PACKS-1, so each load instruction of a group covers LANES
// consecutive packs.

template <typename T, bool IS_LOG, int LANES, int PACKS>
__device__ __forceinline__ void softmax_fwd_warp(const T* x_ptr, T* y_ptr,
                                                 const unsigned char* mask_ptr, idx_t n_rows,
                                                 int n_cols, idx_t row_stride, idx_t y_row_stride,
                                                 idx_t mask_row_stride, acc_t<T> scale,
                                                 bool vec_ok, bool mask_vec) {
    typedef acc_t<T> A;
    constexpr int VEC = Vec<T>::value;
    constexpr int ROWS = WARP / LANES;
    const int lane = threadIdx.x % WARP;
    const int l = lane % LANES;
    const bool has_mask = mask_ptr != nullptr;
    for (idx_t row0 = global_warp() * ROWS; row0 < n_rows; row0 += grid_warps() * ROWS) {
        const idx_t row = row0 + lane / LANES;
        const bool active = row < n_rows;
        const T* x = x_ptr + (active ? row * row_stride : 0);
        const unsigned char* mk = has_mask ? mask_ptr + (active ? row * mask_row_stride : 0)
                                           : nullptr;
        const int shift = row_shift(x, vec_ok);
        A v[PACKS][VEC];
        unsigned keep[PACKS];  // mask bits per pack
        A m = neg_inf<A>();
        int any = 0;
#pragma unroll
        for (int p = 0; p < PACKS; ++p) {
            const int c0 = (p * LANES + l) * VEC - shift;
            const bool live = active && c0 < n_cols;
            if (live) {
                load_acc<VEC>(x, c0, n_cols, vec_ok, v[p]);
            } else {
#pragma unroll
                for (int i = 0; i < VEC; ++i) v[p][i] = A(0);
            }
            keep[p] = scale_and_mask<VEC>(v[p], scale, mk, has_mask, mask_vec, c0, n_cols, live,
                                          false, any);
#pragma unroll
            for (int i = 0; i < VEC; ++i) m = sk_max(m, v[p][i]);
        }
        m = group_max<LANES>(m);
        if (has_mask) any = group_or<LANES>(any);
        A s = A(0);
#pragma unroll
        for (int p = 0; p < PACKS; ++p) {
            const int c0 = (p * LANES + l) * VEC - shift;
#pragma unroll
            for (int i = 0; i < VEC; ++i) {
                const int c = c0 + i;
                if (active && in_row(c, n_cols)) {
                    const A e = sk_exp(v[p][i] - m);
                    s += e;
                    if (!IS_LOG) v[p][i] = e;  // keep exp(v - m) for the write
                }
            }
        }
        s = group_sum<LANES>(s);
        if (!active) continue;  // after the last shuffle: the loop condition is warp-uniform
        const bool empty = has_mask && !any;
        const A lse = IS_LOG ? sk_log(s) : A(0);
        const A r = IS_LOG ? A(0) : sk_rcp(s);
        T* y = y_ptr + row * y_row_stride;
#pragma unroll
        for (int p = 0; p < PACKS; ++p) {
            const int c0 = (p * LANES + l) * VEC - shift;
            if (c0 < n_cols) {
                A out[VEC];
#pragma unroll
                for (int i = 0; i < VEC; ++i) {
                    if (empty || !((keep[p] >> i) & 1u)) {  // masked: 0 / -inf, NaN row or not
                        out[i] = IS_LOG ? neg_inf<A>() : A(0);
                    } else {
                        out[i] = IS_LOG ? (v[p][i] - m) - lse : v[p][i] * r;
                    }
                }
                store_acc<VEC>(y, c0, n_cols, vec_ok, out);
            }
        }
    }
}

template <typename T, int LANES, int PACKS>
__device__ __forceinline__ void softmax_bwd_warp(const T* dy_ptr, const T* y_ptr, T* dx_ptr,
                                                 idx_t n_rows, int n_cols, idx_t dy_row_stride,
                                                 idx_t y_row_stride, idx_t dx_row_stride,
                                                 acc_t<T> scale, bool is_log,
                                                 bool vec_ok) {
    typedef acc_t<T> A;
    constexpr int VEC = Vec<T>::value;
    constexpr int ROWS = WARP / LANES;
    const int lane = threadIdx.x % WARP;
    const int l = lane % LANES;
    for (idx_t row0 = global_warp() * ROWS; row0 < n_rows; row0 += grid_warps() * ROWS) {
        const idx_t row = row0 + lane / LANES;
        const bool active = row < n_rows;
        const T* dyr = dy_ptr + (active ? row * dy_row_stride : 0);
        const T* yr = y_ptr + (active ? row * y_row_stride : 0);
        const int shift = row_shift(dyr, vec_ok);
        // the rows stay in registers as loaded (half types: two per register)
        Pack<T, VEC> dy[PACKS], yv[PACKS];
        // softmax: dot(dy, y); log_softmax: sum(dy). Accumulated in sum_t (float64 for float32
        // data): the terms may nearly cancel (a zero-mean dy), and the error would reach dx.
        sum_t<T> dot = 0;
#pragma unroll
        for (int p = 0; p < PACKS; ++p) {
            const int c0 = (p * LANES + l) * VEC - shift;
            if (active && c0 < n_cols) {
                load_raw<VEC>(dyr, c0, n_cols, vec_ok, dy[p]);
                load_raw<VEC>(yr, c0, n_cols, vec_ok, yv[p]);
            } else {
#pragma unroll
                for (int i = 0; i < VEC; ++i) dy[p].v[i] = yv[p].v[i] = Convert<T>::from(A(0));
            }
            // (elements outside the row load as 0 and add nothing)
#pragma unroll
            for (int i = 0; i < VEC; ++i) {
                // (a float32 product is exact to 6e-8 |dy y|: only the sum needs float64)
                dot += sum_t<T>(is_log ? to_acc(dy[p].v[i])
                                       : to_acc(dy[p].v[i]) * to_acc(yv[p].v[i]));
            }
        }
        const A dsum = A(group_sum<LANES>(dot));
        if (!active) continue;
        T* dx = dx_ptr + row * dx_row_stride;
#pragma unroll
        for (int p = 0; p < PACKS; ++p) {
            const int c0 = (p * LANES + l) * VEC - shift;
            if (c0 < n_cols) {
                A d[VEC], yy[VEC];
                raw_to_acc<VEC>(dy[p], d);
                raw_to_acc<VEC>(yv[p], yy);
#pragma unroll
                for (int i = 0; i < VEC; ++i) {
                    d[i] = is_log ? (d[i] - sk_exp(yy[i]) * dsum) * scale
                                  : (d[i] - dsum) * yy[i] * scale;
                }
                store_acc<VEC>(dx, c0, n_cols, vec_ok, d);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// (b) BLOCK_SMEM: a block per row. Thread t owns packs k = t + j * blockDim.x and parks them in
// shared memory at slot k * VEC; as each thread only ever touches its own slots, the passes
// need no barrier besides the reductions'.

template <typename T, bool IS_LOG>
__device__ __forceinline__ void softmax_fwd_block(const T* x_ptr, T* y_ptr,
                                                  const unsigned char* mask_ptr, idx_t n_rows,
                                                  int n_cols, idx_t row_stride, idx_t y_row_stride,
                                                  idx_t mask_row_stride, acc_t<T> scale,
                                                  bool vec_ok, bool mask_vec) {
    typedef acc_t<T> A;
    constexpr int VEC = Vec<T>::value;
    __shared__ A red[WARP];
    A* buf = reinterpret_cast<A*>(sk_dyn_smem);  // the row's v = scale * x, by pack
    const bool has_mask = mask_ptr != nullptr;
    const int nt = blockDim.x;
    for (idx_t row = blockIdx.x; row < n_rows; row += gridDim.x) {
        const T* x = x_ptr + row * row_stride;
        const unsigned char* mk = has_mask ? mask_ptr + row * mask_row_stride : nullptr;
        const Packs<VEC, int> pk(n_cols, row_shift(x, vec_ok), vec_ok);
        A m = neg_inf<A>();
        int any = 0;
        // pass 1: global -> shared, row maximum (reads n)
        auto park = [&](int k, const Pack<T, VEC>& raw, bool full) {
            const int c0 = pk.c0(k);
            A v[VEC];
            raw_to_acc<VEC>(raw, v);
            scale_and_mask<VEC>(v, scale, mk, has_mask, mask_vec, c0, n_cols, true, full, any);
#pragma unroll
            for (int i = 0; i < VEC; ++i) m = sk_max(m, v[i]);
            smem_store<VEC>(buf + k * VEC, v);
        };
        Pack<T, VEC> raw[BATCH];
        for_full_packs<BATCH>(
            pk, Walker{int(threadIdx.x), int(blockDim.x)}, [&](int b, int k) { raw[b] = *reinterpret_cast<const Pack<T, VEC>*>(x + pk.c0(k)); },
            [&](int b, int k) { park(k, raw[b], true); });
        for_partial_packs(pk, vec_ok, Walker{int(threadIdx.x), int(blockDim.x)}, [&](int k) {
            Pack<T, VEC> r;
            load_raw<VEC>(x, pk.c0(k), n_cols, false, r);
            park(k, r, false);
        });
        m = block_max(m, red);
        if (has_mask) any = __syncthreads_or(any);
        // pass 2: s = sum(exp(v - m)); softmax keeps exp(v - m) in shared memory
        A s[1] = {A(0)};
        for (int k = threadIdx.x; k < pk.np; k += nt) {
            const int c0 = pk.c0(k);
            A v[VEC];
            smem_load<VEC>(buf + k * VEC, v);
#pragma unroll
            for (int i = 0; i < VEC; ++i) {
                const A e = in_row(c0 + i, n_cols) ? sk_exp(v[i] - m) : A(0);
                s[0] += e;
                if (!IS_LOG) v[i] = e;
            }
            if (!IS_LOG) smem_store<VEC>(buf + k * VEC, v);
        }
        block_sum<1>(s, red);
        // pass 3: shared -> global (writes n). In a row a NaN makes NaN (s = NaN), the masked
        // entries still get 0 / -inf: only there is the mask read again.
        const bool empty = has_mask && !any;
        const bool nan_masked = has_mask && !(s[0] == s[0]);
        const A lse = IS_LOG ? sk_log(s[0]) : A(0);
        const A r = IS_LOG ? A(0) : sk_rcp(s[0]);
        T* y = y_ptr + row * y_row_stride;
        for (int k = threadIdx.x; k < pk.np; k += nt) {
            A v[VEC];
            smem_load<VEC>(buf + k * VEC, v);
            const unsigned keep =
                nan_masked ? load_keep<VEC, false>(mk, pk.c0(k), n_cols, mask_vec) : ~0u;
#pragma unroll
            for (int i = 0; i < VEC; ++i) {
                if (empty || !((keep >> i) & 1u)) {
                    v[i] = IS_LOG ? neg_inf<A>() : A(0);
                } else {
                    v[i] = IS_LOG ? (v[i] - m) - lse : v[i] * r;
                }
            }
            store_acc<VEC>(y, pk.c0(k), n_cols, vec_ok, v);
        }
    }
}

template <typename T>
__device__ __forceinline__ void softmax_bwd_block(const T* dy_ptr, const T* y_ptr, T* dx_ptr,
                                                  idx_t n_rows, int n_cols, idx_t dy_row_stride,
                                                  idx_t y_row_stride, idx_t dx_row_stride,
                                                  acc_t<T> scale, bool is_log,
                                                 bool vec_ok) {
    typedef acc_t<T> A;
    constexpr int VEC = Vec<T>::value;
    constexpr int NB = BATCH / 2;  // full packs per batch: two operands, the same bytes in flight
    __shared__ sum_t<T> red[WARP];  // the row sum, in sum_t (see softmax_bwd_warp)
    // dy and y rows as raw T, by pack (each buffer a multiple of 16 bytes)
    T* dyb = reinterpret_cast<T*>(sk_dyn_smem);
    T* yb = dyb + smem_slots<VEC>(n_cols, vec_ok);
    const int nt = blockDim.x;
    for (idx_t row = blockIdx.x; row < n_rows; row += gridDim.x) {
        const T* dyr = dy_ptr + row * dy_row_stride;
        const T* yr = y_ptr + row * y_row_stride;
        const Packs<VEC, int> pk(n_cols, row_shift(dyr, vec_ok), vec_ok);
        sum_t<T> dot[1] = {0};
        // pass 1: global -> shared, dot(dy, y) or sum(dy) (reads 2 x n; elements outside the
        // row load as 0 and add nothing)
        auto park = [&](int k, const Pack<T, VEC>& d_raw, const Pack<T, VEC>& y_raw) {
            *reinterpret_cast<Pack<T, VEC>*>(dyb + k * VEC) = d_raw;
            *reinterpret_cast<Pack<T, VEC>*>(yb + k * VEC) = y_raw;
            A d[VEC], yv[VEC];
            raw_to_acc<VEC>(d_raw, d);
            raw_to_acc<VEC>(y_raw, yv);
#pragma unroll
            for (int i = 0; i < VEC; ++i) dot[0] += sum_t<T>(is_log ? d[i] : d[i] * yv[i]);
        };
        Pack<T, VEC> rd[NB], ry[NB];
        for_full_packs<NB>(
            pk, Walker{int(threadIdx.x), int(blockDim.x)},
            [&](int b, int k) {
                rd[b] = *reinterpret_cast<const Pack<T, VEC>*>(dyr + pk.c0(k));
                ry[b] = *reinterpret_cast<const Pack<T, VEC>*>(yr + pk.c0(k));
            },
            [&](int b, int k) { park(k, rd[b], ry[b]); });
        for_partial_packs(pk, vec_ok, Walker{int(threadIdx.x), int(blockDim.x)}, [&](int k) {
            Pack<T, VEC> d_raw, y_raw;
            load_raw<VEC>(dyr, pk.c0(k), n_cols, false, d_raw);
            load_raw<VEC>(yr, pk.c0(k), n_cols, false, y_raw);
            park(k, d_raw, y_raw);
        });
        block_sum<1>(dot, red);
        const A dsum = A(dot[0]);
        // pass 2: shared -> global (writes n)
        T* dx = dx_ptr + row * dx_row_stride;
        for (int k = threadIdx.x; k < pk.np; k += nt) {
            A d[VEC], yv[VEC];
            raw_to_acc<VEC>(*reinterpret_cast<const Pack<T, VEC>*>(dyb + k * VEC), d);
            raw_to_acc<VEC>(*reinterpret_cast<const Pack<T, VEC>*>(yb + k * VEC), yv);
#pragma unroll
            for (int i = 0; i < VEC; ++i) {
                d[i] = is_log ? (d[i] - sk_exp(yv[i]) * dsum) * scale
                              : (d[i] - dsum) * yv[i] * scale;
            }
            store_acc<VEC>(dx, pk.c0(k), n_cols, vec_ok, d);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// (c) ONLINE: rows too long for shared memory. Pass 1 folds the row into an online (max, sum)
// per thread (one merge per pack), merged over the block; pass 2 reads the row again.
// Column indices are 64-bit here: this path has no row-length limit.

template <typename T, bool IS_LOG>
__device__ __forceinline__ void softmax_fwd_online(const T* x_ptr, T* y_ptr,
                                                   const unsigned char* mask_ptr, idx_t n_rows,
                                                   idx_t n_cols, idx_t row_stride,
                                                   idx_t y_row_stride, idx_t mask_row_stride,
                                                   acc_t<T> scale, bool vec_ok, bool mask_vec) {
    typedef acc_t<T> A;
    constexpr int VEC = Vec<T>::value;
    __shared__ A red[2 * WARP];
    const bool has_mask = mask_ptr != nullptr;
    for (idx_t row = blockIdx.x; row < n_rows; row += gridDim.x) {
        const T* x = x_ptr + row * row_stride;
        const unsigned char* mk = has_mask ? mask_ptr + row * mask_row_stride : nullptr;
        const Packs<VEC, idx_t> pk(n_cols, row_shift(x, vec_ok), vec_ok);
        Online<A> o;
        o.init();
        int any = 0;
        // v = scale * x of a pack, -inf where masked or outside the row
        auto values = [&](idx_t k, const Pack<T, VEC>& raw, A (&v)[VEC], bool full) {
            const idx_t c0 = pk.c0(k);
            raw_to_acc<VEC>(raw, v);
            return scale_and_mask<VEC>(v, scale, mk, has_mask, mask_vec, c0, n_cols, true, full,
                                       any);
        };
        // pass 1 (reads n): one online merge per pack
        auto fold = [&](idx_t k, const Pack<T, VEC>& raw, bool full) {
            A v[VEC];
            values(k, raw, v, full);
            A pm = neg_inf<A>();
#pragma unroll
            for (int i = 0; i < VEC; ++i) pm = sk_max(pm, v[i]);
            const A mn = sk_max(o.m, pm);
            A s = o.s * exp_rel(o.m, mn);
#pragma unroll
            for (int i = 0; i < VEC; ++i) s += exp_rel(v[i], mn);
            o.m = mn;
            o.s = s;
        };
        Pack<T, VEC> raw[BATCH];
        for_full_packs<BATCH>(
            pk, Walker{int(threadIdx.x), int(blockDim.x)}, [&](int b, idx_t k) { raw[b] = *reinterpret_cast<const Pack<T, VEC>*>(x + pk.c0(k)); },
            [&](int b, idx_t k) { fold(k, raw[b], true); });
        for_partial_packs(pk, vec_ok, Walker{int(threadIdx.x), int(blockDim.x)}, [&](idx_t k) {
            Pack<T, VEC> r;
            load_raw<VEC>(x, pk.c0(k), n_cols, false, r);
            fold(k, r, false);
        });
        block_online(o, red);
        if (has_mask) any = __syncthreads_or(any);
        // pass 2 (reads n again, writes n); the same thread reads then writes each element
        const bool empty = has_mask && !any;
        const A lse = IS_LOG ? sk_log(o.s) : A(0);
        const A r = IS_LOG ? A(0) : sk_rcp(o.s);
        T* y = y_ptr + row * y_row_stride;
        auto result = [&](idx_t k, const Pack<T, VEC>& raw, A (&v)[VEC], bool full) {
            if (empty) {
#pragma unroll
                for (int i = 0; i < VEC; ++i) v[i] = IS_LOG ? neg_inf<A>() : A(0);
                return;
            }
            const unsigned keep = values(k, raw, v, full);
#pragma unroll
            for (int i = 0; i < VEC; ++i) {
                // masked entries: 0 / -inf, also in a row that a NaN makes NaN
                v[i] = !((keep >> i) & 1u) ? (IS_LOG ? neg_inf<A>() : A(0))
                       : IS_LOG          ? (v[i] - o.m) - lse
                                         : sk_exp(v[i] - o.m) * r;
            }
        };
        for_full_packs<BATCH>(
            pk, Walker{int(threadIdx.x), int(blockDim.x)},
            [&](int b, idx_t k) {
                if (!empty) raw[b] = *reinterpret_cast<const Pack<T, VEC>*>(x + pk.c0(k));
            },
            [&](int b, idx_t k) {
                A v[VEC];
                result(k, raw[b], v, true);
                store_full<VEC>(y + pk.c0(k), v);
            });
        for_partial_packs(pk, vec_ok, Walker{int(threadIdx.x), int(blockDim.x)}, [&](idx_t k) {
            Pack<T, VEC> rr;
            load_raw<VEC>(x, pk.c0(k), n_cols, false, rr);
            A v[VEC];
            result(k, rr, v, false);
            store_acc<VEC>(y, pk.c0(k), n_cols, false, v);
        });
    }
}

template <typename T>
__device__ __forceinline__ void softmax_bwd_online(const T* dy_ptr, const T* y_ptr, T* dx_ptr,
                                                   idx_t n_rows, idx_t n_cols,
                                                   idx_t dy_row_stride, idx_t y_row_stride,
                                                   idx_t dx_row_stride, acc_t<T> scale,
                                                   bool is_log, bool vec_ok) {
    typedef acc_t<T> A;
    constexpr int VEC = Vec<T>::value;
    constexpr int NB = BATCH / 2;  // full packs per batch: two operands, the same bytes in flight
    __shared__ sum_t<T> red[WARP];  // the row sum, in sum_t (see softmax_bwd_warp)
    for (idx_t row = blockIdx.x; row < n_rows; row += gridDim.x) {
        const T* dyr = dy_ptr + row * dy_row_stride;
        const T* yr = y_ptr + row * y_row_stride;
        const Packs<VEC, idx_t> pk(n_cols, row_shift(dyr, vec_ok), vec_ok);
        sum_t<T> dot[1] = {0};
        // pass 1 (reads 2 x n; log_softmax: n, dy only)
        auto accumulate = [&](const Pack<T, VEC>& d_raw, const Pack<T, VEC>& y_raw) {
            A d[VEC], yv[VEC];
            raw_to_acc<VEC>(d_raw, d);
            if (!is_log) raw_to_acc<VEC>(y_raw, yv);
#pragma unroll
            for (int i = 0; i < VEC; ++i) dot[0] += sum_t<T>(is_log ? d[i] : d[i] * yv[i]);
        };
        Pack<T, VEC> rd[NB], ry[NB];
        for_full_packs<NB>(
            pk, Walker{int(threadIdx.x), int(blockDim.x)},
            [&](int b, idx_t k) {
                rd[b] = *reinterpret_cast<const Pack<T, VEC>*>(dyr + pk.c0(k));
                if (!is_log) ry[b] = *reinterpret_cast<const Pack<T, VEC>*>(yr + pk.c0(k));
            },
            [&](int b, idx_t k) { accumulate(rd[b], ry[b]); });
        for_partial_packs(pk, vec_ok, Walker{int(threadIdx.x), int(blockDim.x)}, [&](idx_t k) {
            Pack<T, VEC> d_raw, y_raw;
            load_raw<VEC>(dyr, pk.c0(k), n_cols, false, d_raw);
            if (!is_log) load_raw<VEC>(yr, pk.c0(k), n_cols, false, y_raw);
            accumulate(d_raw, y_raw);
        });
        block_sum<1>(dot, red);
        const A dsum = A(dot[0]);
        // pass 2 (reads 2 x n again, writes n)
        T* dx = dx_ptr + row * dx_row_stride;
        auto result = [&](const Pack<T, VEC>& d_raw, const Pack<T, VEC>& y_raw, A (&d)[VEC]) {
            A yv[VEC];
            raw_to_acc<VEC>(d_raw, d);
            raw_to_acc<VEC>(y_raw, yv);
#pragma unroll
            for (int i = 0; i < VEC; ++i) {
                d[i] = is_log ? (d[i] - sk_exp(yv[i]) * dsum) * scale
                              : (d[i] - dsum) * yv[i] * scale;
            }
        };
        for_full_packs<NB>(
            pk, Walker{int(threadIdx.x), int(blockDim.x)},
            [&](int b, idx_t k) {
                rd[b] = *reinterpret_cast<const Pack<T, VEC>*>(dyr + pk.c0(k));
                ry[b] = *reinterpret_cast<const Pack<T, VEC>*>(yr + pk.c0(k));
            },
            [&](int b, idx_t k) {
                A d[VEC];
                result(rd[b], ry[b], d);
                store_full<VEC>(dx + pk.c0(k), d);
            });
        for_partial_packs(pk, vec_ok, Walker{int(threadIdx.x), int(blockDim.x)}, [&](idx_t k) {
            Pack<T, VEC> d_raw, y_raw;
            load_raw<VEC>(dyr, pk.c0(k), n_cols, false, d_raw);
            load_raw<VEC>(yr, pk.c0(k), n_cols, false, y_raw);
            A d[VEC];
            result(d_raw, y_raw, d);
            store_acc<VEC>(dx, pk.c0(k), n_cols, false, d);
        });
    }
}

}  // namespace sk

// ---------------------------------------------------------------------------------------------
// Kernels. STRATEGY picks (a)/(b)/(c); LANES and PACKS shape strategy (a) (1 for the others).
// vec_ok / mask_vec: 16-byte packs are legal for the data rows / the mask rows (see
// common.cuh). Grids are capped to fill the GPU once and loop over rows (grid-stride).

template <typename T, bool IS_LOG, int STRATEGY, int LANES, int PACKS>
__global__ void SK_LAUNCH_BOUNDS_MIN(STRATEGY, (STRATEGY) == SK_WARP_ROWS ? 4 : 2)
    softmax_fwd_kernel(const T* x_ptr, T* y_ptr, const unsigned char* mask_ptr, long long n_rows,
                       long long n_cols, long long row_stride, long long y_row_stride,
                       long long mask_row_stride, sk::acc_t<T> scale, int vec_ok, int mask_vec) {
    if constexpr (STRATEGY == SK_WARP_ROWS) {
        sk::softmax_fwd_warp<T, IS_LOG, LANES, PACKS>(x_ptr, y_ptr, mask_ptr, n_rows, int(n_cols),
                                                      row_stride, y_row_stride, mask_row_stride,
                                                      scale, vec_ok != 0, mask_vec != 0);
    } else if constexpr (STRATEGY == SK_BLOCK_SMEM) {
        sk::softmax_fwd_block<T, IS_LOG>(x_ptr, y_ptr, mask_ptr, n_rows, int(n_cols), row_stride,
                                         y_row_stride, mask_row_stride, scale, vec_ok != 0,
                                         mask_vec != 0);
    } else {
        sk::softmax_fwd_online<T, IS_LOG>(x_ptr, y_ptr, mask_ptr, n_rows, n_cols, row_stride,
                                          y_row_stride, mask_row_stride, scale, vec_ok != 0,
                                          mask_vec != 0);
    }
}

// is_log: log_softmax backward (y is the log_softmax output), else softmax backward.
template <typename T, int STRATEGY, int LANES, int PACKS>
__global__ void SK_LAUNCH_BOUNDS_MIN(STRATEGY, (STRATEGY) == SK_WARP_ROWS ? 4 : 2)
    softmax_bwd_kernel(const T* dy_ptr, const T* y_ptr, T* dx_ptr, long long n_rows,
                       long long n_cols, long long dy_row_stride, long long y_row_stride,
                       long long dx_row_stride, sk::acc_t<T> scale, int is_log, int vec_ok) {
    if constexpr (STRATEGY == SK_WARP_ROWS) {
        sk::softmax_bwd_warp<T, LANES, PACKS>(dy_ptr, y_ptr, dx_ptr, n_rows, int(n_cols),
                                              dy_row_stride, y_row_stride, dx_row_stride, scale,
                                              is_log != 0, vec_ok != 0);
    } else if constexpr (STRATEGY == SK_BLOCK_SMEM) {
        sk::softmax_bwd_block<T>(dy_ptr, y_ptr, dx_ptr, n_rows, int(n_cols), dy_row_stride,
                                 y_row_stride, dx_row_stride, scale, is_log != 0, vec_ok != 0);
    } else {
        sk::softmax_bwd_online<T>(dy_ptr, y_ptr, dx_ptr, n_rows, n_cols, dy_row_stride,
                                  y_row_stride, dx_row_stride, scale, is_log != 0, vec_ok != 0);
    }
}
