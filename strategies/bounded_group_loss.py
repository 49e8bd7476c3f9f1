"""Bounded group loss, federated (Hu, Wu, Smith, "Fair Federated Learning via Bounded Group Loss",
arXiv 2203.10190; the constraint and its reduction from Agarwal, Dudik, Wu, "Fair regression",
arXiv 1905.12843): minimise the federation's loss subject to ``L_g(w) <= max_group_loss`` for every
group g of clients, by gradient descent-ascent on the Lagrangian

    L(w, mu) = sum_k (n_k / N) F_k(w) + sum_g mu_g (L_g(w) - max_group_loss),   L_g = sum_{k in g} n_k F_k / N_g,

with the dual variables restricted to ``Lambda = {mu >= 0, ||mu||_1 <= B}`` (B = ``dual_bound``).

Map to the papers, their code and this file:

- ``lagrangian_weights``: the Lagrangian's gradient in w is ``sum_k c_k grad F_k`` with
  ``c_k = n_k/N + mu_g n_k/N_g``.
- ``coefficient_step`` (applied by ``strategies.fedavg.FedAvg.fair_weights``): the primal
  step along that gradient, with each client's local update ``w_k - w`` standing in for ``-lr grad F_k``
  (FedAvg's reading): ``w <- w + sum_k c_k (w_k - w)``.
  The coefficients sum to ``1 + sum_g mu_g`` (groups of the round); they are not normalised, so the
  step is not shrunk by ``1 / (1 + sum mu)``: with mu = 0 it is FedAvg's step, a violated constraint
  lengthens it toward the violating group.
- ``project_duals``: the Euclidean projection onto Lambda (clip at 0; when the sum still exceeds B,
  the simplex projection of Duchi et al. 2008, Fig. 1, onto ``sum = B``).
- ``dual_ascent``: projected gradient ascent ``mu <- Proj_Lambda(mu + dual_step (L_g - max_group_loss))``,
  L_g estimated from the round's clients (``loss_before``, the received model's loss); both steps use
  the same round's (w, mu) (simultaneous descent-ascent).
- ``running_mean``: the averaged iterates ``mu_bar_T = (1/T) sum_t mu_t`` and ``w_bar_T = (1/T) sum_t w_t``
  over the T rounds aggregated so far, kept in ``mu_average`` and ``model_average`` (what the
  guarantees of both papers are about); ``average_arrays()`` gives the averaged model as arrays. The
  round metrics report ``dual_<g>`` (last iterate) and ``dual_avg_<g>`` (average).

Deliberate differences:

- Agarwal et al.'s official code (fairlearn, ``reductions/_exponentiated_gradient/exponentiated_gradient.py``)
  keeps ``||lambda||_1 <= B`` through exponentiated gradient with a slack coordinate
  (``lambda = B e^theta / (1 + sum e^theta)``, B = 1/eps) and answers each lambda with a best-response
  classifier; here, as in Hu et al., the dual step is a projected gradient step and the primal step
  is one federated round, not a best response.
- Their output is the uniform mixture of the iterates (a randomised classifier); we keep the average
  of the model parameters, which is the same for a model linear in its parameters and an
  approximation otherwise. The last iterate stays the deployed global model.
- Groups are sets of clients from a JSON file ``{client id: group}`` (``groups_file``), the same
  file that gives ``results.json`` its per-group metrics; Hu et al. also handle groups that cut
  across clients.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from flwr.app import ArrayRecord

from octomil_sim.errors import ConfigError
from octomil_sim.metrics import load_groups
from strategies.fedavg import LOSS_BEFORE, FairnessPolicy, FedAvgClient, ReweightedFedAvg, policy_under

__all__ = ["GroupLossBound", "BoundedGroupLoss", "FedAvgClient", "group_losses", "project_duals", "dual_ascent",
           "lagrangian_weights", "running_mean"]


def group_losses(losses: Sequence[float], sizes: Sequence[float], groups: Sequence[str]) -> dict[str, float]:
    """Example-weighted mean loss of each group present."""
    total: dict[str, float] = {}
    count: dict[str, float] = {}
    for loss, n, g in zip(losses, sizes, groups):
        total[g] = total.get(g, 0.0) + loss * n
        count[g] = count.get(g, 0.0) + n
    return {g: total[g] / count[g] for g in total}


def project_duals(mu: Mapping[str, float], dual_bound: float) -> dict[str, float]:
    """Euclidean projection of ``mu`` onto ``{mu >= 0, sum_g mu_g <= dual_bound}``: ``max(0, mu_g - theta)``
    with theta = 0 if that already fits, else the theta > 0 that makes the sum exactly ``dual_bound``."""
    clipped = {g: max(0.0, v) for g, v in mu.items()}
    if sum(clipped.values()) <= dual_bound:
        return clipped
    theta, total = 0.0, 0.0
    for k, v in enumerate(sorted(clipped.values(), reverse=True), start=1):
        total += v
        candidate = (total - dual_bound) / k
        if v - candidate <= 0:
            break
        theta = candidate
    return {g: max(0.0, v - theta) for g, v in clipped.items()}


def dual_ascent(mu: Mapping[str, float], losses: Mapping[str, float], bound: float, step: float,
                dual_bound: float = math.inf) -> dict[str, float]:
    """``Proj(mu + step (L_g - bound))`` over the groups with a loss this round (the others keep mu_g
    before the projection); ``dual_bound`` = inf only clips at 0."""
    new = dict(mu)
    for g, loss in losses.items():
        new[g] = mu.get(g, 0.0) + step * (loss - bound)
    return project_duals(new, dual_bound)


def lagrangian_weights(sizes: Sequence[float], groups: Sequence[str], mu: Mapping[str, float]) -> list[float]:
    """Client k's coefficient ``n_k/N + mu_g n_k/N_g`` in the Lagrangian's gradient (not normalised)."""
    total = sum(sizes)
    per_group: dict[str, float] = {}
    for n, g in zip(sizes, groups):
        per_group[g] = per_group.get(g, 0.0) + n
    return [n / total + mu.get(g, 0.0) * n / per_group[g] for n, g in zip(sizes, groups)]


def running_mean(average, value, count: int):
    """``average + (value - average) / count``: the mean of ``count`` values given the mean of the
    first ``count - 1`` (floats or tensors)."""
    return average + (value - average) / count


class GroupLossBound(FairnessPolicy):
    """Bounded group loss as a ``FairnessPolicy`` (``fairness=bounded_group_loss`` on any
    personalization; ``strategy=bounded_group_loss`` is FedAvg with it). ``groups_file``: JSON
    {client id: group}; ``max_group_loss``: the bound on each group's loss; ``dual_step``: the dual
    ascent step size; ``dual_bound``: B, the largest ``sum_g mu_g``. The coefficients are
    ``lagrangian_weights`` of the personalization's ``base`` weights (``n_k`` under FedAvg); the group
    losses that drive the duals are example-weighted (``num-examples``) whatever the base."""

    coefficient_step = True  # the primal step follows the Lagrangian's unnormalised gradient
    round_state = ("mu", "mu_average", "model_average", "rounds_averaged")  # carried over rounds: checkpointed

    def __init__(self, groups_file: str | None, max_group_loss: float, dual_step: float = 1.0,
                 dual_bound: float = 1.0, num_clients: int | None = None, size_key: str = "num-examples"):
        if groups_file is None:
            raise ConfigError("groups_file=None: allowed: a JSON file mapping client id to group "
                              "(bounded group loss needs groups)")
        if max_group_loss <= 0:
            raise ConfigError(f"max_group_loss={max_group_loss}: allowed: a number > 0")
        if not dual_bound > 0:
            raise ConfigError(f"dual_bound={dual_bound}: allowed: a number > 0")
        self.groups = load_groups(groups_file, num_clients)
        self.bound, self.dual_step, self.dual_bound, self.size_key = max_group_loss, dual_step, dual_bound, size_key
        self.mu: dict[str, float] = {}
        self.mu_average: dict[str, float] = {}
        self.model_average: dict | None = None  # name -> tensor, the mean of the models after each round
        self.rounds_averaged = 0

    def weights(self, server_round, metrics, base, update_norms=None):
        groups = [self.groups[int(m["partition-id"])] for m in metrics]
        weights = lagrangian_weights(base, groups, self.mu)
        sizes = [float(m[self.size_key]) for m in metrics]
        losses = group_losses([float(m[LOSS_BEFORE]) for m in metrics], sizes, groups)
        self.mu = dual_ascent(self.mu, losses, self.bound, self.dual_step, self.dual_bound)
        return weights

    def after_aggregate(self, arrays, metrics):
        if arrays is not None:
            self.update_averages(arrays)
        if metrics is not None:
            for g, value in sorted(self.mu.items()):
                metrics[f"dual_{g}"] = value
                metrics[f"dual_avg_{g}"] = self.mu_average.get(g, 0.0)

    def update_averages(self, arrays: ArrayRecord) -> None:
        """Fold this round's model and duals into ``model_average`` and ``mu_average``."""
        self.rounds_averaged += 1
        n = self.rounds_averaged
        model = arrays.to_torch_state_dict()
        if self.model_average is None:
            self.model_average = {k: v.clone() for k, v in model.items()}
        else:
            self.model_average = {k: running_mean(self.model_average[k], v, n) for k, v in model.items()}
        self.mu_average = {g: running_mean(self.mu_average.get(g, 0.0), self.mu.get(g, 0.0), n)
                           for g in sorted(set(self.mu) | set(self.mu_average))}

    def average_arrays(self) -> ArrayRecord | None:
        """The averaged iterate ``w_bar`` as arrays (None before the first round)."""
        return None if self.model_average is None else ArrayRecord(self.model_average)


class BoundedGroupLoss(ReweightedFedAvg):
    """FedAvg with the ``GroupLossBound`` policy; arguments as that policy's."""

    def __init__(self, groups_file: str | None, max_group_loss: float, dual_step: float = 1.0,
                 dual_bound: float = 1.0, num_clients: int | None = None, **kwargs):
        policy = policy_under("strategy.server.", lambda: GroupLossBound(groups_file, max_group_loss, dual_step,
                                                                           dual_bound, num_clients))
        super().__init__(fairness=policy, **kwargs)
