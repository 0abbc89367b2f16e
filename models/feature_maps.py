"""Feature maps phi: R^{D_k} -> R^{d_dot} that turn a key or query into a fast-weight address.

Linear attention with feature map phi is a fast weight programmer whose memory has d_dot
dimensions (Schlag, Irie & Schmidhuber 2021, arXiv 2102.11174): at most d_dot keys can be
mutually orthogonal, so d_dot bounds how many associations can be retrieved without
interference. Every map declares:

    d_dot        output width (the size of the fast-weight address space)
    nonnegative  True if every output is >= 0 (needed for sum normalisation)
    random       True if it holds random features, redrawn by ``redraw(generator)``

Registered maps: identity, linear (ELU+1, Katharopoulos et al. 2020), tanh, dpfp
(Schlag et al. 2021), favor (FAVOR+, Choromanski et al. 2021, arXiv 2009.14794).
A user's own map is named by import path: ``package.module:Class`` or ``path/to/file.py:Class``.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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

    def extra_repr(self) -> str:
        return f"d_key={self.d_key}, d_dot={self.d_dot}"


class Identity(FeatureMap):
    """phi(x) = x (plain linear attention without a kernel; signed)."""

    @property
    def d_dot(self) -> int:
        return self.d_key

    def forward(self, x: Tensor) -> Tensor:
        return x


class ELUPlusOne(FeatureMap):
    """phi(x) = elu(x) + 1 (Katharopoulos et al. 2020, arXiv 2006.16236); d_dot = D_k."""

    nonnegative = True

    @property
    def d_dot(self) -> int:
        return self.d_key

    def forward(self, x: Tensor) -> Tensor:
        return F.elu(x) + 1.0


class Tanh(FeatureMap):
    """phi(x) = tanh(x), the key map of Schlag et al. (2021) FWM; signed, d_dot = D_k."""

    @property
    def d_dot(self) -> int:
        return self.d_key

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x)


class DPFP(FeatureMap):
    """Deterministic parameter-free projection, DPFP-nu (Schlag et al. 2021, eq. 34).

    r = relu([x; -x]) in R^{2 D_k}; for every shift j = 1..nu, the products
    r_i * r_{(i - j) mod 2 D_k}; concatenated over j: d_dot = 2 * D_k * nu.
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
        r = F.relu(torch.cat([x, -x], dim=-1))                            # [..., 2 D_k]
        return torch.cat([r * r.roll(j, dims=-1) for j in range(1, self.nu + 1)], dim=-1)

    def extra_repr(self) -> str:
        return f"d_key={self.d_key}, nu={self.nu}, d_dot={self.d_dot}"


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


class FAVORPlus(FeatureMap):
    """FAVOR+ positive random features (Choromanski et al. 2021, arXiv 2009.14794).

    phi(x) = (2m)^-1/2 exp(-|x|^2 / 2) [exp(Omega x); exp(-Omega x)], Omega [m, D_k] orthogonal
    random rows; d_dot = 2m. E[phi(q) . phi(k)] = exp(q . k). Computed in log space.

    redraw: "per_call" draws a new Omega at every model forward (as the original paper code,
    training and evaluation alike); "fixed" keeps the Omega drawn at construction.
    """

    nonnegative = True
    random = True

    def __init__(self, d_key: int, m: int = 64, redraw: str = "per_call"):
        super().__init__(d_key)
        if int(m) != m or m < 1:
            raise ValueError(f"favor needs m >= 1 random features, got {m}")
        if redraw not in ("per_call", "fixed"):
            raise ValueError(f"favor redraw must be 'per_call' or 'fixed', got {redraw!r}")
        self.m = int(m)
        self.redraw_policy = redraw
        self.register_buffer("omega", orthogonal_gaussian(self.m, d_key, None))

    @property
    def d_dot(self) -> int:
        return 2 * self.m

    def redraw(self, generator: torch.Generator | None = None) -> None:
        self.omega = orthogonal_gaussian(self.m, self.d_key, generator).to(self.omega)

    def forward(self, x: Tensor) -> Tensor:
        u = x @ self.omega.T                                              # [..., m]
        offset = 0.5 * x.pow(2).sum(-1, keepdim=True) + 0.5 * math.log(2 * self.m)
        return torch.cat([torch.exp(u - offset), torch.exp(-u - offset)], dim=-1)

    def extra_repr(self) -> str:
        return f"d_key={self.d_key}, m={self.m}, redraw={self.redraw_policy}, d_dot={self.d_dot}"


FEATURE_MAPS: dict[str, type[FeatureMap]] = {
    "identity": Identity,
    "linear": ELUPlusOne,
    "tanh": Tanh,
    "dpfp": DPFP,
    "favor": FAVORPlus,
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
