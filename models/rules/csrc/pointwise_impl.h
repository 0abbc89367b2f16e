/* One precision of two elementwise feature maps and their backwards (models/feature_maps.py,
 * ELUPlusOne and Tanh through Pointwise and PointwiseKernel): included by steps.c with T,
 * NAME(x), EXP(x) and EXP_NONPOSITIVE(x) (EXP for arguments in [floor, 0]) defined, after
 * gather_add_impl.h. PyTorch's elu and tanh are several passes (elu, then + 1) or slow exps
 * on this class of CPU; here one pass each way, with the exp of expf_impl.h in float32.
 * Arguments of EXP are floored at `floor` (float32 -87), where exp is still a normal number;
 * (c < floor ? floor : c) and (y > 1 ? 1 : y) keep a NaN. */

/* elu(v) + 1 = v + 1 (v > 0), exp(v) (v <= 0). */
static inline T NAME(elu_plus_one_value)(T v, T floor) {
    const T c = v > 0 ? (T)0 : v;
    const T e = EXP_NONPOSITIVE(c < floor ? floor : c);       /* in [floor, 0] or NaN */
    return v > 0 ? v + 1 : e;
}

/* Its slope from its value y: exp(v) = y where v <= 0, 1 where v > 0 (y > 1). */
static inline T NAME(elu_plus_one_slope)(T y) { return y > 1 ? (T)1 : y; }

/* tanh(v) = 1 - 2 / (exp(2v) + 1): within 2e-7 of tanh in float32 (absolute; the same bound
 * as models/numerics.py's tanh_via_sigmoid), exactly +-1 far out. */
static inline T NAME(tanh_value)(T v, T floor) {
    const T a = 2 * v;
    return 1 - 2 / (EXP(a < floor ? floor : a) + 1);
}

/* Its slope from its value y: 1 - y^2. */
static inline T NAME(tanh_slope)(T y) { return 1 - y * y; }

/* For each map: y = f(x) and dx = g f'(x) from y; and the same map read as a kernel of keys
 * given as two row lookups (PointwiseKernel, models/feature_maps.py):
 *   lookup_forward   y[r] = f(A[a_r] + B[b_r]) for rows r0 <= r < r1 of [B L, D]: the floats
 *                    of gather_add_forward followed by the map's forward
 *   lookup_backward  the gradient of the scores s[b, j, t] = p[b, j] . y[b, t] (p = phi(q)
 *                    [B, Q, D], y [B, L, D]; dLoss/ds = g [B, Q, L]) to the two tables, for
 *                    the sequences b0 <= b < b1: for each key row bt ascending, dy =
 *                    sum_j g[b, j, t] p[b, j] (j ascending; one query: the product g p alone,
 *                    as PairScores' backward computes it), dx = dy f'(x) from y,
 *                    dA[a_bt] += dx, dB[b_bt] += dx (gather_add_backward's order). Added into
 *                    dA [NA, D], dB [NB, D] (the caller zeroes them); scratch D.
 *   lookup_features_backward
 *                    the gradient of lookup_forward's y itself (dLoss/dy = g [B L, D]) to the
 *                    two tables, for rows r0 <= r < r1: dx = g f'(x) from y, dA[a_r] += dx,
 *                    dB[b_r] += dx, r ascending: the floats of the map's backward followed by
 *                    gather_add_backward. Added into dA, dB (the caller zeroes them); scratch D.
 * All three return 0, or 1 (nothing written) if an id is outside its table. Nothing of
 * [B L, D] is written back: neither the keys k nor dy nor dk. */
#define POINTWISE_MAP(map)                                                                      \
WIDE_VECTOR_CLONES                                                                              \
void NAME(map##_forward)(long n, T floor, const T *x, T *y) {                                   \
    FLUSH_DENORMALS;                                                                            \
    for (long i = 0; i < n; ++i) y[i] = NAME(map##_value)(x[i], floor);                         \
}                                                                                               \
                                                                                                \
WIDE_VECTOR_CLONES                                                                              \
void NAME(map##_backward)(long n, const T *y, const T *g, T *dx) {                              \
    FLUSH_DENORMALS;                                                                            \
    for (long i = 0; i < n; ++i) dx[i] = g[i] * NAME(map##_slope)(y[i]);                        \
}                                                                                               \
                                                                                                \
WIDE_VECTOR_CLONES                                                                              \
int NAME(map##_lookup_forward)(long r0, long r1, long D, T floor, const T *A, long NA,          \
                               const int64_t *a, const T *B, long NB, const int64_t *b, T *y) { \
    FLUSH_DENORMALS;                                                                            \
    if (NAME(ids_outside)(r1 - r0, NA, a + r0, NB, b + r0)) return 1;                           \
    for (long r = r0; r < r1; ++r) {                                                            \
        T *row = y + r * D;                                                                     \
        NAME(lookup_row)(A, a[r], B, b[r], D, row);                                             \
        for (long d = 0; d < D; ++d) row[d] = NAME(map##_value)(row[d], floor);                 \
    }                                                                                           \
    return 0;                                                                                   \
}                                                                                               \
                                                                                                \
WIDE_VECTOR_CLONES                                                                              \
int NAME(map##_lookup_backward)(long b0, long b1, long Q, long L, long D, const T *g,         \
                                const T *p, const T *y, long NA, const int64_t *a, long NB,     \
                                const int64_t *b, T *dA, T *dB, T *scratch) {                   \
    FLUSH_DENORMALS;                                                                            \
    if (NAME(ids_outside)((b1 - b0) * L, NA, a + b0 * L, NB, b + b0 * L)) return 1;             \
    for (long bt = b0 * L; bt < b1 * L; ++bt) {                                                 \
        const long batch = bt / L, t = bt % L;                                                  \
        const T *gb = g + batch * Q * L + t, *pb = p + batch * Q * D, *yr = y + bt * D;         \
        for (long d = 0; d < D; ++d) scratch[d] = gb[0] * pb[d];                                \
        for (long j = 1; j < Q; ++j)                                                            \
            for (long d = 0; d < D; ++d) scratch[d] += gb[j * L] * pb[j * D + d];               \
        for (long d = 0; d < D; ++d) scratch[d] = scratch[d] * NAME(map##_slope)(yr[d]);        \
        NAME(lookup_row_backward)(scratch, dA, a[bt], dB, b[bt], D);                            \
    }                                                                                           \
    return 0;                                                                                   \
}                                                                                               \
                                                                                                \
WIDE_VECTOR_CLONES                                                                              \
int NAME(map##_lookup_features_backward)(long r0, long r1, long D, const T *y, const T *g,      \
                                         long NA, const int64_t *a, long NB, const int64_t *b, \
                                         T *dA, T *dB, T *scratch) {                            \
    FLUSH_DENORMALS;                                                                            \
    if (NAME(ids_outside)(r1 - r0, NA, a + r0, NB, b + r0)) return 1;                           \
    for (long r = r0; r < r1; ++r) {                                                            \
        const T *yr = y + r * D, *gr = g + r * D;                                               \
        for (long d = 0; d < D; ++d) scratch[d] = gr[d] * NAME(map##_slope)(yr[d]);             \
        NAME(lookup_row_backward)(scratch, dA, a[r], dB, b[r], D);                              \
    }                                                                                           \
    return 0;                                                                                   \
}

POINTWISE_MAP(elu_plus_one)
POINTWISE_MAP(tanh)
#undef POINTWISE_MAP
