/* One precision of the sum normalisation y = x / (sum_i x_i + eps) over rows of D and its
 * backward (models/normalisation.py, SumNormalise): included by steps.c with T and NAME(x)
 * defined, after dot_impl.h. PyTorch makes the forward a sum, an add and a division, and the
 * backward about six passes over [rows, D] (the division's two gradients, the sum's expand,
 * their accumulation); here one pass each way, the row in cache. The row sum takes NAME(dot)'s
 * fixed four-lane order (row_sum). */

/* Four-lane sum of x[0..n) in NAME(dot)'s order. */
static inline __attribute__((always_inline)) T NAME(row_sum)(const T *x, long n) {
    NAME(quad) s = {0, 0, 0, 0};
    long d = 0;
    for (; d + 4 <= n; d += 4) s += *(const NAME(quad) *)(x + d);
    T s0 = s[0];
    for (; d < n; ++d) s0 += x[d];
    return (s0 + s[1]) + (s[2] + s[3]);
}

/* x [rows, D] -> y [rows, D], s [rows] = sum_i x_i + eps. */
VECTOR_CLONES
void NAME(sum_normalise_forward)(long rows, long D, T eps, const T *x, T *y, T *s) {
    FLUSH_DENORMALS;
    for (long n = 0; n < rows; ++n) {
        const T *xr = x + n * D;
        T *yr = y + n * D;
        const T total = NAME(row_sum)(xr, D) + eps;
        s[n] = total;
        for (long i = 0; i < D; ++i) yr[i] = xr[i] / total;
    }
}

/* dy_i/dx_j = (delta_ij - y_i) / s, so dx = (g - g . y) / s, from y, s and g = dLoss/dy. */
VECTOR_CLONES
void NAME(sum_normalise_backward)(long rows, long D, const T *y, const T *s, const T *g, T *dx) {
    FLUSH_DENORMALS;
    for (long n = 0; n < rows; ++n) {
        const T *yr = y + n * D, *gr = g + n * D;
        T *dr = dx + n * D;
        const T c = NAME(dot)(gr, yr, D), total = s[n];
        for (long i = 0; i < D; ++i) dr[i] = (gr[i] - c) / total;
    }
}
