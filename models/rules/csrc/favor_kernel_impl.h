/* One precision of FAVOR+'s kernel terms (models/feature_maps.py, FAVORKernel): included by
 * steps.c with T, NAME(x) and EXP(x) defined.
 *
 * Row r of s [R, m] holds s_i = Omega_i . (q + k) for one (query, key) pair and c[r] =
 * (|q|^2 + |k|^2) / 2 + log(2m). One pass per row:
 *     e+_i = exp(max(s_i - c, floor)),   e-_i = exp(max(-s_i - c, floor)),
 *     K[r] = sum_i (e+_i + e-_i),        s_i <- e+_i - e-_i   (all the backward needs).
 * PyTorch makes this eight passes over the [R, m] block and keeps both halves for the
 * backward. The row's sum is in a fixed order (sum8). */

/* sum_i a[i] in eight interleaved lanes combined as a tree: a fixed order. */
static inline T NAME(sum8)(const T *a, long n) {
    T acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    long i = 0;
    for (; i + 8 <= n; i += 8)
        for (int l = 0; l < 8; ++l) acc[l] += a[i + l];
    for (int l = 0; i < n; ++i, ++l) acc[l] += a[i];
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

/* In: s [R, m] (overwritten with e+ - e-), c [R]. Out: K [R], for rows r0 <= r < r1.
 * Scratch: m. (x < floor ? floor : x) keeps a NaN, as clamp does. */
WIDE_VECTOR_CLONES
void NAME(favor_kernel_forward)(long r0, long r1, long m, T floor, T *s, const T *c, T *K,
                                T *scratch) {
    FLUSH_DENORMALS;
    for (long r = r0; r < r1; ++r) {
        T *row = s + r * m;
        const T cr = c[r];
        for (long i = 0; i < m; ++i) {
            const T a = row[i] - cr, b = -row[i] - cr;
            const T plus = EXP(a < floor ? floor : a), minus = EXP(b < floor ? floor : b);
            scratch[i] = plus + minus;
            row[i] = plus - minus;
        }
        K[r] = NAME(sum8)(scratch, m);
    }
}

/* The same terms for keys given as two row lookups (models/feature_maps.py,
 * FAVORProjectedKernel): pair r = (b, i, t) of B x Q x L has
 *     s_j = (A[a_bt, j] + C[k_bt, j]) + p[b, i, j]
 * with A [NA, m], C [NC, m] the keys' two projected tables, ids a, k [B, L], and p = Omega q
 * [B, Q, m]: s is never stored. Out, for pairs r0 <= r < r1: diff [B, Q, L, m] (e+ - e-) and
 * K [B, Q, L]. c [B, Q, L]. Scratch: m. Returns 0, or 1 (nothing written) if an id is outside
 * its table. */
WIDE_VECTOR_CLONES
int NAME(favor_projected_forward)(long r0, long r1, long Q, long L, long m, T floor,
                                  const T *A, long NA, const int64_t *a, const T *C, long NC,
                                  const int64_t *k, const T *p, const T *c, T *diff, T *K,
                                  T *scratch) {
    FLUSH_DENORMALS;
    for (long r = r0; r < r1; ++r) {
        const long bt = (r / (Q * L)) * L + r % L;
        if (a[bt] < 0 || a[bt] >= NA || k[bt] < 0 || k[bt] >= NC) return 1;
    }
    for (long r = r0; r < r1; ++r) {
        const long b = r / (Q * L), bt = b * L + r % L;
        const T *x = A + a[bt] * m, *y = C + k[bt] * m, *pr = p + (r / L) * m;
        T *row = diff + r * m;
        const T cr = c[r];
        for (long j = 0; j < m; ++j) {
            const T s = (x[j] + y[j]) + pr[j];
            const T u = s - cr, w = -s - cr;
            const T plus = EXP(u < floor ? floor : u), minus = EXP(w < floor ? floor : w);
            scratch[j] = plus + minus;
            row[j] = plus - minus;
        }
        K[r] = NAME(sum8)(scratch, m);
    }
    return 0;
}

/* Its backward for the sequences b0 <= b < b1, one pass over their diff: with
 * d_r = g_r diff_r for each pair in ascending order,
 *     dA[a_bt] += d_r,   dC[k_bt] += d_r,   dp[b, i] += d_r,
 * added into dA [NA, m], dC [NC, m] and dp [B, Q, m] (the caller zeroes them; ranges that
 * share table rows cannot run at once). Returns 0, or 1 (nothing written) if an id is outside
 * its table. */
VECTOR_CLONES
int NAME(favor_projected_backward)(long b0, long b1, long Q, long L, long m, const T *g,
                                   const T *diff, long NA, const int64_t *a, long NC,
                                   const int64_t *k, T *dA, T *dC, T *dp) {
    FLUSH_DENORMALS;
    for (long bt = b0 * L; bt < b1 * L; ++bt)
        if (a[bt] < 0 || a[bt] >= NA || k[bt] < 0 || k[bt] >= NC) return 1;
    for (long r = b0 * Q * L; r < b1 * Q * L; ++r) {
        const long b = r / (Q * L), bt = b * L + r % L;
        const T gr = g[r], *row = diff + r * m;
        T *x = dA + a[bt] * m, *y = dC + k[bt] * m, *pr = dp + (r / L) * m;
        for (long j = 0; j < m; ++j) {
            const T d = gr * row[j];
            x[j] += d;
            y[j] += d;
            pr[j] += d;
        }
    }
    return 0;
}
