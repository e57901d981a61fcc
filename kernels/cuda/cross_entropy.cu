// Softmax cross-entropy for class-index targets (int32/int64, SOFT = false) or probability
// targets (SOFT = true): the loss (per row, or reduced over rows in the same launch), the
// log-sum-exp, the gradient in the same pass, and the two vocabulary-parallel modes (per-row
// statistics; the gradient from merged statistics). The maths is dispatch.py's docstring:
//
//   z = c tanh(x / c) with softcap c (else z = x),  m = max(z),  zs = z - m,  s = sum(exp(zs)),
//   log_s = log(s),  lse = m + log_s,  p = exp(zs) / s,  eps = label_smoothing,  keep = 1 - eps,
//   w = weight (or ones),  W = sum(w),  C = n_cols,  eps_c = eps / C:
//   class target t:  loss = keep w_t (log_s - zs_t) + eps_c (W log_s - sum_c w_c zs_c)
//                    a    = keep w_t + eps_c W                 (the coefficient of p)
//                    grad = a p - keep w_t onehot_t - eps_c w, the target entry as
//                           (a - keep w_t) p_t - keep w_t (1 - p_t), 1 - p_t = -expm1(zs_t - log_s)
//   soft target q:   q' = keep q + eps_c,  loss = log_s sum(w q') - sum(w q' zs),  a = sum(w q')
//                    grad = a p - w q'
//   z-loss:          loss += z_loss lse^2,  a += 2 z_loss lse
//   softcap:         grad *= 1 - (z / c)^2
// then grad *= row_scale = grad_scale (/ denom for "mean"). Every sum is taken relative to the
// row maximum (0 for a row of -inf), so no term cancels: zs <= 0, and the loss terms are >= 0.
//
// Targets: a target equal to ignore_index counts for nothing (loss 0, gradient row 0, its
// logits unread unless the lse is wanted); a class target outside [0, C) that is not
// ignore_index gives a NaN loss and a NaN gradient row, and nothing is read through it.
// Reductions: per-block partial sums (in float64) in a fixed order, then the last block to
// finish sums them in block order (common.cuh's grid_sum_and_finish): "sum", and "mean" divided
// by the denominator -- the caller's, the one cross_entropy_denom_kernel wrote into the
// workspace (launched first when a gradient needs it before any row is scaled), or, without a
// gradient, the one this kernel sums alongside (the summed w_t of counted rows: their count
// without a weight, the row count for soft targets; a bad target adds NaN); 0.0 when no row
// is counted.
//
// Memory traffic per row of C: reads C (+ C soft targets), writes C gradients (+ 1 loss / lse);
// strategy (c) with a gradient reads the inputs a second time. The gradient may be written over
// the logits (in-place): every logit of a row (x[t] included) is read before any gradient
// element of that row is written, and each thread writes only packs it read itself.

#include "common.cuh"

// flags, bit by bit (the host's cupy_backend.CE_* constants)
#define SK_CE_T64 1         // class targets are int64 (else int32)
#define SK_CE_SMOOTH 2      // label_smoothing > 0: the smoothing sums
#define SK_CE_ZLOSS 4       // z_loss > 0
#define SK_CE_VEC 8         // 16-byte packs legal for logits, soft targets and gradient
#define SK_CE_SOFTCAP 16    // z = softcap tanh(x / softcap) (GENERAL instances only)
#define SK_CE_STATS 32      // write cross_entropy_stats rows instead of losses
#define SK_CE_SUM 64        // reduction "sum" into loss[0]
#define SK_CE_MEAN 128      // reduction "mean" into loss[0]
#define SK_CE_DENOM_WS 256  // mean: the denominator is in the workspace (denom kernel)
#define SK_CE_DENOM_ARG 512 // mean: the denominator is the caller's 0-d array

namespace sk {

// Per-call arguments, decoded once.
template <typename T>
struct CeParams {
    typedef acc_t<T> A;
    const T* x;
    const void* target;
    T* grad;
    A* loss;
    A* lse;
    A* stats;
    const A* weight;
    idx_t n_rows, n_cols, row_stride, target_row_stride, grad_row_stride, ignore_index,
        vocab_start;
    int row_threads;  // (b): threads per row
    int n_stats;      // stats columns
    bool target64, smooth, zl, vec_ok, softcap_on, stats_mode, reduce, mean, denom_in_kernel;
    A keep, eps_c, z, softcap, inv_softcap;
    A row_scale;      // grad_scale (/ denom)
};

__device__ __forceinline__ idx_t read_target(const void* target_ptr, bool target64, idx_t row) {
    return target64 ? static_cast<const long long*>(target_ptr)[row]
                    : idx_t(static_cast<const int*>(target_ptr)[row]);
}

// A row's class target: t local to this array's classes [vocab_start, vocab_start + C) (0 when
// not owned), counted (t != ignore_index), owned (counted and inside). Soft rows: counted.
struct RowTarget {
    idx_t t;
    bool counted, owned;
};

template <bool SOFT, typename T>
__device__ __forceinline__ RowTarget row_target(const CeParams<T>& P, idx_t row) {
    RowTarget rt{0, true, false};
    if (SOFT) return rt;
    const idx_t tg = read_target(P.target, P.target64, row);
    rt.counted = tg != P.ignore_index;
    const idx_t t = tg - P.vocab_start;
    rt.owned = rt.counted && t >= 0 && t < P.n_cols;
    rt.t = rt.owned ? t : 0;
    return rt;
}

// Whether the row's logits are read at all: always for soft targets, when the lse is wanted and
// for the statistics (every row: the vocabulary-parallel merge returns every row's lse, ignored
// rows' too); else (forward) only an owned target.
template <bool SOFT, typename T>
__device__ __forceinline__ bool row_read(const CeParams<T>& P, const RowTarget& rt) {
    return SOFT || P.lse != nullptr || P.stats_mode || rt.owned;
}

template <typename A>
__device__ __forceinline__ A weight_at(const A* w, idx_t c) {
    return w != nullptr ? w[c] : A(1);
}

template <bool GENERAL, typename T>
__device__ __forceinline__ acc_t<T> cap(const CeParams<T>& P, acc_t<T> v) {
    if (GENERAL && P.softcap_on) v = P.softcap * sk_tanh(v * P.inv_softcap);
    return v;
}

// d(softcap)/dx = 1 - (z / c)^2 for a softcapped z (1 without a softcap).
template <bool GENERAL, typename T>
__device__ __forceinline__ acc_t<T> cap_chain(const CeParams<T>& P, acc_t<T> z) {
    typedef acc_t<T> A;
    if (GENERAL && P.softcap_on) {
        const A th = z * P.inv_softcap;
        return A(1) - th * th;
    }
    return A(1);
}

// Row sums, each relative to the row's reference mr (its maximum; 0 for a row of -inf).
template <typename A>
struct RowSums {
    A s;   // sum exp(zs)
    A S;   // sum w zs          (label smoothing)
    A W;   // sum w             (label smoothing; elements seen, without a weight)
    A Q1;  // sum w q           (soft)
    A Q2;  // sum w q zs        (soft)
    __device__ __forceinline__ void zero() { s = S = W = Q1 = Q2 = A(0); }
};

// What a row's epilogue hands the gradient pass.
template <typename A>
struct RowOut {
    A ar;    // a / s * row_scale: the coefficient of exp(zs)
    A er;    // eps_c * row_scale
    A kr;    // keep * row_scale (soft)
    A g_t;   // the target's gradient entry (class, owned)
};

// The row epilogue, once per row, by one thread (the leader writes): loss or statistics, lse,
// the reduction accumulators racc = {loss, w_t, count}; returns the gradient coefficients.
template <bool SOFT, bool GENERAL, typename T>
__device__ __forceinline__ RowOut<acc_t<T>> row_epilogue(const CeParams<T>& P, idx_t row,
                                                         const RowTarget& rt, acc_t<T> m,
                                                         acc_t<T> mr, const RowSums<acc_t<T>>& rs,
                                                         acc_t<T> z_t, bool leader,
                                                         double (&racc)[3]) {
    typedef acc_t<T> A;
    RowOut<A> o{A(0), A(0), A(0), A(0)};
    const A zs_t = z_t - mr;
    const A w_t = (!SOFT && rt.owned) ? weight_at(P.weight, rt.t) : A(0);
    if (P.stats_mode) {  // sk:stats {
        if (leader) {
            A* st = P.stats + row * P.n_stats;
            st[0] = m;
            st[1] = rs.s;
            int k = 2;
            if (SOFT) {
                st[2] = rs.Q1;
                st[3] = rs.Q2;
                k = 4;
            } else {
                st[2] = rt.owned ? zs_t : A(0);
                k = 3;
                if (P.weight != nullptr) st[k++] = rt.owned ? w_t : A(0);
            }
            if (P.smooth) st[k] = rs.S;
        }
        return o;
    }  // sk:stats }
    const A log_s = sk_log(rs.s);
    const A lse = m + log_s;
    const A W_all = P.weight != nullptr ? rs.W : A(P.n_cols);
    A loss, a;
    if (SOFT) {
        a = P.keep * rs.Q1;
        loss = -P.keep * rs.Q2;
        if (P.smooth) {  // sk:opt {
            a += P.eps_c * W_all;
            loss -= P.eps_c * rs.S;
        }  // sk:opt }
        loss += log_s * a;
    } else {
        const A kw = P.keep * w_t;
        loss = kw * (log_s - zs_t);
        a = kw;
        if (P.smooth) {  // sk:opt {
            loss += P.eps_c * (W_all * log_s - rs.S);
            a += P.eps_c * W_all;
        }  // sk:opt }
    }
    if (P.zl) {  // sk:opt {
        loss += P.z * lse * lse;
        a += A(2) * P.z * lse;
    }  // sk:opt }
    if (!SOFT && !rt.owned) loss = rt.counted ? quiet_nan<A>() : A(0);
    if (leader) {
        if (P.lse != nullptr) P.lse[row] = lse;  // sk:opt
        if (!P.reduce) {
            P.loss[row] = loss;
        } else {
            racc[0] += double(loss);
            if (P.denom_in_kernel && rt.counted) {
                racc[1] += SOFT ? 1.0 : (rt.owned ? double(w_t) : double(quiet_nan<A>()));
                racc[2] += 1.0;
            }
        }
    }
    if (P.grad != nullptr && (SOFT || rt.owned)) {  // sk:grad {
        const A r = sk_rcp(rs.s);
        o.ar = a * r * P.row_scale;
        o.er = P.eps_c * P.row_scale;  // eps_c is 0 without smoothing
        o.kr = P.keep * P.row_scale;
        if (!SOFT) {
            const A kw = P.keep * w_t;
            const A d = zs_t - log_s;  // log p_t
            const A p_t = exp_shifted(d);
            const A q_t = -sk_expm1(d);  // 1 - p_t without rounding p_t first
            A g = (a - kw) * p_t - kw * q_t - P.eps_c * w_t;
            o.g_t = g * P.row_scale * cap_chain<GENERAL>(P, z_t);
        }
    }  // sk:grad }
    return o;
}

// A class row that is not read (ignored, or a bad target, and no lse wanted): loss 0 / NaN, its
// gradient row 0 / NaN. (Statistics read every row; the neutral row [0, 1, 0, ...] is kept for
// rows past the end of a group.)
template <int VEC, typename T, typename PK>
__device__ __forceinline__ void skipped_row(const CeParams<T>& P, idx_t row, const RowTarget& rt,
                                            const PK& pk, Walker w, bool leader,
                                            double (&racc)[3]) {
    typedef decltype(pk.hi) I;
    typedef acc_t<T> A;
    const A fill = rt.counted ? quiet_nan<A>() : A(0);
    if (leader) {
        if (P.stats_mode) {
            A* st = P.stats + row * P.n_stats;
            for (int k = 0; k < P.n_stats; ++k) st[k] = k == 1 ? A(1) : A(0);
        } else if (!P.reduce) {
            P.loss[row] = fill;
        } else {
            racc[0] += double(fill);
            if (P.denom_in_kernel && rt.counted) {
                racc[1] += double(quiet_nan<A>());
                racc[2] += 1.0;
            }
        }
    }
    if (P.grad != nullptr && !P.stats_mode) {
        T* g = P.grad + row * P.grad_row_stride;
        A v[VEC];
#pragma unroll
        for (int i = 0; i < VEC; ++i) v[i] = fill;
#pragma unroll 1
        for (I k = w.t; k < pk.np; k += w.nt) store_acc<VEC>(g, pk.c0(k), I(P.n_cols), P.vec_ok, v);
    }
}

// ---------------------------------------------------------------------------------------------
// (a) WARP_ROWS: LANES lanes per row (32 / LANES rows per warp), lane l holding the packs
// k = p * LANES + l, p < PACKS, in registers: one read, one write. Only FAST instances: rows of
// whole packs (vector path, no shift, C a multiple of VEC), no softcap; other short rows go to
// (b) with a warp per row.

template <typename T, bool SOFT, int LANES, int PACKS, bool FAST>
__device__ __forceinline__ void ce_warp(const CeParams<T>& P, double (&racc)[3]) {
    static_assert(FAST, "strategy (a) of cross-entropy takes rows of whole packs only");
    typedef acc_t<T> A;
    constexpr int VEC = Vec<T>::value;
    constexpr int ROWS = WARP / LANES;
    constexpr int QP = SOFT ? PACKS : 1;
    const int lane = threadIdx.x % WARP;
    const int l = lane % LANES;
    const int n = int(P.n_cols);
    for (idx_t row0 = global_warp() * ROWS; row0 < P.n_rows; row0 += grid_warps() * ROWS) {  // sk:hot packs=PACKS
        const idx_t row = row0 + lane / LANES;
        const bool active = row < P.n_rows;
        RowTarget rt{0, false, false};
        if (active) rt = row_target<SOFT>(P, row);
        const bool read = active && row_read<SOFT>(P, rt);
        const T* x = P.x + (active ? row * P.row_stride : 0);
        const T* q = static_cast<const T*>(P.target) + (SOFT && active ? row * P.target_row_stride : 0);
        // z_t: read with the rest of the row, before any lane stores (ordered by the __syncwarp
        // below: in place, another lane's gradient may overwrite x[t])
        A z_t = A(0);
        if (!SOFT && read && rt.owned) z_t = to_acc(x[rt.t]);
        // pack p of this lane covers columns c0(p) = (p * LANES + l) * VEC .. + VEC - 1, all
        // inside the row when c0(p) < n (whole packs)
        A xv[PACKS][VEC], qv[QP][VEC];
        A m = neg_inf<A>();
#pragma unroll
        for (int p = 0; p < PACKS; ++p) {
            const int c0 = (p * LANES + l) * VEC;
            if (read && c0 < n) {
                raw_to_acc<VEC>(load_pack<VEC>(x + c0), xv[p]);
                if (SOFT) raw_to_acc<VEC>(load_pack<VEC>(q + c0), qv[SOFT ? p : 0]);
#pragma unroll
                for (int i = 0; i < VEC; ++i) m = sk_max(m, xv[p][i]);
            }
        }
        m = group_max<LANES>(m);
        const A mr = row_ref(m);
        RowSums<A> rs;
        rs.zero();
        if (P.smooth) {  // sk:opt { sum w zs and W only with label smoothing (a uniform branch)
#pragma unroll
            for (int p = 0; p < PACKS; ++p) {
                const int c0 = (p * LANES + l) * VEC;
                if (read && c0 < n) {
#pragma unroll
                    for (int i = 0; i < VEC; ++i) {
                        const A w = weight_at(P.weight, c0 + i);
                        rs.S += w * (xv[p][i] - mr);
                        rs.W += w;
                    }
                }
            }
        }  // sk:opt }
        if (SOFT) {  // sum w q and sum w q zs (weighted: an option)
            if (P.weight != nullptr) {  // sk:opt {
#pragma unroll
                for (int p = 0; p < PACKS; ++p) {
                    const int c0 = (p * LANES + l) * VEC;
                    if (read && c0 < n) {
#pragma unroll
                        for (int i = 0; i < VEC; ++i) {
                            const A wq = P.weight[c0 + i] * qv[SOFT ? p : 0][i];
                            rs.Q1 += wq;
                            rs.Q2 += wq * (xv[p][i] - mr);
                        }
                    }
                }
            } else {  // sk:opt }
#pragma unroll
                for (int p = 0; p < PACKS; ++p) {
                    const int c0 = (p * LANES + l) * VEC;
                    if (read && c0 < n) {
#pragma unroll
                        for (int i = 0; i < VEC; ++i) {
                            const A q = qv[SOFT ? p : 0][i];
                            rs.Q1 += q;
                            rs.Q2 += q * (xv[p][i] - mr);
                        }
                    }
                }
            }
        }
#pragma unroll
        for (int p = 0; p < PACKS; ++p) {
            const int c0 = (p * LANES + l) * VEC;
            if (read && c0 < n) {
#pragma unroll
                for (int i = 0; i < VEC; ++i) {
                    const A e = exp_shifted(xv[p][i] - mr);
                    rs.s += e;
                    xv[p][i] = e;  // keep exp(zs) for the gradient
                }
            }
        }
        rs.s = group_sum<LANES>(rs.s);
        if (SOFT) {
            rs.Q1 = group_sum<LANES>(rs.Q1);
            rs.Q2 = group_sum<LANES>(rs.Q2);
        }
        if (P.smooth) {  // sk:opt {
            rs.S = group_sum<LANES>(rs.S);
            rs.W = group_sum<LANES>(rs.W);
        }  // sk:opt }
        __syncwarp();  // every lane's reads of this row happen before any lane's store
        if (!active) continue;  // after the last shuffle: the loop condition is warp-uniform
        if (!read) {  // sk:cold {
            const Packs<VEC, int> pk(n, 0, true);
            // lanes of this row walk its packs as they would hold them
            skipped_row<VEC>(P, row, rt, pk, Walker{l, LANES}, l == 0, racc);
            continue;
        }  // sk:cold }
        const RowOut<A> o = row_epilogue<SOFT, false>(P, row, rt, m, mr, rs, z_t, l == 0, racc);
        if (P.grad == nullptr || P.stats_mode) continue;
        // sk:grad {
        T* g = P.grad + row * P.grad_row_stride;
        if (!SOFT && !rt.owned) {  // sk:cold { read for the lse only: an ignored or bad row
            const A fill = rt.counted ? quiet_nan<A>() : A(0);
            A v[VEC];
#pragma unroll
            for (int i = 0; i < VEC; ++i) v[i] = fill;
#pragma unroll
            for (int p = 0; p < PACKS; ++p) {
                const int c0 = (p * LANES + l) * VEC;
                if (c0 < n) store_full<VEC>(g + c0, v);
            }
            continue;
        }  // sk:cold }
        // class: a p - eps_c w (eps_c = 0 without smoothing); soft: a p - w (keep q + eps_c);
        // the weight's term only where it matters (an option: smoothing, or soft targets)
        if (P.weight != nullptr && (SOFT || P.smooth)) {  // sk:opt {
#pragma unroll
            for (int p = 0; p < PACKS; ++p) {
                const int c0 = (p * LANES + l) * VEC;
                if (c0 < n) {
                    A out[VEC];
#pragma unroll
                    for (int i = 0; i < VEC; ++i) {
                        const A wc = P.weight[c0 + i];
                        out[i] = SOFT ? xv[p][i] * o.ar - wc * (qv[SOFT ? p : 0][i] * o.kr + o.er)
                                      : xv[p][i] * o.ar - o.er * wc;
                    }
                    store_full<VEC>(g + c0, out);
                }
            }
        } else {  // sk:opt }
#pragma unroll
            for (int p = 0; p < PACKS; ++p) {
                const int c0 = (p * LANES + l) * VEC;
                if (c0 < n) {
                    A out[VEC];
#pragma unroll
                    for (int i = 0; i < VEC; ++i) {
                        out[i] = SOFT ? xv[p][i] * o.ar - (qv[SOFT ? p : 0][i] * o.kr + o.er)
                                      : xv[p][i] * o.ar - o.er;
                    }
                    store_full<VEC>(g + c0, out);
                }
            }
        }
        if (!SOFT) {  // the target entry, by the lane that stored its pack (program order)
            const int kt = int(rt.t / VEC);
            if (kt % LANES == l) g[rt.t] = Convert<T>::from(o.g_t);
        }
        // sk:grad }
    }
}

// The gradient of one element from its exp(zs): class a p - eps_c w_c (eps_c = 0 without
// smoothing), soft a p - w_c (keep q + eps_c); wc = 1 without a weight.
template <bool SOFT, typename A>
__device__ __forceinline__ A grad_value(A e, A q, A wc, const RowOut<A>& o) {
    return SOFT ? e * o.ar - wc * (q * o.kr + o.er) : e * o.ar - o.er * wc;
}

// A pack's gradient, z (capped) in v, gradient out; weights (an option: soft targets, or
// smoothing) read only where they count, and only inside the row.
template <bool SOFT, bool GENERAL, bool FULL, int VEC, typename T>
__device__ __forceinline__ void grad_pack(const CeParams<T>& P, const RowOut<acc_t<T>>& o,
                                          acc_t<T> mr, int c0, int n, acc_t<T> (&v)[VEC],
                                          const acc_t<T> (&qv)[VEC]) {
    typedef acc_t<T> A;
    if (P.weight != nullptr && (SOFT || P.smooth)) {  // sk:opt {
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
            const A wc = (FULL || in_row(c0 + i, n)) ? P.weight[c0 + i] : A(0);
            const A z = cap<GENERAL>(P, v[i]);
            A g = grad_value<SOFT>(exp_shifted(z - mr), qv[i], wc, o);
            if (GENERAL) g *= cap_chain<GENERAL>(P, z);
            v[i] = g;
        }
    } else {  // sk:opt }
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
            const A z = cap<GENERAL>(P, v[i]);
            A g = grad_value<SOFT>(exp_shifted(z - mr), qv[i], A(1), o);
            if (GENERAL) g *= cap_chain<GENERAL>(P, z);
            v[i] = g;
        }
    }
}

// A pack's soft-target sums: Q1 += sum w q, Q2 += sum w q zs (zs in v); w only with a weight.
template <bool FULL, int VEC, typename T>
__device__ __forceinline__ void soft_sums(const CeParams<T>& P, int c0, int n,
                                          const acc_t<T> (&zs)[VEC], const acc_t<T> (&qv)[VEC],
                                          RowSums<acc_t<T>>& rs) {
    typedef acc_t<T> A;
    if (P.weight != nullptr) {  // sk:opt {
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
            if (FULL || in_row(c0 + i, n)) {
                const A wq = P.weight[c0 + i] * qv[i];
                rs.Q1 += wq;
                rs.Q2 += wq * zs[i];
            }
        }
    } else {  // sk:opt }
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
            if (FULL || in_row(c0 + i, n)) {
                rs.Q1 += qv[i];
                rs.Q2 += qv[i] * zs[i];
            }
        }
    }
}

// A pack's smoothing sums: S += sum w zs, W += sum w (an option: label smoothing).
template <bool FULL, int VEC, typename T>
__device__ __forceinline__ void smooth_sums(const CeParams<T>& P, int c0, int n,
                                            const acc_t<T> (&zs)[VEC], RowSums<acc_t<T>>& rs) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
        if (FULL || in_row(c0 + i, n)) {
            const acc_t<T> wc = weight_at(P.weight, c0 + i);
            rs.S += wc * zs[i];
            rs.W += wc;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// (b) BLOCK_SMEM: a group of G threads per row (256 / G rows per block), the raw logits (and
// soft targets) parked in the group's shared memory by pack (slot k * VEC for pack k, owned by
// thread k mod G). Each group loads the first batch of its next row while it reduces the
// current one. Used with a gradient, and for short rows that are not whole packs or have a
// softcap (a warp per row); without a gradient longer rows go to (c), which reads once too.

template <typename T, bool SOFT, bool FAST>
__device__ __forceinline__ void ce_block(const CeParams<T>& P, double (&racc)[3]) {
    typedef acc_t<T> A;
    constexpr bool GENERAL = !FAST;
    constexpr int VEC = Vec<T>::value;
    // full packs per batch: 4 (2 with soft targets: two operands, the same bytes in flight)
    constexpr int NB = batch_packs<T>(SOFT);
    __shared__ A red[5 * MAX_WARPS];
    const Group gr = row_group(P.row_threads);
    const int R = int(blockDim.x) / gr.G;
    const int n = int(P.n_cols);
    const int slots = smem_slots<VEC>(n, P.vec_ok);
    T* xb = reinterpret_cast<T*>(sk_dyn_smem) + gr.g * slots * (SOFT ? 2 : 1);
    T* qb = xb + slots;  // soft targets only
    const Walker w = gr.walker();
    const bool leader = gr.t == 0;
    const idx_t stride = idx_t(gridDim.x) * R;
    Pack<T, VEC> rx[NB], rq[SOFT ? NB : 1];
    // the first batch of a row's logits (and soft targets), for rows that are read
    auto prefetch = [&](idx_t r) {
        if (r >= P.n_rows || !row_read<SOFT>(P, row_target<SOFT>(P, r))) return;
        const T* xr = P.x + r * P.row_stride;
        const T* qr = static_cast<const T*>(P.target) + (SOFT ? r * P.target_row_stride : 0);
        const Packs<VEC, int> pr(n, row_shift(xr, P.vec_ok), P.vec_ok);
        prefetch_batch<NB>(pr, w, [&](int b, int k) {
            rx[b] = load_pack<VEC>(xr + pr.c0(k));
            if (SOFT) rq[SOFT ? b : 0] = load_pack<VEC>(qr + pr.c0(k));
        });
    };
    idx_t row = idx_t(blockIdx.x) * R + gr.g;
    prefetch(row);
    for (; row < P.n_rows; row += stride) {
        const T* x = P.x + row * P.row_stride;
        const Packs<VEC, int> pk(n, row_shift(x, P.vec_ok), P.vec_ok);
        const RowTarget rt = row_target<SOFT>(P, row);
        if (!row_read<SOFT>(P, rt)) {  // sk:cold {
            skipped_row<VEC>(P, row, rt, pk, w, leader, racc);
            prefetch(row + stride);
            continue;
        }  // sk:cold }
        const T* q = static_cast<const T*>(P.target) + (SOFT ? row * P.target_row_stride : 0);
        const A z_t = (!SOFT && rt.owned) ? cap<GENERAL>(P, to_acc(x[rt.t])) : A(0);
        A m = neg_inf<A>();
        // pass 1: global -> shared, row maximum (reads C, + C soft targets)
        auto park = [&](int k, const Pack<T, VEC>& x_raw, const Pack<T, VEC>& q_raw, bool full) {
            store_pack<VEC>(xb + k * VEC, x_raw);
            if (SOFT) store_pack<VEC>(qb + k * VEC, q_raw);
            A v[VEC];
            raw_to_acc<VEC>(x_raw, v);
#pragma unroll
            for (int i = 0; i < VEC; ++i) {
                if (full || in_row(pk.c0(k) + i, n)) m = sk_max(m, cap<GENERAL>(P, v[i]));
            }
        };
        for_full_packs_prefetched<NB>(
            pk, w,
            [&](int b, int k) {
                rx[b] = load_pack<VEC>(x + pk.c0(k));
                if (SOFT) rq[SOFT ? b : 0] = load_pack<VEC>(q + pk.c0(k));
            },
            [&](int b, int k) { park(k, rx[b], rq[SOFT ? b : 0], true); });
        for_partial_packs(pk, P.vec_ok, w, [&](int k) {
            Pack<T, VEC> x_raw, q_raw;
            load_raw<VEC>(x, pk.c0(k), n, false, x_raw);
            if (SOFT) load_raw<VEC>(q, pk.c0(k), n, false, q_raw);
            park(k, x_raw, q_raw, false);
        });
        prefetch(row + stride);  // in flight while this row is reduced
        m = group_max_all(gr, m, red);
        const A mr = row_ref(m);
        // pass 2: sums over shared memory
        RowSums<A> rs;
        rs.zero();
        for_smem_packs(pk, P.vec_ok, w, [&](int k, auto full_) {
            constexpr bool full = decltype(full_)::value;
            A v[VEC], qv[VEC];
            raw_to_acc<VEC>(load_pack<VEC>(xb + k * VEC), v);
            if (SOFT) raw_to_acc<VEC>(load_pack<VEC>(qb + k * VEC), qv);
            const int c0 = pk.c0(k);
#pragma unroll
            for (int i = 0; i < VEC; ++i) {
                v[i] = cap<GENERAL>(P, v[i]) - mr;  // zs
                if (full || in_row(c0 + i, n)) rs.s += exp_shifted(v[i]);
            }
            if (SOFT) soft_sums<full, VEC>(P, c0, n, v, qv, rs);
            if (P.smooth) smooth_sums<full, VEC>(P, c0, n, v, rs);  // sk:opt
        });
        A sums[5] = {rs.s, rs.S, rs.W, rs.Q1, rs.Q2};
        group_sum_n<5>(gr, sums, red);
        rs.s = sums[0], rs.S = sums[1], rs.W = sums[2], rs.Q1 = sums[3], rs.Q2 = sums[4];
        const RowOut<A> o = row_epilogue<SOFT, GENERAL>(P, row, rt, m, mr, rs, z_t, leader, racc);
        if (gr.G <= WARP) __syncwarp();  // (larger groups: their barriers order the reads)
        if (P.grad == nullptr || P.stats_mode) continue;
        T* g = P.grad + row * P.grad_row_stride;
        if (!SOFT && !rt.owned) {  // sk:cold {
            skipped_row<VEC>(P, row, RowTarget{0, rt.counted, false}, pk, w, false, racc);
            continue;
        }  // sk:cold }
        // pass 3: gradient, shared -> global (writes C)
        for_smem_packs(pk, P.vec_ok, w, [&](int k, auto full_) {  // sk:grad {
            constexpr bool full = decltype(full_)::value;
            A v[VEC], qv[VEC];
            raw_to_acc<VEC>(load_pack<VEC>(xb + k * VEC), v);
            if (SOFT) raw_to_acc<VEC>(load_pack<VEC>(qb + k * VEC), qv);
            const int c0 = pk.c0(k);
            grad_pack<SOFT, GENERAL, full, VEC>(P, o, mr, c0, n, v, qv);
            if constexpr (full) {
                store_full<VEC>(g + c0, v);
            } else {
                store_acc<VEC>(g, c0, n, false, v);
            }
        });  // sk:grad }
        if (!SOFT) {
            const int kt = int((rt.t + pk.shift) / VEC);
            if (kt % gr.G == gr.t) g[rt.t] = Convert<T>::from(o.g_t);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// (c) ONLINE: a block per row (columns as 32-bit indices: rows of fewer than 2**31 elements, as
// the host checks; rows are addressed with 64-bit offsets). Pass 1 folds the row into
// per-thread running statistics (max m, reference r = m or 0 while m = -inf, and the sums
// relative to r, shifted when m grows -- checked once per batch of packs: every shift term has
// the sums' sign, so nothing cancels), merged over the block by shifting each thread's sums to
// the block maximum; pass 2 (gradient only) reads the row again. Without a gradient this is the
// single-read path for every row longer than (a) serves.

template <typename A>
struct OnlineCe {
    A m, r;
    RowSums<A> rs;
    __device__ __forceinline__ void init() {
        m = neg_inf<A>();
        r = A(0);
        rs.zero();
    }
    // Move the sums to the reference nr >= m: s exp(r - nr), S + W (r - nr), Q2 + Q1 (r - nr).
    // While m = -inf every element seen was -inf: s = 0 and S, Q2 are 0 or -inf already, and
    // exp(r - nr) may overflow (nr = -1e30), so only the reference moves.
    __device__ __forceinline__ void shift_to(A nr) {
        if (m == neg_inf<A>()) {
            r = nr;
            return;
        }
        const A d = r - nr;
        rs.s *= exp_shifted(d);
        rs.S += rs.W * d;
        rs.Q2 += rs.Q1 * d;
        r = nr;
    }
    // fold a pack's (capped) values v (and soft targets qv) already relative to nothing:
    // s += exp(v - r), the soft and smoothing sums of zs = v - r
    // (ssum: where the exponentials go -- a batch's own sum, added to rs.s after the batch, so
    // that a thread's rounding error grows with its batches, not its elements)
    template <bool SOFT, bool FULL, int VEC, typename T>
    __device__ __forceinline__ void add(const CeParams<T>& P, int c0, int n, A (&v)[VEC],
                                        const A (&qv)[VEC], A& ssum) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
            v[i] -= r;  // zs
            if (FULL || in_row(c0 + i, n)) ssum += exp_shifted(v[i]);
        }
        if (SOFT) soft_sums<FULL, VEC>(P, c0, n, v, qv, rs);
        if (P.smooth) smooth_sums<FULL, VEC>(P, c0, n, v, rs);  // sk:opt
    }
};

// Pass 1 of (c), and of the split's statistics kernel, over the packs of pk (a row, or a
// segment of one: Packs or SegPacks): this thread's running statistics st (reads C, + C soft
// targets), a batch of NB full packs at a time, the running maximum checked once per batch.
template <bool SOFT, bool GENERAL, typename T, typename PK>
__device__ __forceinline__ void ce_online_fold(const CeParams<T>& P, const T* x, const T* q,
                                               const PK& pk, Walker w, OnlineCe<acc_t<T>>& st) {
    typedef acc_t<T> A;
    constexpr int VEC = Vec<T>::value;
    constexpr int NB = batch_packs<T>(SOFT);
    const int n = int(P.n_cols);
    Pack<T, VEC> rx[NB], rq[SOFT ? NB : 1];
    auto fold = [&](int nb, const int (&ks)[NB]) {
        A v[NB][VEC], qv[SOFT ? NB : 1][VEC];
        A pm = neg_inf<A>();
#pragma unroll
        for (int b = 0; b < NB; ++b) {
            if (b < nb) {
                raw_to_acc<VEC>(rx[b], v[b]);
                if (SOFT) raw_to_acc<VEC>(rq[SOFT ? b : 0], qv[SOFT ? b : 0]);
#pragma unroll
                for (int i = 0; i < VEC; ++i) {
                    v[b][i] = cap<GENERAL>(P, v[b][i]);
                    pm = sk_max(pm, v[b][i]);
                }
            }
        }
        if (pm > st.m) {  // the running maximum grows (rarely, after the first packs)
            st.shift_to(pm);
            st.m = pm;
        }
        A bs = A(0);
#pragma unroll
        for (int b = 0; b < NB; ++b) {
            if (b < nb) {
                st.template add<SOFT, true, VEC>(P, pk.c0(ks[b]), n, v[b], qv[SOFT ? b : 0],
                                                 bs);
            }
        }
        st.rs.s += bs;
    };
    auto load_full = [&](int b, int k) {
        rx[b] = load_pack<VEC>(x + pk.c0(k));
        if (SOFT) rq[SOFT ? b : 0] = load_pack<VEC>(q + pk.c0(k));
    };
    int kb = first_full(pk, w);
#pragma unroll 1
    for (; kb + (NB - 1) * w.nt < pk.hi; kb += NB * w.nt) {  // sk:hot packs=NB
        int ks[NB];
#pragma unroll
        for (int b = 0; b < NB; ++b) {
            ks[b] = kb + b * w.nt;
            load_full(b, ks[b]);
        }
        fold(NB, ks);
    }
#pragma unroll 1
    for (; kb < pk.hi; kb += w.nt) {  // sk:cold { fewer than NB full packs left
        int ks[NB] = {kb};
        load_full(0, kb);
        fold(1, ks);
    }  // sk:cold }
    for_partial_packs(pk, P.vec_ok, w, [&](int k) {
        Pack<T, VEC> x_raw, q_raw;
        load_raw<VEC>(x, pk.c0(k), n, false, x_raw);
        if (SOFT) load_raw<VEC>(q, pk.c0(k), n, false, q_raw);
        const int c0 = pk.c0(k);
        A v[VEC], qv[VEC];
        raw_to_acc<VEC>(x_raw, v);
        if (SOFT) raw_to_acc<VEC>(q_raw, qv);
        A pm = neg_inf<A>();
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
            v[i] = cap<GENERAL>(P, v[i]);
            if (in_row(c0 + i, n)) pm = sk_max(pm, v[i]);
        }
        if (pm > st.m) {
            st.shift_to(pm);
            st.m = pm;
        }
        st.template add<SOFT, false, VEC>(P, c0, n, v, qv, st.rs.s);
    });
}

// Pass 2 of (c), and of the split's normalising kernel, over the packs of pk (gradient only): the
// gradient of every element but the target's (written after by its pack's thread).
template <bool SOFT, bool GENERAL, typename T, typename PK>
__device__ __forceinline__ void ce_online_grad(const CeParams<T>& P, const T* x, const T* q, T* g,
                                               const PK& pk, Walker w,
                                               const RowOut<acc_t<T>>& o, acc_t<T> mr) {
    typedef acc_t<T> A;
    constexpr int VEC = Vec<T>::value;
    constexpr int NB = batch_packs<T>(SOFT);
    const int n = int(P.n_cols);
    Pack<T, VEC> rx[NB], rq[SOFT ? NB : 1];
    // pass 2: gradient (reads C again, + C soft targets, writes C); in-place safe: the same
    // thread reads then writes each element
    for_full_packs<NB>(  // sk:grad {
        pk, w,
        [&](int b, int k) {
            rx[b] = load_pack<VEC>(x + pk.c0(k));
            if (SOFT) rq[SOFT ? b : 0] = load_pack<VEC>(q + pk.c0(k));
        },
        [&](int b, int k) {
            A v[VEC], qv[VEC];
            raw_to_acc<VEC>(rx[b], v);
            if (SOFT) raw_to_acc<VEC>(rq[SOFT ? b : 0], qv);
            grad_pack<SOFT, GENERAL, true, VEC>(P, o, mr, pk.c0(k), n, v, qv);
            store_full<VEC>(g + pk.c0(k), v);
        });  // sk:grad }
    for_partial_packs(pk, P.vec_ok, w, [&](int k) {
        Pack<T, VEC> x_raw, q_raw;
        load_raw<VEC>(x, pk.c0(k), n, false, x_raw);
        if (SOFT) load_raw<VEC>(q, pk.c0(k), n, false, q_raw);
        A v[VEC], qv[VEC];
        raw_to_acc<VEC>(x_raw, v);
        if (SOFT) raw_to_acc<VEC>(q_raw, qv);
        grad_pack<SOFT, GENERAL, false, VEC>(P, o, mr, pk.c0(k), n, v, qv);
        store_acc<VEC>(g, pk.c0(k), n, false, v);
    });
}

template <typename T, bool SOFT, bool FAST>
__device__ __forceinline__ void ce_online(const CeParams<T>& P, double (&racc)[3]) {
    typedef acc_t<T> A;
    constexpr bool GENERAL = !FAST;
    constexpr int VEC = Vec<T>::value;
    __shared__ A red[5 * MAX_WARPS];
    const Group gr = whole_block();
    const Walker w = gr.walker();
    const bool leader = gr.t == 0;
    const int n = int(P.n_cols);
    for (idx_t row = blockIdx.x; row < P.n_rows; row += gridDim.x) {
        const T* x = P.x + row * P.row_stride;
        const Packs<VEC, int> pk(n, row_shift(x, P.vec_ok), P.vec_ok);
        const RowTarget rt = row_target<SOFT>(P, row);
        if (!row_read<SOFT>(P, rt)) {  // sk:cold {
            skipped_row<VEC>(P, row, rt, pk, w, leader, racc);
            continue;
        }  // sk:cold }
        const T* q = static_cast<const T*>(P.target) + (SOFT ? row * P.target_row_stride : 0);
        const A z_t = (!SOFT && rt.owned) ? cap<GENERAL>(P, to_acc(x[rt.t])) : A(0);
        OnlineCe<A> st;
        st.init();
        ce_online_fold<SOFT, GENERAL>(P, x, q, pk, w, st);
        // merge: every thread shifts its sums to the block maximum, then one fixed-order sum
        const A m = group_max_all(gr, st.m, red);
        const A mr = row_ref(m);
        st.shift_to(mr);
        A sums[5] = {st.rs.s, st.rs.S, st.rs.W, st.rs.Q1, st.rs.Q2};
        group_sum_n<5>(gr, sums, red);
        RowSums<A> rs;
        rs.s = sums[0], rs.S = sums[1], rs.W = sums[2], rs.Q1 = sums[3], rs.Q2 = sums[4];
        const RowOut<A> o = row_epilogue<SOFT, GENERAL>(P, row, rt, m, mr, rs, z_t, leader, racc);
        if (P.grad == nullptr || P.stats_mode) continue;
        T* g = P.grad + row * P.grad_row_stride;
        if (!SOFT && !rt.owned) {  // sk:cold {
            skipped_row<VEC>(P, row, RowTarget{0, rt.counted, false}, pk, w, false, racc);
            continue;
        }  // sk:cold }
        ce_online_grad<SOFT, GENERAL>(P, x, q, g, pk, w, o, mr);
        if (!SOFT) {
            const int kt = int((rt.t + pk.shift) / VEC);
            if (kt % w.nt == w.t) g[rt.t] = Convert<T>::from(o.g_t);
        }
    }
}

// The workspace of the reductions (per device and stream, zeroed once by the host): the ticket
// counter, the denominator the denom kernel leaves for the main kernel, and the partial sums.
struct CeWorkspace {
    double* base;
    __device__ __forceinline__ unsigned* counter() const { return reinterpret_cast<unsigned*>(base); }
    __device__ __forceinline__ double& denom() const { return base[1]; }
    __device__ __forceinline__ double& count() const { return base[2]; }
    __device__ __forceinline__ double* partials() const { return base + 8; }
};

// ---------------------------------------------------------------------------------------------
// (d) SPLIT: a row cut into n_segs segments of seg_packs packs, one 256-thread block per
// (row, segment) item (grid-stride over n_rows x n_segs, 64-bit), in two launches:
//   phase 0 (statistics): pass 1 over the segment (reads C, + C soft targets); the block's
//     merged statistics into the split workspace, 8 doubles per item: [M_j, s_j, S_j, W_j,
//     Q1_j, Q2_j, z_t, 0], the sums relative to row_ref(M_j) (OnlineCe's), z_t (capped) from
//     the segment holding the target (read here: in place, phase 1 overwrites it). With
//     "mean" and a gradient it also sums the denominator (the denom kernel's work: the w_t of
//     the counted rows, by each row's segment-0 block) into the reduction workspace, so the
//     call stays at 2 launches.
//   phase 1 (normalise): every block of a row merges that row's partials in a fixed order
//     (thread j takes segments j, j + 256, ..., each moved to the row reference by OnlineCe's
//     shift_to: every shift term has its sum's sign, nothing cancels; then the block's fixed
//     tree), so all of a row's blocks get the same bits; the row epilogue (loss, lse or
//     statistics, the reduction's accumulators) by the segment-0 block's thread 0; the
//     gradient of its segment (reads C again, + C soft targets, writes C), the target entry by
//     the thread holding its pack. The reduction of "sum" / "mean" as the other strategies'.
// Traffic: loss only C (+ the partials; phase 1 reads no logits), with a gradient 2C read + C
// written (as (c)), every SM busy whatever the row count.
template <typename T, bool SOFT, bool FAST, int PHASE>
__device__ __forceinline__ void ce_split(const CeParams<T>& P, double (&racc)[3], double* wsp,
                                         idx_t n_segs, int seg_packs, bool denom_here) {
    typedef acc_t<T> A;
    constexpr bool GENERAL = !FAST;
    constexpr int VEC = Vec<T>::value;
    constexpr int NP = 8;  // doubles per item
    __shared__ A red[5 * MAX_WARPS];
    const Group gr = whole_block();
    const Walker w = gr.walker();
    const int n = int(P.n_cols);
    const idx_t items = P.n_rows * n_segs;
    for (idx_t item = blockIdx.x; item < items; item += gridDim.x) {
        const idx_t row = item / n_segs;
        const int seg = int(item - row * n_segs);
        const int k0 = seg * seg_packs;
        const T* x = P.x + row * P.row_stride;
        const Packs<VEC, int> pk(n, row_shift(x, P.vec_ok), P.vec_ok);
        const SegPacks<VEC, int> sp(pk, k0, k0 + seg_packs, P.vec_ok);
        const RowTarget rt = row_target<SOFT>(P, row);
        const bool read = row_read<SOFT>(P, rt);
        const T* q = static_cast<const T*>(P.target) + (SOFT ? row * P.target_row_stride : 0);
        const int kt = int((rt.t + pk.shift) / VEC);  // the target's pack (class targets)
        const bool t_here = !SOFT && rt.owned && kt >= k0 && kt < k0 + seg_packs;
        if constexpr (PHASE == 0) {
            if (denom_here && seg == 0 && threadIdx.x == 0 && rt.counted) {
                racc[0] += SOFT ? 1.0 : (rt.owned ? double(weight_at(P.weight, rt.t))
                                                  : double(quiet_nan<A>()));
                racc[1] += 1.0;
            }
            if (!read) continue;  // (phase 1 reads no partials of such a row)
            OnlineCe<A> st;
            st.init();
            ce_online_fold<SOFT, GENERAL>(P, x, q, sp, w, st);
            const A m = group_max_all(gr, st.m, red);
            const A mr = row_ref(m);
            st.shift_to(mr);
            A sums[5] = {st.rs.s, st.rs.S, st.rs.W, st.rs.Q1, st.rs.Q2};
            group_sum_n<5>(gr, sums, red);
            if (threadIdx.x == 0) {
                double* p = wsp + item * NP;
                p[0] = double(m);
#pragma unroll
                for (int k = 0; k < 5; ++k) p[1 + k] = double(sums[k]);
                p[6] = t_here ? double(cap<GENERAL>(P, to_acc(x[rt.t]))) : 0.0;
                p[7] = 0.0;
            }
        } else {
            const bool leader = seg == 0 && threadIdx.x == 0;
            if (!read) {  // sk:cold {
                skipped_row<VEC>(P, row, rt, sp, w, leader, racc);
                continue;
            }  // sk:cold }
            const double* p = wsp + row * n_segs * NP;  // the row's partials, segment 0 first
            A mj = neg_inf<A>();
            for (idx_t j = w.t; j < n_segs; j += w.nt) mj = sk_max(mj, A(p[j * NP]));
            const A m = group_max_all(gr, mj, red);
            const A mr = row_ref(m);
            A sums[5] = {A(0), A(0), A(0), A(0), A(0)};
            for (idx_t j = w.t; j < n_segs; j += w.nt) {
                OnlineCe<A> st;
                st.m = A(p[j * NP]);
                st.r = row_ref(st.m);
                st.rs.s = A(p[j * NP + 1]);
                st.rs.S = A(p[j * NP + 2]);
                st.rs.W = A(p[j * NP + 3]);
                st.rs.Q1 = A(p[j * NP + 4]);
                st.rs.Q2 = A(p[j * NP + 5]);
                st.shift_to(mr);
                sums[0] += st.rs.s;
                sums[1] += st.rs.S;
                sums[2] += st.rs.W;
                sums[3] += st.rs.Q1;
                sums[4] += st.rs.Q2;
            }
            group_sum_n<5>(gr, sums, red);
            RowSums<A> rs;
            rs.s = sums[0], rs.S = sums[1], rs.W = sums[2], rs.Q1 = sums[3], rs.Q2 = sums[4];
            const A z_t = (!SOFT && rt.owned) ? A(p[idx_t(kt / seg_packs) * NP + 6]) : A(0);
            const RowOut<A> o =
                row_epilogue<SOFT, GENERAL>(P, row, rt, m, mr, rs, z_t, leader, racc);
            if (P.grad == nullptr || P.stats_mode) continue;
            T* g = P.grad + row * P.grad_row_stride;
            if (!SOFT && !rt.owned) {  // sk:cold {
                skipped_row<VEC>(P, row, RowTarget{0, rt.counted, false}, sp, w, false, racc);
                continue;
            }  // sk:cold }
            ce_online_grad<SOFT, GENERAL>(P, x, q, g, sp, w, o, mr);
            if (t_here && (kt - k0) % w.nt == w.t) g[rt.t] = Convert<T>::from(o.g_t);
        }
    }
}

}  // namespace sk

// ---------------------------------------------------------------------------------------------
// Kernels. target: (N,) int32/int64 class indices, or for SOFT the (N, C) probabilities in the
// logits' dtype with row stride target_row_stride. loss, lse, stats, weight, denom and the
// scalars are in the compute type; loss: (N,) for reduction "none", else 0-d. stats: (N, K),
// K = n_stats (SK_CE_STATS mode). ws: the reduction workspace (CeWorkspace). Scalars
// precomputed on the host: keep = 1 - eps, eps_c = eps / C (0 without smoothing),
// inv_softcap = 1 / softcap. row_threads: threads per row of strategy (b).

// Register budgets (SK_LAUNCH_BOUNDS in common.cuh): (a) holds 32 values per lane (64 with soft
// targets) and a row epilogue with many live scalars: 2 blocks of 4 warps per SM at least (255
// registers; at 128, ptxas recomputes the option flags and pointers every row).
#define SK_CE_MIN_BLOCKS(STRATEGY, SOFT) ((STRATEGY) == SK_WARP_ROWS ? 2 : SK_MIN_BLOCKS(STRATEGY))

// The kernel parameters of cross_entropy_fwd_kernel (and, followed by the split's own, of
// cross_entropy_split_kernel).
#define SK_CE_FWD_PARAMS                                                                        \
    const T *x_ptr, const void *target_ptr, T *grad_ptr, sk::acc_t<T> *loss_ptr,               \
        sk::acc_t<T> *lse_ptr, sk::acc_t<T> *stats_ptr, const sk::acc_t<T> *weight_ptr,         \
        const sk::acc_t<T> *denom_ptr, double *ws, long long n_rows, long long n_cols,          \
        long long row_stride, long long target_row_stride, long long grad_row_stride,           \
        long long ignore_index, long long vocab_start, long long row_threads, long long n_stats, \
        int flags, sk::acc_t<T> keep, sk::acc_t<T> eps_c, sk::acc_t<T> z_loss,                   \
        sk::acc_t<T> softcap, sk::acc_t<T> inv_softcap, sk::acc_t<T> grad_scale

namespace sk {

// The per-call arguments decoded once (row_scale: grad_scale / denom for "mean" with a
// gradient, the denominator read on the device, never synchronised).
template <typename T>
__device__ __forceinline__ CeParams<T> ce_decode(SK_CE_FWD_PARAMS) {
    typedef acc_t<T> A;
    CeParams<T> P;
    P.x = x_ptr;
    P.target = target_ptr;
    P.grad = grad_ptr;
    P.loss = loss_ptr;
    P.lse = lse_ptr;
    P.stats = stats_ptr;
    P.weight = weight_ptr;
    P.n_rows = n_rows;
    P.n_cols = n_cols;
    P.row_stride = row_stride;
    P.target_row_stride = target_row_stride;
    P.grad_row_stride = grad_row_stride;
    P.ignore_index = ignore_index;
    P.vocab_start = vocab_start;
    P.row_threads = int(row_threads);
    P.n_stats = int(n_stats);
    P.target64 = (flags & SK_CE_T64) != 0;
    P.smooth = (flags & SK_CE_SMOOTH) != 0;
    P.zl = (flags & SK_CE_ZLOSS) != 0;
    P.vec_ok = (flags & SK_CE_VEC) != 0;
    P.softcap_on = (flags & SK_CE_SOFTCAP) != 0;
    P.stats_mode = (flags & SK_CE_STATS) != 0;
    P.mean = (flags & SK_CE_MEAN) != 0;
    P.reduce = P.mean || (flags & SK_CE_SUM) != 0;
    P.denom_in_kernel = P.mean && (flags & (SK_CE_DENOM_WS | SK_CE_DENOM_ARG)) == 0;
    P.keep = keep;
    P.eps_c = eps_c;
    P.z = z_loss;
    P.softcap = softcap;
    P.inv_softcap = inv_softcap;
    const CeWorkspace W{ws};
    A row_scale = grad_scale;
    if (grad_ptr != nullptr && P.mean) {
        if (flags & SK_CE_DENOM_ARG) row_scale = grad_scale * sk_rcp(denom_ptr[0]);
        if (flags & SK_CE_DENOM_WS) row_scale = A(double(grad_scale) * sk_rcp(W.denom()));
    }
    P.row_scale = row_scale;
    return P;
}

// The reduction's end ("sum", "mean"): every block's racc = {loss, w_t, count} summed in block
// order by the last block, which writes loss[0].
template <typename T>
__device__ __forceinline__ void ce_finish(const CeParams<T>& P, int flags, double* ws,
                                          const acc_t<T>* denom_ptr, acc_t<T>* loss_ptr,
                                          double (&racc)[3]) {
    typedef acc_t<T> A;
    if (!P.reduce || P.stats_mode) return;
    const CeWorkspace W{ws};
    grid_sum_and_finish<3>(racc, W.counter(), W.partials(), [&](const double (&tot)[3]) {
        double out = tot[0];
        if (P.mean) {
            double d;
            bool nothing;
            if (flags & SK_CE_DENOM_ARG) {
                d = double(denom_ptr[0]);
                nothing = d == 0.0;
            } else if (flags & SK_CE_DENOM_WS) {
                d = W.denom();
                nothing = W.count() == 0.0;
            } else {
                d = tot[1];
                nothing = tot[2] == 0.0;
            }
            out = nothing ? 0.0 : out * sk_rcp(d);
        }
        loss_ptr[0] = A(out);
    });
}

}  // namespace sk

template <typename T, bool SOFT, int STRATEGY, int LANES, int PACKS, bool FAST>
__global__ void SK_LAUNCH_BOUNDS_MIN(STRATEGY, SK_CE_MIN_BLOCKS(STRATEGY, SOFT))
    cross_entropy_fwd_kernel(SK_CE_FWD_PARAMS) {
    const sk::CeParams<T> P =
        sk::ce_decode<T>(x_ptr, target_ptr, grad_ptr, loss_ptr, lse_ptr, stats_ptr, weight_ptr,
                         denom_ptr, ws, n_rows, n_cols, row_stride, target_row_stride,
                         grad_row_stride, ignore_index, vocab_start, row_threads, n_stats, flags,
                         keep, eps_c, z_loss, softcap, inv_softcap, grad_scale);
    double racc[3] = {0.0, 0.0, 0.0};  // loss, w_t, counted rows of this thread's rows
    if constexpr (STRATEGY == SK_WARP_ROWS) {
        sk::ce_warp<T, SOFT, LANES, PACKS, FAST>(P, racc);
    } else if constexpr (STRATEGY == SK_BLOCK_SMEM) {
        sk::ce_block<T, SOFT, FAST>(P, racc);
    } else {
        sk::ce_online<T, SOFT, FAST>(P, racc);
    }
    sk::ce_finish(P, flags, ws, denom_ptr, loss_ptr, racc);
}

// (d) SPLIT, two launches per call (ce_split): PHASE 0 the segments' statistics into wsp
// (n_rows x n_segs x 8 doubles) and, with SK_CE_DENOM_WS, the "mean" denominator into ws (no
// denominator kernel); PHASE 1 the merge, the row epilogue, the gradient, the reduction.
template <typename T, bool SOFT, int PHASE, bool FAST>
__global__ void SK_LAUNCH_BOUNDS(SK_ONLINE)
    cross_entropy_split_kernel(SK_CE_FWD_PARAMS, double* wsp, long long n_segs,
                               long long seg_packs) {
    const sk::CeParams<T> P =
        sk::ce_decode<T>(x_ptr, target_ptr, grad_ptr, loss_ptr, lse_ptr, stats_ptr, weight_ptr,
                         denom_ptr, ws, n_rows, n_cols, row_stride, target_row_stride,
                         grad_row_stride, ignore_index, vocab_start, row_threads, n_stats, flags,
                         keep, eps_c, z_loss, softcap, inv_softcap, grad_scale);
    const bool denom_here = (flags & SK_CE_DENOM_WS) != 0;
    double racc[3] = {0.0, 0.0, 0.0};
    sk::ce_split<T, SOFT, FAST, PHASE>(P, racc, wsp, n_segs, int(seg_packs), denom_here);
    if constexpr (PHASE == 0) {
        if (!denom_here) return;
        double v[2] = {racc[0], racc[1]};
        const sk::CeWorkspace W{ws};
        sk::grid_sum_and_finish<2>(v, W.counter(), W.partials(), [&](const double (&tot)[2]) {
            W.denom() = tot[0];
            W.count() = tot[1];
        });
    } else {
        sk::ce_finish(P, flags, ws, denom_ptr, loss_ptr, racc);
    }
}


// The denominator of reduction "mean" for class targets, when a gradient must be scaled by it:
// the summed w_t of the counted rows (their count without a weight; a bad target adds NaN) and
// the count, into the workspace for the main kernel launched next on the stream.
// Reads N targets (+ N weights).
template <typename A>
__global__ void __launch_bounds__(SK_BLOCK_THREADS)
    cross_entropy_denom_kernel(const void* target_ptr, const A* weight_ptr, double* ws,
                               long long n_rows, long long n_cols, long long ignore_index,
                               int flags) {
    const bool t64 = (flags & SK_CE_T64) != 0;
    double v[2] = {0.0, 0.0};
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long row = (long long)blockIdx.x * blockDim.x + threadIdx.x; row < n_rows;
         row += stride) {
        const long long t = sk::read_target(target_ptr, t64, row);
        if (t == ignore_index) continue;
        const bool inside = t >= 0 && t < n_cols;
        v[0] += inside ? double(sk::weight_at(weight_ptr, t)) : double(sk::quiet_nan<A>());
        v[1] += 1.0;
    }
    const sk::CeWorkspace W{ws};
    sk::grid_sum_and_finish<2>(v, W.counter(), W.partials(), [&](const double (&tot)[2]) {
        W.denom() = tot[0];
        W.count() = tot[1];
    });
}

// The vocabulary-parallel gradient from merged statistics (dispatch.py's cross_entropy_grad):
// grad = (row_coef p - keep w_t onehot_{t_local} - eps_c w) * grad_scale * row_scale[0], soft:
// - w (keep q + eps_c), times the softcap's chain rule, p = exp(z - row_lse); the owned target
// entry as (a - keep w_t) p_t - keep w_t (1 - p_t) - eps_c w_t, 1 - p_t = -expm1(z_t - lse).
// Ignored rows: 0. A block per row; reads C (+ C soft targets), writes C. flags: SK_CE_T64,
// SK_CE_SMOOTH (eps_c != 0), SK_CE_VEC, SK_CE_SOFTCAP.
template <typename T, bool SOFT, bool FAST>
__global__ void SK_LAUNCH_BOUNDS_MIN(SK_ONLINE, 2)
    cross_entropy_grad_kernel(const T* x_ptr, const void* target_ptr, T* grad_ptr,
                              const sk::acc_t<T>* row_lse, const sk::acc_t<T>* row_coef,
                              const sk::acc_t<T>* row_scale, const sk::acc_t<T>* weight_ptr,
                              long long n_rows, long long n_cols, long long row_stride,
                              long long target_row_stride, long long grad_row_stride,
                              long long ignore_index, long long vocab_start, int flags,
                              sk::acc_t<T> keep, sk::acc_t<T> eps_c, sk::acc_t<T> softcap,
                              sk::acc_t<T> inv_softcap, sk::acc_t<T> grad_scale) {
    using namespace sk;
    typedef acc_t<T> A;
    constexpr bool GENERAL = !FAST;
    constexpr int VEC = Vec<T>::value;
    constexpr int NB = batch_packs<T>(SOFT);
    CeParams<T> P;  // the fields the shared helpers read
    P.target = target_ptr;
    P.weight = weight_ptr;
    P.n_cols = n_cols;
    P.ignore_index = ignore_index;
    P.vocab_start = vocab_start;
    P.target64 = (flags & SK_CE_T64) != 0;
    P.smooth = (flags & SK_CE_SMOOTH) != 0;
    P.vec_ok = (flags & SK_CE_VEC) != 0;
    P.softcap_on = (flags & SK_CE_SOFTCAP) != 0;
    P.softcap = softcap;
    P.inv_softcap = inv_softcap;
    const A rs = grad_scale * row_scale[0];
    const Walker w = whole_block().walker();
    const int n = int(n_cols);
    for (idx_t row = blockIdx.x; row < n_rows; row += gridDim.x) {
        const T* x = x_ptr + row * row_stride;
        T* g = grad_ptr + row * grad_row_stride;
        const Packs<VEC, int> pk(n, row_shift(x, P.vec_ok), P.vec_ok);
        const RowTarget rt = row_target<SOFT>(P, row);
        if (!rt.counted) {  // ignored: a zero row, logits unread
            A v[VEC];
#pragma unroll
            for (int i = 0; i < VEC; ++i) v[i] = A(0);
#pragma unroll 1
            for (int k = w.t; k < pk.np; k += w.nt) store_acc<VEC>(g, pk.c0(k), n, P.vec_ok, v);
            continue;
        }
        const T* q = static_cast<const T*>(target_ptr) + (SOFT ? row * target_row_stride : 0);
        const A L = row_lse[row];
        const A a = row_coef[row];
        const A ar = a * rs, er = eps_c * rs, kr = keep * rs;
        const int kt = int((rt.t + pk.shift) / VEC);
        const bool t_owner = !SOFT && rt.owned && kt % w.nt == w.t;
        A g_t = A(0);
        if (t_owner) {  // read before this thread stores the pack holding it
            const A z_t = cap<GENERAL>(P, to_acc(x[rt.t]));
            const A w_t = weight_at(weight_ptr, rt.t);
            const A kw = keep * w_t;
            const A d = z_t - L;
            g_t = ((a - kw) * exp_shifted(d) + kw * sk_expm1(d) - eps_c * w_t) * rs *
                  cap_chain<GENERAL>(P, z_t);
        }
        auto result = [&](int k, const Pack<T, VEC>& x_raw, const Pack<T, VEC>& q_raw,
                          A (&v)[VEC], bool full) {
            const int c0 = pk.c0(k);
            A qv[VEC];
            raw_to_acc<VEC>(x_raw, v);
            if (SOFT) raw_to_acc<VEC>(q_raw, qv);
#pragma unroll
            for (int i = 0; i < VEC; ++i) {
                const bool in = full || in_row(c0 + i, n);
                const A z = cap<GENERAL>(P, v[i]);
                const A e = exp_shifted(z - L);
                A gv;
                if (SOFT) {
                    const A wc = in ? weight_at(weight_ptr, c0 + i) : A(0);
                    gv = e * ar - wc * (qv[i] * kr + er);
                } else {
                    const A wc = (P.smooth && in) ? weight_at(weight_ptr, c0 + i) : A(1);
                    gv = e * ar - er * wc;
                }
                if (GENERAL) gv *= cap_chain<GENERAL>(P, z);
                v[i] = gv;
            }
        };
        Pack<T, VEC> rx[NB], rq[SOFT ? NB : 1];
        for_full_packs<NB>(
            pk, w,
            [&](int b, int k) {
                rx[b] = load_pack<VEC>(x + pk.c0(k));
                if (SOFT) rq[SOFT ? b : 0] = load_pack<VEC>(q + pk.c0(k));
            },
            [&](int b, int k) {
                A v[VEC];
                result(k, rx[b], rq[SOFT ? b : 0], v, true);
                store_full<VEC>(g + pk.c0(k), v);
            });
        for_partial_packs(pk, P.vec_ok, w, [&](int k) {
            Pack<T, VEC> x_raw, q_raw;
            load_raw<VEC>(x, pk.c0(k), n, false, x_raw);
            if (SOFT) load_raw<VEC>(q, pk.c0(k), n, false, q_raw);
            A v[VEC];
            result(k, x_raw, q_raw, v, false);
            store_acc<VEC>(g, pk.c0(k), n, false, v);
        });
        if (t_owner) g[rt.t] = Convert<T>::from(g_t);
    }
}
