/* One precision of DPFP-nu's features and their backward, row by row (models/feature_maps.py,
 * DPFPFeatures): included by steps.c with T and NAME(x) defined.
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

/* x [rows, D] -> y [rows, nu W]. scratch: W elements. */
VECTOR_CLONES
void NAME(dpfp_features_forward)(long rows, long D, long nu, const T *x, T *y, T *scratch) {
    const long W = 2 * D;
    T *r = scratch;
    for (long n = 0; n < rows; ++n) {
        NAME(dpfp_relu_pair)(D, x + n * D, r);
        for (long j = 1; j <= nu; ++j) {
            T *yj = y + (n * nu + j - 1) * W;
            const long s = j % W;                 /* roll by j: r_{(i - j) mod W} */
            for (long i = 0; i < s; ++i) yj[i] = r[i] * r[i - s + W];
            for (long i = s; i < W; ++i) yj[i] = r[i] * r[i - s];
        }
    }
}

/* Backward from g = dLoss/dphi [rows, nu W]: dr_i = sum_j (a_j + b_j) with a_j = g_j[i] r_{i-j}
 * and b_j = g_j[i+j] r_{i+j} (indices mod W), summed in the order PyTorch's autograd gives the
 * reference's graph: (a_nu + b_nu) + a_{nu-1} + b_{nu-1} + ... + a_1 + b_1, one at a time, so
 * the same floats; then dx_i = dr_i [r_i > 0] - dr_{i+D} [r_{i+D} > 0] (written as not r <= 0,
 * so that a NaN passes, as in torch's relu backward). dx [rows, D].
 * scratch: 2 W elements. */
VECTOR_CLONES
void NAME(dpfp_features_backward)(long rows, long D, long nu, const T *x, const T *g, T *dx,
                                  T *scratch) {
    const long W = 2 * D;
    T *r = scratch, *dr = scratch + W;
    for (long n = 0; n < rows; ++n) {
        NAME(dpfp_relu_pair)(D, x + n * D, r);
        for (long j = nu; j >= 1; --j) {
            const T *gj = g + (n * nu + j - 1) * W;
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
        T *dxn = dx + n * D;
        for (long i = 0; i < D; ++i) {      /* relu's backward passes where r <= 0 is false */
            const T pos = r[i] <= 0 ? (T)0 : dr[i], neg = r[i + D] <= 0 ? (T)0 : dr[i + D];
            dxn[i] = pos - neg;
        }
    }
}
