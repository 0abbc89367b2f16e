/* One precision of the sequential FWM write: included by steps.c with T (float or double) and
 * NAME(x) (x suffixed with f32 or f64) defined, after fwm_steps_impl.h (vec, value_row,
 * bad_ids).
 *
 * The write of fwm_recurrent (models/rules/fwm.py) one position at a time with the state held
 * as W = S^T, [D_v, D_k] row-major: one sequence's state (a few KiB to 100 KiB) stays in L1/L2
 * and every pass over it is a run of D_k-wide rows. The norm follows the recurrence of the
 * chunkwise forms, n'_t = n_{t-1} + 2 u_t . r_t + |k_t|^2 |u_t|^2, n_t = min(n'_t, 1) (the
 * first write: n_1 = n'_1, no clip), so its gradient is that of FWMWrite. Per position t:
 *   r_t = W_{t-1} k_t,  u_t = b_t (v_t - r_t),  c_t = 1 / max(1, sqrt(n'_t)),
 *   W_t = c_t (W_{t-1} + u_t k_t^T),
 * the update of row e fused with the next position's read of it. */

/* The backward carries <dW, W_t> while a bound on its rounding error's part of a position's
 * gradient stays within this many rounding units of the gradient, and sums it afresh otherwise. */
#ifndef FWM_X_TOLERANCE
#define FWM_X_TOLERANCE 64
#endif

/* The lanes of one accumulator summed as a balanced tree (a fixed order on every machine). */
static inline __attribute__((always_inline)) T NAME(lanes_sum)(NAME(vec) s) {
    T x[sizeof(NAME(vec)) / sizeof(T)];
    long n = (long)(sizeof(NAME(vec)) / sizeof(T));
    for (long i = 0; i < n; ++i) x[i] = s[i];
    for (; n > 1; n /= 2)
        for (long i = 0; i < n / 2; ++i) x[i] = x[i] + x[i + n / 2];
    return x[0];
}

/* Relative rounding error of one operation in T, and |x|. */
static inline __attribute__((always_inline)) T NAME(fwm_eps)(void) {
    return sizeof(T) == sizeof(float) ? (T)0x1p-24 : (T)0x1p-53;
}
static inline __attribute__((always_inline)) T NAME(abs)(T x) { return x < 0 ? -x : x; }

/* W = c (P + u k^T) (P may be W itself), and (knext non-NULL) rnext = W knext with the new rows.
 * Rows go four at a time (four independent sums in flight), the rest one by one. */
static inline __attribute__((always_inline))
void NAME(fwm_update)(long Dv, long Dk, const T *P, T *W, const T *u, const T *k, T c,
                      const T *knext, T *rnext) {
    const long lanes = (long)(sizeof(NAME(vec)) / sizeof(T));
    long e = 0;
    for (; e + 4 <= Dv; e += 4) {
        T *row = W + e * Dk;
        const T *src = P + e * Dk;
        const T uq[4] = {u[e], u[e + 1], u[e + 2], u[e + 3]};
        NAME(vec) acc[4] = {{0}, {0}, {0}, {0}};
        long j = 0;
        /* Loads taken once before the stores (the may_alias vectors would reload them). */
        if (knext)
            for (; j + lanes <= Dk; j += lanes) {
                const NAME(vec) kj = *(const NAME(vec) *)(k + j);
                const NAME(vec) kn = *(const NAME(vec) *)(knext + j);
                for (int q = 0; q < 4; ++q) {
                    const NAME(vec) w = c * (*(const NAME(vec) *)(src + q * Dk + j) + uq[q] * kj);
                    *(NAME(vec) *)(row + q * Dk + j) = w;
                    acc[q] += w * kn;
                }
            }
        else
            for (; j + lanes <= Dk; j += lanes) {
                const NAME(vec) kj = *(const NAME(vec) *)(k + j);
                for (int q = 0; q < 4; ++q) {
                    *(NAME(vec) *)(row + q * Dk + j) =
                        c * (*(const NAME(vec) *)(src + q * Dk + j) + uq[q] * kj);
                }
            }
        T tail[4] = {0, 0, 0, 0};
        for (; j < Dk; ++j)
            for (int q = 0; q < 4; ++q) {
                T *x = row + q * Dk + j;
                *x = c * (src[q * Dk + j] + uq[q] * k[j]);
                if (knext) tail[q] += *x * knext[j];
            }
        if (knext)
            for (int q = 0; q < 4; ++q) rnext[e + q] = NAME(lanes_sum)(acc[q]) + tail[q];
    }
    for (; e < Dv; ++e) {
        T *row = W + e * Dk;
        const T *src = P + e * Dk, ue = u[e];
        NAME(vec) acc = {0};
        long j = 0;
        for (; j + lanes <= Dk; j += lanes) {
            const NAME(vec) w = c * (*(const NAME(vec) *)(src + j) + ue * *(const NAME(vec) *)(k + j));
            *(NAME(vec) *)(row + j) = w;
            if (knext) acc += w * *(const NAME(vec) *)(knext + j);
        }
        T tail = 0;
        for (; j < Dk; ++j) {
            row[j] = c * (src[j] + ue * k[j]);
            if (knext) tail += row[j] * knext[j];
        }
        if (knext) rnext[e] = NAME(lanes_sum)(acc) + tail;
    }
}

/* Pass 1 of a backward position: a = dW k and eu = dW^T u. Rows four at a time, their eu terms
 * added as (0 + 1) + (2 + 3) before eu. */
static inline __attribute__((always_inline))
void NAME(fwm_pass1)(long Dv, long Dk, const T *dW, const T *k, const T *u, T *a, T *eu) {
    const long lanes = (long)(sizeof(NAME(vec)) / sizeof(T));
    memset(eu, 0, sizeof(T) * Dk);
    long e = 0;
    for (; e + 4 <= Dv; e += 4) {
        const T *g = dW + e * Dk, ue[4] = {u[e], u[e + 1], u[e + 2], u[e + 3]};
        NAME(vec) sa[4] = {{0}, {0}, {0}, {0}};
        long j = 0;
        for (; j + lanes <= Dk; j += lanes) {
            const NAME(vec) kj = *(const NAME(vec) *)(k + j);
            NAME(vec) x[4];
            for (int q = 0; q < 4; ++q) {
                x[q] = *(const NAME(vec) *)(g + q * Dk + j);
                sa[q] += x[q] * kj;
            }
            *(NAME(vec) *)(eu + j) += (ue[0] * x[0] + ue[1] * x[1]) + (ue[2] * x[2] + ue[3] * x[3]);
        }
        T ta[4] = {0, 0, 0, 0};
        for (; j < Dk; ++j) {
            for (int q = 0; q < 4; ++q) ta[q] += g[q * Dk + j] * k[j];
            eu[j] += (ue[0] * g[j] + ue[1] * g[Dk + j]) + (ue[2] * g[2 * Dk + j] + ue[3] * g[3 * Dk + j]);
        }
        for (int q = 0; q < 4; ++q) a[e + q] = NAME(lanes_sum)(sa[q]) + ta[q];
    }
    for (; e < Dv; ++e) {
        const T *g = dW + e * Dk, ue = u[e];
        NAME(vec) sa = {0};
        long j = 0;
        for (; j + lanes <= Dk; j += lanes) {
            const NAME(vec) x = *(const NAME(vec) *)(g + j);
            sa += x * *(const NAME(vec) *)(k + j);
            *(NAME(vec) *)(eu + j) += ue * x;
        }
        T ta = 0;
        for (; j < Dk; ++j) {
            ta += g[j] * k[j];
            eu[j] += ue * g[j];
        }
        a[e] = NAME(lanes_sum)(sa) + ta;
    }
}

/* Pass 2 of a backward position: kb += Wp^T rb, dW <- c dW + rb k^T; with `inner` (a constant
 * at each call) also returns <dW, Wp> with the new dW (per row, then the rows in order), else 0.
 * Rows four at a time, their kb terms added as (0 + 1) + (2 + 3) before kb. */
static inline __attribute__((always_inline))
T NAME(fwm_pass2)(long Dv, long Dk, T *dW, const T *Wp, const T *k, const T *rb, T c, T *kb,
                  const int inner_wanted) {
    const long lanes = (long)(sizeof(NAME(vec)) / sizeof(T));
    T inner = 0;
    long e = 0;
    for (; e + 4 <= Dv; e += 4) {
        T *g = dW + e * Dk;
        const T *p = Wp + e * Dk, re[4] = {rb[e], rb[e + 1], rb[e + 2], rb[e + 3]};
        NAME(vec) ss[4] = {{0}, {0}, {0}, {0}};
        long j = 0;
        for (; j + lanes <= Dk; j += lanes) {
            const NAME(vec) kj = *(const NAME(vec) *)(k + j);
            NAME(vec) y[4], x[4];
            for (int q = 0; q < 4; ++q) {
                const NAME(vec) pq = *(const NAME(vec) *)(p + q * Dk + j);
                y[q] = re[q] * pq;
                x[q] = c * *(const NAME(vec) *)(g + q * Dk + j) + re[q] * kj;
                if (inner_wanted) ss[q] += x[q] * pq;
            }
            *(NAME(vec) *)(kb + j) += (y[0] + y[1]) + (y[2] + y[3]);
            for (int q = 0; q < 4; ++q) *(NAME(vec) *)(g + q * Dk + j) = x[q];
        }
        T ts[4] = {0, 0, 0, 0};
        for (; j < Dk; ++j) {
            kb[j] += (re[0] * p[j] + re[1] * p[Dk + j]) + (re[2] * p[2 * Dk + j] + re[3] * p[3 * Dk + j]);
            for (int q = 0; q < 4; ++q) {
                g[q * Dk + j] = c * g[q * Dk + j] + re[q] * k[j];
                if (inner_wanted) ts[q] += g[q * Dk + j] * p[q * Dk + j];
            }
        }
        if (inner_wanted)
            for (int q = 0; q < 4; ++q) inner += NAME(lanes_sum)(ss[q]) + ts[q];
    }
    for (; e < Dv; ++e) {
        T *g = dW + e * Dk;
        const T *p = Wp + e * Dk, re = rb[e];
        NAME(vec) ss = {0};
        long j = 0;
        for (; j + lanes <= Dk; j += lanes) {
            NAME(vec) *x = (NAME(vec) *)(g + j);
            const NAME(vec) pj = *(const NAME(vec) *)(p + j);
            *(NAME(vec) *)(kb + j) += re * pj;
            const NAME(vec) w = c * *x + re * *(const NAME(vec) *)(k + j);
            *x = w;
            if (inner_wanted) ss += w * pj;
        }
        T ts = 0;
        for (; j < Dk; ++j) {
            kb[j] += re * p[j];
            g[j] = c * g[j] + re * k[j];
            if (inner_wanted) ts += g[j] * p[j];
        }
        if (inner_wanted) inner += NAME(lanes_sum)(ss) + ts;
    }
    return inner;
}

/* <G, W_L> for the last position's update W_L = c (P + u k^T) (written to W; P = W_{L-1}, may be
 * W): per row, then the rows in order. */
static inline __attribute__((always_inline))
T NAME(fwm_update_dot)(long Dv, long Dk, const T *P, T *W, const T *u, const T *k, T c,
                       const T *G) {
    T total = 0;
    for (long e = 0; e < Dv; ++e) {
        T *row = W + e * Dk;
        for (long j = 0; j < Dk; ++j) row[j] = c * (P[e * Dk + j] + u[e] * k[j]);
        total += NAME(dot)(row, G + e * Dk, Dk);
    }
    return total;
}

/* One position's scalars from its read r: u (out), and the clip factor; norm updated. */
static inline __attribute__((always_inline))
T NAME(fwm_position)(long Dv, const T *r, const T *v, T bt, T hk, int opens, T *norm, T *u,
                     T *n_pre) {
    for (long e = 0; e < Dv; ++e) u[e] = (v[e] - r[e]) * bt;
    const T np = *norm + 2 * (NAME(dot)(u, r, Dv) + hk * NAME(dot)(u, u, Dv));
    *n_pre = np;
    if (opens) {
        *norm = np;
        return 1;
    }
    *norm = np >= 1 ? 1 : np;             /* written so that a NaN norm stays NaN, as clamp */
    return np <= 1 ? 1 : 1 / (T)sqrt(np);
}

/* Forward. In: k [B,L,Dk], values V [B,L,Dv] or (V NULL) one-hot ids [B,L], b [B,L].
 * Out: W [B,Dv,Dk] (the final state, transposed) and, if rs is not NULL, what the backward reads:
 * rs, us [B,L,Dv] (r_t, u_t), nps, cs [B,L] (n'_t, c_t). scratch: 3 Dv elements.
 * Sequences b0..b1-1 only. Returns 0, or 1 (nothing written) if an id is outside 0..Dv-1. */
WIDE_VECTOR_CLONES
int NAME(fwm_sequential_forward)(long b0, long b1, long L, long Dk, long Dv, const T *k,
                                 const T *V, const int64_t *ids, const T *b, T *W, T *rs, T *us,
                                 T *nps, T *cs, T *scratch) {
    FLUSH_DENORMALS;
    if (NAME(bad_ids)(ids ? ids + b0 * L : NULL, (b1 - b0) * L, Dv)) return 1;
    T *vrow = scratch + 2 * Dv;
    memset(vrow, 0, sizeof(T) * Dv);
    for (long i = b0; i < b1; ++i) {
        const T *ki = k + i * L * Dk, *Vi = V ? V + i * L * Dv : NULL, *bi = b + i * L;
        const int64_t *idi = ids ? ids + i * L : NULL;
        T *Wi = W + i * Dv * Dk, norm = 0, np, c;
        memset(Wi, 0, sizeof(T) * Dv * Dk);
        /* r and u of position t: kept (rs) or in scratch, each row overwritten by the next */
        T *r = rs ? rs + i * L * Dv : scratch, *u = rs ? us + i * L * Dv : scratch + Dv;
        const long step = rs ? Dv : 0;
        memset(r, 0, sizeof(T) * Dv);
        for (long t = 0; t < L; ++t, r += step, u += step) {
            const T *kt = ki + t * Dk, *vt = NAME(value_row)(Vi, idi, t, Dv, vrow);
            const T hk = (T)0.5 * NAME(dot)(kt, kt, Dk);
            c = NAME(fwm_position)(Dv, r, vt, bi[t], hk, t == 0, &norm, u, &np);
            if (!Vi) vrow[idi[t]] = 0;
            if (rs) {
                nps[i * L + t] = np;
                cs[i * L + t] = c;
            }
            NAME(fwm_update)(Dv, Dk, Wi, Wi, u, kt, c, t + 1 < L ? kt + Dk : NULL, r + step);
        }
    }
    return 0;
}

/* Backward of fwm_sequential_forward for W_bar [B,Dv,Dk] (dLoss/dW_L), from the forward's rs, us,
 * nps, cs. Each sequence's states are built again from its u and c, the state at every C-th
 * position kept (checkpoints); then chunk by chunk from the end, the chunk's other states are
 * rebuilt from its checkpoint (the same floats as the forward's) and its positions taken in
 * reverse, with the adjoint dW of W_t:
 *   X    = <dW, W_t>, carried back or summed in pass 2 (see the loop),
 *   a    = dW k,  eu = dW^T u                                  (pass 1 over the rows)
 *   nb'  = nb [n' < 1] - c^2 / 2 [n' >= 1] X                    (the first write: nb)
 *   ub   = c a + 2 nb' (r + 2 hk u),   b_bar = ub . (v - r),   v_bar = b ub,
 *   rb   = -b ub + 2 nb' u,
 *   k_bar = c eu + 2 nb' |u|^2 k + W_{t-1}^T rb,   dW <- c dW + rb k^T   (pass 2), nb <- nb'.
 * Out: k_bar [B,L,Dk], b_bar [B,L], v_bar [B,L,Dv] (dense values only; NULL: not wanted).
 * work: (ceil(L / C) + C + 1) Dv Dk + 4 Dv + Dk elements.
 * Returns 0, or 1 (nothing written) if an id is outside 0..Dv-1. */
WIDE_VECTOR_CLONES
int NAME(fwm_sequential_backward)(long b0, long b1, long L, long Dk, long Dv, long C,
                                  const T *k, const T *V, const int64_t *ids, const T *b,
                                  const T *rs_all, const T *us_all, const T *nps_all,
                                  const T *cs_all, const T *W_bar, T *k_bar, T *b_bar, T *v_bar,
                                  T *work) {
    FLUSH_DENORMALS;
    if (NAME(bad_ids)(ids ? ids + b0 * L : NULL, (b1 - b0) * L, Dv)) return 1;
    const long state = Dv * Dk;
    const long chunks = (L + C - 1) / C;
    T *checkpoints = work, *states = checkpoints + chunks * state, *dW = states + C * state;
    T *a = dW + state, *ub = a + Dv, *rb = ub + Dv, *vrow = rb + Dv, *eu = vrow + Dv;
    memset(vrow, 0, sizeof(T) * Dv);
    for (long i = b0; i < b1; ++i) {
        const T *ki = k + i * L * Dk, *Vi = V ? V + i * L * Dv : NULL, *bi = b + i * L;
        const int64_t *idi = ids ? ids + i * L : NULL;
        const T *rs = rs_all + i * L * Dv, *us = us_all + i * L * Dv;
        const T *nps = nps_all + i * L, *cs = cs_all + i * L;
        T *kbi = k_bar + i * L * Dk, *bbi = b_bar + i * L;
        T *vbi = v_bar ? v_bar + i * L * Dv : NULL;
        /* The states again, those entering positions 0, C, 2C, ... written straight into the
         * checkpoints (the running state elsewhere in dW). */
        T *cur = checkpoints;
        memset(cur, 0, sizeof(T) * state);
        for (long t = 0; t + 1 < L; ++t) {
            T *next = (t + 1) % C == 0 ? checkpoints + ((t + 1) / C) * state : dW;
            NAME(fwm_update)(Dv, Dk, cur, next, us + t * Dv, ki + t * Dk, cs[t], NULL, NULL);
            cur = next;
        }
        /* X = <dW, W_t>: from the final state here, then carried (see below). */
        T X = NAME(fwm_update_dot)(Dv, Dk, cur, dW, us + (L - 1) * Dv, ki + (L - 1) * Dk,
                                   cs[L - 1], W_bar + i * state);
        memcpy(dW, W_bar + i * state, sizeof(T) * state);
        T nbar = 0, E = 0;
        for (long m = chunks - 1; m >= 0; --m) {
            const long t0 = m * C, t1 = t0 + C < L ? t0 + C : L;
            /* The chunk's states: W_{t0-1} is its checkpoint, the others rebuilt from it. */
            for (long t = t0; t + 1 < t1; ++t)
                NAME(fwm_update)(Dv, Dk, t == t0 ? checkpoints + m * state : states + (t - t0) * state,
                                 states + (t - t0 + 1) * state, us + t * Dv, ki + t * Dk, cs[t],
                                 NULL, NULL);
            for (long t = t1 - 1; t >= t0; --t) {
                const T *Wp = t == t0 ? checkpoints + m * state : states + (t - t0) * state;
                const T *kt = ki + t * Dk;
                const T *ut = us + t * Dv, *rt = rs + t * Dv, c = cs[t], bt = bi[t];
                NAME(fwm_pass1)(Dv, Dk, dW, kt, ut, a, eu);
                T nb;
                if (t == 0) nb = nbar;
                else nb = nps[t] < 1 ? nbar : -(T)0.5 * (c * c) * X;
                const T hk = (T)0.5 * NAME(dot)(kt, kt, Dk);
                const T *vt = NAME(value_row)(Vi, idi, t, Dv, vrow);
                T bb = 0;
                for (long e = 0; e < Dv; ++e) {
                    ub[e] = c * a[e] + 2 * nb * (rt[e] + 2 * hk * ut[e]);
                    rb[e] = -bt * ub[e] + 2 * nb * ut[e];
                    bb += ub[e] * (vt[e] - rt[e]);
                }
                if (!Vi) vrow[idi[t]] = 0;
                bbi[t] = bb;
                if (vbi)
                    for (long e = 0; e < Dv; ++e) vbi[t * Dv + e] = bt * ub[e];
                /* Pass 2: k_bar = c eu + 2 nb |u|^2 k + Wp^T rb, dW <- c dW + rb k^T. */
                T *kb = kbi + t * Dk;
                const T su = 2 * nb * NAME(dot)(ut, ut, Dv);
                for (long j = 0; j < Dk; ++j) kb[j] = c * eu[j] + su * kt[j];
                /* X_{t-1} = X - c u . a + rb . r (dW_{t-1} = c dW + rb k^T, r = W_{t-1} k) costs
                 * nothing, but its rounding error does not shrink as X and the gradients do
                 * through the clips. E bounds that error (from the terms' sizes); X is summed
                 * afresh in pass 2 when E's part of ub (E (r + 2 hk u), as nb' carries X)
                 * would pass FWM_X_TOLERANCE rounding units of ub's c a. */
                const T ca = c * NAME(dot)(ut, a, Dv), rr = NAME(dot)(rb, rt, Dv);
                const T carried = X - ca + rr;
                const T bound = E + NAME(fwm_eps)() * 2 * (NAME(abs)(X) + NAME(abs)(ca) + NAME(abs)(rr)
                                                        + NAME(abs)(carried));
                T ww = 0;
                for (long e = 0; e < Dv; ++e) {
                    const T we = rt[e] + 2 * hk * ut[e];
                    ww += we * we;
                }
                const T limit = (T)FWM_X_TOLERANCE * NAME(fwm_eps)() * c;
                if (bound * bound * ww > limit * limit * NAME(dot)(a, a, Dv)) {
                    X = NAME(fwm_pass2)(Dv, Dk, dW, Wp, kt, rb, c, kb, 1);
                    E = 0;
                } else {
                    NAME(fwm_pass2)(Dv, Dk, dW, Wp, kt, rb, c, kb, 0);
                    X = carried;
                    E = bound;
                }
                nbar = nb;
            }
        }
    }
    return 0;
}
