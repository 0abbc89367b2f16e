/* One precision of the chunkwise FWM write, whole sequences in C: included by steps.c with T
 * and NAME(x) defined, after fwm_steps_impl.h (the per-position steps of a chunk), dot_impl.h
 * and matmul_impl.h.
 *
 * FWMWrite's arithmetic (models/rules/fwm.py, whose docstring has the recurrence), one sequence
 * at a time: a chunk's products (G = K K^T, R0 = K S_0, S_C = d_0 S_0 + (d K)^T U, and back
 * Z = K S_b, K_b, S_b) run on that sequence's blocks with matmul(), so the state, its adjoint
 * and the chunk's rows stay in L1/L2 from one product to the next, where the batched PyTorch
 * form wrote every [B, C, D_v] and [B, D_k, D_v] block to memory between operations and copied
 * the states for the next chunk's products. State S = W^T [D_k, D_v] row-major. */

/* Ask for [p, p + count elements) in cache ahead of use (no effect on any value): what the
 * backward reads of the next chunk was written by the forward long before (from memory), and
 * the forward writes every chunk's kept quantities to fresh memory. */
static inline __attribute__((always_inline)) void NAME(prefetch_read)(const T *p, long count) {
    for (long o = 0; o < count; o += 64 / (long)sizeof(T)) __builtin_prefetch(p + o, 0, 2);
}
static inline __attribute__((always_inline)) void NAME(prefetch_write)(T *p, long count) {
    for (long o = 0; o < count; o += 64 / (long)sizeof(T)) __builtin_prefetch(p + o, 1, 2);
}

/* Out[t, s] = sum_k A[t, k] Bt[k, s] for s <= t (and a few s > t of the tiles on the diagonal)
 * of [C, C] products whose upper triangle is never read (A [C, D], Bt [D, C] row-major): about
 * half of matmul's work, the same floats where both write. */
static inline __attribute__((always_inline))
void NAME(lower_product)(long C, long D, const T *A, const T *Bt, T *Out) {
    for (long m = 0; m < C; m += 4)
        NAME(matmul)(C - m < 4 ? C - m : 4, m + 4 < C ? m + 4 : C, D, A + m * D, D, 1, Bt, C,
                     Out + m * C, C, NULL, 0);
}

/* Forward over sequences b0..b1-1 of k [B,L,Dk], values V [B,L,Dv] or (V NULL) one-hot ids
 * [B,L], beta [B,L], in chunks of C positions (the last may be shorter; nc chunks).
 * The final state goes to S [B,Dk,Dv]. keep: states [B,nc-1,Dk,Dv] gets the state after each
 * chunk but the last, and the steps' quantities go to hk, n_pre, c, g, d [B,L], E, w
 * [B,nc,C,C] (a short chunk's Cc x Cc at the start of its block) and U, r [B,L,Dv], for the
 * backward; else they are NULL (the state is updated in place).
 * scratch: 3 C^2 + 3 C Dv + 2 C Dk + Dv + 5 C elements.
 * Returns 0, or 1 (nothing written) if an id is outside 0..Dv-1. */
VECTOR_CLONES
int NAME(fwm_chunked_forward)(long b0, long b1, long L, long C, long Dk, long Dv, const T *k,
                              const T *V, const int64_t *ids, const T *beta, T *S,
                              T *states, int keep, T *hk, T *E, T *w, T *U, T *r, T *n_pre,
                              T *c, T *g, T *d, T *scratch) {
    FLUSH_DENORMALS;
    if (NAME(bad_ids)(ids ? ids + b0 * L : NULL, (b1 - b0) * L, Dv)) return 1;
    const long nc = (L + C - 1) / C, state = Dk * Dv;
    T *G = scratch, *R0 = G + C * C, *dK = R0 + C * Dv, *Kt = dK + C * Dk, *vrow = Kt + C * Dk;
    T *own = vrow + Dv;                        /* a chunk's quantities when none are kept */
    memset(vrow, 0, sizeof(T) * Dv);
    for (long i = b0; i < b1; ++i) {
        T norm = 0;
        for (long ch = 0; ch < nc; ++ch) {
            const long t0 = ch * C, Cc = L - t0 < C ? L - t0 : C, row = i * L + t0;
            const T *K = k + row * Dk;
            const T *S0 = ch == 0 ? NULL : keep ? states + (i * (nc - 1) + ch - 1) * state
                                                : S + i * state;
            T *S1 = keep && ch < nc - 1 ? states + (i * (nc - 1) + ch) * state : S + i * state;
            T *hki, *Ei, *wi, *Ui, *ri, *npi, *ci, *gi, *di;
            if (keep) {
                hki = hk + row; npi = n_pre + row; ci = c + row; gi = g + row; di = d + row;
                Ei = E + (i * nc + ch) * C * C; wi = w + (i * nc + ch) * C * C;
                Ui = U + row * Dv; ri = r + row * Dv;
            } else {
                hki = own; npi = hki + C; ci = npi + C; gi = ci + C; di = gi + C;
                Ei = di + C; wi = Ei + C * C; Ui = wi + C * C; ri = Ui + C * Dv;
            }
            /* the next chunk's: this sequence's next, or the next sequence's first */
            const long pi = ch + 1 < nc ? i : i + 1, pch = ch + 1 < nc ? ch + 1 : 0;
            if (pi < b1) {
                const long prow = pi * L + pch * C, pC = L - pch * C < C ? L - pch * C : C;
                NAME(prefetch_read)(k + prow * Dk, pC * Dk);
                if (keep) {
                    if (pch < nc - 1)
                        NAME(prefetch_write)(states + (pi * (nc - 1) + pch) * state, state);
                    NAME(prefetch_write)(U + prow * Dv, pC * Dv);
                    NAME(prefetch_write)(r + prow * Dv, pC * Dv);
                    NAME(prefetch_write)(E + (pi * nc + pch) * C * C, C * C);
                    NAME(prefetch_write)(w + (pi * nc + pch) * C * C, C * C);
                }
            }
            NAME(transpose)(Cc, Dk, K, Kt);
            NAME(lower_product)(Cc, Dk, K, Kt, G);             /* G = K K^T, s <= t */
            if (S0) NAME(matmul)(Cc, Dv, Dk, K, Dk, 1, S0, Dv, R0, Dv, NULL, 0);  /* K S_0 */
            NAME(fwm_forward_sequence)(Cc, Dv, G, S0 ? R0 : NULL, V ? V + row * Dv : NULL,
                                       ids ? ids + row : NULL, beta + row, &norm, ch == 0,
                                       hki, Ei, wi, Ui, ri, npi, ci, gi, di, vrow);
            /* S_C = d_0 S_0 + (d K)^T U, d scaling K's rows rather than U's */
            for (long t = 0; t < Cc; ++t)
                for (long j = 0; j < Dk; ++j) dK[t * Dk + j] = di[t] * K[t * Dk + j];
            NAME(matmul)(Dk, Dv, Cc, dK, 1, Dk, Ui, Dv, S1, Dv, S0, di[0]);
        }
    }
    return 0;
}

/* Backward of fwm_chunked_forward (states and the steps' quantities as it kept them) for the
 * final state's adjoint S_bar [B,Dk,Dv]: k_bar [B,L,Dk], b_bar [B,L] and, if v_bar is not NULL
 * (dense values), v_bar [B,L,Dv]. Per chunk, in reverse (FWMWrite.backward's terms):
 *   Z = K S_b, the steps' backward (fwm_backward_sequence) -> U_b, R_b, diag, b_b,
 *   K_b = d (U S_b^T) + (G_b + G_b^T) K + g (R_b S_0^T),  G_b = tril(R_b U^T, -1) E + diag,
 *   S_b <- d_0 S_b + (g K)^T R_b.
 * scratch: (Dk + max(Dk, C) + 3 C) Dv + C^2 + 2 C Dk + 2 Dv + 2 C elements.
 * Returns 0, or 1 (nothing written) if an id is outside 0..Dv-1. */
VECTOR_CLONES
int NAME(fwm_chunked_backward)(long b0, long b1, long L, long C, long Dk, long Dv, const T *k,
                               const T *V, const int64_t *ids, const T *beta,
                               const T *states, const T *hk, const T *E, const T *w,
                               const T *U, const T *r, const T *n_pre, const T *c, const T *g,
                               const T *d, const T *S_bar, T *k_bar, T *b_bar, T *v_bar,
                               T *scratch) {
    FLUSH_DENORMALS;
    if (NAME(bad_ids)(ids ? ids + b0 * L : NULL, (b1 - b0) * L, Dv)) return 1;
    const long nc = (L + C - 1) / C, state = Dk * Dv;
    /* Tr: S_b^T, S_0^T [Dv,Dk] or U^T [Dv,Cc] */
    T *Sb = scratch, *Tr = Sb + state, *Z = Tr + (Dk > C ? Dk : C) * Dv, *Ub = Z + C * Dv;
    T *Rb = Ub + C * Dv;
    T *M = Rb + C * Dv, *gK = M + C * C, *tmp = gK + C * Dk, *diag = tmp + C * Dk;
    T *steps = diag + C;                                   /* 2 Dv + C */
    memset(steps + Dv, 0, sizeof(T) * Dv);
    for (long i = b0; i < b1; ++i) {
        memcpy(Sb, S_bar + i * state, sizeof(T) * state);
        T nbar = 0;
        for (long ch = nc - 1; ch >= 0; --ch) {
            const long t0 = ch * C, Cc = L - t0 < C ? L - t0 : C, row = i * L + t0;
            const T *K = k + row * Dk;
            const T *S0 = ch == 0 ? NULL : states + (i * (nc - 1) + ch - 1) * state;
            const T *Ui = U + row * Dv, *Ei = E + (i * nc + ch) * C * C, *di = d + row;
            const T *gi = g + row;
            T *Kb = k_bar + row * Dk;
            /* the next chunk's: this sequence's chunk before, or the next sequence's last */
            const long pi = ch > 0 ? i : i + 1, pch = ch > 0 ? ch - 1 : nc - 1;
            if (pi < b1) {
                const long prow = pi * L + pch * C, pC = L - pch * C < C ? L - pch * C : C;
                if (pch > 0)
                    NAME(prefetch_read)(states + (pi * (nc - 1) + pch - 1) * state, state);
                NAME(prefetch_read)(k + prow * Dk, pC * Dk);
                NAME(prefetch_read)(U + prow * Dv, pC * Dv);
                NAME(prefetch_read)(r + prow * Dv, pC * Dv);
                NAME(prefetch_read)(w + (pi * nc + pch) * C * C, C * C);
                NAME(prefetch_read)(E + (pi * nc + pch) * C * C, C * C);
            }
            NAME(matmul)(Cc, Dv, Dk, K, Dk, 1, Sb, Dv, Z, Dv, NULL, 0);           /* K S_b */
            T s0dot = S0 ? NAME(dot)(Sb, S0, state) : 0;
            NAME(fwm_backward_sequence)(Cc, Dv, Z, di, S0 ? &s0dot : NULL, hk + row,
                                        n_pre + row, c + row, ch == 0,
                                        w + (i * nc + ch) * C * C, Ui, r + row * Dv,
                                        V ? V + row * Dv : NULL, ids ? ids + row : NULL,
                                        beta + row, &nbar, Ub, Rb, diag, b_bar + row, steps);
            if (v_bar)
                for (long t = 0; t < Cc; ++t)
                    for (long e = 0; e < Dv; ++e)
                        v_bar[(row + t) * Dv + e] = beta[row + t] * Ub[t * Dv + e];
            NAME(transpose)(Dk, Dv, Sb, Tr);                                     /* S_b^T */
            NAME(matmul)(Cc, Dk, Dv, Ui, Dv, 1, Tr, Dk, Kb, Dk, NULL, 0);
            for (long t = 0; t < Cc; ++t)
                for (long j = 0; j < Dk; ++j) Kb[t * Dk + j] = di[t] * Kb[t * Dk + j];
            /* G_b + G_b^T: tril(R_b U^T, -1) E off the diagonal, 2 diag on it */
            NAME(transpose)(Cc, Dv, Ui, Tr);                                     /* U^T */
            NAME(lower_product)(Cc, Dv, Rb, Tr, M);                   /* R_b U^T, s <= t */
            for (long t = 0; t < Cc; ++t) {
                for (long s = 0; s < t; ++s)
                    M[s * Cc + t] = M[t * Cc + s] = M[t * Cc + s] * Ei[t * Cc + s];
                M[t * Cc + t] = diag[t] + diag[t];
            }
            NAME(matmul)(Cc, Dk, Cc, M, Cc, 1, K, Dk, Kb, Dk, Kb, 1);
            if (!S0) continue;                 /* the zero state entering the sequence */
            NAME(transpose)(Dk, Dv, S0, Tr);                                     /* S_0^T */
            NAME(matmul)(Cc, Dk, Dv, Rb, Dv, 1, Tr, Dk, tmp, Dk, NULL, 0);
            for (long t = 0; t < Cc; ++t)
                for (long j = 0; j < Dk; ++j) {
                    Kb[t * Dk + j] = Kb[t * Dk + j] + gi[t] * tmp[t * Dk + j];
                    gK[t * Dk + j] = gi[t] * K[t * Dk + j];
                }
            NAME(matmul)(Dk, Dv, Cc, gK, 1, Dk, Rb, Dv, Sb, Dv, Sb, di[0]);  /* d_0 S_b + */
        }
    }
    return 0;
}
