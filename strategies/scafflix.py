"""Scafflix (Yi, Condat, Richtárik; arXiv 2305.13170, Algorithm 1): i-Scaffnew applied to FLIX.

FLIX: client i's personalized model is ``x_tilde_i = alpha_i x + (1 - alpha_i) x_i*`` with ``x_i*``
the minimiser of its own loss f_i; the federation solves ``min_x 1/n sum_i f_i(x_tilde_i(x))``.
Scafflix solves it with probabilistic local training and control variates ``h_i``:

    x_hat_i = x_i - (gamma_i / alpha_i) (grad f_i(x_tilde_i) - h_i)            (local step)
    with probability p: x = sum_i (alpha_i^2/gamma_i) x_hat_i / sum_i (alpha_i^2/gamma_i)   (server)
                        x_i = x, else x_i = x_hat_i
    h_i <- h_i + (p alpha_i / gamma_i) (x_i - x_hat_i)                        (control variate)

In the simulation a Flower round is one communication: the server draws the number of local steps
``L ~ Geometric(p)`` (the coin flips until the next communication) and sends it; the sampled clients
take L steps, the last one uploaded. Right after averaging, the server sends the new ``x`` back to
that round's clients that replied (a ``train.sync`` message, counted in the bytes down), which
apply the control-variate update with it; other clients keep their ``h_i``. A client's resource
class may cap its L (``system``). ``gamma_i`` is ``simulation.lr``; ``x_i*`` is found once with
``local_optimum_epochs`` of local SGD and kept, with ``h_i``, in the client-state store.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from flwr.app import Message, RecordDict
from torch import nn
from torch.nn import functional as F

from octomil_sim.client_app import ClientAlgorithm, ClientTask, Tensors
from octomil_sim.errors import ConfigError
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


class Scafflix(ReweightedFedAvg):
    """Draws the round's local-step count ``L ~ Geometric(p)``; averages with weights alpha^2/gamma."""

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
            self._grid.send_and_receive([Message(content=content, message_type="train.sync", dst_node_id=r.metadata.src_node_id)
                                         for r in replies if not r.has_error()])
        return arrays, metrics


class ScafflixClient(ClientAlgorithm):
    """``alpha``: one alpha_i in (0, 1] for every client, or a list with one per client."""

    def __init__(self, alpha: float | list[float] = 0.3, num_clients: int | None = None,
                 local_optimum_epochs: int = 20):
        alphas = [alpha] if isinstance(alpha, (int, float)) else list(alpha)
        if not alphas or any(not isinstance(a, (int, float)) or not 0 < a <= 1 for a in alphas) or (
            len(alphas) > 1 and num_clients is not None and len(alphas) != num_clients
        ):
            n = f" ({num_clients} of them)" if num_clients else ""
            raise ConfigError(f"strategy.client.alpha={alpha}: allowed: a number in (0, 1], "
                              f"or a list of such numbers, one per client{n}")
        self.alphas, self.local_optimum_epochs = alphas, local_optimum_epochs

    def alpha(self, client_id: int) -> float:
        return self.alphas[client_id] if len(self.alphas) > 1 else self.alphas[0]

    def local_optimum(self, model: nn.Module, task: ClientTask) -> list[torch.Tensor]:
        """``x_i*``: stored, or found once by local SGD from the received model and stored."""
        local = stored_local_model(model, task, "x_star", self.local_optimum_epochs)
        return [p.detach() for p in local.parameters()]

    def train(self, model: nn.Module, task: ClientTask) -> tuple[Tensors, dict[str, float]]:
        alpha, gamma, d = self.alpha(task.client_id), task.hp.lr, task.data
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
        alpha, gamma, p = self.alpha(task.client_id), task.hp.lr, float(task.config["p"])
        x_hat = task.state.load("x_hat")
        h = task.state.load("h") or {k: torch.zeros_like(v) for k, v in x_hat.items()}
        new = dict(model.named_parameters())
        task.state.save("h", {k: control_variate_update(h[k], new[k].detach(), x_hat[k], alpha, gamma, p)
                              for k in x_hat})

    def personalize(self, model: nn.Module, task: ClientTask) -> nn.Module:
        alpha = self.alpha(task.client_id)
        x_star = self.local_optimum(model, task)
        with torch.no_grad():
            for p, sk in zip(model.parameters(), x_star):
                p.copy_(flix_point(p, sk, alpha))
        return model
