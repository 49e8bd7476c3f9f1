"""Local SGD of a whole cohort of clients at once: ``training.sgd_epochs`` for K clients that share one
model architecture, run as one vectorised loop with ``torch.func``.

Each client's parameters are stacked along a new leading client dimension; one step runs
``vmap(functional_call)`` over that stack (every client's forward on its own minibatch), one backward
of the sum of the clients' losses and one SGD update per parameter as a tensor op on the stack (a
backward outside ``vmap`` costs less per step than ``vmap(grad(...))``, which matters for models as
small as MLR). For client k the result is what ``sgd_epochs`` would have done on its own (same
minibatches, same steps, same update rule, same generator draws, same budget accounting, same
returned loss), up to float rounding:

- **Minibatches.** ``epochs`` passes of ``torch.randperm(n_k, generator=g_k)`` split into
  ``batch_size`` chunks, all drawn before training in the order ``sgd_epochs`` draws them (it draws
  every pass's permutation even after the budget ran out), so ``g_k`` ends in the same state; or the
  client's own list of index tensors (``BatchStream``), one step each.
- **Steps.** Client k takes ``T_k = min(budget left, its number of minibatches)`` steps, the first
  ``T_k`` of its minibatch sequence, and its ``StepBudget.used`` grows by ``T_k``, as ``StepBudget.take``
  counts. Clients are sorted by ``T_k`` (longest first), so at step t the clients still stepping are a
  prefix of the stack: the step works on the views ``stack[:A_t]`` and the others are not touched.
  When one client is left stepping (a long client's tail), its step runs without ``vmap``.
- **Padding and masking.** At step t the active clients' minibatches are padded to the widest of them
  (padding points at a real row, so it is finite) with a mask. Client k's loss is the cross-entropy
  summed over its real rows divided by their count: the minibatch mean ``sgd_step`` minimises. The
  padded rows enter through ``torch.where(mask, ce, 0)``, whose gradient is zero there, and client k's
  loss depends on its own slice of the stack alone, so the gradient of the sum of the clients' losses
  with respect to slice k is client k's own minibatch gradient.
- **Update.** ``theta - lr * grad``, or ``training.prox_grad_step`` with the client's anchor and
  ``lam``, on the moving parameters only (``param_names``; the others are stacked too, enter the
  forward, never move). A parameter the loss does not reach gets no gradient and is not updated, as
  ``sgd_step`` skips a ``None`` grad.
- **Returned loss.** The mean minibatch loss, weighted by minibatch size, of the last pass in which
  the client took a step (0.0 if it took none), as ``sgd_epochs`` returns it.

``supports(model)`` says whether a model can be trained this way; the caller falls back to the
per-client loop for the others.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.nn import functional as F

from octomil_sim.training import StepBudget, prox_grad_step

# Modules whose forward in training mode is random (dropout with p > 0), depends on the whole batch
# or updates state (batch statistics), or keeps flat weight copies that ``functional_call`` does not
# swap (recurrent layers).
_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
_UNSUPPORTED = (nn.modules.batchnorm._BatchNorm, nn.RNNBase)  # _BatchNorm: every BatchNorm, lazy and sync too


def supports(model: nn.Module) -> bool:
    """True when ``cohort_sgd`` trains ``model`` exactly as ``sgd_epochs`` would: its training-mode
    forward is deterministic, per-row and stateless. False for a model with batch norm, a dropout
    module with ``p > 0``, a recurrent layer, any buffer (state a forward might update, e.g. running
    statistics) or tied parameters. A forward that draws random numbers or reads ``.item()`` itself cannot be seen
    from outside; such a model fails in ``vmap``."""
    for module in model.modules():
        if isinstance(module, _UNSUPPORTED):
            return False
        if isinstance(module, _DROPOUT) and module.p > 0:
            return False
    if any(True for _ in model.buffers()):
        return False
    return len(dict(model.named_parameters(remove_duplicate=False))) == len(dict(model.named_parameters()))


#: The CPU cost estimate (``pays_off``, ``cohort_pays``); False: every cohort of a model ``supports``
#: and the architecture rule accept trains together whatever its size and steps (the tests of the
#: cohort path).
CHOOSE_BY_COST = True
#: On the CPU (one torch thread), in steps of one client in the loop (``sgd_epochs``): what a cohort
#: step costs with two or more clients stepping, and with one client left (its own step, plus the
#: cohort's gather and update). Fitted on 100 random cohorts of 2, 3, 5 and 10 clients of the
#: repository's Synthetic sizes (batch 20, one epoch) for each of MLR and the 60-200-10 MLP
#: (``experiments/cohort_choice.py``; three runs): a shared step 3.2-3.3 loop steps, a lone one
#: 1.3-1.5. Choosing by these came within 0.1-0.3% of always picking the faster path, against 6-9%
#: slower for the loop always and 10-16% slower for the cohort always.
CPU_SHARED_STEP = 3.3
CPU_LONE_STEP = 1.4
#: On the CPU a cohort's stacked parameters outgrow the cache: in ``cohort_choice``'s runs (cohorts
#: of 5, 10 and 30 clients) the MLP 784-1000-200-10 (987k parameters) trained at 0.48-0.69x the loop
#: as a cohort and 784-200-10 (159k) at 0.89-1.16x, while 60-1000-10 (71k) gained up to 1.45x.
CPU_MAX_PARAMETERS = 100_000


def pays_off(model: nn.Module) -> bool:
    """True when a cohort of ``model``'s clients can be faster than the per-client loop. On the CPU:
    every module holding parameters is a ``Linear`` or an ``Embedding`` (a cohort step is a few
    batched matrix products) and the model has at most ``CPU_MAX_PARAMETERS`` parameters. A
    convolution under ``vmap`` runs as a grouped convolution, slower on the CPU than the clients one
    by one (FemnistCNN, 5 clients of 80 rows: 0.55x); such models train client by client there. On a
    GPU (the model's parameters off the CPU) convolutions count too (``Conv1d`` to ``Conv3d``; not the
    transposed ones, untested under ``vmap`` here) and the size does not: cohorts of 100 clients ran
    3.7x-30.5x faster than the GPU loop for the MLR and MLP and 11.3x for the LEAF CNN, in full float32
    (``experiments/bench_vectorize.py --device cuda --full-float32``). Attention
    (``nn.MultiheadAttention``) falls back to a slow path under ``vmap`` everywhere and is left out.
    A model without parameters has nothing to vectorize. Whether a given cohort pays depends on its
    steps too: ``cohort_pays``."""
    holders = [m for m in model.modules() if next(m.parameters(recurse=False), None) is not None]
    if not holders:
        return False
    on_cpu = next(holders[0].parameters()).device.type == "cpu"
    allowed = (nn.Linear, nn.Embedding) if on_cpu else (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    if not all(isinstance(m, allowed) for m in holders):
        return False
    return not (CHOOSE_BY_COST and on_cpu and sum(p.numel() for p in model.parameters()) > CPU_MAX_PARAMETERS)


def vectorizes(model: nn.Module) -> bool:
    """Whether a cohort of ``model``'s clients trains together: ``supports`` (same results) and
    ``pays_off`` (faster)."""
    return supports(model) and pays_off(model)


def step_counts(sizes: list[int], batch_size: int, epochs: int, budgets: list[StepBudget | None] | None = None,
                batches: list[list[Tensor]] | None = None) -> list[int]:
    """The steps each client of ``cohort_sgd`` (or ``sgd_epochs``) takes: its minibatches (``epochs``
    passes of ``ceil(n / batch_size)``, or its listed ones), at most its budget left. Known before any
    draw, so the choice between cohort and loop consumes nothing."""
    counts = []
    for k, n in enumerate(sizes):
        count = len(batches[k]) if batches is not None else epochs * -(-n // batch_size)
        left = None if budgets is None or budgets[k] is None else budgets[k].left()
        counts.append(count if left is None else min(count, left))
    return counts


def cohort_pays(counts: list[int], device: torch.device | str) -> bool:
    """Whether clients taking ``counts`` steps train faster as one cohort than one by one. A cohort
    steps as long as its longest client: ``shared`` steps with two or more clients stepping (the
    second-longest count) and ``lone`` steps of the longest client alone. On the CPU it pays when the
    loop's steps, ``sum(counts)``, cost more than ``CPU_SHARED_STEP * shared + CPU_LONE_STEP * lone``
    of them: about four clients stepping together on average. Five clients of the Synthetic sizes, one
    epoch of batch 20 (a Ray actor's share of ten a round) trained at 0.76-1.11x the loop as a cohort
    (MLR, median 0.88x), ten at 0.96-1.59x (median 1.15x). Deterministic (counts, not timings), so
    fixed seeds still give identical numbers. Off the CPU (a GPU) a cohort of two or more always
    trains together."""
    if len(counts) < 2:
        return False
    if not CHOOSE_BY_COST or torch.device(device).type != "cpu":
        return True
    ranked = sorted(counts, reverse=True)
    shared, lone = ranked[1], ranked[0] - ranked[1]
    return sum(ranked) > CPU_SHARED_STEP * shared + CPU_LONE_STEP * lone


class _Plan:
    """Every step's minibatch rows of the cohort, step-major. Clients are ranked by their number of
    steps, most first (``order[r]`` is the client of rank r), so the clients stepping at step t are
    ranks ``0 .. active[t] - 1``; their rows are ``index[start[t] + r, :width[t]]`` (ids into the
    clients' data concatenated in client order), ``mask`` marks the real ones and ``rows`` counts
    them; ``padded[t]``: some client's minibatch at step t is narrower than ``width[t]``.
    ``step_of``/``rank_of``/``position``: for each (rank, step) pair, rank-major, its step, its rank
    and its row in ``index``."""

    def __init__(self, sizes: list[int], steps: list[Tensor]):
        # steps[k]: client k's [T_k, w] row ids into its own data, -1 = padding
        counts = torch.tensor([len(s) for s in steps])
        self.order = torch.argsort(counts, descending=True, stable=True)
        ranked = counts[self.order]
        self.num_steps = int(ranked.max())
        active = (ranked[None, :] > torch.arange(self.num_steps)[:, None]).sum(1)
        start = torch.cumsum(active, 0) - active
        self.step_of = torch.cat([torch.arange(int(c)) for c in ranked])
        self.rank_of = torch.arange(len(steps)).repeat_interleave(ranked)
        self.position = start[self.step_of] + self.rank_of

        sizes = torch.tensor(sizes)
        offsets = (torch.cumsum(sizes, 0) - sizes)[self.order].repeat_interleave(ranked)
        local = torch.cat([steps[k] for k in self.order.tolist()])
        index = torch.empty_like(local)
        index[self.position] = torch.where(local >= 0, local + offsets[:, None], -1)
        self.mask = index >= 0
        count = self.mask.sum(1)
        self.rows = count.float()
        self.index = index.clamp(min=0)  # padding reads row 0: a real row, so finite, and masked out

        step_major = torch.arange(self.num_steps).repeat_interleave(active)
        no_steps = torch.zeros(self.num_steps, dtype=torch.long)
        width = no_steps.scatter_reduce(0, step_major, count, "amax", include_self=False)
        narrowest = no_steps.scatter_reduce(0, step_major, count, "amin", include_self=False)
        self.start, self.active, self.width = start.tolist(), active.tolist(), width.tolist()
        self.padded = (narrowest < width).tolist()


def _epoch_steps(n: int, batch_size: int, epochs: int, generator: torch.Generator) -> Tensor:
    """``epochs`` permutations of ``n`` rows drawn from ``generator`` as ``minibatch_passes`` draws
    them, split into ``batch_size`` chunks: a [epochs * ceil(n / batch_size), batch_size] matrix of row
    ids, -1 padding the last (smaller) minibatch of each pass."""
    per_pass = -(-n // batch_size)
    perms = torch.full((epochs, per_pass * batch_size), -1, dtype=torch.long)
    for e in range(epochs):
        perms[e, :n] = torch.randperm(n, generator=generator)
    return perms.view(epochs * per_pass, batch_size)


def _listed_steps(batches: list[Tensor], width: int) -> tuple[Tensor, Tensor]:
    """One client's listed minibatches (``BatchStream``): the rows they read, in order, and the
    [len(batches), width] matrix of positions into those rows, -1 padded."""
    lengths = torch.tensor([len(idx) for idx in batches], dtype=torch.long)
    first = torch.cumsum(lengths, 0) - lengths
    columns = torch.arange(width)
    steps = torch.where(columns < lengths[:, None], first[:, None] + columns, -1)
    return (torch.cat(batches) if batches else torch.zeros(0, dtype=torch.long)), steps


def cohort_sgd(
    model: nn.Module,
    starts: list[dict[str, Tensor]],
    xs: list[Tensor],
    ys: list[Tensor],
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    generators: list[torch.Generator] | None,
    anchors: list[list[Tensor]] | None = None,
    lam: float = 0.0,
    param_names: list[str] | None = None,
    budgets: list[StepBudget | None] | None = None,
    batches: list[list[Tensor]] | None = None,
) -> tuple[list[dict[str, Tensor]], list[float]]:
    """``training.sgd_epochs`` for each of K clients, trained together (see the module docstring).

    ``model`` gives the architecture only (``supports(model)`` must hold; its weights are not used).
    Client k starts from the state dict ``starts[k]`` and trains on ``(xs[k], ys[k])``, drawing its
    passes from ``generators[k]`` (may be None when ``batches`` is given); ``anchors[k]`` is its
    anchor, one tensor per parameter in ``model.parameters()`` order, as ``sgd_epochs``'s ``anchor``;
    ``param_names`` names the parameters that move (default: all), ``sgd_epochs``'s ``params``;
    ``budgets[k]`` is its ``StepBudget`` (None: no limit); ``batches[k]`` its listed minibatches
    (``BatchStream``) instead of ``epochs`` passes. Generators and budgets change as ``sgd_epochs``
    changes them.

    Returns per client its final state dict (views into one stacked tensor per parameter) and the
    loss ``sgd_epochs`` returns.
    """
    k_clients = len(starts)
    for name, given in (("xs", xs), ("ys", ys), ("generators", generators), ("anchors", anchors),
                        ("budgets", budgets), ("batches", batches)):
        if given is not None and len(given) != k_clients:
            raise ValueError(f"cohort_sgd: {name} has {len(given)} entries for {k_clients} clients (starts)")
    if batches is None and generators is None:
        raise ValueError("cohort_sgd: generators=None needs batches; epoch passes draw their permutations "
                         "from each client's generator")
    if not supports(model):
        raise ValueError(f"cohort_sgd: {type(model).__name__} is not supported (see cohort.supports); "
                         "train its clients one by one with training.sgd_epochs")
    named = dict(model.named_parameters())
    if param_names is not None and (unknown := sorted(set(param_names) - set(named))):
        raise ValueError(f"cohort_sgd: param_names {unknown} are not parameters of {type(model).__name__}; "
                         f"allowed: {sorted(named)}")
    if 0 in (sizes := [len(y) for y in ys]):
        raise ValueError(f"cohort_sgd: client {sizes.index(0)} has no training rows")
    if not k_clients:
        return [], []

    # every client's first T_k minibatches (T_k: its budget left), drawn before training
    left = [None if b is None else b.left() for b in budgets or [None] * k_clients]
    if batches is None:
        per_pass = [-(-n // batch_size) for n in sizes]
        steps = [_epoch_steps(n, batch_size, epochs, g)[:lim] for n, g, lim in zip(sizes, generators, left)]
    else:
        if any(len(idx) == 0 for listed in batches for idx in listed):
            raise ValueError("cohort_sgd: an empty minibatch in batches (sgd_epochs would step on no rows)")
        width = max((len(idx) for listed in batches for idx in listed), default=1)
        per_pass = [max(len(listed), 1) for listed in batches]  # the listed minibatches are one pass
        read = [_listed_steps(listed[:lim], width) for listed, lim in zip(batches, left)]
        steps = [s for _, s in read]
        xs = [x.index_select(0, rows.to(x.device)) for x, (rows, _) in zip(xs, read)]  # only the rows the steps read
        ys = [y.index_select(0, rows.to(y.device)) for y, (rows, _) in zip(ys, read)]
    for budget, s in zip(budgets or [], steps):
        if budget is not None:
            budget.used += len(s)
    plan = _Plan([len(y) for y in ys], steps)

    # the clients' parameters stacked in plan order; the moving ones are updated in place
    moving = [n for n, p in named.items() if p.requires_grad and (param_names is None or n in param_names)]
    order = plan.order.tolist()
    stack = {n: torch.stack([starts[k][n].detach() for k in order]) for n in named}
    anchor = None
    if anchors is not None:
        at = {n: i for i, n in enumerate(named)}
        anchor = {n: torch.stack([anchors[k][at[n]].detach() for k in order]) for n in moving}
    x_all, y_all = torch.cat(xs), torch.cat(ys)  # in client order, as the plan's row ids
    row_shape = x_all.shape[1:]
    # the plan is drawn on the CPU (the clients' generators); the steps read it where the data is
    device = x_all.device
    index, mask, rows_real = (t.to(device) for t in (plan.index, plan.mask, plan.rows))
    losses = torch.zeros(len(plan.index), dtype=torch.float32, device=device)  # each (client, step)'s minibatch loss
    names = list(named)

    def forward(*tensors: Tensor) -> Tensor:  # one client: its parameters in ``names`` order, then x
        return functional_call(model, dict(zip(names, tensors[:-1])), (tensors[-1],), tie_weights=False)

    batched_forward = vmap(forward)  # positional tensors: vmap flattens a dict several times slower
    model.train()
    for t in range(plan.num_steps):
        a, active, w = plan.start[t], plan.active[t], plan.width[t]
        rows = index[a:a + active, :w].flatten()
        x, y = x_all.index_select(0, rows), y_all.index_select(0, rows)
        views = {n: stack[n][:active] for n in names}
        leaves = {n: views[n].detach().requires_grad_() for n in moving}
        params = [leaves.get(n, views[n]) for n in names]
        if active == 1:  # one client left, whose rows are all real: its own step, vmap would only add overhead
            logits = forward(*(p[0] for p in params), x)
            step_losses = F.cross_entropy(logits, y).unsqueeze(0)
        else:
            logits = batched_forward(*params, x.view(active, w, *row_shape))  # [active, w, classes]
            # classes in dim 1: F.cross_entropy's fast layout for many short rows
            ce = F.cross_entropy(logits.transpose(1, 2), y.view(active, w), reduction="none")
            if plan.padded[t]:
                step_losses = torch.where(mask[a:a + active, :w], ce, 0.0).sum(1) / rows_real[a:a + active]
            else:
                step_losses = ce.mean(1)
        grads = torch.autograd.grad(step_losses.sum(), list(leaves.values()), allow_unused=True)
        with torch.no_grad():
            losses[a:a + active] = step_losses
            for n, g in zip(moving, grads):
                if g is None:
                    continue
                if anchor is None:
                    views[n].add_(g, alpha=-lr)  # theta - lr * grad, in one pass over the stack
                else:
                    views[n].copy_(prox_grad_step(views[n], g, anchor[n][:active], lam, lr))

    # per client: the size-weighted mean minibatch loss of its last pass that took steps
    losses = losses.cpu()
    taken = torch.tensor([len(steps[k]) for k in order])
    passes = torch.tensor([per_pass[k] for k in order])
    last_pass = (taken - 1).clamp(min=0) // passes
    in_last = plan.step_of // passes[plan.rank_of] == last_pass[plan.rank_of]
    weight = plan.rows[plan.position].double() * in_last  # minibatch sizes, in float64 as sgd_epochs sums
    per_rank = torch.zeros(k_clients, dtype=torch.float64)
    total = per_rank.index_add(0, plan.rank_of, losses[plan.position].double() * weight)
    seen = per_rank.index_add(0, plan.rank_of, weight)
    mean = torch.where(seen > 0, total / seen.clamp(min=1), 0.0)

    rank = {k: r for r, k in enumerate(order)}
    states = [{n: stack[n][rank[k]] for n in named} for k in range(k_clients)]
    return states, [float(mean[rank[k]]) for k in range(k_clients)]
