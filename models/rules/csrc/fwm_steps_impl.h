/* One precision of the FWM write's per-position steps within a chunk, one sequence at a time
 * (fwm_chunked_impl.h runs them between the chunk's products; their PyTorch twins are
 * forward_steps_torch and backward_steps_torch in models/rules/fwm.py): included by steps.c
 * with T (float or double) and NAME(x) (x suffixed with f32 or f64) defined. */

/* out[d] = sum_{s<n} w[s * w_stride] X[s * D + d] for d < D, summed over s in order from
 * zero (the floats of the plain loop `out[d] += w_s X_sd`), with a block of columns held in
 * registers across s instead of reloading and storing out[] once per row. Every pass over s
 * keeps several independent sums, so no column waits on one add chain after another: blocks of
 * 8 vectors, then of 4, then what is left (up to 3 vectors, a 4-wide and 3 single columns) in
 * one pass. */
typedef T NAME(vec) __attribute__((vector_size(32), aligned(sizeof(T)), may_alias));
static inline __attribute__((always_inline))
void NAME(weighted_rows)(long n, long D, const T *w, long w_stride, const T *X, T *out) {
    typedef NAME(vec) V;
    typedef NAME(quad) Q;
    const long lanes = (long)(sizeof(V) / sizeof(T));
    long d = 0;
    for (; d + 8 * lanes <= D; d += 8 * lanes) {
        V acc[8] = {{0}};
        for (long s = 0; s < n; ++s) {
            const T ws = w[s * w_stride];
            const V *x = (const V *)(X + s * D + d);
            for (int i = 0; i < 8; ++i) acc[i] += ws * x[i];
        }
        for (int i = 0; i < 8; ++i) ((V *)(out + d))[i] = acc[i];
    }
    for (; d + 4 * lanes <= D; d += 4 * lanes) {
        V acc[4] = {{0}};
        for (long s = 0; s < n; ++s) {
            const T ws = w[s * w_stride];
            const V *x = (const V *)(X + s * D + d);
            for (int i = 0; i < 4; ++i) acc[i] += ws * x[i];
        }
        for (int i = 0; i < 4; ++i) ((V *)(out + d))[i] = acc[i];
    }
    if (d == D) return;
    /* the rest: nv < 4 vectors, then nq (0 or 1) 4-wide and ns < 4 single columns */
    const long nv = (D - d) / lanes, nq = (D - d - nv * lanes) / 4, ns = (D - d) % 4;
    V a0 = {0}, a1 = {0}, a2 = {0};
    Q q = {0};
    T s0 = 0, s1 = 0, s2 = 0;
    for (long s = 0; s < n; ++s) {
        const T ws = w[s * w_stride], *x = X + s * D + d;
        if (nv > 0) a0 += ws * *(const V *)x;
        if (nv > 1) a1 += ws * *(const V *)(x + lanes);
        if (nv > 2) a2 += ws * *(const V *)(x + 2 * lanes);
        x += nv * lanes;
        if (nq) q += ws * *(const Q *)x;
        x += nq * 4;
        if (ns > 0) s0 += ws * x[0];
        if (ns > 1) s1 += ws * x[1];
        if (ns > 2) s2 += ws * x[2];
    }
    T *o = out + d;
    if (nv > 0) *(V *)o = a0;
    if (nv > 1) *(V *)(o + lanes) = a1;
    if (nv > 2) *(V *)(o + 2 * lanes) = a2;
    o += nv * lanes;
    if (nq) *(Q *)o = q;
    o += nq * 4;
    if (ns > 0) o[0] = s0;
    if (ns > 1) o[1] = s1;
    if (ns > 2) o[2] = s2;
}

/* out[j] = dot(A + j D, B + j D, D) for j < n (dot()'s floats), four rows at a time: four
 * independent add chains where one row alone waits on its own. */
static inline __attribute__((always_inline))
void NAME(row_dots)(long n, long D, const T *A, const T *B, T *out) {
    typedef NAME(quad) Q;
    long j = 0;
    for (; j + 4 <= n; j += 4) {
        const T *a = A + j * D, *b = B + j * D;
        Q s[4] = {{0}};
        long e = 0;
        for (; e + 4 <= D; e += 4)
            for (int i = 0; i < 4; ++i)
                s[i] += *(const Q *)(a + i * D + e) * *(const Q *)(b + i * D + e);
        for (int i = 0; i < 4; ++i) {
            T s0 = s[i][0];
            for (long f = e; f < D; ++f) s0 += a[i * D + f] * b[i * D + f];
            out[j + i] = (s0 + s[i][1]) + (s[i][2] + s[i][3]);
        }
    }
    for (; j < n; ++j) out[j] = NAME(dot)(A + j * D, B + j * D, D);
}

/* The value row v_t: V's row t, or with one-hot ids (V NULL) the one-hot row of id, built in
 * `row` (D elements, all zero on entry; the caller sets row[id] back to 0 after use): the same
 * floats as a dense one-hot V, without reading a [B,C,D] tensor. */
static inline const T *NAME(value_row)(const T *V, const int64_t *ids, long t, long D, T *row) {
    if (V) return V + t * D;
    row[ids[t]] = 1;
    return row;
}

/* 1 if an id is outside 0..D-1 (ids NULL: dense values), else 0. */
static inline int NAME(bad_ids)(const int64_t *ids, long count, long D) {
    if (ids)
        for (long j = 0; j < count; ++j)
            if (ids[j] < 0 || ids[j] >= D) return 1;
    return 0;
}

/* One sequence's forward steps over a chunk of C positions. In: Gi [C,C] (K K^T), R0i [C,D]
 * (K S_0) or NULL (the sequence's first chunk), values Vi [C,D] or (Vi NULL) one-hot ids idi
 * [C] in 0..D-1, bi [C], *norm_io (||S_0||^2; in/out), first (1: the chunk opens the
 * sequence; its first write is not clipped). Out: hki [C] (G_tt / 2), Ei [C,C] (E_ts, s < t;
 * 1 on the diagonal, 0 above), wi [C,C] (G_ts E_ts, s < t), Ui [C,D], ri [C,D], npi [C]
 * (n'), ci [C], gi [C] and di [C] (prod_{j >= s} c_j, taken from the end).
 * scratch: D elements, all zero (left zero). */
static inline __attribute__((always_inline))
void NAME(fwm_forward_sequence)(long C, long D, const T *Gi, const T *R0i, const T *Vi,
                                const int64_t *idi, const T *bi, T *norm_io, int first, T *hki,
                                T *Ei, T *wi, T *Ui, T *ri, T *npi, T *ci, T *gi, T *di,
                                T *scratch) {
    T norm = *norm_io;
    memset(Ei, 0, sizeof(T) * C * C);
    memset(wi, 0, sizeof(T) * C * C);
    for (long t = 0; t < C; ++t) hki[t] = (T)0.5 * Gi[t * C + t];
    for (long t = 0; t < C; ++t) {
        T *Et = Ei + t * C, *wt = wi + t * C, *rt = ri + t * D, *ut = Ui + t * D;
        Et[t] = 1;
        if (t > 0) {                       /* r_t = sum_{s<t} w_ts u_s (+ g_t R0_t below) */
            const T *Ep = Ei + (t - 1) * C, cp = ci[t - 1];
            for (long s = 0; s < t; ++s) {
                Et[s] = Ep[s] * cp;
                wt[s] = Gi[t * C + s] * Et[s];
            }
            gi[t] = gi[t - 1] * cp;
        } else {
            gi[t] = 1;
        }
        NAME(weighted_rows)(t, D, wt, 1, Ui, rt);
        const T bt = bi[t], gt = R0i ? gi[t] : 0, *R0t = R0i ? R0i + t * D : rt;
        const T *Vt = NAME(value_row)(Vi, idi, t, D, scratch);
        /* One pass over the row: r (+= g R0), u = (v - r) b and the dots u . r and u . u as
         * independent 4-lane sums, in dot()'s order (lane e mod 4, the tail into lane 0, then
         * (s0 + s1) + (s2 + s3)): the floats of the separate loops. */
        NAME(quad) s_ur = {0, 0, 0, 0}, s_uu = {0, 0, 0, 0};
        long e = 0;
        for (; e + 4 <= D; e += 4) {
            NAME(quad) r = *(NAME(quad) *)(rt + e);
            if (R0i) r += *(const NAME(quad) *)(R0t + e) * gt;
            const NAME(quad) u = (*(const NAME(quad) *)(Vt + e) - r) * bt;
            *(NAME(quad) *)(rt + e) = r;
            *(NAME(quad) *)(ut + e) = u;
            s_ur += u * r;
            s_uu += u * u;
        }
        T t_ur = s_ur[0], t_uu = s_uu[0];
        for (; e < D; ++e) {
            if (R0i) rt[e] += R0t[e] * gt;
            ut[e] = (Vt[e] - rt[e]) * bt;
            t_ur += ut[e] * rt[e];
            t_uu += ut[e] * ut[e];
        }
        if (!Vi) scratch[idi[t]] = 0;
        /* n' = n + 2 u.r + |k|^2 |u|^2 */
        const T np = norm + 2 * (((t_ur + s_ur[1]) + (s_ur[2] + s_ur[3]))
                                 + hki[t] * ((t_uu + s_uu[1]) + (s_uu[2] + s_uu[3])));
        npi[t] = np;
        if (first && t == 0) {
            ci[t] = 1;
            norm = np;
        } else {                 /* written so that a NaN norm stays NaN, as clamp does */
            ci[t] = np <= 1 ? 1 : 1 / (T)sqrt(np);
            norm = np >= 1 ? 1 : np;
        }
    }
    *norm_io = norm;
    for (long t = C - 1; t >= 0; --t) di[t] = t == C - 1 ? ci[t] : di[t + 1] * ci[t];
}

/* One sequence's backward steps over a chunk (see FWMWrite's docstring): the chunk's
 * per-position terms that need no matrix product. In: Zi [C,D] (K S_out_bar), di [C], s0dot
 * (<S_out_bar, S_0>; NULL for the sequence's first chunk), hki, npi, ci [C], first, wi [C,C],
 * Ui, ri [C,D], values Vi [C,D] or (Vi NULL) one-hot ids idi [C], bi [C], *n_bar (in/out).
 * Out: Ubi, Rbi [C,D] (U_bar, R_bar), diagi (nb' |u|^2), bbi [C] (b_bar).
 * scratch: 2 D + C elements, its D..2D-1 all zero (left zero).
 * Reverse over j, with the rows rb_t (t > j) already known:
 *   low_j = [n'_j < 1], clip_j = c_j^2 / 2 [n'_j >= 1] (first write: 1 and 0),
 *   cd_j = sum_{s <= j} d_s (Z_s . U_s) (+ s0dot at s = 0),
 *   nb'_j = nb_j low_j - clip_j (cd_j + Phi_j),
 *   ub_j = d_j Z_j + nb'_j 2 (r_j + 2 hk_j u_j) + sum_{t>j} w_tj rb_t,
 *   rb_j = -b_j ub_j + 2 nb'_j u_j,   b_bar_j = ub_j . (v_j - r_j). */
static inline __attribute__((always_inline))
void NAME(fwm_backward_sequence)(long C, long D, const T *Zi, const T *di, const T *s0dot,
                                 const T *hki, const T *npi, const T *ci, int first,
                                 const T *wi, const T *Ui, const T *ri, const T *Vi,
                                 const int64_t *idi, const T *bi, T *n_bar, T *Ubi, T *Rbi,
                                 T *diagi, T *bbi, T *scratch) {
    T *ub_reads = scratch, *vrow = scratch + D, *cd = scratch + 2 * D;
    NAME(row_dots)(C, D, Zi, Ui, cd);                     /* d_bar, then its running sums */
    if (s0dot) cd[0] += *s0dot;
    T acc = 0;
    for (long j = 0; j < C; ++j) {
        acc += cd[j] * di[j];
        cd[j] = acc;
    }
    T nbar = *n_bar, phi = 0;
    for (long j = C - 1; j >= 0; --j) {
        const int opens = first && j == 0;      /* the sequence's first write: no clip */
        const T low = opens ? (T)1 : (T)(npi[j] < 1);
        const T clip = opens ? (T)0 : (T)0.5 * (ci[j] * ci[j]) * (T)(npi[j] >= 1);
        const T nb = nbar * low - clip * (cd[j] + phi);
        const T *Uj = Ui + j * D, *rj = ri + j * D, *Zj = Zi + j * D;
        const T *Vj = NAME(value_row)(Vi, idi, j, D, vrow);
        T *ub = Ubi + j * D, *rb = Rbi + j * D;
        /* sum_{t>j} w_tj rb_t */
        NAME(weighted_rows)(C - 1 - j, D, wi + (j + 1) * C + j, C, Rbi + (j + 1) * D, ub_reads);
        const T bj = bi[j], dj = di[j], hkj = hki[j];
        /* One pass over the row: ub, rb and the four dots (U . ub_reads, rb . r, U . U,
         * ub . (v - r)) as independent 4-lane sums, in dot()'s order (lane e mod 4, the
         * tail into lane 0, then (s0 + s1) + (s2 + s3)). */
        NAME(quad) s_ur = {0, 0, 0, 0}, s_rr = {0, 0, 0, 0}, s_uu = {0, 0, 0, 0},
                   s_bb = {0, 0, 0, 0};
        long e = 0;
        for (; e + 4 <= D; e += 4) {
            const NAME(quad) u = *(const NAME(quad) *)(Uj + e), rr = *(const NAME(quad) *)(rj + e);
            const NAME(quad) reads = *(const NAME(quad) *)(ub_reads + e);
            const NAME(quad) wn = 2 * (rr + 2 * u * hkj);              /* d n' / d u */
            const NAME(quad) ube = dj * *(const NAME(quad) *)(Zj + e) + wn * nb + reads;
            const NAME(quad) rbe = -bj * ube + 2 * nb * u;
            *(NAME(quad) *)(ub + e) = ube;
            *(NAME(quad) *)(rb + e) = rbe;
            s_ur += u * reads;
            s_rr += rbe * rr;
            s_uu += u * u;
            s_bb += ube * (*(const NAME(quad) *)(Vj + e) - rr);
        }
        T t_ur = s_ur[0], t_rr = s_rr[0], t_uu = s_uu[0], t_bb = s_bb[0];
        for (; e < D; ++e) {
            const T wn = 2 * (rj[e] + 2 * Uj[e] * hkj);
            ub[e] = dj * Zj[e] + wn * nb + ub_reads[e];
            rb[e] = -bj * ub[e] + 2 * nb * Uj[e];
            t_ur += Uj[e] * ub_reads[e];
            t_rr += rb[e] * rj[e];
            t_uu += Uj[e] * Uj[e];
            t_bb += ub[e] * (Vj[e] - rj[e]);
        }
        phi = phi - ((t_ur + s_ur[1]) + (s_ur[2] + s_ur[3]))
                  + ((t_rr + s_rr[1]) + (s_rr[2] + s_rr[3]));
        if (!Vi) vrow[idi[j]] = 0;
        bbi[j] = (t_bb + s_bb[1]) + (s_bb[2] + s_bb[3]);
        diagi[j] = nb * ((t_uu + s_uu[1]) + (s_uu[2] + s_uu[3]));
        nbar = nb;
    }
    *n_bar = nbar;
}
