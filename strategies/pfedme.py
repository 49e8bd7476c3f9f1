"""pFedMe (Dinh, Tran, Nguyen; arXiv 2006.08848, Algorithm 1).

Client i minimises the Moreau envelope ``F_i(w) = min_theta f_i(theta) + lam/2 ||theta - w||^2``.
For each of ``local_rounds`` minibatches D it approximates the personalized model
``theta_hat(w_local) = argmin_theta f_i(theta; D) + lam/2 ||theta - w_local||^2`` with ``inner_steps``
(K) steps of ``prox_grad_step`` at ``personal_lr``, then moves the local model
``w_local <- w_local - lr * lam * (w_local - theta_hat)`` (Eq. 8, ``local_update``).
Server: ``w <- (1 - beta) w + beta * mean_i(w_local_i)`` (Eq. 9, ``server_update``; beta=1 is FedAvg's
average). The deployed personalized model is ``theta_hat(w)`` on the client's own data.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F

from octomil_sim.client_app import ClientAlgorithm, ClientTask, Tensors
from octomil_sim.errors import ConfigError
from octomil_sim.training import prox_grad_step
from strategies.fedavg import FedAvg, local_sgd, server_step


def local_update(w_local: torch.Tensor, theta: torch.Tensor, lam: float, lr: float) -> torch.Tensor:
    """pFedMe Eq. 8: ``w_local - lr * lam * (w_local - theta)``."""
    return w_local - lr * lam * (w_local - theta)


def server_update(w: torch.Tensor, w_avg: torch.Tensor, beta: float) -> torch.Tensor:
    """pFedMe Eq. 9: ``(1 - beta) w + beta w_avg``, the server step any strategy can take."""
    return server_step(w, w_avg, beta)


class PFedMe(FedAvg):
    """FedAvg's weighted average of the local models, then the beta mixing with the previous global."""

    def __init__(self, beta: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        if beta <= 0:
            raise ConfigError(f"strategy.server.beta={beta}: allowed: a number > 0")
        self.beta = beta

    def aggregate_train(self, server_round, replies):
        averaged, metrics = super().aggregate_train(server_round, replies)
        return self.step_toward(averaged, self.beta), metrics


class PFedMeClient(ClientAlgorithm):
    def __init__(self, lam: float = 15.0, inner_steps: int = 5, personal_lr: float = 0.01,
                 local_rounds: int = 20, personal_epochs: int = 1):
        if lam <= 0:
            raise ConfigError(f"strategy.client.lam={lam}: allowed: a number > 0")
        self.lam, self.inner_steps, self.personal_lr = lam, inner_steps, personal_lr
        self.local_rounds, self.personal_epochs = local_rounds, personal_epochs

    def train(self, model: nn.Module, task: ClientTask) -> tuple[Tensors, dict[str, float]]:
        d, hp = task.data, task.hp
        theta = copy.deepcopy(model)
        w_local = list(model.parameters())
        losses = []
        batches = torch.randperm(len(d.y_train), generator=task.generator).split(hp.batch_size)
        for r in range(self.local_rounds):
            if not task.budget.take():  # one budget step per minibatch (its K inner steps)
                break
            idx = batches[r % len(batches)]
            with torch.no_grad():
                for t, w in zip(theta.parameters(), w_local):
                    t.copy_(w)
            for _ in range(self.inner_steps):
                theta.zero_grad()
                loss = F.cross_entropy(theta(d.x_train[idx]), d.y_train[idx])
                loss.backward()
                with torch.no_grad():
                    for t, w in zip(theta.parameters(), w_local):
                        t.copy_(prox_grad_step(t, t.grad, w, self.lam, self.personal_lr))
            losses.append(loss.item())
            with torch.no_grad():
                for t, w in zip(theta.parameters(), w_local):
                    w.copy_(local_update(w, t, self.lam, hp.lr))
        return model.state_dict(), {"train_loss": sum(losses) / max(len(losses), 1)}

    def personalize(self, model: nn.Module, task: ClientTask) -> nn.Module:
        """``theta_hat(w)``: ``personal_epochs`` of prox-SGD on the client's data, anchored at ``w``."""
        anchor = [p.detach().clone() for p in model.parameters()]
        local_sgd(model, task, epochs=self.personal_epochs, lr=self.personal_lr, anchor=anchor, lam=self.lam)
        return model
