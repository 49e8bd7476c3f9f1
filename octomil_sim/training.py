"""Local training and evaluation loops every client half shares."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class LocalTraining:
    """Local-training hyperparameters of one client update (``simulation.*`` in the config)."""

    epochs: int
    batch_size: int
    lr: float
    seed: int
    local_steps: int | None = None  # minibatch steps per round instead of epochs (``BatchStream``)


class StepBudget:
    """The local SGD steps a client may take for one message (its resource class's ``max_steps``,
    see ``octomil_sim.system``); counts the steps taken, which set the client's simulated time."""

    def __init__(self, limit: int | None = None):
        self.limit, self.used = limit, 0

    def take(self) -> bool:
        """Spend one step; False (and nothing spent) once the budget is used up."""
        if self.limit is not None and self.used >= self.limit:
            return False
        self.used += 1
        return True

    def left(self) -> int | None:
        """The steps ``take`` still grants (None: no limit)."""
        return None if self.limit is None else max(self.limit - self.used, 0)


def client_seed(seed: int, server_round: int, partition_id: int) -> int:
    """A seed that is a function of (run seed, round, client) alone, whatever actor runs it."""
    return (seed * 1_000_003 + server_round * 10_007 + partition_id) % (2**63)


def prox_grad_step(theta: torch.Tensor, grad: torch.Tensor, anchor: torch.Tensor, lam: float,
                   lr: float) -> torch.Tensor:
    """One gradient step on ``f(theta) + lam/2 ||theta - anchor||^2``:
    ``theta - lr * (grad + lam * (theta - anchor))``. Ditto's personal update (arXiv 2012.04221,
    Alg. 1, line 7) and pFedMe's inner solver for the Moreau envelope (arXiv 2006.08848, Eq. 7)."""
    return theta - lr * (grad + lam * (theta - anchor))


class BatchStream:
    """A client's training minibatches as one endless stream that carries over between rounds: the
    rows of its training split in their fixed order, ``batch_size`` at a time (the last batch of a
    pass may be smaller), starting again from the first row when the pass ends. This is the official
    pFedMe code's ``get_next_train_batch`` (a ``DataLoader`` without shuffling whose iterator lives
    as long as the client), with which its "local epochs" are R minibatch steps. The position is
    kept in the client's state store under ``key`` (default ``KEY``); call ``save`` after the round's steps."""

    KEY = "batch_position"

    def __init__(self, num_rows: int, batch_size: int, state=None, key: str = KEY):
        self.num_rows, self.batch_size, self.state, self.key = num_rows, batch_size, state, key
        saved = state.load(key) if state is not None else None
        self.position = int(saved["position"]) if saved else 0

    def next(self) -> torch.Tensor:
        if self.position >= self.num_rows:
            self.position = 0
        end = min(self.position + self.batch_size, self.num_rows)
        idx = torch.arange(self.position, end)
        self.position = end
        return idx

    def take(self, steps: int) -> list[torch.Tensor]:
        return [self.next() for _ in range(steps)]

    def save(self) -> None:
        if self.state is not None:
            self.state.save(self.key, {"position": torch.tensor(self.position)})


def sgd_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, moving: set[int], lr: float,
             anchor: list[torch.Tensor] | None = None, lam: float = 0.0) -> float:
    """One SGD step on the cross-entropy of ``(x, y)`` (plus ``lam/2 ||theta - anchor||^2``) for the
    parameters whose ``id`` is in ``moving``; returns the minibatch loss."""
    model.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            if p.grad is None or id(p) not in moving:
                continue
            if anchor is None:
                p -= lr * p.grad
            else:
                p.copy_(prox_grad_step(p, p.grad, anchor[i], lam, lr))
    return loss.item()


def minibatch_passes(num_rows: int, batch_size: int, epochs: int, generator: torch.Generator,
                     batches: list[torch.Tensor] | None = None):
    """The passes of minibatch index tensors local training walks: ``epochs`` fresh permutations of
    ``num_rows`` split into ``batch_size``, or, when ``batches`` is given (``BatchStream``), that one
    list as a single pass. Permutations are drawn lazily, one per pass, from ``generator``."""
    if batches is not None:
        return [batches]
    return (torch.randperm(num_rows, generator=generator).split(batch_size) for _ in range(epochs))


def sgd_epochs(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    batch_size: int,
    lr: float,
    generator: torch.Generator,
    anchor: list[torch.Tensor] | None = None,
    lam: float = 0.0,
    params: list[torch.nn.Parameter] | None = None,
    budget: StepBudget | None = None,
    batches: list[torch.Tensor] | None = None,
) -> float:
    """Minibatch SGD on cross-entropy, plus ``lam/2 ||theta - anchor||^2`` when ``anchor`` is given
    (one tensor per parameter); only ``params`` move (default: all); stops early when ``budget`` runs
    out. ``epochs`` passes over a fresh permutation each, or, when ``batches`` is given, one step per
    listed index tensor (``BatchStream``). Returns the mean training loss of the last epoch (of the
    listed batches)."""
    moving = {id(p) for p in (model.parameters() if params is None else params)}
    model.train()
    last = 0.0
    for pass_batches in minibatch_passes(len(y), batch_size, epochs, generator, batches):
        total, seen = 0.0, 0
        for idx in pass_batches:
            if budget is not None and not budget.take():
                break
            total += sgd_step(model, x[idx], y[idx], moving, lr, anchor, lam) * len(idx)
            seen += len(idx)
        if seen:
            last = total / seen
    return last


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` on ``(x, y)``; (0, 0) on an empty split."""
    if len(y) == 0:
        return 0.0, 0.0
    model.eval()
    logits = model(x)
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()
