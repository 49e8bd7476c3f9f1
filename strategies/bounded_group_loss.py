"""Bounded group loss (Agarwal et al., "Fair regression", arXiv 1905.12843; the federated form of
Hu et al., arXiv 2203.03016 / Wang et al. arXiv 2107.11621): minimise the federation's loss subject to
``L_g(w) <= max_group_loss`` for every group g of clients, by primal-dual updates on the Lagrangian

    sum_k (n_k / N) F_k(w) + sum_g mu_g (L_g(w) - max_group_loss),   L_g = sum_{k in g} n_k F_k / N_g.

Primal: a FedAvg step whose client weights are the Lagrangian's, ``n_k/N + mu_g n_k/N_g``.
Dual: projected ascent ``mu_g <- max(0, mu_g + dual_step (L_g - max_group_loss))`` with L_g estimated
from the round's clients (``loss_before``). Groups come from a JSON file ``{client id: group}``
(``groups_file``), the same file that gives ``results.json`` its per-group metrics.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from octomil_sim.errors import ConfigError
from octomil_sim.metrics import load_groups
from strategies.fedavg import LOSS_BEFORE, FedAvgClient, ReweightedFedAvg

__all__ = ["BoundedGroupLoss", "FedAvgClient", "group_losses", "dual_ascent", "lagrangian_weights"]


def group_losses(losses: Sequence[float], sizes: Sequence[float], groups: Sequence[str]) -> dict[str, float]:
    """Example-weighted mean loss of each group present."""
    total: dict[str, float] = {}
    count: dict[str, float] = {}
    for loss, n, g in zip(losses, sizes, groups):
        total[g] = total.get(g, 0.0) + loss * n
        count[g] = count.get(g, 0.0) + n
    return {g: total[g] / count[g] for g in total}


def dual_ascent(mu: Mapping[str, float], losses: Mapping[str, float], bound: float, step: float) -> dict[str, float]:
    """``max(0, mu_g + step (L_g - bound))`` for every group with a loss; other groups keep mu_g."""
    new = dict(mu)
    for g, loss in losses.items():
        new[g] = max(0.0, mu.get(g, 0.0) + step * (loss - bound))
    return new


def lagrangian_weights(sizes: Sequence[float], groups: Sequence[str], mu: Mapping[str, float]) -> list[float]:
    """Client k's weight ``n_k/N + mu_g n_k/N_g`` in the Lagrangian's gradient."""
    total = sum(sizes)
    per_group: dict[str, float] = {}
    for n, g in zip(sizes, groups):
        per_group[g] = per_group.get(g, 0.0) + n
    return [n / total + mu.get(g, 0.0) * n / per_group[g] for n, g in zip(sizes, groups)]


class BoundedGroupLoss(ReweightedFedAvg):
    """``groups_file``: JSON {client id: group}; ``max_group_loss``: the bound; ``dual_step``: the
    dual ascent step size."""

    def __init__(self, groups_file: str | None, max_group_loss: float, dual_step: float = 1.0,
                 num_clients: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if groups_file is None:
            raise ConfigError("groups_file=None: allowed: a JSON file mapping client id to group "
                              "(bounded group loss needs groups)")
        if max_group_loss <= 0:
            raise ConfigError(f"strategy.server.max_group_loss={max_group_loss}: allowed: a number > 0")
        self.groups = load_groups(groups_file, num_clients)
        self.bound, self.dual_step = max_group_loss, dual_step
        self.mu: dict[str, float] = {}

    def client_weights(self, server_round, metrics):
        groups = [self.groups[int(m["partition-id"])] for m in metrics]
        sizes = [float(m[self.weighted_by_key]) for m in metrics]
        weights = lagrangian_weights(sizes, groups, self.mu)
        losses = group_losses([float(m[LOSS_BEFORE]) for m in metrics], sizes, groups)
        self.mu = dual_ascent(self.mu, losses, self.bound, self.dual_step)
        return weights

    def aggregate_train(self, server_round, replies):
        arrays, metrics = super().aggregate_train(server_round, replies)
        if metrics is not None:
            for g, value in sorted(self.mu.items()):
                metrics[f"dual_{g}"] = value
        return arrays, metrics
