/* One precision of DPFP-nu's kernel phi(q) . phi(k) without the features (models/feature_maps.py,
 * DPFP.kernel): included by steps.c with T and NAME(x) defined.
 *
 * With r(x) = relu([x; -x]) (W = 2 D wide) and p = r(q) * r(k) elementwise,
 *     phi(q) . phi(k) = sum_i p_i w_i,   w_i = sum_{j=1..nu} p_{(i-j) mod W}.
 * Backward: dK/dp_m = w_m + u_m with u_m = sum_{j=1..nu} p_{(m+j) mod W}; then through r's
 * relu (zero slope at 0, as PyTorch's relu) to q and k. p, w and u are recomputed in the
 * backward: nothing of width W per pair is stored. Every sum is in a fixed order. */

/* sum_i a[i] * b[i] in eight interleaved lanes, combined as a tree: a fixed order, and lanes a
 * vectorising compiler fills. */
static inline T NAME(dot8)(const T *a, const T *b, long n) {
    T acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    long i = 0;
    for (; i + 8 <= n; i += 8)
        for (int l = 0; l < 8; ++l) acc[l] += a[i + l] * b[i + l];
    for (int l = 0; i < n; ++i, ++l) acc[l] += a[i] * b[i];
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

/* r = relu([x; -x]); (x <= 0 ? 0 : x) keeps a NaN, as relu does. */
static inline void NAME(dpfp_relu)(const T *x, long D, T *r) {
    for (long i = 0; i < D; ++i) {
        const T a = x[i], b = -x[i];
        r[i] = a <= 0 ? (T)0 : a;
        r[D + i] = b <= 0 ? (T)0 : b;
    }
}

/* p = rq * rk into buf[nu .. nu + W), with buf[m] = p_{(m - nu) mod W} on both sides (width
 * W + 2 nu). Returns p. */
static inline T *NAME(dpfp_products)(const T *rq, const T *rk, long W, long nu, T *buf) {
    T *p = buf + nu;
    for (long i = 0; i < W; ++i) p[i] = rq[i] * rk[i];
    for (long m = 0; m < nu; ++m) {
        p[-1 - m] = p[((-1 - m) % W + W) % W];
        p[W + m] = p[m % W];
    }
    return p;
}

/* w_i = p_{i-1} + p_{i-2} + ... + p_{i-nu} (j ascending, as the PyTorch form adds the rolls),
 * from p with its halo. */
static inline T NAME(dpfp_w)(const T *p, long i, long nu) {
    T w = p[i - 1];
    for (long j = 2; j <= nu; ++j) w += p[i - j];
    return w;
}

/* phi(q) . phi(k) = sum_i p_i w_i for one pair, w written out first (a loop per shift, then
 * dot8: faster here than computing w inside the eight-lane dot). */
static inline T NAME(dpfp_pair)(const T *rq, const T *rk, long W, long nu, T *buf, T *w) {
    const T *p = NAME(dpfp_products)(rq, rk, W, nu, buf);
    for (long i = 0; i < W; ++i) w[i] = p[i - 1];
    for (long j = 2; j <= nu; ++j)
        for (long i = 0; i < W; ++i) w[i] += p[i - j];
    return NAME(dot8)(p, w, W);
}

/* One pair's backward in one loop: dp_m = g (w_m + u_m) with u_m = p_{m+1} + ... + p_{m+nu},
 * then drk += dp * rq, drq += dp * rk. Inlined with nu a constant where it is 1, 2 or 3
 * (below), so the loop vectorises: twice as fast as a loop per shift at nu = 3. */
static inline void NAME(dpfp_pair_grad)(const T *p, const T *rq, const T *rk, T g, long W,
                                        long nu, T *drq, T *drk) {
    for (long i = 0; i < W; ++i) {
        T dp = NAME(dpfp_w)(p, i, nu) + p[i + 1];
        for (long j = 2; j <= nu; ++j) dp += p[i + j];
        const T d = g * dp;
        drk[i] += d * rq[i];
        drq[i] += d * rk[i];
    }
}

/* Sequence b's row of K [B,Q,L]; its keys are rows of k [B,L,D], or, with k NULL, built as
 * A[a_bt] + C[c_bt] (gather_add_impl.h's lookup_row: the floats of the formed keys).
 * Scratch: (Q + 1) W + (W + 2 nu) + W + D. */
static inline void NAME(dpfp_kernel_sequence)(long b, long Q, long L, long D, long nu,
                                              const T *q, const T *k, const T *A,
                                              const int64_t *a, const T *C, const int64_t *c,
                                              T *K, T *scratch) {
    const long W = 2 * D;
    T *rq = scratch, *rk = rq + Q * W, *buf = rk + W, *w = buf + W + 2 * nu, *x = w + W;
    for (long j = 0; j < Q; ++j) NAME(dpfp_relu)(q + (b * Q + j) * D, D, rq + j * W);
    for (long t = 0; t < L; ++t) {
        const long bt = b * L + t;
        if (k == NULL) NAME(lookup_row)(A, a[bt], C, c[bt], D, x);
        NAME(dpfp_relu)(k != NULL ? k + bt * D : x, D, rk);
        for (long j = 0; j < Q; ++j)
            K[(b * Q + j) * L + t] = NAME(dpfp_pair)(rq + j * W, rk, W, nu, buf, w);
    }
}

/* In: q [B,Q,D], k [B,L,D]. Out: K [B,Q,L] for batch entries b0 <= b < b1. */
VECTOR_CLONES
void NAME(dpfp_kernel_forward)(long b0, long b1, long Q, long L, long D, long nu, const T *q,
                               const T *k, T *K, T *scratch) {
    FLUSH_DENORMALS;
    for (long b = b0; b < b1; ++b)
        NAME(dpfp_kernel_sequence)(b, Q, L, D, nu, q, k, NULL, NULL, NULL, NULL, K, scratch);
}

/* The same for keys given as two row lookups k_bt = A[a_bt] + C[c_bt] (A [NA, D], C [NC, D],
 * ids a, c [B, L]): DPFPProjectedKernel. Returns 0, or 1 (nothing written) if an id of the
 * range is outside its table. */
VECTOR_CLONES
int NAME(dpfp_projected_kernel_forward)(long b0, long b1, long Q, long L, long D, long nu,
                                        const T *q, const T *A, long NA, const int64_t *a,
                                        const T *C, long NC, const int64_t *c, T *K,
                                        T *scratch) {
    FLUSH_DENORMALS;
    if (NAME(ids_outside)((b1 - b0) * L, NA, a + b0 * L, NC, c + b0 * L)) return 1;
    for (long b = b0; b < b1; ++b)
        NAME(dpfp_kernel_sequence)(b, Q, L, D, nu, q, NULL, A, a, C, c, K, scratch);
    return 0;
}

/* d r -> d x through r = relu([x; -x]): dx_i = dr_i [x_i > 0] - dr_{D+i} [x_i < 0]. */
static inline void NAME(dpfp_relu_backward)(const T *x, const T *dr, long D, T *dx) {
    for (long i = 0; i < D; ++i) {
        /* both loads unconditional: selects, not branches (random signs mispredict) */
        const T xi = x[i], pos = dr[i], neg = dr[D + i];
        dx[i] = (xi > 0 ? pos : (T)0) - (-xi > 0 ? neg : (T)0);
    }
}

/* Sequence b's gradients: dq rows, and either dk rows ([B,L,D], keys from k) or, with k NULL,
 * each key's gradient added to dA[a_bt] and then dC[c_bt] (lookup_row_backward: the floats of
 * dk followed by gather_add_backward). dk sums over queries j ascending, dq over positions t
 * ascending. Scratch: 2 Q W + 2 W + (W + 2 nu) + 2 D. */
static inline void NAME(dpfp_kernel_sequence_backward)(long b, long Q, long L, long D, long nu,
                                                       const T *g, const T *q, const T *k,
                                                       const T *A, const int64_t *a,
                                                       const T *C, const int64_t *c, T *dq,
                                                       T *dk, T *dA, T *dC, T *scratch) {
    const long W = 2 * D;
    T *rq = scratch, *drq = rq + Q * W, *rk = drq + Q * W, *drk = rk + W;
    T *buf = drk + W, *x = buf + W + 2 * nu, *dx = x + D;
    for (long j = 0; j < Q; ++j) NAME(dpfp_relu)(q + (b * Q + j) * D, D, rq + j * W);
    for (long i = 0; i < Q * W; ++i) drq[i] = 0;
    for (long t = 0; t < L; ++t) {
        const long bt = b * L + t;
        if (k == NULL) NAME(lookup_row)(A, a[bt], C, c[bt], D, x);
        const T *key = k != NULL ? k + bt * D : x;
        NAME(dpfp_relu)(key, D, rk);
        for (long i = 0; i < W; ++i) drk[i] = 0;
        for (long j = 0; j < Q; ++j) {
            const T gj = g[(b * Q + j) * L + t], *rqj = rq + j * W;
            const T *p = NAME(dpfp_products)(rqj, rk, W, nu, buf);
            T *drqj = drq + j * W;
            switch (nu) {
            case 1: NAME(dpfp_pair_grad)(p, rqj, rk, gj, W, 1, drqj, drk); break;
            case 2: NAME(dpfp_pair_grad)(p, rqj, rk, gj, W, 2, drqj, drk); break;
            case 3: NAME(dpfp_pair_grad)(p, rqj, rk, gj, W, 3, drqj, drk); break;
            default: NAME(dpfp_pair_grad)(p, rqj, rk, gj, W, nu, drqj, drk);
            }
        }
        if (k != NULL) {
            NAME(dpfp_relu_backward)(key, drk, D, dk + bt * D);
        } else {
            NAME(dpfp_relu_backward)(key, drk, D, dx);
            NAME(lookup_row_backward)(dx, dA, a[bt], dC, c[bt], D);
        }
    }
    for (long j = 0; j < Q; ++j)
        NAME(dpfp_relu_backward)(q + (b * Q + j) * D, drq + j * W, D, dq + (b * Q + j) * D);
}

/* In: g [B,Q,L] (dLoss/dK), q, k as in the forward. Out: dq [B,Q,D], dk [B,L,D] for
 * b0 <= b < b1. */
VECTOR_CLONES
void NAME(dpfp_kernel_backward)(long b0, long b1, long Q, long L, long D, long nu, const T *g,
                                const T *q, const T *k, T *dq, T *dk, T *scratch) {
    FLUSH_DENORMALS;
    for (long b = b0; b < b1; ++b)
        NAME(dpfp_kernel_sequence_backward)(b, Q, L, D, nu, g, q, k, NULL, NULL, NULL, NULL, dq,
                                            dk, NULL, NULL, scratch);
}

/* The backward of dpfp_projected_kernel_forward for the sequences b0 <= b < b1, ascending:
 * dq [B,Q,D] written there, each key's gradient added into the tables dA [NA,D], dC [NC,D]
 * (the caller zeroes them; ranges that share table rows cannot run at once). Returns 0, or 1
 * (nothing written) if an id is outside its table. */
VECTOR_CLONES
int NAME(dpfp_projected_kernel_backward)(long b0, long b1, long Q, long L, long D, long nu,
                                         const T *g, const T *q, const T *A, long NA,
                                         const int64_t *a, const T *C, long NC,
                                         const int64_t *c, T *dq, T *dA, T *dC, T *scratch) {
    FLUSH_DENORMALS;
    if (NAME(ids_outside)((b1 - b0) * L, NA, a + b0 * L, NC, c + b0 * L)) return 1;
    for (long b = b0; b < b1; ++b)
        NAME(dpfp_kernel_sequence_backward)(b, Q, L, D, nu, g, q, NULL, A, a, C, c, dq, NULL,
                                            dA, dC, scratch);
    return 0;
}
