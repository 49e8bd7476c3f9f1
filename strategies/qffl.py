"""q-FFL (Li, Sanjabi, Beirami, Smith; arXiv 1905.10497, Algorithm 2 "q-FedAvg") as a fairness
baseline: Flower's own ``QFedAvg``, fed with each client's loss of the received global model
(``loss_before``, the paper's F_k(w^t)) and made reproducible. Larger q pushes the model toward the
clients with the highest loss.

Sampling: the paper's experiments draw client k with probability ``p_k = n_k / N`` and average the
sampled clients' updates without weights (litian96/fair_flearn, ``--sampling=2``,
``flearn/trainers/qffedavg.py`` with ``fedbase.select_clients``); ``sampling: size_proportional`` (the
default here, ``octomil_sim.server_app.size_proportional_sample``) does the same, so q = 0 is FedAvg
in expectation: the unweighted average of clients drawn with p_k has the mean sum_k p_k w_k, FedAvg's
example-weighted average. ``sampling: uniform`` draws every client alike; q = 0 is then an unweighted
average over clients.
"""

from __future__ import annotations

import types
from contextlib import contextmanager

import flwr.app.message.arrayrecord as arrayrecord_module
from flwr.serverapp.strategy import QFedAvg

from octomil_sim.errors import ConfigError
from octomil_sim.server_app import SeededSampling
from strategies.fedavg import LOSS_BEFORE, FairnessPolicy, FedAvgClient

__all__ = ["QFFL", "QFair", "FedAvgClient", "qffl_coefficients"]


def qffl_coefficients(losses: list[float], update_norms: list[float], q: float, lipschitz: float) -> list[float]:
    """q-FedAvg's step (arXiv 1905.10497, Algorithm 2; Flower's ``qfedavg.compute_delta_and_h``)
    ``w <- w - sum_k Delta_k / sum_k h_k`` with ``Delta_k = F_k^q L (w - w_k)`` and
    ``h_k = q F_k^(q-1) L^2 ||w - w_k||^2 + L F_k^q``, written as ``w + sum_k c_k (w_k - w)`` with
    ``c_k = L F_k^q / sum_j h_j`` (``F + 1e-10`` as in Flower's and fair_flearn's code)."""
    powered = [(f + 1e-10) ** q for f in losses]
    h = [q * (f + 1e-10) ** (q - 1) * lipschitz ** 2 * n + lipschitz * p
         for f, n, p in zip(losses, update_norms, powered)]
    total = sum(h)
    return [lipschitz * p / total for p in powered]


class QFair(FairnessPolicy):
    """q-FFL's server step as a ``FairnessPolicy`` (``fairness=qffl`` on any personalization):
    ``qffl_coefficients`` with ``L = 1 / client_learning_rate``, from each client's ``loss_before``
    and ``||w - w_k||^2`` over the arrays it uploads. Like the paper's experiments (uniform average of
    clients drawn with p_k = n_k/N) it does not use the personalization's base weights.
    ``strategy=qffl`` keeps Flower's own ``QFedAvg`` (the same step up to float rounding, tested)."""

    coefficient_step = True
    needs_update_norms = True

    def __init__(self, client_learning_rate: float, q: float = 1.0):
        if not client_learning_rate > 0:
            raise ConfigError(f"client_learning_rate={client_learning_rate}: allowed: a number > 0")
        if q < 0:
            raise ConfigError(f"q={q}: allowed: a number >= 0")
        self.q, self.lipschitz = q, 1.0 / client_learning_rate

    def weights(self, server_round, metrics, base, update_norms=None):
        losses = [float(m[LOSS_BEFORE]) for m in metrics]
        return qffl_coefficients(losses, update_norms, self.q, self.lipschitz)


class QFFL(SeededSampling, QFedAvg):
    """``client_learning_rate`` sets Flower's Lipschitz estimate ``L = 1 / lr``; ``q`` is q-FFL's q."""

    def __init__(self, client_learning_rate: float, q: float = 1.0, sampling: str = "size_proportional", **kwargs):
        super().__init__(client_learning_rate=client_learning_rate, q=q, train_loss_key=LOSS_BEFORE,
                         sampling=sampling, **kwargs)

    def aggregate_train(self, server_round, replies):
        with _no_forced_gc():
            return super().aggregate_train(server_round, replies)


@contextmanager
def _no_forced_gc():
    """QFedAvg reads every reply with ``to_numpy_ndarrays(keep_input=False)``, which runs a full
    ``gc.collect()`` each time: with Ray and torch loaded that is ~0.3 s a reply, minutes a run.
    The arrays are freed by reference counting all the same."""
    saved = arrayrecord_module.gc
    arrayrecord_module.gc = types.SimpleNamespace(collect=lambda *args: 0)
    try:
        yield
    finally:
        arrayrecord_module.gc = saved
