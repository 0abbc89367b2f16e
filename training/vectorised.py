"""Several seeds of one configuration trained together as one vectorised model.

Runs that differ only in their seed have parameters of identical shapes. Their parameters are
stacked along a new leading "member" dimension M and one forward pass evaluates every member on
its own batch. Two engines: when the memory holds nothing per member but random feature draws
(linear, dpfp, tanh, taylor, softmax, favor, ... with sum, delta, fwm), the members are one
``models.stacked.StackedRetrievalModel`` whose memory sees the M batches as one batch (a step
of M members runs the operations of one step, each M times larger; a random feature map alone
runs once per member, with that member's draws); otherwise (learnable maps, the fwl rule's
learned W_0 and step size) torch.func.vmap over torch.func.stack_module_state, which is
general but materialises batched copies. Adam is elementwise, so ONE Adam over the stacked parameters is exactly M independent
Adams; every member keeps its own data stream, evaluation stream, initialisation and
random-feature draws (the same streams as ``training.trainer.train`` uses for that seed) and
its own stopping point, recorded by the
same ``RunRecord``. A member that has stopped is masked out of the loss (its record is final);
the group runs until its last member stops.

Results match separate runs up to floating-point rounding (batched matrix products round
differently), not bitwise; the store records the engine in each run's ``versions``.
"""
from __future__ import annotations

import copy

import torch
from torch.func import functional_call, stack_module_state, vmap

from models.memory import per_call_features
from models.stacked import StackedRetrievalModel
from models.retrieval import masked_mean, target_losses
from training.config import ConfigError, RunConfig
from training.trainer import RunRecord, _Unbuilt, make_optimizer, make_task, seed_streams


def same_but_seed(configs: list[RunConfig]) -> bool:
    first = configs[0].replace(seed=0)
    return all(c.replace(seed=0) == first for c in configs)


def _stack_batches(batches) -> dict:
    """The tensor fields of M batches of one type, each stacked with a leading [M] dimension
    (vmap maps over tensors in dicts, not over dataclasses). Ragged fields (evaluation sets with
    different query counts) are zero-padded to a common shape: padding is id 0 with query_mask
    False, and each member's answers are sliced back to its own queries before scoring."""
    stacked = {}
    for name, value in vars(batches[0]).items():
        if not isinstance(value, torch.Tensor):
            continue
        tensors = [getattr(b, name) for b in batches]
        shape = [max(sizes) for sizes in zip(*(t.shape for t in tensors))]
        if any(list(t.shape) != shape for t in tensors):
            tensors = [torch.nn.functional.pad(t, [p for d in reversed(range(t.dim()))
                                                   for p in (0, shape[d] - t.shape[d])])
                       for t in tensors]
        stacked[name] = torch.stack(tensors)
    return stacked


def member_losses(y: torch.Tensor, ids: dict) -> torch.Tensor:
    """Each member's training loss, y [M, B, Q, S] and stacked batches -> [M]: the mean query
    loss over its real queries (``retrieval_losses`` and ``masked_mean`` of every member at
    once)."""
    return masked_mean(target_losses(y, ids["targets"]), ids["query_mask"], (1, 2))


def _rebuild(example, tensors: dict):
    """A batch like ``example`` with its tensor fields replaced (inside vmap: one member's)."""
    return type(example)(**{**vars(example), **tensors})


def check_group(configs: list[RunConfig]) -> None:
    """ConfigError unless the configs can train together (valid, same but seed, not MQAR)."""
    if not same_but_seed(configs):
        raise ConfigError("train_seeds needs configs that differ only in their seed")
    for config in configs:
        config.validate()
    if configs[0].setting == "mqar":
        raise ConfigError("vectorised seeds support the capacity and overwrite settings")


def train_seeds(configs: list[RunConfig], log=None) -> list[dict]:
    """Train configs that differ only in seed as one vectorised group; returns their records."""
    if not configs:
        return []
    check_group(configs)
    tasks = [make_task(c) for c in configs]
    streams = [seed_streams(c.seed)[:2] for c in configs]
    data_gens = [torch.Generator().manual_seed(s[0]) for s in streams]
    eval_gens = [torch.Generator().manual_seed(s[1]) for s in streams]
    records = [RunRecord(c) for c in configs]
    config = configs[0]
    try:
        models = [task.build_model() for task in tasks]
        if StackedRetrievalModel.supports(models):
            # The memory holds nothing per member: one module, the M batches as one batch.
            stacked = StackedRetrievalModel(models)
            parameters = list(stacked.parameters())
            refresh_random_features = lambda: stacked.redraw_features(
                [m.redraw_generator for m in models])
            set_mode = stacked.train

            def forward(batches, ids):
                return stacked(ids["keys"], ids["values"], ids["queries"])      # [M, B, Q, S]
        else:
            forward, parameters, refresh_random_features, set_mode = _vmapped(models)
    except (RuntimeError, MemoryError) as exc:       # as train(): e.g. out of memory for a huge S
        for record in records:
            record.stop("failed", f"{type(exc).__name__}: {exc}")
        return [record.result(_Unbuilt()) for record in records]
    optimizer = make_optimizer(parameters, config.lr)

    try:
        for step in range(1, config.max_steps + 1):
            active = torch.tensor([not r.stopped for r in records])
            if not active.any():
                break
            batches = [task.train_batch(gen) for task, gen in zip(tasks, data_gens)]
            refresh_random_features()
            set_mode(True)
            ids = _stack_batches(batches)
            losses = member_losses(forward(batches, ids), ids)               # [M]
            for record, value, is_active in zip(records, losses.tolist(), active.tolist()):
                if is_active:
                    record.train_step(step, value)
            # stopped (or just diverged) members contribute nothing, not even a NaN gradient
            keep = active & torch.tensor([not r.stopped for r in records])
            optimizer.zero_grad(set_to_none=True)
            torch.where(keep, losses, torch.zeros_like(losses)).sum().backward()
            optimizer.step()
            due = [i for i, r in enumerate(records) if not r.stopped and r.eval_due(step)]
            if not due:
                continue
            with torch.no_grad():
                eval_batches = [tasks[i].eval_batch(eval_gens[i]) for i in range(len(models))]
                refresh_random_features()
                set_mode(False)
                y_eval = forward(eval_batches, _stack_batches(eval_batches))
            for i in due:
                num_queries = eval_batches[i].queries.shape[1]
                eval_loss, metrics = tasks[i].score(y_eval[i][:, :num_queries], eval_batches[i])
                records[i].evaluation(step, eval_loss, metrics)
                if log is not None:
                    log(f"seed {configs[i].seed} step {step}: eval {eval_loss:.5g}")
    except (RuntimeError, ValueError, MemoryError) as exc:
        for record in records:
            record.stop("failed", f"{type(exc).__name__}: {exc}")
    engine = f"vectorised x{len(configs)}"
    return [record.result(model, engine) for record, model in zip(records, models)]


def _vmapped(models):
    """(forward, parameters, refresh_random_features, set_mode) of the torch.func path: any
    members, including ones with learnable or per-member random feature maps."""
    params, buffers = stack_module_state(models)
    template = copy.deepcopy(models[0])
    template_phi = per_call_features(template.memory)
    if template_phi is not None:
        template_phi.redraw_policy = "fixed"   # draws happen per member, outside vmap
    phis = [per_call_features(m.memory) for m in models]

    def refresh_random_features():
        # Each member draws from its own stream, exactly as its sequential run would.
        if phis[0] is None:
            return
        for phi, model in zip(phis, models):
            phi.redraw(model.redraw_generator)
        for name, _ in template.named_buffers():
            owner = [dict(m.named_buffers())[name] for m in models]
            buffers[name] = torch.stack(owner)

    def forward(batches, ids):
        example = batches[0]

        def member(p, b, tensors):
            return functional_call(template, (p, b), (_rebuild(example, tensors),))
        return vmap(member)(params, buffers, ids)

    return forward, list(params.values()), refresh_random_features, template.train
