"""pFedMe (Dinh, Tran, Nguyen; arXiv 2006.08848, Algorithm 1) and its official code
(CharlieDinh/pFedMe: ``FLAlgorithms/users/userpFedMe.py``, ``FLAlgorithms/optimizers/fedoptimizer.py``
``pFedMeOptimizer``, ``FLAlgorithms/servers/serverpFedMe.py``).

Client i minimises the Moreau envelope ``F_i(w) = min_theta f_i(theta) + lam/2 ||theta - w||^2``.
In each of its ``local_rounds`` (R) local rounds it takes the next minibatch D of its carried-over
batch stream (``octomil_sim.training.BatchStream``: the official ``get_next_train_batch``), moves the
personalized model ``theta`` by ``inner_steps`` (K) steps of ``inner_step`` at ``personal_lr`` toward
``theta_hat(w_local) = argmin_theta f_i(theta; D) + lam/2 ||theta - w_local||^2`` (Eq. 7), then moves
its local model ``w_local <- w_local - lr * lam * (w_local - theta)`` (Eq. 8, ``local_update``).
Server: ``w <- (1 - beta) w + beta * sum_i n_i w_local_i / sum_i n_i`` over the sampled clients
(Eq. 9, ``server_update``; the official ``persionalized_aggregate_parameters`` weights by training
examples; beta = 1 is FedAvg's average).

``personalized_model`` says which model a client deploys and is evaluated with:
- ``theta`` (default; the paper's definition of the personalized model, Sec. 3): the ``theta`` of the
  client's last local round, kept in the client-state store. A client that never trained deploys
  ``theta_hat(w)``: ``personal_epochs`` of prox-SGD on its training split anchored at the global w.
- ``local``: the client's local model ``w_local`` after its R local rounds. This is what the official
  code measures as "personalized": ``persionalized_model_bar`` is the list of the optimizer's own
  parameter objects, which ``update_parameters(self.local_model)`` overwrites with w_local before
  every evaluation (CharlieDinh/pFedMe issue #5). The official table numbers are this model's.
Every evaluation also reports both (``theta_acc``, ``local_acc``, and their losses) whatever is deployed.

Differences from the official code, each deliberate:
- ``theta`` starts each round at the received w and warm-starts across the R local rounds, as the
  official optimizer does (the paper leaves the inner solver's start open); ``mu`` adds the official
  optimizer's ``mu * theta`` term (0.001 there; 0 here unless a config sets it, as the paper has none).
- The official server trains every user every round and aggregates the sampled ones; set
  ``simulation.train_all_clients=true`` for that (the pfedme_table1_* experiments do).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F

from octomil_sim.client_app import ClientAlgorithm, ClientTask, Tensors
from octomil_sim.errors import ConfigError
from octomil_sim.training import evaluate
from strategies.fedavg import FedAvg, local_sgd, server_step

THETA, LOCAL = "pfedme_theta", "pfedme_local"


def inner_step(theta: torch.Tensor, grad: torch.Tensor, w_local: torch.Tensor, lam: float, lr: float,
               mu: float = 0.0) -> torch.Tensor:
    """One step of the inner solver (Eq. 7; official ``pFedMeOptimizer.step``):
    ``theta - lr * (grad + lam (theta - w_local) + mu theta)``."""
    return theta - lr * (grad + lam * (theta - w_local) + mu * theta)


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
    frozen_parameters_ok = False  # its update writes every parameter (a frozen base would move or fail)

    def __init__(self, lam: float = 15.0, inner_steps: int = 5, personal_lr: float = 0.01,
                 local_rounds: int = 20, personal_epochs: int = 1, personalized_model: str = "theta",
                 mu: float = 0.0):
        if lam <= 0:
            raise ConfigError(f"strategy.client.lam={lam}: allowed: a number > 0")
        if personalized_model not in ("theta", "local"):
            raise ConfigError(f"strategy.client.personalized_model={personalized_model!r}: allowed: theta, local")
        if mu < 0:
            raise ConfigError(f"strategy.client.mu={mu}: allowed: a number >= 0")
        self.lam, self.inner_steps, self.personal_lr = lam, inner_steps, personal_lr
        self.local_rounds, self.personal_epochs = local_rounds, personal_epochs
        self.personalized_model, self.mu = personalized_model, mu

    def train(self, model: nn.Module, task: ClientTask) -> tuple[Tensors, dict[str, float]]:
        d, hp = task.data, task.hp
        theta = copy.deepcopy(model)  # starts at the received w, warm-started across local rounds
        w_local = list(model.parameters())
        stream = task.batch_stream()
        losses = []
        for _ in range(self.local_rounds):
            if not task.budget.take():  # one budget step per minibatch (its K inner steps)
                break
            idx = stream.next()
            for _ in range(self.inner_steps):
                theta.zero_grad()
                loss = F.cross_entropy(theta(d.x_train[idx]), d.y_train[idx])
                loss.backward()
                with torch.no_grad():
                    for t, w in zip(theta.parameters(), w_local):
                        t.copy_(inner_step(t, t.grad, w, self.lam, self.personal_lr, self.mu))
            losses.append(loss.item())
            with torch.no_grad():
                for t, w in zip(theta.parameters(), w_local):
                    w.copy_(local_update(w, t, self.lam, hp.lr))
        stream.save()
        task.state.save(THETA, theta.state_dict())
        task.state.save(LOCAL, model.state_dict())
        return model.state_dict(), {"train_loss": sum(losses) / max(len(losses), 1)}

    def _theta(self, model: nn.Module, task: ClientTask) -> nn.Module:
        stored = task.state.load(THETA)
        if stored is not None:
            model.load_state_dict(stored)
            return model
        anchor = [p.detach().clone() for p in model.parameters()]  # never trained: theta_hat(w)
        local_sgd(model, task, epochs=self.personal_epochs, lr=self.personal_lr, anchor=anchor, lam=self.lam)
        return model

    def _local(self, model: nn.Module, task: ClientTask) -> nn.Module:
        stored = task.state.load(LOCAL)
        if stored is not None:
            model.load_state_dict(stored)
        return model  # never trained: its local model is the global one it would start from

    def personalize(self, model: nn.Module, task: ClientTask) -> nn.Module:
        return (self._theta if self.personalized_model == "theta" else self._local)(model, task)

    def report(self, model: nn.Module, task: ClientTask) -> dict[str, float]:
        """Both candidate personalized models on the held-out split, whichever is deployed."""
        d, out = task.data, {}
        for name, pick in (("theta", self._theta), ("local", self._local)):
            loss, acc = evaluate(pick(copy.deepcopy(model), task), d.x_test, d.y_test)
            out[f"{name}_acc"], out[f"{name}_loss"] = acc, loss
        return out
