/* One precision of two elementwise feature maps and their backwards (models/feature_maps.py,
 * ELUPlusOne and Tanh through Pointwise): included by steps.c with T, NAME(x) and EXP(x)
 * defined. PyTorch's elu and tanh are several passes (elu, then + 1) or slow exps on this
 * class of CPU; here one pass each way, with the exp of expf_impl.h in float32.
 * Arguments of EXP are floored at `floor` (float32 -87), where exp is still a normal number;
 * (c < floor ? floor : c) and (y > 1 ? 1 : y) keep a NaN. */

/* y = elu(x) + 1 = x + 1 (x > 0), exp(x) (x <= 0). */
WIDE_VECTOR_CLONES
void NAME(elu_plus_one_forward)(long n, T floor, const T *x, T *y) {
    for (long i = 0; i < n; ++i) {
        const T v = x[i], c = v > 0 ? (T)0 : v;
        const T e = EXP(c < floor ? floor : c);
        y[i] = v > 0 ? v + 1 : e;
    }
}

/* dx = g dy/dx = g min(y, 1): exp(x) = y where x <= 0, 1 where x > 0 (y > 1). */
WIDE_VECTOR_CLONES
void NAME(elu_plus_one_backward)(long n, const T *y, const T *g, T *dx) {
    for (long i = 0; i < n; ++i) dx[i] = g[i] * (y[i] > 1 ? (T)1 : y[i]);
}

/* y = tanh(x) = 1 - 2 / (exp(2x) + 1): within 2e-7 of tanh in float32 (absolute; the same
 * bound as models/numerics.py's tanh_via_sigmoid), exactly +-1 far out. */
WIDE_VECTOR_CLONES
void NAME(tanh_forward)(long n, T floor, const T *x, T *y) {
    for (long i = 0; i < n; ++i) {
        const T a = 2 * x[i];
        y[i] = 1 - 2 / (EXP(a < floor ? floor : a) + 1);
    }
}

/* dx = g (1 - y^2). */
WIDE_VECTOR_CLONES
void NAME(tanh_backward)(long n, const T *y, const T *g, T *dx) {
    for (long i = 0; i < n; ++i) dx[i] = g[i] * (1 - y[i] * y[i]);
}
