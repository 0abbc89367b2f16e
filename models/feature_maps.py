"""Feature maps phi: R^{D_k} -> R^{d_dot} that turn a key or query into a fast-weight address.

Linear attention with feature map phi is a fast weight programmer whose memory has d_dot
dimensions (Schlag, Irie & Schmidhuber 2021, arXiv 2102.11174): at most d_dot keys can be
mutually orthogonal, so d_dot bounds how many associations can be retrieved without
interference. Every map declares:

    d_dot        output width (the size of the fast-weight address space)
    nonnegative  True if every output is >= 0 (needed for sum normalisation)
    random       True if it holds random features, redrawn by ``redraw(generator)``

Optionally a map defines ``sum_normalised(x, eps=0.0)`` = phi(x) / (sum_i phi(x)_i + eps),
computed its own way: without forming phi(x) where that would overflow (FAVOR+, as a softmax),
or with the features in one pass (DPFP).

Registered maps: identity, linear (ELU+1, Katharopoulos et al. 2020), tanh, dpfp
(Schlag et al. 2021), favor (FAVOR+, Choromanski et al. 2021, arXiv 2009.14794),
relu (cosFormer's map without its reweighting, Qin et al. 2022, arXiv 2202.08791),
squared_relu (Primer's relu^2, So et al. 2021, arXiv 2109.08668), taylor (Based,
Arora et al. 2024, arXiv 2402.18668), hedgehog (learnable, Zhang et al. 2024, arXiv 2402.04347),
random_fourier (trigonometric random features, Rahimi & Recht 2007; Performer's "trig").
A user's own map is named by import path: ``package.module:Class`` or ``path/to/file.py:Class``;
``check_feature_map`` checks any map (registered or not) against this contract.
See docs/feature_maps.md.
"""
from __future__ import annotations

import copy
import importlib
import importlib.util
import inspect
import math
import numbers
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.memory import pair_scores
from models.normalisation import sum_normalise, sum_normalise_reference
from models.numerics import exp_floor, floored_exp, floored_softmax, tanh_via_sigmoid
from models.projection import ProjectedKeys, lookup_sum
from models.rules.native import (dpfp_features_backward, dpfp_features_forward,
                                 dpfp_normalised_backward, dpfp_normalised_forward,
                                 dpfp_kernel_backward, dpfp_kernel_forward,
                                 dpfp_projected_kernel_backward, dpfp_projected_kernel_forward,
                                 favor_kernel_forward, favor_projected_backward,
                                 favor_projected_forward, pointwise_backward, pointwise_forward,
                                 pointwise_lookup_backward, pointwise_lookup_features_backward,
                                 pointwise_lookup_forward, steps)


class FeatureMap(nn.Module):
    """Base class: maps [..., D_k] to [..., d_dot]."""

    nonnegative: bool = False
    random: bool = False

    def __init__(self, d_key: int):
        super().__init__()
        if d_key < 1:
            raise ValueError(f"d_key must be >= 1, got {d_key}")
        self.d_key = d_key

    @property
    def d_dot(self) -> int:
        raise NotImplementedError

    def redraw(self, generator: torch.Generator | None = None) -> None:
        """Draw new random features (no-op for deterministic maps)."""

    # Optional: a map whose kernel phi(q) . phi(k) can be computed directly defines
    # ``kernel(q, k)`` (q [B, Q, D_k], k [B, L, D_k] -> [B, Q, L]) and ``kernel_width`` (the
    # floats it materialises per (q, k) pair). models/memory.py then answers reads of the sum
    # rule in the attention form when that is smaller than features + memory (training).
    kernel_width: int | None = None

    def extra_repr(self) -> str:
        return f"d_key={self.d_key}, d_dot={self.d_dot}"


class Identity(FeatureMap):
    """phi(x) = x (plain linear attention without a kernel; signed)."""

    @property
    def d_dot(self) -> int:
        return self.d_key

    def forward(self, x: Tensor) -> Tensor:
        return x


def slope_from_output(y: Tensor, kind: str) -> Tensor:
    """f'(x) of an elementwise map from its output y = f(x), as differentiable PyTorch ops (the
    backwards under create_graph): min(y, 1) for elu + 1, 1 - y^2 for tanh."""
    return y.clamp_max(1.0) if kind == "elu_plus_one" else 1 - y * y


class Pointwise(torch.autograd.Function):
    """An elementwise map ("elu_plus_one" or "tanh") in one C pass each way
    (csrc/pointwise_impl.h); the backward needs only the output: min(y, 1) for elu + 1,
    1 - y^2 for tanh. Under create_graph the backward is those PyTorch ops on y instead,
    so second derivatives flow as through F.elu or torch.tanh."""

    @staticmethod
    def forward(ctx, x, kind, library):
        y = pointwise_forward(library, kind, x.contiguous(), exp_floor(x.dtype))
        ctx.save_for_backward(y)
        ctx.kind, ctx.library = kind, library
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        if torch.is_grad_enabled():                                   # create_graph=True
            return grad * slope_from_output(y, ctx.kind), None, None
        return pointwise_backward(ctx.library, ctx.kind, y, grad.contiguous()), None, None


def pointwise(x: Tensor, kind: str):
    """``Pointwise`` where the compiled steps run for x, else None."""
    library = steps(x)
    return None if library is None else Pointwise.apply(x, kind, library)


class PointwiseLookup(torch.autograd.Function):
    """phi(k) [M B, L, D] of an elementwise map ("elu_plus_one" or "tanh") for keys given as
    two row lookups, k_t = columns[values_t] + table[keys_t] (ids [M B, L]), in one C pass
    each way (csrc/pointwise_impl.h): the keys and their gradient are never [B, L, D] tensors.
    The floats of ``lookup_sum`` followed by ``Pointwise``, forward and backward; under
    create_graph the backward is PyTorch ops (as ``Pointwise``)."""

    @staticmethod
    def forward(ctx, columns, table, values, keys, kind, library, members=1):
        y = pointwise_lookup_forward(library, kind, columns.contiguous(), values.reshape(-1),
                                     table.contiguous(), keys.reshape(-1),
                                     exp_floor(columns.dtype)).view(*values.shape, -1)
        ctx.save_for_backward(y, values, keys)          # the output: create_graph reaches it
        ctx.kind, ctx.library, ctx.members = kind, library, members
        ctx.sizes = (columns.shape[0], table.shape[0])
        return y

    @staticmethod
    def backward(ctx, grad):
        y, values, keys = ctx.saved_tensors
        y, grad = y.reshape(-1, y.shape[-1]), grad.reshape(-1, y.shape[-1])
        (NA, NB), ids = ctx.sizes, (values.reshape(-1), keys.reshape(-1))
        if torch.is_grad_enabled():                                   # create_graph=True
            dx = grad * slope_from_output(y, ctx.kind)
            return (dx.new_zeros(NA, dx.shape[1]).index_add(0, ids[0], dx),
                    dx.new_zeros(NB, dx.shape[1]).index_add(0, ids[1], dx),
                    None, None, None, None, None)
        d_columns, d_table = pointwise_lookup_features_backward(
            ctx.library, ctx.kind, y, grad.contiguous(), NA, ids[0], NB, ids[1], ctx.members)
        return d_columns, d_table, None, None, None, None, None


class PointwiseKernel(torch.autograd.Function):
    """phi(q) . phi(k_t) [B, Q, L] of an elementwise map ("elu_plus_one" or "tanh") for keys
    given as two row lookups, k_t = columns[values_t] + table[keys_t] (ids [B, L]), from
    phi(q) [B, Q, D]. Forward: phi(k) [B, L, D] in one C pass from the tables, then its
    products with phi(q) as ``PairScores`` takes them. Backward: d phi(q) = g phi(k) as
    PairScores' backward; the keys' gradient through the map, added straight into the tables'
    rows in one C pass (csrc/pointwise_impl.h). The keys, their gradient and the features'
    gradient are never [B, L, D] tensors: two passes over one such tensor instead of ten, and
    four fewer operations (Linear attention's training step). For one query the floats of
    ``lookup_sum``, the map and ``pair_scores``, forward and backward."""

    @staticmethod
    def forward(ctx, phi_q, columns, table, values, keys, kind, library, members=1):
        B, L = values.shape
        phi_k = pointwise_lookup_forward(library, kind, columns.contiguous(), values.reshape(-1),
                                         table.contiguous(), keys.reshape(-1),
                                         exp_floor(phi_q.dtype)).view(B, L, columns.shape[1])
        ctx.save_for_backward(phi_q, phi_k, values, keys)
        ctx.kind, ctx.library, ctx.sizes = kind, library, (columns.shape[0], table.shape[0])
        ctx.members = members
        return phi_q @ phi_k.transpose(1, 2)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        phi_q, phi_k, values, keys = ctx.saved_tensors
        d_phi_q = grad @ phi_k if ctx.needs_input_grad[0] else None            # [B, Q, D]
        d_columns, d_table = pointwise_lookup_backward(
            ctx.library, ctx.kind, grad.contiguous(), phi_q.contiguous(), phi_k, ctx.sizes[0],
            values, ctx.sizes[1], keys, ctx.members)
        return d_phi_q, d_columns, d_table, None, None, None, None, None


class ElementwiseMap(FeatureMap):
    """phi(x)_i = f(x_i), d_dot = D_k: computed in one C pass each way where the compiled steps
    run (``Pointwise``, kind ``kind``), else by the subclass's ``fallback``.

    Its kernel phi(q) . phi(k_t) is the features' dot products. Keys given as ``ProjectedKeys``
    (the retrieval model's training step) are mapped from the projection's tables and the
    scores' gradient goes straight back to them (``PointwiseKernel``)."""

    kind: str                             # "elu_plus_one" or "tanh" (csrc/pointwise_impl.h)

    @property
    def d_dot(self) -> int:
        return self.d_key

    def forward(self, x: Tensor) -> Tensor:
        y = pointwise(x, self.kind)
        return self.fallback(x) if y is None else y

    @staticmethod
    def fallback(x: Tensor) -> Tensor:
        raise NotImplementedError

    @property
    def kernel_width(self) -> int:
        return self.d_key

    # ``kernel`` takes the retrieval model's keys as tables and ids (models/memory.py)
    kernel_reads_projected_keys = True

    def projected(self, k: ProjectedKeys) -> Tensor:
        """phi(k) [M B, L, D_k] of keys given as ``ProjectedKeys``, without forming them: the
        lookups and the map in one C pass each way (``PointwiseLookup``) where the compiled
        steps run, else phi(k.dense()). The same floats either way."""
        columns, table, values, keys = k.lookups()
        library = steps(columns, table)
        if library is None or values.dtype != torch.int64:
            return self(k.dense())
        return PointwiseLookup.apply(columns, table, values.contiguous(), keys.contiguous(),
                                     self.kind, library, k.members)

    def kernel(self, q: Tensor, k: Tensor | ProjectedKeys) -> Tensor:
        """phi(q) . phi(k_t) for every pair, [B, Q, D_k] x [B, L, D_k] -> [B, Q, L]."""
        phi_q = self(q)
        if isinstance(k, ProjectedKeys):
            columns, table, values, keys = k.lookups()
            library = steps(phi_q, columns, table)
            if library is not None:
                return PointwiseKernel.apply(phi_q, columns, table, values.contiguous(),
                                             keys.contiguous(), self.kind, library, k.members)
            k = k.dense()
        return pair_scores(phi_q, self(k))


class ELUPlusOne(ElementwiseMap):
    """phi(x) = elu(x) + 1 (Katharopoulos et al. 2020, arXiv 2006.16236); d_dot = D_k.

    In one C pass where the compiled steps run (``Pointwise``: exp(x) where x <= 0, floored
    at exp's normal range, so 1.2e-38 rather than 0 below x = -87 in float32); else PyTorch's
    elu + 1 (``reference``)."""

    nonnegative = True
    kind = "elu_plus_one"

    @staticmethod
    def fallback(x: Tensor) -> Tensor:
        return ELUPlusOne.reference(x)

    @staticmethod
    def reference(x: Tensor) -> Tensor:
        return F.elu(x) + 1.0


class Tanh(ElementwiseMap):
    """phi(x) = tanh(x), the key map of Schlag et al. (2021) FWM; signed, d_dot = D_k.

    In one C pass where the compiled steps run (``Pointwise``), else as 2 sigmoid(2x) - 1
    (models/numerics.py); both within 2e-7 of tanh in float32, faster than torch.tanh on
    CPUs (``reference`` is torch.tanh itself)."""

    kind = "tanh"

    @staticmethod
    def fallback(x: Tensor) -> Tensor:
        return tanh_via_sigmoid(x)

    @staticmethod
    def reference(x: Tensor) -> Tensor:
        return torch.tanh(x)


class DPFP(FeatureMap):
    """Deterministic parameter-free projection, DPFP-nu (Schlag et al. 2021, eq. 34).

    r = relu([x; -x]) in R^{2 D_k}; for every shift j = 1..nu, the products
    r_i * r_{(i - j) mod 2 D_k}; concatenated over j: d_dot = 2 * D_k * nu.

    In one C pass each way where the compiled steps run (``DPFPFeatures``: the same floats,
    forward and backward), else in PyTorch (``reference``).
    """

    nonnegative = True

    def __init__(self, d_key: int, nu: int = 1):
        super().__init__(d_key)
        if int(nu) != nu or nu < 1:
            raise ValueError(f"dpfp needs nu >= 1, got {nu}")
        self.nu = int(nu)

    @property
    def d_dot(self) -> int:
        return 2 * self.d_key * self.nu

    def forward(self, x: Tensor) -> Tensor:
        library = steps(x)
        if library is None:
            return self.reference(x)
        return DPFPFeatures.apply(x, self.nu, library)

    def reference(self, x: Tensor) -> Tensor:
        r = F.relu(torch.cat([x, -x], dim=-1))                            # [..., 2 D_k]
        return torch.cat([r * r.roll(j, dims=-1) for j in range(1, self.nu + 1)], dim=-1)

    def sum_normalised(self, x: Tensor, eps: float = 0.0) -> Tensor:
        """phi(x) / (sum_i phi(x)_i + eps): in one C pass each way where the compiled steps run
        (``DPFPNormalised``: the floats of ``sum_normalise(phi(x), eps)``), else that."""
        library = steps(x)
        if library is None or not x.numel():
            return sum_normalise(self(x), eps)
        return DPFPNormalised.apply(x, self.nu, float(eps), library)

    @property
    def kernel_width(self) -> int:
        return 2 * self.d_key * (self.nu + 1)

    # ``kernel`` takes the retrieval model's keys as tables and ids (models/memory.py)
    kernel_reads_projected_keys = True

    def kernel(self, q: Tensor, k: Tensor | ProjectedKeys) -> Tensor:
        """phi(q) . phi(k) for every pair, [B, Q, D_k] x [B, L, D_k] -> [B, Q, L], without the
        2 D_k nu features: with p = r(q) * r(k) (elementwise, 2 D_k wide),
        phi(q) . phi(k) = sum_j sum_i p_i p_{i-j} = p . (sum_j roll(p, j)). Computed pair by
        pair in C where the compiled steps run (``DPFPKernel``), else by ``kernel_reference``;
        keys given as ``ProjectedKeys`` are built row by row from the projection's tables and
        their gradient added straight back to them (``DPFPProjectedKernel``)."""
        if isinstance(k, ProjectedKeys):
            columns, table, values, keys = k.lookups()
            library = steps(q, columns, table)
            if library is not None:
                return DPFPProjectedKernel.apply(q.contiguous(), columns.contiguous(),
                                                 table.contiguous(), values.contiguous(),
                                                 keys.contiguous(), self.nu, library, k.members)
            k = k.dense()
        library = steps(q, k)
        if library is None:
            return self.kernel_reference(q, k)
        return DPFPKernel.apply(q.contiguous(), k.contiguous(), self.nu, library)

    def kernel_reference(self, q: Tensor, k: Tensor) -> Tensor:
        """``kernel`` in PyTorch: the rolls summed as nu windows of one circularly padded copy
        of p (one copy instead of nu)."""
        r_q = F.relu(torch.cat([q, -q], dim=-1))                          # [B, Q, 2 D_k]
        r_k = F.relu(torch.cat([k, -k], dim=-1))                          # [B, L, 2 D_k]
        p = r_q[:, :, None, :] * r_k[:, None, :, :]                       # [B, Q, L, 2 D_k]
        width, nu = p.shape[-1], self.nu
        if nu >= width:                                                   # shifts wrap around
            return sum((p * p.roll(j, dims=-1)).sum(-1) for j in range(1, nu + 1))
        padded = torch.cat([p[..., width - nu:], p], dim=-1)              # padded[m] = p[m - nu]
        rolled = padded[..., nu - 1:nu - 1 + width]                       # roll(p, 1)
        for j in range(2, nu + 1):
            rolled = rolled + padded[..., nu - j:nu - j + width]          # + roll(p, j)
        return (p * rolled).sum(-1)

    def extra_repr(self) -> str:
        return f"d_key={self.d_key}, nu={self.nu}, d_dot={self.d_dot}"


class DPFPFeatures(torch.autograd.Function):
    """DPFP-nu's features x [..., D_k] -> [..., 2 D_k nu] in one C pass each way
    (csrc/dpfp_features_impl.h), the floats of ``DPFP.reference`` and of autograd's gradient
    through it (each r_i's 2 nu product terms summed in autograd's order). Under create_graph
    the backward differentiates ``DPFP.reference`` instead, so second derivatives flow."""

    @staticmethod
    def forward(ctx, x, nu, library):
        ctx.save_for_backward(x)
        ctx.nu, ctx.library = nu, library
        return dpfp_features_forward(library, x.contiguous(), nu)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        if torch.is_grad_enabled():                                   # create_graph=True
            y = DPFP(x.shape[-1], ctx.nu).reference(x)
            (dx,) = torch.autograd.grad(y, x, grad, create_graph=True)
            return dx, None, None
        dx = dpfp_features_backward(ctx.library, x.contiguous(), grad.contiguous(), ctx.nu)
        return dx, None, None


class DPFPNormalised(torch.autograd.Function):
    """DPFP-nu's features sum-normalised, x [..., D_k] -> [..., 2 D_k nu], in one C pass each
    way (csrc/dpfp_features_impl.h): the floats of ``DPFPFeatures`` followed by
    ``SumNormalise``, without writing the features and reading them back between the two (the
    delta rule's keys at S = 200: 6.5 MB each way). Under create_graph the backward
    differentiates the PyTorch forms instead, so second derivatives flow."""

    @staticmethod
    def forward(ctx, x, nu, eps, library):
        y, s = dpfp_normalised_forward(library, x.contiguous(), nu, eps)
        ctx.save_for_backward(x, y, s)
        ctx.nu, ctx.eps, ctx.library = nu, eps, library
        return y

    @staticmethod
    def backward(ctx, grad):
        x, y, s = ctx.saved_tensors
        if torch.is_grad_enabled():                                   # create_graph=True
            y = sum_normalise_reference(DPFP(x.shape[-1], ctx.nu).reference(x), ctx.eps)
            (dx,) = torch.autograd.grad(y, x, grad, create_graph=True)
            return dx, None, None, None
        dx = dpfp_normalised_backward(ctx.library, x.contiguous(), y, s, grad.contiguous(), ctx.nu)
        return dx, None, None, None


class DPFPKernel(torch.autograd.Function):
    """``DPFP.kernel_reference(q, k)`` computed pair by pair in C (csrc/dpfp_kernel_impl.h),
    forward and backward: one pass per (query, key) pair instead of PyTorch's passes over a
    [B, Q, L, 2 D_k] block, which the backward would keep."""

    @staticmethod
    def forward(ctx, q, k, nu, library):
        ctx.save_for_backward(q, k)
        ctx.nu, ctx.library = nu, library
        return dpfp_kernel_forward(library, q, k, nu)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        q, k = ctx.saved_tensors
        dq, dk = dpfp_kernel_backward(ctx.library, grad.contiguous(), q, k, ctx.nu)
        return dq, dk, None, None


class DPFPProjectedKernel(torch.autograd.Function):
    """``DPFPKernel`` for keys given as two row lookups, k_t = columns[values_t] + table[keys_t]
    (ids [B, L]), in C: each key row is built where the kernel reads it, and in the backward
    its gradient is added to the tables' rows there (csrc/dpfp_kernel_impl.h), never the
    [B, L, D] keys or their gradient. The floats of ``lookup_sum`` followed by ``DPFPKernel``,
    forward and backward; the backward runs in one thread per member of stacked models (the
    tables' rows are shared by a member's sequences)."""

    @staticmethod
    def forward(ctx, q, columns, table, values, keys, nu, library, members=1):
        ctx.save_for_backward(q, columns, table, values, keys)
        ctx.nu, ctx.library, ctx.members = nu, library, members
        return dpfp_projected_kernel_forward(library, q, columns, values, table, keys, nu)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        q, columns, table, values, keys = ctx.saved_tensors
        dq, d_columns, d_table = dpfp_projected_kernel_backward(
            ctx.library, grad.contiguous(), q, columns, values, table, keys, ctx.nu, ctx.members)
        return dq, d_columns, d_table, None, None, None, None, None


def orthogonal_gaussian(m: int, d: int, generator: torch.Generator | None) -> Tensor:
    """[m, d] random projection: rows orthogonal within blocks of d, norms ~ chi(d).

    The rows of each d x d block come from the QR decomposition of a Gaussian matrix and are
    rescaled to the norms of Gaussian vectors, so each row is marginally N(0, I_d)
    (Choromanski et al. 2021, "orthogonal random features").
    """
    blocks = []
    for start in range(0, m, d):
        gaussian = torch.randn(d, d, generator=generator)
        q, _ = torch.linalg.qr(gaussian)
        norms = torch.randn(d, d, generator=generator).norm(dim=1)
        blocks.append((q.T * norms[:, None])[: min(d, m - start)])
    return torch.cat(blocks, dim=0)


class RandomFeatureMap(FeatureMap):
    """Base of maps built on m orthogonal random projections Omega [m, D_k]; d_dot = 2m.

    redraw: "per_call" draws a new Omega at every model forward (as the original paper code,
    training and evaluation alike); "fixed" keeps the Omega drawn at construction.
    """

    random = True
    name = "random features"

    def __init__(self, d_key: int, m: int = 64, redraw: str = "per_call"):
        super().__init__(d_key)
        if int(m) != m or m < 1:
            raise ValueError(f"{self.name} needs m >= 1 random features, got {m}")
        if redraw not in ("per_call", "fixed"):
            raise ValueError(f"{self.name} redraw must be 'per_call' or 'fixed', got {redraw!r}")
        self.m = int(m)
        self.redraw_policy = redraw
        self.register_buffer("omega", orthogonal_gaussian(self.m, d_key, None))

    @property
    def d_dot(self) -> int:
        return 2 * self.m

    def redraw(self, generator: torch.Generator | None = None) -> None:
        self.omega = orthogonal_gaussian(self.m, self.d_key, generator).to(self.omega)


def favor_kernel_terms(q: Tensor, k: Tensor, omega: Tensor):
    """FAVOR+'s phi(q) . phi(k) [B, Q, L] and its two halves' floored exps [B, Q, L, m]:
    exp(+-s - c) with s = Omega (q + k), c = (|q|^2 + |k|^2) / 2 + log(2m)."""
    s = (q[:, :, None, :] + k[:, None, :, :]) @ omega.T                  # [B, Q, L, m]
    c = (0.5 * (q.pow(2).sum(-1)[:, :, None] + k.pow(2).sum(-1)[:, None, :])
         + math.log(2 * omega.shape[0]))[..., None]                      # [B, Q, L, 1]
    plus, minus = floored_exp(s - c), floored_exp(torch.sub(-c, s))
    return plus.sum(-1) + minus.sum(-1), plus, minus


def favor_offsets(q: Tensor, k: Tensor, m: int) -> Tensor:
    """c = (|q|^2 + |k|^2) / 2 + log(2m) for every pair: q [B, Q, D_k], k [B, L, D_k] -> [B, Q, L]."""
    return 0.5 * (q.pow(2).sum(-1)[:, :, None] + k.pow(2).sum(-1)[:, None, :]) + math.log(2 * m)


def favor_terms(s: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """FAVOR+'s kernel K = sum_i e+_i + e-_i [...] and e+ - e- [..., m], with
    e+-_i = exp(max(+-s_i - c, floor)), from the projections s [..., m] (a fresh tensor: it is
    overwritten and returned as e+ - e-) and c [...]: one C pass over s
    (csrc/favor_kernel_impl.h), or the same arithmetic in PyTorch without the library."""
    floor = exp_floor(s.dtype)
    library = steps(s, c)
    if library is not None:
        return favor_kernel_forward(library, s, c, floor), s           # s becomes e+ - e-
    plus = torch.sub(s, c[..., None]).clamp_(min=floor).exp_()          # exp(s - c), floored
    minus = torch.sub(-c[..., None], s, out=s).clamp_(min=floor).exp_()  # in s
    return plus.sum(-1) + minus.sum(-1), plus.sub_(minus)


class FAVORKernel(torch.autograd.Function):
    """``favor_kernel_terms(q, k, omega)[0]`` with a hand-written backward (omega constant).

    With K = sum_i e+_i + e-_i, dK/ds_i = e+_i - e-_i and dK/dc = -K, so from the saved terms
        d(q + k) = g ((e+ - e-) Omega),   dq += -g K q,   dk += -g K k
    (g the incoming gradient, one scalar per pair: it scales the product's rows, so it never
    touches the [B, Q, L, m] block). ``floored_exp`` gives a floored term zero slope; here it
    keeps its value exp(floor) (float32: 1.2e-38, float64: 3e-308), a difference below the
    dtype's normal range, as in dK/dc. The terms come from one C pass over the projections'
    block (csrc/favor_kernel_impl.h), which then holds e+ - e-, the one block the backward
    keeps; without the compiled library, the same arithmetic in PyTorch.
    """

    @staticmethod
    def forward(ctx, q, k, omega):
        s = (q[:, :, None, :] + k[:, None, :, :]) @ omega.T              # [B, Q, L, m]
        kernel, difference = favor_terms(s, favor_offsets(q, k, omega.shape[0]))
        ctx.save_for_backward(q, k, omega, kernel, difference)
        return kernel

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        q, k, omega, kernel, difference = ctx.saved_tensors
        d_sum = (difference @ omega).mul_(grad[..., None])              # [B, Q, L, D_k]: d(q + k)
        d_c = -(grad * kernel)                                          # [B, Q, L]
        d_q = d_sum.sum(2) + d_c.sum(2)[..., None] * q
        d_k = d_sum.sum(1) + d_c.sum(1)[..., None] * k
        return d_q, d_k, None


class FAVORProjectedKernel(torch.autograd.Function):
    """FAVOR+'s phi(q) . phi(k_t) [B, Q, L] for keys given as two row lookups: with
    q_proj = Omega q [B, Q, m], the keys' projected tables P_v, P_k [S, m] and their ids
    values, keys [B, L], s = (P_v[values_t] + P_k[keys_t]) + q_proj_i for each pair, and c
    [B, Q, L] (``favor_offsets``). Backward from d s = g (e+ - e-) (``FAVORKernel``):
    d q_proj = sum_t d s, d P_v and d P_k its rows added back at the ids, d c = -g K.

    In C (csrc/favor_kernel_impl.h) s is never stored: one pass forward writes e+ - e- and K,
    one pass back reads e+ - e- once for all three gradients (the block is [B, L, m], 39 MB at
    S = 600, m = 512: each pass over it costs milliseconds). Without the library the same
    arithmetic in PyTorch."""

    @staticmethod
    def forward(ctx, q_proj, by_value, by_key, values, keys, c, members=1):
        B, L = values.shape
        library = steps(q_proj, by_value, by_key, c)
        if library is not None:
            kernel, difference = favor_projected_forward(
                library, by_value.contiguous(), values.contiguous(), by_key.contiguous(),
                keys.contiguous(), q_proj.contiguous(), c.contiguous(), exp_floor(q_proj.dtype))
        else:
            s_kv = (by_value.index_select(0, values.flatten())
                    + by_key.index_select(0, keys.flatten())).view(B, 1, L, -1)
            kernel, difference = favor_terms(s_kv + q_proj[:, :, None, :], c)
        ctx.save_for_backward(values, keys, kernel, difference)
        ctx.library, ctx.sizes = library, (by_value.shape[0], by_key.shape[0])
        ctx.members = members
        return kernel

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        values, keys, kernel, difference = ctx.saved_tensors   # ..., [B, Q, L], [B, Q, L, m]
        (NA, NC), m = ctx.sizes, difference.shape[-1]
        if ctx.library is not None:
            d_value, d_key, d_q_proj = favor_projected_backward(
                ctx.library, grad.contiguous(), difference, NA, values.contiguous(), NC,
                keys.contiguous(), ctx.members)
        else:
            d_q_proj = (grad[:, :, None, :] @ difference).squeeze(2)      # [B, Q, m]
            d_s_kv = (grad[..., None] * difference).sum(1).view(-1, m)   # [B L, m]
            d_value = d_s_kv.new_zeros(NA, m).index_add_(0, values.flatten(), d_s_kv)
            d_key = d_s_kv.new_zeros(NC, m).index_add_(0, keys.flatten(), d_s_kv)
        return d_q_proj, d_value, d_key, None, None, -(grad * kernel), None


def favor_projected_kernel(q: Tensor, keys: ProjectedKeys, omega: Tensor) -> Tensor:
    """``FAVORKernel`` for keys given as ``ProjectedKeys`` (models/projection.py),
    k_t = columns[v_t] + table[key_t]: Omega k_t = (columns Omega^T)[v_t] + (table Omega^T)[key_t]
    is a lookup in two [S, m] tables, so the [B L, D_k] x [D_k, m] product of every key with
    Omega (and its two products in the backward) becomes two [S, D_k] x [D_k, m] ones: at
    S = 600, m = 512, B = 32 about 40 million multiply-adds against 630 million
    (``FAVORProjectedKernel``). The same function as ``FAVORKernel`` on ``keys.dense()``,
    rounded differently. q [B, Q, D_k] -> [B, Q, L] with omega [m, D_k] for one model; for M
    stacked members, q [M * B, Q, D_k] and omega [M, m, D_k], member m's draws for its rows
    and tables (each product batched over the members)."""
    MB, L = keys.values.shape
    columns, table, values, ids = keys.lookups()                 # [M S, D_k] each, [M B, L] ids
    k = lookup_sum(columns, table, values.flatten(), ids.flatten(), keys.members).view(MB, L, -1)
    if omega.dim() == 2:
        q_proj, by_value, by_key = q @ omega.T, columns @ omega.T, table @ omega.T
    else:
        M, m, D = omega.shape
        omega_t = omega.transpose(1, 2)                                   # [M, D_k, m]
        q_proj = torch.bmm(q.reshape(M, -1, D), omega_t).view(MB, -1, m)
        by_value, by_key = (torch.bmm(x.view(M, -1, D), omega_t).view(-1, m)
                            for x in (columns, table))
    return FAVORProjectedKernel.apply(q_proj, by_value, by_key, values, ids,
                                      favor_offsets(q, k, omega.shape[-2]), keys.members)


class FAVORPlus(RandomFeatureMap):
    """FAVOR+ positive random features (Choromanski et al. 2021, arXiv 2009.14794).

    phi(x) = (2m)^-1/2 exp(-|x|^2 / 2) [exp(Omega x); exp(-Omega x)], Omega [m, D_k] orthogonal
    random rows; d_dot = 2m. E[phi(q) . phi(k)] = exp(q . k). Computed in log space.
    Redraw policy: see RandomFeatureMap.
    """

    nonnegative = True
    name = "favor"

    def _log_features(self, x: Tensor) -> Tensor:
        """log phi(x) [..., 2m]: [Omega x; -Omega x] - |x|^2 / 2 - log(2m) / 2."""
        u = x @ self.omega.T                                              # [..., m]
        offset = 0.5 * x.pow(2).sum(-1, keepdim=True) + 0.5 * math.log(2 * self.m)
        return torch.cat([u - offset, -u - offset], dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        return floored_exp(self._log_features(x))

    @property
    def kernel_width(self) -> int:
        return 2 * self.m

    # ``kernel`` takes the retrieval model's keys as tables and ids (models/memory.py)
    kernel_reads_projected_keys = True

    def kernel(self, q: Tensor, k: Tensor | ProjectedKeys) -> Tensor:
        """phi(q) . phi(k) for every pair, [B, Q, D_k] x [B, L, D_k] -> [B, Q, L], no features
        and no memory behind them. The two halves of log phi(q) + log phi(k) are +-s - c with
        s = Omega (q + k) and c = (|q|^2 + |k|^2) / 2 + log(2m): so
        sum_i exp(s_i - c) + exp(-s_i - c), from m projections of q + k instead of 2m
        log-features of each (fewer passes over the [B, Q, L, m] block). Keys of one model as
        ``ProjectedKeys`` are projected as their two tables (``favor_projected_kernel``)."""
        plain = self.omega.requires_grad or torch._C._are_functorch_transforms_active()
        if isinstance(k, ProjectedKeys):
            if not plain and k.members == 1:
                return favor_projected_kernel(q, k, self.omega)
            k = k.dense()
        if plain:
            return favor_kernel_terms(q, k, self.omega)[0]               # plain autograd
        return FAVORKernel.apply(q, k, self.omega)

    @staticmethod
    def members_kernel(maps: list[FAVORPlus], q: Tensor,
                       k: Tensor | ProjectedKeys) -> Tensor | None:
        """The kernel of M stacked members at once (models/stacked.py, ``MemberFeatureMaps``):
        q [M * B, Q, D_k] and keys of M models as ``ProjectedKeys``, member m's rows read with
        maps[m]'s draws; the products batched over the members (``favor_projected_kernel``).
        None where ``kernel`` would not take the projected form."""
        if (not isinstance(k, ProjectedKeys) or torch._C._are_functorch_transforms_active()
                or any(phi.omega.requires_grad for phi in maps)):
            return None
        return favor_projected_kernel(q, k, torch.stack([phi.omega for phi in maps]))

    def sum_normalised(self, x: Tensor, eps: float = 0.0) -> Tensor:
        """phi(x) / (sum_i phi(x)_i + eps) [..., 2m], finite for any finite x.

        With eps = 0 every per-vector factor of phi cancels: softmax([Omega x; -Omega x]).
        With eps > 0 that softmax is multiplied by s / (s + eps) = sigmoid(log s - log eps),
        where log s = logsumexp(log phi(x)) is also computed without forming phi(x).
        Equal to ``sum_normalise(phi(x), eps)`` wherever the latter is finite; where phi(x)
        overflows (inf / inf) or underflows to all zeros (0 / 0) the latter is NaN.
        """
        log_phi = self._log_features(x)                                   # [..., 2m]
        p = floored_softmax(log_phi, dim=-1)
        if eps > 0:
            log_sum = torch.logsumexp(log_phi, dim=-1, keepdim=True)     # [..., 1]
            p = p * torch.sigmoid(log_sum - math.log(eps))
        return p

    def extra_repr(self) -> str:
        return f"d_key={self.d_key}, m={self.m}, redraw={self.redraw_policy}, d_dot={self.d_dot}"


class ReLU(FeatureMap):
    """phi(x) = relu(x); non-negative, d_dot = D_k.

    The feature map of cosFormer (Qin et al. 2022, arXiv 2202.08791) without its positional
    cos-reweighting (see docs/feature_maps.md for why the reweighting is not a feature map here).
    An input with no positive entry maps to the zero vector, which sum normalisation cannot
    normalise (0 / 0), as with DPFP.
    """

    nonnegative = True

    @property
    def d_dot(self) -> int:
        return self.d_key

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x)


class SquaredReLU(FeatureMap):
    """phi(x) = relu(x)^2 elementwise; non-negative, d_dot = D_k.

    The squared ReLU of Primer (So et al. 2021, arXiv 2109.08668) used as a feature map: the
    kernel phi(q) . phi(k) = sum_i relu(q_i)^2 relu(k_i)^2 is "spikier" than relu's.
    """

    nonnegative = True

    @property
    def d_dot(self) -> int:
        return self.d_key

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x).square()


class Taylor(FeatureMap):
    """2nd-order Taylor feature map of Based (Arora et al. 2024, arXiv 2402.18668).

    phi(q) . phi(k) = 1 + q.k / sqrt(D_k) + (q.k)^2 / (2 D_k), the Taylor expansion of
    exp(q.k / sqrt(D_k)) to second order, with the scaling of the Based code (HazyResearch
    based / zoology ``TaylorExp``: x / D_k^(1/4) and x x^T / (sqrt(2) sqrt(D_k))).

    Stored in the symmetric (upper-triangular) form, phi(x) = [1; x / D_k^(1/4);
    x_i^2 / sqrt(2 D_k) for every i; x_i x_j / sqrt(D_k) for i < j in row-major order]: each
    off-diagonal pair appears twice in x (x) x, hence sqrt(2) more than the diagonal. The
    kernel equals that of the full x (x) x form exactly; d_dot = 1 + D_k + D_k (D_k + 1) / 2
    (2145 for D_k = 64, against 4161 for the full form).

    Features are signed (nonnegative = False), but the kernel 1 + s + s^2 / 2 with
    s = q.k / sqrt(D_k) is >= 1/2 > 0 for every q, k.
    """

    def __init__(self, d_key: int):
        super().__init__(d_key)
        rows, cols = torch.triu_indices(d_key, d_key, offset=1)          # [2, D_k (D_k-1) / 2]
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)

    @property
    def d_dot(self) -> int:
        return 1 + self.d_key + self.d_key * (self.d_key + 1) // 2

    kernel_width = 3                                   # s, s^2 and the sum per pair

    def kernel(self, q: Tensor, k: Tensor) -> Tensor:
        """phi(q) . phi(k) = 1 + s + s^2 / 2 with s = q . k / sqrt(D_k), [B, Q, L], in
        O(D_k) per pair instead of O(D_k^2)."""
        s = q @ k.transpose(1, 2) / math.sqrt(self.d_key)                # [B, Q, L]
        return 1 + s + 0.5 * s * s

    def forward(self, x: Tensor) -> Tensor:
        d = self.d_key
        squares = x * x / math.sqrt(2 * d)                                # [..., D_k]
        pairs = x[..., self.rows] * x[..., self.cols] / math.sqrt(d)      # [..., D_k (D_k-1) / 2]
        return torch.cat([torch.ones_like(x[..., :1]), x / d ** 0.25, squares, pairs], dim=-1)


class Hedgehog(FeatureMap):
    """Hedgehog learnable feature map (Zhang, Bhatia, Kumbong & Re 2024, arXiv 2402.04347).

    z = W x + b (a trainable D_k -> D_k linear layer, identity-initialised, b = 0, as the
    paper's code), phi(x) = softmax([z; -z]) over the 2 D_k features; d_dot = 2 D_k.

    The paper's map is [exp(z); exp(-z)]; the softmax divides it by its sum, a per-vector
    constant, so under sum normalisation (delta rule) the memory is exactly the same, and the
    softmax cannot overflow. Under the sum rule's attention normaliser the constant of each key
    does not cancel: the kernel is exp-kernel(q, k) / (Z(q) Z(k)). The paper trains separate
    maps for queries and keys; here, as for every map, one phi serves both. W and b train with
    the model (they are parameters of the memory).
    """

    nonnegative = True

    def __init__(self, d_key: int, bias: bool = True):
        super().__init__(d_key)
        self.layer = nn.Linear(d_key, d_key, bias=bool(bias))
        nn.init.eye_(self.layer.weight)
        if self.layer.bias is not None:
            nn.init.zeros_(self.layer.bias)

    @property
    def d_dot(self) -> int:
        return 2 * self.d_key

    def forward(self, x: Tensor) -> Tensor:
        z = self.layer(x)                                                 # [..., D_k]
        return torch.softmax(torch.cat([z, -z], dim=-1), dim=-1)          # [..., 2 D_k]


class RandomFourier(RandomFeatureMap):
    """Trigonometric random features (Rahimi & Recht 2007; Performer's "trig" features,
    Choromanski et al. 2021, arXiv 2009.14794).

    kernel="gaussian" (default): phi(x) = m^-1/2 [sin(Omega x); cos(Omega x)],
        E[phi(q) . phi(k)] = exp(-|q - k|^2 / 2) (Rahimi & Recht's random Fourier features);
        every entry is bounded by m^-1/2, so it is finite for any input.
    kernel="exp": phi(x) = m^-1/2 exp(|x|^2 / 2) [sin(Omega x); cos(Omega x)],
        E[phi(q) . phi(k)] = exp(q . k), the kernel FAVOR+ estimates (to compare trigonometric
        with positive random features like for like). The factor exp(|x|^2 / 2) overflows
        fp32 once |x| > 13.3 (3 N(0, 1) inputs overflow from D_k = 20 on).
    Omega [m, D_k] has orthogonal random rows as FAVOR+ (each row marginally N(0, I), so the
    estimate stays unbiased); d_dot = 2m. Features are signed (nonnegative = False): unsuited to
    sum normalisation, and the sum rule's attention normaliser can be near 0 or negative.

    redraw: "per_call" (a new Omega at every model forward) or "fixed", as FAVOR+.
    """

    name = "random_fourier"

    def __init__(self, d_key: int, m: int = 64, redraw: str = "per_call",
                 kernel: str = "gaussian"):
        super().__init__(d_key, m, redraw)
        if kernel not in ("exp", "gaussian"):
            raise ValueError(f"random_fourier kernel must be 'exp' or 'gaussian', got {kernel!r}")
        self.kernel = kernel

    def forward(self, x: Tensor) -> Tensor:
        u = x @ self.omega.T                                              # [..., m]
        features = torch.cat([torch.sin(u), torch.cos(u)], dim=-1) / math.sqrt(self.m)
        if self.kernel == "exp":
            features = features * torch.exp(0.5 * x.pow(2).sum(-1, keepdim=True))
        return features

    def extra_repr(self) -> str:
        return (f"d_key={self.d_key}, m={self.m}, redraw={self.redraw_policy}, "
                f"kernel={self.kernel}, d_dot={self.d_dot}")


FEATURE_MAPS: dict[str, type[FeatureMap]] = {
    "identity": Identity,
    "linear": ELUPlusOne,
    "tanh": Tanh,
    "dpfp": DPFP,
    "favor": FAVORPlus,
    "relu": ReLU,
    "squared_relu": SquaredReLU,
    "taylor": Taylor,
    "hedgehog": Hedgehog,
    "random_fourier": RandomFourier,
}


def resolve_feature_map(name: str) -> type:
    """The class for a registry name, ``package.module:Class`` or ``path/file.py:Class``."""
    if name in FEATURE_MAPS:
        return FEATURE_MAPS[name]
    if ":" not in name:
        raise ValueError(f"unknown feature map {name!r}; choose from "
                         f"{', '.join(sorted(FEATURE_MAPS))}, or name a class as module:Class")
    module_name, _, class_name = name.rpartition(":")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name).expanduser().resolve()
            if not path.is_file():
                raise ValueError(f"feature map file {module_name!r} does not exist")
            spec = importlib.util.spec_from_file_location(f"user_feature_map_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module  # lets worker processes unpickle its classes
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ValueError:
        raise
    except Exception as error:  # an import of user code can fail in any way
        raise ValueError(f"cannot import feature map module {module_name!r}: "
                         f"{type(error).__name__}: {error}") from None
    cls = getattr(module, class_name, None)
    if cls is None or not inspect.isclass(cls):
        raise ValueError(f"{module_name!r} has no class {class_name!r}")
    return cls


def build_feature_map(name: str, d_key: int, **options) -> nn.Module:
    """Instantiate a feature map by name with its options (e.g. nu=2, m=128)."""
    cls = resolve_feature_map(name)
    accepted = inspect.signature(cls.__init__).parameters
    unknown = [key for key in options if key not in accepted]
    if unknown and not any(p.kind == p.VAR_KEYWORD for p in accepted.values()):
        raise ValueError(f"feature map {name!r} takes no option {', '.join(map(repr, unknown))}")
    return cls(d_key, **options)


def _map_name(phi) -> str:
    return type(phi).__name__


def check_feature_map(phi, d_key: int, needs_nonnegative: bool = False,
                      generator: torch.Generator | None = None, *,
                      scales: tuple[float, ...] = (1.0, 3.0)) -> None:
    """Check that ``phi`` honours the feature-map contract; raise ValueError naming the problem.

    Works on any object (duck typing; it need not inherit FeatureMap). Checks, in order:
    d_dot exists and is a positive int; a map with random = True has redraw(generator)
    (and a redraw_policy, if any, of "per_call" or "fixed"); on inputs s * N(0, 1) of shape
    [2, 5, d_key] for every s in ``scales``: the output is a tensor of shape [2, 5, d_dot],
    finite, non-negative where the map declares nonnegative = True or ``needs_nonnegative``
    (the map is used with sum normalisation), acts on the last dimension only (phi of the
    input reshaped to [10, d_key] equals phi's output reshaped to [10, d_dot]); an optional
    sum_normalised(x) is finite and equals phi(x) / sum(phi(x)) where the latter is finite; and
    an optional kernel(q, k) equals phi(q) . phi(k).
    Inputs are drawn from ``generator`` (default: a generator seeded with 0); phi is not
    modified (redraw is tried on a copy).
    """
    name = _map_name(phi)
    if isinstance(d_key, bool) or not isinstance(d_key, numbers.Integral) or d_key < 1:
        raise ValueError(f"check_feature_map needs a positive int d_key, got {d_key!r}")
    try:
        d_dot = phi.d_dot
    except (AttributeError, NotImplementedError):
        raise ValueError(f"feature map {name} has no d_dot attribute (its output width)") from None
    if isinstance(d_dot, bool) or not isinstance(d_dot, numbers.Integral) or d_dot < 1:
        raise ValueError(f"feature map {name}: d_dot must be a positive int, "
                         f"got {d_dot!r} ({type(d_dot).__name__})")
    d_dot = int(d_dot)
    if not callable(phi):
        raise ValueError(f"feature map {name} is not callable (it needs forward(x))")
    if getattr(phi, "random", False):
        if not callable(getattr(phi, "redraw", None)):
            raise ValueError(f"feature map {name} declares random = True but has no "
                             f"redraw(generator) method")
        policy = getattr(phi, "redraw_policy", "per_call")
        if policy not in ("per_call", "fixed"):
            raise ValueError(f"feature map {name}: redraw_policy must be 'per_call' or 'fixed', "
                             f"got {policy!r}")
        try:
            trial = copy.deepcopy(phi)
        except Exception:  # an uncopyable user object: redraw is not tried
            trial = None
        if trial is not None:
            try:
                trial.redraw(torch.Generator().manual_seed(1))
            except Exception as error:
                raise ValueError(f"feature map {name}: redraw(generator) failed: "
                                 f"{type(error).__name__}: {error}") from None

    tensors = list(phi.parameters()) + list(phi.buffers()) if isinstance(phi, nn.Module) else []
    floating = [t for t in tensors if t.is_floating_point()]
    dtype = floating[0].dtype if floating else torch.get_default_dtype()
    device = floating[0].device if floating else torch.device("cpu")
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    declared_nonnegative = bool(getattr(phi, "nonnegative", False))

    def apply(x: Tensor) -> Tensor:
        try:
            y = phi(x)
        except Exception as error:
            raise ValueError(f"feature map {name} failed on an input of shape {list(x.shape)}: "
                             f"{type(error).__name__}: {error}") from None
        if not isinstance(y, Tensor):
            raise ValueError(f"feature map {name} must return a Tensor, got {type(y).__name__}")
        return y

    with torch.no_grad():
        for scale in scales:
            x = scale * torch.randn(2, 5, d_key, generator=generator)
            x = x.to(device=device, dtype=dtype)                          # [2, 5, D_k]
            label = f"{scale:g} * N(0, 1) inputs of shape [2, 5, {d_key}]"
            y = apply(x)
            if y.dim() == 0 or y.shape[-1] != d_dot:
                width = y.shape[-1] if y.dim() else "no"
                raise ValueError(f"feature map {name} outputs {width} features but declares "
                                 f"d_dot = {d_dot}")
            if tuple(y.shape) != (2, 5, d_dot):
                raise ValueError(f"feature map {name} maps shape [2, 5, {d_key}] to "
                                 f"{list(y.shape)}; expected [2, 5, {d_dot}]")
            if not torch.isfinite(y).all():
                raise ValueError(f"feature map {name} gives non-finite outputs (inf or nan) "
                                 f"for {label}")
            negative = bool((y < 0).any())
            if negative and needs_nonnegative:
                raise ValueError(f"feature map {name} gives negative outputs (min "
                                 f"{y.min().item():.3g}) for {label}, but it is used with sum "
                                 f"normalisation, which needs phi(x) >= 0")
            if negative and declared_nonnegative:
                raise ValueError(f"feature map {name} declares nonnegative = True but gives "
                                 f"negative outputs (min {y.min().item():.3g}) for {label}")
            flat = apply(x.reshape(10, d_key))                            # [10, D_k]
            if (tuple(flat.shape) != (10, d_dot)
                    or not torch.allclose(flat, y.reshape(10, d_dot), rtol=1e-4, atol=1e-6)):
                raise ValueError(f"feature map {name}: output depends on the batch shape "
                                 f"(phi(x.reshape(10, {d_key})) != phi(x).reshape(10, {d_dot})); "
                                 f"it must act on the last dimension only")
            if callable(getattr(phi, "sum_normalised", None)):
                _check_sum_normalised(phi, name, x, y)
            if callable(getattr(phi, "kernel", None)) and getattr(phi, "kernel_width", None):
                _check_kernel(phi, name, x, y)


def _check_kernel(phi, name: str, x: Tensor, y: Tensor) -> None:
    """kernel(q, k) equals phi(q) @ phi(k)^T (q: the first two inputs of each batch row)."""
    try:
        scores = phi.kernel(x[:, :2], x)
    except Exception as error:
        raise ValueError(f"feature map {name}: kernel(q, k) failed: "
                         f"{type(error).__name__}: {error}") from None
    expected = y[:, :2] @ y.transpose(1, 2)                              # [2, 2, 5]
    if (not isinstance(scores, Tensor) or scores.shape != expected.shape
            or not torch.allclose(scores, expected, rtol=1e-3, atol=1e-5)):
        raise ValueError(f"feature map {name}: kernel(q, k) does not equal phi(q) . phi(k)")


def _check_sum_normalised(phi, name: str, x: Tensor, y: Tensor) -> None:
    """sum_normalised(x) is finite and equals y / y.sum(-1) on rows where that is finite."""
    try:
        z = phi.sum_normalised(x)
    except Exception as error:
        raise ValueError(f"feature map {name}: sum_normalised(x) failed: "
                         f"{type(error).__name__}: {error}") from None
    if not isinstance(z, Tensor) or z.shape != y.shape:
        shape = list(z.shape) if isinstance(z, Tensor) else type(z).__name__
        raise ValueError(f"feature map {name}: sum_normalised(x) gives {shape}, "
                         f"expected {list(y.shape)}")
    if not torch.isfinite(z).all():
        raise ValueError(f"feature map {name}: sum_normalised(x) gives non-finite outputs")
    total = y.sum(dim=-1, keepdim=True)                                   # [2, 5, 1]
    plain = y / total
    # Compare only where the plain form is trustworthy: finite, and a sum well above the
    # subnormal range (features that underflow lose their relative precision).
    info = torch.finfo(y.dtype)
    rows = torch.isfinite(plain).all(dim=-1) & (total[..., 0].abs() >= info.tiny / info.eps)
    if rows.any() and not torch.allclose(z[rows], plain[rows], rtol=1e-3, atol=1e-6):
        gap = (z[rows] - plain[rows]).abs().max().item()
        raise ValueError(f"feature map {name}: sum_normalised(x) differs from "
                         f"phi(x) / phi(x).sum(-1) by up to {gap:.3g}")
