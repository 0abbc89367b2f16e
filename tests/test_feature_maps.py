import math
import re
from pathlib import Path

import pytest
import torch

from models.feature_maps import (FEATURE_MAPS, DPFP, FAVORPlus, Hedgehog, RandomFourier, ReLU,
                                 SquaredReLU, Taylor, build_feature_map, check_feature_map)
from models.normalisation import QUERY_EPS, sum_normalise

CONFIGS = [("identity", {}), ("linear", {}), ("tanh", {}), ("dpfp", {"nu": 1}), ("dpfp", {"nu": 3}),
           ("favor", {"m": 16}), ("favor", {"m": 100, "redraw": "fixed"}),
           ("relu", {}), ("squared_relu", {}), ("taylor", {}), ("hedgehog", {}),
           ("hedgehog", {"bias": False}), ("random_fourier", {"m": 16}),
           ("random_fourier", {"m": 40, "redraw": "fixed"})]


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
        phi = FAVORPlus(d, m=m).double()  # one map per m; each seed redraws its Omega
        for seed in range(20):
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


# ---------------------------------------------------------------- the contract checker

@pytest.mark.parametrize("name,options", CONFIGS)
def test_every_registered_map_passes_the_checker(name, options, generator):
    phi = build_feature_map(name, 12, **options)
    check_feature_map(phi, 12, needs_nonnegative=phi.nonnegative, generator=generator)


class _Good(torch.nn.Module):
    """A duck-typed map (no FeatureMap base): d_dot as a property, forward."""

    nonnegative = True
    random = False

    def __init__(self, d_key):
        super().__init__()
        self.d_key = d_key

    @property
    def d_dot(self):
        return 2 * self.d_key

    def forward(self, x):
        return torch.cat([x.relu(), (-x).relu()], dim=-1)


class _NoDDot(torch.nn.Module):
    def forward(self, x):
        return x


class _FloatDDot(_NoDDot):
    d_dot = 12.0


class _ZeroDDot(_NoDDot):
    d_dot = 0


class _WrongWidth(_NoDDot):
    d_dot = 5


class _NonFinite(_NoDDot):
    d_dot = 12

    def forward(self, x):
        return torch.log(x)                       # nan for negative inputs


class _Signed(_NoDDot):
    d_dot = 12


class _LiesAboutSign(_Signed):
    nonnegative = True


class _BatchDependent(_NoDDot):
    d_dot = 12

    def forward(self, x):
        return x - x.mean(dim=0)                  # mixes vectors across the batch


class _RandomWithoutRedraw(_NoDDot):
    d_dot = 12
    random = True


class _WrongSumNormalised(_Good):
    def sum_normalised(self, x, eps=0.0):
        return self(x)                            # forgot to divide by the sum


@pytest.mark.parametrize("phi,needs_nonnegative,message", [
    (_NoDDot(), False, "no d_dot attribute"),
    (_FloatDDot(), False, r"d_dot must be a positive int, got 12.0 \(float\)"),
    (_ZeroDDot(), False, "d_dot must be a positive int, got 0"),
    (_WrongWidth(), False, "outputs 12 features but declares d_dot = 5"),
    (_NonFinite(), False, "non-finite outputs"),
    (_Signed(), True, "negative outputs .* used with sum normalisation"),
    (_LiesAboutSign(), False, "declares nonnegative = True but gives negative outputs"),
    (_BatchDependent(), False, "depends on the batch shape"),
    (_RandomWithoutRedraw(), False, "random = True but has no redraw"),
    (_WrongSumNormalised(12), True, "sum_normalised.* differs"),
])
def test_checker_names_each_problem(phi, needs_nonnegative, message):
    with pytest.raises(ValueError, match=message) as info:
        check_feature_map(phi, 12, needs_nonnegative)
    assert "\n" not in str(info.value)


def test_checker_accepts_a_duck_typed_map():
    check_feature_map(_Good(12), 12, needs_nonnegative=True)
    check_feature_map(_Signed(), 12, needs_nonnegative=False)  # signed is fine without sum norm


def test_checker_leaves_a_fixed_random_map_unchanged():
    phi = RandomFourier(6, m=8, redraw="fixed")
    omega = phi.omega.clone()
    check_feature_map(phi, 6, False)
    assert torch.equal(phi.omega, omega)


def test_checker_reports_exp_random_fourier_overflow_at_large_norm():
    # exp(|x|^2 / 2) overflows fp32 for |x| > 13.3: 3 * N(0, 1) in 64 dimensions has |x| ~ 24.
    with pytest.raises(ValueError, match="non-finite"):
        check_feature_map(RandomFourier(64, m=8, kernel="exp"), 64, False)
    check_feature_map(RandomFourier(64, m=8, kernel="exp"), 64, False, scales=(0.5,))
    check_feature_map(RandomFourier(64, m=8), 64, False)  # the bounded gaussian default


def test_docs_example_map_passes_the_checker(tmp_path):
    text = (Path(__file__).resolve().parents[1] / "docs" / "feature_maps.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    path = tmp_path / "my_map.py"
    path.write_text(code)
    phi = build_feature_map(f"{path}:ShiftedReLU", 16, shift=0.5)
    check_feature_map(phi, 16, needs_nonnegative=True)
    assert phi(torch.zeros(3, 16)).shape == (3, phi.d_dot)


# ---------------------------------------------------------------- paper definitions

def test_relu_and_squared_relu_definitions():
    x = torch.tensor([1.0, -2.0, 0.5])
    assert ReLU(3)(x).tolist() == [1.0, 0.0, 0.5]
    assert SquaredReLU(3)(x).tolist() == [1.0, 0.0, 0.25]
    assert ReLU(3).d_dot == SquaredReLU(3).d_dot == 3


def test_taylor_hand_example():
    # D_k = 2, x = [1, 2]: [1, x / 2^(1/4), x_i^2 / sqrt(2 D_k), x1 x2 / sqrt(D_k)]
    phi = Taylor(2)
    expected = [1.0, 2 ** -0.25, 2 * 2 ** -0.25, 0.5, 2.0, 2 / math.sqrt(2)]
    assert phi(torch.tensor([1.0, 2.0])).tolist() == pytest.approx(expected, rel=1e-6)
    assert phi.d_dot == 6 and Taylor(64).d_dot == 1 + 64 + 64 * 65 // 2


def test_taylor_kernel_is_second_order_expansion_of_exp(generator):
    d = 7
    phi = Taylor(d).double()
    q = torch.randn(5, d, generator=generator, dtype=torch.float64)
    k = 2 * torch.randn(5, d, generator=generator, dtype=torch.float64)
    s = (q * k).sum(-1)
    kernel = (phi(q) * phi(k)).sum(-1)
    torch.testing.assert_close(kernel, 1 + s / math.sqrt(d) + s ** 2 / (2 * d), rtol=1e-12, atol=1e-12)
    # the full x (x) x form of the Based code gives the same kernel
    full = lambda x: torch.cat([torch.ones_like(x[..., :1]), x / d ** 0.25,
                                (x[..., :, None] * x[..., None, :]).flatten(-2) / math.sqrt(2 * d)], -1)
    torch.testing.assert_close(kernel, (full(q) * full(k)).sum(-1), rtol=1e-12, atol=1e-12)
    assert (kernel >= 0.5).all()  # 1 + s + s^2/2 > 0 although the features are signed


def test_hedgehog_definition():
    e = math.e
    phi = Hedgehog(2)  # identity-initialised: z = x
    expected = [e, 1 / e, 1 / e, e]
    total = sum(expected)
    assert phi(torch.tensor([1.0, -1.0])).tolist() == pytest.approx([v / total for v in expected])
    with torch.no_grad():
        phi.layer.weight.copy_(torch.tensor([[2.0, 0.0], [1.0, 1.0]]))
        phi.layer.bias.copy_(torch.tensor([0.0, 1.0]))
    # z = W x + b = [2, 1] for x = [1, -1]; phi = softmax([2, 1, -2, -1])
    expected = [math.exp(v) for v in (2.0, 1.0, -2.0, -1.0)]
    total = sum(expected)
    assert phi(torch.tensor([1.0, -1.0])).tolist() == pytest.approx([v / total for v in expected])
    assert phi.d_dot == 4


def test_hedgehog_parameters_train_with_the_model(generator):
    from models.retrieval import build_model
    from tasks import sample_batch

    torch.manual_seed(0)
    model = build_model(12, "hedgehog", "delta")
    phi = model.memory.phi
    names = {name for name, _ in model.named_parameters()}
    assert {"memory.phi.layer.weight", "memory.phi.layer.bias"} <= names
    model.loss(sample_batch("overwrite", 12, 8, generator)).backward()
    assert phi.layer.weight.grad.abs().sum() > 0
    assert phi.layer.bias.grad.abs().sum() > 0


def test_random_fourier_hand_example():
    omega = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    x = torch.tensor([0.5, -1.0])
    trig = [math.sin(0.5), math.sin(-1.0), math.cos(0.5), math.cos(-1.0)]
    phi = RandomFourier(2, m=2)
    phi.omega = omega
    assert phi(x).tolist() == pytest.approx([t / math.sqrt(2) for t in trig], rel=1e-6)
    phi = RandomFourier(2, m=2, kernel="exp")
    phi.omega = omega
    scale = math.exp(0.5 * (0.25 + 1.0)) / math.sqrt(2)
    assert phi(x).tolist() == pytest.approx([scale * t for t in trig], rel=1e-6)


@pytest.mark.parametrize("kernel", ["exp", "gaussian"])
def test_random_fourier_kernel_estimate_approaches_its_kernel(kernel):
    torch.manual_seed(0)
    d = 8
    q = torch.randn(d, dtype=torch.float64) * 0.4
    k = torch.randn(d, dtype=torch.float64) * 0.4
    gap = float((q - k) @ (q - k))
    exact = math.exp(float(q @ k)) if kernel == "exp" else math.exp(-0.5 * gap)
    # Each frequency contributes cos(omega . (q - k)) (times exp((|q|^2 + |k|^2) / 2) for exp):
    # variance (1 + exp(-2 gap)) / 2 - exp(-gap) per frequency for i.i.d. omega.
    factor = math.exp(0.5 * float(q @ q + k @ k)) if kernel == "exp" else 1.0
    sd_per_feature = factor * math.sqrt((1 + math.exp(-2 * gap)) / 2 - math.exp(-gap))
    errors = []
    for m in (16, 128, 1024):
        phi = RandomFourier(d, m=m, kernel=kernel).double()
        estimates = []
        for seed in range(20):
            phi.redraw(torch.Generator().manual_seed(seed))
            estimates.append(float(phi(q) @ phi(k)))
        errors.append(sum(abs(e - exact) for e in estimates) / len(estimates))
    # Monte Carlo error ~ m^-1/2: 64x more features, ~8x smaller error. The mean absolute
    # error of an unbiased normal estimate is 0.8 sd; orthogonal rows only lower it.
    assert errors[2] < errors[1] < errors[0]
    assert errors[2] < 1.2 * sd_per_feature / math.sqrt(1024)
    assert errors[2] < 0.05 * exact


def test_favor_sum_normalised_equals_plain_form_where_finite(generator):
    phi = FAVORPlus(16, m=32).double()
    phi.redraw(torch.Generator().manual_seed(0))
    x = 2 * torch.randn(3, 4, 16, generator=generator, dtype=torch.float64)
    for eps in (0.0, QUERY_EPS):
        torch.testing.assert_close(phi.sum_normalised(x, eps), sum_normalise(phi(x), eps),
                                   rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("case", ["underflow", "overflow"])
def test_favor_sum_normalised_stays_finite_where_plain_form_fails(case, generator):
    if case == "underflow":
        # D_k = 64, |x| = 20: every exp(Omega x - |x|^2/2) is below fp32's normal range (0 / 0
        # unfloored; floored at exp(-87) the plain ratio is uniform, which is just as wrong).
        phi = FAVORPlus(64, m=64)
        phi.redraw(torch.Generator().manual_seed(0))
        x = torch.randn(4, 64, generator=generator)
        x = 20 * x / x.norm(dim=-1, keepdim=True)
    else:
        # D_k = 256, x = a row of Omega: exp(|omega|^2 - |omega|^2/2) ~ exp(128) overflows, inf / inf.
        phi = FAVORPlus(256, m=16)
        phi.redraw(torch.Generator().manual_seed(0))
        x = phi.omega[:4].clone()
    if case == "underflow":
        assert (phi(x) < 2e-38).all()                          # no information left in fp32
    else:
        assert not torch.isfinite(sum_normalise(phi(x))).all(dim=-1).any()  # every vector fails
    features64 = phi.double()(x.double())                     # float64 has the range
    phi.float()
    for eps in (0.0, QUERY_EPS):
        stable = phi.sum_normalised(x, eps)
        assert torch.isfinite(stable).all()
        torch.testing.assert_close(stable.double(), sum_normalise(features64, eps),
                                   rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(phi.sum_normalised(x).sum(-1), torch.ones(4))
