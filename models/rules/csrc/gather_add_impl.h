/* One precision of the retrieval model's input projection as two row lookups
 * (models/projection.py, lookup_sum and ProjectLookup): included by steps.c with T
 * and NAME(x) defined.
 *     out[r] = A[a[r]] + B[b[r]]                    (rows of width D, ids int64)
 * and its backward, dA[a[r]] += g[r], dB[b[r]] += g[r] with r ascending (index_add's order).
 * One pass over the R rows where PyTorch makes two lookups and an add (and two index_adds).
 * The row helpers are shared with the kernels that read keys in this form (DPFP's, the
 * pointwise maps'), which thereby give the floats of the lookups followed by the kernel. */

/* 1 if an id of a [R] or b [R] is outside its table. */
static inline int NAME(ids_outside)(long R, long NA, const int64_t *a, long NB,
                                    const int64_t *b) {
    for (long r = 0; r < R; ++r)
        if (a[r] < 0 || a[r] >= NA || b[r] < 0 || b[r] >= NB) return 1;
    return 0;
}

/* out = A[i] + B[j], rows of width D. */
static inline void NAME(lookup_row)(const T *A, int64_t i, const T *B, int64_t j, long D,
                                    T *out) {
    const T *x = A + i * D, *y = B + j * D;
    for (long d = 0; d < D; ++d) out[d] = x[d] + y[d];
}

/* dA[i] += g, then dB[j] += g. */
static inline void NAME(lookup_row_backward)(const T *g, T *dA, int64_t i, T *dB, int64_t j,
                                             long D) {
    T *x = dA + i * D, *y = dB + j * D;
    for (long d = 0; d < D; ++d) x[d] += g[d];
    for (long d = 0; d < D; ++d) y[d] += g[d];
}

/* Returns 0, or 1 (nothing written) if an id is outside its table. */
VECTOR_CLONES
int NAME(gather_add_forward)(long R, long D, const T *A, long NA, const int64_t *a, const T *B,
                             long NB, const int64_t *b, T *out) {
    FLUSH_DENORMALS;
    if (NAME(ids_outside)(R, NA, a, NB, b)) return 1;
    for (long r = 0; r < R; ++r) NAME(lookup_row)(A, a[r], B, b[r], D, out + r * D);
    return 0;
}

/* The rows r0 <= r < r1 of g added into dA [NA, D] and dB [NB, D] (the caller zeroes them).
 * Returns 0, or 1 (nothing written) if an id is outside its table. */
WIDE_VECTOR_CLONES
int NAME(gather_add_backward)(long r0, long r1, long D, const T *g, long NA, const int64_t *a,
                              long NB, const int64_t *b, T *dA, T *dB) {
    FLUSH_DENORMALS;
    if (NAME(ids_outside)(r1 - r0, NA, a + r0, NB, b + r0)) return 1;
    for (long r = r0; r < r1; ++r) NAME(lookup_row_backward)(g + r * D, dA, a[r], dB, b[r], D);
    return 0;
}
