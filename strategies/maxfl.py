"""Appeal-aware MaxFL (Cho, Wang, Joshi, Smith; arXiv 2205.14840).

A client finds the global model appealing when its loss there is below the loss of the model it
could train alone: ``f_i(w) < rho_i``. MaxFL maximises the number of such clients through the
smooth surrogate ``sum_i sigmoid(rho_i - f_i(w))``, whose gradient weighs client i's update by
``sigma'(f_i(w) - rho_i)`` (``appeal_weights``): clients near the appeal boundary count most.

Client half: trains its local model once (``local_epochs_rho`` epochs, kept in the state store),
reports ``rho_i`` (that model's training loss) beside ``loss_before`` = f_i(w), deploys whichever of
the global and its local model has the lower training loss, and reports ``served`` (1 if the global
model serves it). ``results.json`` lists the served clients and recommends personalization for the rest.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

from octomil_sim.client_app import ClientTask, Tensors
from octomil_sim.training import evaluate
from strategies.fedavg import LOSS_BEFORE, FedAvgClient, ReweightedFedAvg, stored_local_model

LOCAL = "maxfl_local"


def appeal_weights(global_losses: Sequence[float], local_losses: Sequence[float]) -> list[float]:
    """``sigma'(f_i - rho_i) = s (1 - s)`` with ``s = sigmoid(f_i - rho_i)``."""
    out = []
    for f, rho in zip(global_losses, local_losses):
        s = 1.0 / (1.0 + math.exp(-(f - rho)))
        out.append(s * (1.0 - s))
    return out


class MaxFL(ReweightedFedAvg):
    def client_weights(self, server_round, metrics):
        return appeal_weights([float(m[LOSS_BEFORE]) for m in metrics], [float(m["rho"]) for m in metrics])


class MaxFLClient(FedAvgClient):
    def __init__(self, local_epochs_rho: int = 20):
        self.local_epochs_rho = local_epochs_rho

    def local_model(self, model: nn.Module, task: ClientTask) -> tuple[nn.Module, float]:
        """The client's own model (trained once, stored) and ``rho_i``, its training loss."""
        local = stored_local_model(model, task, LOCAL, self.local_epochs_rho)
        return local, evaluate(local, task.data.x_train, task.data.y_train)[0]

    def train(self, model: nn.Module, task: ClientTask) -> tuple[Tensors, dict[str, float]]:
        _, rho = self.local_model(model, task)
        upload, metrics = super().train(model, task)
        return upload, {**metrics, "rho": rho}

    def _served(self, model: nn.Module, task: ClientTask) -> tuple[bool, nn.Module]:
        local, rho = self.local_model(model, task)
        return evaluate(model, task.data.x_train, task.data.y_train)[0] <= rho, local

    def personalize(self, model: nn.Module, task: ClientTask) -> nn.Module:
        served, local = self._served(model, task)
        return model if served else local

    def report(self, model: nn.Module, task: ClientTask) -> dict[str, float]:
        return {"served": float(self._served(model, task)[0])}
