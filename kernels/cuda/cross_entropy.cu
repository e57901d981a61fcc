// Softmax cross-entropy: per-row loss, and with grad_ptr != nullptr the gradient in the same
// pass, for class-index targets (int32/int64, SOFT = false) or probability targets (SOFT = true).
//
// With m = max(x), xs = x - m, s = sum(exp(xs)), log_s = log(s), lse = m + log_s,
// p = exp(xs) / s, eps = label_smoothing, w = weight (or ones), W = sum(w):
//   class target t:  loss = (1-eps) w_t (log_s - xs_t) + eps/C (W log_s - sum_c w_c xs_c)
//                    grad = [(1-eps) w_t + eps/C W] p - (1-eps) w_t onehot_t - eps/C w
//   soft target q:   q' = (1-eps) q + eps/C,  wq = w q'
//                    loss = log_s sum(wq) - sum(wq xs),   grad = sum(wq) p - wq
//   z-loss:          loss += z lse^2,  grad += 2 z lse p
// then grad *= grad_scale (/ denom[0] when denom_ptr is given: reduction "mean", read on the
// device). A target equal to ignore_index: loss 0 and a zero gradient row, without reading the
// logits. A target outside [0, C) that is not ignore_index: loss NaN and a NaN gradient row,
// and no access at that target.
// Memory traffic per row of C: reads C (+ C soft targets), writes C gradients (+ 1 loss);
// strategy (c) with a gradient reads the inputs a second time.
// The gradient may be written over the logits (in-place): every logit of a row is read before
// any gradient element of that row is written.

#include "common.cuh"

namespace sk {

// Per-call scalars, converted once to the compute type.
template <typename A>
struct CeArgs {
    const A* weight;   // (C,) or nullptr
    idx_t ignore_index;
    bool vec_ok;       // 16-byte packs are legal for logits, soft targets and gradient
    bool target64;     // class targets are int64 (else int32)
    bool smooth;       // label_smoothing > 0
    bool zl;           // z_loss > 0
    A one_m_eps;       // 1 - eps
    A eps_c;           // eps / C
    A z;               // z_loss
    A two_z;           // 2 z_loss
    A row_scale;       // grad_scale (/ denom)
};

__device__ __forceinline__ idx_t read_target(const void* target_ptr, bool target64, idx_t row) {
    return target64 ? static_cast<const long long*>(target_ptr)[row]
                    : idx_t(static_cast<const int*>(target_ptr)[row]);
}

template <typename A>
__device__ __forceinline__ A weight_at(const A* w, idx_t c) {
    return w != nullptr ? w[c] : A(1);
}

// The row's loss from its statistics. For class targets d1 = sum(w xs) and d2 = W (used with
// label smoothing only); for soft targets d1 = sum(wq), d2 = sum(wq xs).
template <bool SOFT, typename A>
__device__ __forceinline__ A row_loss(const CeArgs<A>& a, A m, A log_s, A d1, A d2, A w_t,
                                      A xs_t) {
    A loss;
    if (SOFT) {
        loss = log_s * d1 - d2;
    } else {
        loss = a.one_m_eps * w_t * (log_s - xs_t);
        if (a.smooth) loss += a.eps_c * (d2 * log_s - d1);
    }
    if (a.zl) {
        const A lse = m + log_s;
        loss += a.z * lse * lse;
    }
    return loss;
}

// The gradient's coefficient of p: (1-eps) w_t + eps/C W (class) or sum(wq) (soft), + 2 z lse.
template <bool SOFT, typename A>
__device__ __forceinline__ A p_coef(const CeArgs<A>& a, A m, A log_s, A d1, A d2, A w_t) {
    A c = SOFT ? d1 : a.one_m_eps * w_t;
    if (!SOFT && a.smooth) c += a.eps_c * d2;
    if (a.zl) c += a.two_z * (m + log_s);
    return c;
}

// Smoothed, weighted soft target wq_c for probability q at column c. Branch-free: with eps = 0
// the smoothing is q * 1 + 0 = q exactly, and a missing weight multiplies by 1.
template <typename A>
__device__ __forceinline__ A soft_wq(const CeArgs<A>& a, A q, idx_t c) {
    return (q * a.one_m_eps + a.eps_c) * weight_at(a.weight, c);
}

// Gradient element at column c of a counted row with probability pr = p_c (selects rather
// than branches: this runs per element in unrolled loops).
template <bool SOFT, typename A>
__device__ __forceinline__ A grad_at(const CeArgs<A>& a, A pr, A coef, A wq, idx_t c, idx_t t,
                                     A w_t) {
    A g = pr * coef;
    if (SOFT) {
        g -= wq;
    } else {
        g -= a.smooth ? a.eps_c * weight_at(a.weight, c) : A(0);
        g -= c == t ? a.one_m_eps * w_t : A(0);
    }
    return g * a.row_scale;
}

// Row of a target that is ignored (0) or out of range (NaN), written without reading logits.
template <int VEC, typename T, typename I>
__device__ __forceinline__ void fill_pack(T* g, I c0, I n_cols, bool vec_ok, acc_t<T> value) {
    acc_t<T> v[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) v[i] = value;
    store_acc<VEC>(g, c0, n_cols, vec_ok, v);
}

// Strategies (b) and (c), one block per row: reads the row's class target into t and, when
// it is ignored (loss 0, gradient 0) or out of range (loss and gradient NaN), writes that row
// without reading its logits and returns true. The target is the same for the whole block, so
// the caller's branch on the result is block-uniform.
template <bool SOFT, int VEC, typename T, typename I>
__device__ __forceinline__ bool block_row_skipped(const void* target_ptr,
                                                  const CeArgs<acc_t<T>>& a, idx_t row,
                                                  I n_cols, const Packs<VEC, I>& pk,
                                                  acc_t<T>* loss_ptr, T* grad_ptr,
                                                  idx_t grad_row_stride, idx_t& t) {
    typedef acc_t<T> A;
    t = 0;
    if (SOFT) return false;
    t = read_target(target_ptr, a.target64, row);
    const bool counted = t != a.ignore_index;
    if (counted && t >= 0 && t < n_cols) return false;
    const A fill = counted ? quiet_nan<A>() : A(0);
    if (threadIdx.x == 0) loss_ptr[row] = fill;
    if (grad_ptr != nullptr) {
        T* g = grad_ptr + row * grad_row_stride;
        for (I k = threadIdx.x; k < pk.np; k += I(blockDim.x)) {
            fill_pack<VEC>(g, pk.c0(k), n_cols, a.vec_ok, fill);
        }
    }
    return true;
}

// ---------------------------------------------------------------------------------------------
// (a) WARP_ROWS: LANES lanes per row, the row (and soft targets) in registers.

template <typename T, bool SOFT, int LANES, int PACKS>
__device__ __forceinline__ void ce_warp(const T* x_ptr, const void* target_ptr, T* grad_ptr,
                                        acc_t<T>* loss_ptr, idx_t n_rows, int n_cols,
                                        idx_t row_stride, idx_t target_row_stride,
                                        idx_t grad_row_stride, const CeArgs<acc_t<T>>& a) {
    typedef acc_t<T> A;
    constexpr int VEC = Vec<T>::value;
    constexpr int ROWS = WARP / LANES;
    constexpr int QP = SOFT ? PACKS : 1;
    const int lane = threadIdx.x % WARP;
    const int l = lane % LANES;
    for (idx_t row0 = global_warp() * ROWS; row0 < n_rows; row0 += grid_warps() * ROWS) {
        const idx_t row = row0 + lane / LANES;
        const bool active = row < n_rows;
        idx_t t = 0;
        bool counted = true, in_range = true;
        if (!SOFT && active) {
            t = read_target(target_ptr, a.target64, row);
            counted = t != a.ignore_index;
            in_range = t >= 0 && t < n_cols;
        }
        const bool live_row = active && counted && in_range;
        // (the row's own address even when it is skipped: the shift must match its gradient row)
        const T* x = x_ptr + (active ? row * row_stride : 0);
        const T* q = static_cast<const T*>(target_ptr) + (SOFT && active ? row * target_row_stride : 0);
        const int shift = row_shift(x, a.vec_ok);
        A xv[PACKS][VEC], qv[QP][VEC];
        A m = neg_inf<A>();
#pragma unroll
        for (int p = 0; p < PACKS; ++p) {
            const int c0 = (p * LANES + l) * VEC - shift;
            const bool live = live_row && c0 < n_cols;
            if (live) {
                load_acc<VEC>(x, c0, n_cols, a.vec_ok, xv[p]);
                if (SOFT) load_acc<VEC>(q, c0, n_cols, a.vec_ok, qv[SOFT ? p : 0]);
            } else {
#pragma unroll
                for (int i = 0; i < VEC; ++i) xv[p][i] = qv[SOFT ? p : 0][i] = A(0);
            }
#pragma unroll
            for (int i = 0; i < VEC; ++i) {
                const int c = c0 + i;
                if (live && in_row(c, n_cols)) m = sk_max(m, xv[p][i]);
            }
        }
        // the target's logit, read with the rest of the row (before any gradient is written)
        const A x_t = (!SOFT && live_row) ? to_acc(x[t]) : A(0);
        m = group_max<LANES>(m);
        A s = A(0), d1 = A(0), d2 = A(0);
#pragma unroll
        for (int p = 0; p < PACKS; ++p) {
            const int c0 = (p * LANES + l) * VEC - shift;
#pragma unroll
            for (int i = 0; i < VEC; ++i) {
                const int c = c0 + i;
                if (live_row && in_row(c, n_cols)) {
                    const A xs = xv[p][i] - m;
                    const A e = sk_exp(xs);
                    s += e;
                    xv[p][i] = e;  // keep exp(xs) for the gradient
                    if (SOFT) {
                        const A wq = soft_wq(a, qv[SOFT ? p : 0][i], c);
                        qv[SOFT ? p : 0][i] = wq;
                        d1 += wq;
                        d2 += wq * xs;
                    } else {  // used with label smoothing only; summing always avoids a branch
                        const A w = weight_at(a.weight, c);
                        d1 += w * xs;
                        d2 += w;
                    }
                }
            }
        }
        s = group_sum<LANES>(s);
        d1 = group_sum<LANES>(d1);
        d2 = group_sum<LANES>(d2);
        if (!active) continue;  // after the last shuffle: the loop condition is warp-uniform
        if (!SOFT && a.smooth && a.weight == nullptr) d2 = A(n_cols);
        const A log_s = sk_log(s);
        const A w_t = (!SOFT && live_row) ? weight_at(a.weight, t) : A(0);
        if (l == 0) {
            A loss = row_loss<SOFT>(a, m, log_s, d1, d2, w_t, x_t - m);
            if (!counted) loss = A(0);
            if (!in_range && counted) loss = quiet_nan<A>();
            loss_ptr[row] = loss;
        }
        if (grad_ptr == nullptr) continue;
        T* g = grad_ptr + row * grad_row_stride;
        const A coef = p_coef<SOFT>(a, m, log_s, d1, d2, w_t);
        const A r = sk_rcp(s);
        const A fill = counted ? quiet_nan<A>() : A(0);
#pragma unroll
        for (int p = 0; p < PACKS; ++p) {
            const int c0 = (p * LANES + l) * VEC - shift;
            if (c0 < n_cols) {
                A out[VEC];
#pragma unroll
                for (int i = 0; i < VEC; ++i) {
                    const int c = c0 + i;
                    // (columns outside the row are not stored: skip their weight reads)
                    out[i] = !live_row                 ? fill
                             : in_row(c, n_cols) ? grad_at<SOFT>(a, xv[p][i] * r, coef,
                                                                      qv[SOFT ? p : 0][i], c, t,
                                                                      w_t)
                                                      : A(0);
                }
                store_acc<VEC>(g, c0, n_cols, a.vec_ok, out);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// (b) BLOCK_SMEM: a block per row, the raw logits (and soft targets) parked in shared memory by
// pack (slot k * VEC for pack k, owned by thread k mod blockDim.x, as in softmax.cu).

template <typename T, bool SOFT>
__device__ __forceinline__ void ce_block(const T* x_ptr, const void* target_ptr, T* grad_ptr,
                                         acc_t<T>* loss_ptr, idx_t n_rows, int n_cols,
                                         idx_t row_stride, idx_t target_row_stride,
                                         idx_t grad_row_stride, const CeArgs<acc_t<T>>& a) {
    typedef acc_t<T> A;
    constexpr int VEC = Vec<T>::value;
    // full packs per batch: 4 (2 with soft targets: two operands, the same bytes in flight)
    constexpr int NB = SOFT ? BATCH / 2 : BATCH;
    __shared__ A red[3 * WARP];
    T* xb = reinterpret_cast<T*>(sk_dyn_smem);
    T* qb = xb + ((n_cols + VEC - 1) / VEC + (a.vec_ok ? 1 : 0)) * VEC;  // soft targets only
    const int nt = blockDim.x;
    for (idx_t row = blockIdx.x; row < n_rows; row += gridDim.x) {
        const T* x = x_ptr + row * row_stride;
        const Packs<VEC, int> pk(n_cols, row_shift(x, a.vec_ok), a.vec_ok);
        idx_t t;
        if (block_row_skipped<SOFT>(target_ptr, a, row, n_cols, pk, loss_ptr, grad_ptr,
                                    grad_row_stride, t)) {
            continue;
        }
        const T* q = static_cast<const T*>(target_ptr) + (SOFT ? row * target_row_stride : 0);
        const A x_t = (!SOFT && threadIdx.x == 0) ? to_acc(x[t]) : A(0);
        A m = neg_inf<A>();
        // pass 1: global -> shared, row maximum (reads C, + C soft targets)
        auto park = [&](int k, const Pack<T, VEC>& x_raw, const Pack<T, VEC>& q_raw, bool full) {
            *reinterpret_cast<Pack<T, VEC>*>(xb + k * VEC) = x_raw;
            if (SOFT) *reinterpret_cast<Pack<T, VEC>*>(qb + k * VEC) = q_raw;
            A v[VEC];
            raw_to_acc<VEC>(x_raw, v);
#pragma unroll
            for (int i = 0; i < VEC; ++i) {
                if (full || in_row(pk.c0(k) + i, n_cols)) m = sk_max(m, v[i]);
            }
        };
        Pack<T, VEC> rx[NB], rq[SOFT ? NB : 1];
        for_full_packs<NB>(
            pk,
            [&](int b, int k) {
                rx[b] = *reinterpret_cast<const Pack<T, VEC>*>(x + pk.c0(k));
                if (SOFT) rq[SOFT ? b : 0] = *reinterpret_cast<const Pack<T, VEC>*>(q + pk.c0(k));
            },
            [&](int b, int k) { park(k, rx[b], rq[SOFT ? b : 0], true); });
        for_partial_packs(pk, a.vec_ok, [&](int k) {
            Pack<T, VEC> x_raw, q_raw;
            load_raw<VEC>(x, pk.c0(k), n_cols, false, x_raw);
            if (SOFT) load_raw<VEC>(q, pk.c0(k), n_cols, false, q_raw);
            park(k, x_raw, q_raw, false);
        });
        m = block_max(m, red);
        // pass 2: sums over shared memory
        A sums[3] = {A(0), A(0), A(0)};  // s, d1, d2
        for (int k = threadIdx.x; k < pk.np; k += nt) {
            A v[VEC], qv[VEC];
            raw_to_acc<VEC>(*reinterpret_cast<const Pack<T, VEC>*>(xb + k * VEC), v);
            if (SOFT) raw_to_acc<VEC>(*reinterpret_cast<const Pack<T, VEC>*>(qb + k * VEC), qv);
#pragma unroll
            for (int i = 0; i < VEC; ++i) {
                const int c = pk.c0(k) + i;
                if (in_row(c, n_cols)) {
                    const A xs = v[i] - m;
                    sums[0] += sk_exp(xs);
                    if (SOFT) {
                        const A wq = soft_wq(a, qv[i], c);
                        sums[1] += wq;
                        sums[2] += wq * xs;
                    } else {  // used with label smoothing only; summing always avoids a branch
                        const A w = weight_at(a.weight, c);
                        sums[1] += w * xs;
                        sums[2] += w;
                    }
                }
            }
        }
        block_sum<3>(sums, red);
        const A log_s = sk_log(sums[0]);
        const A d1 = sums[1];
        const A d2 = (!SOFT && a.smooth && a.weight == nullptr) ? A(n_cols) : sums[2];
        const A w_t = SOFT ? A(0) : weight_at(a.weight, t);
        if (threadIdx.x == 0) loss_ptr[row] = row_loss<SOFT>(a, m, log_s, d1, d2, w_t, x_t - m);
        if (grad_ptr == nullptr) continue;
        // pass 3: gradient, shared -> global (writes C)
        const A coef = p_coef<SOFT>(a, m, log_s, d1, d2, w_t);
        const A r = sk_rcp(sums[0]);
        T* g = grad_ptr + row * grad_row_stride;
        for (int k = threadIdx.x; k < pk.np; k += nt) {
            A v[VEC], qv[VEC];
            raw_to_acc<VEC>(*reinterpret_cast<const Pack<T, VEC>*>(xb + k * VEC), v);
            if (SOFT) raw_to_acc<VEC>(*reinterpret_cast<const Pack<T, VEC>*>(qb + k * VEC), qv);
#pragma unroll
            for (int i = 0; i < VEC; ++i) {
                const int c = pk.c0(k) + i;
                if (in_row(c, n_cols)) {  // outside the row: not stored, no weight to read
                    const A wq = SOFT ? soft_wq(a, qv[i], c) : A(0);
                    v[i] = grad_at<SOFT>(a, sk_exp(v[i] - m) * r, coef, wq, c, t, w_t);
                }
            }
            store_acc<VEC>(g, pk.c0(k), n_cols, a.vec_ok, v);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// (c) ONLINE: a block per row; pass 1 folds the row into an online (max, sum) plus the linear
// sums, taken relative to a reference logit (the row's first, if finite) so that shifting them
// to the final maximum afterwards does not cancel digits; pass 2 (gradient only) reads the row
// again. Without a gradient this is the single-read path for every row longer than (a) serves.

template <typename T, bool SOFT>
__device__ __forceinline__ void ce_online(const T* x_ptr, const void* target_ptr, T* grad_ptr,
                                          acc_t<T>* loss_ptr, idx_t n_rows, idx_t n_cols,
                                          idx_t row_stride, idx_t target_row_stride,
                                          idx_t grad_row_stride, const CeArgs<acc_t<T>>& a) {
    typedef acc_t<T> A;
    constexpr int VEC = Vec<T>::value;
    // full packs per batch: 4 (2 with soft targets: two operands, the same bytes in flight)
    constexpr int NB = SOFT ? BATCH / 2 : BATCH;
    __shared__ A red[2 * WARP];
    const idx_t nt = blockDim.x;
    for (idx_t row = blockIdx.x; row < n_rows; row += gridDim.x) {
        const T* x = x_ptr + row * row_stride;
        const Packs<VEC, idx_t> pk(n_cols, row_shift(x, a.vec_ok), a.vec_ok);
        idx_t t;
        if (block_row_skipped<SOFT>(target_ptr, a, row, n_cols, pk, loss_ptr, grad_ptr,
                                    grad_row_stride, t)) {
            continue;
        }
        const T* q = static_cast<const T*>(target_ptr) + (SOFT ? row * target_row_stride : 0);
        const A x_t = (!SOFT && threadIdx.x == 0) ? to_acc(x[t]) : A(0);
        const A x0 = to_acc(x[0]);
        const A ref = is_finite(x0) ? x0 : A(0);
        Online<A> o;
        o.init();
        A sums[2] = {A(0), A(0)};  // d1, d2 relative to ref
        // pass 1 (reads C, + C soft targets): one online merge per pack
        auto fold = [&](idx_t k, const Pack<T, VEC>& x_raw, const Pack<T, VEC>& q_raw,
                        bool full) {
            const idx_t c0 = pk.c0(k);
            A v[VEC], qv[VEC];
            raw_to_acc<VEC>(x_raw, v);
            if (SOFT) raw_to_acc<VEC>(q_raw, qv);
            A pm = neg_inf<A>();
#pragma unroll
            for (int i = 0; i < VEC; ++i) {
                if (full || in_row(c0 + i, n_cols)) pm = sk_max(pm, v[i]);
            }
            const A mn = sk_max(o.m, pm);
            A s = o.s * exp_rel(o.m, mn);
#pragma unroll
            for (int i = 0; i < VEC; ++i) {
                const idx_t c = c0 + i;
                if (full || in_row(c, n_cols)) {
                    s += exp_rel(v[i], mn);
                    if (SOFT) {
                        const A wq = soft_wq(a, qv[i], c);
                        sums[0] += wq;
                        sums[1] += wq * (v[i] - ref);
                    } else {  // used with label smoothing only (no branch)
                        const A w = weight_at(a.weight, c);
                        sums[0] += w * (v[i] - ref);
                        sums[1] += w;
                    }
                }
            }
            o.m = mn;
            o.s = s;
        };
        Pack<T, VEC> rx[NB], rq[SOFT ? NB : 1];
        auto load_full = [&](int b, idx_t k) {
            rx[b] = *reinterpret_cast<const Pack<T, VEC>*>(x + pk.c0(k));
            if (SOFT) rq[SOFT ? b : 0] = *reinterpret_cast<const Pack<T, VEC>*>(q + pk.c0(k));
        };
        for_full_packs<NB>(pk, load_full, [&](int b, idx_t k) {
            fold(k, rx[b], rq[SOFT ? b : 0], true);
        });
        for_partial_packs(pk, a.vec_ok, [&](idx_t k) {
            Pack<T, VEC> x_raw, q_raw;
            load_raw<VEC>(x, pk.c0(k), n_cols, false, x_raw);
            if (SOFT) load_raw<VEC>(q, pk.c0(k), n_cols, false, q_raw);
            fold(k, x_raw, q_raw, false);
        });
        block_online(o, red);
        block_sum<2>(sums, red);
        const A m = o.m;
        const A log_s = sk_log(o.s);
        A d1 = sums[0], d2 = sums[1];
        if (SOFT) {
            d2 += (ref - m) * d1;  // sum(wq (x - m))
        } else if (a.smooth) {
            if (a.weight == nullptr) d2 = A(n_cols);
            d1 += (ref - m) * d2;  // sum(w (x - m))
        }
        const A w_t = SOFT ? A(0) : weight_at(a.weight, t);
        if (threadIdx.x == 0) loss_ptr[row] = row_loss<SOFT>(a, m, log_s, d1, d2, w_t, x_t - m);
        if (grad_ptr == nullptr) continue;
        // pass 2: gradient (reads C again, + C soft targets, writes C); in-place safe: the same
        // thread reads then writes each element
        const A coef = p_coef<SOFT>(a, m, log_s, d1, d2, w_t);
        const A r = sk_rcp(o.s);
        T* g = grad_ptr + row * grad_row_stride;
        auto result = [&](idx_t k, const Pack<T, VEC>& x_raw, const Pack<T, VEC>& q_raw,
                          A (&v)[VEC], bool full) {
            const idx_t c0 = pk.c0(k);
            A qv[VEC];
            raw_to_acc<VEC>(x_raw, v);
            if (SOFT) raw_to_acc<VEC>(q_raw, qv);
#pragma unroll
            for (int i = 0; i < VEC; ++i) {
                const idx_t c = c0 + i;
                if (full || in_row(c, n_cols)) {  // else: not stored
                    const A wq = SOFT ? soft_wq(a, qv[i], c) : A(0);
                    v[i] = grad_at<SOFT>(a, sk_exp(v[i] - m) * r, coef, wq, c, t, w_t);
                }
            }
        };
        for_full_packs<NB>(pk, load_full, [&](int b, idx_t k) {
            A v[VEC];
            result(k, rx[b], rq[SOFT ? b : 0], v, true);
            store_full<VEC>(g + pk.c0(k), v);
        });
        for_partial_packs(pk, a.vec_ok, [&](idx_t k) {
            Pack<T, VEC> x_raw, q_raw;
            load_raw<VEC>(x, pk.c0(k), n_cols, false, x_raw);
            if (SOFT) load_raw<VEC>(q, pk.c0(k), n_cols, false, q_raw);
            A v[VEC];
            result(k, x_raw, q_raw, v, false);
            store_acc<VEC>(g, pk.c0(k), n_cols, false, v);
        });
    }
}

}  // namespace sk

// target_ptr: (N,) int32/int64 class indices, or for SOFT the (N, C) probabilities in the
// logits' dtype with row stride target_row_stride. weight_ptr: (C,) or nullptr; denom_ptr: 0-d
// or nullptr; loss, weight, denom and the scalars are in the compute type, the scalars
// precomputed on the host: one_m_eps = 1 - eps, eps_c = eps / C, two_z = 2 z_loss.
// flags: bit 0 class targets are int64 (else int32), bit 1 label smoothing (eps > 0), bit 2
// z-loss (z_loss > 0), bit 3 vec_ok (16-byte packs legal for logits, soft targets, gradient).
template <typename T, bool SOFT, int STRATEGY, int LANES, int PACKS>
__global__ void SK_LAUNCH_BOUNDS(STRATEGY, SOFT && STRATEGY == SK_WARP_ROWS ? 2 : SK_MIN_BLOCKS(STRATEGY))
    cross_entropy_fwd_kernel(const T* x_ptr, const void* target_ptr, T* grad_ptr,
                             sk::acc_t<T>* loss_ptr, const sk::acc_t<T>* weight_ptr,
                             const sk::acc_t<T>* denom_ptr, long long n_rows, long long n_cols,
                             long long row_stride, long long target_row_stride,
                             long long grad_row_stride, long long ignore_index, int flags,
                             sk::acc_t<T> one_m_eps, sk::acc_t<T> eps_c, sk::acc_t<T> z_loss,
                             sk::acc_t<T> two_z, sk::acc_t<T> grad_scale) {
    typedef sk::acc_t<T> A;
    sk::CeArgs<A> a;
    a.weight = weight_ptr;
    a.ignore_index = ignore_index;
    a.target64 = (flags & 1) != 0;
    a.smooth = (flags & 2) != 0;
    a.zl = (flags & 4) != 0;
    a.vec_ok = (flags & 8) != 0;
    a.one_m_eps = one_m_eps;
    a.eps_c = eps_c;
    a.z = z_loss;
    a.two_z = two_z;
    // grad_scale / denom, read on the device (reduction "mean"; never synchronised to the host)
    a.row_scale = grad_scale;
    if (denom_ptr != nullptr && grad_ptr != nullptr) {
        a.row_scale = grad_scale * sk::sk_rcp(denom_ptr[0]);
    }
    if constexpr (STRATEGY == SK_WARP_ROWS) {
        sk::ce_warp<T, SOFT, LANES, PACKS>(x_ptr, target_ptr, grad_ptr, loss_ptr, n_rows,
                                           int(n_cols), row_stride, target_row_stride,
                                           grad_row_stride, a);
    } else if constexpr (STRATEGY == SK_BLOCK_SMEM) {
        sk::ce_block<T, SOFT>(x_ptr, target_ptr, grad_ptr, loss_ptr, n_rows, int(n_cols),
                              row_stride, target_row_stride, grad_row_stride, a);
    } else {
        sk::ce_online<T, SOFT>(x_ptr, target_ptr, grad_ptr, loss_ptr, n_rows, n_cols, row_stride,
                               target_row_stride, grad_row_stride, a);
    }
}
