"""Appeal-aware MaxFL (Cho, Jhunjhunwala, Li, Smith, Joshi; "Maximizing Global Model Appeal in
Federated Learning", arXiv 2205.14840).

A client finds the global model appealing when its loss there is below the loss of the model it
could train alone: ``f_i(w) < rho_i``. MaxFL maximises the number of such clients through the
smooth surrogate ``sum_i sigmoid(rho_i - f_i(w))``, whose gradient (up to sign) is
``sum_i q_i grad f_i(w)`` with ``q_i = sigma'(f_i(w) - rho_i)``: clients near the appeal boundary
count most, clients far on either side count almost nothing.

Map to the paper (Sec. 4, Algorithm 1) and to this file:

- ``appeal_weights``: ``q_i = sigma'(f_i(w) - rho_i)``, the weight of client i's update (Algorithm 1,
  the q_i each sampled client computes at the received global model).
- ``appeal_coefficients``, taken as a step's coefficients (``coefficient_step``, applied by
  ``strategies.fedavg.FedAvg.fair_weights``): the server step
  ``w <- w - eta_g sum_i q_i Delta_i / (sum_i q_i + eps)``, ``Delta_i = w - w_i`` the client's local
  update (Algorithm 1's global update; ``eta_g`` the global learning rate, ``eps`` > 0 keeps the
  step finite). The weights are not normalised to sum to 1: when every sampled client is far from
  its boundary all q_i underflow to 0 and the model stays where it is.
- ``MaxFLClient``: local SGD from the received model (Algorithm 1's local steps), plus ``rho_i``:
  the training loss of the client's model trained alone (``stored_local_model``: trained once from
  the run's initial model and kept in the client's state store). ``MaxFLClient.train_cohort``: the
  same, with the local SGD of a message's clients taken together (``octomil_sim.cohort``; equal up to
  float rounding).

Deliberate differences:

- The server computes q_i from the reported ``loss_before`` (= f_i(w)) and ``rho`` instead of the
  client sending q_i; the numbers are the same.
- ``sigma'`` is evaluated as ``e^{-|x|} / (1 + e^{-|x|})^2`` so that a gap of any size gives a
  number (0 for |x| beyond ~745) rather than an overflow.
- No official MaxFL code was found to compare with; the third-party Flower implementations we could
  read use the same ``eta_g / (sum q + eps)`` step. We could not confirm the paper's values of
  ``eta_g`` and ``eps`` from the text available to us: the defaults (1 and 1e-3) make the step a plain
  q-weighted average whenever ``sum q`` is well above ``eps``.
- Deployment (``personalize``/``report``) is ours: each client deploys whichever of the global and its
  local model has the lower training loss and reports ``served``; ``results.json`` lists the served
  clients and recommends personalization for the rest.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

from octomil_sim.client_app import ClientTask, Tensors
from octomil_sim.cohort import vectorizes
from octomil_sim.errors import ConfigError
from octomil_sim.training import evaluate
from strategies.fedavg import (LOSS_BEFORE, FairnessPolicy, FairnessReport, FedAvgClient, ReweightedFedAvg,
                               policy_under, stored_local_model)

__all__ = ["Appeal", "AppealReport", "MaxFL", "MaxFLClient", "appeal_weights", "appeal_coefficients"]

LOCAL = "maxfl_local"


def appeal_weights(global_losses: Sequence[float], local_losses: Sequence[float]) -> list[float]:
    """``q_i = sigma'(f_i - rho_i) = s (1 - s)``, ``s = sigmoid(f_i - rho_i)``, computed as
    ``e^{-|x|} / (1 + e^{-|x|})^2`` (sigma' is even), which never overflows."""
    out = []
    for f, rho in zip(global_losses, local_losses):
        e = math.exp(-abs(f - rho))
        out.append(e / (1.0 + e) ** 2)
    return out


def appeal_coefficients(q: Sequence[float], eta_g: float, eps: float) -> list[float]:
    """``eta_g q_i / (sum_j q_j + eps)``: the coefficient of client i's update ``w_i - w`` in the
    server step ``w + sum_i c_i (w_i - w)``. All zero when every q_i is 0."""
    scale = eta_g / (sum(q) + eps)
    return [scale * qi for qi in q]


class Appeal(FairnessPolicy):
    """MaxFL's server step as a ``FairnessPolicy`` (``fairness=maxfl`` on any personalization;
    ``strategy=maxfl`` is FedAvg with it). ``eta_g``: the global learning rate; ``eps``: the constant
    added to ``sum q_i`` in the step's denominator. Coefficients ``appeal_coefficients`` of the step
    ``w + sum_i c_i (w_i - w)``; they do not use the personalization's base weights (MaxFL weights
    clients by appeal alone). Its clients report ``rho`` (``AppealReport``)."""

    coefficient_step = True  # the step is w + sum_i c_i (w_i - w); all q_i = 0 leaves w as it is

    def __init__(self, eta_g: float = 1.0, eps: float = 1e-3):
        if not eta_g > 0:
            raise ConfigError(f"eta_g={eta_g}: allowed: a number > 0")
        if not eps > 0:
            raise ConfigError(f"eps={eps}: allowed: a number > 0")
        self.eta_g, self.eps = eta_g, eps

    def weights(self, server_round, metrics, base, update_norms=None):
        q = appeal_weights([float(m[LOSS_BEFORE]) for m in metrics], [float(m["rho"]) for m in metrics])
        return appeal_coefficients(q, self.eta_g, self.eps)


class MaxFL(ReweightedFedAvg):
    """FedAvg with the ``Appeal`` policy; ``eta_g`` and ``eps`` as that policy's."""

    def __init__(self, eta_g: float = 1.0, eps: float = 1e-3, **kwargs):
        super().__init__(fairness=policy_under("strategy.server.", lambda: Appeal(eta_g, eps)), **kwargs)


class AppealReport(FairnessReport):
    """MaxFL's client half for any personalization: ``loss_before`` and ``rho_i``, the training loss
    of the client's model trained alone (``local_epochs_rho`` epochs, once, kept in its state), and at
    evaluation whether the global model serves the client (``served``)."""

    def __init__(self, local_epochs_rho: int = 20):
        self.local_epochs_rho = local_epochs_rho

    def local_model(self, model: nn.Module, task: ClientTask) -> tuple[nn.Module, float]:
        """The client's own model (trained once, stored) and ``rho_i``, its training loss."""
        local = stored_local_model(model, task, LOCAL, self.local_epochs_rho)
        return local, evaluate(local, task.data.x_train, task.data.y_train)[0]

    def served(self, model: nn.Module, task: ClientTask) -> tuple[bool, nn.Module]:
        """Whether ``model``'s training loss is at most rho_i, and the client's own model."""
        local, rho = self.local_model(model, task)
        return evaluate(model, task.data.x_train, task.data.y_train)[0] <= rho, local

    def metrics(self, model: nn.Module, task: ClientTask) -> dict[str, float]:
        _, rho = self.local_model(model, task)
        return {**super().metrics(model, task), "rho": rho}

    def report(self, model: nn.Module, task: ClientTask) -> dict[str, float]:
        """``served`` (results.json's ``appeal`` lists the clients the global model serves and
        recommends personalization for the others)."""
        return {"served": float(self.served(model, task)[0])}


class MaxFLClient(FedAvgClient):
    """FedAvg's local SGD plus MaxFL's appeal (``AppealReport``): reports ``rho``, deploys whichever of
    the global and its own model has the lower training loss, and reports ``served``."""

    reuses_model = False  # its own train: a copy of the template per client, as before

    def __init__(self, local_epochs_rho: int = 20):
        self.appeal = AppealReport(local_epochs_rho)

    def train(self, model: nn.Module, task: ClientTask) -> tuple[Tensors, dict[str, float]]:
        _, rho = self.appeal.local_model(model, task)
        upload, metrics = super().train(model, task)
        return upload, {**metrics, "rho": rho}

    def train_cohort(self, models: list[nn.Module], tasks: list[ClientTask]):
        """``train`` for a cohort: each client's ``rho`` first (its local model, trained the first time
        from its generator, then kept), then FedAvg's local steps of all clients together, so each
        generator is drawn in ``train``'s order. A local model computed before a cohort that then fails
        stays stored, as ``train`` would have stored it."""
        if type(self).train is not MaxFLClient.train or not vectorizes(models[0]):
            return None
        rhos = [self.appeal.local_model(model, task)[1] for model, task in zip(models, tasks)]
        return [(upload, {**metrics, "rho": rho})
                for (upload, metrics), rho in zip(self.fedavg_cohort(models, tasks), rhos)]

    def personalize(self, model: nn.Module, task: ClientTask) -> nn.Module:
        served, local = self.appeal.served(model, task)
        return model if served else local

    def report(self, model: nn.Module, task: ClientTask) -> dict[str, float]:
        return self.appeal.report(model, task)
