"""The compiled steps (models/rules/native.py: the FWM write's, the delta rule's answers, DPFP's
and FAVOR+'s kernels, the projection's lookups): the same numbers as the PyTorch forms, built
once into the cache, and optional."""
import platform
import shutil

import pytest
import torch

import models.rules.fwm as fwm
from models.rules import native
from models.rules.fwm import fwm_recurrent, fwm_write


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    """A library lookup that starts from nothing, with its own cache directory."""
    monkeypatch.setenv("FWR_CACHE_DIR", str(tmp_path / "cache"))
    native._library.cache_clear()
    yield tmp_path / "cache"
    native._library.cache_clear()


def test_built_wherever_there_is_a_compiler(fresh_library):
    if shutil.which("cc") is None:
        pytest.skip("no C compiler on this machine")
    assert native.kernel_name() == "native"
    assert len(list(fresh_library.glob("native-*.so"))) == 1
    native._library.cache_clear()                    # a second process loads the cached build
    assert native.kernel_name() == "native"
    assert len(list(fresh_library.iterdir())) == 1   # no half-written files left behind


def test_a_damaged_cached_build_is_rebuilt(fresh_library):
    compiler = shutil.which("cc")
    if compiler is None:
        pytest.skip("no C compiler on this machine")
    built = native.build_path(compiler)
    built.parent.mkdir(parents=True)
    built.write_bytes(b"not a shared library")
    assert native.kernel_name() == "native"
    assert list(fresh_library.iterdir()) == [built]
    assert built.read_bytes()[:4] == b"\x7fELF" or platform.system() != "Linux"


def test_a_failed_build_leaves_nothing_behind(fresh_library, monkeypatch):
    """A source that does not compile: the PyTorch forms run, and the cache holds no partial
    file or object directory."""
    monkeypatch.setattr(native, "FLAGS", [*native.FLAGS, "-Dfloat=error"])
    assert native.kernel_name() == "torch"
    assert not any(fresh_library.iterdir())


def test_an_unwritable_cache_falls_back(monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("FWR_CACHE_DIR", str(blocker / "cache"))    # under a file: cannot exist
    native._library.cache_clear()
    try:
        assert native.kernel_name() == "torch"
    finally:
        native._library.cache_clear()


def test_switched_off_by_the_environment(fresh_library, monkeypatch):
    monkeypatch.setenv("FWR_NATIVE", "0")
    assert native.kernel_name() == "torch"
    assert native.steps(torch.zeros(1)) is None
    assert not fresh_library.exists()


def test_missing_compiler_falls_back(fresh_library, monkeypatch):
    monkeypatch.setenv("CC", "no-such-compiler")
    assert native.kernel_name() == "torch"


def test_only_cpu_float_tensors():
    assert native.steps(torch.zeros(1, dtype=torch.float16)) is None
    assert native.steps(torch.zeros(1, device="meta")) is None
    seen = []
    torch.func.vmap(lambda x: seen.append(native.steps(x)) or x)(torch.zeros(2, 3))
    assert seen == [None]                              # a batched tensor has no plain buffer


# D_v = 9: the steps' short blocks and scalar tail; 75: their full register block (64 floats,
# 32 doubles) as well.
@pytest.mark.parametrize("D_v", [9, 75])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float64, 1e-12)])
def test_native_steps_equal_the_torch_loop(dtype, tol, D_v, monkeypatch, generator):
    """Forward and backward, with the clip active, several chunks and a ragged last one; the keys
    come in as a non-contiguous view, as the model's projections can. The chunk steps (these
    states are small enough for the sequential write, which is off here)."""
    if native.steps(torch.zeros(1, dtype=dtype)) is None:
        pytest.skip("no C compiler: the native FWM steps are not built")
    monkeypatch.setattr(fwm, "SEQUENTIAL_STATE_BYTES", -1)
    B, L, D_k = 5, 75, 12
    base = 2 * torch.randn(B, D_k, L, generator=generator, dtype=dtype)
    v = torch.randn(B, L, D_v, generator=generator, dtype=dtype)
    beta = torch.rand(B, L, generator=generator, dtype=dtype)
    weight = torch.randn(B, D_k, D_v, generator=generator, dtype=dtype)

    def run():
        k = base.clone().requires_grad_()
        vv, bb = v.clone().requires_grad_(), beta.clone().requires_grad_()
        S = fwm_write(k.transpose(1, 2), vv, bb, 16)
        (S * weight).sum().backward()
        with torch.no_grad():
            S_eval = fwm_write(k.transpose(1, 2), vv, bb, 16)
        return S, S_eval, k.grad, vv.grad, bb.grad

    compiled = run()
    assert all(torch.equal(a, b) for a, b in zip(compiled, run()))      # deterministic
    monkeypatch.setattr(fwm, "steps", lambda *tensors: None)
    loop = run()
    for a, b in zip(compiled, loop):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    reference = fwm_recurrent(None, base.double().transpose(1, 2), v.double(), beta.double())[1]
    torch.testing.assert_close(compiled[0].double(), reference, rtol=10 * tol, atol=10 * tol)
    assert reference.flatten(1).norm(dim=1).max().item() == pytest.approx(1.0)   # clip active


def test_mixed_dtypes_and_autocast_take_the_torch_loop(generator):
    """The C steps read raw buffers of one dtype: anything else must not reach them."""
    B, L, D_k, D_v = 2, 10, 4, 3
    k = torch.randn(B, L, D_k, generator=generator, dtype=torch.float64)
    v = torch.randn(B, L, D_v, generator=generator, dtype=torch.float64)
    beta = torch.rand(B, L, generator=generator, dtype=torch.float64)
    reference = fwm_recurrent(None, k, v, beta)[1]
    assert native.steps(k, v.float(), beta) is None and native.steps(k, v, beta.float()) is None
    for args in ((k, v.float(), beta), (k, v, beta.float())):
        torch.testing.assert_close(fwm_write(*args, 4), reference, rtol=1e-5, atol=1e-6)
        grad_args = [a.clone().requires_grad_() for a in args]
        fwm_write(*grad_args, 4).sum().backward()
        assert all(torch.isfinite(a.grad).all() for a in grad_args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert native.steps(k.float(), v.float(), beta.float()) is None
        out = fwm_write(k.float(), v.float(), beta.float(), 4)
    torch.testing.assert_close(out.double(), reference, rtol=5e-2, atol=5e-2)
    with pytest.raises(ValueError, match="contiguous CPU"):
        native._pointers(torch.float32, torch.zeros(3, dtype=torch.float64))


def test_a_nan_spreads_as_in_the_reference(native_steps, generator):
    k = torch.randn(1, 8, 3, generator=generator, dtype=torch.float64)
    v = torch.randn(1, 8, 4, generator=generator, dtype=torch.float64)
    v[0, 3, 1] = float("nan")
    beta = torch.rand(1, 8, generator=generator, dtype=torch.float64)
    reference = fwm_recurrent(None, k, v, beta)[1]
    assert torch.isnan(reference).all()
    assert torch.isnan(fwm_write(k, v, beta, 4)).all()
    with torch.no_grad():
        assert torch.isnan(fwm_write(k, v, beta, 4)).all()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float64, 1e-12)])
def test_native_delta_answer_equals_the_chunkwise_solves(dtype, tol, monkeypatch, generator):
    """Values and gradients of q, k and beta, several queries, non-contiguous keys, beta near 1."""
    import models.rules.delta as delta
    if native.steps(torch.zeros(1, dtype=dtype)) is None:
        pytest.skip("no C compiler: the native steps are not built")
    B, L, D_k, D_v, Q = 3, 70, 9, 6, 2
    base = torch.rand(B, D_k, L, generator=generator, dtype=dtype)
    base = base / base.sum(1, keepdim=True)
    q0 = torch.rand(B, Q, D_k, generator=generator, dtype=dtype)
    beta0 = 1 - 1e-3 * torch.rand(B, L, generator=generator, dtype=dtype)
    ids = torch.randint(0, D_v, (B, L), generator=generator)
    weight = torch.randn(B, Q, D_v, generator=generator, dtype=dtype)

    def run():
        q, k, beta = q0.clone().requires_grad_(), base.clone().requires_grad_(), beta0.clone().requires_grad_()
        y = delta.delta_rule_answer(q, k.transpose(1, 2), None, beta, 16, ids=ids, d_value=D_v)
        (y * weight).sum().backward()
        return y, q.grad, k.grad, beta.grad

    compiled = run()
    assert all(torch.equal(a, b) for a, b in zip(compiled, run()))      # deterministic
    monkeypatch.setattr(delta, "steps", lambda *tensors: None)
    for a, b in zip(compiled, run()):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def dpfp_kernel_and_grads(phi, q0, k0, weight, reference: bool = False):
    """DPFP's kernel of views of q0, k0 (keys non-contiguous) and its gradients."""
    q, k = q0.clone().requires_grad_(), k0.clone().requires_grad_()
    kernel = (phi.kernel_reference if reference else phi.kernel)(q, k.transpose(1, 2))
    (kernel * weight).sum().backward()
    return kernel.detach(), q.grad, k.grad


@pytest.mark.parametrize("nu", [1, 3, 12])                     # 12 > 2 D_k: shifts wrap around
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float64, 1e-12)])
def test_native_dpfp_kernel_equals_the_torch_form(nu, dtype, tol, generator):
    """Value and gradients of q and k against the PyTorch form and float64, several queries,
    keys given as a non-contiguous view, exact zeros (relu's kink) among the inputs."""
    from models.feature_maps import DPFP
    if native.steps(torch.zeros(1, dtype=dtype)) is None:
        pytest.skip("no C compiler: the native steps are not built")
    B, Q, L, D = 3, 2, 37, 5
    q0 = torch.randn(B, Q, D, generator=generator, dtype=dtype)
    k0 = torch.randn(B, D, L, generator=generator, dtype=dtype)
    q0[0, 1, 2], k0[1, 3, 4] = 0.0, 0.0
    weight = torch.randn(B, Q, L, generator=generator, dtype=dtype)
    phi = DPFP(D, nu)
    compiled = dpfp_kernel_and_grads(phi, q0, k0, weight)
    assert all(torch.equal(a, b) for a, b in zip(compiled, dpfp_kernel_and_grads(phi, q0, k0, weight)))
    for a, b in zip(compiled, dpfp_kernel_and_grads(phi, q0, k0, weight, reference=True)):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    exact = dpfp_kernel_and_grads(phi, q0.double(), k0.double(), weight.double(), reference=True)
    for a, b in zip(compiled, exact):
        torch.testing.assert_close(a.double(), b, rtol=10 * tol, atol=10 * tol)
    features = (phi(q0)[:, :, None, :] * phi(k0.transpose(1, 2))[:, None, :, :]).sum(-1)
    torch.testing.assert_close(compiled[0], features, rtol=tol, atol=tol)   # the definition


def test_native_dpfp_kernel_gradcheck(generator):
    from models.feature_maps import DPFP
    if native.steps(torch.zeros(1, dtype=torch.float64)) is None:
        pytest.skip("no C compiler: the native steps are not built")
    q = torch.randn(2, 2, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 6, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(DPFP(4, 2).kernel, (q, k))


def test_native_dpfp_kernel_split_over_threads_changes_no_float(monkeypatch, generator):
    """Batch ranges in threads: each range's results depend on that range alone."""
    from models.feature_maps import DPFP
    if native.steps(torch.zeros(1)) is None:
        pytest.skip("no C compiler: the native steps are not built")
    q0 = torch.randn(7, 1, 16, generator=generator)
    k0 = torch.randn(7, 16, 50, generator=generator)
    weight = torch.randn(7, 1, 50, generator=generator)
    phi = DPFP(16, 3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = dpfp_kernel_and_grads(phi, q0, k0, weight)
        torch.set_num_threads(3)
        monkeypatch.setattr(native, "PARALLEL_MIN_WORK", 0)
        split = dpfp_kernel_and_grads(phi, q0, k0, weight)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, split))


def test_native_dpfp_kernel_spreads_a_nan(native_steps, generator):
    from models.feature_maps import DPFP
    q = torch.randn(1, 1, 4, generator=generator)
    k = torch.randn(1, 5, 4, generator=generator)
    k[0, 2, 1] = float("nan")
    kernel = DPFP(4, 2).kernel(q, k)
    assert torch.isnan(kernel[0, 0, 2]) and torch.isfinite(kernel[0, 0, [0, 1, 3, 4]]).all()


@pytest.mark.parametrize("nu,D", [(1, 64), (2, 64), (3, 5), (5, 1), (5, 2)])   # nu >= 2 D: wraps
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_dpfp_features_give_the_torch_floats(nu, D, dtype, generator):
    """DPFP-nu's features in one C pass each way (csrc/dpfp_features_impl.h): value and gradient
    the floats of DPFP.reference and autograd through it, for a strided input with exact zeros
    (relu's kink) and a NaN; and within float64 rounding of the float64 reference."""
    from models.feature_maps import DPFP, DPFPFeatures
    if native.steps(torch.zeros(1, dtype=dtype)) is None:
        pytest.skip("no C compiler: the native steps are not built")
    phi = DPFP(D, nu)
    x0 = torch.randn(3, D, 11, generator=generator, dtype=dtype).transpose(1, 2)   # strided
    x0[0, 0, 0] = 0.0
    x0[2, 4, D - 1] = float("nan")
    weight = torch.randn(3, 11, 2 * D * nu, generator=generator, dtype=dtype)
    results = []
    for form in (phi, phi.reference):
        x = x0.clone().requires_grad_()
        y = form(x)
        (y * weight).nan_to_num().sum().backward()
        results.append((y.detach(), x.grad))
    (y, dx), (y_ref, dx_ref) = results
    for ours, theirs in ((y, y_ref), (dx, dx_ref)):
        assert torch.equal(ours.isnan(), theirs.isnan())
        assert torch.equal(ours.nan_to_num(), theirs.nan_to_num())
    assert y[2, 4].isnan().any() and not y[:2].isnan().any()       # the NaN stays in its row
    x = x0.double()[:2].clone().requires_grad_()                 # the sequences without the NaN
    exact = phi.reference(x)
    (exact * weight.double()[:2]).sum().backward()
    tol = 1e-6 if dtype == torch.float32 else 1e-14
    torch.testing.assert_close(y[:2].double(), exact.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(dx[:2].double(), x.grad, rtol=tol, atol=tol)
    # it ran in C: a forward through DPFPFeatures, not the PyTorch graph
    assert type(phi(x0.clone().requires_grad_()).grad_fn).__name__ == f"{DPFPFeatures.__name__}Backward"


def test_native_dpfp_features_pass_gradgradcheck_and_split_over_threads(monkeypatch, generator):
    from models.feature_maps import DPFP
    if native.steps(torch.zeros(1, dtype=torch.float64)) is None:
        pytest.skip("no C compiler: the native steps are not built")
    x = torch.randn(2, 3, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(DPFP(4, 2), (x,)) and torch.autograd.gradgradcheck(DPFP(4, 2), (x,))
    one, split = maps_on_one_and_three_threads(monkeypatch, [DPFP(6, 3)],
                                               torch.randn(7, 13, 6, generator=generator))
    assert all(torch.equal(a, b) for a, b in zip(one, split))


@pytest.mark.parametrize("nu,D", [(1, 64), (2, 64), (3, 5), (5, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_dpfp_sum_normalised_gives_the_floats_of_its_two_steps(nu, D, dtype, generator):
    """DPFP's features sum-normalised in one C pass each way (``DPFPNormalised``): value and
    gradient the floats of DPFPFeatures followed by SumNormalise, for keys' eps = 0 and
    queries' 1e-6, with a NaN kept in its row."""
    from models.feature_maps import DPFP
    from models.normalisation import sum_normalise
    if native.steps(torch.zeros(1, dtype=dtype)) is None:
        pytest.skip("no C compiler: the native steps are not built")
    phi = DPFP(D, nu)
    x0 = torch.randn(3, 11, D, generator=generator, dtype=dtype)
    x0[2, 4, D - 1] = float("nan")
    weight = torch.randn(3, 11, 2 * D * nu, generator=generator, dtype=dtype)
    for eps in (0.0, 1e-6):
        results = []
        for form in (phi.sum_normalised, lambda x, eps: sum_normalise(phi(x), eps)):
            x = x0.clone().requires_grad_()
            y = form(x, eps)
            (y * weight).nan_to_num().sum().backward()
            results.append((y, x.grad))
        (y, dx), (y_two, dx_two) = results
        assert type(y.grad_fn).__name__ == "DPFPNormalisedBackward"
        for ours, theirs in ((y.detach(), y_two.detach()), (dx, dx_two)):
            assert torch.equal(ours.isnan(), theirs.isnan())
            assert torch.equal(ours.nan_to_num(), theirs.nan_to_num())
        assert y[2, 4].isnan().all() and not y[:2].isnan().any()


def test_native_dpfp_sum_normalised_gradgradcheck_and_threads(monkeypatch, generator):
    from models.feature_maps import DPFP
    if native.steps(torch.zeros(1, dtype=torch.float64)) is None:
        pytest.skip("no C compiler: the native steps are not built")
    x = torch.randn(2, 3, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    normalised = lambda x: DPFP(4, 2).sum_normalised(x, 0.1)
    assert torch.autograd.gradcheck(normalised, (x,))
    assert torch.autograd.gradgradcheck(normalised, (x,))
    one, split = maps_on_one_and_three_threads(monkeypatch, [DPFP(6, 3).sum_normalised],
                                               torch.randn(7, 13, 6, generator=generator))
    assert all(torch.equal(a, b) for a, b in zip(one, split))


def on_one_and_three_threads(monkeypatch, run) -> tuple[list, list]:
    """run()'s tensors on one thread and with the compiled steps' rows split over three (no work
    threshold): two lists of tensors."""
    threads = torch.get_num_threads()
    results = []
    try:
        for count, min_work in ((1, native.PARALLEL_MIN_WORK), (3, 0)):
            torch.set_num_threads(count)
            monkeypatch.setattr(native, "PARALLEL_MIN_WORK", min_work)
            results.append(list(run()))
    finally:
        torch.set_num_threads(threads)
    return results[0], results[1]


def maps_on_one_and_three_threads(monkeypatch, maps, x0) -> tuple[list, list]:
    """Each map's output and input gradient (for a fixed random output gradient, different in
    every row) on one thread and over three (``on_one_and_three_threads``)."""
    def run():
        out = []
        for phi in maps:
            x = x0.clone().requires_grad_()
            y = phi(x)
            weight = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=y.dtype)
            y.backward(weight)
            out.extend((y.detach(), x.grad))
        return out

    return on_one_and_three_threads(monkeypatch, run)


def favor_terms_reference(s, c, floor):
    """FAVOR+'s kernel terms in float64 PyTorch: (sum of e+ + e-, e+ - e-)."""
    s, c = s.double(), c.double()[..., None]
    plus, minus = (s - c).clamp(min=floor).exp(), (-s - c).clamp(min=floor).exp()
    return (plus + minus).sum(-1), plus - minus


def test_fixed_expf_is_within_two_ulp_of_exp():
    """csrc/expf_impl.h over float32's whole floored range (c = 0, one feature: the row's sum is
    exp(max(s, -87)) + exp(max(-s, -87)), and its difference), then the edges: overflow to
    inf, and NaN; and its form for arguments in [-87, 0] (ELU + 1's)."""
    import numpy as np
    library = native.steps(torch.zeros(1))
    if library is None:
        pytest.skip("no C compiler: the native steps are not built")
    grid = torch.linspace(-87.0, 88.72, 1_000_001)
    s = grid[:, None].clone()
    K = native.favor_kernel_forward(library, s, torch.zeros(len(grid)), -87.0)
    total, difference = favor_terms_reference(grid[:, None], torch.zeros(len(grid)), -87.0)

    def ulps(ours, exact):
        spacing = torch.from_numpy(np.spacing(exact.abs().float().numpy())).double()
        return (ours.double() - exact).abs() / spacing

    assert ulps(K, total).max() <= 2.0
    far = grid.abs() > 10                                       # no cancellation in e+ - e-
    assert ulps(s[far, 0], difference[far, 0]).max() <= 2.0
    edges = torch.tensor([[88.73], [100.0], [float("inf")], [float("nan")]])
    K = native.favor_kernel_forward(library, edges, torch.zeros(4), -87.0)
    assert torch.isinf(K[:3]).all() and torch.isnan(K[3])
    # ELU + 1's exp of arguments it caps at 0 (fixed_expf_nonpositive): the same bound
    x = grid[grid <= 0].contiguous()
    assert ulps(native.pointwise_forward(library, "elu_plus_one", x, -87.0), x.double().exp()).max() <= 2.0


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.float64, 1e-14)])
def test_native_favor_terms_equal_float64(dtype, tol, generator):
    """Projections and offsets on FAVOR+'s scale at init (c ~ 200): most terms are floored, the
    rest span many orders of magnitude; odd m leaves a tail after the eight lanes."""
    from models.numerics import exp_floor
    library = native.steps(torch.zeros(1, dtype=dtype))
    if library is None:
        pytest.skip("no C compiler: the native steps are not built")
    s0 = 60 * torch.randn(4, 1, 9, 37, generator=generator, dtype=dtype)
    c = 150 + 100 * torch.rand(4, 1, 9, generator=generator, dtype=dtype)
    s = s0.clone()
    K = native.favor_kernel_forward(library, s, c, exp_floor(dtype))
    total, difference = favor_terms_reference(s0, c, exp_floor(dtype))
    torch.testing.assert_close(K.double(), total, rtol=tol, atol=0)
    torch.testing.assert_close(s.double(), difference, rtol=tol, atol=1e-30 if dtype == torch.float32 else 1e-300)


def test_native_favor_terms_split_over_threads_change_no_float(monkeypatch, generator):
    library = native.steps(torch.zeros(1))
    if library is None:
        pytest.skip("no C compiler: the native steps are not built")
    s0 = 20 * torch.randn(5, 40, 64, generator=generator)
    c = 100 * torch.rand(5, 40, generator=generator)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = s0.clone()
        K_one = native.favor_kernel_forward(library, one, c, -87.0)
        torch.set_num_threads(3)
        monkeypatch.setattr(native, "PARALLEL_MIN_WORK", 0)
        split = s0.clone()
        K_split = native.favor_kernel_forward(library, split, c, -87.0)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(K_one, K_split) and torch.equal(one, split)


def test_native_favor_kernel_gradcheck_and_nan(native_steps, generator):
    from models.feature_maps import FAVORPlus
    phi = FAVORPlus(4, m=6, redraw="fixed").double()
    q = torch.randn(2, 2, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 5, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(phi.kernel, (q, k))
    k = k.detach().clone()
    k[1, 3, 2] = float("nan")
    kernel = phi.kernel(q.detach(), k)
    assert torch.isnan(kernel[1, :, 3]).all() and torch.isfinite(kernel[0]).all()


def projected_favor_inputs(generator, dtype, num_queries, B=3, L=7, S=5, D=4, E=6, m=9):
    """q, ProjectedKeys of one model (its factors, as RetrievalModel passes them) and Omega."""
    from models.projection import ProjectedKeys
    shapes = [(1, S, D), (S, E), (D, E), (D,)]               # columns, embedding, weight, bias
    tables = [torch.randn(*shape, generator=generator, dtype=dtype).requires_grad_()
              for shape in shapes]
    ids = [torch.randint(0, S, (B, L), generator=generator) for _ in range(2)]
    q = torch.randn(B, num_queries, D, generator=generator, dtype=dtype, requires_grad=True)
    omega = torch.randn(m, D, generator=generator, dtype=dtype)
    return q, ProjectedKeys(*tables, *ids), omega


@pytest.mark.parametrize("num_queries", [1, 3])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float64, 1e-12)])
def test_favor_projected_kernel_equals_the_kernel_of_the_formed_keys(num_queries, dtype, tol,
                                                                     native_steps, generator):
    """FAVOR+'s kernel read from the keys' projected tables (in C, or its PyTorch form) equals
    FAVORKernel on the formed keys, value and gradients of q and of every table, against
    float64; odd m leaves a tail after the C sum's eight lanes."""
    from models.feature_maps import FAVORKernel, favor_projected_kernel
    q, keys, omega = projected_favor_inputs(generator, dtype, num_queries)
    weight = torch.randn(3, num_queries, 7, generator=generator, dtype=dtype)
    inputs = [q, *keys[:4]]

    def value_and_grads(form, cast):
        out = form(*(cast(x) for x in (q, keys, omega)))
        return (out, *torch.autograd.grad((out * cast(weight)).sum(), inputs))

    double = lambda x: x.double() if x.is_floating_point() else x
    as_double = lambda x: type(x)(*(double(t) for t in x)) if isinstance(x, tuple) else double(x)
    ours = value_and_grads(favor_projected_kernel, lambda x: x)
    reference = value_and_grads(lambda q, k, w: FAVORKernel.apply(q, k.dense(), w), as_double)
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol * b.abs().max().item())


def test_favor_projected_kernel_gradcheck_threads_and_bad_ids(native_steps, monkeypatch, generator):
    from models.feature_maps import favor_projected_kernel
    from models.projection import ProjectedKeys
    q, keys, omega = projected_favor_inputs(generator, torch.float64, 2)
    kernel = lambda q, *tables: favor_projected_kernel(q, ProjectedKeys(*tables, *keys[4:]), omega)
    assert torch.autograd.gradcheck(kernel, (q, *keys[:4]))
    if native_steps == "torch":
        return
    q, keys, omega = projected_favor_inputs(generator, torch.float32, 2, B=5, L=40, m=64)

    def value_and_grads():
        value = favor_projected_kernel(q, keys, omega)
        return value, *torch.autograd.grad(value.sum(), [q, *keys[:4]])

    one, split = on_one_and_three_threads(monkeypatch, value_and_grads)
    assert all(torch.equal(a, b) for a, b in zip(one, split))
    library = native.steps(q)
    tables = [torch.randn(5, 64) for _ in range(2)]
    ids = torch.randint(0, 5, (5, 40))
    bad = ids.clone()
    bad[2, 7] = 5
    for a, k in ((bad, ids), (ids, bad)):
        with pytest.raises(IndexError):
            native.favor_projected_forward(library, tables[0], a, tables[1], k,
                                           torch.randn(5, 2, 64), torch.randn(5, 2, 40), -87.0)
        with pytest.raises(IndexError):
            native.favor_projected_backward(library, torch.randn(5, 2, 40),
                                            torch.randn(5, 2, 40, 64), 5, a, 5, k)


def projected_keys(generator, dtype, B=3, L=7, S=5, D=6, E=4, members=1):
    """ProjectedKeys of one model (its factors, as RetrievalModel passes them) or of ``members``
    stacked ones ([M, ...] factors, M * B sequences), every table a leaf wanting a gradient."""
    from models.projection import ProjectedKeys
    M = members
    shapes = ([(1, S, D), (S, E), (D, E), (D,)] if M == 1
              else [(M, S, D), (M, S, E), (M, D, E), (M, D)])    # columns, embedding, weight, bias
    tables = [torch.randn(*shape, generator=generator, dtype=dtype).requires_grad_()
              for shape in shapes]
    ids = [torch.randint(0, S, (M * B, L), generator=generator) for _ in range(2)]
    return ProjectedKeys(*tables, *ids)


def projected_kernel_maps(name: str, D: int):
    from models.feature_maps import DPFP, ELUPlusOne, Tanh
    return {"linear": lambda: ELUPlusOne(D), "tanh": lambda: Tanh(D),
            "dpfp": lambda: DPFP(D, 3)}[name]()


@pytest.mark.parametrize("name", ["linear", "tanh", "dpfp"])
@pytest.mark.parametrize("num_queries,members", [(1, 1), (3, 1), (1, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernels_read_projected_keys_with_the_floats_of_the_formed_keys(name, num_queries, members,
                                                                       dtype, generator):
    """ELU + 1's, tanh's and DPFP's kernels given the keys as the projection's tables and ids
    (in C: PointwiseKernel, DPFPProjectedKernel; stacked members' tables flattened) give the
    floats of the same kernel on the formed keys (``keys.dense()``), value and gradients of q
    and of every table; except the pointwise maps' table gradients for several queries, summed
    over the queries in C rather than by PairScores' product: within rounding. Both within
    rounding of the definition in float64, phi(q) . phi(k) with the maps' references."""
    from models.feature_maps import PointwiseKernel, DPFPProjectedKernel
    if native.steps(torch.zeros(1, dtype=dtype)) is None:
        pytest.skip("no C compiler: the native steps are not built")
    D = 6
    phi = projected_kernel_maps(name, D)
    keys = projected_keys(generator, dtype, D=D, members=members)
    q = torch.randn(members * 3, num_queries, D, generator=generator, dtype=dtype, requires_grad=True)
    q.data[0, 0, 1] = 0.0                                    # relu's kink, for DPFP
    weight = torch.randn(members * 3, num_queries, 7, generator=generator, dtype=dtype)
    inputs = [q, *keys[:4]]

    def value_and_grads(kernel):
        out = kernel(q, keys)
        return [out, *torch.autograd.grad((out * weight).sum(), inputs)]

    calls = []
    fast_form = PointwiseKernel if name != "dpfp" else DPFPProjectedKernel
    original = fast_form.apply
    try:
        fast_form.apply = lambda *args: calls.append(1) or original(*args)
        ours = value_and_grads(phi.kernel)
    finally:
        fast_form.apply = original
    assert calls == [1]
    formed = value_and_grads(lambda q, k: phi.kernel(q, k.dense()))
    exact_in_c = name == "dpfp" or num_queries == 1
    for index, (a, b) in enumerate(zip(ours, formed)):
        if exact_in_c or index < 2:                          # the value and q's gradient
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-5 if dtype == torch.float32 else 1e-12,
                                       atol=1e-5 if dtype == torch.float32 else 1e-12)
    reference = phi.reference
    double_inputs = [x.detach().double().requires_grad_() for x in inputs]
    dq, *double_tables = double_inputs
    from models.projection import ProjectedKeys
    k = ProjectedKeys(*double_tables, *keys[4:]).dense()
    definition = reference(dq) @ reference(k).transpose(1, 2)
    exact = [definition, *torch.autograd.grad((definition * weight.double()).sum(), double_inputs)]
    tol = 2e-4 if dtype == torch.float32 else 1e-10
    for a, b in zip(ours, exact):
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol * max(1.0, b.abs().max().item()))


@pytest.mark.parametrize("name", ["linear", "tanh", "dpfp"])
def test_projected_kernels_gradcheck_threads_and_bad_ids(name, monkeypatch, generator):
    from models.projection import ProjectedKeys
    if native.steps(torch.zeros(1)) is None:
        pytest.skip("no C compiler: the native steps are not built")
    phi = projected_kernel_maps(name, 4)
    keys = projected_keys(generator, torch.float64, B=2, L=5, S=4, D=4, E=3)
    q = torch.randn(2, 2, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    kernel = lambda q, *tables: phi.kernel(q, ProjectedKeys(*tables, *keys[4:]))
    assert torch.autograd.gradcheck(kernel, (q, *keys[:4]))
    keys = projected_keys(generator, torch.float32, B=5, L=40, S=30, D=16, E=8)
    q = torch.randn(5, 1, 16, generator=generator, requires_grad=True)
    phi = projected_kernel_maps(name, 16)

    def value_and_grads():
        value = phi.kernel(q, keys)
        return value, *torch.autograd.grad((value * value).sum(), [q, *keys[:4]])

    one, split = on_one_and_three_threads(monkeypatch, value_and_grads)
    assert all(torch.equal(a, b) for a, b in zip(one, split))
    import models.feature_maps as feature_maps                     # without the library: PyTorch
    monkeypatch.setattr(feature_maps, "steps", lambda *tensors: None)
    for a, b in zip(one, value_and_grads()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
    monkeypatch.undo()
    library = native.steps(q)
    tables = [torch.randn(5, 16) for _ in range(2)]
    ids = torch.randint(0, 5, (2, 40))
    bad = ids.clone()
    bad[1, 7] = 5
    p, g = torch.randn(2, 1, 16), torch.randn(2, 1, 40)
    for a, k in ((bad, ids), (ids, bad)):
        with pytest.raises(IndexError):
            if name == "dpfp":
                native.dpfp_projected_kernel_forward(library, p, tables[0], a, tables[1], k, 3)
            else:
                native.pointwise_lookup_forward(library, phi.kind, tables[0], a.flatten(),
                                                tables[1], k.flatten(), -87.0)
        with pytest.raises(IndexError):
            if name == "dpfp":
                native.dpfp_projected_kernel_backward(library, g, p, tables[0], a, tables[1], k, 3)
            else:
                native.pointwise_lookup_backward(library, phi.kind, g, p, torch.rand(2, 40, 16),
                                                 5, a, 5, k)


@pytest.mark.parametrize("name", ["linear", "tanh", "dpfp", "favor"])
def test_stacked_members_gradients_run_a_member_per_thread_with_the_same_floats(
        name, monkeypatch, generator):
    """The tables' gradients of stacked models (each member's ids in its own rows) split over
    threads by whole members: the same floats as one thread, for the kernel's backward and for
    the lookups' own (``ProjectLookup``). FAVOR+: three members' own draws at once
    (``FAVORPlus.members_kernel``)."""
    from models.feature_maps import FAVORPlus
    if native.steps(torch.zeros(1)) is None:
        pytest.skip("no C compiler: the native steps are not built")
    keys = projected_keys(generator, torch.float32, B=4, L=30, S=20, D=16, E=8, members=3)
    q = torch.randn(12, 1, 16, generator=generator, requires_grad=True)
    if name == "favor":
        maps = [FAVORPlus(16, m=8, redraw="fixed") for _ in range(3)]
        for phi in maps:
            phi.redraw(generator)
        phi = type("Members", (), {"kernel": lambda self, q, k: FAVORPlus.members_kernel(maps, q, k)})()
    else:
        phi = projected_kernel_maps(name, 16)
    split_ranges = []
    over_batch = native._over_batch

    def recording(B, work, run, blocks=None):
        def recorded(b0, b1):
            if blocks is not None:
                split_ranges.append((B, b0, b1))
            run(b0, b1)
        over_batch(B, work, recorded, blocks)

    monkeypatch.setattr(native, "_over_batch", recording)

    def value_and_grads():
        split_ranges.clear()
        value = phi.kernel(q, keys)
        dense = keys.dense()
        loss = (value * value).sum() + (dense * dense.detach().cos()).sum()
        return value, dense, *torch.autograd.grad(loss, [q, *keys[:4]])

    one, split = on_one_and_three_threads(monkeypatch, value_and_grads)
    assert all(torch.equal(a, b) for a, b in zip(one, split))
    # the kernel's backward over 12 sequences and the lookups' over 360 rows, a member each
    assert set(split_ranges) == {(12, 0, 4), (12, 4, 8), (12, 8, 12),
                                 (360, 0, 120), (360, 120, 240), (360, 240, 360)}


@pytest.mark.parametrize("name", ["linear", "tanh"])
def test_elementwise_map_of_projected_keys_is_the_map_of_the_formed_keys(name, monkeypatch,
                                                                       generator):
    """``ElementwiseMap.projected`` (PointwiseLookup: the lookups and the map in one C pass each
    way) gives the floats of phi(k.dense()), forward and backward, for one model and for
    stacked members on one and three threads; gradcheck in float64, second derivatives under
    create_graph, and an IndexError for an id outside its table."""
    from models.feature_maps import PointwiseLookup
    from models.projection import ProjectedKeys
    if native.steps(torch.zeros(1)) is None:
        pytest.skip("no C compiler: the native steps are not built")
    phi = projected_kernel_maps(name, 16)
    for members in (1, 3):
        keys = projected_keys(generator, torch.float32, B=4, L=30, S=20, D=16, E=8,
                              members=members)
        weight = torch.randn(4 * members, 30, 16, generator=generator)

        def value_and_grads(features):
            value = features()
            return value, *torch.autograd.grad((value * weight).sum(), keys[:4])

        one, split = on_one_and_three_threads(monkeypatch,
                                              lambda: value_and_grads(lambda: phi.projected(keys)))
        formed = value_and_grads(lambda: phi(keys.dense()))
        for a, b, c in zip(one, split, formed):
            assert torch.equal(a, b) and torch.equal(a, c)
    keys = projected_keys(generator, torch.float64, B=2, L=5, S=4, D=4, E=3)
    phi = projected_kernel_maps(name, 4)
    features = lambda *tables: phi.projected(ProjectedKeys(*tables, *keys[4:]))
    assert torch.autograd.gradcheck(features, keys[:4])
    assert torch.autograd.gradgradcheck(features, keys[:4])
    library = native.steps(torch.zeros(1))
    tables = [torch.randn(5, 16, requires_grad=True) for _ in range(2)]
    ids = torch.randint(0, 5, (2, 40))
    bad = ids.clone()
    bad[1, 7] = 5
    for a, k in ((bad, ids), (ids, bad)):
        with pytest.raises(IndexError):
            PointwiseLookup.apply(*tables, a, k, phi.kind, library)
        with pytest.raises(IndexError):
            native.pointwise_lookup_features_backward(library, phi.kind, torch.rand(80, 16),
                                                      torch.randn(80, 16), 5, a.flatten(), 5,
                                                      k.flatten())


def short_training_fingerprint() -> list:
    """Losses and parameters after a few steps of each model with compiled steps."""
    sequential = fwm.SEQUENTIAL_STATE_BYTES
    try:
        return _fingerprint(sequential)
    finally:
        fwm.SEQUENTIAL_STATE_BYTES = sequential


def _fingerprint(sequential: int) -> list:
    from tasks import sample_batch
    from training.config import RunConfig
    from training.presets import MODEL_PRESETS
    from training.trainer import make_model, make_optimizer
    results = []
    for preset, setting, S, state_bytes in [
            ("linear", "capacity", 10, sequential), ("dpfp3", "capacity", 12, sequential),
            ("favor64", "capacity", 10, sequential), ("dpfp1-delta", "overwrite", 8, sequential),
            ("schlag2021-tanh", "overwrite", 6, sequential),      # the sequential FWM write
            ("schlag2021-tanh", "overwrite", 6, -1)]:             # its chunk steps
        fwm.SEQUENTIAL_STATE_BYTES = state_bytes
        torch.manual_seed(0)
        config = RunConfig(setting=setting, num_pairs=S, **{**MODEL_PRESETS[preset], "batch_size": 4})
        model = make_model(config)
        optimizer = make_optimizer(model.parameters(), config.lr)
        generator = torch.Generator().manual_seed(0)
        for _ in range(3):
            loss = model.loss(sample_batch(setting, S, config.batch_size, generator))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            results.append(loss.detach().clone())
        results.extend(p.detach().clone() for p in model.parameters())
    return results


def test_vector_clones_change_no_float(fresh_library, monkeypatch):
    """The AVX2 / AVX-512 clones of the compiled loops (csrc/steps.c) against a build without
    them: every loss and parameter of a few training steps, bit for bit."""
    if native.steps(torch.zeros(1)) is None:
        pytest.skip("no C compiler: the native steps are not built")
    with_clones = short_training_fingerprint()
    native._library.cache_clear()
    monkeypatch.setattr(native, "FLAGS", [*native.FLAGS, "-DFWR_NO_CLONES"])
    baseline = short_training_fingerprint()
    assert native._library() is not None and len(list(fresh_library.glob("native-*.so"))) == 2
    assert all(torch.equal(a, b) for a, b in zip(with_clones, baseline))


@pytest.mark.parametrize("name", ["linear", "tanh"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 3e-7), (torch.float64, 1e-15)])
def test_native_pointwise_maps_equal_float64(name, dtype, tol):
    """ELU + 1 and tanh in one C pass each way (csrc/pointwise_impl.h) against torch's float64
    forms, value and gradient, over the range where each saturates or hits exp's floor
    (elu + 1: exp(-87) = 1.6e-38 rather than 0 below x = -87 in float32)."""
    from models.feature_maps import build_feature_map
    if native.steps(torch.zeros(1, dtype=dtype)) is None:
        pytest.skip("no C compiler: the native steps are not built")
    phi = build_feature_map(name, 4)
    x = torch.linspace(-120, 120, 48000, dtype=dtype).view(-1, 4).requires_grad_()
    weight = torch.linspace(-1, 1, x.numel(), dtype=dtype).view_as(x)
    y = phi(x)
    (y * weight).sum().backward()
    exact_x = x.detach().double().requires_grad_()
    exact = type(phi).reference(exact_x)
    (exact * weight.double()).sum().backward()
    # absolute bounds: tanh's 1 - 2 / (e + 1) is as precise as 1's last bit (2e-7)
    scale = 1.0 if name == "tanh" else exact.abs().clamp(min=1.0)
    assert ((y.double() - exact).abs() / scale).max() <= tol * 1.5
    assert ((x.grad.double() - exact_x.grad).abs() / scale).max() <= tol * 1.5
    assert native.kernel_name() == "native"


def test_native_pointwise_maps_spread_a_nan_and_pass_gradgradcheck(native_steps):
    from models.feature_maps import build_feature_map
    for name in ("linear", "tanh"):
        phi = build_feature_map(name, 3).double()
        x = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(phi, (x,)) and torch.autograd.gradgradcheck(phi, (x,))
        poisoned = torch.tensor([[0.5, float("nan"), -0.5]], requires_grad=True)
        y = phi(poisoned)
        y.sum().backward()
        assert torch.isnan(y[0, 1]) and torch.isfinite(y[0, [0, 2]]).all()
        assert torch.isfinite(poisoned.grad[0, [0, 2]]).all()     # the NaN stays in its place


def test_native_pointwise_maps_split_over_threads_change_no_float(monkeypatch, generator):
    from models.feature_maps import build_feature_map
    if native.steps(torch.zeros(1)) is None:
        pytest.skip("no C compiler: the native steps are not built")
    maps = [build_feature_map(name, 5) for name in ("linear", "tanh")]
    one, split = maps_on_one_and_three_threads(monkeypatch, maps,
                                               3 * torch.randn(7, 13, 5, generator=generator))
    assert all(torch.equal(a, b) for a, b in zip(one, split))


@pytest.mark.parametrize("shape", [(32, 40, 128), (3, 1, 5), (7, 2), (4, 3, 1)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 4e-7), (torch.float64, 1e-15)])
def test_native_sum_normalise_equals_float64(shape, dtype, tol, generator):
    """x / (sum x + eps) in one C pass each way (csrc/sum_normalise_impl.h) against the plain
    PyTorch form in float64, value and gradient, relative to the largest of each, for keys'
    eps = 0 and queries' 1e-6 (widths not a multiple of four, and width 1, where y = x / (x +
    eps) cancels in its gradient: there within twice the plain form's error in this dtype)."""
    from models.normalisation import sum_normalise, sum_normalise_reference
    if native.steps(torch.zeros(1, dtype=dtype)) is None:
        pytest.skip("no C compiler: the native steps are not built")

    def value_and_grad(form, x, weight):
        x = x.clone().requires_grad_()
        y = form(x, eps)
        (y * weight).sum().backward()
        return y.detach().double(), x.grad.double(), y.grad_fn

    for eps in (0.0, 1e-6):
        x = torch.rand(shape, generator=generator, dtype=torch.float64)
        weight = torch.randn(shape, generator=generator, dtype=torch.float64)
        x_in, weight_in = x.to(dtype), weight.to(dtype)
        exact, exact_grad, _ = value_and_grad(sum_normalise_reference, x_in.double(), weight)
        y, grad, node = value_and_grad(sum_normalise, x_in, weight_in)
        plain_y, plain_grad, _ = value_and_grad(sum_normalise_reference, x_in, weight_in)
        assert type(node).__name__ == "SumNormaliseBackward"
        # relative to the value's largest entry and to the gradient's scale |weight| / sum x
        # (width 1, eps = 0: the gradient is 0, the reference's a few ulps of that scale)
        grad_scale = (weight / (x.sum(-1, keepdim=True) + eps)).abs().max()
        value_error = lambda a: ((a - exact).abs().max() / exact.abs().max()).item()
        grad_error = lambda a: ((a - exact_grad).abs().max() / grad_scale).item()
        assert value_error(y) <= max(tol, 2 * value_error(plain_y))
        assert grad_error(grad) <= max(4 * tol, 2 * grad_error(plain_grad))


def test_native_sum_normalise_gradgradcheck_nan_threads_and_fallback(native_steps, monkeypatch,
                                                                     generator):
    """The native sum normalisation: differentiable twice, a NaN stays in its row, the rows
    split over threads give the same floats, and without the library (or under a functorch
    transform, or for a dtype C does not take) the PyTorch form runs."""
    from models.normalisation import sum_normalise
    x = torch.rand(2, 5, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    normalised = lambda x: sum_normalise(x, 0.1)
    assert torch.autograd.gradcheck(normalised, (x,))
    assert torch.autograd.gradgradcheck(normalised, (x,))
    poisoned = torch.tensor([[0.5, float("nan"), 0.5], [0.25, 0.5, 0.25]], requires_grad=True)
    y = sum_normalise(poisoned)
    y.sum().backward()
    assert torch.isnan(y[0]).all() and torch.equal(y[1], torch.tensor([0.25, 0.5, 0.25]))
    assert torch.isfinite(poisoned.grad[1]).all()
    x0 = torch.rand(9, 40, 128, generator=generator)
    one, split = maps_on_one_and_three_threads(monkeypatch, [sum_normalise], x0)
    assert all(torch.equal(a, b) for a, b in zip(one, split))
    assert type(sum_normalise(x0.half().requires_grad_()).grad_fn).__name__ == "DivBackward0"
    batched = torch.func.vmap(sum_normalise)(x0.clone().requires_grad_())
    assert type(batched.grad_fn).__name__ == "DivBackward0"
    monkeypatch.setenv("FWR_NATIVE", "0")
    native._library.cache_clear()
    try:
        assert type(sum_normalise(x0.requires_grad_()).grad_fn).__name__ == "DivBackward0"
    finally:
        native._library.cache_clear()


def write_and_grads(form, k, values, beta, weight, chunk, d_value=None):
    """fwm_write taking the native form named `form` (its autograd node's name): the state, its
    evaluation-mode twin and the gradients of <S, weight> for k, beta and (dense values) v."""
    k = k.clone().requires_grad_()
    beta = beta.clone().requires_grad_()
    dense = d_value is None
    values = values.clone().requires_grad_() if dense else values
    kwargs = dict(v=values) if dense else dict(v=None, ids=values, d_value=d_value)
    S = fwm_write(k, beta=beta, chunk_size=chunk, **kwargs)
    assert S.grad_fn is not None and form in type(S.grad_fn).__name__
    (S * weight).sum().backward()
    with torch.no_grad():
        S_eval = fwm_write(k, beta=beta, chunk_size=chunk, **kwargs)
    return S.detach(), S_eval, k.grad, beta.grad, values.grad if dense else None


def sequential_write_and_grads(k, values, beta, weight, d_value=None):
    """``write_and_grads`` of the sequential form (FWMSequential)."""
    return write_and_grads("FWMSequential", k, values, beta, weight, 32, d_value)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("budget", [None, 2000])
def test_sequential_write_equals_the_float64_loop(dtype, tol, budget, monkeypatch, generator):
    """State, evaluation and gradients (k, beta, dense v) of the sequential write against
    fwm_recurrent in float64, the clip active; with a small work budget the backward keeps a
    checkpoint every 6 positions (L = 31: a ragged last chunk of one)."""
    if native.steps(torch.zeros(1, dtype=dtype)) is None:
        pytest.skip("no C compiler: the native steps are not built")
    if budget is not None:
        monkeypatch.setattr(fwm, "SEQUENTIAL_WORK_BYTES", budget)
    B, L, D_k, D_v = 3, 31, 9, 5                   # D_k: a whole vector and a scalar tail
    assert fwm.checkpoint_interval(L, D_k * D_v * dtype.itemsize) == (1 if budget is None else 6)
    k = 2 * torch.tanh(torch.randn(B, L, D_k, generator=generator, dtype=torch.float64))
    v = torch.randn(B, L, D_v, generator=generator, dtype=torch.float64)
    beta = torch.rand(B, L, generator=generator, dtype=torch.float64)
    weight = torch.randn(B, D_k, D_v, generator=generator, dtype=torch.float64)
    ours = sequential_write_and_grads(*(x.to(dtype) for x in (k, v, beta, weight)))
    exact = [x.requires_grad_() for x in (k.clone(), beta.clone(), v.clone())]
    S = fwm_recurrent(None, exact[0], exact[2], exact[1])[1]
    grads = torch.autograd.grad((S * weight).sum(), exact)
    assert S.flatten(1).norm(dim=1).max().item() == pytest.approx(1.0)     # the clip is active
    for a, b in zip(ours, (S, S, *grads)):
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol)
    assert all(torch.equal(a, b) for a, b in zip(ours, sequential_write_and_grads(
        *(x.to(dtype) for x in (k, v, beta, weight)))))                      # deterministic


def test_sequential_write_one_hot_ids_equal_dense_values_and_threads_change_no_float(
        monkeypatch, generator):
    """One-hot ids give the dense one-hot values' floats; sequences split over threads give
    one thread's floats; a bad id is an IndexError."""
    if native.steps(torch.zeros(1)) is None:
        pytest.skip("no C compiler: the native steps are not built")
    B, L, D_k, D_v = 5, 20, 16, 7
    k = torch.tanh(torch.randn(B, L, D_k, generator=generator))
    ids = torch.randint(0, D_v, (B, L), generator=generator)
    beta = torch.rand(B, L, generator=generator)
    weight = torch.randn(B, D_k, D_v, generator=generator)
    one_hot = sequential_write_and_grads(k, ids, beta, weight, d_value=D_v)
    dense = sequential_write_and_grads(k, torch.nn.functional.one_hot(ids, D_v).float(), beta,
                                       weight)
    assert all(torch.equal(a, b) for a, b in zip(one_hot[:4], dense[:4]))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        monkeypatch.setattr(native, "PARALLEL_MIN_WORK", 0)
        split = sequential_write_and_grads(k, ids, beta, weight, d_value=D_v)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one_hot[:4], split[:4]))
    wrong = ids.clone()
    wrong[3, 7] = D_v
    for grad in (True, False):
        with torch.set_grad_enabled(grad), pytest.raises(IndexError, match="outside 0..6"):
            fwm_write(k.clone().requires_grad_(), None, beta, ids=wrong, d_value=D_v)


def test_checkpoint_interval_fits_the_budget_or_takes_sqrt(monkeypatch):
    monkeypatch.setattr(fwm, "SEQUENTIAL_WORK_BYTES", 100 * 1000)
    assert fwm.checkpoint_interval(40, 1000) == 1            # 40 + 1 states fit
    assert fwm.checkpoint_interval(400, 1000) == 5           # 80 + 5 fit, 100 + 4 do not
    assert fwm.checkpoint_interval(400, 10_000) == 20        # nothing fits: sqrt(400)
    assert fwm.checkpoint_interval(1, 10 ** 9) == 1


def long_clipped_write(generator):
    """A float64 FWM write through 400 strongly clipped positions: (k, v, beta, weight) and the
    float64 gradients of <S, weight> for (k, v, beta)."""
    B, L, D_k, D_v = 2, 400, 8, 4
    k = 3 * torch.tanh(torch.randn(B, L, D_k, generator=generator, dtype=torch.float64))
    v = torch.randn(B, L, D_v, generator=generator, dtype=torch.float64)
    beta = torch.rand(B, L, generator=generator, dtype=torch.float64)
    weight = torch.randn(B, D_k, D_v, generator=generator, dtype=torch.float64)
    exact = [x.clone().requires_grad_() for x in (k, v, beta)]
    reference = torch.autograd.grad((fwm.fwm_chunkwise(*exact, 64) * weight).sum(), exact)
    return k, v, beta, weight, reference


def test_sequential_write_gradients_stay_at_their_scale_through_a_long_clipped_sequence(generator):
    """Through 400 strongly clipped positions the gradients of early positions fall below 1e-40;
    in float32 each position's error must stay at its own gradient's scale (plus 1e-12 of the
    largest), as the chunkwise form's does. <dW, W_t>, carried back without its pass, would leave
    errors of about 1e-7 there."""
    if native.steps(torch.zeros(1)) is None:
        pytest.skip("no C compiler: the native steps are not built")
    k, v, beta, weight, reference = long_clipped_write(generator)
    ours = sequential_write_and_grads(k.float(), v.float(), beta.float(), weight.float())
    assert reference[0][:, :200].abs().max() < 1e-30                  # the early gradients vanish
    for got, want in zip((ours[2], ours[4], ours[3]), reference):
        error = (got.double() - want).abs()
        assert (error <= 1e-4 * want.abs() + 1e-12 * want.abs().max()).all()


@pytest.mark.parametrize("D_k,D_v", [(3, 2), (4, 1), (8, 4), (13, 7)])
def test_sequential_write_odd_widths_and_intervals(D_k, D_v, generator):
    """Widths below a vector (8 floats), rows not a multiple of four, checkpoint intervals from 1
    to past the length: the float64 loop's gradients, in float64."""
    if native.steps(torch.zeros(1, dtype=torch.float64)) is None:
        pytest.skip("no C compiler: the native steps are not built")
    B, L = 2, 9
    k = 2 * torch.tanh(torch.randn(B, L, D_k, generator=generator, dtype=torch.float64))
    v = torch.randn(B, L, D_v, generator=generator, dtype=torch.float64)
    beta = torch.rand(B, L, generator=generator, dtype=torch.float64)
    W_bar = torch.randn(B, D_v, D_k, generator=generator, dtype=torch.float64)
    exact = [x.clone().requires_grad_() for x in (k, v, beta)]
    S = fwm_recurrent(None, *exact)[1]
    grads = torch.autograd.grad((S * W_bar.transpose(1, 2)).sum(), exact)
    library = native.steps(k)
    W, kept = native.fwm_sequential_forward(library, k, v, beta, keep=True)
    torch.testing.assert_close(W.transpose(1, 2), S.detach(), rtol=1e-12, atol=1e-12)
    for interval in (1, 2, 4, L, L + 3):
        k_bar, b_bar, v_bar = native.fwm_sequential_backward(library, k, v, beta, kept, W_bar,
                                                             interval, values_grad=True)
        for got, want in zip((k_bar, v_bar, b_bar), grads):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def chunked_write_and_grads(k, values, beta, weight, chunk, d_value=None):
    """``write_and_grads`` of the chunked C form (FWMChunked)."""
    return write_and_grads("FWMChunked", k, values, beta, weight, chunk, d_value)


# Widths around the small product's tiles (4 rows, 2 vectors of 8 floats / 4 doubles, a
# 4-wide and a scalar tail) and lengths around the chunk (one position, a short single chunk,
# a ragged last chunk, whole chunks).
@pytest.mark.parametrize("D_k,D_v,L,chunk", [(1, 1, 1, 4), (3, 5, 7, 16), (9, 17, 31, 8),
                                             (13, 30, 48, 16), (36, 20, 45, 32),
                                             (64, 44, 64, 32)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float64, 1e-12)])
def test_chunked_write_equals_the_float64_loop(dtype, tol, D_k, D_v, L, chunk, monkeypatch,
                                               generator):
    """State, evaluation and gradients (k, beta, dense v) of the chunked C write against
    fwm_recurrent in float64, the clip active; the same floats twice."""
    if native.steps(torch.zeros(1, dtype=dtype)) is None:
        pytest.skip("no C compiler: the native steps are not built")
    monkeypatch.setattr(fwm, "SEQUENTIAL_STATE_BYTES", -1)
    B = 3
    k = 2 * torch.tanh(torch.randn(B, L, D_k, generator=generator, dtype=torch.float64))
    v = torch.randn(B, L, D_v, generator=generator, dtype=torch.float64)
    beta = torch.rand(B, L, generator=generator, dtype=torch.float64)
    weight = torch.randn(B, D_k, D_v, generator=generator, dtype=torch.float64)
    ours = chunked_write_and_grads(*(x.to(dtype) for x in (k, v, beta, weight)), chunk)
    exact = [x.requires_grad_() for x in (k.clone(), beta.clone(), v.clone())]
    S = fwm_recurrent(None, exact[0], exact[2], exact[1])[1]
    grads = torch.autograd.grad((S * weight).sum(), exact)
    if L > 1:
        assert S.flatten(1).norm(dim=1).max().item() == pytest.approx(1.0)  # the clip is active
    scale = max(1.0, max(g.abs().max().item() for g in grads))
    for a, b in zip(ours, (S, S, *grads)):
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol * scale)
    assert torch.equal(ours[0], ours[1])                     # evaluation keeps nothing, same floats
    assert all(torch.equal(a, b) for a, b in zip(ours, chunked_write_and_grads(
        *(x.to(dtype) for x in (k, v, beta, weight)), chunk)))             # deterministic


def test_chunked_write_one_hot_ids_equal_dense_values_and_threads_change_no_float(
        monkeypatch, generator):
    """One-hot ids give the dense one-hot values' floats; sequences split over threads give
    one thread's floats; a bad id is an IndexError, forward and evaluation."""
    if native.steps(torch.zeros(1)) is None:
        pytest.skip("no C compiler: the native steps are not built")
    monkeypatch.setattr(fwm, "SEQUENTIAL_STATE_BYTES", -1)
    B, L, D_k, D_v = 5, 40, 16, 12
    k = torch.tanh(torch.randn(B, L, D_k, generator=generator))
    ids = torch.randint(0, D_v, (B, L), generator=generator)
    beta = torch.rand(B, L, generator=generator)
    weight = torch.randn(B, D_k, D_v, generator=generator)
    one_hot = chunked_write_and_grads(k, ids, beta, weight, 16, d_value=D_v)
    dense = chunked_write_and_grads(k, torch.nn.functional.one_hot(ids, D_v).float(), beta,
                                    weight, 16)
    assert all(torch.equal(a, b) for a, b in zip(one_hot[:4], dense[:4]))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        monkeypatch.setattr(native, "PARALLEL_MIN_WORK", 0)
        split = chunked_write_and_grads(k, ids, beta, weight, 16, d_value=D_v)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one_hot[:4], split[:4]))
    wrong = ids.clone()
    wrong[3, 37] = -1
    for grad in (True, False):
        with torch.set_grad_enabled(grad), pytest.raises(IndexError, match="outside 0..11"):
            fwm_write(k.clone().requires_grad_(), None, beta, ids=wrong, d_value=D_v)


def test_chunked_write_gradients_through_a_long_clipped_sequence(monkeypatch, generator):
    """Through 400 strongly clipped positions (the early gradients fall below 1e-30) the float32
    gradients stay within float32 rounding of the largest: 4e-7 of it here, as the PyTorch
    write's (FWMWrite) and the sequential one's. Unlike the sequential write, small late
    gradients (1e-8 of the largest, from cancelling terms) are not kept to their own scale."""
    if native.steps(torch.zeros(1)) is None:
        pytest.skip("no C compiler: the native steps are not built")
    monkeypatch.setattr(fwm, "SEQUENTIAL_STATE_BYTES", -1)
    k, v, beta, weight, reference = long_clipped_write(generator)
    ours = chunked_write_and_grads(k.float(), v.float(), beta.float(), weight.float(), 32)
    assert reference[0][:, :200].abs().max() < 1e-30                  # the early gradients vanish
    for got, want in zip((ours[2], ours[4], ours[3]), reference):
        assert (got.double() - want).abs().max() <= 4e-6 * want.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernels_flush_subnormals_and_give_the_caller_its_mode_back(dtype):
    if platform.machine().lower() not in ("x86_64", "amd64", "aarch64", "arm64"):
        pytest.skip("subnormals are flushed on x86-64 and AArch64 only")
    library = native.steps(torch.zeros(1, dtype=dtype))
    if library is None:
        pytest.skip("no C compiler: the native steps are not built")
    tiny = torch.finfo(dtype).tiny                          # the smallest normal
    x = torch.tensor([[tiny / 4, 1.0], [tiny, 1.0]], dtype=dtype)
    assert x[0, 0] != 0                                      # a subnormal in PyTorch
    y, _ = native.sum_normalise_forward(library, x, 0.0)
    assert y[0, 0] == 0                                      # x / 1: a subnormal, flushed
    assert y[1, 0] == tiny and y[0, 1] == 1                  # normal numbers unchanged
    assert (x[0, 0] * 1.0) != 0                              # this thread's mode is back
