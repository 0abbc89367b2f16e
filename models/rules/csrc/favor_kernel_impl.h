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
