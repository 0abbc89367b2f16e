/* sum_d a[d] * b[d] in four interleaved partial sums combined as (s0 + s1) + (s2 + s3): a fixed
 * order, so the same floats on every machine, and four independent add chains instead of one.
 * Included by steps.c with T and NAME(x) defined. */
static inline T NAME(dot)(const T *a, const T *b, long n) {
    T s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    long d = 0;
    for (; d + 4 <= n; d += 4) {
        s0 += a[d] * b[d];
        s1 += a[d + 1] * b[d + 1];
        s2 += a[d + 2] * b[d + 2];
        s3 += a[d + 3] * b[d + 3];
    }
    for (; d < n; ++d) s0 += a[d] * b[d];
    return (s0 + s1) + (s2 + s3);
}
