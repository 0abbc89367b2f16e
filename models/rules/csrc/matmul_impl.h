/* One precision of a small matrix product for one sequence's blocks (a chunk of keys times a
 * fast-weight state): included by steps.c with T (float or double) and NAME(x) defined, after
 * fwm_steps_impl.h (vec) and dot_impl.h (quad).
 *
 *   Out[m, n] = (Start ? s Start[m, n] : 0) + sum_k A[m, k] B[k, n],   m < M, n < N,
 *
 * A read as A[m * a_row + k * a_col] (so a transposed A costs nothing), B, Out and Start
 * row-major with leading dimensions ldb, ldo and ldo (Start may be Out itself: s = 1 adds to
 * it, and a state is scaled and updated in one pass). Every element is summed over k in order
 * from s Start[m, n]: the floats of the plain loop, whatever the vector width, since a lane is
 * a column. Tiles of 4 rows x 2 vectors keep 8 sums in registers while a k step loads 2 vectors
 * of B and 4 scalars of A (without fused multiply-adds a product needs a register of its own:
 * 3 vectors would spill one of 16); 4-wide and scalar columns finish a row. It runs at about
 * MKL's speed on the FWM write's sizes (32 x 64 x 200 f32: 43 against 42 GMAC/s on a Zen 4
 * core, its data in L1), with no packing and nothing copied. */

static inline __attribute__((always_inline))
void NAME(matmul)(long M, long N, long K, const T *A, long a_row, long a_col, const T *Bm,
                  long ldb, T *Out, long ldo, const T *Start, T s) {
    const long lanes = (long)(sizeof(NAME(vec)) / sizeof(T));
    typedef NAME(vec) V;
    long m = 0;
    for (; m + 4 <= M; m += 4) {
        const T *A0 = A + m * a_row;
        T *O0 = Out + m * ldo, *O1 = O0 + ldo, *O2 = O1 + ldo, *O3 = O2 + ldo;
        const T *I0 = (Start ? Start : Out) + m * ldo, *I1 = I0 + ldo, *I2 = I1 + ldo,
                *I3 = I2 + ldo;                                   /* read only with Start */
        long n = 0;
        for (; n + 2 * lanes <= N; n += 2 * lanes) {
            V c00, c01, c10, c11, c20, c21, c30, c31;
            if (Start) {
                c00 = s * *(const V *)(I0 + n); c01 = s * *(const V *)(I0 + n + lanes);
                c10 = s * *(const V *)(I1 + n); c11 = s * *(const V *)(I1 + n + lanes);
                c20 = s * *(const V *)(I2 + n); c21 = s * *(const V *)(I2 + n + lanes);
                c30 = s * *(const V *)(I3 + n); c31 = s * *(const V *)(I3 + n + lanes);
            } else {
                c00 = c01 = c10 = c11 = c20 = c21 = c30 = c31 = (V){0};
            }
            const T *Bk = Bm + n, *Ak = A0;
            for (long k = 0; k < K; ++k, Bk += ldb, Ak += a_col) {
                const V b0 = *(const V *)Bk, b1 = *(const V *)(Bk + lanes);
                T a = Ak[0];
                c00 += a * b0; c01 += a * b1;
                a = Ak[a_row];
                c10 += a * b0; c11 += a * b1;
                a = Ak[2 * a_row];
                c20 += a * b0; c21 += a * b1;
                a = Ak[3 * a_row];
                c30 += a * b0; c31 += a * b1;
            }
            *(V *)(O0 + n) = c00; *(V *)(O0 + n + lanes) = c01;
            *(V *)(O1 + n) = c10; *(V *)(O1 + n + lanes) = c11;
            *(V *)(O2 + n) = c20; *(V *)(O2 + n + lanes) = c21;
            *(V *)(O3 + n) = c30; *(V *)(O3 + n + lanes) = c31;
        }
        for (; n + lanes <= N; n += lanes) {
            V c0, c1, c2, c3;
            if (Start) {
                c0 = s * *(const V *)(I0 + n); c1 = s * *(const V *)(I1 + n);
                c2 = s * *(const V *)(I2 + n); c3 = s * *(const V *)(I3 + n);
            } else {
                c0 = c1 = c2 = c3 = (V){0};
            }
            const T *Bk = Bm + n, *Ak = A0;
            for (long k = 0; k < K; ++k, Bk += ldb, Ak += a_col) {
                const V b0 = *(const V *)Bk;
                c0 += Ak[0] * b0; c1 += Ak[a_row] * b0; c2 += Ak[2 * a_row] * b0;
                c3 += Ak[3 * a_row] * b0;
            }
            *(V *)(O0 + n) = c0; *(V *)(O1 + n) = c1; *(V *)(O2 + n) = c2; *(V *)(O3 + n) = c3;
        }
        for (; n + 4 <= N; n += 4) {
            typedef NAME(quad) Q;
            Q c0, c1, c2, c3;
            if (Start) {
                c0 = s * *(const Q *)(I0 + n); c1 = s * *(const Q *)(I1 + n);
                c2 = s * *(const Q *)(I2 + n); c3 = s * *(const Q *)(I3 + n);
            } else {
                c0 = c1 = c2 = c3 = (Q){0};
            }
            const T *Bk = Bm + n, *Ak = A0;
            for (long k = 0; k < K; ++k, Bk += ldb, Ak += a_col) {
                const Q b0 = *(const Q *)Bk;
                c0 += Ak[0] * b0; c1 += Ak[a_row] * b0; c2 += Ak[2 * a_row] * b0;
                c3 += Ak[3 * a_row] * b0;
            }
            *(Q *)(O0 + n) = c0; *(Q *)(O1 + n) = c1; *(Q *)(O2 + n) = c2; *(Q *)(O3 + n) = c3;
        }
        for (; n < N; ++n)
            for (int q = 0; q < 4; ++q) {
                const long at = (m + q) * ldo + n;
                T sum = Start ? s * Start[at] : 0;
                for (long k = 0; k < K; ++k) sum += A0[q * a_row + k * a_col] * Bm[k * ldb + n];
                Out[at] = sum;
            }
    }
    for (; m < M; ++m) {
        const T *A0 = A + m * a_row;
        T *O0 = Out + m * ldo;
        const T *I0 = (Start ? Start : Out) + m * ldo;
        long n = 0;
        for (; n + lanes <= N; n += lanes) {
            V c0 = {0};
            if (Start) c0 = s * *(const V *)(I0 + n);
            const T *Bk = Bm + n, *Ak = A0;
            for (long k = 0; k < K; ++k, Bk += ldb, Ak += a_col) c0 += Ak[0] * *(const V *)Bk;
            *(V *)(O0 + n) = c0;
        }
        for (; n < N; ++n) {
            T sum = Start ? s * I0[n] : 0;
            for (long k = 0; k < K; ++k) sum += A0[k * a_col] * Bm[k * ldb + n];
            O0[n] = sum;
        }
    }
}

/* A [R, Cn] row-major -> At [Cn, R], in 8 x 8 tiles (the stores of a tile stay in 8 lines).
 * In float32 a tile is eight vector loads, three rounds of lane shuffles and eight vector
 * stores (2.6-4x fewer cycles than element by element at 32-64 x 64-200 on a Zen 4); the
 * floats are only moved. */
static inline __attribute__((always_inline))
void NAME(transpose)(long R, long Cn, const T *A, T *At) {
    long i = 0;
    for (; i + 8 <= R; i += 8) {
        long j = 0;
#if defined(FWR_SHUFFLE_TRANSPOSE)
        typedef NAME(vec) V;
        for (; j + 8 <= Cn; j += 8) {
            V r[8], t[8], u[8];
            for (int q = 0; q < 8; ++q) r[q] = *(const V *)(A + (i + q) * Cn + j);
            /* pairs of rows interleaved, then pairs of pairs, then the 4-lane halves */
#define FWR_SH __builtin_shufflevector
            for (int q = 0; q < 4; ++q) {
                t[2 * q] = FWR_SH(r[2 * q], r[2 * q + 1], 0, 8, 1, 9, 4, 12, 5, 13);
                t[2 * q + 1] = FWR_SH(r[2 * q], r[2 * q + 1], 2, 10, 3, 11, 6, 14, 7, 15);
            }
            for (int h = 0; h < 8; h += 4)
                for (int q = 0; q < 2; ++q) {
                    u[h + 2 * q] = FWR_SH(t[h + q], t[h + q + 2], 0, 1, 8, 9, 4, 5, 12, 13);
                    u[h + 2 * q + 1] = FWR_SH(t[h + q], t[h + q + 2], 2, 3, 10, 11, 6, 7, 14, 15);
                }
            T *o = At + j * R + i;
            for (int q = 0; q < 4; ++q) {
                *(V *)(o + q * R) = FWR_SH(u[q], u[q + 4], 0, 1, 2, 3, 8, 9, 10, 11);
                *(V *)(o + (q + 4) * R) = FWR_SH(u[q], u[q + 4], 4, 5, 6, 7, 12, 13, 14, 15);
            }
#undef FWR_SH
        }
#endif
        for (; j + 8 <= Cn; j += 8)
            for (long jj = j; jj < j + 8; ++jj) {
                T *o = At + jj * R + i;
                const T *a = A + i * Cn + jj;
                for (int q = 0; q < 8; ++q) o[q] = a[q * Cn];
            }
        for (; j < Cn; ++j)
            for (int q = 0; q < 8; ++q) At[j * R + i + q] = A[(i + q) * Cn + j];
    }
    for (; i < R; ++i)
        for (long j = 0; j < Cn; ++j) At[j * R + i] = A[i * Cn + j];
}
