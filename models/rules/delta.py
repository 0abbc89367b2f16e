"""The delta rule with a learned write strength (Schlag, Irie & Schmidhuber 2021,
arXiv 2102.11174, eqs. 23-25):

    u_t = beta_t (v_t - S_{t-1}^T k_t)        (new value minus what the memory returns)
    S_t = S_{t-1} + k_t u_t^T
    o_t = S_t^T q_t

with k, q sum-normalised phi(k), phi(q) and beta_t = sigmoid(W_b x_t). Unlike the sum rule it
can overwrite: writing (k, v2) after (k, v1) with beta = 1 leaves v2.

Fast form: the chunkwise-parallel algorithm (Yang et al. 2024, arXiv 2406.06484). For a chunk
of C positions entering with state S0, the recurrence inside the chunk is the triangular
system (I + tril(diag(beta) K K^T, -1)) U' = diag(beta) (V - K S0), solved explicitly:

    T  = (I + tril(diag(beta) K K^T, -1))^-1      (unit lower triangular)
    U' = T diag(beta) (V - K S0)                   (= U - W S0 with the WY / UT representation
                                                    W = T diag(beta) K, U = T diag(beta) V)
    O  = Q S0 + tril(Q K^T) U',   S_next = S0 + K^T U'

Only the loop over chunks is sequential. Forms, each checked against the plain loop
``delta_rule_recurrent`` (tests/test_rules.py, tests/test_fast_paths.py):

    delta_rule_recurrent       reference loop over positions
    delta_rule_chunkwise       chunkwise form, dense values, outputs and final state; with a
                               gradient to compute, a hand-written backward
                               (``DeltaRuleChunkwise``), else autograd through
                               ``delta_rule_chunkwise_autograd``
    delta_rule_write_one_hot   chunkwise final state only, for one-hot values v_t = e_{id_t}:
                               diag(beta) V is then a scatter, so U = T diag(beta) V costs
                               O(C^2) per chunk instead of O(C^2 D_v) (plain autograd)
    delta_rule_write           the same final state (dense or one-hot values) with a
                               hand-written backward (``DeltaRuleWrite``): what DeltaRule uses
    delta_rule_answer          S_L^T q for a few queries without the state: the query carried
                               backwards through the writes (training's single query), in C
                               for up to 4 queries (``DeltaAnswer``), else chunk by chunk

Why U' = T diag(beta) (V - K S0) rather than U - W S0: it needs C^2 D_v multiply-adds where
W = T diag(beta) K needs C^2 D_k, and D_k = d_dot (128..384) is usually larger than D_v here;
for the first chunk (S0 = 0) both reduce to U.
"""
from __future__ import annotations

import torch
from torch import Tensor

from models.rules.base import UpdateRule
from models.rules.blocks import block_size, in_blocks
from models.rules.native import delta_answer_backward, delta_answer_forward, steps

# Measured on the 2-core CPU (B = 32, D_k = 128, L = 40..400): C = 32 was fastest or within noise
# of the best of C = 16..128, fwd + bwd; a sequence of L <= 32 is one chunk.
DEFAULT_CHUNK = 32
# The compiled answer (one position at a time, keeping L x Q x D_k carried queries per sequence)
# beats the chunkwise solves up to about 8 queries per sequence and loses badly from 16 (measured
# at B = 32, L = 200, D_k = 128: fwd + bwd 1.1 vs 8.0 ms at Q = 1, 37 vs 10 ms at Q = 16).
NATIVE_MAX_QUERIES = 4


def delta_rule_recurrent(q: Tensor | None, k: Tensor, v: Tensor, beta: Tensor,
                         initial_state: Tensor | None = None):
    """Reference loop. q, k [B, L, D_k], v [B, L, D_v], beta [B, L]
    -> (o [B, L, D_v] or None, S [B, D_k, D_v])."""
    B, L, D_k = k.shape
    S = k.new_zeros(B, D_k, v.shape[2]) if initial_state is None else initial_state
    outputs = []
    q_steps = q.unbind(1) if q is not None else [None] * L
    for q_t, k_t, v_t, b_t in zip(q_steps, k.unbind(1), v.unbind(1), beta.unbind(1)):
        retrieved = torch.einsum("bkv,bk->bv", S, k_t)
        u_t = b_t[:, None] * (v_t - retrieved)
        S = S + k_t[:, :, None] * u_t[:, None, :]
        if q_t is not None:
            outputs.append(torch.einsum("bkv,bk->bv", S, q_t))
    return (torch.stack(outputs, dim=1) if q is not None else None), S


def chunk_transform(K: Tensor, b: Tensor) -> Tensor:
    """T = (I + tril(diag(b) K K^T, -1))^-1 for one chunk. K [B, C, D_k], b [B, C, 1] -> [B, C, C].

    Formed explicitly by a unit-triangular solve against I (measured faster than solving
    against the wide right-hand side directly, and T is reused).
    """
    return transform_from_gram(K @ K.transpose(1, 2), b)


def transform_from_gram(G: Tensor, b: Tensor) -> Tensor:
    """``chunk_transform`` from the chunk's Gram matrix G = K K^T [B, C, C]."""
    B, C, _ = G.shape
    eye = torch.eye(C, dtype=G.dtype, device=G.device)
    A = (b * G).tril(-1)                                               # [B, C, C]
    return torch.linalg.solve_triangular(eye + A, eye.expand(B, C, C), upper=False,
                                         unitriangular=True)


def delta_rule_chunkwise(q: Tensor | None, k: Tensor, v: Tensor, beta: Tensor,
                         chunk_size: int = DEFAULT_CHUNK, initial_state: Tensor | None = None):
    """Chunkwise form; same arguments and results as ``delta_rule_recurrent``.

    With outputs and a gradient to compute, ``DeltaRuleChunkwise`` (hand-written backward), on
    blocks of sequences whose states fit in L2 (models/rules/blocks.py); otherwise, and under
    torch.func transforms (vmap), ``delta_rule_chunkwise_autograd``. The hand-written backward
    is not twice differentiable: for second derivatives call the autograd form directly."""
    needs_grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (q, k, v, beta, initial_state))
    if (q is not None and k.shape[1] > 0 and needs_grad
            and not torch._C._are_functorch_transforms_active()):
        block = block_size(k.shape[0], k.shape[2] * v.shape[2] * k.element_size(), k.device)
        return in_blocks(lambda *parts: DeltaRuleChunkwise.apply(*parts, int(chunk_size)),
                         block, q, k, v, beta, initial_state)          # states in L2
    return delta_rule_chunkwise_autograd(q, k, v, beta, chunk_size, initial_state)


def delta_rule_chunkwise_autograd(q: Tensor | None, k: Tensor, v: Tensor, beta: Tensor,
                                  chunk_size: int = DEFAULT_CHUNK,
                                  initial_state: Tensor | None = None):
    """Chunkwise form differentiated by autograd; same arguments and results as
    ``delta_rule_recurrent``.

    Everything that does not depend on the entering state (T, diag(b) V, diag(b) K, the masked
    Q K^T) is computed for all chunks at once, as [B * N, C, C] batches; only the state
    recurrence loops over chunks. Chunks come from views/``split`` (one backward op each), not
    from slicing k[:, a:b] inside the loop, whose backward would allocate and fill a full
    [B, L, D] gradient per chunk (O(L^2 / C) work).
    """
    B, L, D_k = k.shape
    D_v = v.shape[2]
    C = min(chunk_size, max(L, 1))
    N = L // C                                                         # full chunks
    parts = []                                                         # (Q, K, T, bV, bK, QK) per chunk
    if N:
        full = N * C
        def chunks(x):                                                 # [B, L, d] -> [B * N, C, d]
            return x[:, :full].reshape(B * N, C, x.shape[-1])
        K_all, b_all = chunks(k), chunks(beta[:, :, None])
        T_all = chunk_transform(K_all, b_all)                          # [B * N, C, C]
        bV_all = (b_all * chunks(v)).view(B, N, C, D_v).unbind(1)
        bK_all = (b_all * K_all).view(B, N, C, D_k).unbind(1)
        T_list = T_all.view(B, N, C, C).unbind(1)
        K_list = K_all.view(B, N, C, D_k).unbind(1)
        if q is not None:
            Q_all = chunks(q)
            QK_list = (Q_all @ K_all.transpose(1, 2)).tril().view(B, N, C, C).unbind(1)
            Q_list = Q_all.view(B, N, C, D_k).unbind(1)
        else:
            QK_list = Q_list = [None] * N
        parts = list(zip(Q_list, K_list, T_list, bV_all, bK_all, QK_list))
    if L > N * C:                                                      # the shorter last chunk
        K, b = k[:, N * C:], beta[:, N * C:, None]
        Q = q[:, N * C:] if q is not None else None
        parts.append((Q, K, chunk_transform(K, b), b * v[:, N * C:], b * K,
                      (Q @ K.transpose(1, 2)).tril() if Q is not None else None))
    S = initial_state                                                  # None: the zero state
    outputs = []
    for Q, K, T, bV, bK, QK in parts:
        # U' = T diag(b) (V - K S0) = T (bV - bK S0)                   [B, C, D_v]
        U = T @ (bV if S is None else torch.baddbmm(bV, bK, S, alpha=-1))
        if Q is not None:
            O = QK @ U                                                 # [B, C, D_v]
            outputs.append(O if S is None else torch.baddbmm(O, Q, S))
        S = K.transpose(1, 2) @ U if S is None else torch.baddbmm(S, K.transpose(1, 2), U)
    if S is None:                                                      # L = 0
        S = k.new_zeros(B, D_k, D_v)
    return (torch.cat(outputs, dim=1) if q is not None else None), S


class DeltaRuleChunkwise(torch.autograd.Function):
    """Outputs and final state of the chunkwise delta rule with a hand-written backward
    (what ``delta_rule_chunkwise`` runs when a gradient is needed).

    Forward per chunk (entering state S0; bK = diag(b) K, bV = diag(b) V, P = [bK; Q] S0 as
    one product):  X = bV - bK S0,  U = T X,  O = tril(Q K^T) U + Q S0,  S1 = S0 + K^T U.
    Backward per chunk, given H = dS1 and dO (``Z = [-dX; dO]``):
        dU = tril(Q K^T)^T dO + K H,   dX = T^T dU,   dK += U H^T
        [dbK; dQ] += Z S0^T,   dS0 = H + [bK; Q]^T Z               (the only sequential part)
    and afterwards, for all chunks at once: dT = dU X^T, dA = -tril(T^T dT T^T, -1) as in
    ``DeltaRuleWrite``, dQK = tril(dO U^T), dV = diag(b) dX, db = rowsum(dX V + dbK K + dA G).
    Against autograd through the same loop: one product [bK; Q] S0 and one [bK; Q]^T Z per
    chunk instead of two each, and no state-sized sums of gradient parts. Keeps each chunk's
    entering state, as autograd does. Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, q, k, v, beta, initial_state, chunk_size):
        groups = _chunk_groups(k.shape[1], chunk_size)
        S = initial_state
        outputs, saved = [], []
        for start, n, C in groups:
            g = _group_tensors(q, k, v, beta, start, n, C)
            U_list, X_list, S0_list = [], [], []
            for j in range(n):
                K, T, bV, QK = g["K"][:, j], g["T"][:, j], g["bV"][:, j], g["QK"][:, j]
                if S is None:
                    X = bV
                    U = T @ X
                    O = QK @ U
                    S0_list.append(None)
                    S = K.transpose(1, 2) @ U
                else:
                    P = g["BQ"][:, j] @ S                                 # [B, 2C, D_v]
                    X = bV - P[:, :C]
                    U = T @ X
                    O = torch.baddbmm(P[:, C:], QK, U)
                    S0_list.append(S)
                    S = torch.baddbmm(S, K.transpose(1, 2), U)
                U_list.append(U)
                X_list.append(X)
                outputs.append(O)
            g["U"], g["X"] = torch.stack(U_list, 1), torch.stack(X_list, 1)   # [B, n, C, D_v]
            saved.append((start, n, C, g, S0_list))
        ctx.saved = saved
        ctx.save_for_backward(q, k, v, beta)
        return torch.cat(outputs, dim=1), S

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dO, dS):
        q, k, v, beta = ctx.saved_tensors
        (B, L, D_k), D_v = k.shape, v.shape[2]
        H = dS
        grads = []                                                        # per group, last first
        for start, n, C, g, S0_list in reversed(ctx.saved):
            dO_g = dO[:, start:start + n * C].reshape(B, n, C, D_v).contiguous()
            Y = g["QK"].transpose(2, 3) @ dO_g                            # [B, n, C, D_v]
            Tn = g["T"].transpose(2, 3).neg()                             # -T^T
            dU_list, nX_list, dKS_list, PZ_list = [], [], [], []
            for j in range(n - 1, -1, -1):
                dU = torch.baddbmm(Y[:, j], g["K"][:, j], H)             # [B, C, D_v]
                dKS_list.append(g["U"][:, j] @ H.transpose(1, 2))       # [B, C, D_k]
                nX = Tn[:, j] @ dU                                        # -dX
                S0 = S0_list[j]
                if S0 is not None:
                    Z = torch.cat([nX, dO_g[:, j]], dim=1)                # [B, 2C, D_v]
                    PZ_list.append(Z @ S0.transpose(1, 2))                # [B, 2C, D_k]: [dbK; dQ]
                    H = torch.baddbmm(H, g["BQ"][:, j].transpose(1, 2), Z)
                else:
                    PZ_list.append(k.new_zeros(B, 2 * C, D_k))
                    H = None
                dU_list.append(dU)
                nX_list.append(nX)
            rev = lambda xs: torch.stack(xs[::-1], 1)
            dU, nX, dK, PZ = rev(dU_list), rev(nX_list), rev(dKS_list), rev(PZ_list)
            K, Q, b, G = g["K"], g["Q"], g["b"], g["G"]
            dbK, dQ = PZ[:, :, :C], PZ[:, :, C:]
            dQK = (dO_g @ g["U"].transpose(2, 3)).tril()                 # [B, n, C, C]
            dT = dU @ g["X"].transpose(2, 3)
            dA = (Tn @ dT @ Tn).tril(-1).neg_()                           # T^T dT T^T = Tn dT Tn
            dG = b * dA
            flat = lambda x: x.reshape(B * n, x.shape[2], x.shape[3])   # views here
            dK3 = flat(dK.addcmul_(b, dbK))                               # the stack's own copy
            dK3.baddbmm_(flat(dG + dG.transpose(2, 3)), flat(K))
            dK3.baddbmm_(flat(dQK).transpose(1, 2), flat(Q))
            dQ = torch.baddbmm(flat(dQ), flat(dQK), flat(K)).view(B, n, C, D_k)
            V = v[:, start:start + n * C].reshape(B, n, C, D_v)
            db = (dA * G).sum(-1) - (nX * V).sum(-1) + (dbK * K).sum(-1)  # [B, n, C]
            grads.append((dQ.reshape(B, n * C, D_k), dK.reshape(B, n * C, D_k),
                          (-b * nX).reshape(B, n * C, D_v), db.reshape(B, n * C)))
        dq, dk, dv, dbeta = (torch.cat(parts[::-1], dim=1) for parts in zip(*grads))
        return dq, dk, dv, dbeta, H, None


def _chunk_groups(L: int, chunk_size: int) -> list[tuple[int, int, int]]:
    """(start, number of chunks, chunk length) of the full chunks and of a shorter last one."""
    C = min(chunk_size, L)
    N = L // C
    groups = [(0, N, C)]
    if L > N * C:
        groups.append((N * C, 1, L - N * C))
    return groups


def _group_tensors(q, k, v, beta, start: int, n: int, C: int) -> dict:
    """The state-independent tensors of n chunks of C positions from `start`, as [B, n, C, ...]
    batches: K, Q, b, G = K K^T, T, bV, BQ = [diag(b) K; Q] ([B, n, 2C, D_k]), QK = tril(Q K^T)."""
    B = k.shape[0]
    # Contiguous (one copy where the chunks do not cover the sequence): the [B, n, ...] batched
    # products below would otherwise each copy their operands into [B * n, ...] batches.
    part = lambda x: x[:, start:start + n * C].reshape(B, n, C, x.shape[-1]).contiguous()
    K, Q, V, b = part(k), part(q), part(v), part(beta[:, :, None])
    G = K @ K.transpose(2, 3)                                          # [B, n, C, C]
    T = transform_from_gram(G.view(B * n, C, C), b.view(B * n, C, 1)).view(B, n, C, C)
    return dict(K=K, Q=Q, b=b, G=G, T=T, bV=b * V, BQ=torch.cat([b * K, Q], dim=2),
                QK=(Q @ K.transpose(2, 3)).tril())


def delta_rule_write_one_hot(k: Tensor, ids: Tensor, d_value: int, beta: Tensor,
                             chunk_size: int = DEFAULT_CHUNK) -> Tensor:
    """Final state S_L [B, D_k, D_v] of the delta rule for one-hot values v_t = e_{ids[:, t]}.

    k [B, L, D_k], ids [B, L] long in 0..D_v-1, beta [B, L]. Equals
    ``delta_rule_chunkwise(None, k, one_hot(ids, D_v), beta, chunk_size)[1]``.

    Per chunk, diag(b) V has one non-zero per row (b_j at column ids_j), so
        T diag(b) V = scatter_add over columns ids_j of the columns b_j T[:, j]      O(C^2)
        diag(b) (V - K S0) = -diag(b) K S0, plus b_j added at (j, ids_j)           O(C D_k D_v)
    """
    B, L, D_k = k.shape
    S = None
    for K, b, I in zip(k.split(chunk_size, dim=1), beta[:, :, None].split(chunk_size, dim=1),
                       ids.split(chunk_size, dim=1)):
        # K [B, C, D_k], b [B, C, 1], I [B, C]
        C = K.shape[1]
        T = chunk_transform(K, b)                                     # [B, C, C]
        if S is None:
            # U = T diag(b) V: column j of T (scaled by b_j) goes to value column I_j.
            bT = T * b.transpose(1, 2)                                # [B, C, C]: T_ij b_j
            U = k.new_zeros(B, C, d_value).scatter_add(2, I[:, None, :].expand(B, C, C), bT)
            S = K.transpose(1, 2) @ U                                 # [B, D_k, D_v]
        else:
            Y = (-b * (K @ S)).scatter_add(2, I[:, :, None], b)       # diag(b)(V - K S0) [B, C, D_v]
            S = S + K.transpose(1, 2) @ (T @ Y)
    if S is None:
        S = k.new_zeros(B, D_k, d_value)
    return S


class DeltaRuleWrite(torch.autograd.Function):
    """Final state of the chunkwise delta rule with a hand-written backward.

    Forward per chunk (K [C, D_k], b [C], entering state S0, first chunk S0 = 0):
        G = K K^T,  A = tril(diag(b) G, -1),  T = (I + A)^-1,  R = V - K S0,
        U = T diag(b) R,  S_next = S0 + K^T U
    Backward, given dS_next = H (reverse order over chunks):
        dU = K H,  dK = U H^T,  dT = dU (diag(b) R)^T,  dR~ = T^T dU  (d of diag(b) R)
        db = rowsum(dR~ * R),  dV = diag(b) dR~,  dK -= dV S0^T,  dS0 = H - K^T dV
        dA = -tril(T^T dT T^T, -1)                     (d(M^-1) = -M^-1 dM M^-1)
        db += rowsum(dA * G),  dK += (diag(b) dA + (diag(b) dA)^T) K
    Against autograd through ``delta_rule_write_one_hot`` this saves the triangular solve in
    the backward (T is at hand: two C x C x C products instead), one of the two products for
    d(K K^T), and with one-hot values the O(C^2 D_v) product dU (diag(b) V)^T (a gather).
    Keeps T, U, R, G and each chunk's entering state (L / C states of D_k x D_v per sequence).
    Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, k, beta, v, ids, d_value, chunk_size):
        # k [B, L, D_k], beta [B, L]; either v [B, L, D_v] (ids None) or ids [B, L] (v None)
        B, L, D_k = k.shape
        one_hot = ids is not None
        chunks = []
        S = None
        value_chunks = ids.split(chunk_size, dim=1) if one_hot else v.split(chunk_size, dim=1)
        for K, b, X in zip(k.split(chunk_size, dim=1), beta[:, :, None].split(chunk_size, dim=1),
                           value_chunks):
            # K [B, C, D_k], b [B, C, 1], X: ids [B, C] or V [B, C, D_v]
            C = K.shape[1]
            eye = torch.eye(C, dtype=k.dtype, device=k.device)
            G = K @ K.transpose(1, 2)                                 # [B, C, C]
            T = torch.linalg.solve_triangular(eye + (b * G).tril(-1), eye.expand(B, C, C),
                                              upper=False, unitriangular=True)
            if S is None and one_hot:
                R = None                                              # R = V, kept as ids
                U = k.new_zeros(B, C, d_value).scatter_add_(
                    2, X[:, None, :].expand(B, C, C), T * b.transpose(1, 2))
            else:
                if S is None:
                    R = X
                elif one_hot:
                    R = (K @ S).neg_().scatter_add_(2, X[:, :, None], eye.new_ones(1, 1, 1).expand(B, C, 1))
                else:
                    R = X - K @ S                                     # [B, C, D_v]
                U = T @ (b * R)                                       # [B, C, D_v]
            chunks.append((G, T, U, R, S))
            S = K.transpose(1, 2) @ U if S is None else torch.baddbmm(S, K.transpose(1, 2), U)
        if S is None:
            S = k.new_zeros(B, D_k, d_value)
        ctx.save_for_backward(k, beta, ids if one_hot else None)
        ctx.chunks, ctx.chunk_size, ctx.one_hot = chunks, chunk_size, one_hot
        return S

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dS):
        k, beta, ids = ctx.saved_tensors
        chunk_size, one_hot, chunks = ctx.chunk_size, ctx.one_hot, ctx.chunks
        K_chunks = k.split(chunk_size, dim=1)
        b_chunks = beta[:, :, None].split(chunk_size, dim=1)
        I_chunks = ids.split(chunk_size, dim=1) if one_hot else [None] * len(K_chunks)
        dK_chunks, db_chunks, dV_chunks = [], [], []
        H = dS                                                        # dL/d(state leaving chunk)
        for K, b, I, (G, T, U, R, S0) in zip(reversed(K_chunks), reversed(b_chunks),
                                             reversed(I_chunks), reversed(chunks)):
            B, C, _ = K.shape
            dU = K @ H                                                # [B, C, D_v]
            dK = U @ H.transpose(1, 2)                                # [B, C, D_k]
            if R is None:
                # First chunk, one-hot: diag(b) R = diag(b) V has b_j at (j, I_j), so
                # dT_ij = dU[i, I_j] b_j and db_j = sum_i T_ij dU[i, I_j] (gathers, O(C^2)).
                dU_at = dU.gather(2, I[:, None, :].expand(B, C, C))   # [B, C, C]: dU[i, I_j]
                dT = dU_at * b.transpose(1, 2)
                db = (T * dU_at).sum(1)                               # [B, C]
            else:
                dT = dU @ (b * R).transpose(1, 2)                     # [B, C, C]
                dbR = T.transpose(1, 2) @ dU                          # d(diag(b) R) [B, C, D_v]
                db = (dbR * R).sum(-1)                                # [B, C]
                dV = b * dbR                                          # dL/dR = dL/dV
                if S0 is not None:
                    dK = torch.baddbmm(dK, dV, S0.transpose(1, 2), alpha=-1)
                    H = torch.baddbmm(H, K.transpose(1, 2), dV, alpha=-1)
                if not one_hot:
                    dV_chunks.append(dV)
            Tt = T.transpose(1, 2)
            dA = (Tt @ dT @ Tt).tril(-1).neg_()                       # [B, C, C]
            db = db + (dA * G).sum(-1)
            dG = b * dA
            dK = torch.baddbmm(dK, dG + dG.transpose(1, 2), K)
            dK_chunks.append(dK)
            db_chunks.append(db)
        dk = torch.cat(dK_chunks[::-1], dim=1)
        dbeta = torch.cat(db_chunks[::-1], dim=1)
        dv = torch.cat(dV_chunks[::-1], dim=1) if dV_chunks else None
        return dk, dbeta, dv, None, None, None


def delta_rule_write(k: Tensor, v: Tensor | None, beta: Tensor, chunk_size: int = DEFAULT_CHUNK,
                     ids: Tensor | None = None, d_value: int | None = None) -> Tensor:
    """Final delta-rule state S_L [B, D_k, D_v] with a hand-written backward.

    Dense values: ``delta_rule_write(k, v, beta)``, v [B, L, D_v]. One-hot values:
    ``delta_rule_write(k, None, beta, ids=ids, d_value=D_v)``, ids [B, L] long. Equals
    ``delta_rule_chunkwise(None, k, v, beta, chunk_size)[1]`` (forward and backward).
    """
    if (v is None) == (ids is None):
        raise ValueError("give either dense values v or one-hot ids")
    if ids is not None and d_value is None:
        raise ValueError("one-hot ids need d_value")
    d_value = v.shape[2] if v is not None else int(d_value)
    if torch._C._are_functorch_transforms_active():
        # Under vmap (vectorised seeds) the hand-written backward, which keeps per-chunk
        # tensors on ctx, cannot be batched: use the equal autograd forms instead.
        if ids is None:
            return delta_rule_chunkwise(None, k, v, beta, int(chunk_size))[1]
        return delta_rule_write_one_hot(k, ids, d_value, beta, int(chunk_size))
    return DeltaRuleWrite.apply(k, beta, v, ids, d_value, int(chunk_size))


def delta_rule_answer(q: Tensor, k: Tensor, v: Tensor | None, beta: Tensor,
                      chunk_size: int = DEFAULT_CHUNK, ids: Tensor | None = None,
                      d_value: int | None = None) -> Tensor:
    """Answers y = S_L^T q [B, Q, D_v] of the final delta-rule state, without building it.

    q [B, Q, D_k], k [B, L, D_k], beta [B, L]; values dense (v [B, L, D_v]) or one-hot
    (v None, ids [B, L], d_value). Equals ``q @ delta_rule_write(k, v, beta, ...)``.

    The state is linear in the values: U = T diag(beta) V with T = (I + tril(diag(beta) K K^T,
    -1))^-1 over the whole sequence, so y^T = U^T K q^T = V^T diag(beta) Z with Z = T^T K q^T:
    the query carried backwards through the writes,

        Z_t = k_t . h_t,   h_t = q - sum_{s > t} beta_s Z_s k_s     (h: [D_k, Q] per sequence)

    Two forms, neither of which touches a D_k x D_v matrix (the state costs O(L D_k D_v)):
    - up to NATIVE_MAX_QUERIES queries (training has one), the recurrence itself, position by
      position in C (``DeltaAnswer``, hand-written backward): O(L D_k Q);
    - otherwise chunkwise, last chunk first, with A_c = tril(diag(b_c) K_c K_c^T, -1) as in the
      write: Z_c = (I + A_c)^-T K_c h, h <- h - K_c^T diag(b_c) Z_c; O(L D_k (C + 2Q)), plain
      autograd (the triangular solves have their own backward). Also the form under torch.func
      transforms and wherever the compiled steps cannot run.
    """
    B, L, D_k = k.shape
    if ids is not None and d_value is None:
        raise ValueError("one-hot ids need d_value")
    num_queries = q.shape[1]
    if L == 0:                                                        # the zero state
        return q @ q.new_zeros(B, D_k, int(d_value) if ids is not None else v.shape[2])
    library = steps(q, k, beta) if num_queries <= NATIVE_MAX_QUERIES else None
    if library is not None:
        # One position at a time in C (csrc/delta_answer_impl.h): Z_t = k_t . h_t directly.
        W = DeltaAnswer.apply(q, k, beta, library).transpose(1, 2)    # [B, Q, L]
    else:
        W = _answer_weights_chunkwise(q, k, beta, chunk_size)
    if ids is not None:                                               # V^T W^T as a scatter
        return W.new_zeros(B, num_queries, int(d_value)).scatter_add(
            2, ids[:, None, :].expand(B, num_queries, L), W)
    return W @ v                                                      # [B, Q, D_v]


def _answer_weights_chunkwise(q: Tensor, k: Tensor, beta: Tensor, chunk_size: int) -> Tensor:
    """beta_t Z_t of ``delta_rule_answer`` for every position, [B, Q, L], chunk by chunk."""
    h = q.transpose(1, 2)                                             # [B, D_k, Q]
    answers = []                                                      # beta_t Z_t, last chunk first
    for K, b in zip(reversed(k.split(chunk_size, dim=1)), reversed(beta[:, :, None].split(chunk_size, dim=1))):
        # K [B, C, D_k], b [B, C, 1]. The solve reads A's strict lower triangle only
        # (transposed: the strict upper), so the rest of b * G is never masked.
        A = b * (K @ K.transpose(1, 2))                               # [B, C, C]
        Z = torch.linalg.solve_triangular(A.transpose(1, 2), K @ h, upper=True,
                                          unitriangular=True)         # [B, C, Q]
        bZ = b * Z
        h = torch.baddbmm(h, K.transpose(1, 2), bZ, alpha=-1)
        answers.append(bZ)
    return torch.cat(answers[::-1], dim=1).transpose(1, 2)            # [B, Q, L]


class DeltaAnswer(torch.autograd.Function):
    """beta_t Z_t [B, L, Q] of ``delta_rule_answer`` by the position-by-position recurrence in C
    (``models/rules/native.py``): O(L D_k Q) per sequence, no triangular solves. Keeps the carried
    query before every position (L x Q x D_k per sequence) for the backward. Not twice
    differentiable."""

    @staticmethod
    def forward(ctx, q, k, beta, library):
        # library: the compiled steps, ``steps(q, k, beta)`` of models/rules/native.py
        w, z, hs = delta_answer_forward(library, q.contiguous(), k.contiguous(), beta.contiguous())
        ctx.save_for_backward(k, beta, z, hs)
        ctx.library = library
        return w

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dw):
        k, beta, z, hs = ctx.saved_tensors
        dq, dk, dbeta = delta_answer_backward(ctx.library, dw.contiguous(), k.contiguous(),
                                              beta.contiguous(), z, hs)
        return dq, dk, dbeta, None


class DeltaRule(UpdateRule):
    """Delta rule on sum-normalised keys and queries; no attention normaliser on reads."""

    name = "delta"
    uses_beta = True
    key_norm = "sum"
    query_norm = "sum"

    def __init__(self, d_key: int, d_value: int, chunk_size: int = DEFAULT_CHUNK):
        super().__init__(d_key, d_value)
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.chunk_size = int(chunk_size)

    def write(self, k, v, beta):
        return delta_rule_write(k, v, beta, self.chunk_size)

    def write_one_hot(self, k, ids, beta):
        """``write`` for values v = one_hot(ids, d_value), without forming V (see module doc)."""
        return delta_rule_write(k, None, beta, self.chunk_size, ids=ids, d_value=self.d_value)

    def read(self, state, q):
        return q @ state

    def answer_one_hot(self, q, k, ids, beta):
        """``read(write_one_hot(k, ids, beta), q)`` without building the state (the query
        carried backwards through the writes: ``delta_rule_answer``)."""
        return delta_rule_answer(q, k, None, beta, self.chunk_size, ids=ids, d_value=self.d_value)

    def answers_cheaper(self, num_queries: int, length: int) -> bool:
        """Whether ``answer_one_hot`` costs less than write + read: O(L D_k (C + 2Q)) against
        O(L D_k 2 D_v) multiply-adds (training's one query per sequence; not evaluation's S)."""
        return min(self.chunk_size, length) + 2 * num_queries < 2 * self.d_value

    def causal(self, q, k, v, beta):
        return delta_rule_chunkwise(q, k, v, beta, self.chunk_size)[0]

    def extra_repr(self) -> str:
        return f"chunk_size={self.chunk_size}"
