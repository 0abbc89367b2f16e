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

/* Forward. In: G [B,C,C], hk [B,C], R0 [B,C,D] or NULL, V [B,C,D], b [B,C], n [B] (in/out),
 * first (1: the chunk opens the sequence; its first write is not clipped).
 * Out: E [B,C,C] (E_ts, s < t; 1 on the diagonal, 0 above), w [B,C,C] (G_ts E_ts, s < t),
 * U [B,C,D], r [B,C,D], n_pre [B,C], c [B,C], g [B,C]. */
VECTOR_CLONES
void NAME(fwm_forward)(long B, long C, long D, const T *G, const T *hk, const T *R0,
                       const T *V, const T *b, T *n, int first, T *E, T *w, T *U, T *r,
                       T *n_pre, T *c, T *g) {
    for (long i = 0; i < B; ++i) {
        const T *Gi = G + i * C * C, *hki = hk + i * C, *Vi = V + i * C * D, *bi = b + i * C;
        const T *R0i = R0 ? R0 + i * C * D : NULL;
        T *Ei = E + i * C * C, *wi = w + i * C * C, *Ui = U + i * C * D, *ri = r + i * C * D;
        T *npi = n_pre + i * C, *ci = c + i * C, *gi = g + i * C;
        T norm = n[i];
        memset(Ei, 0, sizeof(T) * C * C);
        memset(wi, 0, sizeof(T) * C * C);
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
            const T bt = bi[t], *Vt = Vi + t * D;
            for (long d = 0; d < D; ++d) ut[d] = (Vt[d] - rt[d]) * bt;
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
    }
}

/* Backward, reverse over positions j (see FWMWrite's docstring). In: Ubd [B,C,D] (the chunk
 * output's part of U's adjoint), wn [B,C,D] (d n'/d u), w [B,C,C], U, r [B,C,D], b, low, clip,
 * cd [B,C], n_bar [B] (in/out). Out: R_bar, U_bar [B,C,D], nb_all [B,C]. ub_reads [D] scratch. */
VECTOR_CLONES
void NAME(fwm_backward)(long B, long C, long D, const T *Ubd, const T *wn, const T *w,
                        const T *U, const T *r, const T *b, const T *low, const T *clip,
                        const T *cd, T *n_bar, T *R_bar, T *U_bar, T *nb_all, T *ub_reads) {
    for (long i = 0; i < B; ++i) {
        const T *Ubdi = Ubd + i * C * D, *wni = wn + i * C * D, *wi = w + i * C * C;
        const T *Ui = U + i * C * D, *ri = r + i * C * D, *bi = b + i * C;
        const T *lowi = low + i * C, *clipi = clip + i * C, *cdi = cd + i * C;
        T *Rbi = R_bar + i * C * D, *Ubi = U_bar + i * C * D, *nbi = nb_all + i * C;
        T nbar = n_bar[i], phi = 0;
        for (long j = C - 1; j >= 0; --j) {
            const T nb = nbar * lowi[j] - clipi[j] * (cdi[j] + phi);
            const T *Uj = Ui + j * D, *rj = ri + j * D, *wnj = wni + j * D, *Ubdj = Ubdi + j * D;
            T *ub = Ubi + j * D, *rb = Rbi + j * D;
            /* sum_{t>j} w_tj rb_t */
            NAME(weighted_rows)(C - 1 - j, D, wi + (j + 1) * C + j, C, Rbi + (j + 1) * D, ub_reads);
            const T bj = bi[j];
            for (long d = 0; d < D; ++d) {
                ub[d] = Ubdj[d] + wnj[d] * nb + ub_reads[d];
                rb[d] = -bj * ub[d] + 2 * nb * Uj[d];
            }
            phi = phi - NAME(dot)(Uj, ub_reads, D) + NAME(dot)(rb, rj, D);
            nbi[j] = nb;
            nbar = nb;
        }
        n_bar[i] = nbar;
    }
}
