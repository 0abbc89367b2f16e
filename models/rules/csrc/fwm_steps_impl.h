/* One precision of the FWM steps: included by steps.c with T (float or double) and
 * NAME(x) (x suffixed with f32 or f64) defined. */

/* out[d] = sum_{s<n} w[s * w_stride] X[s * D + d] for d < D, summed over s in order from
 * zero (the floats of the plain loop `out[d] += w_s X_sd`), with a block of columns held in
 * vector registers across s instead of reloading and storing out[] once per row. */
typedef T NAME(vec) __attribute__((vector_size(32), aligned(sizeof(T)), may_alias));
static inline __attribute__((always_inline))
void NAME(weighted_rows)(long n, long D, const T *w, long w_stride, const T *X, T *out) {
    const long lanes = (long)(sizeof(NAME(vec)) / sizeof(T));
    long d = 0;
    for (; d + 8 * lanes <= D; d += 8 * lanes) {
        NAME(vec) acc[8] = {{0}};
        for (long s = 0; s < n; ++s) {
            const T ws = w[s * w_stride];
            const NAME(vec) *x = (const NAME(vec) *)(X + s * D + d);
            for (int i = 0; i < 8; ++i) acc[i] += ws * x[i];
        }
        for (int i = 0; i < 8; ++i) ((NAME(vec) *)(out + d))[i] = acc[i];
    }
    for (; d + lanes <= D; d += lanes) {
        NAME(vec) acc = {0};
        for (long s = 0; s < n; ++s) acc += w[s * w_stride] * *(const NAME(vec) *)(X + s * D + d);
        *(NAME(vec) *)(out + d) = acc;
    }
    for (; d < D; ++d) {
        T acc = 0;
        for (long s = 0; s < n; ++s) acc += w[s * w_stride] * X[s * D + d];
        out[d] = acc;
    }
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

/* Forward. In: G [B,C,C] (K K^T), R0 [B,C,D] or NULL, values V [B,C,D] or (V NULL) one-hot
 * ids [B,C] in 0..D-1, b [B,C], n [B] (in/out), first (1: the chunk opens the sequence; its
 * first write is not clipped). Out: hk [B,C] (G_tt / 2), E [B,C,C] (E_ts, s < t; 1 on the
 * diagonal, 0 above), w [B,C,C] (G_ts E_ts, s < t), U [B,C,D], r [B,C,D], n_pre [B,C],
 * c [B,C], g [B,C] and d [B,C] (prod_{j >= s} c_j, taken from the end). scratch: D elements.
 * Returns 0, or 1 (nothing written) if an id is outside 0..D-1. */
VECTOR_CLONES
int NAME(fwm_forward)(long B, long C, long D, const T *G, const T *R0, const T *V,
                      const int64_t *ids, const T *b, T *n, int first, T *hk, T *E, T *w, T *U,
                      T *r, T *n_pre, T *c, T *g, T *d, T *scratch) {
    if (NAME(bad_ids)(ids, B * C, D)) return 1;
    memset(scratch, 0, sizeof(T) * D);
    for (long i = 0; i < B; ++i) {
        const T *Gi = G + i * C * C, *Vi = V ? V + i * C * D : NULL, *bi = b + i * C;
        const int64_t *idi = ids ? ids + i * C : NULL;
        T *hki = hk + i * C, *di = d + i * C;
        const T *R0i = R0 ? R0 + i * C * D : NULL;
        T *Ei = E + i * C * C, *wi = w + i * C * C, *Ui = U + i * C * D, *ri = r + i * C * D;
        T *npi = n_pre + i * C, *ci = c + i * C, *gi = g + i * C;
        T norm = n[i];
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
            if (R0i) {
                const T gt = gi[t], *R0t = R0i + t * D;
                for (long d = 0; d < D; ++d) rt[d] += R0t[d] * gt;
            }
            const T bt = bi[t], *Vt = NAME(value_row)(Vi, idi, t, D, scratch);
            for (long e = 0; e < D; ++e) ut[e] = (Vt[e] - rt[e]) * bt;
            if (!Vi) scratch[idi[t]] = 0;
            /* n' = n + 2 u.r + |k|^2 |u|^2 */
            const T np = norm + 2 * (NAME(dot)(ut, rt, D) + hki[t] * NAME(dot)(ut, ut, D));
            npi[t] = np;
            if (first && t == 0) {
                ci[t] = 1;
                norm = np;
            } else {                 /* written so that a NaN norm stays NaN, as clamp does */
                ci[t] = np <= 1 ? 1 : 1 / (T)sqrt(np);
                norm = np >= 1 ? 1 : np;
            }
        }
        n[i] = norm;
        for (long t = C - 1; t >= 0; --t) di[t] = t == C - 1 ? ci[t] : di[t + 1] * ci[t];
    }
    return 0;
}

/* Backward of one chunk (see FWMWrite's docstring), with the chunk's per-position terms that
 * need no matrix product. In: Z [B,C,D] (K S_out_bar), d [B,C], s0dot [B] (<S_out_bar, S_0>;
 * NULL for the sequence's first chunk), hk, n_pre, c [B,C], first, w [B,C,C], U, r [B,C,D],
 * values V [B,C,D] or (V NULL) one-hot ids [B,C], b [B,C], n_bar [B] (in/out).
 * Out: U_bar, R_bar [B,C,D], diag (nb' |u|^2), b_bar [B,C]. scratch: 2 D + C elements.
 * Returns 0, or 1 (nothing written) if an id is outside 0..D-1.
 * Reverse over j, with the rows rb_t (t > j) already known:
 *   low_j = [n'_j < 1], clip_j = c_j^2 / 2 [n'_j >= 1] (first write: 1 and 0),
 *   cd_j = sum_{s <= j} d_s (Z_s . U_s) (+ s0dot at s = 0),
 *   nb'_j = nb_j low_j - clip_j (cd_j + Phi_j),
 *   ub_j = d_j Z_j + nb'_j 2 (r_j + 2 hk_j u_j) + sum_{t>j} w_tj rb_t,
 *   rb_j = -b_j ub_j + 2 nb'_j u_j,   b_bar_j = ub_j . (v_j - r_j). */
VECTOR_CLONES
int NAME(fwm_backward)(long B, long C, long D, const T *Z, const T *d, const T *s0dot,
                       const T *hk, const T *n_pre, const T *c, int first, const T *w,
                       const T *U, const T *r, const T *V, const int64_t *ids, const T *b,
                       T *n_bar, T *U_bar, T *R_bar, T *diag, T *b_bar, T *scratch) {
    if (NAME(bad_ids)(ids, B * C, D)) return 1;
    T *ub_reads = scratch, *vrow = scratch + D, *cd = scratch + 2 * D;
    memset(vrow, 0, sizeof(T) * D);
    for (long i = 0; i < B; ++i) {
        const T *Zi = Z + i * C * D, *di = d + i * C, *hki = hk + i * C, *npi = n_pre + i * C;
        const T *ci = c + i * C, *wi = w + i * C * C, *Ui = U + i * C * D, *ri = r + i * C * D;
        const T *Vi = V ? V + i * C * D : NULL, *bi = b + i * C;
        const int64_t *idi = ids ? ids + i * C : NULL;
        T *Ubi = U_bar + i * C * D, *Rbi = R_bar + i * C * D;
        T *diagi = diag + i * C, *bbi = b_bar + i * C;
        T acc = 0;
        for (long j = 0; j < C; ++j) {
            T dbar = NAME(dot)(Zi + j * D, Ui + j * D, D);
            if (j == 0 && s0dot) dbar += s0dot[i];
            acc += dbar * di[j];
            cd[j] = acc;
        }
        T nbar = n_bar[i], phi = 0;
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
        n_bar[i] = nbar;
    }
    return 0;
}
