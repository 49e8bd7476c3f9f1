"""Tilted ERM over clients (Li, Beirami, Sanjabi, Smith; arXiv 2007.01162, Sec. 2 and 4).

The tilted objective ``(1/t) log sum_k p_k exp(t F_k(w))`` has gradient
``sum_k [p_k exp(t F_k) / sum_j p_j exp(t F_j)] grad F_k``: FedAvg whose client weights are
``n_k exp(t F_k(w))``, ``F_k(w)`` the global model's loss on client k (``loss_before``). t > 0
leans toward the clients the model serves worst; t = 0 is FedAvg, bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from strategies.fedavg import LOSS_BEFORE, FedAvgClient, ReweightedFedAvg

__all__ = ["TiltedFedAvg", "FedAvgClient", "tilted_weights"]


def tilted_weights(losses: Sequence[float], sizes: Sequence[float], t: float) -> list[float]:
    """``n_k exp(t (F_k - F_ref))``: the tilted weights up to a common factor; ``F_ref`` is the largest
    loss for t > 0 and the smallest for t < 0, so no exponent is positive. With t = 0 each weight is
    exactly ``n_k``."""
    ref = max(losses) if t > 0 else min(losses)
    return [float(n) * math.exp(t * (loss - ref)) for loss, n in zip(losses, sizes)]


class TiltedFedAvg(ReweightedFedAvg):
    """``t``: the tilt (TERM's t); 0 is FedAvg, larger values favour high-loss clients."""

    def __init__(self, t: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.t = t

    def client_weights(self, server_round, metrics):
        return tilted_weights([float(m[LOSS_BEFORE]) for m in metrics],
                              [float(m[self.weighted_by_key]) for m in metrics], self.t)
