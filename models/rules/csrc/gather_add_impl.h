/* One precision of the retrieval model's input projection as two row lookups
 * (models/projection.py, lookup_sum and ProjectLookup): included by steps.c with T
 * and NAME(x) defined.
 *     out[r] = A[a[r]] + B[b[r]]                    (rows of width D, ids int64)
 * and its backward, dA[a[r]] += g[r], dB[b[r]] += g[r] with r ascending (index_add's order).
 * One pass over the R rows where PyTorch makes two lookups and an add (and two index_adds). */

/* Returns 0, or 1 (nothing written) if an id is outside its table. */
VECTOR_CLONES
int NAME(gather_add_forward)(long R, long D, const T *A, long NA, const int64_t *a, const T *B,
                             long NB, const int64_t *b, T *out) {
    for (long r = 0; r < R; ++r)
        if (a[r] < 0 || a[r] >= NA || b[r] < 0 || b[r] >= NB) return 1;
    for (long r = 0; r < R; ++r) {
        const T *x = A + a[r] * D, *y = B + b[r] * D;
        T *o = out + r * D;
        for (long d = 0; d < D; ++d) o[d] = x[d] + y[d];
    }
    return 0;
}

/* dA [NA, D] and dB [NB, D] are overwritten. Returns 0, or 1 (nothing written) if an id is
 * outside its table. */
WIDE_VECTOR_CLONES
int NAME(gather_add_backward)(long R, long D, const T *g, long NA, const int64_t *a, long NB,
                              const int64_t *b, T *dA, T *dB) {
    for (long r = 0; r < R; ++r)
        if (a[r] < 0 || a[r] >= NA || b[r] < 0 || b[r] >= NB) return 1;
    memset(dA, 0, sizeof(T) * NA * D);
    memset(dB, 0, sizeof(T) * NB * D);
    for (long r = 0; r < R; ++r) {
        const T *gr = g + r * D;
        T *x = dA + a[r] * D, *y = dB + b[r] * D;
        for (long d = 0; d < D; ++d) x[d] += gr[d];
        for (long d = 0; d < D; ++d) y[d] += gr[d];
    }
    return 0;
}
