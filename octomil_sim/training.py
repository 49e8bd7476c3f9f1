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


def client_seed(seed: int, server_round: int, partition_id: int) -> int:
    """A seed that is a function of (run seed, round, client) alone, whatever actor runs it."""
    return (seed * 1_000_003 + server_round * 10_007 + partition_id) % (2**63)


def sgd_epochs(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    batch_size: int,
    lr: float,
    generator: torch.Generator,
) -> float:
    """Plain minibatch SGD on cross-entropy; returns the mean training loss of the last epoch."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    last = 0.0
    for _ in range(epochs):
        total, seen = 0.0, 0
        for idx in torch.randperm(len(y), generator=generator).split(batch_size):
            opt.zero_grad()
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            seen += len(idx)
        last = total / max(seen, 1)
    return last


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` on ``(x, y)``; (0, 0) on an empty split."""
    if len(y) == 0:
        return 0.0, 0.0
    model.eval()
    logits = model(x)
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()
