/* sum_d a[d] * b[d] in four interleaved partial sums combined as (s0 + s1) + (s2 + s3): a fixed
 * order, so the same floats on every machine, and four independent add chains instead of one.
 * The partial sums are the lanes of one 4-wide vector (left to themselves, compilers gathered
 * them with lane permutes). Included by steps.c with T and NAME(x) defined. */
typedef T NAME(quad) __attribute__((vector_size(4 * sizeof(T)), aligned(sizeof(T)), may_alias));
static inline __attribute__((always_inline)) T NAME(dot)(const T *a, const T *b, long n) {
    NAME(quad) s = {0, 0, 0, 0};
    long d = 0;
    for (; d + 4 <= n; d += 4) s += *(const NAME(quad) *)(a + d) * *(const NAME(quad) *)(b + d);
    T s0 = s[0];
    for (; d < n; ++d) s0 += a[d] * b[d];
    return (s0 + s[1]) + (s[2] + s[3]);
}
