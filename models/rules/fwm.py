"""The Fast Weight Memory update of Schlag, Munkhdalai & Schmidhuber (2021, "Learning
Associative Inference Using Fast Weight Memory", arXiv 2011.07831), as used as the
"Schlag (2021)" baseline of arXiv 2102.11174:

    W_1 = beta_1 v_1 k_1^T
    W_t = clip(W_{t-1} + beta_t (v_t - W_{t-1} k_t) k_t^T),  clip(W) = W / max(1, ||W||_F)
    y   = LayerNorm(W_L q)     (no affine parameters, over the D_v outputs)

Keys are not normalised. As in the original code the first write is not clipped.

Fast exact form (``fwm_chunkwise``, what FWMRule uses): never touch the D_k x D_v state inside
the loop. In a chunk of C positions entering with state W_0 (S = W^T), keep the retrievals
R[s] = W_{t-1}^T k_s of all later positions s of the chunk ([B, C, D_v], the only thing a step
needs from the state), and with G = K K^T:

    u_t  = beta_t (v_t - R[t])                      (u_t is the update written with k_t)
    n'_t = n_{t-1} + 2 u_t . R[t] + |k_t|^2 |u_t|^2   (||W'_t||^2; n_t = ||W_t||^2)
    c_t  = 1 / max(1, sqrt(n'_t)),  n_t = c_t^2 n'_t = min(n'_t, 1)      (c_1 = 1: no clip)
    R[s] <- c_t (R[s] + G_st u_t)   for s > t      (W_t = c_t (W_{t-1} + k_t u_t^T))
    W_C  = (prod_t c_t) W_0 + sum_t (prod_{s >= t} c_s) k_t u_t^T    (one product per chunk)

Every quantity is in the true scale (the clip factors only shrink), so nothing can overflow and
no refold is needed; per step the loop touches [B, D_v] vectors and the [B, C - t, D_v] block of
later retrievals instead of the [B, D_k, D_v] state.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from models.rules.base import UpdateRule

def _clip_factor(norm: Tensor) -> Tensor:
    return 1.0 / torch.clamp(norm, min=1.0)


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
        for t, (v_t, b_t, hk_t, g_t) in enumerate(zip(V.unbind(1), b.unbind(1), half_kk.unbind(1),
                                                     G.unbind(2))):
            r_t = R[:, 0]                                             # [B, D_v]: S_{t-1}^T k_t
            u_t = b_t[:, None] * (v_t - r_t)                          # [B, D_v]
            n_pre = n + 2 * (u_t * torch.addcmul(r_t, u_t, hk_t[:, None])).sum(-1)
            if first:
                c_t, n, first = torch.ones_like(n_pre), n_pre, False
            else:
                c_t = n_pre.clamp_min(1.0).rsqrt()                    # [B]
                n = n_pre.clamp_max(1.0)                              # = c_t^2 n_pre
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


class FWMWrite(torch.autograd.Function):
    """``fwm_chunkwise`` with a hand-written backward (the reverse of its loop, step by step).

    Autograd through the loop records ~12 small ops per position and replays ~3x as many in
    the backward; most of that is per-op overhead at these sizes (B = 128, D_v = 20). Here the
    forward runs without a graph and keeps per step only r_t, u_t, n'_t, c_t and the
    pre-clip block P_t = R[t+1:] + G[t+1:, t] u_t ([B, C - t - 1, D_v]); the backward walks the
    steps in reverse with the adjoint Rb of the later retrievals (notation of the module doc,
    b = beta, hk = |k|^2 / 2, a trailing "b" marks an adjoint):

        from S_out = d_0 S_0 + K^T (d * U), d_t = prod_{s >= t} c_s:
            ub_t = d_t K_t S_out_b,  Kb = d * (U S_out_b^T),  cb_s = sum_{t <= s} db_t d_t / c_s
        step t (reverse):  cb_t += <Rb, P_t>,  Pb = c_t Rb,  ub_t += Pb^T G[t+1:, t],
            Gb[t+1:, t] = Pb u_t,  nb'_t = nb [n'_t <= 1] - cb_t c_t^3 / 2 [n'_t >= 1],
            ub_t += nb'_t (2 r_t + 4 hk_t u_t),  rb_t = 2 nb'_t u_t - b_t ub_t,
            Rb <- [rb_t; Pb],  nb <- nb'_t
        afterwards: bb = sum(ub * (v - r)),  vb = b ub,  hkb = 2 nb' |u|^2,
            Kb += (Gb + Gb^T) K + Rb S_0^T,  S_0b = d_0 S_out_b + K^T Rb
    (the first write of the sequence has c = 1 and n = n': its masks are 1 and 0.)
    Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, k, v, beta, chunk_size):
        B, L, D_k = k.shape
        D_v = v.shape[2]
        S = None
        n = k.new_zeros(B)
        chunks = []
        for index, (K, V, b) in enumerate(zip(k.split(chunk_size, dim=1), v.split(chunk_size, dim=1),
                                              beta.split(chunk_size, dim=1))):
            C = K.shape[1]
            G = K @ K.transpose(1, 2)                                 # [B, C, C]
            half_kk = 0.5 * G.diagonal(dim1=1, dim2=2)                # [B, C]
            R = K @ S if S is not None else K.new_zeros(B, C, D_v)   # [B, C, D_v]
            r_list, u_list, n_list, c_list, P_list = [], [], [], [], []
            for t in range(C):
                r_t = R[:, 0]
                u_t = b[:, t, None] * (V[:, t] - r_t)
                n_pre = n + 2 * (u_t * torch.addcmul(r_t, u_t, half_kk[:, t, None])).sum(-1)
                if index == 0 and t == 0:
                    c_t, n = torch.ones_like(n_pre), n_pre
                else:
                    c_t, n = n_pre.clamp_min(1.0).rsqrt(), n_pre.clamp_max(1.0)
                P_t = torch.addcmul(R[:, 1:], G[:, t + 1:, t, None], u_t[:, None, :])
                R = c_t[:, None, None] * P_t
                r_list.append(r_t); u_list.append(u_t); n_list.append(n_pre)
                c_list.append(c_t); P_list.append(P_t)
            U = torch.stack(u_list, dim=1)                            # [B, C, D_v]
            c = torch.stack(c_list, dim=1)                            # [B, C]
            decay = c.flip(1).cumprod(1).flip(1)                      # [B, C]
            written = K.transpose(1, 2) @ (decay[:, :, None] * U)
            chunks.append(dict(G=G, half_kk=half_kk, S0=S, r=torch.stack(r_list, dim=1), U=U,
                               n_pre=torch.stack(n_list, dim=1), c=c, P=P_list, decay=decay,
                               first=index == 0))
            S = written if S is None else decay[:, :1, None] * S + written
        if S is None:
            S = k.new_zeros(B, D_k, D_v)
        ctx.save_for_backward(k, v, beta)
        ctx.chunks, ctx.chunk_size = chunks, chunk_size
        return S

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, S_bar):
        k, v, beta = ctx.saved_tensors
        chunk_size, chunks = ctx.chunk_size, ctx.chunks
        B = k.shape[0]
        n_bar = k.new_zeros(B)                   # adjoint of the norm carried out of a chunk
        k_grads, v_grads, b_grads = [], [], []
        for K, V, b, ch in zip(reversed(k.split(chunk_size, dim=1)), reversed(v.split(chunk_size, dim=1)),
                               reversed(beta.split(chunk_size, dim=1)), reversed(chunks)):
            C = K.shape[1]
            G, hk, S0, r, U, n_pre, c, P, decay = (ch[name] for name in
                                                   ("G", "half_kk", "S0", "r", "U", "n_pre", "c", "P", "decay"))
            # S_out = d_0 S0 + K^T (d * U)
            Z = K @ S_bar                                             # [B, C, D_v]
            U_bar_direct = decay[:, :, None] * Z                      # [B, C, D_v]
            K_bar = decay[:, :, None] * (U @ S_bar.transpose(1, 2))   # [B, C, D_k]
            decay_bar = (Z * U).sum(-1)                               # [B, C]
            if S0 is not None:
                decay_bar[:, 0] += (S_bar * S0).sum((1, 2))
            c_bar = (decay_bar * decay).cumsum(1) / c                 # [B, C]
            # Clip branches (the first write of the sequence: c = 1, n = n').
            low = (n_pre <= 1.0).to(k.dtype)                          # d n / d n'
            dc_dn = -0.5 * c.pow(3) * (n_pre >= 1.0).to(k.dtype)      # d c / d n'
            if ch["first"]:
                low[:, 0], dc_dn[:, 0] = 1.0, 0.0
            w = 2 * torch.addcmul(r, U, hk[:, :, None], value=2.0)    # [B, C, D_v]: d n'/d u
            G_bar = k.new_zeros(B, C, C)
            R_bar = k.new_zeros(B, 0, V.shape[2])                     # adjoint of R after step t
            u_bars, n_bars = [None] * C, [None] * C
            for t in range(C - 1, -1, -1):
                u_bar = U_bar_direct[:, t]
                cb = c_bar[:, t]
                if t < C - 1:
                    cb = cb + (R_bar * P[t]).sum((1, 2))
                    P_bar = c[:, t, None, None] * R_bar                # [B, C - t - 1, D_v]
                    G_bar[:, t + 1:, t] = (P_bar * U[:, t, None, :]).sum(-1)
                    u_bar = u_bar + (G[:, t + 1:, t, None] * P_bar).sum(1)
                else:
                    P_bar = R_bar
                nb = n_bar * low[:, t] + cb * dc_dn[:, t]             # adjoint of n'_t
                u_bar = torch.addcmul(u_bar, w[:, t], nb[:, None])
                r_bar = torch.addcmul(-b[:, t, None] * u_bar, U[:, t], 2 * nb[:, None])
                R_bar = torch.cat([r_bar[:, None, :], P_bar], dim=1)
                n_bar = nb
                u_bars[t], n_bars[t] = u_bar, nb
            U_bar = torch.stack(u_bars, dim=1)                        # [B, C, D_v]
            nb_all = torch.stack(n_bars, dim=1)                       # [B, C]
            b_grads.append((U_bar * (V - r)).sum(-1))
            v_grads.append(b[:, :, None] * U_bar)
            G_bar = G_bar + torch.diag_embed(nb_all * 2 * U.pow(2).sum(-1) * 0.5)   # hk = G_tt / 2
            K_bar = torch.baddbmm(K_bar, G_bar + G_bar.transpose(1, 2), K)
            if S0 is not None:
                K_bar = torch.baddbmm(K_bar, R_bar, S0.transpose(1, 2))
                S_bar = decay[:, :1, None] * S_bar + K.transpose(1, 2) @ R_bar
            k_grads.append(K_bar)
        return (torch.cat(k_grads[::-1], dim=1), torch.cat(v_grads[::-1], dim=1),
                torch.cat(b_grads[::-1], dim=1), None)


def fwm_write(k: Tensor, v: Tensor, beta: Tensor, chunk_size: int = 64) -> Tensor:
    """Final FWM state S_L [B, D_k, D_v]: ``fwm_chunkwise`` with a hand-written backward."""
    if torch._C._are_functorch_transforms_active():
        return fwm_chunkwise(k, v, beta, int(chunk_size))   # under vmap: the autograd form
    return FWMWrite.apply(k, v, beta, int(chunk_size))


class FWMRule(UpdateRule):
    """Schlag et al. (2021) fast weight memory: delta update, Frobenius clip, LayerNorm read."""

    name = "fwm"
    uses_beta = True

    def write(self, k, v, beta):
        return fwm_write(k, v, beta)

    def read(self, state, q):
        return F.layer_norm(q @ state, (state.shape[-1],))

    def causal(self, q, k, v, beta):
        o, _ = fwm_recurrent(q, k, v, beta)                            # [B, L, D_v]
        return F.layer_norm(o, (o.shape[-1],))
