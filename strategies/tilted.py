"""Tilted ERM over clients (Li, Beirami, Sanjabi, Smith, "Tilted Empirical Risk Minimization",
arXiv 2007.01162; official code github.com/litian96/TERM, federated part ``fair_flearn/``).

The tilted objective ``(1/t) log sum_k p_k exp(t F_k(w))`` (Sec. 2) has gradient (Lemma 1)
``sum_k [p_k exp(t F_k) / sum_j p_j exp(t F_j)] grad F_k``: FedAvg whose client weights are
``n_k exp(t F_k(w))``, ``F_k(w)`` the global model's loss on client k (``loss_before``). t > 0
leans toward the clients the model serves worst; t = 0 is FedAvg, bit for bit.

Map to the paper, the official code and this file:

- ``tilted_weights``: the exact tilted weights of the round's clients, normalised over the round
  (the default server step: the tilted average, then ``server_lr`` of the way toward it).
- ``update_log_normalizer`` and ``normalized_tilted_coefficients`` (option ``normalizer_rate`` = lambda):
  the stochastic solver's running estimate of the normalizer, paper Algorithm 1
  ``R <- (1 - lambda) R + lambda mean_k exp(t F_k)``, coefficients ``c_k = p_k exp(t F_k) / R``, and the
  step ``w <- w + server_lr sum_k c_k (w_k - w)``, which is not normalised over the round: a round whose
  clients are worse off than the running estimate takes a longer step. The official federated trainer
  (``fair_flearn/flearn/trainers/tilting.py``) does the same with lambda = 0.5 and R starting at 0, as
  here (so the first round's coefficients sum to 1 / lambda).

Deliberate differences from ``fair_flearn/flearn/trainers/tilting.py``:

- It exponentiates ``t (F_k - max_round F)`` against overflow, so its running R mixes rounds with
  different shifts; we keep ``log R`` (``log_normalizer``) of the unshifted sum, the paper's quantity,
  which cannot overflow either.
- It divides by the number of sampled clients twice (once in the weights, once more when it averages
  the clients' models), which makes its step 1/m of Algorithm 1's; we divide once, as Algorithm 1 does
  (``server_lr`` scales the step if wanted).
- It samples clients in proportion to n_k and averages them uniformly; we sample uniformly and weight
  by ``p_k = n_k / sum_round n``, the same estimate of the federation's mean.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from octomil_sim.errors import ConfigError
from strategies.fedavg import LOSS_BEFORE, FairnessPolicy, FedAvgClient, ReweightedFedAvg, policy_under

__all__ = ["Tilted", "TiltedFedAvg", "FedAvgClient", "tilted_weights", "update_log_normalizer",
           "normalized_tilted_coefficients"]


def tilted_weights(losses: Sequence[float], sizes: Sequence[float], t: float) -> list[float]:
    """``n_k exp(t (F_k - F_ref))``: the tilted weights up to a common factor; ``F_ref`` is the largest
    loss for t > 0 and the smallest for t < 0, so no exponent is positive. With t = 0 each weight is
    exactly ``n_k``."""
    ref = max(losses) if t > 0 else min(losses)
    return [float(n) * math.exp(t * (loss - ref)) for loss, n in zip(losses, sizes)]


def _log_tilted_terms(losses: Sequence[float], sizes: Sequence[float], t: float) -> list[float]:
    """``log(p_k exp(t F_k))`` with ``p_k = n_k / sum n``."""
    total = float(sum(sizes))
    return [math.log(n / total) + t * loss for loss, n in zip(losses, sizes)]


def _logsumexp(values: Sequence[float]) -> float:
    top = max(values)
    if top == -math.inf:
        return top
    return top + math.log(sum(math.exp(v - top) for v in values))


def update_log_normalizer(log_r: float | None, losses: Sequence[float], sizes: Sequence[float],
                          t: float, rate: float) -> float:
    """``log R'`` for ``R' = (1 - rate) R + rate sum_k p_k exp(t F_k)`` (Algorithm 1's running
    normalizer; ``log_r`` None means R = 0, the official code's start)."""
    terms = [math.log(rate) + v for v in _log_tilted_terms(losses, sizes, t)]
    if log_r is not None and rate < 1:
        terms.append(math.log(1 - rate) + log_r)
    return _logsumexp(terms)


def normalized_tilted_coefficients(losses: Sequence[float], sizes: Sequence[float], t: float,
                                   log_r: float) -> list[float]:
    """``c_k = p_k exp(t F_k) / R``: client k's coefficient of ``w_k - w`` in the step."""
    return [math.exp(v - log_r) for v in _log_tilted_terms(losses, sizes, t)]


class Tilted(FairnessPolicy):
    """Tilting as a ``FairnessPolicy``: ``base`` weights (``n_k`` under FedAvg) times
    ``exp(t (F_k - F_ref))``, or with ``normalizer_rate`` Algorithm 1's coefficients ``c_k`` (``base`` in
    the place of ``n_k`` in ``p_k``). ``server_lr``: the step toward the tilted average (1: whole)."""

    round_state = ("log_normalizer",)  # carried from round to round, so checkpoints keep it

    def __init__(self, t: float = 1.0, server_lr: float = 1.0, normalizer_rate: float | None = None):
        if not 0 < server_lr <= 1:
            raise ConfigError(f"server_lr={server_lr}: allowed: a number in (0, 1]")
        if normalizer_rate is not None and not 0 < normalizer_rate <= 1:
            raise ConfigError(f"normalizer_rate={normalizer_rate}: allowed: null (off) or a number in (0, 1]")
        self.t, self.server_lr, self.normalizer_rate = t, server_lr, normalizer_rate
        self.log_normalizer: float | None = None  # log R, the running normalizer (normalizer_rate only)
        self.coefficient_step = normalizer_rate is not None  # w + sum c_k (w_k - w), c_k = p_k exp(t F_k) / R

    def weights(self, server_round, metrics, base, update_norms=None):
        losses = [float(m[LOSS_BEFORE]) for m in metrics]
        if self.normalizer_rate is None:
            return tilted_weights(losses, base, self.t)
        self.log_normalizer = update_log_normalizer(self.log_normalizer, losses, base, self.t, self.normalizer_rate)
        return normalized_tilted_coefficients(losses, base, self.t, self.log_normalizer)


class TiltedFedAvg(ReweightedFedAvg):
    """FedAvg with the ``Tilted`` policy (``strategy=tilted``; ``fairness=tilted`` puts the same policy
    on any personalization). ``t``: the tilt (TERM's t); 0 is FedAvg, larger values favour high-loss
    clients. ``server_lr``: the server's step toward the tilted average (1: take it whole). A large
    tilt puts nearly all weight on the worst client of the round, whose local model then replaces the
    global one and the worst client changes every round; a smaller step damps that oscillation.
    ``normalizer_rate``: None (default) normalises the weights over each round; a number in (0, 1]
    is Algorithm 1's lambda: weights are divided by the running normalizer instead (official: 0.5)."""

    def __init__(self, t: float = 1.0, server_lr: float = 1.0, normalizer_rate: float | None = None, **kwargs):
        super().__init__(fairness=policy_under("strategy.server.", lambda: Tilted(t, server_lr, normalizer_rate)),
                         **kwargs)
