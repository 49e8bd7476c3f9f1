"""Tilted ERM over clients (Li, Beirami, Sanjabi, Smith; arXiv 2007.01162, Sec. 2 and 4).

The tilted objective ``(1/t) log sum_k p_k exp(t F_k(w))`` has gradient
``sum_k [p_k exp(t F_k) / sum_j p_j exp(t F_j)] grad F_k``: FedAvg whose client weights are
``n_k exp(t F_k(w))``, ``F_k(w)`` the global model's loss on client k (``loss_before``). t > 0
leans toward the clients the model serves worst; t = 0 is FedAvg, bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from octomil_sim.errors import ConfigError
from strategies.fedavg import LOSS_BEFORE, FedAvgClient, ReweightedFedAvg

__all__ = ["TiltedFedAvg", "FedAvgClient", "tilted_weights"]


def tilted_weights(losses: Sequence[float], sizes: Sequence[float], t: float) -> list[float]:
    """``n_k exp(t (F_k - F_ref))``: the tilted weights up to a common factor; ``F_ref`` is the largest
    loss for t > 0 and the smallest for t < 0, so no exponent is positive. With t = 0 each weight is
    exactly ``n_k``."""
    ref = max(losses) if t > 0 else min(losses)
    return [float(n) * math.exp(t * (loss - ref)) for loss, n in zip(losses, sizes)]


class TiltedFedAvg(ReweightedFedAvg):
    """``t``: the tilt (TERM's t); 0 is FedAvg, larger values favour high-loss clients.
    ``server_lr``: the server's step toward the tilted average (1: take it whole). A large tilt puts
    nearly all weight on the worst client of the round, whose local model then replaces the global
    one and the worst client changes every round; a smaller step damps that oscillation."""

    def __init__(self, t: float = 1.0, server_lr: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        if not 0 < server_lr <= 1:
            raise ConfigError(f"strategy.server.server_lr={server_lr}: allowed: a number in (0, 1]")
        self.t, self.server_lr = t, server_lr

    def aggregate_train(self, server_round, replies):
        averaged, metrics = super().aggregate_train(server_round, replies)
        return self.step_toward(averaged, self.server_lr), metrics

    def client_weights(self, server_round, metrics):
        return tilted_weights([float(m[LOSS_BEFORE]) for m in metrics],
                              [float(m[self.weighted_by_key]) for m in metrics], self.t)
