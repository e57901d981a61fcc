// softmax / log_softmax forward and backward over the rows of 2-D arrays.
//
// Forward:   v = scale * x (masked entries -inf),  m = max(v),  mr = m (0 when m = -inf),
//            s = sum(exp(v - mr));  softmax: y = exp(v - mr) / s;  log_softmax: y = (v - mr) - log s
//            Masked entries are 0 / -inf, also in a row that a NaN makes NaN, and a row whose
//            mask keeps nothing is all 0 / all -inf; otherwise NaN and -inf flow through the
//            formulas exactly as in the NumPy reference (an all -inf row, or a NaN anywhere,
//            makes the row NaN). -inf needs no test per element: exp(-inf - mr) = 0 once mr is
//            finite, and mr is settled once per row.
// Backward:  softmax:     dx = scale * (dy - dot(dy, y)) * y
//            log_softmax: dx = scale * (dy - exp(y) * sum(dy))
//            the row sums accumulated in sum_t (float64 for float32 data: they may cancel).
//
// Memory traffic per row of n: forward reads n (+ n mask bytes) and writes n; backward reads
// 2 x n and writes n. Strategy (c) (ONLINE) reads the inputs a second time (log_softmax
// backward: dy only in its first pass).
//
// Arguments are the rows' base pointers and row strides in elements (the last axis has unit
// stride); rows are indexed with 64-bit offsets, columns with 32-bit ones (rows of fewer than
// 2**31 elements, as the host checks). The output may be an input's own memory (out=x, dx=dy or
// dx=y): every element of a row is read before any element of that row is written, and each
// thread writes only what it read itself (or after the group's barriers).

#include "common.cuh"

namespace sk {

template <typename T>
struct FwdParams {
    const T* x;
    T* y;
    const unsigned char* mask;
    idx_t n_rows, row_stride, y_row_stride, mask_row_stride;
    int n_cols, row_threads;
    acc_t<T> scale;
    bool vec_ok, mask_vec;
};

template <typename T>
struct BwdParams {
    const T* dy;
    const T* y;
    T* dx;
    idx_t n_rows, dy_row_stride, y_row_stride, dx_row_stride;
    int n_cols, row_threads;
    acc_t<T> scale;
    bool is_log, vec_ok;
};

template <typename A>
__device__ __forceinline__ A empty_fill(bool is_log) {
    return is_log ? neg_inf<A>() : A(0);
}

// ---------------------------------------------------------------------------------------------
// (a) WARP_ROWS: LANES lanes per row (32 / LANES rows per warp); lane l holds the packs
// k = p * LANES + l, p < PACKS, so each load instruction of a group covers LANES consecutive
// packs. FAST instances take rows of whole packs (vector path, no shift, n a multiple of VEC, a
// mask in step): no bounds check per element; the others any row.

template <typename T, bool IS_LOG, int LANES, int PACKS, bool FAST>
__device__ __forceinline__ void softmax_fwd_warp(const FwdParams<T>& P) {
    typedef acc_t<T> A;
    constexpr int VEC = Vec<T>::value;
    constexpr int ROWS = WARP / LANES;
    const int lane = threadIdx.x % WARP;
    const int l = lane % LANES;
    const int n = P.n_cols;
    const bool has_mask = P.mask != nullptr;
    for (idx_t row0 = global_warp() * ROWS; row0 < P.n_rows; row0 += grid_warps() * ROWS) {  // sk:hot packs=PACKS
        const idx_t row = row0 + lane / LANES;
        const bool active = row < P.n_rows;
        const T* x = P.x + (active ? row * P.row_stride : 0);
        const unsigned char* mk = P.mask + (has_mask && active ? row * P.mask_row_stride : 0);
        const int shift = FAST ? 0 : row_shift(x, P.vec_ok);
        A v[PACKS][VEC];
        unsigned keep[PACKS];  // mask bits per pack (bit i: entry i kept)
        unsigned any = 0;
        A m = neg_inf<A>();
#pragma unroll
        for (int p = 0; p < PACKS; ++p) {
            const int c0 = (p * LANES + l) * VEC - shift;
            const bool live = active && c0 < n;
            keep[p] = ~0u;
            if (live) {
                if (FAST) {
                    raw_to_acc<VEC>(load_pack<VEC>(x + c0), v[p]);
                } else {
                    load_acc<VEC>(x, c0, n, P.vec_ok, v[p]);
                }
#pragma unroll
                for (int i = 0; i < VEC; ++i) v[p][i] *= P.scale;
                if (has_mask) {  // sk:opt {
                    keep[p] = load_keep<VEC, FAST>(mk, c0, n, P.mask_vec);
                    any |= keep[p];
#pragma unroll
                    for (int i = 0; i < VEC; ++i) {
                        if (!((keep[p] >> i) & 1u)) v[p][i] = neg_inf<A>();
                    }
                }  // sk:opt }
#pragma unroll
                for (int i = 0; i < VEC; ++i) {
                    if (FAST || in_row(c0 + i, n)) m = sk_max(m, v[p][i]);
                }
            }
        }
        m = group_max<LANES>(m);
        if (has_mask) any = group_or<LANES>(any);  // sk:opt
        const A mr = row_ref(m);
        A s = A(0);
#pragma unroll
        for (int p = 0; p < PACKS; ++p) {
            const int c0 = (p * LANES + l) * VEC - shift;
            if (active && c0 < n) {
#pragma unroll
                for (int i = 0; i < VEC; ++i) {
                    if (FAST || in_row(c0 + i, n)) {
                        const A e = exp_shifted(v[p][i] - mr);
                        s += e;
                        if (!IS_LOG) v[p][i] = e;  // keep exp(v - mr) for the write
                    }
                }
            }
        }
        s = group_sum<LANES>(s);
        if (!active) continue;  // after the last shuffle: the loop condition is warp-uniform
        const A lse = IS_LOG ? sk_log(s) : A(0);
        const A r = IS_LOG ? A(0) : sk_rcp(s);
        const A off = mr + lse;  // log_softmax: y = v - (mr + log s)
        // masked entries 0 / -inf whatever the row holds; nothing kept: all 0 / -inf
        const bool empty = has_mask && any == 0;
        T* y = P.y + row * P.y_row_stride;
#pragma unroll
        for (int p = 0; p < PACKS; ++p) {
            const int c0 = (p * LANES + l) * VEC - shift;
            if (c0 < n) {
                A out[VEC];
#pragma unroll
                for (int i = 0; i < VEC; ++i) out[i] = IS_LOG ? v[p][i] - off : v[p][i] * r;
                if (has_mask) {  // sk:opt {
#pragma unroll
                    for (int i = 0; i < VEC; ++i) {
                        if (empty || !((keep[p] >> i) & 1u)) out[i] = empty_fill<A>(IS_LOG);
                    }
                }  // sk:opt }
                if (FAST) {
                    store_full<VEC>(y + c0, out);
                } else {
                    store_acc<VEC>(y, c0, n, P.vec_ok, out);
                }
            }
        }
    }
}

template <typename T, int LANES, int PACKS, bool FAST>
__device__ __forceinline__ void softmax_bwd_warp(const BwdParams<T>& P) {
    typedef acc_t<T> A;
    typedef sum_t<T> S;
    constexpr int VEC = Vec<T>::value;
    constexpr int ROWS = WARP / LANES;
    const int lane = threadIdx.x % WARP;
    const int l = lane % LANES;
    const int n = P.n_cols;
    for (idx_t row0 = global_warp() * ROWS; row0 < P.n_rows; row0 += grid_warps() * ROWS) {  // sk:hot packs=PACKS
        const idx_t row = row0 + lane / LANES;
        const bool active = row < P.n_rows;
        const T* dyr = P.dy + (active ? row * P.dy_row_stride : 0);
        const T* yr = P.y + (active ? row * P.y_row_stride : 0);
        const int shift = FAST ? 0 : row_shift(dyr, P.vec_ok);
        // the rows stay in registers as loaded (half types: two per register); elements outside
        // the row load as 0 and add nothing
        Pack<T, VEC> dy[PACKS], yv[PACKS];
#pragma unroll
        for (int p = 0; p < PACKS; ++p) {
            const int c0 = (p * LANES + l) * VEC - shift;
            if (active && c0 < n) {
                if (FAST) {
                    dy[p] = load_pack<VEC>(dyr + c0);
                    yv[p] = load_pack<VEC>(yr + c0);
                } else {
                    load_raw<VEC>(dyr, c0, n, P.vec_ok, dy[p]);
                    load_raw<VEC>(yr, c0, n, P.vec_ok, yv[p]);
                }
            } else {
#pragma unroll
                for (int i = 0; i < VEC; ++i) dy[p].v[i] = yv[p].v[i] = Convert<T>::from(A(0));
            }
        }
        // softmax: dot(dy, y); log_softmax: sum(dy); in S (float64 for float32 data: the
        // terms may nearly cancel, a zero-mean dy, and the error would reach dx). A float32
        // product is exact to 6e-8 |dy y|: only the sum needs float64.
        S dot = S(0);
        if (P.is_log) {  // sk:log {
#pragma unroll
            for (int p = 0; p < PACKS; ++p) {
#pragma unroll
                for (int i = 0; i < VEC; ++i) dot += S(to_acc(dy[p].v[i]));
            }
        } else {  // sk:log } sk:prob {
#pragma unroll
            for (int p = 0; p < PACKS; ++p) {
#pragma unroll
                for (int i = 0; i < VEC; ++i) dot += S(to_acc(dy[p].v[i]) * to_acc(yv[p].v[i]));
            }
        }  // sk:prob }
        const A dsum = A(group_sum<LANES>(dot));
        if (!active) continue;
        T* dx = P.dx + row * P.dx_row_stride;
        const A ds = dsum * P.scale;
#pragma unroll
        for (int p = 0; p < PACKS; ++p) {
            const int c0 = (p * LANES + l) * VEC - shift;
            if (c0 < n) {
                A d[VEC], yy[VEC];
                raw_to_acc<VEC>(dy[p], d);
                raw_to_acc<VEC>(yv[p], yy);
                if (P.is_log) {  // sk:log {
#pragma unroll
                    for (int i = 0; i < VEC; ++i) d[i] = d[i] * P.scale - exp_shifted(yy[i]) * ds;
                } else {  // sk:log } sk:prob {
#pragma unroll
                    for (int i = 0; i < VEC; ++i) d[i] = (d[i] - dsum) * yy[i] * P.scale;
                }  // sk:prob }
                if (FAST) {
                    store_full<VEC>(dx + c0, d);
                } else {
                    store_acc<VEC>(dx, c0, n, P.vec_ok, d);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// (b) BLOCK_SMEM: a group of G threads per row (256 / G rows per 256-thread block, G = 32..256
// so that each thread has at least 4 packs), the row in the group's part of the dynamic shared
// memory by pack (slot k * VEC for pack k, owned by thread k mod G, so a thread only reads back
// its own slots). Each group loads the first batch of its next row while it reduces the current
// one; the other groups of the block, and the other blocks of the SM, overlap their phases.

template <typename T, bool IS_LOG>
__device__ __forceinline__ void softmax_fwd_block(const FwdParams<T>& P) {
    typedef acc_t<T> A;
    constexpr int VEC = Vec<T>::value;
    constexpr int NB = batch_packs<T>(false);
    __shared__ A red[MAX_WARPS];
    __shared__ unsigned redu[MAX_WARPS];
    const Group gr = row_group(P.row_threads);
    const Walker w = gr.walker();
    const int R = int(blockDim.x) / gr.G;
    const int n = P.n_cols;
    A* buf = reinterpret_cast<A*>(sk_dyn_smem) + gr.g * smem_slots<VEC>(n, P.vec_ok);
    const bool has_mask = P.mask != nullptr;
    const idx_t stride = idx_t(gridDim.x) * R;
    idx_t row = idx_t(blockIdx.x) * R + gr.g;
    Pack<T, VEC> raw[NB];
    if (row < P.n_rows) {
        const T* x = P.x + row * P.row_stride;
        const Packs<VEC, int> pk(n, row_shift(x, P.vec_ok), P.vec_ok);
        prefetch_batch<NB>(pk, w, [&](int b, int k) { raw[b] = load_pack<VEC>(x + pk.c0(k)); });
    }
    for (; row < P.n_rows; row += stride) {
        const T* x = P.x + row * P.row_stride;
        const unsigned char* mk = P.mask + (has_mask ? row * P.mask_row_stride : 0);
        const Packs<VEC, int> pk(n, row_shift(x, P.vec_ok), P.vec_ok);
        A m = neg_inf<A>();
        unsigned any = 0;
        // pass 1: global -> shared, v = scale * x (masked -inf), row maximum (reads n)
        auto park = [&](int k, const Pack<T, VEC>& r, bool full) {
            const int c0 = pk.c0(k);
            A v[VEC];
            raw_to_acc<VEC>(r, v);
#pragma unroll
            for (int i = 0; i < VEC; ++i) v[i] *= P.scale;
            if (has_mask) {  // sk:opt {
                const unsigned keep = load_keep<VEC, false>(mk, c0, n, P.mask_vec);
                any |= keep;
#pragma unroll
                for (int i = 0; i < VEC; ++i) {
                    if (!((keep >> i) & 1u)) v[i] = neg_inf<A>();
                }
            }  // sk:opt }
#pragma unroll
            for (int i = 0; i < VEC; ++i) {
                if (full || in_row(c0 + i, n)) m = sk_max(m, v[i]);
            }
            smem_store<VEC>(buf + k * VEC, v);
        };
        for_full_packs_prefetched<NB>(
            pk, w, [&](int b, int k) { raw[b] = load_pack<VEC>(x + pk.c0(k)); },
            [&](int b, int k) { park(k, raw[b], true); });
        for_partial_packs(pk, P.vec_ok, w, [&](int k) {
            Pack<T, VEC> r;
            load_raw<VEC>(x, pk.c0(k), n, false, r);
            park(k, r, false);
        });
        // the next row's first batch, in flight while this row is reduced
        const idx_t next = row + stride;
        if (next < P.n_rows) {
            const T* xn = P.x + next * P.row_stride;
            const Packs<VEC, int> pn(n, row_shift(xn, P.vec_ok), P.vec_ok);
            prefetch_batch<NB>(pn, w, [&](int b, int k) { raw[b] = load_pack<VEC>(xn + pn.c0(k)); });
        }
        m = group_max_all(gr, m, red);
        if (has_mask) any = group_or_all(gr, any, redu);  // sk:opt
        const A mr = row_ref(m);
        // pass 2: s = sum(exp(v - mr)); softmax keeps exp(v - mr) in shared memory
        A s[1] = {A(0)};
        for_smem_packs(pk, P.vec_ok, w, [&](int k, auto full) {
            const int c0 = pk.c0(k);
            A v[VEC];
            smem_load<VEC>(buf + k * VEC, v);
#pragma unroll
            for (int i = 0; i < VEC; ++i) {
                const A e = exp_shifted(v[i] - mr);
                if (decltype(full)::value || in_row(c0 + i, n)) s[0] += e;
                if (!IS_LOG) v[i] = e;
            }
            if (!IS_LOG) smem_store<VEC>(buf + k * VEC, v);
        });
        group_sum_n<1>(gr, s, red);
        const A lse = IS_LOG ? sk_log(s[0]) : A(0);
        const A r = IS_LOG ? A(0) : sk_rcp(s[0]);
        const bool empty = has_mask && any == 0;
        T* y = P.y + row * P.y_row_stride;
        if (gr.G <= WARP) __syncwarp();  // (larger groups: their barriers order the reads)
        if (has_mask && !(s[0] == s[0])) {  // sk:cold { a NaN row: the masked entries still 0 / -inf
            for (int k = w.t; k < pk.np; k += w.nt) {
                A v[VEC];
                smem_load<VEC>(buf + k * VEC, v);
                const unsigned keep = load_keep<VEC, false>(mk, pk.c0(k), n, P.mask_vec);
#pragma unroll
                for (int i = 0; i < VEC; ++i) {
                    v[i] = !((keep >> i) & 1u) ? empty_fill<A>(IS_LOG)
                           : IS_LOG            ? (v[i] - mr) - lse
                                               : v[i] * r;
                }
                store_acc<VEC>(y, pk.c0(k), n, P.vec_ok, v);
            }
            continue;
        }  // sk:cold }
        // pass 3: shared -> global (writes n)
        const A off = mr + lse;  // log_softmax: y = v - (mr + log s)
        for_smem_packs(pk, P.vec_ok, w, [&](int k, auto full) {
            const int c0 = pk.c0(k);
            A v[VEC];
            smem_load<VEC>(buf + k * VEC, v);
#pragma unroll
            for (int i = 0; i < VEC; ++i) v[i] = IS_LOG ? v[i] - off : v[i] * r;
            if (empty) {  // sk:opt {
#pragma unroll
                for (int i = 0; i < VEC; ++i) v[i] = empty_fill<A>(IS_LOG);
            }  // sk:opt }
            if constexpr (decltype(full)::value) {
                store_full<VEC>(y + c0, v);
            } else {
                store_acc<VEC>(y, c0, n, false, v);
            }
        });
    }
}

template <typename T>
__device__ __forceinline__ void softmax_bwd_block(const BwdParams<T>& P) {
    typedef acc_t<T> A;
    typedef sum_t<T> S;
    constexpr int VEC = Vec<T>::value;
    constexpr int NB = batch_packs<T>(true);  // two operands, the same bytes in flight
    __shared__ S red[MAX_WARPS];
    const Group gr = row_group(P.row_threads);
    const Walker w = gr.walker();
    const int R = int(blockDim.x) / gr.G;
    const int n = P.n_cols;
    const int slots = smem_slots<VEC>(n, P.vec_ok);
    // dy and y rows as raw T, by pack (each buffer a multiple of 16 bytes)
    T* dyb = reinterpret_cast<T*>(sk_dyn_smem) + gr.g * 2 * slots;
    T* yb = dyb + slots;
    const idx_t stride = idx_t(gridDim.x) * R;
    idx_t row = idx_t(blockIdx.x) * R + gr.g;
    Pack<T, VEC> rd[NB], ry[NB];
    if (row < P.n_rows) {
        const T* dyr = P.dy + row * P.dy_row_stride;
        const T* yr = P.y + row * P.y_row_stride;
        const Packs<VEC, int> pk(n, row_shift(dyr, P.vec_ok), P.vec_ok);
        prefetch_batch<NB>(pk, w, [&](int b, int k) {
            rd[b] = load_pack<VEC>(dyr + pk.c0(k));
            ry[b] = load_pack<VEC>(yr + pk.c0(k));
        });
    }
    for (; row < P.n_rows; row += stride) {
        const T* dyr = P.dy + row * P.dy_row_stride;
        const T* yr = P.y + row * P.y_row_stride;
        const Packs<VEC, int> pk(n, row_shift(dyr, P.vec_ok), P.vec_ok);
        S dot[1] = {S(0)};
        // pass 1: global -> shared, dot(dy, y) or sum(dy) (reads 2 x n; elements outside the
        // row load as 0 and add nothing)
        auto park = [&](int k, const Pack<T, VEC>& d_raw, const Pack<T, VEC>& y_raw) {
            store_pack<VEC>(dyb + k * VEC, d_raw);
            store_pack<VEC>(yb + k * VEC, y_raw);
            A d[VEC], yv[VEC];
            raw_to_acc<VEC>(d_raw, d);
            raw_to_acc<VEC>(y_raw, yv);
            if (P.is_log) {  // sk:log {
#pragma unroll
                for (int i = 0; i < VEC; ++i) dot[0] += S(d[i]);
            } else {  // sk:log } sk:prob {
#pragma unroll
                for (int i = 0; i < VEC; ++i) dot[0] += S(d[i] * yv[i]);
            }  // sk:prob }
        };
        for_full_packs_prefetched<NB>(
            pk, w,
            [&](int b, int k) {
                rd[b] = load_pack<VEC>(dyr + pk.c0(k));
                ry[b] = load_pack<VEC>(yr + pk.c0(k));
            },
            [&](int b, int k) { park(k, rd[b], ry[b]); });
        for_partial_packs(pk, P.vec_ok, w, [&](int k) {
            Pack<T, VEC> d_raw, y_raw;
            load_raw<VEC>(dyr, pk.c0(k), n, false, d_raw);
            load_raw<VEC>(yr, pk.c0(k), n, false, y_raw);
            park(k, d_raw, y_raw);
        });
        const idx_t next = row + stride;
        if (next < P.n_rows) {
            const T* dn = P.dy + next * P.dy_row_stride;
            const T* yn = P.y + next * P.y_row_stride;
            const Packs<VEC, int> pn(n, row_shift(dn, P.vec_ok), P.vec_ok);
            prefetch_batch<NB>(pn, w, [&](int b, int k) {
                rd[b] = load_pack<VEC>(dn + pn.c0(k));
                ry[b] = load_pack<VEC>(yn + pn.c0(k));
            });
        }
        group_sum_n<1>(gr, dot, red);
        const A dsum = A(dot[0]);
        const A ds = dsum * P.scale;
        if (gr.G <= WARP) __syncwarp();
        // pass 2: shared -> global (writes n)
        T* dx = P.dx + row * P.dx_row_stride;
        for_smem_packs(pk, P.vec_ok, w, [&](int k, auto full) {
            const int c0 = pk.c0(k);
            A d[VEC], yv[VEC];
            raw_to_acc<VEC>(load_pack<VEC>(dyb + k * VEC), d);
            raw_to_acc<VEC>(load_pack<VEC>(yb + k * VEC), yv);
            if (P.is_log) {  // sk:log {
#pragma unroll
                for (int i = 0; i < VEC; ++i) d[i] = d[i] * P.scale - exp_shifted(yv[i]) * ds;
            } else {  // sk:log } sk:prob {
#pragma unroll
                for (int i = 0; i < VEC; ++i) d[i] = (d[i] - dsum) * yv[i] * P.scale;
            }  // sk:prob }
            if constexpr (decltype(full)::value) {
                store_full<VEC>(dx + c0, d);
            } else {
                store_acc<VEC>(dx, c0, n, false, d);
            }
        });
    }
}

// ---------------------------------------------------------------------------------------------
// (c) ONLINE: rows too long for shared memory, a 256-thread block per row. Pass 1 keeps, per
// thread, a running maximum m and s = sum(exp(v - m)), rescaled only when a pack raises m (a
// branch taken a few times per row); the block merges them by moving every thread's s to the
// row maximum. Pass 2 reads the row again (the same thread reads then writes each element).
// (d) SPLIT runs the same two passes over one segment of a row per block (a pack view PK:
// Packs for a whole row, SegPacks for a segment), with the merge of the segments' partial
// (max, sum) between them (in a workspace, across two launches).

// Pass 1 over the packs of pk (reads them once): this thread's running maximum m, the reference
// ref its sum is relative to, s = sum(exp(v - ref)), and the mask bits it saw.
template <typename T, typename PK>
__device__ __forceinline__ void fwd_online_fold(const FwdParams<T>& P, const T* x,
                                                const unsigned char* mk, const PK& pk, Walker w,
                                                acc_t<T>& m, acc_t<T>& ref, acc_t<T>& s,
                                                unsigned& any) {
    typedef acc_t<T> A;
    constexpr int VEC = Vec<T>::value;
    constexpr int NB = batch_packs<T>(false);
    const int n = P.n_cols;
    const bool has_mask = P.mask != nullptr;
    // v = scale * x of a pack, -inf where masked; returns the mask bits
    auto values = [&](int k, const Pack<T, VEC>& raw, A (&v)[VEC]) {
        raw_to_acc<VEC>(raw, v);
#pragma unroll
        for (int i = 0; i < VEC; ++i) v[i] *= P.scale;
        unsigned keep = ~0u;
        if (has_mask) {  // sk:opt {
            keep = load_keep<VEC, false>(mk, pk.c0(k), n, P.mask_vec);
            any |= keep;
#pragma unroll
            for (int i = 0; i < VEC; ++i) {
                if (!((keep >> i) & 1u)) v[i] = neg_inf<A>();
            }
        }  // sk:opt }
        return keep;
    };
    // a batch of NB full packs at a time, the running maximum checked once per batch
    Pack<T, VEC> raw[NB];
    auto fold = [&](int nb, const int (&ks)[NB]) {
        A v[NB][VEC];
        A pm = neg_inf<A>();
#pragma unroll
        for (int b = 0; b < NB; ++b) {
            if (b < nb) {
                values(ks[b], raw[b], v[b]);
#pragma unroll
                for (int i = 0; i < VEC; ++i) pm = sk_max(pm, v[b][i]);
            }
        }
        if (pm > m) {  // the running maximum grows: rescale s (0 while m = -inf)
            if (m != neg_inf<A>()) s *= exp_shifted(ref - pm);
            m = ref = pm;
        }
        // the batch's sum first, then into the row's: a thread's error grows with its
        // batches, not its elements (a 2**20 row gives a thread 4096 of them)
        A bs = A(0);
#pragma unroll
        for (int b = 0; b < NB; ++b) {
            if (b < nb) {
#pragma unroll
                for (int i = 0; i < VEC; ++i) bs += exp_shifted(v[b][i] - ref);
            }
        }
        s += bs;
    };
    int kb = first_full(pk, w);
#pragma unroll 1
    for (; kb + (NB - 1) * w.nt < pk.hi; kb += NB * w.nt) {  // sk:hot packs=NB
        int ks[NB];
#pragma unroll
        for (int b = 0; b < NB; ++b) {
            ks[b] = kb + b * w.nt;
            raw[b] = load_pack<VEC>(x + pk.c0(ks[b]));
        }
        fold(NB, ks);
    }
#pragma unroll 1
    for (; kb < pk.hi; kb += w.nt) {  // sk:cold { fewer than NB full packs left
        int ks[NB] = {kb};
        raw[0] = load_pack<VEC>(x + pk.c0(kb));
        fold(1, ks);
    }  // sk:cold }
    for_partial_packs(pk, P.vec_ok, w, [&](int k) {
        Pack<T, VEC> r;
        load_raw<VEC>(x, pk.c0(k), n, false, r);
        const int c0 = pk.c0(k);
        A v[VEC];
        values(k, r, v);
        A pm = neg_inf<A>();
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
            if (in_row(c0 + i, n)) pm = sk_max(pm, v[i]);
        }
        if (pm > m) {
            if (m != neg_inf<A>()) s *= exp_shifted(ref - pm);
            m = ref = pm;
        }
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
            const A e = exp_shifted(v[i] - ref);
            if (in_row(c0 + i, n)) s += e;
        }
    });
}

// Pass 2 over the packs of pk (reads them again, writes them): y from the row's reference mr,
// r = 1 / s (softmax) or off = mr + log s (log_softmax); masked entries 0 / -inf, every entry
// when the row keeps nothing (empty).
template <typename T, bool IS_LOG, typename PK>
__device__ __forceinline__ void fwd_online_write(const FwdParams<T>& P, const T* x, T* y,
                                                 const unsigned char* mk, const PK& pk, Walker w,
                                                 acc_t<T> mr, acc_t<T> r, acc_t<T> off,
                                                 bool empty) {
    typedef acc_t<T> A;
    constexpr int VEC = Vec<T>::value;
    constexpr int NB = batch_packs<T>(false);
    const int n = P.n_cols;
    const bool has_mask = P.mask != nullptr;
    // scale * x - mr in one FMA (the product exact, one rounding: as accurate as the two
    // steps); masked entries get their fill afterwards
    auto result = [&](int k, const Pack<T, VEC>& raw, A (&v)[VEC]) {
        raw_to_acc<VEC>(raw, v);
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
            v[i] = IS_LOG ? fma_acc(v[i], P.scale, -off)
                          : exp_shifted(fma_acc(v[i], P.scale, -mr)) * r;
        }
        if (has_mask) {  // sk:opt { masked: 0 / -inf, also in a NaN row
            const unsigned keep = load_keep<VEC, false>(mk, pk.c0(k), n, P.mask_vec);
#pragma unroll
            for (int i = 0; i < VEC; ++i) {
                if (empty || !((keep >> i) & 1u)) v[i] = empty_fill<A>(IS_LOG);
            }
        }  // sk:opt }
    };
    Pack<T, VEC> raw[NB];
    for_full_packs<NB>(
        pk, w, [&](int b, int k) { raw[b] = load_pack<VEC>(x + pk.c0(k)); },
        [&](int b, int k) {
            A v[VEC];
            result(k, raw[b], v);
            store_full<VEC>(y + pk.c0(k), v);
        });
    for_partial_packs(pk, P.vec_ok, w, [&](int k) {
        Pack<T, VEC> rr;
        load_raw<VEC>(x, pk.c0(k), n, false, rr);
        A v[VEC];
        result(k, rr, v);
        store_acc<VEC>(y, pk.c0(k), n, false, v);
    });
}

// The block's merge of every thread's (m, ref, s): the maximum M, mr = row_ref(M), and the sum
// relative to mr, in a fixed tree (bitwise the same run to run).
template <typename A>
__device__ __forceinline__ void merge_online(const Group& gr, A m, A ref, A s, A* red, A& M,
                                             A& mr, A& ss) {
    M = group_max_all(gr, m, red);
    mr = row_ref(M);
    A t[1] = {m != neg_inf<A>() ? s * exp_shifted(ref - mr) : A(0)};
    group_sum_n<1>(gr, t, red);
    ss = t[0];
}

template <typename T, bool IS_LOG>
__device__ __forceinline__ void softmax_fwd_online(const FwdParams<T>& P) {
    typedef acc_t<T> A;
    constexpr int VEC = Vec<T>::value;
    __shared__ A red[MAX_WARPS];
    __shared__ unsigned redu[MAX_WARPS];
    const Group gr = whole_block();
    const Walker w = gr.walker();
    const int n = P.n_cols;
    const bool has_mask = P.mask != nullptr;
    for (idx_t row = blockIdx.x; row < P.n_rows; row += gridDim.x) {
        const T* x = P.x + row * P.row_stride;
        const unsigned char* mk = P.mask + (has_mask ? row * P.mask_row_stride : 0);
        const Packs<VEC, int> pk(n, row_shift(x, P.vec_ok), P.vec_ok);
        A m = neg_inf<A>(), ref = A(0), s = A(0);
        unsigned any = 0;
        fwd_online_fold(P, x, mk, pk, w, m, ref, s, any);  // pass 1 (reads n)
        A M, mr, ss;
        merge_online(gr, m, ref, s, red, M, mr, ss);
        if (has_mask) any = group_or_all(gr, any, redu);  // sk:opt
        const bool empty = has_mask && any == 0;
        const A lse = IS_LOG ? sk_log(ss) : A(0);
        const A r = IS_LOG ? A(0) : sk_rcp(ss);
        T* y = P.y + row * P.y_row_stride;
        // pass 2 (reads n again, writes n); log_softmax: y = v - (mr + log s)
        fwd_online_write<T, IS_LOG>(P, x, y, mk, pk, w, mr, r, mr + lse, empty);
    }
}

// Pass 1 of the backward over the packs of pk: this thread's dot(dy, y) (log_softmax: sum(dy))
// in sum_t (reads 2 x n; log_softmax: n, dy only).
template <typename T, typename PK>
__device__ __forceinline__ sum_t<T> bwd_online_dot(const BwdParams<T>& P, const T* dyr,
                                                   const T* yr, const PK& pk, Walker w) {
    typedef acc_t<T> A;
    typedef sum_t<T> S;
    constexpr int VEC = Vec<T>::value;
    constexpr int NB = batch_packs<T>(true);  // two operands, the same bytes in flight
    const int n = P.n_cols;
    S dot = S(0);
    Pack<T, VEC> rd[NB], ry[NB];
    if (P.is_log) {  // sk:log {
        auto acc_log = [&](const Pack<T, VEC>& d_raw) {
            A d[VEC];
            raw_to_acc<VEC>(d_raw, d);
#pragma unroll
            for (int i = 0; i < VEC; ++i) dot += S(d[i]);
        };
        for_full_packs<NB>(
            pk, w, [&](int b, int k) { rd[b] = load_pack<VEC>(dyr + pk.c0(k)); },
            [&](int b, int k) { acc_log(rd[b]); });
        for_partial_packs(pk, P.vec_ok, w, [&](int k) {
            Pack<T, VEC> d_raw;
            load_raw<VEC>(dyr, pk.c0(k), n, false, d_raw);
            acc_log(d_raw);
        });
    } else {  // sk:log } sk:prob {
        auto acc_dot = [&](const Pack<T, VEC>& d_raw, const Pack<T, VEC>& y_raw) {
            A d[VEC], yv[VEC];
            raw_to_acc<VEC>(d_raw, d);
            raw_to_acc<VEC>(y_raw, yv);
#pragma unroll
            for (int i = 0; i < VEC; ++i) dot += S(d[i] * yv[i]);
        };
        for_full_packs<NB>(
            pk, w,
            [&](int b, int k) {
                rd[b] = load_pack<VEC>(dyr + pk.c0(k));
                ry[b] = load_pack<VEC>(yr + pk.c0(k));
            },
            [&](int b, int k) { acc_dot(rd[b], ry[b]); });
        for_partial_packs(pk, P.vec_ok, w, [&](int k) {
            Pack<T, VEC> d_raw, y_raw;
            load_raw<VEC>(dyr, pk.c0(k), n, false, d_raw);
            load_raw<VEC>(yr, pk.c0(k), n, false, y_raw);
            acc_dot(d_raw, y_raw);
        });
    }  // sk:prob }
    return dot;
}

// Pass 2 of the backward over the packs of pk (reads 2 x n again, writes n), from the row's
// dsum = dot(dy, y) (log_softmax: sum(dy)).
template <typename T, typename PK>
__device__ __forceinline__ void bwd_online_write(const BwdParams<T>& P, const T* dyr, const T* yr,
                                                 T* dx, const PK& pk, Walker w, acc_t<T> dsum) {
    typedef acc_t<T> A;
    constexpr int VEC = Vec<T>::value;
    constexpr int NB = batch_packs<T>(true);
    const int n = P.n_cols;
    const A ds = dsum * P.scale;
    auto result = [&](const Pack<T, VEC>& d_raw, const Pack<T, VEC>& y_raw, A (&d)[VEC]) {
        A yv[VEC];
        raw_to_acc<VEC>(d_raw, d);
        raw_to_acc<VEC>(y_raw, yv);
        if (P.is_log) {  // sk:log {
#pragma unroll
            for (int i = 0; i < VEC; ++i) d[i] = d[i] * P.scale - exp_shifted(yv[i]) * ds;
        } else {  // sk:log } sk:prob {
#pragma unroll
            for (int i = 0; i < VEC; ++i) d[i] = (d[i] - dsum) * yv[i] * P.scale;
        }  // sk:prob }
    };
    Pack<T, VEC> rd[NB], ry[NB];
    for_full_packs<NB>(
        pk, w,
        [&](int b, int k) {
            rd[b] = load_pack<VEC>(dyr + pk.c0(k));
            ry[b] = load_pack<VEC>(yr + pk.c0(k));
        },
        [&](int b, int k) {
            A d[VEC];
            result(rd[b], ry[b], d);
            store_full<VEC>(dx + pk.c0(k), d);
        });
    for_partial_packs(pk, P.vec_ok, w, [&](int k) {
        Pack<T, VEC> d_raw, y_raw;
        load_raw<VEC>(dyr, pk.c0(k), n, false, d_raw);
        load_raw<VEC>(yr, pk.c0(k), n, false, y_raw);
        A d[VEC];
        result(d_raw, y_raw, d);
        store_acc<VEC>(dx, pk.c0(k), n, false, d);
    });
}

template <typename T>
__device__ __forceinline__ void softmax_bwd_online(const BwdParams<T>& P) {
    typedef sum_t<T> S;
    constexpr int VEC = Vec<T>::value;
    __shared__ S red[MAX_WARPS];
    const Group gr = whole_block();
    const Walker w = gr.walker();
    const int n = P.n_cols;
    for (idx_t row = blockIdx.x; row < P.n_rows; row += gridDim.x) {
        const T* dyr = P.dy + row * P.dy_row_stride;
        const T* yr = P.y + row * P.y_row_stride;
        const Packs<VEC, int> pk(n, row_shift(dyr, P.vec_ok), P.vec_ok);
        S dot[1] = {bwd_online_dot(P, dyr, yr, pk, w)};  // pass 1
        group_sum_n<1>(gr, dot, red);
        T* dx = P.dx + row * P.dx_row_stride;
        bwd_online_write(P, dyr, yr, dx, pk, w, acc_t<T>(dot[0]));  // pass 2
    }
}

// ---------------------------------------------------------------------------------------------
// (d) SPLIT: a row cut into n_segs segments of seg_packs packs, one 256-thread block per
// (row, segment) item (grid-stride over n_rows x n_segs items, 64-bit), in two launches with no
// host synchronisation between them:
//   phase 0 (statistics): pass 1 over the segment; the block's partials into the workspace
//     (double slots, per item): forward [M_j, s_j relative to row_ref(M_j), mask bits seen],
//     backward [dot_j] (log_softmax: the segment's sum(dy)), in sum_t as (c) accumulates it.
//   phase 1 (normalise): every block of a row merges that row's partials in a fixed order
//     (thread j of the block takes segments j, j + 256, ..., then the block's fixed tree), so
//     all of a row's blocks get the same bits and two runs are bitwise equal; then pass 2 over
//     its segment. Forward: M = max M_j, s = sum s_j exp(M_j - row_ref(M)) (a segment of -inf
//     or fully masked has M_j = -inf and adds s_j * 0: 0, or NaN when a NaN sits there).
// Traffic: forward reads n twice and writes n (3n, as (c), but every SM busy for any row count);
// backward reads 2n twice (log_softmax: n then 2n) and writes n; the workspace adds 24 (8)
// bytes per segment written and read once per block of the row.

template <typename T>
__device__ __forceinline__ void split_item(idx_t item, idx_t n_segs, int seg_packs, idx_t& row,
                                           int& k0) {
    row = item / n_segs;
    k0 = int(item - row * n_segs) * seg_packs;
}

template <typename T, bool IS_LOG, int PHASE>
__device__ __forceinline__ void softmax_fwd_split(const FwdParams<T>& P, double* ws, idx_t n_segs,
                                                  int seg_packs) {
    typedef acc_t<T> A;
    constexpr int VEC = Vec<T>::value;
    __shared__ A red[MAX_WARPS];
    __shared__ unsigned redu[MAX_WARPS];
    const Group gr = whole_block();
    const Walker w = gr.walker();
    const int n = P.n_cols;
    const bool has_mask = P.mask != nullptr;
    const idx_t items = P.n_rows * n_segs;
    for (idx_t item = blockIdx.x; item < items; item += gridDim.x) {
        idx_t row;
        int k0;
        split_item<T>(item, n_segs, seg_packs, row, k0);
        const T* x = P.x + row * P.row_stride;
        const unsigned char* mk = P.mask + (has_mask ? row * P.mask_row_stride : 0);
        const Packs<VEC, int> pk(n, row_shift(x, P.vec_ok), P.vec_ok);
        const SegPacks<VEC, int> sp(pk, k0, k0 + seg_packs, P.vec_ok);
        if constexpr (PHASE == 0) {
            A m = neg_inf<A>(), ref = A(0), s = A(0);
            unsigned any = 0;
            fwd_online_fold(P, x, mk, sp, w, m, ref, s, any);
            A M, mr, ss;
            merge_online(gr, m, ref, s, red, M, mr, ss);
            if (has_mask) any = group_or_all(gr, any, redu);  // sk:opt
            if (threadIdx.x == 0) {
                double* p = ws + item * 3;
                p[0] = double(M);
                p[1] = double(ss);
                p[2] = any != 0 ? 1.0 : 0.0;
            }
        } else {
            const double* p = ws + row * n_segs * 3;  // the row's partials, segment 0 first
            A mj = neg_inf<A>();
            for (idx_t j = w.t; j < n_segs; j += w.nt) mj = sk_max(mj, A(p[j * 3]));
            const A M = group_max_all(gr, mj, red);
            const A mr = row_ref(M);
            A s[1] = {A(0)};
            unsigned any = 0;
            for (idx_t j = w.t; j < n_segs; j += w.nt) {
                const A Mj = A(p[j * 3]), sj = A(p[j * 3 + 1]);
                s[0] += Mj == neg_inf<A>() ? sj * A(0) : sj * exp_shifted(Mj - mr);
                any |= p[j * 3 + 2] != 0.0 ? 1u : 0u;
            }
            group_sum_n<1>(gr, s, red);
            if (has_mask) any = group_or_all(gr, any, redu);  // sk:opt
            const bool empty = has_mask && any == 0;
            const A lse = IS_LOG ? sk_log(s[0]) : A(0);
            const A r = IS_LOG ? A(0) : sk_rcp(s[0]);
            T* y = P.y + row * P.y_row_stride;
            fwd_online_write<T, IS_LOG>(P, x, y, mk, sp, w, mr, r, mr + lse, empty);
        }
    }
}

template <typename T, int PHASE>
__device__ __forceinline__ void softmax_bwd_split(const BwdParams<T>& P, double* ws, idx_t n_segs,
                                                  int seg_packs) {
    typedef sum_t<T> S;
    constexpr int VEC = Vec<T>::value;
    __shared__ S red[MAX_WARPS];
    const Group gr = whole_block();
    const Walker w = gr.walker();
    const int n = P.n_cols;
    const idx_t items = P.n_rows * n_segs;
    for (idx_t item = blockIdx.x; item < items; item += gridDim.x) {
        idx_t row;
        int k0;
        split_item<T>(item, n_segs, seg_packs, row, k0);
        const T* dyr = P.dy + row * P.dy_row_stride;
        const T* yr = P.y + row * P.y_row_stride;
        const Packs<VEC, int> pk(n, row_shift(dyr, P.vec_ok), P.vec_ok);
        const SegPacks<VEC, int> sp(pk, k0, k0 + seg_packs, P.vec_ok);
        if constexpr (PHASE == 0) {
            S dot[1] = {bwd_online_dot(P, dyr, yr, sp, w)};
            group_sum_n<1>(gr, dot, red);
            if (threadIdx.x == 0) ws[item] = double(dot[0]);
        } else {
            const double* p = ws + row * n_segs;
            S dot[1] = {S(0)};
            for (idx_t j = w.t; j < n_segs; j += w.nt) dot[0] += S(p[j]);
            group_sum_n<1>(gr, dot, red);
            T* dx = P.dx + row * P.dx_row_stride;
            bwd_online_write(P, dyr, yr, dx, sp, w, acc_t<T>(dot[0]));
        }
    }
}


// ---------------------------------------------------------------------------------------------
// (e) CLUSTER (sm_90): a row too long for one block's shared memory, but not for a thread-block
// cluster's, goes to a cluster of C blocks (C = 4 or 8, portable sizes: the planner's
// CLUSTER_SIZES), block `rank` of the cluster holding the row's packs [rank * seg_packs,
// (rank + 1) * seg_packs) (SegPacks, as the split (d) cuts them) in its own shared memory from
// the one read of x to the one write of y. One launch; clusters walk rows grid-stride (cluster
// c takes rows c, c + clusters, ...). Per row:
//   pass 1: global -> shared, v = scale * x (masked -inf), the segment maximum M_j (reads n / C);
//   pass 2: s_j = sum(exp(v - row_ref(M_j))) over shared memory; softmax keeps e = exp(v - ref_j);
//   exchange: thread 0 puts (M_j, s_j, mask bits seen) in its block's exchange slots, the
//     cluster barrier, then every thread of every block reads the C blocks' slots through
//     distributed shared memory in rank order and merges them as (d)'s phase 1 does:
//     M = max M_j, mr = row_ref(M), s = sum_j s_j exp(M_j - mr) (s_j * 0 for M_j = -inf: 0, or
//     NaN when a NaN sits in segment j): the same bits in every block, and run to run;
//   pass 3: shared -> global: softmax y = e * (exp(ref_j - mr) / s), log_softmax
//     y = v - (mr + log s) (writes n / C).
// The exchange slots alternate between two pairs by row, so a block may write the next row's
// slots while a slower partner still reads this row's (that partner reads them before its next
// cluster barrier, which this block's next write follows); a last cluster barrier keeps every
// block's shared memory alive until its partners have read it.
// Traffic: reads n (+ n mask bytes) and writes n, the minimum 2n; the exchange is C x 3 doubles
// per block and row through DSMEM. Dynamic shared memory: CLUSTER_HEADER bytes (exchange slots,
// reduction scratch) then seg_packs packs of the compute type (cupy_backend.cluster_smem_bytes).
constexpr int CLUSTER_HEADER = 256;

template <typename T, bool IS_LOG, int C>
__device__ __forceinline__ void softmax_fwd_cluster(const FwdParams<T>& P, int seg_packs) {
    typedef acc_t<T> A;
    constexpr int VEC = Vec<T>::value;
    constexpr int NB = batch_packs<T>(false);
    // the header: 2 x 4 exchange doubles, reduction scratch (MAX_WARPS values, MAX_WARPS bits)
    double* xch = reinterpret_cast<double*>(sk_dyn_smem);
    A* red = reinterpret_cast<A*>(sk_dyn_smem + 64);
    unsigned* redu = reinterpret_cast<unsigned*>(sk_dyn_smem + 64 + MAX_WARPS * 8);
    A* buf = reinterpret_cast<A*>(sk_dyn_smem + CLUSTER_HEADER);
    const Group gr = whole_block();
    const Walker w = gr.walker();
    const int n = P.n_cols;
    const bool has_mask = P.mask != nullptr;
    const unsigned rank = sk_cluster_rank();
    const idx_t n_clusters = idx_t(gridDim.x) / C;
    int par = 0;
    for (idx_t row = idx_t(blockIdx.x) / C; row < P.n_rows; row += n_clusters, par ^= 1) {
        const T* x = P.x + row * P.row_stride;
        const unsigned char* mk = P.mask + (has_mask ? row * P.mask_row_stride : 0);
        const Packs<VEC, int> pk(n, row_shift(x, P.vec_ok), P.vec_ok);
        const int k0 = int(rank) * seg_packs;
        const SegPacks<VEC, int> sp(pk, k0, k0 + seg_packs, P.vec_ok);
        A m = neg_inf<A>();
        unsigned any = 0;
        // pass 1: global -> shared (segment pack k in slot k * VEC, owned by thread k mod nt)
        auto park = [&](int k, const Pack<T, VEC>& r, bool full) {
            const int c0 = sp.c0(k);
            A v[VEC];
            raw_to_acc<VEC>(r, v);
#pragma unroll
            for (int i = 0; i < VEC; ++i) v[i] *= P.scale;
            if (has_mask) {  // sk:opt {
                const unsigned keep = load_keep<VEC, false>(mk, c0, n, P.mask_vec);
                any |= keep;
#pragma unroll
                for (int i = 0; i < VEC; ++i) {
                    if (!((keep >> i) & 1u)) v[i] = neg_inf<A>();
                }
            }  // sk:opt }
#pragma unroll
            for (int i = 0; i < VEC; ++i) {
                if (full || in_row(c0 + i, n)) m = sk_max(m, v[i]);
            }
            smem_store<VEC>(buf + k * VEC, v);
        };
        Pack<T, VEC> raw[NB];
        for_full_packs<NB>(
            sp, w, [&](int b, int k) { raw[b] = load_pack<VEC>(x + sp.c0(k)); },
            [&](int b, int k) { park(k, raw[b], true); });
        for_partial_packs(sp, P.vec_ok, w, [&](int k) {
            Pack<T, VEC> r;
            load_raw<VEC>(x, sp.c0(k), n, false, r);
            park(k, r, false);
        });
        m = group_max_all(gr, m, red);
        if (has_mask) any = group_or_all(gr, any, redu);  // sk:opt
        const A ref = row_ref(m);
        // pass 2: the segment's sum relative to its own maximum
        A s[1] = {A(0)};
        for_smem_packs(sp, P.vec_ok, w, [&](int k, auto full) {
            const int c0 = sp.c0(k);
            A v[VEC];
            smem_load<VEC>(buf + k * VEC, v);
#pragma unroll
            for (int i = 0; i < VEC; ++i) {
                const A e = exp_shifted(v[i] - ref);
                if (decltype(full)::value || in_row(c0 + i, n)) s[0] += e;
                if (!IS_LOG) v[i] = e;
            }
            if (!IS_LOG) smem_store<VEC>(buf + k * VEC, v);
        });
        group_sum_n<1>(gr, s, red);
        // exchange through distributed shared memory, merged in rank order
        double* slot = xch + par * 4;
        if (threadIdx.x == 0) {
            slot[0] = double(m);
            slot[1] = double(s[0]);
            slot[2] = any != 0 ? 1.0 : 0.0;
        }
        sk_cluster_sync();
        A M = neg_inf<A>();
#pragma unroll
        for (int j = 0; j < C; ++j) M = sk_max(M, A(sk_map_rank(slot, unsigned(j))[0]));
        const A mr = row_ref(M);
        A st = A(0);
        bool seen = false;
#pragma unroll
        for (int j = 0; j < C; ++j) {
            const double* q = sk_map_rank(slot, unsigned(j));
            const A Mj = A(q[0]), sj = A(q[1]);
            st += Mj == neg_inf<A>() ? sj * A(0) : sj * exp_shifted(Mj - mr);
            seen = seen || q[2] != 0.0;
        }
        const bool empty = has_mask && !seen;
        const A lse = IS_LOG ? sk_log(st) : A(0);
        const A r = IS_LOG ? A(0) : sk_rcp(st) * exp_shifted(ref - mr);  // e_j -> y
        T* y = P.y + row * P.y_row_stride;
        if (has_mask && !(st == st)) {  // sk:cold { a NaN row: the masked entries still 0 / -inf
            const A rn = sk_rcp(st);
            for (int k = w.t; k < sp.np; k += w.nt) {
                A v[VEC];
                smem_load<VEC>(buf + k * VEC, v);
                const unsigned keep = load_keep<VEC, false>(mk, sp.c0(k), n, P.mask_vec);
#pragma unroll
                for (int i = 0; i < VEC; ++i) {
                    v[i] = !((keep >> i) & 1u) ? empty_fill<A>(IS_LOG)
                           : IS_LOG            ? (v[i] - mr) - lse
                                               : v[i] * rn;
                }
                store_acc<VEC>(y, sp.c0(k), n, P.vec_ok, v);
            }
            continue;
        }  // sk:cold }
        // pass 3: shared -> global (writes the segment once)
        const A off = mr + lse;
        for_smem_packs(sp, P.vec_ok, w, [&](int k, auto full) {
            const int c0 = sp.c0(k);
            A v[VEC];
            smem_load<VEC>(buf + k * VEC, v);
#pragma unroll
            for (int i = 0; i < VEC; ++i) v[i] = IS_LOG ? v[i] - off : v[i] * r;
            if (empty) {  // sk:opt {
#pragma unroll
                for (int i = 0; i < VEC; ++i) v[i] = empty_fill<A>(IS_LOG);
            }  // sk:opt }
            if constexpr (decltype(full)::value) {
                store_full<VEC>(y + c0, v);
            } else {
                store_acc<VEC>(y, c0, n, false, v);
            }
        });
    }
    sk_cluster_sync();  // partners may still read this block's exchange slots
}


// The backward on a cluster (e): block `rank` parks its segment of dy and y (raw, as (b)) in
// shared memory while summing its part of dot(dy, y) (log_softmax: sum(dy)) in sum_t; the C
// partials are exchanged through distributed shared memory and summed in rank order by every
// thread of every block (the same bits everywhere, run to run); then dx is written from shared
// memory. Traffic: reads 2n, writes n, the minimum 3n; one double per block and row exchanged.
template <typename T, int C>
__device__ __forceinline__ void softmax_bwd_cluster(const BwdParams<T>& P, int seg_packs) {
    typedef acc_t<T> A;
    typedef sum_t<T> S;
    constexpr int VEC = Vec<T>::value;
    constexpr int NB = batch_packs<T>(true);  // two operands, the same bytes in flight
    double* xch = reinterpret_cast<double*>(sk_dyn_smem);
    S* red = reinterpret_cast<S*>(sk_dyn_smem + 64);
    T* dyb = reinterpret_cast<T*>(sk_dyn_smem + CLUSTER_HEADER);
    T* yb = dyb + idx_t(seg_packs) * VEC;
    const Group gr = whole_block();
    const Walker w = gr.walker();
    const int n = P.n_cols;
    const unsigned rank = sk_cluster_rank();
    const idx_t n_clusters = idx_t(gridDim.x) / C;
    int par = 0;
    for (idx_t row = idx_t(blockIdx.x) / C; row < P.n_rows; row += n_clusters, par ^= 1) {
        const T* dyr = P.dy + row * P.dy_row_stride;
        const T* yr = P.y + row * P.y_row_stride;
        const Packs<VEC, int> pk(n, row_shift(dyr, P.vec_ok), P.vec_ok);
        const int k0 = int(rank) * seg_packs;
        const SegPacks<VEC, int> sp(pk, k0, k0 + seg_packs, P.vec_ok);
        S dot[1] = {S(0)};
        // pass 1: global -> shared, the segment's dot(dy, y) or sum(dy) (elements outside the
        // row load as 0 and add nothing)
        auto park = [&](int k, const Pack<T, VEC>& d_raw, const Pack<T, VEC>& y_raw) {
            store_pack<VEC>(dyb + k * VEC, d_raw);
            store_pack<VEC>(yb + k * VEC, y_raw);
            A d[VEC], yv[VEC];
            raw_to_acc<VEC>(d_raw, d);
            raw_to_acc<VEC>(y_raw, yv);
            if (P.is_log) {  // sk:log {
#pragma unroll
                for (int i = 0; i < VEC; ++i) dot[0] += S(d[i]);
            } else {  // sk:log } sk:prob {
#pragma unroll
                for (int i = 0; i < VEC; ++i) dot[0] += S(d[i] * yv[i]);
            }  // sk:prob }
        };
        Pack<T, VEC> rd[NB], ry[NB];
        for_full_packs<NB>(
            sp, w,
            [&](int b, int k) {
                rd[b] = load_pack<VEC>(dyr + sp.c0(k));
                ry[b] = load_pack<VEC>(yr + sp.c0(k));
            },
            [&](int b, int k) { park(k, rd[b], ry[b]); });
        for_partial_packs(sp, P.vec_ok, w, [&](int k) {
            Pack<T, VEC> d_raw, y_raw;
            load_raw<VEC>(dyr, sp.c0(k), n, false, d_raw);
            load_raw<VEC>(yr, sp.c0(k), n, false, y_raw);
            park(k, d_raw, y_raw);
        });
        group_sum_n<1>(gr, dot, red);
        double* slot = xch + par * 4;
        if (threadIdx.x == 0) slot[0] = double(dot[0]);
        sk_cluster_sync();
        S tot = S(0);
#pragma unroll
        for (int j = 0; j < C; ++j) tot += S(sk_map_rank(slot, unsigned(j))[0]);
        const A dsum = A(tot);
        const A ds = dsum * P.scale;
        // pass 2: shared -> global (writes the segment once)
        T* dx = P.dx + row * P.dx_row_stride;
        for_smem_packs(sp, P.vec_ok, w, [&](int k, auto full) {
            const int c0 = sp.c0(k);
            A d[VEC], yv[VEC];
            raw_to_acc<VEC>(load_pack<VEC>(dyb + k * VEC), d);
            raw_to_acc<VEC>(load_pack<VEC>(yb + k * VEC), yv);
            if (P.is_log) {  // sk:log {
#pragma unroll
                for (int i = 0; i < VEC; ++i) d[i] = d[i] * P.scale - exp_shifted(yv[i]) * ds;
            } else {  // sk:log } sk:prob {
#pragma unroll
                for (int i = 0; i < VEC; ++i) d[i] = (d[i] - dsum) * yv[i] * P.scale;
            }  // sk:prob }
            if constexpr (decltype(full)::value) {
                store_full<VEC>(dx + c0, d);
            } else {
                store_acc<VEC>(dx, c0, n, false, d);
            }
        });
    }
    sk_cluster_sync();  // partners may still read this block's exchange slots
}

}  // namespace sk

// ---------------------------------------------------------------------------------------------
// Kernels. STRATEGY picks (a)/(b)/(c); LANES and PACKS shape strategy (a) (1 for the others);
// FAST: (a)'s instance for rows of whole packs (always true for (b) and (c)). vec_ok / mask_vec:
// 16-byte packs are legal for the data rows / the mask rows (see common.cuh). row_threads:
// threads per row of (b). Grids are capped to fill the GPU once and loop over rows.
// Register budgets: SK_LAUNCH_BOUNDS (common.cuh).

// (the GENERAL (a) instances, with per-element bounds checks, get 2 blocks: 255 registers)
template <typename T, bool IS_LOG, int STRATEGY, int LANES, int PACKS, bool FAST>
__global__ void SK_LAUNCH_BOUNDS_MIN(STRATEGY, STRATEGY == SK_WARP_ROWS && !FAST ? 2 : SK_MIN_BLOCKS(STRATEGY))
    softmax_fwd_kernel(const T* x_ptr, T* y_ptr, const unsigned char* mask_ptr, long long n_rows,
                       long long n_cols, long long row_stride, long long y_row_stride,
                       long long mask_row_stride, long long row_threads, sk::acc_t<T> scale,
                       int vec_ok, int mask_vec) {
    sk::FwdParams<T> P;
    P.x = x_ptr;
    P.y = y_ptr;
    P.mask = mask_ptr;
    P.n_rows = n_rows;
    P.n_cols = int(n_cols);
    P.row_stride = row_stride;
    P.y_row_stride = y_row_stride;
    P.mask_row_stride = mask_row_stride;
    P.row_threads = int(row_threads);
    P.scale = scale;
    P.vec_ok = vec_ok != 0;
    P.mask_vec = mask_vec != 0;
    if constexpr (STRATEGY == SK_WARP_ROWS) {
        sk::softmax_fwd_warp<T, IS_LOG, LANES, PACKS, FAST>(P);
    } else if constexpr (STRATEGY == SK_BLOCK_SMEM) {
        sk::softmax_fwd_block<T, IS_LOG>(P);
    } else {
        sk::softmax_fwd_online<T, IS_LOG>(P);
    }
}

// is_log: log_softmax backward (y is the log_softmax output), else softmax backward.
template <typename T, int STRATEGY, int LANES, int PACKS, bool FAST>
__global__ void SK_LAUNCH_BOUNDS_MIN(STRATEGY, STRATEGY == SK_WARP_ROWS && !FAST ? 2 : SK_MIN_BLOCKS(STRATEGY))
    softmax_bwd_kernel(const T* dy_ptr, const T* y_ptr, T* dx_ptr, long long n_rows,
                       long long n_cols, long long dy_row_stride, long long y_row_stride,
                       long long dx_row_stride, long long row_threads, sk::acc_t<T> scale,
                       int is_log, int vec_ok) {
    sk::BwdParams<T> P;
    P.dy = dy_ptr;
    P.y = y_ptr;
    P.dx = dx_ptr;
    P.n_rows = n_rows;
    P.n_cols = int(n_cols);
    P.dy_row_stride = dy_row_stride;
    P.y_row_stride = y_row_stride;
    P.dx_row_stride = dx_row_stride;
    P.row_threads = int(row_threads);
    P.scale = scale;
    P.is_log = is_log != 0;
    P.vec_ok = vec_ok != 0;
    if constexpr (STRATEGY == SK_WARP_ROWS) {
        sk::softmax_bwd_warp<T, LANES, PACKS, FAST>(P);
    } else if constexpr (STRATEGY == SK_BLOCK_SMEM) {
        sk::softmax_bwd_block<T>(P);
    } else {
        sk::softmax_bwd_online<T>(P);
    }
}

// (d) SPLIT, two launches per call: PHASE 0 writes each (row, segment)'s partials into ws, PHASE
// 1 merges a row's partials and writes its segment (see softmax_fwd_split). n_segs segments of
// seg_packs 16-byte packs per row (the host's plan; segments past a row's end are empty). ws:
// n_rows x n_segs x 3 doubles (forward) or x 1 (backward), written by phase 0 before phase 1
// reads it (the launches are ordered on the stream). The forward's phase 0 does not depend on
// IS_LOG (the host launches its IS_LOG = false instance).
template <typename T, bool IS_LOG, int PHASE>
__global__ void SK_LAUNCH_BOUNDS(SK_ONLINE)
    softmax_fwd_split_kernel(const T* x_ptr, T* y_ptr, const unsigned char* mask_ptr, double* ws,
                             long long n_rows, long long n_cols, long long row_stride,
                             long long y_row_stride, long long mask_row_stride, long long n_segs,
                             long long seg_packs, sk::acc_t<T> scale, int vec_ok, int mask_vec) {
    sk::FwdParams<T> P;
    P.x = x_ptr;
    P.y = y_ptr;
    P.mask = mask_ptr;
    P.n_rows = n_rows;
    P.n_cols = int(n_cols);
    P.row_stride = row_stride;
    P.y_row_stride = y_row_stride;
    P.mask_row_stride = mask_row_stride;
    P.row_threads = int(blockDim.x);
    P.scale = scale;
    P.vec_ok = vec_ok != 0;
    P.mask_vec = mask_vec != 0;
    sk::softmax_fwd_split<T, IS_LOG, PHASE>(P, ws, n_segs, int(seg_packs));
}

template <typename T, int PHASE>
__global__ void SK_LAUNCH_BOUNDS(SK_ONLINE)
    softmax_bwd_split_kernel(const T* dy_ptr, const T* y_ptr, T* dx_ptr, double* ws,
                             long long n_rows, long long n_cols, long long dy_row_stride,
                             long long y_row_stride, long long dx_row_stride, long long n_segs,
                             long long seg_packs, sk::acc_t<T> scale, int is_log, int vec_ok) {
    sk::BwdParams<T> P;
    P.dy = dy_ptr;
    P.y = y_ptr;
    P.dx = dx_ptr;
    P.n_rows = n_rows;
    P.n_cols = int(n_cols);
    P.dy_row_stride = dy_row_stride;
    P.y_row_stride = y_row_stride;
    P.dx_row_stride = dx_row_stride;
    P.row_threads = int(blockDim.x);
    P.scale = scale;
    P.is_log = is_log != 0;
    P.vec_ok = vec_ok != 0;
    sk::softmax_bwd_split<T, PHASE>(P, ws, n_segs, int(seg_packs));
}

// (e) CLUSTER, one launch (see softmax_fwd_cluster): a grid of clusters x C blocks, the cluster
// shape fixed at compile time; seg_packs packs per block, C x seg_packs covering the row.
template <typename T, bool IS_LOG, int C>
__global__ void SK_CLUSTER_DIMS(C) SK_LAUNCH_BOUNDS(SK_BLOCK_SMEM)
    softmax_fwd_cluster_kernel(const T* x_ptr, T* y_ptr, const unsigned char* mask_ptr,
                               long long n_rows, long long n_cols, long long row_stride,
                               long long y_row_stride, long long mask_row_stride,
                               long long seg_packs, sk::acc_t<T> scale, int vec_ok, int mask_vec) {
    sk::FwdParams<T> P;
    P.x = x_ptr;
    P.y = y_ptr;
    P.mask = mask_ptr;
    P.n_rows = n_rows;
    P.n_cols = int(n_cols);
    P.row_stride = row_stride;
    P.y_row_stride = y_row_stride;
    P.mask_row_stride = mask_row_stride;
    P.row_threads = int(blockDim.x);
    P.scale = scale;
    P.vec_ok = vec_ok != 0;
    P.mask_vec = mask_vec != 0;
    sk::softmax_fwd_cluster<T, IS_LOG, C>(P, int(seg_packs));
}

template <typename T, int C>
__global__ void SK_CLUSTER_DIMS(C) SK_LAUNCH_BOUNDS(SK_BLOCK_SMEM)
    softmax_bwd_cluster_kernel(const T* dy_ptr, const T* y_ptr, T* dx_ptr, long long n_rows,
                               long long n_cols, long long dy_row_stride, long long y_row_stride,
                               long long dx_row_stride, long long seg_packs, sk::acc_t<T> scale,
                               int is_log, int vec_ok) {
    sk::BwdParams<T> P;
    P.dy = dy_ptr;
    P.y = y_ptr;
    P.dx = dx_ptr;
    P.n_rows = n_rows;
    P.n_cols = int(n_cols);
    P.dy_row_stride = dy_row_stride;
    P.y_row_stride = y_row_stride;
    P.dx_row_stride = dx_row_stride;
    P.row_threads = int(blockDim.x);
    P.scale = scale;
    P.is_log = is_log != 0;
    P.vec_ok = vec_ok != 0;
    sk::softmax_bwd_cluster<T, C>(P, int(seg_packs));
}
