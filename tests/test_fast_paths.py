"""The fast paths (one-hot writes, hand-written backwards, the FWM retrieval loop) against the
plain references, forward and backward, in float64."""
import pytest
import torch
import torch.nn.functional as F

from models.memory import OneHot, SoftmaxMemory, write_memory
from models.retrieval import build_model
from models.rules import SumRule, fwm_recurrent
from models.rules.delta import (delta_rule_answer, delta_rule_chunkwise, delta_rule_recurrent,
                                delta_rule_write, delta_rule_write_one_hot)
from models.rules.fwm import fwm_chunkwise, fwm_write
from models.numerics import exp_floor
from tasks import sample_batch
from tasks.evaluation import evaluation_set


def keys_values(B, L, D_k, D_v, generator, beta_range=(0.0, 1.0)):
    """Sum-normalised non-negative keys, one-hot values (as ids and dense), beta."""
    k = F.elu(torch.randn(B, L, D_k, generator=generator, dtype=torch.float64)) + 1
    k = (k / k.sum(-1, keepdim=True)).requires_grad_()
    ids = torch.randint(0, D_v, (B, L), generator=generator)
    v = F.one_hot(ids, D_v).double().requires_grad_()
    low, high = beta_range
    beta = (low + (high - low) * torch.rand(B, L, generator=generator, dtype=torch.float64)).requires_grad_()
    return k, ids, v, beta


def value_and_grads(state, inputs, generator):
    weight = torch.randn(state.shape, generator=generator, dtype=state.dtype)
    grads = torch.autograd.grad((state * weight).sum(), inputs, allow_unused=True)
    return state, grads


def assert_same(result, reference, rtol=1e-9, atol=1e-11, without=()):
    """Equal values and gradients; the inputs numbered in `without` get none (one-hot forms
    take no dense values), every other gradient must be there."""
    (state, grads), (state_ref, grads_ref) = result, reference
    torch.testing.assert_close(state, state_ref, rtol=rtol, atol=atol)
    for index, (grad, grad_ref) in enumerate(zip(grads, grads_ref)):
        assert (grad is None) == (index in without or grad_ref is None)
        if grad is not None:
            torch.testing.assert_close(grad, grad_ref, rtol=rtol * 10, atol=atol * 10)


@pytest.mark.parametrize("L,chunk", [(40, 64), (37, 8), (70, 32), (5, 1), (64, 16)])
@pytest.mark.parametrize("beta_range", [(0.0, 1.0), (1 - 1e-3, 1.0)])
def test_delta_write_forms_equal_recurrent(L, chunk, beta_range, generator):
    k, ids, v, beta = keys_values(2, L, 7, 5, generator, beta_range)
    inputs = (k, beta, v)
    reference = value_and_grads(delta_rule_recurrent(None, k, v, beta)[1], inputs,
                                torch.Generator().manual_seed(0))
    forms = {
        "chunkwise": lambda: delta_rule_chunkwise(None, k, v, beta, chunk)[1],
        "write dense": lambda: delta_rule_write(k, v, beta, chunk),
        "write one-hot": lambda: delta_rule_write(k, None, beta, chunk, ids=ids, d_value=5),
        "one-hot autograd": lambda: delta_rule_write_one_hot(k, ids, 5, beta, chunk),
    }
    for name, form in forms.items():
        assert_same(value_and_grads(form(), inputs, torch.Generator().manual_seed(0)), reference,
                    without=(2,) if "one-hot" in name else ())


def test_delta_write_gradcheck(generator):
    k, ids, v, beta = keys_values(2, 9, 4, 3, generator)
    assert torch.autograd.gradcheck(lambda k, b, v: delta_rule_write(k, v, b, 4), (k, beta, v))
    assert torch.autograd.gradcheck(
        lambda k, b: delta_rule_write(k, None, b, 4, ids=ids, d_value=3), (k, beta))


@pytest.mark.parametrize("L,chunk", [(40, 64), (37, 8), (70, 32), (5, 1), (64, 16), (0, 8)])
@pytest.mark.parametrize("num_queries", [1, 3])
@pytest.mark.parametrize("beta_range", [(0.0, 1.0), (1 - 1e-3, 1.0)])
def test_delta_answer_equals_reading_the_recurrent_state(L, chunk, num_queries, beta_range, generator,
                                                          native_steps):
    k, ids, v, beta = keys_values(2, L, 7, 5, generator, beta_range)
    q = F.elu(torch.randn(2, num_queries, 7, generator=generator, dtype=torch.float64)) + 1
    q = (q / q.sum(-1, keepdim=True)).requires_grad_()
    inputs = (q, k, beta, v)
    reference = value_and_grads(q @ delta_rule_recurrent(None, k, v, beta)[1], inputs,
                                torch.Generator().manual_seed(0))
    dense = value_and_grads(delta_rule_answer(q, k, v, beta, chunk), inputs, torch.Generator().manual_seed(0))
    assert_same(dense, reference)
    one_hot = delta_rule_answer(q, k, None, beta, chunk, ids=ids, d_value=5)
    assert_same(value_and_grads(one_hot, inputs, torch.Generator().manual_seed(0)), reference, without=(3,))


def test_delta_answer_gradcheck(generator, native_steps):
    k, ids, v, beta = keys_values(2, 9, 4, 3, generator)
    q = torch.rand(2, 2, 4, generator=generator, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda q, k, b: delta_rule_answer(q, k, None, b, 4, ids=ids, d_value=3), (q, k, beta))


def test_delta_memory_answers_training_queries_without_the_state(generator, monkeypatch, native_steps):
    """Training (one query per sequence) takes the answer form, evaluation (every key) builds
    the memory; both give the loss and gradients of writing the state and reading it."""
    from models.memory import OneHot
    from models.rules.delta import DeltaRule
    model = build_model(30, "dpfp", "delta", feature_options={"nu": 1}).double()
    train = sample_batch("overwrite", 30, 4, generator)
    evaluation = evaluation_set("overwrite", 30, "paper", generator, num_sequences=2)
    assert model.memory.use_answer(OneHot(train.values, 30), train.queries.shape[1], train.length)
    assert not model.memory.use_answer(OneHot(evaluation.values, 30), evaluation.queries.shape[1],
                                       evaluation.length)
    results = []
    for cheaper in (True, False):
        monkeypatch.setattr(DeltaRule, "answers_cheaper", lambda self, Q, L, c=cheaper: c)
        loss = model.loss(train)
        results.append((loss, torch.autograd.grad(loss, list(model.parameters()))))
    (loss_answer, grads_answer), (loss_state, grads_state) = results
    torch.testing.assert_close(loss_answer, loss_state, rtol=1e-12, atol=1e-14)
    for a, b in zip(grads_answer, grads_state):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_delta_write_needs_one_value_form(generator):
    k, ids, v, beta = keys_values(1, 3, 2, 2, generator)
    with pytest.raises(ValueError):
        delta_rule_write(k, v, beta, ids=ids, d_value=2)
    with pytest.raises(ValueError):
        delta_rule_write(k, None, beta, ids=ids)


def test_sum_rule_one_hot_write_equals_dense(generator):
    k, ids, v, _ = keys_values(3, 11, 6, 4, generator)
    rule = SumRule(6, 4)
    q = torch.rand(3, 2, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    y_fast = rule.read(rule.write_one_hot(k, ids), q)
    y_dense = rule.read(rule.write(k, v.detach(), None), q)
    assert_same_outputs_and_grads(y_fast, y_dense, (k, q))


def assert_same_outputs_and_grads(y_fast, y_dense, inputs):
    torch.testing.assert_close(y_fast, y_dense, rtol=1e-12, atol=1e-14)
    g_fast = torch.autograd.grad((y_fast ** 2).sum(), inputs)
    g_dense = torch.autograd.grad((y_dense ** 2).sum(), inputs)
    for a, b in zip(g_fast, g_dense):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_softmax_one_hot_read_equals_dense(generator):
    k, ids, v, _ = keys_values(3, 11, 6, 4, generator)
    q = torch.randn(3, 5, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    memory = SoftmaxMemory(6)
    y_fast = memory(k, OneHot(ids, 4), None, q)
    y_dense = memory(k, v.detach(), None, q)
    assert_same_outputs_and_grads(y_fast, y_dense, (k, q))


def test_rule_without_one_hot_path_gets_dense_values(generator):
    class DenseOnly:
        def write(self, k, v, beta):
            return v
    ids = torch.randint(0, 4, (2, 3), generator=generator)
    out = write_memory(DenseOnly(), torch.zeros(2, 3, 5, dtype=torch.float64), OneHot(ids, 4), None)
    assert out.dtype == torch.float64
    assert torch.equal(out, F.one_hot(ids, 4).double())


def test_subclass_overriding_write_alone_gets_dense_values(generator):
    """An inherited write_one_hot no longer computes the subclass's write: it must not run."""
    from models.rules.fwm import FWMRule

    class Doubled(FWMRule):
        def write(self, k, v, beta):
            return 2 * super().write(k, v, beta)
    k, ids, v, beta = keys_values(2, 9, 4, 3, generator)
    rule = Doubled(4, 3)
    torch.testing.assert_close(write_memory(rule, k, OneHot(ids, 3), beta), rule.write(k, v, beta))


@pytest.mark.parametrize("scale", [0.3, 3.0])
@pytest.mark.parametrize("L,chunk", [(30, 64), (30, 7), (70, 16), (1, 4), (30, 1), (64, 16)])
def test_fwm_fast_forms_equal_recurrent(scale, L, chunk, generator, native_steps):
    B, D_k, D_v = 3, 6, 5
    k = (scale * torch.tanh(torch.randn(B, L, D_k, generator=generator, dtype=torch.float64))).requires_grad_()
    v = F.one_hot(torch.randint(0, D_v, (B, L), generator=generator), D_v).double().requires_grad_()
    beta = torch.rand(B, L, generator=generator, dtype=torch.float64).requires_grad_()
    inputs = (k, v, beta)
    reference = value_and_grads(fwm_recurrent(None, k, v, beta)[1], inputs,
                                torch.Generator().manual_seed(0))
    for form in (fwm_chunkwise, fwm_write):
        assert_same(value_and_grads(form(k, v, beta, chunk), inputs, torch.Generator().manual_seed(0)),
                    reference, rtol=1e-8, atol=1e-10)
    with torch.no_grad():    # evaluation takes another path
        torch.testing.assert_close(fwm_write(k, v, beta, chunk), reference[0], rtol=1e-8, atol=1e-10)
    if scale > 1 and L > 1:  # the clip must have been active for the test to mean anything
        assert reference[0].flatten(1).norm(dim=1).max().item() == pytest.approx(1.0)


def assert_blocks_equal_whole(monkeypatch, run, function, three_states_bytes, tol):
    """run() on the whole batch of 7 and again in blocks of 3, 3 and 1 sequences
    (STATE_BLOCK_BYTES set to three states' bytes), checking the blocks ``function`` saw."""
    import models.rules.blocks as blocks
    whole = run()
    monkeypatch.setattr(blocks, "STATE_BLOCK_BYTES", three_states_bytes)
    calls = []
    monkeypatch.setattr(function, "apply", lambda *a, original=function.apply:
                        calls.append(a[0].shape[0]) or original(*a))
    blocked = run()
    assert calls == [3, 3, 1]
    for a, b in zip(whole, blocked):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_fwm_write_in_batch_blocks_equals_the_whole_batch(monkeypatch, generator):
    """Blocks of sequences (what keeps a block's states in cache) give the whole batch's forward,
    gradients and evaluation, blocks ragged. In float64: a block that starts off a 64-byte
    boundary can round MKL's products differently, and with the clip this active (keys of norm
    about 5) float32 gradients then differ by up to 5e-4 relative on some draws. (Blocks are
    the PyTorch write's, FWMWrite, which runs without the compiled library; the compiled one
    takes one sequence at a time.)"""
    import models.rules.fwm as fwm
    monkeypatch.setattr(fwm, "steps", lambda *tensors: None)
    B, L, D_k, D_v = 7, 40, 6, 5
    k = 2 * torch.randn(B, L, D_k, generator=generator, dtype=torch.float64)
    v = F.one_hot(torch.randint(0, D_v, (B, L), generator=generator), D_v).double()
    beta = torch.rand(B, L, generator=generator, dtype=torch.float64)

    def run():
        inputs = (k.clone().requires_grad_(), v, beta.clone().requires_grad_())
        S = fwm_write(*inputs, 16)
        (S * torch.arange(D_k * D_v, dtype=torch.float64).view(D_k, D_v)).sum().backward()
        with torch.no_grad():
            return S.detach(), inputs[0].grad, inputs[2].grad, fwm_write(*inputs, 16)

    assert_blocks_equal_whole(monkeypatch, run, fwm.FWMWrite, 3 * D_k * D_v * 8, 1e-12)


def test_block_size_evens_out_blocks_and_keeps_a_gpu_batch_whole(monkeypatch):
    import models.rules.blocks as blocks
    monkeypatch.setattr(blocks, "STATE_BLOCK_BYTES", 1000)
    cpu = torch.device("cpu")
    assert blocks.block_size(7, 100, cpu) == 7                # 10 states fit: one block
    assert blocks.block_size(128, 100, cpu) == 10             # 13 blocks of 10 or fewer
    assert blocks.block_size(21, 100, cpu) == 7               # 3 blocks of 7, not 10, 10, 1
    assert blocks.block_size(5, 5000, cpu) == 1               # a state larger than the budget
    assert blocks.block_size(128, 100, torch.device("cuda")) == 128


def test_delta_chunkwise_in_batch_blocks_equals_the_whole_batch(monkeypatch, generator):
    """The delta rule's outputs form in blocks of sequences (ragged, an initial state split
    with them) gives the whole batch's outputs, state and gradients."""
    import models.rules.delta as delta
    B, L, D_k, D_v = 7, 21, 6, 5
    f64 = dict(generator=generator, dtype=torch.float64)
    tensors = [torch.randn(B, L, D_k, **f64), torch.rand(B, L, D_k, **f64),
               torch.randn(B, L, D_v, **f64), torch.rand(B, L, **f64), torch.randn(B, D_k, D_v, **f64)]

    def run():
        leaves = [x.clone().requires_grad_() for x in tensors]
        o, S = delta_rule_chunkwise(*leaves[:4], 8, initial_state=leaves[4])
        ((o * o).sum() + (S * S).sum()).backward()
        return [o.detach(), S.detach()] + [x.grad for x in leaves]

    assert_blocks_equal_whole(monkeypatch, run, delta.DeltaRuleChunkwise, 3 * D_k * D_v * 8, 1e-12)


def test_fwm_write_gradcheck(generator, native_steps):
    k = (2 * torch.randn(2, 8, 3, generator=generator, dtype=torch.float64)).requires_grad_()
    v = torch.randn(2, 8, 2, generator=generator, dtype=torch.float64, requires_grad=True)
    beta = torch.rand(2, 8, generator=generator, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda k, v, b: fwm_write(k, v, b, 3), (k, v, beta))


def test_fwm_write_float32_long_sequence_stays_finite(generator, native_steps):
    """Large unnormalised keys over 400 steps: the clipped state never overflows in fp32."""
    k = (5 * torch.relu(torch.randn(2, 400, 16, generator=generator, dtype=torch.float64)))
    v = F.one_hot(torch.randint(0, 8, (2, 400), generator=generator), 8).double()
    beta = torch.rand(2, 400, generator=generator, dtype=torch.float64)
    S64 = fwm_recurrent(None, k, v, beta)[1]
    k32 = k.float().requires_grad_()
    beta32 = beta.float().requires_grad_()
    S32 = fwm_write(k32, v.float(), beta32)
    weight = torch.randn(S32.shape, generator=generator, dtype=torch.float64)
    (S32 * weight.float()).sum().backward()
    assert torch.isfinite(k32.grad).all()
    torch.testing.assert_close(S32.double(), S64, rtol=1e-3, atol=1e-4)
    # Gradients too: within float32 rounding of the float64 reference's.
    k64, beta64 = k.clone().requires_grad_(), beta.clone().requires_grad_()
    reference = torch.autograd.grad((fwm_recurrent(None, k64, v, beta64)[1] * weight).sum(), (k64, beta64))
    for grad32, grad64 in zip((k32.grad, beta32.grad), reference):
        assert ((grad32.double() - grad64).norm() / grad64.norm()).item() < 1e-4


def test_fwm_gradient_at_an_exact_clip_tie(generator, native_steps):
    """A saturated state (n = 1 after a clip) followed by a zero key gives n' = 1 exactly; the
    fast forms then take the clip branch alone, as the reference's clamp does, and the gradient is
    one of the one-sided difference quotients (not the sum of both branches)."""
    gen = torch.Generator().manual_seed(1)
    k = 3 * torch.randn(1, 5, 3, generator=gen, dtype=torch.float64)
    k[:, 2] = 0.0
    v = torch.randn(1, 5, 2, generator=gen, dtype=torch.float64)
    beta = torch.rand(1, 5, generator=gen, dtype=torch.float64)
    weight = torch.randn(1, 3, 2, generator=gen, dtype=torch.float64)
    loss = lambda form, k: (form(k, v, beta) * weight).sum()
    k_ref = k.clone().requires_grad_()
    (grad_ref,) = torch.autograd.grad(loss(lambda *a: fwm_recurrent(None, *a)[1], k_ref), k_ref)
    for form in (lambda *a: fwm_write(*a, 3), lambda *a: fwm_chunkwise(*a, 3)):
        k_fast = k.clone().requires_grad_()
        (grad,) = torch.autograd.grad(loss(form, k_fast), k_fast)
        torch.testing.assert_close(grad, grad_ref, rtol=1e-8, atol=1e-10)
    h = 1e-6
    shifted = [k.clone() for _ in range(2)]
    shifted[0][0, 2, 0] += h
    shifted[1][0, 2, 0] -= h
    with torch.no_grad():
        base = loss(lambda *a: fwm_recurrent(None, *a)[1], k)
        right = (loss(lambda *a: fwm_recurrent(None, *a)[1], shifted[0]) - base) / h
        left = (base - loss(lambda *a: fwm_recurrent(None, *a)[1], shifted[1])) / h
    assert abs(right - left) > 0.1                      # a real kink
    assert min(abs(grad_ref[0, 2, 0] - right), abs(grad_ref[0, 2, 0] - left)) < 1e-4


def test_fwm_empty_sequence_and_device(generator, native_steps):
    k, v, beta = torch.randn(2, 0, 3), torch.randn(2, 0, 4), torch.rand(2, 0)
    assert torch.equal(fwm_write(k, v, beta), torch.zeros(2, 3, 4))
    meta = [torch.randn(2, 5, 3, device="meta", requires_grad=True), torch.randn(2, 5, 2, device="meta"),
            torch.rand(2, 5, device="meta")]
    assert fwm_write(*meta).device.type == "meta"     # every buffer follows the inputs' device


COMBINATIONS = [("softmax", "sum", {}), ("linear", "sum", {}), ("dpfp", "delta", {"nu": 1}),
                ("tanh", "fwm", {}), ("favor", "sum", {"m": 8}), ("dpfp", "fwm", {"nu": 1}),
                ("dpfp", "sum", {"nu": 2}), ("taylor", "sum", {})]  # favor/dpfp/taylor sum: kernel form


@pytest.mark.parametrize("feature_map,rule,options", COMBINATIONS)
@pytest.mark.parametrize("setting", ["capacity", "overwrite"])
def test_model_one_hot_path_equals_dense_path(feature_map, rule, options, setting, generator):
    torch.manual_seed(0)
    model = build_model(9, feature_map, rule, feature_options=options).double()
    if getattr(model.memory, "phi", None) is not None and model.memory.phi.random:
        model.memory.phi.redraw_policy = "fixed"       # the same features for both passes
    batch = sample_batch(setting, 9, 4, generator)
    if rule == "sum" and feature_map in ("dpfp", "taylor", "favor"):
        from models.memory import OneHot
        assert model.memory.use_kernel(OneHot(batch.values, 9), batch.queries.shape[1], batch.length)
    results = []
    for one_hot in (True, False):
        model.one_hot_values = one_hot
        loss = model.loss(batch)
        grads = torch.autograd.grad(loss, list(model.parameters()))
        results.append((loss, grads))
    (loss_fast, grads_fast), (loss_dense, grads_dense) = results
    torch.testing.assert_close(loss_fast, loss_dense, rtol=1e-12, atol=1e-14)
    for a, b in zip(grads_fast, grads_dense):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("feature_map,options,d_key", [
    ("dpfp", {"nu": 1}, 8), ("dpfp", {"nu": 3}, 8), ("dpfp", {"nu": 2}, 1), ("dpfp", {"nu": 5}, 2),
    ("taylor", {}, 8), ("favor", {"m": 16, "redraw": "fixed"}, 8)])
def test_kernel_equals_feature_dot_products(feature_map, options, d_key, generator):
    """(DPFP with nu >= 2 D_k: shifts that wrap around the whole width.)"""
    from models.feature_maps import build_feature_map
    phi = build_feature_map(feature_map, d_key, **options).double()
    q = torch.randn(3, 5, d_key, generator=generator, dtype=torch.float64)
    k = torch.randn(3, 7, d_key, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(phi.kernel(q, k), phi(q) @ phi(k).transpose(1, 2), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("scale", [1.0, 12.0])   # 12: many terms below exp's floor
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_favor_kernel_backward_equals_autograd_of_the_features(scale, dtype, native_steps, generator):
    from models.feature_maps import build_feature_map
    phi = build_feature_map("favor", 6, m=16, redraw="fixed").to(dtype)
    q0 = scale * torch.randn(3, 2, 6, generator=generator, dtype=torch.float64)
    k0 = scale * torch.randn(3, 7, 6, generator=generator, dtype=torch.float64)
    weight = torch.randn(3, 2, 7, generator=generator, dtype=torch.float64)

    def value_and_grads(form):
        q, k = q0.to(dtype).requires_grad_(), k0.to(dtype).requires_grad_()
        out = form(q, k)
        return (out, *torch.autograd.grad((out * weight.to(dtype)).sum(), (q, k)))

    ours = value_and_grads(phi.kernel)
    reference = value_and_grads(lambda q, k: phi(q) @ phi(k).transpose(1, 2))
    for a, b in zip(ours, reference):
        # float32: a gradient entry where the two terms cancel is as precise as the largest one
        tol = (dict(rtol=1e-10, atol=1e-300) if dtype == torch.float64
               else dict(rtol=2e-4, atol=max(1e-5 * b.abs().max().item(), 1e-30)))
        torch.testing.assert_close(a, b, **tol)
    if scale > 1:      # the floor was reached, so its zero-gradient rule was exercised
        log_terms = phi._log_features(q0.to(dtype))[:, :, None] + phi._log_features(k0.to(dtype))[:, None]
        assert (log_terms < exp_floor(dtype)).any()


def test_favor_kernel_reads_projected_keys_unless_a_subclass_overrides_it(generator, monkeypatch):
    """A FAVOR+ model's training step hands its kernel the keys as tables and ids; a map that
    overrides ``kernel`` (and a memory that overrides ``forward``) gets the formed keys."""
    import models.feature_maps as feature_maps
    from models.feature_maps import FAVORPlus
    from models.memory import FastWeightMemory
    from models.projection import ProjectedKeys

    seen = []
    real = feature_maps.favor_projected_kernel
    monkeypatch.setattr(feature_maps, "favor_projected_kernel",
                        lambda q, k, omega: seen.append("tables") or real(q, k, omega))

    class Logged(FAVORPlus):
        def kernel(self, q, k):
            seen.append(type(k))
            return super().kernel(q, k)

    class LoggedMemory(FastWeightMemory):
        def forward(self, k, v, beta, q):
            seen.append(type(k))
            return super().forward(k, v, beta, q)

    torch.manual_seed(0)
    model = build_model(12, "favor", "sum", feature_options={"m": 16, "redraw": "fixed"})
    batch = sample_batch("capacity", 12, 3, generator)
    expected = model(batch)
    assert seen == ["tables"]
    seen.clear()
    phi = Logged(64, m=16, redraw="fixed")
    phi.load_state_dict(model.memory.phi.state_dict())
    phi.omega = model.memory.phi.omega
    model.memory.phi = phi
    torch.testing.assert_close(model(batch), expected, rtol=1e-5, atol=1e-6)
    assert seen == [torch.Tensor]
    seen.clear()
    model.memory = LoggedMemory(model.memory.phi, model.memory.rule)
    torch.testing.assert_close(model(batch), expected, rtol=1e-5, atol=1e-6)
    assert seen == [torch.Tensor, torch.Tensor] and ProjectedKeys not in seen


@pytest.mark.parametrize("feature_map,options", [("linear", {}), ("dpfp", {"nu": 3})])
@pytest.mark.parametrize("members", [1, 2])
def test_linear_and_dpfp_training_reads_projected_keys_with_the_floats_of_the_formed_keys(
        feature_map, options, members, monkeypatch, generator):
    """Setting 1's Linear and DPFP training steps (one model, or stacked members) hand the
    kernel the keys as tables and ids and compute them in C (PointwiseKernel,
    DPFPProjectedKernel): the loss and every parameter's gradient are the floats of forming
    the keys first."""
    import models.memory as memory_module
    from models.feature_maps import DPFPProjectedKernel, PointwiseKernel
    from models.rules.native import steps
    from models.stacked import StackedRetrievalModel
    if steps(torch.zeros(1)) is None:
        pytest.skip("no C compiler: the native steps are not built")
    fast = PointwiseKernel if feature_map == "linear" else DPFPProjectedKernel
    calls = []
    monkeypatch.setattr(fast, "apply", (lambda original: lambda *args: calls.append(1)
                                        or original(*args))(fast.apply))
    models = []
    for seed in range(members):
        torch.manual_seed(seed)
        models.append(build_model(24, feature_map, "sum", feature_options=options))
    model = models[0] if members == 1 else StackedRetrievalModel(models)
    batches = [sample_batch("capacity", 24, 4, generator) for _ in range(members)]
    ids = [torch.stack([getattr(b, name) for b in batches]) for name in ("keys", "values", "queries")]

    def loss_and_grads():
        # a stacked model's answers [M, B, Q, S], squared: any loss reaches every parameter
        loss = model.loss(batches[0]) if members == 1 else model(*ids).square().sum()
        return [loss, *torch.autograd.grad(loss, list(model.parameters()))]

    ours = loss_and_grads()
    assert calls == [1]
    monkeypatch.setattr(memory_module, "kernel_takes_projected_keys", lambda phi: False)
    formed = loss_and_grads()
    assert calls == [1]
    assert all(torch.equal(a, b) for a, b in zip(ours, formed))


def test_kernel_form_answers_training_queries_and_memory_answers_evaluation(generator):
    model = build_model(30, "dpfp", "sum", feature_options={"nu": 3})
    memory = model.memory
    train = sample_batch("capacity", 30, 4, generator)
    evaluation = evaluation_set("capacity", 30, "paper", generator, num_sequences=2)
    from models.memory import OneHot
    assert memory.use_kernel(OneHot(train.values, 30), train.queries.shape[1], train.length)
    assert not memory.use_kernel(OneHot(evaluation.values, 30), evaluation.queries.shape[1],
                                 evaluation.length)
    assert not build_model(30, "dpfp", "delta").memory.use_kernel(OneHot(train.values, 30), 1, 30)
    favor = build_model(30, "favor", "sum", feature_options={"m": 64}).memory
    assert favor.use_kernel(OneHot(train.values, 30), 1, 30)
    assert not favor.use_kernel(OneHot(evaluation.values, 30), evaluation.queries.shape[1], 30)


def test_query_losses_equal_dense_target_formula(generator):
    torch.manual_seed(0)
    model = build_model(12, "dpfp", "delta", feature_options={"nu": 1}).double()
    batch = evaluation_set("overwrite", 12, "paper", generator, num_sequences=3)
    y = model(batch)
    expected = 0.5 * (y - batch.target_vectors(y.dtype)).pow(2).sum(-1)
    torch.testing.assert_close(model.query_losses(batch), expected, rtol=0, atol=0)


def test_a_subclass_that_changes_the_features_does_not_inherit_the_kernel(generator):
    from models.feature_maps import DPFP, check_feature_map
    from models.memory import OneHot
    from models.rules import SumRule

    class Squared(DPFP):
        def forward(self, x):
            return super().forward(x) ** 2

    class Both(DPFP):
        def forward(self, x):
            return super().forward(x)

        def kernel(self, q, k):
            return super().kernel(q, k)

    ids = OneHot(torch.zeros(2, 30, dtype=torch.long), 30)
    from models.memory import FastWeightMemory
    assert not FastWeightMemory(Squared(8, nu=2), SumRule(32, 30)).use_kernel(ids, 1, 30)
    assert FastWeightMemory(Both(8, nu=2), SumRule(32, 30)).use_kernel(ids, 1, 30)

    class OtherRead(SumRule):
        def read(self, state, q):
            return 2 * super().read(state, q)
    assert not FastWeightMemory(DPFP(8, nu=2), OtherRead(32, 30)).use_kernel(ids, 1, 30)

    class WrongKernel(DPFP):
        def kernel(self, q, k):
            return 2 * super().kernel(q, k)
    with pytest.raises(ValueError, match="kernel"):
        check_feature_map(WrongKernel(8, nu=1), 8)
    check_feature_map(Both(8, nu=1), 8)


def test_fwm_write_with_constant_values(generator, native_steps):
    """One-hot values are constants in the models: the backward skips their gradient and the
    others are unchanged."""
    k = (2 * torch.randn(2, 20, 4, generator=generator, dtype=torch.float64)).requires_grad_()
    v = F.one_hot(torch.randint(0, 5, (2, 20), generator=generator), 5).double()
    beta = torch.rand(2, 20, generator=generator, dtype=torch.float64).requires_grad_()
    weight = torch.randn(2, 4, 5, generator=generator, dtype=torch.float64)
    ours = torch.autograd.grad((fwm_write(k, v, beta, 6) * weight).sum(), (k, beta))
    reference = torch.autograd.grad((fwm_recurrent(None, k, v, beta)[1] * weight).sum(), (k, beta))
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fwm_write_one_hot_ids_equal_dense_values(dtype, monkeypatch, generator, native_steps):
    """One-hot ids (each chunk's rows built when it runs) give the dense values' floats exactly:
    state, gradients and evaluation, whole and in blocks (a ragged last chunk), and under vmap."""
    import models.rules.blocks as blocks
    B, L, D_k, D_v = 7, 45, 6, 5
    k = 2 * torch.randn(B, L, D_k, generator=generator, dtype=dtype)
    ids = torch.randint(0, D_v, (B, L), generator=generator)
    beta = torch.rand(B, L, generator=generator, dtype=dtype)
    weight = torch.randn(D_k, D_v, generator=generator, dtype=dtype)

    def run(one_hot):
        kk, bb = k.clone().requires_grad_(), beta.clone().requires_grad_()
        values = dict(v=None, ids=ids, d_value=D_v) if one_hot else dict(v=F.one_hot(ids, D_v).to(dtype))
        S = fwm_write(kk, beta=bb, chunk_size=16, **values)
        (S * weight).sum().backward()
        with torch.no_grad():
            return S.detach(), kk.grad, bb.grad, fwm_write(kk, beta=bb, chunk_size=16, **values)

    for state_bytes in (blocks.STATE_BLOCK_BYTES, 3 * D_k * D_v * k.element_size()):
        monkeypatch.setattr(blocks, "STATE_BLOCK_BYTES", state_bytes)
        dense, one_hot = run(False), run(True)
        for a, b in zip(dense, one_hot):
            assert torch.equal(a, b)
    assert dense[0].flatten(1).norm(dim=1).max().item() == pytest.approx(1.0)   # clip active
    mapped = torch.func.vmap(lambda kk, ii, bb: fwm_write(kk, None, bb, 16, ids=ii, d_value=D_v))(
        k[None], ids[None], beta[None])
    torch.testing.assert_close(mapped[0], dense[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="either"):
        fwm_write(k, F.one_hot(ids, D_v).to(dtype), beta, ids=ids, d_value=D_v)
    with pytest.raises(ValueError, match="d_value"):
        fwm_write(k, None, beta, ids=ids)
    for bad in (D_v, -1):     # an id outside the value width is an error, never a zero row
        wrong = ids.clone()
        wrong[3, 20] = bad
        for grad in (True, False):
            with torch.set_grad_enabled(grad), pytest.raises((IndexError, RuntimeError)):
                fwm_write(k.clone().requires_grad_(), None, beta, 16, ids=wrong, d_value=D_v)


@pytest.mark.parametrize("feature_map,options,norm", [("linear", {}, "none"), ("relu", {}, "sum"),
                                                      ("dpfp", {"nu": 2}, "sum")])
def test_attention_form_answers_training_queries_as_the_memory_does(feature_map, options, norm,
                                                                    generator):
    """Sum rule, explicit features (normalised or not): training's one query per sequence is
    answered from the scores phi(q) . phi(k_t), evaluation's many from the memory; both equal
    the memory's answer, value and gradients, in float64."""
    from models.memory import OneHot
    torch.manual_seed(0)
    model = build_model(20, feature_map, "sum", feature_options=options).double()
    model.memory.rule.key_norm = model.memory.rule.query_norm = norm
    train = sample_batch("capacity", 20, 4, generator)
    evaluation = evaluation_set("capacity", 20, "paper", generator, num_sequences=2)
    memory = model.memory
    assert memory.use_attention(OneHot(train.values, 20), 1, train.length)
    assert not memory.use_attention(OneHot(evaluation.values, 20), evaluation.queries.shape[1],
                                    evaluation.length)
    # DPFP's and ELU + 1's kernels (the features' dot products) wherever no normalisation intervenes
    assert memory.use_kernel(OneHot(train.values, 20), 1, 20) == (norm == "none" and feature_map != "relu")

    def loss_and_grads(attention: bool):
        memory.use_attention = (lambda *args: attention)
        memory.use_kernel = (lambda *args: False)
        loss = model.loss(train)
        return (loss, *torch.autograd.grad(loss, list(model.parameters())))

    for a, b in zip(loss_and_grads(True), loss_and_grads(False)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_projection_lookups_equal_index_select_exactly(generator, monkeypatch):
    """The C lookups (one pass) and the two index_selects give the same floats, forward and
    backward; an id outside the table is an IndexError either way."""
    import models.projection as projection
    from models.rules import native
    if native.steps(torch.zeros(1)) is None:
        pytest.skip("no C compiler: the native steps are not built")
    torch.manual_seed(0)
    model = build_model(20, "linear", "sum")
    batch = sample_batch("overwrite", 20, 4, generator)
    weight = torch.randn(4, 40, 64, generator=generator)

    def lookups():
        k = model._project(model.W_K, batch.keys, batch.values)
        return (k, *torch.autograd.grad((k * weight).sum(), list(model.parameters()),
                                        allow_unused=True))

    compiled = lookups()
    S = model.num_pairs
    dense = (model.W_K.weight[:, :S].T[batch.values]
             + (model.embedding.weight @ model.W_K.weight[:, S:].T + model.W_K.bias)[batch.keys])
    assert torch.equal(compiled[0], dense)
    with pytest.raises(IndexError):
        model._project(model.W_K, batch.keys, batch.values + 20)
    monkeypatch.setattr(projection, "steps", lambda *tensors: None)
    for a, b in zip(compiled, lookups()):
        assert (a is None and b is None) or torch.equal(a, b)
    with pytest.raises(IndexError):
        model._project(model.W_K, batch.keys, batch.values + 20)


@pytest.mark.parametrize("num_queries", [1, 3])
def test_pair_scores_equal_the_product_of_matrices(num_queries, generator):
    """Value, gradients (in k's own layout) and second-order gradients of q @ k^T (float64)."""
    from models.memory import pair_scores
    q = torch.randn(2, num_queries, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 7, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    scores = pair_scores(q, k)
    torch.testing.assert_close(scores, q @ k.transpose(1, 2), rtol=0, atol=0)
    d_q, d_k = torch.autograd.grad(scores.pow(2).sum(), (q, k))
    assert d_k.is_contiguous()
    for ours, plain in zip((d_q, d_k), torch.autograd.grad((q @ k.transpose(1, 2)).pow(2).sum(), (q, k))):
        torch.testing.assert_close(ours, plain, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(pair_scores, (q, k))
    assert torch.autograd.gradgradcheck(pair_scores, (q, k))


@pytest.mark.parametrize("members,num_queries,single", [(1, 1, None), (1, 5, None), (3, 1, None),
                                                        (3, 4, None), (1, 1, "all"), (1, 5, "all"),
                                                        (1, 1, "factors")])
def test_projected_key_scores_equal_the_formed_keys(members, num_queries, single, generator):
    """ProjectedKeys.scores(q) (q against each member's tables or, with few queries, the key
    table's factors; then gathers) equals q @ k^T with k = dense(), forward and backward,
    float64; a member's queries read only its tables. ``single``: "all" the tables as a single
    model passes them, without the member dimension (and ``lookups`` gives them as they are),
    or the table's "factors" alone so (the columns [1, S, D])."""
    from models.projection import ProjectedKeys
    M, B, L, S, D, E = members, 3, 7, 5, 4, 6
    shapes = [(M, S, D), (M, S, E), (M, D, E), (M, D)]      # columns, embedding, weight, bias
    tables = [torch.randn(*shape, generator=generator, dtype=torch.float64, requires_grad=True)
              for shape in shapes]
    if single:
        first = 0 if single == "all" else 1
        tables = tables[:first] + [t.detach()[0].requires_grad_() for t in tables[first:]]
    ids = [torch.randint(0, S, (M * B, L), generator=generator) for _ in range(2)]
    q = torch.randn(M * B, num_queries, D, generator=generator, dtype=torch.float64,
                    requires_grad=True)
    weight = torch.randn(M * B, num_queries, L, generator=generator, dtype=torch.float64)
    keys = ProjectedKeys(*tables, *ids)
    # One query per sequence reads the factors here (B (D + S) < S D for these sizes), more
    # read the formed table: both forms are checked.
    assert keys.reads_factors(B * num_queries) == (num_queries == 1)
    columns, embedding, projection, bias = (t if t.dim() == n else t[None]
                                            for t, n in zip(tables, (3, 3, 3, 2)))
    assert keys.members == M
    if single == "all":
        assert keys.lookups()[0] is tables[0]
    dense = keys.dense()
    row = lambda m, b: m * B + b
    for m in range(M):                                  # member m's rows of its own tables
        table = bias[m] + embedding[m] @ projection[m].T
        torch.testing.assert_close(keys.table[m], table, rtol=1e-14, atol=1e-14)
        for b in range(B):
            expected = columns[m][ids[0][row(m, b)]] + keys.table[m][ids[1][row(m, b)]]
            assert torch.equal(dense[row(m, b)], expected)

    def value_and_grads(scores):
        out = scores()
        return (out, *torch.autograd.grad((out * weight).sum(), [q, *tables]))

    ours = value_and_grads(lambda: keys.scores(q))
    reference = value_and_grads(lambda: q @ keys.dense().transpose(1, 2))
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_a_softmax_memory_that_overrides_forward_gets_formed_keys(generator):
    from models.memory import reads_projected_keys
    from models.projection import ProjectedKeys

    seen = []

    class Logged(SoftmaxMemory):
        def forward(self, k, v, beta, q):
            seen.append(type(k))
            return super().forward(k, v, beta, q)

    model = build_model(6, "softmax", "sum")
    assert reads_projected_keys(model.memory) and not reads_projected_keys(Logged(64))
    batch = sample_batch("capacity", 6, 2, generator)
    expected = model(batch)
    model.memory = Logged(64)
    torch.testing.assert_close(model(batch), expected, rtol=1e-5, atol=1e-6)
    assert seen == [torch.Tensor]
    assert ProjectedKeys not in seen
