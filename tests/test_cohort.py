"""cohort.cohort_sgd against training.sgd_epochs run client by client: the same final parameters,
returned losses, generator states and budget counts, on clients of unequal sizes."""

import copy

import pytest
import torch
from torch import nn

from octomil_sim.cohort import cohort_sgd, supports
from octomil_sim.models import MLP, MLR, FemnistCNN, PromptTransformer
from octomil_sim.training import BatchStream, StepBudget, sgd_epochs

torch.set_num_threads(1)

# 3 rows: less than one minibatch; 16: two full ones; 21 and 37: a smaller last one; 37: the longest,
# so it also takes steps alone at the end
SIZES = [21, 3, 37, 16]
BATCH, LR = 8, 0.1


def clients(shape=(6,), classes=4, sizes=SIZES, seed=0):
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n, *shape, generator=gen) for n in sizes]
    ys = [torch.randint(0, classes, (n,), generator=gen) for n in sizes]
    return xs, ys


def starts_of(model, count, seed=1):
    """Different starting weights per client."""
    gen = torch.Generator().manual_seed(seed)
    return [{n: p.detach() + 0.3 * torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()}
            for _ in range(count)]


def generators(count, seed=10):
    return [torch.Generator().manual_seed(seed + k) for k in range(count)]


def per_client(model, starts, xs, ys, *, epochs, generators, anchors=None, lam=0.0, param_names=None,
               budgets=None, batches=None):
    """The reference: ``sgd_epochs`` on each client alone."""
    states, losses = [], []
    for k, start in enumerate(starts):
        local = copy.deepcopy(model)
        local.load_state_dict(start)
        params = None if param_names is None else [p for n, p in local.named_parameters() if n in param_names]
        losses.append(sgd_epochs(local, xs[k], ys[k], epochs, BATCH, LR, generators[k] if generators else None,
                                 anchor=None if anchors is None else anchors[k], lam=lam, params=params,
                                 budget=None if budgets is None else budgets[k],
                                 batches=None if batches is None else batches[k]))
        states.append({n: p.detach().clone() for n, p in local.named_parameters()})
    return states, losses


def assert_same(got, want, got_losses, want_losses):
    assert len(got) == len(want)
    for k, (g, w) in enumerate(zip(got, want)):
        assert g.keys() == w.keys()
        for n in w:
            torch.testing.assert_close(g[n], w[n], atol=1e-5, rtol=1e-4, msg=f"client {k}, {n}")
    assert got_losses == pytest.approx(want_losses, rel=1e-5, abs=1e-6)


def assert_same_generators(got, want):
    for g, w in zip(got, want):
        assert g.get_state().equal(w.get_state())
        assert torch.rand(1, generator=g).item() == torch.rand(1, generator=w).item()


MODELS = {
    "mlr": lambda: MLR((6,), 4),
    "mlp": lambda: MLP((6,), 4, hidden=(16, 8)),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_epochs_equal_sgd_epochs_per_client(name):
    torch.manual_seed(0)
    model = MODELS[name]()
    xs, ys = clients()
    starts = starts_of(model, len(SIZES))
    ref_gens, gens = generators(len(SIZES)), generators(len(SIZES))
    want, want_losses = per_client(model, starts, xs, ys, epochs=4, generators=ref_gens)
    got, got_losses = cohort_sgd(model, starts, xs, ys, epochs=4, batch_size=BATCH, lr=LR, generators=gens)
    assert_same(got, want, got_losses, want_losses)
    assert_same_generators(gens, ref_gens)
    # the training did something, and each client its own thing
    assert all(not torch.equal(g["fc.weight" if name == "mlr" else "head.weight"],
                               s["fc.weight" if name == "mlr" else "head.weight"]) for g, s in zip(got, starts))
    assert len(set(got_losses)) == len(SIZES)


def test_prox_anchor_and_lam():
    torch.manual_seed(0)
    model = MODELS["mlp"]()
    xs, ys = clients()
    starts = starts_of(model, len(SIZES))
    anchors = [[p.detach() for p in s.values()] for s in starts_of(model, len(SIZES), seed=5)]
    want, want_losses = per_client(model, starts, xs, ys, epochs=3, generators=generators(4), anchors=anchors, lam=0.7)
    got, got_losses = cohort_sgd(model, starts, xs, ys, epochs=3, batch_size=BATCH, lr=LR, generators=generators(4),
                                 anchors=anchors, lam=0.7)
    assert_same(got, want, got_losses, want_losses)
    plain, _ = cohort_sgd(model, starts, xs, ys, epochs=3, batch_size=BATCH, lr=LR, generators=generators(4))
    assert not torch.allclose(plain[0]["head.weight"], got[0]["head.weight"], atol=1e-3)  # the prox term acted


def test_only_named_parameters_move():
    torch.manual_seed(0)
    model = MODELS["mlp"]()
    xs, ys = clients()
    starts = starts_of(model, len(SIZES))
    head = ["head.weight", "head.bias"]
    want, want_losses = per_client(model, starts, xs, ys, epochs=3, generators=generators(4), param_names=head)
    got, got_losses = cohort_sgd(model, starts, xs, ys, epochs=3, batch_size=BATCH, lr=LR, generators=generators(4),
                                 param_names=head)
    assert_same(got, want, got_losses, want_losses)
    for g, s in zip(got, starts):
        for n in s:
            assert torch.equal(g[n], s[n]) == (n not in head)


def test_budgets_stop_each_client_where_sgd_epochs_stops():
    torch.manual_seed(0)
    model = MODELS["mlr"]()
    xs, ys = clients()
    starts = starts_of(model, len(SIZES))

    def budgets():
        # client 0: 3 passes of 3 minibatches, cut after 5 steps (mid second pass); client 1: already
        # spent; client 2: 2 steps left of 6; client 3: no limit
        spent = StepBudget(2)
        spent.used = 2
        part = StepBudget(6)
        part.used = 4
        return [StepBudget(5), spent, part, None]

    ref_budgets, cohort_budgets = budgets(), budgets()
    ref_gens, gens = generators(4), generators(4)
    want, want_losses = per_client(model, starts, xs, ys, epochs=3, generators=ref_gens, budgets=ref_budgets)
    got, got_losses = cohort_sgd(model, starts, xs, ys, epochs=3, batch_size=BATCH, lr=LR, generators=gens,
                                 budgets=cohort_budgets)
    assert_same(got, want, got_losses, want_losses)
    assert_same_generators(gens, ref_gens)  # every pass drawn, even after the budget ran out
    assert [b.used for b in cohort_budgets[:3]] == [b.used for b in ref_budgets[:3]] == [5, 2, 6]
    assert got_losses[1] == 0.0 and all(torch.equal(got[1][n], starts[1][n]) for n in starts[1])


def test_listed_batches_from_a_batch_stream():
    torch.manual_seed(0)
    model = MODELS["mlp"]()
    xs, ys = clients()
    starts = starts_of(model, len(SIZES))
    # 5 steps: client 1 (3 rows) wraps round every step, client 0 (21 rows) after a smaller third batch
    batches = [BatchStream(n, BATCH).take(5) for n in SIZES]
    budgets = [StepBudget(3), None, None, None]
    ref_budgets = [StepBudget(3), None, None, None]
    want, want_losses = per_client(model, starts, xs, ys, epochs=1, generators=None, batches=batches,
                                   budgets=ref_budgets)
    got, got_losses = cohort_sgd(model, starts, xs, ys, epochs=1, batch_size=BATCH, lr=LR, generators=None,
                                 batches=batches, budgets=budgets)
    assert_same(got, want, got_losses, want_losses)
    assert budgets[0].used == ref_budgets[0].used == 3


def test_femnist_cnn_equal_sgd_epochs():
    torch.manual_seed(0)
    model = FemnistCNN((1, 8, 8), 5)
    assert supports(model)
    sizes = [11, 4, 6]
    xs, ys = clients((1, 8, 8), 5, sizes)
    starts = [{n: p.detach().clone() for n, p in model.named_parameters()}] * len(sizes)
    want, want_losses = per_client(model, starts, xs, ys, epochs=2, generators=generators(3))
    got, got_losses = cohort_sgd(model, starts, xs, ys, epochs=2, batch_size=BATCH, lr=LR, generators=generators(3))
    assert_same(got, want, got_losses, want_losses)


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # vmap's fallback for CPU attention
def test_prompt_transformer_frozen_base_equal_sgd_epochs():
    torch.manual_seed(0)
    model = PromptTransformer((5,), 3, vocab_size=11, d_model=8, num_layers=1, num_heads=2, prompt_length=2)
    assert supports(model)
    sizes = [9, 4]
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randint(0, 11, (n, 5), generator=gen).float() for n in sizes]
    ys = [torch.randint(0, 3, (n,), generator=gen) for n in sizes]
    starts = starts_of(model, len(sizes))
    want, want_losses = per_client(model, starts, xs, ys, epochs=2, generators=generators(2))
    got, got_losses = cohort_sgd(model, starts, xs, ys, epochs=2, batch_size=BATCH, lr=LR, generators=generators(2))
    assert_same(got, want, got_losses, want_losses)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(torch.equal(g[n], s[n]) for g, s in zip(got, starts) for n in frozen)


class Unused(nn.Module):
    """An MLR with a parameter the forward never reads: sgd_step leaves it alone (no grad), prox or not."""

    def __init__(self):
        super().__init__()
        self.fc, self.spare = nn.Linear(6, 4), nn.Parameter(torch.ones(3))

    def forward(self, x):
        return self.fc(x)


def test_parameter_without_gradient_does_not_move():
    torch.manual_seed(0)
    model = Unused()
    xs, ys = clients()
    starts = starts_of(model, len(SIZES))
    anchors = [[torch.zeros_like(p) for p in s.values()] for s in starts]
    want, want_losses = per_client(model, starts, xs, ys, epochs=2, generators=generators(4), anchors=anchors, lam=1.0)
    got, got_losses = cohort_sgd(model, starts, xs, ys, epochs=2, batch_size=BATCH, lr=LR, generators=generators(4),
                                 anchors=anchors, lam=1.0)
    assert_same(got, want, got_losses, want_losses)
    assert all(torch.equal(g["spare"], s["spare"]) for g, s in zip(got, starts))


class WithBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 4)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return self.fc(x)


def test_supports_only_deterministic_stateless_models():
    assert supports(MLR((6,), 4)) and supports(MLP((6,), 4)) and supports(FemnistCNN())
    assert supports(nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.0), nn.Linear(8, 4)))
    assert not supports(nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.5), nn.Linear(8, 4)))
    assert not supports(nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8, track_running_stats=False), nn.Linear(8, 4)))
    assert not supports(nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 4)))
    assert not supports(WithBuffer())
    tied = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    tied[1].weight = tied[0].weight
    assert not supports(tied)
    xs, ys = clients()
    with pytest.raises(ValueError, match="Sequential is not supported"):
        cohort_sgd(nn.Sequential(nn.Linear(6, 4), nn.Dropout(0.5)), [{}] * 4, xs, ys, epochs=1, batch_size=BATCH,
                   lr=LR, generators=generators(4))


def test_inputs_are_checked():
    model = MODELS["mlr"]()
    xs, ys = clients()
    starts = starts_of(model, len(SIZES))
    with pytest.raises(ValueError, match="generators has 3 entries for 4 clients"):
        cohort_sgd(model, starts, xs, ys, epochs=1, batch_size=BATCH, lr=LR, generators=generators(3))
    with pytest.raises(ValueError, match=r"param_names \['head.weight'\]"):
        cohort_sgd(model, starts, xs, ys, epochs=1, batch_size=BATCH, lr=LR, generators=generators(4),
                   param_names=["head.weight"])
    with pytest.raises(ValueError, match="client 1 has no training rows"):
        cohort_sgd(model, starts, [xs[0], xs[1][:0], xs[2], xs[3]], [ys[0], ys[1][:0], ys[2], ys[3]], epochs=1,
                   batch_size=BATCH, lr=LR, generators=generators(4))
