/* exp for float32 as a fixed sequence of IEEE operations (included once by steps.c).
 *
 * libm's expf is a scalar call, so a loop of them does not vectorise; this form does, and
 * gives the same floats on every machine and every vector width (no fused multiply-add, no
 * table). Cody-Waite reduction x = n ln2 + r, |r| <= ln2 / 2, then Cephes' degree-7
 * polynomial for exp(r) (within 2 ulp of the exact value over float32's normal range; the
 * tests check it against float64 exp) and 2^n from the exponent bits.
 * Inputs below -87.3 would need a subnormal 2^n: callers floor their arguments first
 * (FAVOR+'s floor is -87). Above log(FLT_MAX) the result is inf; NaN stays NaN. */

/* exp(x - n ln2) for n = nf (x's nearest multiple of ln2, as a float): ln2 in two parts
 * (the first exact), then the polynomial. */
static inline float expf_reduced(float x, float nf) {
    float r = x - nf * 0.693359375f;                          /* ln2 in two parts, exact */
    r = r - nf * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    return p * (r * r) + r + 1.0f;
}

static inline float fixed_expf(float x) {
    /* A NaN is computed as 0 and given back at the end. Written as a select on the argument
     * of the reduction, gcc threaded the NaN lanes through a second copy of the polynomial and
     * the vector loops computed both: tanh over [128, 40, 64] took 267-314 against 224-226 us,
     * FAVOR+'s pass 16-18 against 15-16 ms. The floats of every number are unchanged. */
    const int nan = x != x;
    const float xc = nan ? 0.0f : (x > 89.0f ? 89.0f : x);    /* 2^n <= 2^128 */
    const float nf = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  /* round */
    float p = expf_reduced(xc, nf);
    int32_t n = (int32_t)nf;
    const int32_t top = n > 127;                              /* 2^128 is not a float: 2 2^127 */
    n -= top;
    p = top ? p * 2.0f : p;
    const uint32_t bits = (uint32_t)(n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return nan ? x + x : p * scale;                           /* x + x: a quiet NaN */
}

/* fixed_expf for arguments already in [-87.3, 0] (or NaN): the same floats there, without
 * the clamps that range cannot reach and with 2^n read from the bits of the rounding sum
 * (12582912 + n, exact for these n) rather than converted from it. A NaN stays NaN through
 * the polynomial. ELU + 1's exp, whose argument the map itself caps at 0. */
static inline float fixed_expf_nonpositive(float x) {
    const float shifted = x * 1.44269504088896341f + 12582912.0f;  /* 12582912 + n */
    const float nf = shifted - 12582912.0f;
    const float p = expf_reduced(x, nf);
    uint32_t bits;
    memcpy(&bits, &shifted, sizeof bits);
    bits = (bits - 0x4B400000u + 127u) << 23;                 /* n + 127 in the exponent */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}
