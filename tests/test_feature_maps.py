import math

import pytest
import torch

from models.feature_maps import FEATURE_MAPS, DPFP, FAVORPlus, build_feature_map

CONFIGS = [("identity", {}), ("linear", {}), ("tanh", {}), ("dpfp", {"nu": 1}), ("dpfp", {"nu": 3}),
           ("favor", {"m": 16}), ("favor", {"m": 100, "redraw": "fixed"})]


def test_every_registered_map_is_covered():
    assert {name for name, _ in CONFIGS} == set(FEATURE_MAPS)


@pytest.mark.parametrize("name,options", CONFIGS)
def test_conformance(name, options, generator):
    d_key = 12
    phi = build_feature_map(name, d_key, **options)
    x = 3 * torch.randn(4, 7, d_key, generator=generator)
    y = phi(x)
    assert y.shape == (4, 7, phi.d_dot)
    assert torch.isfinite(y).all()
    if phi.nonnegative:
        assert (y >= 0).all()
    if phi.random:
        before = phi(x)
        phi.redraw(torch.Generator().manual_seed(1))
        assert not torch.allclose(before, phi(x))


def test_dpfp_matches_paper_definition():
    x = torch.tensor([1.0, -2.0, 0.5])
    # r = relu([x, -x]) = [1, 0, 0.5, 0, 2, 0]
    r = [1.0, 0.0, 0.5, 0.0, 2.0, 0.0]
    n = len(r)
    expected = [r[i] * r[(i - j) % n] for j in (1, 2) for i in range(n)]
    assert DPFP(3, nu=2)(x).tolist() == pytest.approx(expected)
    assert DPFP(3, nu=2).d_dot == 12
    # by hand: shift 1 pairs (r0 r5, r1 r0, r2 r1, r3 r2, r4 r3, r5 r4) are all zero;
    # shift 2 pairs (r0 r4, r1 r5, r2 r0, r3 r1, r4 r2, r5 r3) = (2, 0, 0.5, 0, 1, 0)
    assert DPFP(3, nu=1)(x).tolist() == [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert DPFP(3, nu=2)(x)[6:].tolist() == pytest.approx([2.0, 0.0, 0.5, 0.0, 1.0, 0.0])


def test_favor_kernel_estimate_approaches_exp_dot():
    torch.manual_seed(0)
    d = 8
    q = torch.randn(d, dtype=torch.float64) * 0.4
    k = torch.randn(d, dtype=torch.float64) * 0.4
    exact = math.exp(float(q @ k))
    errors = []
    for m in (16, 256, 4096):
        estimates = []
        for seed in range(20):
            phi = FAVORPlus(d, m=m).double()
            phi.redraw(torch.Generator().manual_seed(seed))
            estimates.append(float(phi(q) @ phi(k)))
        errors.append(sum(abs(e - exact) for e in estimates) / len(estimates))
    # Monte Carlo error shrinks like m^-1/2: 256x more features, ~16x smaller error.
    assert errors[2] < errors[1] < errors[0]
    assert errors[2] < 0.03 * exact


def test_favor_orthogonal_rows():
    phi = FAVORPlus(8, m=8)
    phi.redraw(torch.Generator().manual_seed(3))
    gram = phi.omega @ phi.omega.T
    off_diagonal = gram - torch.diag(torch.diag(gram))
    assert off_diagonal.abs().max() < 1e-4


def test_user_map_by_file_path(tmp_path):
    path = tmp_path / "my_map.py"
    path.write_text(
        "import torch\n"
        "class Square(torch.nn.Module):\n"
        "    nonnegative = True\n"
        "    random = False\n"
        "    def __init__(self, d_key):\n"
        "        super().__init__(); self.d_key = d_key; self.d_dot = d_key\n"
        "    def forward(self, x):\n"
        "        return x * x\n")
    phi = build_feature_map(f"{path}:Square", 5)
    assert phi(torch.ones(2, 5)).shape == (2, 5)
    with pytest.raises(ValueError, match="no class"):
        build_feature_map(f"{path}:Missing", 5)
    with pytest.raises(ValueError, match="unknown feature map"):
        build_feature_map("nonsense", 5)
