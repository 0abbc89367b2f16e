/* One precision of DPFP-nu's features and their backward, row by row (models/feature_maps.py,
 * DPFPFeatures), alone or sum-normalised (DPFPNormalised): included by steps.c with T and
 * NAME(x) defined, after dot_impl.h and sum_normalise_impl.h.
 *
 * r = relu([x; -x]) of width W = 2 D; the row's feature block j (j = 1..nu) is
 *     phi[(j - 1) W + i] = r_i r_{(i - j) mod W},
 * the floats of PyTorch's r * r.roll(j). PyTorch makes that as a cat, a neg, a relu, nu rolls,
 * nu products and a cat, each a pass (and about twice as many back); here one pass each way.
 * relu keeps a NaN (v <= 0 is false for it), as torch.relu. */

static inline __attribute__((always_inline)) void NAME(dpfp_relu_pair)(long D, const T *x, T *r) {
    for (long i = 0; i < D; ++i) {
        const T v = x[i], w = -v;
        r[i] = v <= 0 ? (T)0 : v;
        r[i + D] = w <= 0 ? (T)0 : w;
    }
}

/* One row's features y [nu W] from r [W]. */
static inline __attribute__((always_inline))
void NAME(dpfp_row_forward)(long D, long nu, const T *r, T *y) {
    const long W = 2 * D;
    for (long j = 1; j <= nu; ++j) {
        T *yj = y + (j - 1) * W;
        const long s = j % W;                     /* roll by j: r_{(i - j) mod W} */
        for (long i = 0; i < s; ++i) yj[i] = r[i] * r[i - s + W];
        for (long i = s; i < W; ++i) yj[i] = r[i] * r[i - s];
    }
}

/* x [rows, D] -> y [rows, nu W]. scratch: W elements. */
VECTOR_CLONES
void NAME(dpfp_features_forward)(long rows, long D, long nu, const T *x, T *y, T *scratch) {
    FLUSH_DENORMALS;
    const long W = 2 * D;
    T *r = scratch;
    for (long n = 0; n < rows; ++n) {
        NAME(dpfp_relu_pair)(D, x + n * D, r);
        NAME(dpfp_row_forward)(D, nu, r, y + n * nu * W);
    }
}

/* One row of the backward from g = dLoss/dphi [nu W] and r: dr_i = sum_j (a_j + b_j) with
 * a_j = g_j[i] r_{i-j} and b_j = g_j[i+j] r_{i+j} (indices mod W), summed in the order PyTorch's
 * autograd gives the reference's graph: (a_nu + b_nu) + a_{nu-1} + b_{nu-1} + ... + a_1 + b_1,
 * one at a time, so the same floats; then dx_i = dr_i [r_i > 0] - dr_{i+D} [r_{i+D} > 0]
 * (written as not r <= 0, so that a NaN passes, as in torch's relu backward). dr: W of
 * scratch; dx [D]. */
static inline __attribute__((always_inline))
void NAME(dpfp_row_backward)(long D, long nu, const T *r, const T *g, T *dr, T *dx) {
    const long W = 2 * D;
    for (long j = nu; j >= 1; --j) {
        const T *gj = g + (j - 1) * W;
        const long s = j % W;
        /* i in [lo, hi): (i - s) mod W = i + down, (i + s) mod W = i + up, constant in each
         * of the ranges split at s and W - s (so the loops vectorise) */
        const long cuts[4] = {0, s < W - s ? s : W - s, s < W - s ? W - s : s, W};
        for (int part = 0; part < 3; ++part) {
            const long lo = cuts[part], hi = cuts[part + 1];
            const long down = lo < s ? W - s : -s, up = lo < W - s ? s : s - W;
            if (j == nu)
                for (long i = lo; i < hi; ++i) dr[i] = gj[i] * r[i + down] + gj[i + up] * r[i + up];
            else
                for (long i = lo; i < hi; ++i)
                    dr[i] = (dr[i] + gj[i] * r[i + down]) + gj[i + up] * r[i + up];
        }
    }
    for (long i = 0; i < D; ++i) {          /* relu's backward passes where r <= 0 is false */
        const T pos = r[i] <= 0 ? (T)0 : dr[i], neg = r[i + D] <= 0 ? (T)0 : dr[i + D];
        dx[i] = pos - neg;
    }
}

/* Backward from g = dLoss/dphi [rows, nu W]: dx [rows, D]. scratch: 2 W elements. */
VECTOR_CLONES
void NAME(dpfp_features_backward)(long rows, long D, long nu, const T *x, const T *g, T *dx,
                                  T *scratch) {
    FLUSH_DENORMALS;
    const long W = 2 * D;
    T *r = scratch, *dr = scratch + W;
    for (long n = 0; n < rows; ++n) {
        NAME(dpfp_relu_pair)(D, x + n * D, r);
        NAME(dpfp_row_backward)(D, nu, r, g + n * nu * W, dr, dx + n * D);
    }
}

/* The features sum-normalised, y = phi / s with s = sum_i phi_i + eps (models/feature_maps.py,
 * DPFPNormalised): the floats of dpfp_features_forward then sum_normalise_forward, and back of
 * sum_normalise_backward then dpfp_features_backward, each row in cache between the two (at
 * DPFP-1 delta S = 200 the keys' features are 6.5 MB, written and read again between them).
 * Forward: x [rows, D] -> y [rows, nu W], s [rows]; scratch W. */
VECTOR_CLONES
void NAME(dpfp_normalised_forward)(long rows, long D, long nu, T eps, const T *x, T *y, T *s,
                                   T *scratch) {
    FLUSH_DENORMALS;
    const long W = 2 * D, F = nu * W;
    T *r = scratch;
    for (long n = 0; n < rows; ++n) {
        T *yn = y + n * F;
        NAME(dpfp_relu_pair)(D, x + n * D, r);
        NAME(dpfp_row_forward)(D, nu, r, yn);
        const T total = NAME(row_sum)(yn, F) + eps;
        s[n] = total;
        for (long i = 0; i < F; ++i) yn[i] = yn[i] / total;
    }
}

/* Backward from y, s and g = dLoss/dy [rows, nu W]: dx [rows, D]. scratch: 2 W + nu W. */
VECTOR_CLONES
void NAME(dpfp_normalised_backward)(long rows, long D, long nu, const T *x, const T *y,
                                    const T *s, const T *g, T *dx, T *scratch) {
    FLUSH_DENORMALS;
    const long W = 2 * D, F = nu * W;
    T *r = scratch, *dr = scratch + W, *gp = scratch + 2 * W;
    for (long n = 0; n < rows; ++n) {
        const T *yn = y + n * F, *gn = g + n * F;
        const T c = NAME(dot)(gn, yn, F), total = s[n];
        for (long i = 0; i < F; ++i) gp[i] = (gn[i] - c) / total;
        NAME(dpfp_relu_pair)(D, x + n * D, r);
        NAME(dpfp_row_backward)(D, nu, r, gp, dr, dx + n * D);
    }
}
