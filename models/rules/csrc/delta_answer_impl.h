/* One precision of the delta rule's backward-carried query: included by steps.c with T
 * (float or double) and NAME(x) (x suffixed with f32 or f64) defined.
 *
 * Per sequence, with the query block h (D x Q, column-major per query) starting at q:
 *     for t = L-1 .. 0:   z_t = k_t . h,   w_t = beta_t z_t,   h <- h - w_t k_t
 * w [L, Q] are the answers' weights (y = sum_t w_t v_t). The h before each step is kept for the
 * backward (hs [L, Q, D]). */

/* In: q [B,Q,D], k [B,L,D], beta [B,L]. Out: w [B,L,Q], z [B,L,Q], hs [B,L,Q,D]; h [Q,D] scratch. */
VECTOR_CLONES
void NAME(delta_answer_forward)(long B, long L, long Q, long D, const T *q, const T *k,
                                const T *beta, T *w, T *z, T *hs, T *h) {
    FLUSH_DENORMALS;
    for (long i = 0; i < B; ++i) {
        const T *ki = k + i * L * D, *bi = beta + i * L;
        T *wi = w + i * L * Q, *zi = z + i * L * Q, *hsi = hs + i * L * Q * D;
        memcpy(h, q + i * Q * D, sizeof(T) * Q * D);
        for (long t = L - 1; t >= 0; --t) {
            const T *kt = ki + t * D;
            memcpy(hsi + t * Q * D, h, sizeof(T) * Q * D);
            for (long j = 0; j < Q; ++j) {
                T *hj = h + j * D;
                const T zt = NAME(dot)(kt, hj, D), wt = bi[t] * zt;
                zi[t * Q + j] = zt;
                wi[t * Q + j] = wt;
                for (long d = 0; d < D; ++d) hj[d] -= wt * kt[d];
            }
        }
    }
}

/* Backward of the forward above, forward in t. In: dw [B,L,Q], k, beta, z, hs as saved.
 * Out: dq [B,Q,D], dk [B,L,D], dbeta [B,L]; dh [Q,D] scratch.
 *     h_t = h_{t+1} - w_t k_t:  dh_{t+1} += dh_t,  dw_t -= k_t . dh_t,  dk_t -= w_t dh_t
 *     w_t = beta_t z_t:         dz_t = beta_t dw_t,  dbeta_t += z_t dw_t
 *     z_t = k_t . h_{t+1}:      dk_t += dz_t h_{t+1},  dh_{t+1} += dz_t k_t */
VECTOR_CLONES
void NAME(delta_answer_backward)(long B, long L, long Q, long D, const T *dw, const T *k,
                                 const T *beta, const T *z, const T *hs, T *dq, T *dk,
                                 T *dbeta, T *dh) {
    FLUSH_DENORMALS;
    for (long i = 0; i < B; ++i) {
        const T *ki = k + i * L * D, *bi = beta + i * L, *dwi = dw + i * L * Q;
        const T *zi = z + i * L * Q, *hsi = hs + i * L * Q * D;
        T *dki = dk + i * L * D, *dbi = dbeta + i * L;
        memset(dh, 0, sizeof(T) * Q * D);
        for (long t = 0; t < L; ++t) {
            const T *kt = ki + t * D, *ht = hsi + t * Q * D;
            T *dkt = dki + t * D, db = 0;
            for (long d = 0; d < D; ++d) dkt[d] = 0;
            for (long j = 0; j < Q; ++j) {
                T *dhj = dh + j * D;
                const T *hj = ht + j * D;
                const T wt = bi[t] * zi[t * Q + j];
                const T dwt = dwi[t * Q + j] - NAME(dot)(kt, dhj, D);
                const T dzt = bi[t] * dwt;
                db += zi[t * Q + j] * dwt;
                for (long d = 0; d < D; ++d) {
                    dkt[d] += dzt * hj[d] - wt * dhj[d];
                    dhj[d] += dzt * kt[d];
                }
            }
            dbi[t] = db;
        }
        memcpy(dq + i * Q * D, dh, sizeof(T) * Q * D);
    }
}
