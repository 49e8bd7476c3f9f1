"""Scafflix (Yi, Condat, Richtárik; arXiv 2305.13170, Algorithm 1): i-Scaffnew applied to FLIX.

FLIX: client i's personalized model is ``x_tilde_i = alpha_i x + (1 - alpha_i) x_i*`` with ``x_i*``
the minimiser of its own loss f_i; the federation solves ``min_x 1/n sum_i f_i(x_tilde_i(x))``.
Scafflix solves it with probabilistic local training, per-client step sizes ``gamma_i`` and
control variates ``h_i``:

    x_hat_i = x_i - (gamma_i / alpha_i) (grad f_i(x_tilde_i) - h_i)            (local step)
    with probability p: x = sum_i (alpha_i^2/gamma_i) x_hat_i / sum_i (alpha_i^2/gamma_i)   (server)
                        x_i = x, else x_i = x_hat_i
    h_i <- h_i + (p alpha_i / gamma_i) (x_i - x_hat_i)                        (control variate)

Functions -> Algorithm 1: ``flix_point`` (x_tilde_i), ``local_step`` (x_hat_i), ``server_weight``
(alpha_i^2 / gamma_i, the averaging weight), ``control_variate_update`` (h_i); ``per_client``
reads a one-for-all-or-one-per-client option (alpha_i, gamma_i). ``ScafflixClient.local_optimum``
is the official code's "pure local model" (``nn/src/PLM.py``, ``PLM_computation.py``).

In the simulation a Flower round is one communication: the server draws the number of local steps
``L ~ Geometric(p)`` (the coin flips until the next communication) and sends it; the sampled clients
take L steps, the last one uploaded. Right after averaging, the server sends the new ``x`` back to
that round's clients that replied (a ``train.sync`` message, counted in the bytes down), which
apply the control-variate update with it; other clients keep their ``h_i``. A client's resource
class may cap its L (``system``). ``gamma`` is ``simulation.lr`` for every client unless given
(one number, or one per client); each client computes its own weight alpha_i^2/gamma_i and sends
it as a metric, which the server averages with (``ReweightedFedAvg``).

``x_i*`` = argmin f_i is found once, before the client's first update, as in the official code
(``nn/src/emnist_main_v2.py`` runs ``PLM_computation.plm_computation`` before any Scafflix round):
``local_optimum_epochs`` of SGD with ``local_optimum_lr`` and ``local_optimum_batch_size`` from the
run's initial global model, the same start for every client (``stored_local_model``), then kept,
with ``h_i``, in the client-state store. The official neural-network runs use 1000 epochs at lr
0.005 with batches of 2048 or 4096 (``--plm_num_epochs``, ``--plm_lrs``, ``--bs``; a whole FEMNIST
client per batch, i.e. 1000 gradient-descent steps) from a shared init of their own; the convex
runs (``logistic_reg/models.py`` ``LogReg.find_min``) run gradient descent with step 1/L_i from
zero until the gradient norm is below 1e-6. ``conf/experiment/scafflix_*.yaml`` set those values.

Deliberate differences from the official code:
- ``x_i*`` starts from the run's initial global model; the official NN code draws the pure local
  models' shared init from a seed of its own (``PRNGKey(201)`` vs ``PRNGKey(21)`` for x), the
  convex code from zero. Either way all clients share one start.
- Clients compute x_i* lazily, the first time they are sampled (or evaluated), not all up front;
  the result is the same since it depends only on the client's data and the shared start.
- We follow the paper's Algorithm 1. The official NN client step (``nn/src/Scafflix.py``) scales the
  gradient by alpha_i rather than 1/alpha_i, feeds the control variate with the FLIX point, draws
  its coin per step inside the client without applying the average there, and the server applies
  the example-weighted mean update with Adam instead of the alpha_i^2/gamma_i average.
- Partial participation: a round's sampled clients play the role of all n clients of Algorithm 1.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import torch
from flwr.app import Message, RecordDict
from torch import nn
from torch.nn import functional as F

from octomil_sim.client_app import ClientAlgorithm, ClientTask, Tensors
from octomil_sim.errors import ConfigError, number_list
from strategies.fedavg import ReweightedFedAvg, stored_local_model

WEIGHT = "scafflix-weight"


def flix_point(x: torch.Tensor, x_star: torch.Tensor, alpha: float) -> torch.Tensor:
    """FLIX's personalized model ``alpha x + (1 - alpha) x*``."""
    return alpha * x + (1 - alpha) * x_star


def local_step(x: torch.Tensor, grad: torch.Tensor, h: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """``x - (gamma / alpha) (grad - h)``, with ``grad`` taken at the FLIX point."""
    return x - (gamma / alpha) * (grad - h)


def control_variate_update(h: torch.Tensor, x_new: torch.Tensor, x_hat: torch.Tensor, alpha: float,
                           gamma: float, p: float) -> torch.Tensor:
    """``h + (p alpha / gamma) (x_new - x_hat)``."""
    return h + (p * alpha / gamma) * (x_new - x_hat)


def server_weight(alpha: float, gamma: float) -> float:
    """A client's weight in the server average: ``alpha^2 / gamma``."""
    return alpha**2 / gamma


def per_client(value, key: str, allowed: str, ok, num_clients: int | None) -> list[float]:
    """``value`` (one number, or a list with one per client) as a list of floats; a list must have
    ``num_clients`` entries when that is known. Raises a one-line ``ConfigError`` naming ``key``."""
    values = number_list(value)
    n = f" ({num_clients} of them)" if num_clients else ""
    if values is None or not all(ok(v) for v in values):
        raise ConfigError(f"strategy.client.{key}={value}: allowed: {allowed}, or a list of such numbers, "
                          f"one per client{n}")
    if not isinstance(value, (int, float)) and num_clients is not None and len(values) != num_clients:
        raise ConfigError(f"strategy.client.{key}={value}: a list of {len(values)}; allowed: {allowed}, "
                          f"or a list of such numbers, one per client{n}")
    return [float(v) for v in values]


class Scafflix(ReweightedFedAvg):
    """Draws the round's local-step count ``L ~ Geometric(p)``; averages with weights alpha^2/gamma.
    A fairness policy reweights that average but never lengthens it into an extrapolating step
    (``average_only``): the control variates' update ``h_i += (p alpha_i / gamma_i)(x_new - x_hat_i)``
    assumes ``x_new`` is an average of the uploads; bounded group loss's step of 1 + sum mu (up to 2)
    times the average's made Synthetic(1, 1) runs diverge within 100 rounds."""

    average_only = True

    def __init__(self, p: float = 0.2, max_local_steps: int = 100, **kwargs):
        super().__init__(**kwargs)
        if not 0 < p <= 1:
            raise ConfigError(f"strategy.server.p={p}: allowed: a probability in (0, 1]")
        self.p, self.max_local_steps = p, max_local_steps

    def local_steps(self, server_round: int) -> int:
        rng = np.random.default_rng([self.seed, server_round])
        return int(min(rng.geometric(self.p), self.max_local_steps))

    def configure_train(self, server_round, arrays, config, grid):
        config["local-steps"] = self.local_steps(server_round)
        config["p"] = self.p
        self._grid, self._config = grid, config
        return super().configure_train(server_round, arrays, config, grid)

    def client_weights(self, server_round, metrics):
        return [float(m[WEIGHT]) for m in metrics]

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None:  # the clients whose x_hat_i went into the average update h_i
            content = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: self._config})
            self._grid.send_and_receive([Message(content=content, message_type="train.sync",
                                                 dst_node_id=r.metadata.src_node_id)
                                         for r in replies if not r.has_error()])
        return arrays, metrics


class ScafflixClient(ClientAlgorithm):
    """``alpha`` (alpha_i in (0, 1]) and ``gamma`` (gamma_i > 0; None = ``simulation.lr``): one number
    for every client, or a list with one per client. ``local_optimum_*``: the SGD that finds x_i*
    (lr and batch size None = ``simulation.lr`` / ``simulation.batch_size``)."""

    frozen_parameters_ok = False  # its update writes every parameter (a frozen base would move or fail)

    def __init__(self, alpha: float | list[float] = 0.3, gamma: float | list[float] | None = None,
                 num_clients: int | None = None, local_optimum_epochs: int = 20,
                 local_optimum_lr: float | None = None, local_optimum_batch_size: int | None = None):
        self.alphas = per_client(alpha, "alpha", "a number in (0, 1]", lambda a: 0 < a <= 1, num_clients)
        self.gammas = None if gamma is None else per_client(gamma, "gamma", "null (simulation.lr), a number > 0",
                                                            lambda g: g > 0, num_clients)
        if local_optimum_lr is not None and not local_optimum_lr > 0:
            raise ConfigError(f"strategy.client.local_optimum_lr={local_optimum_lr}: allowed: null (simulation.lr) "
                              "or a number > 0")
        self.local_optimum_epochs = local_optimum_epochs
        self.local_optimum_lr, self.local_optimum_batch_size = local_optimum_lr, local_optimum_batch_size

    def alpha(self, client_id: int) -> float:
        return self.alphas[client_id] if len(self.alphas) > 1 else self.alphas[0]

    def gamma(self, task: ClientTask) -> float:
        """gamma_i: the configured step size of this client, else ``simulation.lr``."""
        if self.gammas is None:
            return task.hp.lr
        return self.gammas[task.client_id] if len(self.gammas) > 1 else self.gammas[0]

    def local_optimum(self, model: nn.Module, task: ClientTask) -> list[torch.Tensor]:
        """``x_i*``: stored, or found once by local SGD from the run's initial model and stored."""
        hp = replace(task.hp, lr=self.local_optimum_lr or task.hp.lr,
                     batch_size=self.local_optimum_batch_size or task.hp.batch_size)
        local = stored_local_model(model, replace(task, hp=hp), "x_star", self.local_optimum_epochs)
        return [p.detach() for p in local.parameters()]

    def train(self, model: nn.Module, task: ClientTask) -> tuple[Tensors, dict[str, float]]:
        alpha, gamma, d = self.alpha(task.client_id), self.gamma(task), task.data
        steps = int(task.config["local-steps"])
        x_star = self.local_optimum(model, task)
        names = [k for k, _ in model.named_parameters()]
        x = [t.detach().clone() for t in model.parameters()]  # x_i = the received global x
        h = task.state.load("h") or {k: torch.zeros_like(t) for k, t in zip(names, x)}
        probe = copy.deepcopy(model)
        batches = torch.randperm(len(d.y_train), generator=task.generator).split(task.hp.batch_size)
        loss = torch.tensor(0.0)
        for step in range(steps):
            if not task.budget.take():
                break
            idx = batches[step % len(batches)]
            with torch.no_grad():
                for q, xk, sk in zip(probe.parameters(), x, x_star):
                    q.copy_(flix_point(xk, sk, alpha))
            probe.zero_grad()
            loss = F.cross_entropy(probe(d.x_train[idx]), d.y_train[idx])
            loss.backward()
            x = [local_step(xk, q.grad, h[k], alpha, gamma) for xk, q, k in zip(x, probe.parameters(), names)]
        x_hat = dict(zip(names, x))
        task.state.save("x_hat", x_hat)
        upload = {**model.state_dict(), **x_hat}
        return upload, {"train_loss": loss.item(), WEIGHT: server_weight(alpha, gamma)}

    def sync(self, model: nn.Module, task: ClientTask) -> None:
        """``h_i <- h_i + (p alpha_i / gamma_i)(x_new - x_hat_i)`` with ``x_new`` the fresh average."""
        alpha, gamma, p = self.alpha(task.client_id), self.gamma(task), float(task.config["p"])
        x_hat = task.state.load("x_hat")
        h = task.state.load("h") or {k: torch.zeros_like(v) for k, v in x_hat.items()}
        new = dict(model.named_parameters())
        task.state.save("h", {k: control_variate_update(h[k], new[k].detach(), x_hat[k], alpha, gamma, p)
                              for k in x_hat})

    objective_is_personalized = True

    def objective_model(self, model: nn.Module, task: ClientTask) -> nn.Module:
        """The FLIX point alpha_i x_i* + (1 - alpha_i) x: f_i there is client i's FLIX objective, the
        loss a fairness policy composed with Scafflix weights it by (the global x is never deployed)."""
        return self.personalize(copy.deepcopy(model), task)

    def personalize(self, model: nn.Module, task: ClientTask) -> nn.Module:
        alpha = self.alpha(task.client_id)
        x_star = self.local_optimum(model, task)
        with torch.no_grad():
            for p, sk in zip(model.parameters(), x_star):
                p.copy_(flix_point(p, sk, alpha))
        return model
