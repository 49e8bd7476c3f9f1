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


def client_seed(seed: int, server_round: int, partition_id: int) -> int:
    """A seed that is a function of (run seed, round, client) alone, whatever actor runs it."""
    return (seed * 1_000_003 + server_round * 10_007 + partition_id) % (2**63)


def prox_grad_step(theta: torch.Tensor, grad: torch.Tensor, anchor: torch.Tensor, lam: float,
                   lr: float) -> torch.Tensor:
    """One gradient step on ``f(theta) + lam/2 ||theta - anchor||^2``:
    ``theta - lr * (grad + lam * (theta - anchor))``. Ditto's personal update (arXiv 2012.04221,
    Alg. 1, line 7) and pFedMe's inner solver for the Moreau envelope (arXiv 2006.08848, Eq. 7)."""
    return theta - lr * (grad + lam * (theta - anchor))


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
) -> float:
    """Minibatch SGD on cross-entropy, plus ``lam/2 ||theta - anchor||^2`` when ``anchor`` is given
    (one tensor per parameter); only ``params`` move (default: all); stops early when ``budget`` runs
    out. Returns the mean training loss of the last epoch."""
    moving = {id(p) for p in (model.parameters() if params is None else params)}
    model.train()
    last = 0.0
    for _ in range(epochs):
        total, seen = 0.0, 0
        for idx in torch.randperm(len(y), generator=generator).split(batch_size):
            if budget is not None and not budget.take():
                break
            model.zero_grad()
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            with torch.no_grad():
                for i, p in enumerate(model.parameters()):
                    if p.grad is None or id(p) not in moving:
                        continue
                    if anchor is None:
                        p -= lr * p.grad
                    else:
                        p.copy_(prox_grad_step(p, p.grad, anchor[i], lam, lr))
            total += loss.item() * len(idx)
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
