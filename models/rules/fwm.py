"""The Fast Weight Memory update of Schlag, Munkhdalai & Schmidhuber (2021, "Learning
Associative Inference Using Fast Weight Memory", arXiv 2011.07831), as used as the
"Schlag (2021)" baseline of arXiv 2102.11174:

    W_1 = beta_1 v_1 k_1^T
    W_t = clip(W_{t-1} + beta_t (v_t - W_{t-1} k_t) k_t^T),  clip(W) = W / max(1, ||W||_F)
    y   = LayerNorm(W_L q)     (no affine parameters, over the D_v outputs)

Keys are not normalised. As in the original code the first write is not clipped.

Chunkwise form (``fwm_chunkwise``, autograd; what runs under vmap and for evaluation): never
touch the D_k x D_v state inside the loop. In a chunk of C positions entering with state W_0
(S = W^T), keep the retrievals R[s] = W_{t-1}^T k_s of all later positions s of the chunk
([B, C, D_v], the only thing a step needs from the state), and with G = K K^T:

    u_t  = beta_t (v_t - R[t])                      (u_t is the update written with k_t)
    n'_t = n_{t-1} + 2 u_t . R[t] + |k_t|^2 |u_t|^2   (||W'_t||^2; n_t = ||W_t||^2)
    c_t  = 1 / max(1, sqrt(n'_t)),  n_t = c_t^2 n'_t = min(n'_t, 1)      (c_1 = 1: no clip)
    R[s] <- c_t (R[s] + G_st u_t)   for s > t      (W_t = c_t (W_{t-1} + k_t u_t^T))
    W_C  = (prod_t c_t) W_0 + sum_t (prod_{s >= t} c_s) k_t u_t^T    (one product per chunk)

Every quantity is in the true scale (the clip factors only shrink), so nothing can overflow and
no refold is needed; per step the loop touches [B, D_v] vectors and the [B, C - t, D_v] block of
later retrievals instead of the [B, D_k, D_v] state.

``fwm_write`` (what FWMRule uses) computes the same state the other way round: a step reads
r_t from the updates u_s written so far in the chunk (one small product, nothing of size
[C, D_v] written per step), which also keeps its hand-written backward small (``FWMWrite``,
in PyTorch). With the compiled library the same arithmetic runs in C one sequence at a time
(``FWMChunked``), and for tiny states one position at a time (``FWMSequential``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from models.rules.base import UpdateRule
from models.rules.blocks import block_size, in_blocks
from models.rules.native import (fwm_chunked_backward, fwm_chunked_forward,
                                 fwm_sequential_backward, fwm_sequential_forward, steps)

# The sequential write (FWMSequential) for states of at most this many bytes, the chunked one
# (FWMChunked) above: measured on the 2-core CPU, see fwm_write.
SEQUENTIAL_STATE_BYTES = 2560
# The sequential backward keeps its checkpoints and a chunk's rebuilt states in about this much.
SEQUENTIAL_WORK_BYTES = 512 << 10

def _clip_factor(norm: Tensor) -> Tensor:
    return 1.0 / torch.clamp(norm, min=1.0)


def value_chunks(chunks, d_value: int | None, dtype: torch.dtype):
    """Chunks of the values (``v.split(C, dim=1)``, in any order) as the steps take them:
    contiguous [B, C, D_v] slices of v [B, L, D_v]; or, for one-hot ids [B, L] (d_value given),
    one-hot rows built one chunk at a time: the floats of F.one_hot(ids, d_value) without its
    [B, L, D_v] int64 tensor and float copy."""
    for chunk in chunks:
        if d_value is None:
            yield chunk.contiguous()
        else:
            yield chunk.new_zeros(*chunk.shape, d_value, dtype=dtype).scatter_(2, chunk[:, :, None], 1.0)


def fwm_recurrent(q: Tensor | None, k: Tensor, v: Tensor, beta: Tensor):
    """Reference loop (state S = W^T). q, k [B, L, D_k], v [B, L, D_v], beta [B, L]
    -> (o [B, L, D_v] = S_t^T q_t before LayerNorm, or None; S_L [B, D_k, D_v])."""
    B, L, D_k = k.shape
    S = k.new_zeros(B, D_k, v.shape[2])
    outputs = []
    q_steps = q.unbind(1) if q is not None else [None] * L
    for t, (q_t, k_t, v_t, b_t) in enumerate(zip(q_steps, k.unbind(1), v.unbind(1), beta.unbind(1))):
        retrieved = torch.einsum("bkv,bk->bv", S, k_t)
        S = S + k_t[:, :, None] * (b_t[:, None] * (v_t - retrieved))[:, None, :]
        if t > 0:
            S = S * _clip_factor(S.flatten(1).norm(dim=1))[:, None, None]
        if q_t is not None:
            outputs.append(torch.einsum("bkv,bk->bv", S, q_t))
    return (torch.stack(outputs, dim=1) if q is not None else None), S


def fwm_chunkwise(k: Tensor, v: Tensor, beta: Tensor, chunk_size: int = 64) -> Tensor:
    """Final FWM state S_L [B, D_k, D_v] (see module doc); equals ``fwm_recurrent(None, ...)[1]``.

    k [B, L, D_k], v [B, L, D_v], beta [B, L]. Differentiable by autograd.
    """
    B, L, D_k = k.shape
    D_v = v.shape[2]
    S = None                                   # entering state of the chunk; None: zero
    n = k.new_zeros(B)                         # ||S||_F^2
    first = True                               # the sequence's first write is not clipped
    for K, V, b in zip(k.split(chunk_size, dim=1), v.split(chunk_size, dim=1),
                       beta.split(chunk_size, dim=1)):
        # K [B, C, D_k], V [B, C, D_v], b [B, C]
        C = K.shape[1]
        G = K @ K.transpose(1, 2)                                     # [B, C, C]
        half_kk = 0.5 * G.diagonal(dim1=1, dim2=2)                    # [B, C]: |k_t|^2 / 2
        R = K @ S if S is not None else K.new_zeros(B, C, D_v)       # [B, C, D_v]: S^T k_s
        updates, clips = [], []
        # Per-step views made once: at evaluation sizes each op costs more than its arithmetic.
        steps = zip((V * b[:, :, None]).unbind(1), b[:, :, None].unbind(1),
                    half_kk[:, :, None].unbind(1), G.unbind(2))
        for t, (bv_t, b_t, hk_t, g_t) in enumerate(steps):
            r_t = R[:, 0]                                             # [B, D_v]: S_{t-1}^T k_t
            u_t = torch.addcmul(bv_t, b_t, r_t, value=-1.0)           # [B, D_v]: b_t (v_t - r_t)
            n_pre = torch.add(n, (u_t * torch.addcmul(r_t, u_t, hk_t)).sum(-1), alpha=2.0)
            if first:
                c_t, n, first = torch.ones_like(n_pre), n_pre, False
            else:
                c_t = n_pre.clamp_min(1.0).rsqrt()                    # [B]
                # = c_t^2 n_pre; at n' = 1 exactly the clip branch alone (as fwm_recurrent's clamp)
                n = (torch.where(n_pre < 1.0, n_pre, torch.ones_like(n_pre)) if n_pre.requires_grad
                     else n_pre.clamp_max(1.0))
            # Later retrievals see the updated, clipped state (rows t+1..C-1 of the chunk).
            R = c_t[:, None, None] * torch.addcmul(R[:, 1:], g_t[:, t + 1:, None], u_t[:, None, :])
            updates.append(u_t)
            clips.append(c_t)
        U = torch.stack(updates, dim=1)                               # [B, C, D_v]
        c = torch.stack(clips, dim=1)                                 # [B, C]
        decay = c.flip(1).cumprod(1).flip(1)                          # [B, C]: prod_{s >= t} c_s
        written = K.transpose(1, 2) @ (decay[:, :, None] * U)         # [B, D_k, D_v]
        S = written if S is None else decay[:, :1, None] * S + written
    return S if S is not None else k.new_zeros(B, D_k, D_v)


def fwm_write_chunks(k: Tensor, v: Tensor, beta: Tensor, chunk_size: int, keep: bool,
                     d_value: int | None = None):
    """FWMWrite's forward: (S_L [B, D_k, D_v], per-chunk quantities for the backward if keep).
    v [B, L, D_v], or one-hot ids [B, L] with d_value (``value_chunks``). A chunk's steps run
    in ``forward_steps_torch`` (the backward's in ``backward_steps_torch``)."""
    B, L, D_k = k.shape
    D_v = v.shape[2] if d_value is None else d_value
    S = None
    n = k.new_zeros(B)
    chunks = []
    for index, (K, V, b) in enumerate(zip(k.split(chunk_size, dim=1),
                                          value_chunks(v.split(chunk_size, dim=1), d_value,
                                                       k.dtype),
                                          beta.split(chunk_size, dim=1))):
        G = K @ K.transpose(1, 2)                                     # [B, C, C]
        R0 = K @ S if S is not None else None                         # [B, C, D_v]
        hk, E, w, U, r, n_pre, c, g, d, n = forward_steps_torch(G, R0, V, b, n, index == 0)
        if keep:
            chunks.append(dict(hk=hk, S0=S, r=r, U=U, n_pre=n_pre, c=c, g=g, d=d, E=E, w=w,
                               first=index == 0))
        # S_C = d_0 S_0 + K^T (d * U), with d scaling K's D_k columns rather than U's D_v
        dK = (d[:, :, None] * K).transpose(1, 2)                      # [B, D_k, C]
        S = dK @ U if S is None else torch.baddbmm(d[:, :1, None] * S, dK, U)  # [B, D_k, D_v]
    if S is None:
        S = k.new_zeros(B, D_k, D_v)
    return S, chunks


def forward_steps_torch(G, R0, V, b, n, first: bool):
    """One chunk's forward steps in PyTorch (the recurrence is in FWMWrite's docstring; C's
    twin: fwm_forward_sequence in csrc/fwm_steps_impl.h). G = K K^T [B, C, C],
    R0 = K S_0 [B, C, D_v] or None (first chunk), V [B, C, D_v], b [B, C], n [B] -> (hk, E, w,
    U, r, n_pre, c, g, d, n)."""
    B, C, D_v = V.shape
    # Every buffer in G's (the keys') dtype: mixed-precision values and beta are promoted.
    hk = 0.5 * G.diagonal(dim1=1, dim2=2)                             # [B, C]: |k_t|^2 / 2
    U, r = G.new_empty(B, C, D_v), G.new_empty(B, C, D_v)
    n_pre, c = G.new_empty(B, C), G.new_empty(B, C)
    # [B, C, C]: E_ts for s < t (the identity below is never read as a weight)
    E = torch.eye(C, dtype=G.dtype, device=G.device).expand(B, C, C).clone()
    w = G.new_zeros(B, C, C)                                          # w_ts = G_ts E_ts
    g = G.new_ones(B, C)
    for t in range(C):
        if t > 0:
            torch.mul(E[:, t - 1, :t], c[:, t - 1, None], out=E[:, t, :t])
            torch.mul(G[:, t, :t], E[:, t, :t], out=w[:, t, :t])
            r_t = torch.bmm(w[:, t:t + 1, :t], U[:, :t]).squeeze(1)
            if R0 is not None:
                g_t = torch.mul(g[:, t - 1], c[:, t - 1], out=g[:, t])
                r_t = torch.addcmul(r_t, R0[:, t], g_t[:, None])
        else:
            r_t = R0[:, 0] if R0 is not None else G.new_zeros(B, D_v)
        r[:, t] = r_t
        u_t = torch.mul(V[:, t] - r_t, b[:, t, None], out=U[:, t])
        n_t = n + 2 * (u_t * torch.addcmul(r_t, u_t, hk[:, t, None])).sum(-1)
        n_pre[:, t] = n_t
        if first and t == 0:
            c[:, t], n = 1.0, n_t
        else:
            torch.rsqrt(n_t.clamp_min(1.0), out=c[:, t])
            n = n_t.clamp_max(1.0)
    d = c.flip(1).cumprod(1).flip(1)                                  # [B, C]: prod_{j >= s} c_j
    return hk, E, w, U, r, n_pre, c, g, d, n


def backward_steps_torch(Z, d, s0dot, hk, n_pre, c, first, w, U, r, V, b, n_bar):
    """One chunk's backward steps in PyTorch (the recurrence is in FWMWrite's docstring; C's
    twin: fwm_backward_sequence in csrc/fwm_steps_impl.h). Z = K S_out_bar
    [B, C, D_v], s0dot = <S_out_bar, S_0> [B] or None (first chunk), the forward's d, hk,
    n_pre, c [B, C], w [B, C, C], U, r, V [B, C, D_v], b [B, C], n_bar [B] -> (U_bar, R_bar,
    diag = nb' |u|^2, b_bar [B, C], n_bar)."""
    B, C, D_v = U.shape
    d_bar = (Z * U).sum(-1)                                           # [B, C]
    if s0dot is not None:
        d_bar[:, 0] += s0dot
    cd = (d_bar * d).cumsum(1)                                        # [B, C]: c_j cb_j from d
    low = (n_pre < 1.0).to(U.dtype)                         # d n / d n' (n' = 1: clip branch)
    clip = 0.5 * c.pow(2) * (n_pre >= 1.0).to(U.dtype)                # -c^2/2 (c cb) = cb dc/dn'
    if first:
        low[:, 0], clip[:, 0] = 1.0, 0.0
    wn = 2 * torch.addcmul(r, U, hk[:, :, None], value=2.0)           # [B, C, D_v]: d n'/d u
    U_bar_direct = d[:, :, None] * Z
    R_bar, U_bar, nb_all = U.new_zeros(B, C, D_v), U.new_empty(B, C, D_v), U.new_empty(B, C)
    wT = w.transpose(1, 2).contiguous()                               # wT[:, s, t] = w_ts
    phi = U.new_zeros(B)
    for j in range(C - 1, -1, -1):
        nb = n_bar * low[:, j] - clip[:, j] * (cd[:, j] + phi)
        ub = torch.addcmul(U_bar_direct[:, j], wn[:, j], nb[:, None])
        if j < C - 1:
            ub_reads = torch.bmm(wT[:, j:j + 1, j + 1:], R_bar[:, j + 1:]).squeeze(1)
            ub = ub + ub_reads
            phi = phi - (U[:, j] * ub_reads).sum(-1)
        U_bar[:, j] = ub
        rb = torch.addcmul(-b[:, j, None] * ub, U[:, j], 2 * nb[:, None])
        R_bar[:, j] = rb
        phi = phi + (rb * r[:, j]).sum(-1)
        nb_all[:, j] = nb
        n_bar = nb
    diag = nb_all * U.pow(2).sum(-1)
    b_bar = (U_bar * (V - r)).sum(-1)
    return U_bar, R_bar, diag, b_bar, n_bar


class FWMWrite(torch.autograd.Function):
    """The final FWM state with reads done lazily and a hand-written backward.

    Within a chunk of C positions entering with state S_0 and norm n, the state entering step t
    is S_{t-1} = g_t S_0 + sum_{s<t} E_ts k_s u_s^T with E_ts = prod_{s <= j < t} c_j and
    g_t = prod_{j < t} c_j (both <= 1: no overflow). So a step reads

        r_t = sum_{s<t} w_ts u_s + g_t R0_t,   w_ts = G_ts E_ts,  R0 = K S_0

    with one [1, t] x [t, D_v] product, and nothing of size [C, D_v] is written per step; the
    norm and clip factor follow the module doc. The chunk's state is W_C = d_0 S_0 + K^T (d * U)
    with d_s = prod_{j >= s} c_j.

    Backward (a trailing "b" marks an adjoint; hk = |k|^2 / 2), reverse over j with the rows
    rb_t (t > j) already known:
        ub_j  = d_j K_j S_out_b + sum_{t>j} w_tj rb_t + nb'_j (2 r_j + 4 hk_j u_j)
        nb'_j = nb_j [n'_j < 1] - c_j^2 (cd_j + Phi_j) / 2 [n'_j >= 1]   (first write: nb_j)
        rb_j  = -b_j ub_j + 2 nb'_j u_j,   nb_{j-1} = nb'_j
    where c_j cb_j = cd_j + Phi_j splits into the chunk output's part cd_j = sum_{s <= j} db_s d_s
    and the reads' part Phi_j = sum_{t>j} rb_t . (r_t restricted to sources s <= j and S_0),
    carried as Phi_{j-1} = Phi_j + rb_j . r_j - u_j . sum_{t>j} w_tj rb_t. Afterwards
    wb = tril(Rb U^T, -1), Gb = wb * E + diag(nb' |u|^2), Kb += (Gb + Gb^T) K + g Rb S_0^T and
    S_0b = d_0 S_out_b + (g K)^T Rb. Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, k, v, beta, chunk_size, d_value):
        # v [B, L, D_v], or one-hot ids [B, L] with d_value (``value_chunks``)
        S, chunks = fwm_write_chunks(k, v, beta, chunk_size, keep=True, d_value=d_value)
        ctx.save_for_backward(k, v, beta)
        ctx.chunks, ctx.chunk_size, ctx.d_value = chunks, chunk_size, d_value
        return S

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, S_bar):
        k, v, beta = ctx.saved_tensors
        chunk_size, chunks, d_value = ctx.chunk_size, ctx.chunks, ctx.d_value
        n_bar = k.new_zeros(k.shape[0])          # adjoint of the norm carried out of a chunk
        k_grads, v_grads, b_grads = [], [], []
        for K, V, b, ch in zip(reversed(k.split(chunk_size, dim=1)),
                               value_chunks(reversed(v.split(chunk_size, dim=1)), d_value,
                                            k.dtype),
                               reversed(beta.split(chunk_size, dim=1)), reversed(chunks)):
            hk, S0, r, U, n_pre, c, g, d, E, w = (ch[name] for name in
                                                  ("hk", "S0", "r", "U", "n_pre", "c", "g", "d", "E", "w"))
            # The chunk's output S_out = d_0 S0 + K^T (d * U).
            Z = K @ S_bar                                             # [B, C, D_v]
            s0dot = (S_bar * S0).sum((1, 2)) if S0 is not None else None   # [B]
            U_bar, R_bar, diag, b_bar, n_bar = backward_steps_torch(
                Z, d, s0dot, hk, n_pre, c, ch["first"], w, U, r, V, b, n_bar)
            b_grads.append(b_bar)
            if ctx.needs_input_grad[1]:          # values are one-hot constants in the models
                v_grads.append(b[:, :, None] * U_bar)
            K_bar = d[:, :, None] * (U @ S_bar.transpose(1, 2))       # [B, C, D_k]
            G_bar = (R_bar @ U.transpose(1, 2)).tril(-1) * E          # [B, C, C]
            G_bar = G_bar + torch.diag_embed(diag)                    # hk = G_tt / 2
            K_bar = torch.baddbmm(K_bar, G_bar + G_bar.transpose(1, 2), K)
            if S0 is not None:                   # R0 = K S0 is read as g R0: adjoint g R_bar
                K_bar.addcmul_(g[:, :, None], R_bar @ S0.transpose(1, 2))
                S_bar = torch.baddbmm(d[:, :1, None] * S_bar, (g[:, :, None] * K).transpose(1, 2),
                                      R_bar)
            k_grads.append(K_bar)
        v_grad = torch.cat(v_grads[::-1], dim=1) if v_grads else None
        return torch.cat(k_grads[::-1], dim=1), v_grad, torch.cat(b_grads[::-1], dim=1), None, None


class FWMChunked(torch.autograd.Function):
    """FWMWrite's arithmetic with whole sequences in C (csrc/fwm_chunked_impl.h): each
    sequence's chunks run one after another with the chunk's products done on that sequence's
    blocks (matmul_impl.h), so its state, the state's adjoint and the chunk's rows stay in
    cache between them, and nothing of the whole batch is written between operations. Keeps the
    states entering every chunk but the first, and the steps' quantities (hk, n', c, g, d,
    E, w, u, r) for the backward."""

    @staticmethod
    def forward(ctx, k, values, beta, chunk_size, d_value, library):
        # values: dense v [B, L, D_v], or one-hot ids [B, L] with d_value
        k, values, beta = k.contiguous(), values.contiguous(), beta.contiguous()
        S, kept = fwm_chunked_forward(library, k, values, beta, chunk_size, d_value, keep=True)
        ctx.save_for_backward(k, values, beta, *kept)
        ctx.chunk_size, ctx.d_value, ctx.library = chunk_size, d_value, library
        return S

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, S_bar):
        k, values, beta, *kept = ctx.saved_tensors
        k_bar, b_bar, v_bar = fwm_chunked_backward(
            ctx.library, k, values, beta, ctx.chunk_size, kept, S_bar.contiguous(), ctx.d_value,
            values_grad=ctx.needs_input_grad[1])
        return k_bar, v_bar, b_bar, None, None, None


def checkpoint_interval(length: int, state_bytes: int) -> int:
    """Positions between the sequential backward's checkpoints: the fewest (fewest states rebuilt)
    whose checkpoints, rebuilt chunk and the state's adjoint fit SEQUENTIAL_WORK_BYTES, else
    about sqrt(L) (the fewest states kept)."""
    for interval in range(1, length + 1):
        if (-(-length // interval) + interval + 1) * state_bytes <= SEQUENTIAL_WORK_BYTES:
            return interval
    return max(1, math.isqrt(max(length - 1, 0)) + 1)


class FWMSequential(torch.autograd.Function):
    """The final FWM state written one position at a time in C (csrc/fwm_sequential_impl.h),
    each sequence's [D_v, D_k] state held in cache: forward r_t = W k_t, u_t, the norm and clip
    of the module doc, W <- c_t (W + u_t k_t^T), keeping r, u, n', c; backward builds the states
    again from u and c (checkpoints every ``checkpoint_interval`` positions) and runs the
    positions in reverse (the recurrence is in the C file). The same function as FWMWrite, one
    pass over the state per position forward and about three back, against FWMChunked's chunk
    products, which win at all but tiny states (``SEQUENTIAL_STATE_BYTES``). The state it returns is a
    transposed view of the C layout [B, D_v, D_k] (reads take it as it is)."""

    @staticmethod
    def forward(ctx, k, values, beta, d_value, library):
        # values: dense v [B, L, D_v], or one-hot ids [B, L] with d_value
        k, values, beta = k.contiguous(), values.contiguous(), beta.contiguous()
        W, kept = fwm_sequential_forward(library, k, values, beta, d_value, keep=True)
        ctx.save_for_backward(k, values, beta, *kept)
        ctx.d_value, ctx.library = d_value, library
        return W.transpose(1, 2)                                      # [B, D_k, D_v]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, S_bar):
        k, values, beta, *kept = ctx.saved_tensors
        W_bar = S_bar.transpose(1, 2).contiguous()                   # [B, D_v, D_k]
        interval = checkpoint_interval(k.shape[1], W_bar[0].numel() * W_bar.element_size())
        k_bar, b_bar, v_bar = fwm_sequential_backward(
            ctx.library, k, values, beta, kept, W_bar, interval, ctx.d_value,
            values_grad=ctx.needs_input_grad[1])
        return k_bar, v_bar, b_bar, None, None


def fwm_write(k: Tensor, v: Tensor | None, beta: Tensor, chunk_size: int = 32,
              ids: Tensor | None = None, d_value: int | None = None) -> Tensor:
    """Final FWM state S_L [B, D_k, D_v]. Values dense, v [B, L, D_v], or one-hot,
    ``fwm_write(k, None, beta, ids=ids, d_value=D_v)`` with ids [B, L] long: each one-hot row is
    built when it is used, never the whole [B, L, D_v] matrix (the same floats).

    With the compiled library, ``FWMChunked`` (whole sequences in C, chunk by chunk), or for a
    state of at most SEQUENTIAL_STATE_BYTES ``FWMSequential`` (one position at a time in C).
    Measured forward + backward on the 2-core CPU (Zen 4), L = 2 D_v, sequential against
    chunked: B = 128, D_k = 64, D_v = 10 / 12 / 16 / 20 / 40 / 60 / 80: 1.15 / 1.32 / 2.45 /
    4.59 / 13.2 / 29.8 / 62.7 ms against 1.26 / 1.28 / 1.66 / 2.94 / 10.1 / 22.2 / 37.9
    (D_v = 30: 7.5 against 8.2); B = 32, D_k = 128, D_v = 8 / 10 / 20 / 40: 0.41 / 0.52 / 1.38
    / 5.8 against 0.34 / 0.66 / 1.26 / 3.4. Chunks of 32: 24 to 48 within 4% at B = 128,
    D_k = 64, D_v = 140, 16 and 64 6-20% slower.
    Without the library, ``FWMWrite`` (the same arithmetic in PyTorch, lazy reads, hand-written
    backward; in blocks of sequences whose states fit L2), and without a gradient to compute
    (evaluation) ``fwm_chunkwise``, which runs fewer PyTorch ops per step; under torch.func
    transforms (vmap, grad) ``fwm_chunkwise``."""
    if (v is None) == (ids is None):
        raise ValueError("give either dense values v or one-hot ids")
    if ids is not None and d_value is None:
        raise ValueError("one-hot ids need d_value")
    d_value = int(d_value) if ids is not None else None
    D_v = d_value if ids is not None else v.shape[2]
    if k.shape[1] == 0:
        return k.new_zeros(k.shape[0], k.shape[2], D_v)
    if torch._C._are_functorch_transforms_active():             # under vmap/func: autograd form
        dense = v if ids is None else F.one_hot(ids, d_value).to(k.dtype)
        return fwm_chunkwise(k, dense, beta, int(chunk_size))
    values = v if ids is None else ids                         # [B, L, D_v] or [B, L]
    grad = torch.is_grad_enabled() and (k.requires_grad or beta.requires_grad
                                        or (v is not None and v.requires_grad))
    native = steps(k, beta) if ids is not None else steps(k, v, beta)
    if native is not None and k.shape[2] * D_v * k.element_size() <= SEQUENTIAL_STATE_BYTES:
        if grad:
            return FWMSequential.apply(k, values, beta, d_value, native)
        W, _ = fwm_sequential_forward(native, k.contiguous(), values.contiguous(),
                                      beta.contiguous(), d_value)
        return W.transpose(1, 2)
    if native is not None:
        if grad:
            return FWMChunked.apply(k, values, beta, int(chunk_size), d_value, native)
        return fwm_chunked_forward(native, k.contiguous(), values.contiguous(), beta.contiguous(),
                                   int(chunk_size), d_value)[0]
    if not grad:
        dense = v if ids is None else F.one_hot(ids, d_value).to(k.dtype)
        return fwm_chunkwise(k, dense, beta, 64)
    block = block_size(k.shape[0], k.shape[2] * D_v * k.element_size(), k.device)
    if k.shape[0] > block:                                     # states in L2 (rules/blocks.py)
        return in_blocks(lambda K, X, b: FWMWrite.apply(K, X, b, int(chunk_size), d_value),
                         block, k, values, beta)
    return FWMWrite.apply(k, values, beta, int(chunk_size), d_value)


class FWMRule(UpdateRule):
    """Schlag et al. (2021) fast weight memory: delta update, Frobenius clip, LayerNorm read."""

    name = "fwm"
    uses_beta = True

    def write(self, k, v, beta):
        return fwm_write(k, v, beta)

    def write_one_hot(self, k, ids, beta):
        """``write`` for values v = one_hot(ids, d_value), never formed whole (``fwm_write``)."""
        return fwm_write(k, None, beta, ids=ids, d_value=self.d_value)

    def read(self, state, q):
        return F.layer_norm(q @ state, (state.shape[-1],))

    def causal(self, q, k, v, beta):
        o, _ = fwm_recurrent(q, k, v, beta)                            # [B, L, D_v]
        return F.layer_norm(o, (o.shape[-1],))
