"""Ditto (Li, Hu, Beirami, Smith; arXiv 2012.04221, Algorithm 1).

Global model ``w``: FedAvg. Personal model ``v_k`` of client k solves
``min_v F_k(v) + lam/2 ||v - w*||^2``; each time k is selected it takes ``personal_epochs`` of
``v_k <- v_k - personal_lr (grad F_k(v_k) + lam (v_k - w^t))`` (``prox_grad_step``), anchored at
the received global ``w^t``. ``v_k`` lives in the client-state store and is never uploaded.
``lam`` is Ditto's lambda: 0 is local training, large values pull ``v_k`` to ``w``.
"""

from __future__ import annotations

import copy

from torch import nn

from octomil_sim.client_app import ClientTask, Tensors
from octomil_sim.errors import ConfigError
from strategies.fedavg import FedAvg, FedAvgClient, local_sgd

__all__ = ["FedAvg", "DittoClient"]

PERSONAL = "ditto_v"


class DittoClient(FedAvgClient):
    def __init__(self, lam: float = 0.1, personal_epochs: int = 1, personal_lr: float | None = None):
        if lam < 0:
            raise ConfigError(f"strategy.client.lam={lam}: allowed: a number >= 0")
        self.lam, self.personal_epochs, self.personal_lr = lam, personal_epochs, personal_lr

    def _personal_update(self, global_model: nn.Module, task: ClientTask) -> nn.Module:
        """``personal_epochs`` of Ditto's personal step from the stored ``v_k`` (or ``w^t`` the
        first time), anchored at the global ``w^t``."""
        personal = copy.deepcopy(global_model)
        stored = task.state.load(PERSONAL)
        if stored is not None:
            personal.load_state_dict(stored)
        anchor = [p.detach().clone() for p in global_model.parameters()]
        lr = task.hp.lr if self.personal_lr is None else self.personal_lr
        local_sgd(personal, task, epochs=self.personal_epochs, lr=lr, anchor=anchor, lam=self.lam)
        return personal

    def train(self, model: nn.Module, task: ClientTask) -> tuple[Tensors, dict[str, float]]:
        task.state.save(PERSONAL, self._personal_update(model, task).state_dict())
        return super().train(model, task)

    def personalize(self, model: nn.Module, task: ClientTask) -> nn.Module:
        stored = task.state.load(PERSONAL)
        if stored is None:  # never selected: run its personal update once, keep nothing
            return self._personal_update(model, task)
        model.load_state_dict(stored)
        return model
