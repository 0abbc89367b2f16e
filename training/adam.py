"""Adam whose steps call PyTorch's fused kernel directly.

``torch.optim.Adam(fused=True)`` spends more time on bookkeeping than on its kernel at the
paper's small sizes: every ``step()`` goes through the optimiser hooks and profiler records,
walks the parameter groups, gathers the state lists, checks dtypes and groups the tensors by
device before one ``torch._fused_adam_`` call. On the 2-core CPU, Linear S = 100 (five
parameter tensors, 57K floats) took 200-270 us per ``step()`` against 75-100 us for the kernel
call alone, out of a 2-3 ms training step.

``LeanAdam`` is that optimiser. Any step it cannot take the short way (a closure, hooks, a
GradScaler's step, a parameter without a gradient, several groups, devices or dtypes, options
the short way does not pass) is ``torch.optim.Adam.step`` itself; otherwise it keeps the
lists and makes the same two calls as ``torch.optim.adam._fused_adam`` (step counts + 1, then
the kernel), so the parameters and state are bitwise those of ``torch.optim.Adam(fused=True)``
(tests/test_adam.py).
Its first step creates the state as ``Adam._init_group`` does (zeros, a float32 step count)
before the same two calls. ``zero_grad(set_to_none=True)`` likewise just drops the gradients.

Neither the short way (the first step included) nor ``zero_grad(set_to_none=True)`` nor
``add_param_group`` imports torch._dynamo, which torch.optim's own step, ``zero_grad``,
``add_param_group`` and ``load_state_dict`` do on their first call (to keep torch.compile out
of them): about 1 s, the largest part of a short run's start-up. A fresh process's first two
Linear seeds at S = 8, 50 steps, took 1.13 s that way, 0.14 s this way, and the next two
0.06 s. ``add_param_group`` runs the function under that decorator (``__wrapped__``), the same
code.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.optim.optimizer import (Optimizer, _global_optimizer_post_hooks,
                                   _global_optimizer_pre_hooks)

# torch.optim.Adam's step with the hooks and profiler record that Optimizer wraps around every
# optimiser's step (once: LeanAdam's own step is marked as wrapped, below).
_ADAM_STEP = torch.optim.Adam.step
if getattr(_ADAM_STEP, "hooked", False):
    _ADAM_STEP = _ADAM_STEP.__wrapped__
_FULL_STEP = Optimizer.profile_hook_step(_ADAM_STEP)


class LeanAdam(torch.optim.Adam):
    """``torch.optim.Adam(params, lr, fused=True)`` with a short way through ``step``."""

    def __init__(self, params, lr: float = 1e-3, **options):
        super().__init__(params, lr=lr, fused=True, **options)
        self._lists: tuple[list[Tensor], ...] | None = None

    def _short_lists(self, initialise: bool = False) -> tuple[list[Tensor], ...] | None:
        """(params, exp_avgs, exp_avg_sqs, steps) when the short way applies, else None.
        initialise: a state that no parameter has yet is created first (the first step)."""
        if len(self.param_groups) != 1:
            return None
        group = self.param_groups[0]
        if (group["amsgrad"] or group["capturable"] or group["differentiable"]
                or group.get("decoupled_weight_decay", False) or isinstance(group["lr"], Tensor)
                or isinstance(group["betas"][0], Tensor) or isinstance(group["betas"][1], Tensor)):
            return None
        params = list(group["params"])
        if not params or len({(p.device, p.dtype) for p in params}) != 1:
            return None
        if initialise and not any(self.state.get(p) for p in params):
            if not self._initialise(params):
                return None
        states = [self.state.get(p, {}) for p in params]
        if any("exp_avg" not in s for s in states):
            return None
        return (params, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                [s["step"] for s in states])

    def _initialise(self, params: list[Tensor]) -> bool:
        """The state of ``Adam._init_group`` for fused Adam (a float32 step count, zero
        averages) for params that all have dense real floating-point gradients on a device the
        fused kernel runs on; False (nothing created) otherwise: torch's step then creates it,
        and raises what it raises."""
        if any(p.grad is None or p.grad.is_sparse or not p.is_floating_point()
               or p.device.type not in ("cpu", "cuda") for p in params):
            return False
        for p in params:
            self.state[p] = {
                "step": torch.zeros((), dtype=torch.float32, device=p.device),
                "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
        return True

    def _hooked(self) -> bool:
        return bool(self._optimizer_step_pre_hooks or self._optimizer_step_post_hooks
                    or _global_optimizer_pre_hooks or _global_optimizer_post_hooks)

    def _scaled(self) -> bool:
        """True inside a GradScaler's step, which hands a fused optimiser its scale and inf
        flag as attributes for torch's step to read."""
        return (getattr(self, "grad_scale", None) is not None
                or getattr(self, "found_inf", None) is not None)

    def _full_step(self, closure=None):
        loss = _FULL_STEP(self, closure)
        self._lists = self._short_lists()
        return loss

    def step(self, closure=None):
        if closure is not None or self._hooked() or self._scaled():
            return self._full_step(closure)
        lists = self._lists
        if lists is None:
            lists = self._lists = self._short_lists(initialise=True)
            if lists is None:
                return self._full_step()
        params, exp_avgs, exp_avg_sqs, steps = lists
        grads = [p.grad for p in params]
        if any(g is None or g.is_sparse for g in grads):
            return self._full_step()
        group = self.param_groups[0]
        beta1, beta2 = group["betas"]
        with torch.no_grad():
            torch._foreach_add_(steps, 1)
            torch._fused_adam_(params, grads, exp_avgs, exp_avg_sqs, [], steps,
                               amsgrad=False, lr=group["lr"], beta1=beta1, beta2=beta2,
                               weight_decay=group["weight_decay"], eps=group["eps"],
                               maximize=group["maximize"], grad_scale=None, found_inf=None)
        return None

    step.hooked = True                                # Optimizer: do not wrap it again

    def zero_grad(self, set_to_none: bool = True) -> None:
        if not set_to_none:
            return super().zero_grad(set_to_none)
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    def add_param_group(self, param_group: dict) -> None:
        add = Optimizer.add_param_group
        getattr(add, "__wrapped__", add)(self, param_group)      # without torch._dynamo
        self._lists = None                            # taken again at the next step

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._lists = None
