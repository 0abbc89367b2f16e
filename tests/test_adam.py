"""LeanAdam (training/adam.py) against torch.optim.Adam(fused=True): the same floats."""
import pytest
import torch

from training.adam import LeanAdam
from training.config import RunConfig
from training.trainer import make_model, make_optimizer
from tasks.associative import sample_batch


def _pairs(seed: int, dtype=torch.float32):
    """Two copies of the same parameters: [3, 5] matrix, [5] vector, [] scalar."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(3, 5), (5,), ()]
    first = [torch.randn(s, generator=gen, dtype=dtype).requires_grad_() for s in shapes]
    second = [p.detach().clone().requires_grad_() for p in first]
    return first, second


def _set_grads(params, seed: int, skip=()):
    gen = torch.Generator().manual_seed(seed)
    for i, p in enumerate(params):
        grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        p.grad = None if i in skip else grad


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("options", [{}, {"weight_decay": 0.1, "betas": (0.8, 0.99), "eps": 1e-6},
                                     {"maximize": True}])
def test_lean_adam_matches_fused_adam_bitwise(options):
    ours, theirs = _pairs(0)
    lean = LeanAdam(ours, lr=3e-2, **options)
    fused = torch.optim.Adam(theirs, lr=3e-2, fused=True, **options)
    for step in range(25):
        # a step where one parameter has no gradient takes torch's own path, the others the
        # short way: both must keep the same state
        skip = (1,) if step == 7 else ()
        for params, opt in ((ours, lean), (theirs, fused)):
            opt.zero_grad(set_to_none=True)
            _set_grads(params, 100 + step, skip)
            opt.step()
        assert _same(ours, theirs), step
    assert lean._lists is not None                   # the short way was taken
    for p, q in zip(ours, theirs):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(lean.state[p][key], fused.state[q][key])


def test_lean_adam_zero_grad_and_fallbacks():
    ours, theirs = _pairs(1)
    lean = LeanAdam(ours, lr=1e-2)
    fused = torch.optim.Adam(theirs, lr=1e-2, fused=True)
    for params, opt in ((ours, lean), (theirs, fused)):
        _set_grads(params, 5)
        opt.step()
    lean.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in ours)
    # a hook sends the step through torch's path, which runs the hook
    calls = []
    handle = lean.register_step_pre_hook(lambda opt, args, kwargs: calls.append(1))
    for params, opt in ((ours, lean), (theirs, fused)):
        _set_grads(params, 6)
        opt.step()
    handle.remove()
    assert calls == [1] and _same(ours, theirs)
    # a closure is evaluated and its loss returned
    _set_grads(ours, 7)
    _set_grads(theirs, 7)
    assert lean.step(lambda: torch.tensor(2.0)).item() == 2.0
    fused.step()
    assert _same(ours, theirs)
    # zero_grad without set_to_none keeps zeroed gradients
    lean.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in ours)


def test_lean_adam_in_training_matches_fused_adam():
    """Ten training steps of a retrieval model: the same parameters through either optimiser."""
    config = RunConfig(setting="capacity", num_pairs=12, feature_map="linear", rule="delta",
                       batch_size=8)
    results = []
    for optimiser in ("lean", "torch"):
        torch.manual_seed(0)
        model = make_model(config)
        opt = (make_optimizer(model.parameters(), 1e-3) if optimiser == "lean"
               else torch.optim.Adam(model.parameters(), lr=1e-3, fused=True))
        gen = torch.Generator().manual_seed(3)
        for _ in range(10):
            loss = model.loss(sample_batch("capacity", 12, 8, gen))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        results.append([p.detach().clone() for p in model.parameters()])
    assert isinstance(make_optimizer([torch.zeros(1, requires_grad=True)], 1e-3), LeanAdam)
    assert _same(*results)


def test_training_with_lean_adam_never_imports_dynamo(fresh_python):
    """torch.optim imports torch._dynamo on the first step, zero_grad and add_param_group
    (about 1 s of every training process's start); LeanAdam's first steps do not, and its state
    after them is torch's (test_lean_adam_matches_fused_adam_bitwise)."""
    code = ("import sys, torch\n"
            "from training.config import RunConfig\n"
            "from training.trainer import train\n"
            "from training.vectorised import train_seeds\n"
            "train(RunConfig(num_pairs=6, max_steps=5), progress=False)\n"
            "train_seeds([RunConfig(num_pairs=6, max_steps=5, seed=s) for s in (0, 1)])\n"
            "print('torch._dynamo' in sys.modules)\n")
    out = fresh_python(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_lean_adam_first_step_takes_torchs_path_where_the_short_way_does_not_apply():
    """A first step with a parameter lacking its gradient: torch's own step creates the state
    (only for the parameters it updates), then later steps go the short way, bitwise as torch."""
    ours, theirs = _pairs(2)
    lean = LeanAdam(ours, lr=1e-2)
    fused = torch.optim.Adam(theirs, lr=1e-2, fused=True)
    for step in range(4):
        for params, opt in ((ours, lean), (theirs, fused)):
            opt.zero_grad(set_to_none=True)
            _set_grads(params, 20 + step, skip=(2,) if step == 0 else ())
            opt.step()
        assert _same(ours, theirs), step
    assert lean._lists is not None


def test_lean_adam_under_a_grad_scaler_takes_torchs_step():
    """A GradScaler hands a fused optimiser its scale and inf flag for its step to read: a step
    with an inf gradient is skipped and the others unscaled, as by torch's fused Adam."""
    results = []
    for make in (lambda p: LeanAdam([p], lr=0.1),
                 lambda p: torch.optim.Adam([p], lr=0.1, fused=True)):
        p = torch.ones(3, requires_grad=True)
        opt = make(p)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        for step in range(3):
            opt.zero_grad(set_to_none=True)
            weights = torch.tensor([1.0, 2.0, float("inf") if step == 1 else 3.0])
            scaler.scale((p * weights).sum()).backward()
            scaler.step(opt)
            scaler.update()
        results.append((p.detach().clone(), opt.state[p]["step"].clone()))
    (ours, our_steps), (theirs, their_steps) = results
    assert torch.isfinite(ours).all() and torch.equal(ours, theirs)
    assert torch.equal(our_steps, their_steps) and their_steps.item() == 2
